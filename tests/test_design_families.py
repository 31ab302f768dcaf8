"""The power-mean family: endpoints against the core rules, an independent extended-precision
reference, masks and zero bids, and gradients in every parameter against finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxauction import aggregation
from jaxauction.design import Bounds, PowerMeanParams, bind, log_bid_weights, power_mean, trainable_mask
from jaxauction.design.families import series_max_rho


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def random_auction(seed, batch=(), n=3, vocab=7, scale=2.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=batch + (n, vocab)) * scale
    bids = rng.uniform(0.1, 3.0, size=batch + (n,))
    return logits, bids


def reference_log_q(logits, bids, rho, gamma=1.0, temperature=1.0):
    """Power mean in extended precision (np.longdouble), straight from the definition."""
    logits = np.asarray(logits, np.longdouble)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    weights = np.asarray(bids, np.longdouble) ** gamma
    weights = weights / weights.sum(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return _reference_log_q(p, weights, rho, temperature)


def _reference_log_q(p, weights, rho, temperature):
    if rho == 0:
        log_r = np.sum(weights[..., None] * np.log(p), axis=-2)
    else:
        log_r = np.log(np.sum(weights[..., None] * p ** np.longdouble(rho), axis=-2)) / np.longdouble(rho)
    scaled = log_r / temperature
    scaled = scaled - scaled.max(-1, keepdims=True)
    return scaled - np.log(np.exp(scaled).sum(-1, keepdims=True))


@pytest.mark.parametrize("rho", [-2.0, -0.5, -0.05, -1e-3, 0.0, 1e-3, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5])
def test_power_mean_matches_extended_precision_reference(rho):
    logits, bids = random_auction(0, batch=(2,))
    got = power_mean(logits, bids, rho, gamma=1.3, temperature=0.8)
    want = reference_log_q(logits, bids, rho, gamma=1.3, temperature=0.8)
    np.testing.assert_allclose(got, np.asarray(want, np.float64), rtol=0, atol=1e-11)


@pytest.mark.parametrize("rho", [-1e-5, -1e-7, 1e-7, 1e-5])
def test_power_mean_near_zero_matches_reference(rho):
    """Series branch and centred branch around rho = 0 (the reference loses ~eps_ld / rho)."""
    logits, bids = random_auction(1)
    got = power_mean(logits, bids, rho)
    want = reference_log_q(logits, bids, rho)
    np.testing.assert_allclose(got, np.asarray(want, np.float64), rtol=0, atol=1e-10)


def test_float32_accuracy_across_rho_for_spread_out_logits():
    """float32 against the extended-precision reference, log-probabilities spread over ~20 nats."""
    logits, bids = random_auction(13, batch=(8,), vocab=32, scale=4.0)
    with jax.enable_x64(False):
        rhos = jnp.asarray([-1.0, -1e-2, -1e-4, 0.0, 1e-4, 1e-3, 3e-3, 1e-2, 0.1, 0.5, 1.0, 2.0], jnp.float32)
        got = jax.vmap(lambda rho: power_mean(jnp.float32(logits), jnp.float32(bids), rho))(rhos)
    for rho, values in zip(np.asarray(rhos), np.asarray(got)):
        want = np.asarray(reference_log_q(logits, bids, float(rho)), np.float64)
        np.testing.assert_allclose(values, want, rtol=0, atol=2e-5, err_msg=f"rho={rho}")


def test_rho_one_is_linear_and_rho_zero_is_log_linear():
    logits, bids = random_auction(2, batch=(4,), n=4, vocab=9)
    np.testing.assert_allclose(power_mean(logits, bids, 1.0), aggregation.linear(logits, bids), rtol=0, atol=1e-12)
    np.testing.assert_allclose(power_mean(logits, bids, 0.0), aggregation.log_linear(logits, bids), rtol=0, atol=1e-12)
    close_to_zero = power_mean(logits, bids, 1e-6)
    np.testing.assert_allclose(close_to_zero, aggregation.log_linear(logits, bids), rtol=0, atol=1e-4)
    with jax.enable_x64(False):
        logits32, bids32 = jnp.asarray(logits, jnp.float32), jnp.asarray(bids, jnp.float32)
        np.testing.assert_allclose(
            power_mean(logits32, bids32, 1.0), aggregation.linear(logits32, bids32), rtol=0, atol=2e-6
        )
        np.testing.assert_allclose(
            power_mean(logits32, bids32, 0.0), aggregation.log_linear(logits32, bids32), rtol=0, atol=2e-6
        )


def test_bound_endpoints_equal_core_rules():
    logits, bids = random_auction(3, batch=(3,))
    np.testing.assert_allclose(
        bind(PowerMeanParams.linear())(logits, bids), aggregation.linear(logits, bids), atol=1e-12
    )
    np.testing.assert_allclose(
        bind(PowerMeanParams.log_linear())(logits, bids), aggregation.log_linear(logits, bids), atol=1e-12
    )


def test_values_continuous_across_series_threshold():
    logits, bids = random_auction(4, scale=4.0)
    series_limit = series_max_rho(jnp.float64)
    for threshold in (series_limit,):
        for sign in (1.0, -1.0):
            below = power_mean(logits, bids, sign * threshold * (1 - 1e-12))
            above = power_mean(logits, bids, sign * threshold * (1 + 1e-12))
            np.testing.assert_allclose(below, above, rtol=0, atol=1e-11)


@jax.jit
def weighted_probabilities(rho, gamma, temperature, logits, bids):
    """A scalar summary of q with every token's probability weighted differently."""
    weights = jnp.linspace(-1.0, 1.0, logits.shape[-1])
    return jnp.sum(weights * jnp.exp(power_mean(logits, bids, rho, gamma, temperature)))


gradients_of_summary = jax.jit(jax.grad(weighted_probabilities, argnums=(0, 1, 2, 3, 4)))


@pytest.mark.parametrize("rho", [0.0, 1.4e-6, 1e-3, 0.1, 0.7, 1.0, -0.4])
def test_gradients_in_every_parameter_match_finite_differences(rho):
    logits, bids = random_auction(5)
    args = (rho, 1.2, 0.9, logits, bids)
    check_grads(weighted_probabilities, args, order=1, modes=("rev", "fwd"), eps=1e-5, atol=1e-6, rtol=1e-5)


def test_rho_derivative_at_zero_is_half_the_weighted_variance():
    """d/d rho of log r at rho = 0 equals k2 / 2 (the cumulant expansion), checked independently."""
    logits, bids = random_auction(6)
    log_p = np.asarray(jax.nn.log_softmax(logits, -1))
    weights = bids / bids.sum()
    mean = weights @ log_p
    variance = weights @ (log_p - mean) ** 2
    log_q = lambda rho: power_mean(logits, bids, rho)
    derivative = jax.jit(jax.jacfwd(log_q))(0.0)
    want = variance / 2 - np.sum(np.exp(mean) / np.exp(mean).sum() * variance / 2)  # after normalising
    np.testing.assert_allclose(derivative, want, rtol=1e-9, atol=1e-12)


def test_gamma_is_a_bid_transform_and_temperature_sharpens():
    logits, bids = random_auction(7, batch=(2,))
    np.testing.assert_allclose(power_mean(logits, bids, 0.4, gamma=2.5), power_mean(logits, bids**2.5, 0.4), atol=1e-12)
    plain = power_mean(logits, bids, 0.4)
    np.testing.assert_allclose(
        power_mean(logits, bids, 0.4, temperature=0.5), jax.nn.log_softmax(plain / 0.5, axis=-1), atol=1e-12
    )
    equal = power_mean(logits, bids, 0.4, gamma=0.0)
    np.testing.assert_allclose(equal, power_mean(logits, np.ones_like(bids), 0.4), atol=1e-12)


@pytest.mark.parametrize("rho", [-0.5, 0.0, 1e-4, 0.05, 0.5, 1.0])
def test_zero_bid_agent_with_masked_logits_changes_nothing(rho):
    logits, bids = random_auction(8)
    extra_logits = np.full((1, logits.shape[-1]), -np.inf)
    extra_logits[0, 2] = 0.0
    with_extra = np.concatenate([logits, extra_logits]), np.concatenate([bids, [0.0]])
    got = power_mean(*with_extra, rho, 1.5, 0.9)
    np.testing.assert_allclose(got, power_mean(logits, bids, rho, 1.5, 0.9), atol=1e-12)
    grads = gradients_of_summary(rho, 1.5, 0.9, *with_extra)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize("rho", [-0.5, 0.0, 1e-4, 0.05, 0.5, 1.0, 2.0])
def test_masked_tokens(rho):
    """rho > 0 keeps the mass of agents that do not mask a token; rho <= 0 drops it (log-linear)."""
    logits, bids = random_auction(9)
    logits[0, 1] = -np.inf  # masked by one agent
    logits[:, 4] = -np.inf  # masked by all
    log_q = power_mean(logits, bids, rho)
    probs = np.exp(np.asarray(log_q))
    assert np.isfinite(np.asarray(log_q)[[0, 2, 3, 5]]).all()
    assert probs[4] == 0.0
    if rho >= 0.05:  # below, the kept mass (1 - lambda_0)**(1/rho) underflows to 0
        assert probs[1] > 0
        finite = np.where(np.isfinite(logits), logits, -1e4)  # a masked token as an extremely unlikely one
        np.testing.assert_allclose(probs, np.exp(reference_log_q(finite, bids, rho)).astype(np.float64), atol=1e-10)
    else:
        assert probs[1] == 0.0
    np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-12)
    grads = gradients_of_summary(rho, 1.1, 1.2, logits, bids)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_all_zero_bids_give_equal_weights_without_nan():
    logits, _ = random_auction(10)
    zero = np.zeros(logits.shape[0])
    for rho in (0.0, 0.5, 1.0):
        np.testing.assert_allclose(
            power_mean(logits, zero, rho), power_mean(logits, np.ones_like(zero), rho), atol=1e-12
        )
    np.testing.assert_allclose(np.exp(log_bid_weights(zero)), np.full(zero.shape, 1 / zero.size))
    grads = gradients_of_summary(0.5, 1.0, 1.0, logits, zero)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_broadcast_rho_over_batch_matches_separate_calls():
    logits, bids = random_auction(11, batch=(3,))
    rhos = np.array([0.0, 0.3, 1.0])
    got = power_mean(logits, bids, rhos)
    for index, rho in enumerate(rhos):
        np.testing.assert_allclose(got[index], power_mean(logits[index], bids[index], rho), atol=1e-13)
    vmapped = jax.vmap(lambda rho: power_mean(logits, bids, rho))(rhos)
    assert vmapped.shape == (3, 3, logits.shape[-1])


def test_base_distribution_is_one_more_agent():
    logits, bids = random_auction(12, batch=(2,))
    base = np.random.default_rng(0).normal(size=(2, logits.shape[-1]))
    params = PowerMeanParams.create(rho=0.3, gamma=1.2, base_bid=0.7, temperature=1.1)
    got = bind(params, base)(logits, bids)
    stacked = np.concatenate([logits, base[:, None]], axis=1), np.concatenate([bids, np.full((2, 1), 0.7)], axis=1)
    np.testing.assert_allclose(got, power_mean(*stacked, 0.3, 1.2, 1.1), atol=1e-13)
    np.testing.assert_allclose(
        bind(params.replace(base_bid=jnp.asarray(0.0)), base)(logits, bids),
        power_mean(logits, bids, 0.3, 1.2, 1.1),
        atol=1e-13,
    )


def test_params_validation_bounds_and_mask():
    with pytest.raises(ValueError, match="temperature"):
        PowerMeanParams.create(temperature=0.0)
    with pytest.raises(ValueError, match="gamma"):
        PowerMeanParams.create(gamma=-1.0)
    with pytest.raises(ValueError, match="base_bid"):
        PowerMeanParams.create(base_bid=-1.0)
    with pytest.raises(ValueError, match="rho"):
        PowerMeanParams.create(rho=float("nan"))
    with pytest.raises(ValueError, match="trainable"):
        trainable_mask(("rho", "beta"))
    bounds = Bounds.create(rho=(-1.0, 2.0), temperature=(0.5, 2.0))
    projected = bounds.project(PowerMeanParams.create(rho=5.0, gamma=9.0, base_bid=2.0, temperature=0.1))
    assert projected.to_dict() == {"rho": 2.0, "gamma": 4.0, "base_bid": 2.0, "temperature": 0.5}
    assert trainable_mask(("rho",)) == PowerMeanParams(rho=True, gamma=False, base_bid=False, temperature=False)
    with pytest.raises(ValueError, match="low <= high"):
        Bounds.create(rho=(1.0, 0.0))


@pytest.mark.parametrize(
    "name,value",
    [
        ("rho", float("nan")),
        ("rho", float("inf")),
        ("gamma", -1.0),
        ("gamma", float("nan")),
        ("temperature", 0.0),
        ("temperature", -0.5),
        ("temperature", float("nan")),
        ("temperature", 1e-320),  # its reciprocal overflows (float64 here)
        ("rho", "x"),
    ],
)
def test_power_mean_checks_its_parameters_at_the_boundary(name, value):
    logits, bids = jnp.zeros((2, 3)), jnp.array([1.0, 2.0])
    arguments = dict(rho=0.5, gamma=1.0, temperature=1.0)
    arguments[name] = value
    with pytest.raises(ValueError, match=name):
        power_mean(logits, bids, **arguments)
    # inside jit the parameters are not checked (documented): no error is raised
    if not isinstance(value, str):
        jax.jit(power_mean)(logits, bids, **{k: jnp.asarray(v) for k, v in arguments.items()})


def test_power_mean_accepts_valid_parameter_arrays():
    logits, bids = jnp.zeros((2, 2, 3)), jnp.ones((2, 2))
    out = power_mean(logits, bids, jnp.array([0.5, 1.0]), 0.0, jnp.array([0.5, 2.0]))
    np.testing.assert_allclose(jnp.exp(out), 1 / 3, rtol=1e-6)
    with pytest.raises(ValueError, match="gamma"):
        power_mean(logits, bids, 1.0, jnp.array([1.0, -0.1]))


def test_domain_bounds_keep_the_family_valid():
    domain = Bounds.domain()
    outside = PowerMeanParams(*(jnp.asarray(v) for v in (-7.0, -1.0, -2.0, -3.0)))
    projected = domain.project(outside).to_dict()
    assert projected == {"rho": -7.0, "gamma": 0.0, "base_bid": 0.0, "temperature": pytest.approx(0.01)}
