"""Bad input at the public boundary raises ValueError naming the argument, its shape and the fix."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import ref_linear, ref_log_linear

from jaxauction import TokenAuction, _validation, aggregation, payments, preferences, sampling

GOOD_LOGITS = jnp.zeros((2, 4))
GOOD_BIDS = jnp.ones(2)

FUNCTIONS = {
    "linear": aggregation.linear,
    "log_linear": aggregation.log_linear,
    "second_price": functools.partial(payments.second_price, aggregation.linear),
    "linear_closed_form": payments.linear_closed_form,
    "monotonicity_violation": functools.partial(preferences.monotonicity_violation, aggregation.linear),
    "stable_sample_two": functools.partial(sampling.stable_sample_two, jax.random.key(0)),
    "TokenAuction": TokenAuction(),
}


def _with(index, value, shape=(2, 4)):
    x = np.zeros(shape)
    x[index] = value
    return jnp.asarray(x)


BAD_INPUTS = [
    ("negative bid", GOOD_LOGITS, jnp.array([1.0, -0.5]), r"bids \(shape \(2,\)\).*negative.*index \(1,\)"),
    ("NaN bid", GOOD_LOGITS, jnp.array([jnp.nan, 1.0]), r"bids \(shape \(2,\)\).*non-finite"),
    ("infinite bid", GOOD_LOGITS, jnp.array([1.0, jnp.inf]), r"bids \(shape \(2,\)\).*non-finite"),
    ("NaN logit", _with((1, 2), np.nan), GOOD_BIDS, r"logits \(shape \(2, 4\)\).*NaN.*\(1, 2\)"),
    ("+inf logit", _with((0, 0), np.inf), GOOD_BIDS, r"logits \(shape \(2, 4\)\).*\+inf"),
    ("row of -inf", _with((1, slice(None)), -np.inf), GOOD_BIDS, r"logits \(shape \(2, 4\)\).*row.*-inf"),
    ("mismatched n", jnp.zeros((3, 4)), GOOD_BIDS, r"logits has shape \(3, 4\) \(3 agents\) but bids has shape \(2,\)"),
    ("logits rank 1", jnp.zeros(4), GOOD_BIDS, r"logits must have shape \[\.\.\., n_agents, vocab\].*\(4,\)"),
    ("scalar bids", GOOD_LOGITS, jnp.float32(1.0), r"bids must have shape \[\.\.\., n_agents\].*\(\)"),
    ("zero agents", jnp.zeros((0, 4)), jnp.zeros(0), r"shape \(0, 4\).*zero agents"),
    ("batch mismatch", jnp.zeros((3, 2, 4)), jnp.ones((5, 2)), r"leading \(batch\) axes.*\(3,\).*\(5,\)"),
]


@pytest.mark.parametrize("fn_name", FUNCTIONS)
@pytest.mark.parametrize("case,logits,bids,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_value_error(fn_name, case, logits, bids, message):
    with pytest.raises(ValueError, match=message):
        FUNCTIONS[fn_name](logits, bids)


def test_messages_name_the_function_and_the_fix():
    with pytest.raises(ValueError, match=r"^second_price: bids .*Fix: clip at 0"):
        payments.second_price(aggregation.linear, GOOD_LOGITS, jnp.array([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"^linear: logits .*Fix: replace NaN by -inf"):
        aggregation.linear(_with((0, 1), np.nan), GOOD_BIDS)


def test_bad_base_distribution():
    with pytest.raises(ValueError, match=r"base_logits must have shape \[\.\.\., 4\].*\(3,\)"):
        TokenAuction(base_logits=jnp.zeros(3))(GOOD_LOGITS, GOOD_BIDS)
    with pytest.raises(ValueError, match=r"base_bid \(shape \(\)\).*negative"):
        payments.second_price(aggregation.linear, GOOD_LOGITS, GOOD_BIDS, base_logits=jnp.zeros(4), base_bid=-1.0)
    with pytest.raises(ValueError, match=r"base_logits \(shape \(4,\)\).*-inf for every token"):
        payments.linear_closed_form(GOOD_LOGITS, GOOD_BIDS, base_logits=jnp.full(4, -jnp.inf), base_bid=1.0)


def test_rule_must_be_a_name_a_rule_or_callable():
    with pytest.raises(ValueError, match=r"^second_price: rule: expected a rule name \['linear', 'log_linear'\]"):
        payments.second_price(3, GOOD_LOGITS, GOOD_BIDS)
    with pytest.raises(ValueError, match=r"^TokenAuction: rule: unknown rule 'cubic'; use one of"):
        TokenAuction(rule="cubic")(GOOD_LOGITS, GOOD_BIDS)
    with pytest.raises(ValueError, match=r"^TokenAuction: payment: expected one of \['second_price', 'kl', None\]"):
        TokenAuction(payment="first_price")(GOOD_LOGITS, GOOD_BIDS)


@pytest.mark.parametrize("rule,reference", [(aggregation.linear, ref_linear), (aggregation.log_linear, ref_log_linear)])
def test_under_jit_the_documented_behaviour_replaces_errors(rule, reference):
    """Values cannot be checked under jit: negative bids count as 0, an all -inf agent bids 0, no NaN."""
    logits = jnp.array([[0.0, 1.0, 2.0], [2.0, 0.0, -jnp.inf], [-jnp.inf, -jnp.inf, -jnp.inf]])
    np.testing.assert_allclose(
        np.exp(jax.jit(rule)(logits, jnp.array([1.0, -3.0, 2.0]))), reference(logits[:2], [1.0, 0.0]), rtol=1e-5
    )
    pay = jax.jit(functools.partial(payments.second_price, rule))
    z = pay(logits, jnp.array([1.0, 2.0, 5.0]))
    assert z[2] == 0.0
    # the same as a third agent that bids 0
    np.testing.assert_allclose(z, pay(logits.at[2].set(0.0), jnp.array([1.0, 2.0, 0.0])), rtol=1e-6)


def test_integer_and_list_inputs_are_accepted():
    expected = aggregation.linear(jnp.array([[0.0, 1.0], [1.0, 0.0]]), jnp.array([1.0, 3.0]))
    np.testing.assert_allclose(aggregation.linear([[0.0, 1.0], [1.0, 0.0]], [1, 3]), expected)


HOST_BAD = [
    ("strings", ["1", "2"], r"^config\.bids: .*got dtype <U1.*Fix: pass int or float"),
    ("a string", "1, 2", r"^config\.bids: .*got the string"),
    ("booleans", [True, False], r"^config\.bids: .*got dtype bool"),
    ("ragged", [[1.0, 2.0], [3.0]], r"^config\.bids: .*ragged"),
    ("empty", [], r"^config\.bids: .*(empty|shape \(0,\))"),
    ("rank 3", np.ones((1, 1, 2)), r"^config\.bids: .*1 or 2 axes.*\(1, 1, 2\)"),
    ("wrong agents", [1.0, 2.0, 3.0], r"^config\.bids: .*one bid per agent \(2\).*\(3,\)"),
    ("negative", [1.0, -2.0], r"^config\.bids: bids .*negative bid -2"),
    ("NaN", [1.0, np.nan], r"^config\.bids: bids .*non-finite"),
    ("too large", [1.0, 1e300], r"^config\.bids: bids .*1e\+300.*above the largest accepted bid"),
]


@pytest.mark.parametrize("case,bids,message", HOST_BAD, ids=[c[0] for c in HOST_BAD])
def test_host_bids_rejects_bad_user_bids(case, bids, message):
    with pytest.raises(ValueError, match=message):
        _validation.host_bids("config.bids", bids, num_agents=2)


def test_host_bids_accepts_numbers_and_returns_float64():
    got = _validation.host_bids("bids", [[1, 2], [0.5, 0.0]], num_agents=2)
    assert got.dtype == np.float64 and got.shape == (2, 2)
    np.testing.assert_array_equal(got, [[1.0, 2.0], [0.5, 0.0]])
    np.testing.assert_array_equal(_validation.host_bids("bids", jnp.array([3.0]), ndim=1), [3.0])
    limit = _validation.max_bid(jnp.float32)
    assert 1e30 < limit < float(np.finfo(np.float32).max)
    assert _validation.host_bids("bids", [limit, 1.0], dtype=jnp.float32)[0] == limit
    with pytest.raises(ValueError, match="above the largest accepted bid"):
        _validation.host_bids("bids", [2 * limit, 1.0], dtype=jnp.float32)
    assert _validation.max_bid(jnp.float64) > 1e300


# ---------------------------------------------------------------------------------------------- eager or traced


def test_is_concrete_on_host_values():
    """Arrays, NumPy values, Python scalars, None and pytrees of them are concrete (nothing traced)."""
    assert _validation.is_concrete()
    assert _validation.is_concrete(jnp.ones(3), np.zeros((2, 2)), np.float32(1.0), 2.5, 3, True, None)
    assert _validation.is_concrete({"a": (jnp.ones(2), [1.0, None])}, (np.arange(3),))


@pytest.mark.parametrize("transform", ["jit", "vmap", "grad"])
def test_is_concrete_is_false_under_every_transformation(transform):
    """Any traced leaf (also inside a pytree, next to concrete values) makes the arguments traced; the
    closed-over concrete array stays concrete under the same trace."""
    seen = []
    outer = jnp.arange(3.0)

    def body(x):
        seen.append(
            (
                _validation.is_concrete(x),
                _validation.is_concrete(outer, 1.0, None),
                _validation.is_concrete(outer, {"k": [x]}),
            )
        )
        return jnp.sum(x * outer)

    wrapped = {"jit": jax.jit(body), "vmap": jax.vmap(body), "grad": jax.grad(body)}[transform]
    wrapped(jnp.ones((4, 3)) if transform == "vmap" else jnp.ones(3))
    assert seen == [(False, True, False)]
