"""Second-price and Myerson payments against closed forms and adaptive quadrature (SPEC §4, §5)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from references import (
    random_auction,
    ref_linear,
    ref_linear_closed_form,
    ref_log_linear,
    ref_payment,
)

from jaxauction import aggregation, payments

second_price = jax.jit(payments.second_price, static_argnums=(0, 3), static_argnames=("quadrature", "chunk_elements"))
closed_form = jax.jit(payments.linear_closed_form)
RATIOS = np.array([1e-6, 1e-4, 1e-2, 0.3, 1.0, 3.0, 1e2, 1e4, 1e6])


def _ratio_sweep(logits, others, base_bid=0.0):
    """Bid profiles where agent 0's bid is RATIOS times everybody else's total (base included)."""
    others = np.asarray(others)
    total = others.sum() + base_bid
    return np.concatenate([RATIOS[:, None] * total, np.broadcast_to(others, (len(RATIOS), len(others)))], axis=1)


def test_generic_payments_equal_closed_form_for_bid_ratios_from_1e_minus_6_to_1e6(x64):
    rng = np.random.default_rng(0)
    logits, bids = random_auction(rng, 3, 7, mask_fraction=0.3)
    profiles = _ratio_sweep(logits, bids[1:])
    generic = second_price(aggregation.linear, jnp.asarray(logits), jnp.asarray(profiles))
    closed = closed_form(jnp.asarray(logits), jnp.asarray(profiles))
    assert generic.dtype == jnp.float64
    np.testing.assert_allclose(generic, closed, rtol=1e-8)
    np.testing.assert_allclose(closed[:, 0], [ref_linear_closed_form(logits, b)[0] for b in profiles], rtol=1e-10)


def test_closed_form_equals_adaptive_quadrature_of_the_definition(x64):
    rng = np.random.default_rng(1)
    logits, bids = random_auction(rng, 3, 7, mask_fraction=0.2)
    got = closed_form(jnp.asarray(logits), jnp.asarray(bids))
    expected = [ref_payment(ref_linear, logits, bids, i, "robust") for i in range(3)]
    np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_base_distribution_takes_part_but_is_never_charged(x64):
    rng = np.random.default_rng(2)
    logits, bids = random_auction(rng, 3, 6)
    base_bid = 0.7
    profiles = _ratio_sweep(logits, bids[1:], base_bid)
    kwargs = dict(base_logits=jnp.asarray(logits[2]), base_bid=base_bid)
    generic = second_price(aggregation.linear, jnp.asarray(logits[:2]), jnp.asarray(profiles[:, :2]), **kwargs)
    closed = closed_form(jnp.asarray(logits[:2]), jnp.asarray(profiles[:, :2]), **kwargs)
    assert generic.shape == (len(RATIOS), 2)
    np.testing.assert_allclose(generic, closed, rtol=1e-8)
    # the same as a third agent whose payment is dropped
    as_agent = np.concatenate([profiles[:, :2], np.full((len(RATIOS), 1), base_bid)], axis=1)
    np.testing.assert_allclose(closed, closed_form(jnp.asarray(logits), jnp.asarray(as_agent))[:, :2], rtol=1e-12)


@pytest.mark.parametrize(
    "rule,reference,allocation,kind",
    [
        (aggregation.log_linear, ref_log_linear, "robust", "robust"),
        (aggregation.linear, ref_linear, "kl", "forward_kl"),
        (aggregation.log_linear, ref_log_linear, "kl", "reverse_kl"),
    ],
)
def test_payments_equal_adaptive_quadrature_of_the_definition(rule, reference, allocation, kind, x64):
    rng = np.random.default_rng(3)
    logits, _ = random_auction(rng, 3, 6, scale=1.5)
    bids = np.array([[0.2, 0.5, 0.3], [4.0, 0.5, 0.3], [0.002, 0.5, 0.3]])
    got = second_price(rule, jnp.asarray(logits), jnp.asarray(bids), allocation)
    expected = [[ref_payment(reference, logits, b, i, kind) for i in range(3)] for b in bids]
    np.testing.assert_allclose(got, expected, rtol=1e-4)


@pytest.mark.parametrize("rule", [aggregation.linear, aggregation.log_linear])
@pytest.mark.parametrize("allocation", ["robust", "kl"])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(-3, 3), zeros=st.sampled_from([0.0, 0.4]))
def test_payments_are_non_negative_and_zero_without_bid_or_competition(rule, allocation, seed, scale, zeros):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, 3, 5)) * 2
    mask = (rng.random(logits.shape) < 0.3) & (np.arange(5) != rng.integers(0, 5, (2, 3, 1)))
    logits = np.where(mask, -np.inf, logits)
    bids = rng.uniform(0, 1, (2, 3)) * 10.0**scale
    bids = np.where(rng.random(bids.shape) < zeros, 0.0, bids)
    z = np.asarray(second_price(rule, jnp.asarray(logits, jnp.float32), jnp.asarray(bids, jnp.float32), allocation))
    assert z.shape == (2, 3) and np.all(np.isfinite(z))
    assert np.all(z >= -1e-6 * np.maximum(bids, 1e-30))  # float32 rounding
    others = bids.sum(-1, keepdims=True) - bids
    assert np.all(z[(bids == 0) | (others == 0)] == 0)


def test_lone_bidder_and_all_zero_bids_pay_nothing_without_nan():
    logits = jnp.asarray(random_auction(np.random.default_rng(4), 3, 5)[0], jnp.float32)
    bids = jnp.array([[0.7, 0.0, 0.0], [0.0, 0.0, 0.0]])
    revenue = lambda l, b: second_price(aggregation.linear, l, b).sum()
    value, grads = jax.value_and_grad(revenue, argnums=(0, 1))(logits, bids)
    assert value == 0.0
    assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize(
    "rule,valuation",
    [(aggregation.linear, payments.forward_kl_value), (aggregation.log_linear, payments.reverse_kl_value)],
)
def test_kl_payments_make_truthful_bidding_optimal(rule, valuation, x64):
    """Utility t x(b) - z(b) with x(b) = -KL(...) is maximised on a bid grid at the true scale t."""
    logits, bids = random_auction(np.random.default_rng(5), 3, 6)
    logits = jnp.asarray(logits)
    truth = 0.6
    grid = truth * 1.15 ** np.arange(-12, 13)
    profiles = jnp.asarray(np.concatenate([grid[:, None], np.broadcast_to(bids[1:], (len(grid), 2))], axis=1))
    z = second_price(rule, logits, profiles, "kl")[:, 0]
    p0 = aggregation.agent_log_probs(logits)[0]
    value = valuation(p0, jax.vmap(rule, in_axes=(None, 0))(logits, profiles))
    utility = truth * value - z
    assert grid[int(np.argmax(utility))] == pytest.approx(truth)
    no_bid = truth * valuation(p0, rule(logits, profiles[0].at[0].set(0.0)))
    assert np.all(utility[np.isclose(grid, truth)] >= no_bid)


def test_probability_form_is_only_a_faster_route():
    """linear.probabilities (used for the robust allocation) gives the payments of exp(linear(...))."""
    logits, bids = random_auction(np.random.default_rng(9), 3, 6, mask_fraction=0.3)
    logits, bids = jnp.asarray(logits, jnp.float32), jnp.asarray(bids, jnp.float32)
    log_space_only = lambda l, b: aggregation.linear(l, b)  # no `probabilities` attribute
    np.testing.assert_allclose(
        second_price(log_space_only, logits, bids), second_price(aggregation.linear, logits, bids), rtol=2e-5
    )
    np.testing.assert_allclose(
        aggregation.linear.probabilities(logits, bids), jnp.exp(aggregation.linear(logits, bids)), rtol=1e-6, atol=1e-7
    )


def test_callable_valuation_and_kl_for_other_rules():
    logits, bids = (jnp.asarray(a, jnp.float32) for a in random_auction(np.random.default_rng(6), 3, 5))
    np.testing.assert_allclose(
        second_price(aggregation.linear, logits, bids, payments.forward_kl_value),
        second_price(aggregation.linear, logits, bids, "kl"),
        rtol=1e-6,
    )
    other_rule = lambda l, b: aggregation.linear(l, b**2)
    with pytest.raises(ValueError, match="forward_kl_value"):
        payments.second_price(other_rule, logits, bids, "kl")
    with pytest.raises(ValueError, match="allocation"):
        payments.second_price(aggregation.linear, logits, bids, "revenue")


@pytest.mark.parametrize("rule", [aggregation.linear, aggregation.log_linear])
def test_payment_gradients(rule, x64):
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.normal(size=(3, 4)))
    bids = jnp.asarray([0.5, 1.3, 0.8])
    small = payments.Quadrature(zero_panels=1, body_panels=2, tail_panels=1, order=6)
    f = jax.jit(functools.partial(payments.second_price, rule, quadrature=small))
    check_grads(f, (logits, bids), order=1, modes=("rev",))


def test_batching_vmap_chunking_and_float32():
    rng = np.random.default_rng(8)
    logits = jnp.asarray(rng.normal(size=(5, 3, 6)) * 2, jnp.float32)
    bids = jnp.asarray(rng.uniform(0.01, 1, size=(5, 3)), jnp.float32)
    batched = second_price(aggregation.linear, logits, bids)
    assert batched.dtype == jnp.float32
    np.testing.assert_allclose(batched, closed_form(logits, bids), rtol=2e-4, atol=1e-7)
    vmapped = jax.jit(jax.vmap(functools.partial(payments.second_price, aggregation.linear)))(logits, bids)
    np.testing.assert_allclose(vmapped, batched, rtol=1e-5, atol=1e-8)
    # shared agents, many bid profiles, processed in small sequential chunks (lax.map)
    shared = second_price(aggregation.linear, logits[0], bids, chunk_elements=64)
    np.testing.assert_allclose(shared, closed_form(logits[0], bids), rtol=2e-4, atol=1e-7)


def test_quadrature_integrates_exactly_on_its_panels():
    quad = payments.Quadrature()
    u, w = quad.nodes(jnp.array([0.5, 20.0]))
    assert u.shape == w.shape == (2, quad.size)
    for upper, nodes, weights in zip([0.5, 20.0], np.asarray(u), np.asarray(w)):
        np.testing.assert_allclose(weights.sum(), upper, rtol=1e-6)
        np.testing.assert_allclose(np.sum(weights * np.exp(-nodes)), 1 - np.exp(-upper), rtol=1e-5)
    with pytest.raises(ValueError, match="order"):
        payments.Quadrature(order=0)
