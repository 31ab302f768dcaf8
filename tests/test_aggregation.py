"""Aggregation rules against independent references (docs/maths.md §2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from references import random_auction, ref_linear, ref_log_linear, ref_probs
from scipy import optimize, special

import jaxauction
from jaxauction import aggregation

RULES = {"linear": (aggregation.linear, ref_linear), "log_linear": (aggregation.log_linear, ref_log_linear)}
JITTED = {name: jax.jit(rule) for name, (rule, _) in RULES.items()}  # compile once per shape


@st.composite
def auctions(draw, max_agents=4, allow_masks=True):
    """Random shapes, -inf masks (every row keeps a token) and bid scales over 6 orders of magnitude."""
    lead = (2, 3)  # other leading shapes: test_batching_broadcasting_vmap_and_jit
    n = draw(st.sampled_from([1, max_agents]))
    vocab = draw(st.sampled_from([1, 6]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=lead + (n, vocab)) * draw(st.sampled_from([0.5, 2.0, 5.0]))
    if allow_masks and draw(st.booleans()):
        mask = rng.random(logits.shape) < 0.4
        keep = rng.integers(0, vocab, size=lead + (n,))
        mask &= np.arange(vocab) != keep[..., None]
        logits = np.where(mask, -np.inf, logits)
    scale = 10.0 ** draw(st.floats(-3, 3))
    bids = rng.uniform(0, 1, size=lead + (n,)) * scale
    zeros = rng.random(bids.shape) < draw(st.sampled_from([0.0, 0.3]))
    bids = np.where(zeros, 0.0, bids)
    return logits, bids


@pytest.mark.parametrize("name", RULES)
@settings(max_examples=30, deadline=None)
@given(case=auctions())
def test_rule_matches_reference(name, case):
    logits, bids = case
    rule, reference = RULES[name]
    rule = JITTED[name]
    p = ref_probs(logits)
    lam = np.where(bids.sum(-1, keepdims=True) > 0, bids, 1.0)
    common = np.all((lam[..., None] == 0) | (p > 0), axis=-2).any(-1)
    assume(name != "log_linear" or common.all())  # no common token: test_log_linear_without_common_token
    log_q = rule(jnp.asarray(logits, jnp.float32), jnp.asarray(bids, jnp.float32))
    assert log_q.dtype == jnp.float32 and log_q.shape == logits.shape[:-2] + logits.shape[-1:]
    expected = reference(logits, bids)
    np.testing.assert_allclose(np.exp(log_q), expected, rtol=2e-4, atol=2e-6)
    assert not np.any(np.isnan(log_q))
    assert np.all((expected > 0) | (np.asarray(log_q) == -np.inf))
    np.testing.assert_allclose(special.logsumexp(np.asarray(log_q, np.float64), axis=-1), 0.0, atol=2e-6)


def _linear_objective(p, bids, q):
    """sum_i b_i KL(p_i || q)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return float(np.sum(bids[:, None] * terms))


def _log_linear_objective(p, bids, q):
    """sum_i b_i KL(q || p_i)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, q * (np.log(q) - np.log(p)), 0.0)
    return float(np.sum(bids[:, None] * terms))


@pytest.mark.parametrize("name,objective", [("linear", _linear_objective), ("log_linear", _log_linear_objective)])
def test_rule_is_the_minimiser_of_its_weighted_kl(name, objective, x64):
    rule = RULES[name][0]
    rng = np.random.default_rng(3)
    logits, bids = random_auction(rng, 3, 5)
    p = ref_probs(logits)
    q = np.exp(np.asarray(rule(jnp.asarray(logits), jnp.asarray(bids))))
    # an independent numerical minimiser over the simplex (softmax parametrisation)
    found = optimize.minimize(
        lambda theta: objective(p, bids, np.exp(special.log_softmax(theta))),
        np.zeros(5),
        method="BFGS",
        options=dict(gtol=1e-10),
    )
    np.testing.assert_allclose(np.exp(special.log_softmax(found.x)), q, atol=1e-6)
    # and no random perturbation does better
    best = objective(p, bids, q)
    for _ in range(50):
        other = np.exp(special.log_softmax(np.log(q) + 0.05 * rng.normal(size=5)))
        assert objective(p, bids, other) > best


def test_spec_example_values(x64):
    p1 = np.array([0.30, 0.01, 0.69])
    p2 = np.array([0.29, 0.70, 0.01])
    logits = jnp.log(jnp.asarray(np.stack([p1, p2])))
    q_low = np.exp(aggregation.log_linear(logits, jnp.array([0.3, 0.7])))
    q_high = np.exp(aggregation.log_linear(logits, jnp.array([0.5, 0.5])))
    assert q_low[0] == pytest.approx(0.5588, abs=5e-5)
    assert q_high[0] == pytest.approx(0.6389, abs=5e-5)
    np.testing.assert_allclose(np.exp(aggregation.linear(logits, jnp.array([1.0, 3.0]))), 0.25 * p1 + 0.75 * p2)


@pytest.mark.parametrize("name", RULES)
def test_zero_bid_agent_with_masked_tokens_changes_nothing(name):
    rule = RULES[name][0]
    rng = np.random.default_rng(4)
    logits, bids = random_auction(rng, 2, 6)
    ghost = np.full((1, 6), -np.inf)
    ghost[0, 2] = 0.0  # allows only token 2, masks the rest
    with_ghost = jnp.asarray(np.concatenate([logits, ghost]), jnp.float32)
    bids_ghost = jnp.asarray(np.concatenate([bids, [0.0]]), jnp.float32)
    expected = rule(jnp.asarray(logits, jnp.float32), jnp.asarray(bids, jnp.float32))
    got = rule(with_ghost, bids_ghost)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    loss = jax.jit(lambda l, b: jnp.sum(jnp.exp(rule(l, b)) * jnp.arange(6.0)))
    for grad in jax.grad(loss, argnums=(0, 1))(with_ghost, bids_ghost):
        assert np.all(np.isfinite(grad))


def test_token_masked_by_every_weighted_agent_is_impossible():
    logits = jnp.array([[0.0, -jnp.inf, 1.0], [0.5, -jnp.inf, 0.0], [0.0, 3.0, 0.0]])
    bids = jnp.array([1.0, 2.0, 0.0])
    for name in RULES:
        rule = JITTED[name]
        log_q = rule(logits, bids)
        assert log_q[1] == -jnp.inf and np.all(np.isfinite(log_q[jnp.array([0, 2])]))
        loss = lambda l, b: jnp.sum(jnp.exp(rule(l, b))[jnp.array([0, 2])])
        grads = jax.grad(loss, argnums=(0, 1))(logits, bids)
        assert all(np.all(np.isfinite(g)) for g in grads)
    # log-linear: masked by *any* weighted agent; linear: still reachable through the other agent
    logits = logits.at[1, 1].set(0.2)
    assert JITTED["log_linear"](logits, bids)[1] == -jnp.inf
    assert np.isfinite(JITTED["linear"](logits, bids)[1])


def test_log_linear_without_common_token():
    """Documented limit: the tokens masked by the least total weight remain, q ∝ prod p_i^lambda_i."""
    logits = jnp.array([[0.0, 1.0, -jnp.inf, -jnp.inf], [-jnp.inf, -jnp.inf, 0.0, 2.0]])
    bids = jnp.array([3.0, 1.0])  # tokens 0, 1 are masked by weight 1/4 only, tokens 2, 3 by 3/4
    log_q = aggregation.log_linear(logits, bids)
    assert np.all(log_q[2:] == -jnp.inf)
    np.testing.assert_allclose(np.exp(log_q[:2]), special.softmax([0.0, 0.75]), rtol=1e-6)
    grad = jax.grad(jax.jit(lambda l: jnp.exp(aggregation.log_linear(l, bids))[1]))(logits)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


@pytest.mark.parametrize("name", RULES)
def test_all_bids_zero_means_equal_weights(name):
    rule = RULES[name][0]
    logits, _ = random_auction(np.random.default_rng(5), 3, 5)
    logits = jnp.asarray(logits, jnp.float32)
    np.testing.assert_allclose(rule(logits, jnp.zeros(3)), rule(logits, jnp.ones(3)), rtol=1e-6)
    grads = jax.grad(jax.jit(lambda l, b: rule(l, b)[0]), argnums=(0, 1))(logits, jnp.zeros(3))
    assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("name", RULES)
def test_rules_depend_on_bid_ratios_only(name):
    rule = RULES[name][0]
    logits, bids = random_auction(np.random.default_rng(6), 3, 5)
    logits, bids = jnp.asarray(logits, jnp.float32), jnp.asarray(bids, jnp.float32)
    np.testing.assert_allclose(rule(logits, bids * 1e4), rule(logits, bids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", RULES)
def test_batching_broadcasting_vmap_and_jit(name):
    rule = RULES[name][0]
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.normal(size=(4, 3, 6)), jnp.float32)
    bids = jnp.asarray(rng.uniform(0.1, 1, size=(4, 3)), jnp.float32)
    batched = rule(logits, bids)
    single = jax.jit(rule)
    looped = jnp.stack([single(logits[a], bids[a]) for a in range(4)])
    np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.vmap(rule))(logits, bids), batched, rtol=1e-6, atol=1e-6)
    shared = rule(logits[0], bids)  # one set of agents, four bid profiles
    np.testing.assert_allclose(shared, jnp.stack([single(logits[0], b) for b in bids]), rtol=1e-6, atol=1e-6)
    traces = []

    def counted(l, b):
        traces.append(1)
        return rule(l, b)

    jitted = jax.jit(counted)
    np.testing.assert_allclose(jitted(logits, bids), batched, rtol=1e-6, atol=1e-6)
    jitted(logits + 1.0, bids * 2.0)
    assert len(traces) == 1


@pytest.mark.parametrize("name", RULES)
def test_dtype_follows_x64(name, x64):
    rule = RULES[name][0]
    logits, bids = random_auction(np.random.default_rng(8), 2, 4)
    log_q = rule(jnp.asarray(logits), jnp.asarray(bids))
    assert log_q.dtype == jnp.float64
    np.testing.assert_allclose(np.exp(log_q), RULES[name][1](logits, bids), rtol=1e-12)


@pytest.mark.parametrize("name", RULES)
def test_gradients(name, x64):
    rule = RULES[name][0]
    rng = np.random.default_rng(9)
    logits = jnp.asarray(rng.normal(size=(2, 3, 5)))
    bids = jnp.asarray(rng.uniform(0.2, 1.0, size=(2, 3)))
    check_grads(jax.jit(rule), (logits, bids), order=1, modes=("fwd", "rev"))


def test_reexports():
    assert jaxauction.linear.log_aggregate is aggregation.linear
    assert jaxauction.log_linear.log_aggregate is aggregation.log_linear
    # A plain built-in function, a jit of a Rule and a name all resolve to the registered rule.
    assert jaxauction.as_rule(aggregation.linear) is jaxauction.linear
    assert jaxauction.as_rule(jax.jit(jaxauction.log_linear)) is jaxauction.log_linear
    assert jaxauction.as_rule("linear") is jaxauction.linear


@pytest.mark.parametrize("name", RULES)
def test_nan_or_infinite_input_under_jit_gives_nan_not_a_silent_zero_weight(name):
    logits = jnp.zeros((4, 2, 3)).at[3, 0, 1].set(jnp.nan)
    bids = jnp.array([[1.0, 2.0], [jnp.nan, 2.0], [jnp.inf, 2.0], [1.0, 2.0]])
    log_q = JITTED[name](logits, bids)
    np.testing.assert_allclose(np.exp(log_q[0]), 1 / 3, rtol=1e-6)
    assert np.all(np.isnan(log_q[1:]))
    np.testing.assert_array_equal(aggregation.invalid_auctions(logits, bids), [False, True, True, True])
