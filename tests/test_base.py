"""base.py: the Rule object and the one rule registry (as_rule, register, rule_names)."""

import functools
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import jaxauction
from jaxauction import aggregation, base


def test_names_objects_and_wrapped_built_ins_resolve_to_the_registered_rule():
    assert {"linear", "log_linear"} <= set(base.rule_names())
    assert base.rule_names() == tuple(sorted(base.rule_names()))
    for name in ("linear", "log_linear"):
        rule = base.as_rule(name)
        assert rule.name == name and rule is getattr(jaxauction, name)
        assert base.as_rule(rule) is rule
        assert base.as_rule(jax.jit(rule)) is rule
        assert base.as_rule(functools.wraps(rule.log_aggregate)(lambda *a: rule(*a))) is rule
    assert base.as_rule(aggregation.linear) is jaxauction.linear


def test_a_plain_function_becomes_a_rule_that_knows_nothing_else():
    def my_rule(logits, bids):
        return jax.nn.log_softmax(jnp.sum(logits * bids[..., None], axis=-2), axis=-1)

    rule = base.as_rule(my_rule)
    assert rule.name == "my_rule" and rule.log_aggregate is my_rule
    assert rule.valuation is None and rule.closed_form_payment is None and not rule.monotone
    assert hash(rule) == hash(base.as_rule(my_rule))  # hashable: a static argument of jit


@pytest.mark.parametrize(
    "value, match",
    [
        ("quadratic", r"^rule: unknown rule 'quadratic'; use one of \['linear', 'log_linear'"),
        (3, r"^rule: expected a rule name .*got int 3"),
        (None, r"^rule: expected a rule name .*got NoneType None"),
    ],
)
def test_unknown_rules_are_refused_by_name(value, match):
    with pytest.raises(ValueError, match=match):
        base.as_rule(value)


def test_register_adds_a_rule_and_refuses_to_replace_one_silently():
    """In a fresh process: the registry is process-wide, and this test must leave the suite's untouched."""
    script = textwrap.dedent(
        """
        import pytest
        from jaxauction import aggregation, base

        rule = base.Rule(name="mine", log_aggregate=aggregation.linear)
        assert base.register(rule) is rule
        assert base.rule_names() == ("linear", "log_linear", "mine") and base.as_rule("mine") is rule
        other = base.Rule(name="mine", log_aggregate=aggregation.log_linear)
        with pytest.raises(ValueError, match="exists already; pass overwrite=True"):
            base.register(other)
        with pytest.raises(ValueError, match="exists already"):
            base.register(base.Rule(name="linear", log_aggregate=aggregation.log_linear))
        assert base.register(other, overwrite=True) is other and base.as_rule("mine") is other
        with pytest.raises(ValueError, match="register: expected a jaxauction.base.Rule"):
            base.register(aggregation.linear)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
