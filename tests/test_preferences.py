"""Robust preferences and monotonicity (SPEC §3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_core_reference import random_auction, ref_linear, ref_log_linear, ref_probs

from jaxauction import aggregation, preferences

violation = jax.jit(preferences.monotonicity_violation, static_argnums=0)
SPEC_P1 = np.array([0.30, 0.01, 0.69])
SPEC_P2 = np.array([0.29, 0.70, 0.01])


def ref_violation(reference_rule, logits, bids, step=1e-6):
    """SPEC §3 by central finite differences of the float64 reference rule."""
    p = ref_probs(logits)
    q = reference_rule(logits, bids)
    out = []
    for i in range(len(bids)):
        up, down = bids.copy(), bids.copy()
        up[i] += step
        down[i] -= step
        dq = (reference_rule(logits, up) - reference_rule(logits, down)) / (2 * step)
        out.append(np.maximum(0.0, -(p[i] - q) * dq).sum())
    return np.array(out)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(-3, 3), masked=st.booleans())
def test_linear_rule_is_monotone(seed, scale, masked):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, 3, 5)) * 3
    if masked:
        mask = (rng.random(logits.shape) < 0.4) & (np.arange(5) != rng.integers(0, 5, (2, 3, 1)))
        logits = np.where(mask, -np.inf, logits)
    bids = rng.uniform(0, 1, (2, 3)) * 10.0**scale
    v = violation(aggregation.linear, jnp.asarray(logits, jnp.float32), jnp.asarray(bids, jnp.float32))
    assert v.shape == (2, 3)
    # exact arithmetic gives 0; float32 rounding leaves at most eps-sized products of order 1/sum(b)
    np.testing.assert_allclose(v * bids.sum(-1, keepdims=True), 0.0, atol=1e-6)


def test_spec_counterexample_is_detected(x64):
    logits = jnp.log(jnp.asarray(np.stack([SPEC_P1, SPEC_P2])))
    bids = jnp.array([0.3, 0.7])
    v = violation(aggregation.log_linear, logits, bids)
    assert v[0] > 1e-3
    np.testing.assert_allclose(v, ref_violation(ref_log_linear, np.asarray(logits), np.asarray(bids)), rtol=1e-6)
    # and the discrete move of SPEC §3 is not weakly preferred by agent 1
    q_low = jnp.exp(aggregation.log_linear(logits, bids))
    q_high = jnp.exp(aggregation.log_linear(logits, jnp.array([0.5, 0.5])))
    assert not preferences.prefers(jnp.asarray(SPEC_P1), q_high, q_low)


@pytest.mark.parametrize("rule,reference", [(aggregation.linear, ref_linear), (aggregation.log_linear, ref_log_linear)])
def test_violation_equals_finite_difference_definition(rule, reference, x64):
    logits, bids = random_auction(np.random.default_rng(11), 4, 6, scale=1.5)
    got = violation(rule, jnp.asarray(logits), jnp.asarray(bids))
    np.testing.assert_allclose(got, ref_violation(reference, logits, bids), rtol=1e-5, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), factor=st.floats(1.01, 100.0))
def test_raising_a_bid_under_the_linear_rule_is_weakly_preferred(seed, factor):
    rng = np.random.default_rng(seed)
    logits, bids = random_auction(rng, 3, 5, scale=3)
    i = int(rng.integers(0, 3))
    raised = bids.copy()
    raised[i] *= factor
    q_old = ref_linear(logits, bids)
    q_new = np.exp(np.asarray(aggregation.linear(jnp.asarray(logits), jnp.asarray(raised)), np.float64))
    assert bool(preferences.prefers(ref_probs(logits)[i], q_new, q_old))
    assert not bool(preferences.prefers(ref_probs(logits)[i], q_old, q_new)) or np.allclose(q_old, q_new, atol=1e-6)


def test_prefers_is_the_betweenness_order():
    p = jnp.array([0.6, 0.3, 0.1])
    q = jnp.array([0.2, 0.3, 0.5])
    between = 0.5 * p + 0.5 * q
    assert preferences.prefers(p, between, q) and preferences.prefers(p, p, q) and preferences.prefers(p, q, q)
    assert not preferences.prefers(p, q, between)
    # incomparable: one token moves towards p, another away from it
    other = jnp.array([0.5, 0.1, 0.4])
    assert not preferences.prefers(p, other, q) and not preferences.prefers(p, q, other)
    batch = preferences.prefers(p, jnp.stack([between, q]), jnp.stack([q, between]))
    np.testing.assert_array_equal(batch, [True, False])
    assert preferences.prefers(p, q + 1e-3, q, atol=2e-3) and not preferences.prefers(p, q + 1e-3, q)
    with pytest.raises(ValueError, match="probabilities"):
        preferences.prefers(jnp.log(p), q, q)
