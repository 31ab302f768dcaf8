"""``simulation.simulate`` and ``compress_vocabulary`` on bad input: a ValueError naming the argument, never a
silent zero or a raw NumPy/JAX error (no model needed)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxauction import simulation

RNG = np.random.default_rng(0)
LOGITS = RNG.standard_normal((2, 3, 7))  # K = 2 sets, n = 3 agents, V = 7
BIDS = np.array([[1.0, 0.5, 0.2], [0.3, 0.3, 2.0]])


def run(**changes):
    kwargs = dict(logits=LOGITS, bids=BIDS, index=[0, 1], chunk_size=2, progress=False)
    kwargs.update(changes)
    return simulation.simulate(kwargs.pop("logits"), kwargs.pop("bids"), **kwargs)


def with_value(where, value):
    logits = LOGITS.copy()
    logits[where] = value
    return logits


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "logits, message",
    [
        (with_value((1, 2, 4), np.nan), r"logits .* contains NaN, first at index \(1, 2, 4\)"),
        (with_value((0, 1, 0), np.inf), r"logits .* contains \+inf"),
        (with_value((1, 0), -np.inf), r"logits .* -inf for every token, first at row \(1, 0\)"),
    ],
)
def test_bad_logits_are_refused(dtype, logits, message):
    with pytest.raises(ValueError, match=message):
        run(logits=logits.astype(dtype))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(bids=np.zeros((0, 3)), index=None), r"bids: .* got an empty array of shape \(0, 3\)"),
        (dict(bids=BIDS[:, :2]), r"bids: .* one bid per agent \(3\); got shape"),
        (dict(bids=[[1.0, -1.0, 0.0], [1.0, 1.0, 1.0]]), "negative bid"),
        (dict(bids=[[1.0, np.inf, 0.0], [1.0, 1.0, 1.0]]), "non-finite"),
        (dict(bids=[[1.0, 2.0], [1.0]]), "bids: .* ragged or non-numeric"),
        (dict(index=[0.0, 1.0]), r"index: expected integers .* got dtype float64; floats are not truncated"),
        (dict(index=[0, 1.7]), "floats are not truncated"),
        (
            dict(index=[0, 2**33]),
            rf"index: expected shape \[A\] = \(2,\) with entries in \[0, 2\) .* got {2**33} at position 1",
        ),
        (dict(index=[0, -1]), r"got -1 at position 1"),
        (dict(index=[0]), r"index: expected shape \[A\] = \(2,\)"),
        (dict(chunk_size=2.5), "chunk_size: expected a positive int, got float 2.5"),
        (dict(chunk_size=0), "chunk_size: expected a positive int"),
        (dict(chunk_size=True), "chunk_size: expected a positive int, got bool"),
        (dict(mesh="x"), "mesh: expected None or a jax.sharding.Mesh"),
        (dict(logits=LOGITS[:, :, :0]), r"logits: expected shape \[n, V\] or \[K, n, V\] with no empty axis"),
        (dict(logits=LOGITS.astype(str)), "logits: expected real numbers"),
    ],
)
def test_bad_arguments_name_the_argument(changes, message):
    with pytest.raises(ValueError, match=message):
        run(**changes)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_integer_index_types_still_work_and_agree(dtype):
    """Any integer dtype of ``index`` gives the same result as running each logits set alone."""
    context = jax.enable_x64(True) if dtype == np.float64 else jax.enable_x64(False)
    with context:
        logits = LOGITS.astype(dtype)
        both = run(logits=logits, index=np.array([0, 1], np.uint8))
        for k in (0, 1):
            alone = run(logits=logits[k], bids=BIDS[k : k + 1], index=None)
            np.testing.assert_allclose(both.payments[k], alone.payments[0], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(both.values[k], alone.values[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compress_vocabulary_refuses_nan_logits(dtype):
    with pytest.raises(ValueError, match=r"compress_vocabulary: logits .* contains NaN"):
        simulation.compress_vocabulary(with_value((0, 0, 3), np.nan).astype(dtype))
    with pytest.raises(ValueError, match=r"mass: expected a number in \(0, 1\]"):
        simulation.compress_vocabulary(LOGITS.astype(dtype), mass=float("nan"))


def _kl(p, q):
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def _probabilities(logits):
    return np.exp(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True))


@pytest.mark.parametrize("name", ["linear", "log_linear"])
def test_a_rule_name_and_its_rule_give_identical_results(name):
    import jaxauction as ja

    by_name = run(rule=name, payment="kl")
    by_object = run(rule=getattr(ja, name), payment="kl")
    for field in ("payments", "values", "welfare", "favoured"):
        np.testing.assert_array_equal(getattr(by_name, field), getattr(by_object, field))
    # the values are the rule's valuation (docs/maths.md §7), here against a NumPy float64 reference
    p = _probabilities(LOGITS[[0, 1]])  # [A, n, V], index = [0, 1]
    lam = BIDS / BIDS.sum(-1, keepdims=True)
    if name == "linear":
        q = np.einsum("an,anv->av", lam, p)
        values = -_kl(p, q[:, None])
    else:
        log_q = np.einsum("an,anv->av", lam, np.log(p))
        q = _probabilities(log_q)
        values = -_kl(q[:, None], p)
    np.testing.assert_allclose(by_name.values, values, rtol=1e-4, atol=1e-6)


def test_a_user_rule_with_a_valuation_runs_and_one_without_is_refused():
    import jax.numpy as jnp

    import jaxauction as ja

    def total_variation_value(log_p, log_q):
        return -0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=-1)

    mine = ja.Rule(name="mine", log_aggregate=ja.linear.log_aggregate, valuation=total_variation_value)
    result = run(rule=mine, payment=None)
    p = _probabilities(LOGITS[[0, 1]])
    q = np.einsum("an,anv->av", BIDS / BIDS.sum(-1, keepdims=True), p)
    values = -0.5 * np.abs(p - q[:, None]).sum(-1)
    np.testing.assert_allclose(result.values, values, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.welfare, (BIDS * values).sum(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.favoured, values.argmax(-1))

    def plain(logits, bids):
        return ja.linear(logits, bids)

    with pytest.raises(ValueError, match="rule: simulate .* needs the rule's valuation; rule 'plain' has none"):
        run(rule=plain, payment=None)


@pytest.mark.parametrize("setting", [dict(payment="first_price"), dict(payment="none"), dict(rule="quadratic")])
def test_bad_mechanism_settings_get_the_spec_message(setting):
    """simulate checks its rule and payment with the one validator (jaxauction.mechanism), before any work."""
    from jaxauction import mechanism

    with pytest.raises(ValueError) as spec_error:
        mechanism.MechanismSpec.create(**setting)
    with pytest.raises(ValueError) as simulate_error:
        run(**setting)
    assert str(simulate_error.value) == str(spec_error.value)
