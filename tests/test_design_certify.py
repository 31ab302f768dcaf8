"""Design claims that hold: the strict certificate of family members, the KL valuations' one home,
and design.evaluate against independent references (float32 and float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_core_reference import ref_linear, ref_probs
from test_preferences import CompileCounter, ref_certificate

from jaxauction import aggregation, payments, preferences
from jaxauction.design import (
    AuctionBatch,
    PowerMeanParams,
    certify_rule,
    dirichlet_auctions,
    evaluate,
    fixed_rule,
    kl_divergence,
    objectives,
)

DTYPES = ["float32", "float64"]


def precision(dtype):
    return jax.enable_x64(dtype == "float64")


def batch_of(dtype, seed=5, auctions=24, agents=3, vocab=7, with_base=True):
    with precision(dtype):
        batch = dirichlet_auctions(seed, auctions, agents, vocab, with_base=with_base)
        return jax.tree.map(lambda x: jnp.asarray(x, dtype), batch)


def ref_power_mean(rho, gamma, temperature):
    """The family from its definition in NumPy float64: probabilities [..., V]."""

    def rule(logits, bids):
        p = ref_probs(logits)
        w = bids**gamma / np.sum(bids**gamma, -1, keepdims=True)
        if rho == 0:
            r = np.exp(np.sum(w[..., None] * np.log(p), -2))
        else:
            r = np.sum(w[..., None] * p**rho, -2) ** (1 / rho)
        q = r ** (1 / temperature)
        return q / q.sum(-1, keepdims=True)

    return rule


def with_base(batch, base_bid):
    logits = np.concatenate([np.asarray(batch.logits, np.float64), np.asarray(batch.base_logits)[:, None]], 1)
    bids = np.concatenate([np.asarray(batch.bids, np.float64), np.full((batch.num_auctions, 1), base_bid)], 1)
    return logits, bids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "values,monotone",
    [
        ((1.0, 1.0, 0.0, 1.0), True),  # linear
        ((1.0, 2.5, 0.3, 1.0), True),  # the monotone-by-construction sub-family
        ((1.0, 0.5, 2.0, 1.0), True),
        ((1.0, 1.0, 0.2, 0.8), False),  # an output temperature breaks it (docs/maths.md §2)
        ((0.0, 1.0, 0.0, 1.0), False),  # log-linear (docs/maths.md §4)
    ],
)
def test_certify_rule_matches_a_brute_force_reference(dtype, values, monotone):
    rho, gamma, base_bid, temperature = values
    batch = batch_of(dtype)
    with precision(dtype):
        params = PowerMeanParams.create(*values, dtype=dtype)
        certificate = certify_rule(params, batch)
    logits, bids = with_base(batch, base_bid)
    reference = ref_certificate(ref_power_mean(rho, gamma, temperature), logits, bids)[:, : batch.num_agents]
    assert certificate.passed.shape == (batch.num_auctions, batch.num_agents)  # the base is not checked
    np.testing.assert_allclose(certificate.excess, reference, atol=2e-5 if dtype == "float32" else 1e-12)
    assert certificate.monotone == monotone
    if monotone:
        assert certificate.share == 1.0 and reference.max() < 1e-12
    else:
        assert certificate.share < 1.0 and certificate.worst > 1e-4


def test_fixed_rule_is_hashable_by_value_and_compiles_once():
    a, b = fixed_rule(PowerMeanParams.create(gamma=2.0)), fixed_rule(PowerMeanParams.create(gamma=2.0))
    assert a == b and hash(a) == hash(b) and a.monotone
    assert not fixed_rule(PowerMeanParams.create(temperature=1.1)).monotone
    assert not fixed_rule(PowerMeanParams.create(rho=0.5)).monotone
    batch = batch_of("float32", vocab=9)
    params = PowerMeanParams.create(rho=0.7, base_bid=0.1)
    certify_rule(params, batch)
    with CompileCounter() as counter:
        certify_rule(PowerMeanParams.create(rho=0.7, base_bid=0.1), batch)
    assert counter.count == 0
    with pytest.raises(ValueError, match="temperature"):
        fixed_rule(PowerMeanParams(*(jnp.asarray(v) for v in (1.0, 1.0, 0.0, -1.0))))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_divergence_is_the_payments_valuation(dtype):
    with precision(dtype):
        log_p = jnp.log(jnp.asarray([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype))
        log_q = jnp.log(jnp.asarray([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], dtype))
        got = kl_divergence(log_p, log_q)
        core = payments.forward_kl_value(log_p, log_q)
    np.testing.assert_array_equal(got, -core)  # one home: the very same numbers
    tiny = np.finfo(dtype).tiny
    want = 0.5 * (np.log(0.5) - 0.0) + 0.5 * (np.log(0.5) - np.log(tiny))  # q = 0 counts as the smallest normal
    np.testing.assert_allclose(got, [want, 0.0], rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(got))


@pytest.mark.parametrize("dtype", DTYPES)
def test_welfare_uses_the_payments_valuations_where_q_has_zeros(dtype):
    """Log-linear (rho = 0) gives probability 0 to tokens some agent masks: both welfares stay finite
    and equal the payments' valuations summed with the bids."""
    batch = batch_of(dtype, with_base=False)
    logits = np.array(batch.logits, np.float64)
    logits[:, 0, 0] = -np.inf  # agent 0 masks token 0: q(0) = 0 under log-linear
    with precision(dtype):
        batch = AuctionBatch(jnp.asarray(logits, dtype), batch.bids)
        params = PowerMeanParams.log_linear(dtype=dtype)
        log_q = objectives.aggregate(params, batch)
        log_p = jax.nn.log_softmax(batch.logits, axis=-1)
        for valuation, value in (("forward", payments.forward_kl_value), ("reverse", payments.reverse_kl_value)):
            got = objectives.welfare(params, batch, valuation=valuation)
            want = jnp.mean(jnp.sum(batch.bids * value(log_p, jnp.broadcast_to(log_q[:, None], log_p.shape)), -1))
            assert np.isfinite(got)
            np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.any(np.exp(np.asarray(log_q, np.float64))[:, 0] == 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_evaluate_against_references(dtype):
    batch = batch_of(dtype, with_base=False)
    logits, bids = np.asarray(batch.logits, np.float64), np.asarray(batch.bids, np.float64)
    rtol = 1e-4 if dtype == "float32" else 1e-9
    with precision(dtype):
        linear = evaluate(PowerMeanParams.linear(dtype=dtype), batch)
        log_linear = evaluate(PowerMeanParams.log_linear(dtype=dtype), batch)
        closed_form = payments.linear_closed_form(batch.logits, batch.bids)
    assert set(linear) == {"revenue", "welfare_forward", "welfare_reverse", "violation"}
    assert all(isinstance(v, float) for v in linear.values())
    p, q = ref_probs(logits), ref_linear(logits, bids)[:, None, :]
    forward = -np.sum(p * (np.log(p) - np.log(q)), -1)
    reverse = -np.sum(q * (np.log(q) - np.log(p)), -1)
    np.testing.assert_allclose(linear["welfare_forward"], np.mean(np.sum(bids * forward, -1)), rtol=rtol)
    np.testing.assert_allclose(linear["welfare_reverse"], np.mean(np.sum(bids * reverse, -1)), rtol=rtol)
    np.testing.assert_allclose(linear["revenue"], np.mean(np.sum(np.asarray(closed_form), -1)), rtol=10 * rtol)
    assert linear["violation"] == 0.0 and log_linear["violation"] > 1e-4
    # each welfare is largest at the rule that maximises it (docs/maths.md §2)
    assert linear["welfare_forward"] > log_linear["welfare_forward"]
    assert log_linear["welfare_reverse"] > linear["welfare_reverse"]
    with precision(dtype):  # off the core rules: against the family's NumPy definition
        together = evaluate(PowerMeanParams.create(rho=0.5, gamma=1.2, temperature=0.9, dtype=dtype), batch)
    q = ref_power_mean(0.5, 1.2, 0.9)(logits, bids)[:, None, :]
    forward = -np.sum(p * (np.log(p) - np.log(q)), -1)
    reverse = -np.sum(q * (np.log(q) - np.log(p)), -1)
    np.testing.assert_allclose(together["welfare_forward"], np.mean(np.sum(bids * forward, -1)), rtol=rtol)
    np.testing.assert_allclose(together["welfare_reverse"], np.mean(np.sum(bids * reverse, -1)), rtol=rtol)
    assert together["violation"] > 0.0 and together["revenue"] > 0.0


def test_certify_rule_equals_certify_on_the_augmented_batch():
    batch = batch_of("float32")
    params = PowerMeanParams.create(rho=0.5, base_bid=0.4)
    logits, bids = aggregation.append_base(batch.logits, batch.bids, batch.base_logits, params.base_bid)
    direct = preferences.certify(fixed_rule(params), logits, bids, n_checked=batch.num_agents)
    np.testing.assert_array_equal(certify_rule(params, batch).excess, direct.excess)
