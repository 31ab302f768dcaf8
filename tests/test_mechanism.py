"""The mechanism spec: one vocabulary, one validator, the same message at every door."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import jaxauction as ja
from jaxauction import cli, mechanism
from jaxauction.config import ConfigError, load_config
from jaxauction.mechanism import MechanismSpec, SpecError

CONFIG = """\
query = "Vacations in Hawaii"
{setting}

[[advertisers]]
name = "Alpha"
bid = 1.0
prompt = "Ad for {{query}} by {{name}}."

[[advertisers]]
name = "Beta"
bid = 2.0
prompt = "Ad for {{query}} by {{name}}."
"""


def test_payment_kinds_map_to_allocations_in_one_place():
    assert mechanism.PAYMENTS == ("second_price", "kl", None)
    assert [mechanism.allocation(p) for p in mechanism.PAYMENTS] == ["robust", "kl", None]
    for bad in ("none", "robust", "forward_kl", "first_price", 3):
        with pytest.raises(SpecError, match=r"^payment: expected one of"):
            mechanism.allocation(bad)  # never silently "kl"
    assert mechanism.payment_from_text("none") is None
    assert mechanism.payment_from_text("kl") == "kl" and mechanism.payment_from_text("bogus") == "bogus"


def test_spec_is_hashable_and_checked_by_create():
    spec = MechanismSpec.create("log_linear", "kl", "greedy", 2)
    assert spec == MechanismSpec.create(ja.log_linear, "kl", "greedy", 2.0) and hash(spec) == hash(spec.mechanism)
    assert spec.rule is ja.log_linear and spec.allocation == "kl" and spec.temperature == 2.0
    assert MechanismSpec.create(**spec.keywords()) == spec
    options = ja.GenerateOptions.create(payment=None, max_new_tokens=5)
    assert isinstance(options, MechanismSpec) and options.mechanism == MechanismSpec.create(payment=None)
    with pytest.raises(SpecError, match=r"^payment: 'kl' needs the rule's valuation; rule 'mine' has none"):

        def mine(logits, bids):
            return ja.linear(logits, bids)

        MechanismSpec.create(mine, "kl")


@pytest.mark.parametrize(
    "temperature, ok",
    [(1e-30, True), (1e30, True), (1, True), (np.float32(0.5), True), (jnp.float32(2.0), True)]
    + [(t, False) for t in (0.0, -1.0, 1e-31, 1e31, np.inf, np.nan, None, "1", True, np.ones(2))],
)
def test_one_temperature_rule_whatever_the_precision(temperature, ok):
    if ok:
        assert MechanismSpec.create(temperature=temperature).temperature == float(temperature)
        return
    with pytest.raises(SpecError, match=r"^temperature: expected a finite number in \[1e-30, 1e\+30\]"):
        MechanismSpec.create(temperature=temperature)


@pytest.mark.filterwarnings(
    "ignore::jaxauction.mechanism.PaymentWarning"
)  # second_price under a rule that is not monotone
def test_stable_decoding_conditions_are_stated_once():
    assert mechanism.stable_problem("linear", 2, False) is None
    assert mechanism.stable_problem(ja.linear, [2, 2], False) is None
    problem = mechanism.stable_problem("log_linear", [1, 2, 3], True)
    assert "agent counts [1, 2, 3], rule 'log_linear', a base prompt" in problem
    assert "3 agents" in mechanism.stable_problem("linear", 3, False)
    spec = MechanismSpec.create(decoding="stable")
    spec.check_fits(2, False)
    with pytest.raises(SpecError, match=r"^decoding: decoding 'stable' is .* got 3 agents"):
        spec.check_fits([3], False)
    MechanismSpec.create(rule="log_linear", decoding="sample").check_fits(3, True)


def _reason(**setting) -> str:
    with pytest.raises(SpecError) as error:
        ja.GenerateOptions.create(**setting)
    return error.value.reason


def _generate_options_error(field, value) -> str:
    with pytest.raises(ValueError) as error:
        ja.GenerateOptions.create(**{field: value})
    return str(error.value)


def _config_error(tmp_path, field, value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    path = tmp_path / f"{field}.toml"
    path.write_text(CONFIG.format(setting=f'{field} = "{text}"' if isinstance(value, str) else f"{field} = {text}"))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert f"{path}:2: field '{field}': " in str(error.value)
    return str(error.value)


def _cli_batch_error(tmp_path, capsys, field, value) -> str:
    source = tmp_path / "auctions.jsonl"
    source.write_text(json.dumps({"prompts": ["a", "b"], "bids": [1.0, 2.0]}) + "\n")
    flag = "--" + field.replace("_", "-")
    argv = ["batch", str(source), "--out", str(tmp_path / "out.jsonl"), flag, str(value)]
    assert cli.main([*argv, "--model", str(tmp_path / "no_model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}: "), err
    return err


@pytest.mark.parametrize(
    "field, value",
    [
        ("payment", "first_price"),
        ("payment", "robust"),
        ("decoding", "beam"),
        ("temperature", 1e-40),
        ("temperature", 0),
        ("temperature", "hot"),
        ("max_new_tokens", 0),
        ("max_new_tokens", 2.5),
    ],
)
def test_a_bad_setting_gets_the_same_message_at_every_door(tmp_path, capsys, field, value):
    reason = _reason(**{field: value})
    assert "expected" in reason and repr(value) in reason and (field != "temperature" or "float32" in reason)
    doors = {
        "GenerateOptions.create": _generate_options_error(field, value),
        "TOML configuration": _config_error(tmp_path, field, value),
        "command-line batch flags": _cli_batch_error(tmp_path, capsys, field, value),
    }
    if field == "payment":
        with pytest.raises(ValueError) as error:
            ja.TokenAuction(payment=value)(jnp.zeros((2, 3)), jnp.ones(2))
        doors["TokenAuction"] = str(error.value)
    for door, message in doors.items():
        assert message.rstrip().endswith(reason), (door, message)  # the door adds only where it came from


def test_no_payment_is_spelled_none_in_text_and_None_in_python(tmp_path):
    path = tmp_path / "none.toml"
    path.write_text(CONFIG.format(setting='payment = "none"'))
    assert load_config(path).payment is None
    with pytest.raises(ValueError, match=r"^payment: expected one of \['second_price', 'kl', None\]"):
        ja.GenerateOptions.create(payment="none")


@pytest.mark.filterwarnings(
    "ignore::jaxauction.mechanism.PaymentWarning"
)  # second_price under a rule that is not monotone
def test_stable_decoding_gets_the_same_message_from_config_sweep_and_batch(tmp_path, capsys):
    reason = mechanism.stable_problem("log_linear", 2, False)
    path = tmp_path / "stable.toml"
    path.write_text(CONFIG.format(setting='decoding = "stable"\nrule = "log_linear"'))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert f"field 'decoding': {reason}" in str(error.value)
    path.write_text(CONFIG.format(setting='decoding = "stable"'))
    assert cli.main(["sweep", str(path), "--rules", "linear,log_linear", "--model", str(tmp_path / "none")]) == 2
    assert f"--rules: {path}: {reason}" in capsys.readouterr().err
    source = tmp_path / "three.jsonl"
    source.write_text(json.dumps({"prompts": ["a", "b", "c"], "bids": [1.0, 2.0, 3.0]}) + "\n")
    argv = ["batch", str(source), "--out", str(tmp_path / "o.jsonl"), "--decoding", "stable"]
    assert cli.main([*argv, "--model", str(tmp_path / "no_model")]) == 2
    assert mechanism.stable_problem("linear", 3, False) in capsys.readouterr().err
