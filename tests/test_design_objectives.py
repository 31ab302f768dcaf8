"""Design objectives: values against independent NumPy references, stationarity at the rule that
maximises each welfare, and gradients in every family parameter against finite differences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxauction import aggregation, payments
from jaxauction.design import AuctionBatch, PowerMeanParams, dirichlet_auctions, objectives

A, N, V = 3, 3, 5


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


@functools.cache
def batch_arrays():
    with jax.enable_x64(True):
        batch = dirichlet_auctions(3, A, N, V, with_base=True, concentration=0.7)
        return tuple(np.asarray(x, np.float64) for x in (batch.logits, batch.bids, batch.base_logits))


def make_batch():
    logits, bids, base = batch_arrays()
    return AuctionBatch(jnp.asarray(logits), jnp.asarray(bids), jnp.asarray(base))


def params_of(rho, gamma, base_bid, temperature):
    return PowerMeanParams(*(jnp.asarray(v, jnp.float64) for v in (rho, gamma, base_bid, temperature)))


def numpy_log_q(logits, bids, base, params):
    """Power mean from the definition, NumPy float64 (base as one more agent)."""
    rho, gamma, base_bid, temperature = (
        float(v) for v in (params.rho, params.gamma, params.base_bid, params.temperature)
    )
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    b = bids
    if base is not None and base_bid > 0:
        p0 = np.exp(base - base.max(-1, keepdims=True))
        p = np.concatenate([p, (p0 / p0.sum(-1, keepdims=True))[..., None, :]], axis=-2)
        b = np.concatenate([bids, np.full(bids.shape[:-1] + (1,), base_bid)], axis=-1)
    w = b**gamma / np.sum(b**gamma, -1, keepdims=True)
    if rho == 0:
        log_r = np.sum(w[..., None] * np.log(p), -2)
    else:
        log_r = np.log(np.sum(w[..., None] * p**rho, -2)) / rho
    s = log_r / temperature
    return s - np.log(np.sum(np.exp(s - s.max(-1, keepdims=True)), -1, keepdims=True)) - s.max(-1, keepdims=True)


OBJECTIVES = {
    "welfare_forward": lambda p, b: objectives.welfare(p, b),
    "welfare_reverse": lambda p, b: objectives.welfare(p, b, valuation="reverse"),
    "revenue": lambda p, b: objectives.revenue(p, b),
    "violation": lambda p, b: objectives.violation(p, b),
    "distance": lambda p, b: objectives.distance(p, b, reference=aggregation.log_linear, direction="reverse"),
}


@jax.jit
def values_and_grads(params, batch):
    """Every objective's value and gradient: one compiled program shared by all tests (compiling is
    what costs time here, not running)."""
    return {name: jax.value_and_grad(objective)(params, batch) for name, objective in OBJECTIVES.items()}


def value_and_grad(name):
    return lambda params, batch: values_and_grads(params, batch)[name]


def value(name, params):
    return float(values_and_grads(params, make_batch())[name][0])


PARAMS = [(1.0, 1.0, 0.0, 1.0), (0.4, 1.3, 0.6, 0.8), (0.0, 0.7, 0.3, 1.2), (-0.3, 1.0, 0.0, 1.0)]


@pytest.mark.parametrize("values", PARAMS)
def test_welfare_and_distance_match_numpy(values):
    logits, bids, base = batch_arrays()
    params = params_of(*values)
    log_q = numpy_log_q(logits, bids, base, params)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(log_q)[:, None, :]
    forward = -np.sum(p * (np.log(p) - np.log(q)), -1)
    reverse = -np.sum(q * (np.log(q) - np.log(p)), -1)
    np.testing.assert_allclose(value("welfare_forward", params), np.mean(np.sum(bids * forward, -1)), rtol=1e-10)
    np.testing.assert_allclose(value("welfare_reverse", params), np.mean(np.sum(bids * reverse, -1)), rtol=1e-10)
    lam = bids / bids.sum(-1, keepdims=True)
    log_linear = np.sum(lam[..., None] * np.log(p), -2)
    log_linear -= np.log(np.sum(np.exp(log_linear), -1, keepdims=True))
    kl = np.sum(np.exp(log_q) * (log_q - log_linear), -1)  # KL(q || log-linear)
    np.testing.assert_allclose(value("distance", params), np.mean(kl), rtol=1e-9, atol=1e-14)


def test_revenue_at_linear_equals_closed_form():
    logits, bids, base = batch_arrays()
    closed_form = jax.jit(
        lambda base_bid: payments.linear_closed_form(logits, bids, base_logits=base, base_bid=base_bid)
    )
    for base_bid in (0.0, 0.7):
        params = params_of(1.0, 1.0, base_bid, 1.0)
        np.testing.assert_allclose(value("revenue", params), closed_form(base_bid).sum(-1).mean(), rtol=1e-9)


def brute_force_payments(logits, bids, base, params, points=4001):
    """Robust second-price payments ``b x(b) - int_0^b x(s) ds`` by Simpson's rule in NumPy."""
    total = 0.0
    for a in range(logits.shape[0]):
        for i in range(logits.shape[1]):

            def q_at(s):
                own = np.array(bids[a])
                own = np.broadcast_to(own, s.shape + own.shape).copy()
                own[..., i] = s
                return np.exp(
                    numpy_log_q(
                        np.broadcast_to(logits[a], s.shape + logits[a].shape),
                        own,
                        None if base is None else np.broadcast_to(base[a], s.shape + base[a].shape),
                        params,
                    )
                )

            p_i = np.exp(logits[a, i] - logits[a, i].max())
            p_i /= p_i.sum()
            pushed_up = p_i > q_at(np.array([0.0]))[0]
            grid = np.linspace(0.0, bids[a, i], points)
            x = np.sum(q_at(grid)[..., pushed_up], -1)
            simpson = (grid[1] - grid[0]) / 3 * (x[0] + x[-1] + 4 * x[1:-1:2].sum() + 2 * x[2:-1:2].sum())
            total += bids[a, i] * x[-1] - simpson
    return total / logits.shape[0]


def test_revenue_with_kl_valuations_at_linear_equals_core():
    logits, bids, base = batch_arrays()
    params = params_of(1.0, 1.0, 0.7, 1.0)
    got = objectives.revenue(params, make_batch(), payment="kl", valuation="forward")
    want = payments.second_price(aggregation.linear, logits, bids, "kl", base_logits=base, base_bid=0.7)
    np.testing.assert_allclose(got, want.sum(-1).mean(), rtol=1e-10)


def test_revenue_matches_brute_force_integral_off_the_endpoints():
    logits, bids, base = batch_arrays()
    params = params_of(0.5, 1.0, 0.4, 1.0)
    want = brute_force_payments(logits, bids, base, params)
    np.testing.assert_allclose(value("revenue", params), want, rtol=1e-7)


def test_violation_matches_finite_difference_reference():
    logits, bids, base = batch_arrays()
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    for values in [(0.0, 1.0, 0.5, 1.0), (-0.5, 1.5, 0.0, 0.7), (1.0, 1.0, 0.5, 1.0)]:
        params = params_of(*values)
        q = np.exp(numpy_log_q(logits, bids, base, params))
        total = 0.0
        for i in range(N):
            step = np.zeros(N)
            step[i] = 1e-6
            dq = (
                np.exp(numpy_log_q(logits, bids + step, base, params))
                - np.exp(numpy_log_q(logits, bids - step, base, params))
            ) / 2e-6
            total += np.sum(np.maximum(0.0, -(p[:, i] - q) * dq))
        got = value("violation", params)
        np.testing.assert_allclose(got, total / A, rtol=1e-6, atol=1e-12)
        if values[0] == 1.0:
            assert got == 0.0  # the linear rule is monotone, with or without a base


def test_each_welfare_is_stationary_at_the_rule_it_is_maximised_by():
    """Linear maximises sum b_i (-KL(p_i || q)) and log-linear sum b_i (-KL(q || p_i)) over all q (docs/maths.md §2),
    so every family parameter has zero gradient there (the base bid is at 0)."""
    batch = make_batch()
    for params, valuation in ((PowerMeanParams.linear(), "forward"), (PowerMeanParams.log_linear(), "reverse")):
        params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), params)
        grads = value_and_grad(f"welfare_{valuation}")(params, batch)[1]
        for name in ("rho", "gamma", "base_bid", "temperature"):
            np.testing.assert_allclose(getattr(grads, name), 0.0, atol=1e-12, err_msg=f"{valuation}: {name}")
        other = "reverse" if valuation == "forward" else "forward"
        assert abs(float(value_and_grad(f"welfare_{other}")(params, batch)[1].rho)) > 1e-4


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_gradients_match_finite_differences(name):
    """Reverse-mode gradient in each parameter against a central difference (float64, step 1e-5)."""
    batch = make_batch()
    point = np.array([0.15, 1.2, 0.5, 0.9])  # non-monotone: the violation is positive and smooth here
    value_grad = value_and_grad(name)
    at_point, grads = value_grad(params_of(*point), batch)
    if name == "violation":
        assert float(at_point) > 1e-4
    step = 1e-5
    for index, field in enumerate(("rho", "gamma", "base_bid", "temperature")):
        shift = np.eye(4)[index] * step
        difference = (
            value_grad(params_of(*(point + shift)), batch)[0] - value_grad(params_of(*(point - shift)), batch)[0]
        ) / (2 * step)
        np.testing.assert_allclose(getattr(grads, field), difference, rtol=1e-5, atol=1e-8, err_msg=field)


def test_bad_choices_raise():
    batch = make_batch()
    with pytest.raises(ValueError, match="valuation"):
        objectives.welfare(PowerMeanParams.linear(), batch, valuation="sideways")
    for payment in ("robust", "forward_kl", "none"):  # the mechanism's payment kinds only, never silently "kl"
        with pytest.raises(ValueError, match=r"^payment: expected one of \['second_price', 'kl', None\]"):
            objectives.revenue(PowerMeanParams.linear(), batch, payment=payment)
    with pytest.raises(ValueError, match="^payment: revenue needs a payment kind that charges"):
        objectives.revenue(PowerMeanParams.linear(), batch, payment=None)
    with pytest.raises(ValueError, match="^valuation: expected one of"):
        objectives.revenue(PowerMeanParams.linear(), batch, payment="kl", valuation="forward_kl")
    with pytest.raises(ValueError, match="direction"):
        objectives.distance(PowerMeanParams.linear(), batch, direction="up")
