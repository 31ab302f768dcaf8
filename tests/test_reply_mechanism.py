"""The reply-level mechanism (docs/maths.md §8): array functions against a NumPy float64 reference, and
truthfulness by best response over a bid grid."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxauction import reply, reply_mechanism

DTYPES = ["float32", "float64"]


def _dtype_context(dtype):
    return jax.enable_x64(dtype == "float64")


# ------------------------------------------------------------------------------ NumPy reference (docs/maths.md §8)


def ref_welfare(log_w, rewards, tau, members):
    """W(S) = tau log sum_k w_k exp(sum_{i in S} r_i(y_k)/tau), w normalised; plain exp in float64."""
    w = np.exp(log_w - log_w.max())
    w = w / w.sum()
    total = (rewards * members[:, None]).sum(axis=0)
    shift = total.max() / tau
    return tau * (np.log(np.sum(w * np.exp(total / tau - shift))) + shift)


def ref_allocation(log_w, rewards, tau):
    a = log_w - log_w.max() + rewards.sum(axis=0) / tau
    p = np.exp(a - a.max())
    return p / p.sum()


def ref_payments(log_w, rewards, tau):
    n = rewards.shape[0]
    pi = ref_allocation(log_w, rewards, tau)
    everyone = ref_welfare(log_w, rewards, tau, np.ones(n))
    return np.array(
        [ref_welfare(log_w, rewards, tau, np.arange(n) != i) - everyone + pi @ rewards[i] for i in range(n)]
    )


def random_instance(rng, n, m, batch=()):
    log_w = rng.normal(size=batch + (m,))
    rewards = rng.gamma(2.0, size=batch + (n, 1)) * rng.normal(size=batch + (n, m))
    return log_w, rewards


# ------------------------------------------------------------------------------ array level


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(1, 1), (1, 5), (3, 1), (3, 6), (4, 9)])
def test_array_functions_match_numpy_reference(dtype, n, m):
    rng = np.random.default_rng(n * 10 + m)
    log_w, rewards = random_instance(rng, n, m, batch=(2, 3))
    tau = 0.7
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == "float32" else dict(rtol=1e-10, atol=1e-12)
    with _dtype_context(dtype):
        pi = np.asarray(reply_mechanism.allocation(log_w, rewards, tau))
        z = np.asarray(reply_mechanism.payments(log_w, rewards, tau))
        members = rng.random(size=(2, 3, n)) < 0.5
        w = np.asarray(reply_mechanism.welfare(log_w, rewards, tau, members))
        assert pi.dtype == np.dtype(dtype) and z.dtype == np.dtype(dtype)
    for idx in np.ndindex(2, 3):
        np.testing.assert_allclose(pi[idx], ref_allocation(log_w[idx], rewards[idx], tau), **tol)
        np.testing.assert_allclose(z[idx], ref_payments(log_w[idx], rewards[idx], tau), **tol)
        np.testing.assert_allclose(w[idx], ref_welfare(log_w[idx], rewards[idx], tau, members[idx]), **tol)
    if m == 1:
        np.testing.assert_array_equal(pi, 1.0)
        np.testing.assert_array_equal(z, 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tau_broadcasts_over_batch_and_jit(dtype):
    rng = np.random.default_rng(1)
    log_w, rewards = random_instance(rng, 2, 4, batch=(3,))
    tau = np.array([0.3, 1.0, 5.0])
    with _dtype_context(dtype):
        z = np.asarray(jax.jit(reply_mechanism.payments)(log_w, rewards, tau))
    for a in range(3):
        np.testing.assert_allclose(z[a], ref_payments(log_w[a], rewards[a], tau[a]), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.sampled_from([1, 3]),
    m=st.sampled_from([1, 5]),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 300.0]),
    tau=st.sampled_from([0.01, 1.0, 50.0]),
)
def test_payments_non_negative_and_finite(dtype, seed, n, m, scale, tau):
    rng = np.random.default_rng(seed)
    log_w, rewards = random_instance(rng, n, m)
    log_w = log_w * scale
    rewards = rewards * scale
    with _dtype_context(dtype):
        pi = np.asarray(reply_mechanism.allocation(log_w, rewards, tau))
        z = np.asarray(reply_mechanism.payments(log_w, rewards, tau))
    assert np.isfinite(pi).all() and np.isfinite(z).all()
    assert (z >= 0).all()
    np.testing.assert_allclose(pi.sum(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_truthful_in_the_bid_scale_by_best_response(dtype):
    """Utility t_i E_pi[l_i] - z_i of agent i is maximised over a bid grid at the true scale t_i."""
    rng = np.random.default_rng(7)
    grid = np.concatenate([[0.0], np.geomspace(0.01, 20.0, 121)])  # 0 included: at least what bidding 0 gives
    worst = 0.0
    for trial in range(12):
        n, m = 3, 6
        ratios = rng.normal(size=(n, m)) * 2.0  # l_i(y_k)
        log_w = rng.normal(size=m)
        bids = rng.gamma(2.0, size=n)
        tau = [0.5, 1.0, 3.0][trial % 3]
        agent = trial % n
        truth = bids[agent]
        profiles = np.repeat(bids[None], len(grid) + 1, axis=0)
        profiles[:-1, agent] = grid
        profiles[-1, agent] = truth  # the truthful report, last
        rewards = profiles[:, :, None] * ratios[None]
        with _dtype_context(dtype):
            pi = np.asarray(
                reply_mechanism.allocation(np.broadcast_to(log_w, (len(profiles), m)), rewards, tau), np.float64
            )
            z = np.asarray(
                reply_mechanism.payments(np.broadcast_to(log_w, (len(profiles), m)), rewards, tau), np.float64
            )
        utility = truth * pi @ ratios[agent] - z[:, agent]
        worst = max(worst, utility[:-1].max() - utility[-1])
    assert worst <= (1e-4 if dtype == "float32" else 1e-10)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(log_weights=np.zeros(3), rewards=np.zeros((2, 4))), "rewards must have shape"),
        (dict(log_weights=np.zeros(0), rewards=np.zeros((2, 0))), "log_weights must have shape"),
        (dict(log_weights=np.array([0.0, np.nan]), rewards=np.zeros((1, 2))), "log_weights"),
        (dict(log_weights=np.full(2, -np.inf), rewards=np.zeros((1, 2))), "every candidate"),
        (dict(log_weights=np.zeros(2), rewards=np.array([[0.0, np.inf]])), "rewards .* finite"),
        (dict(log_weights=np.zeros(2), rewards=np.zeros((1, 2)), tau=0.0), "tau"),
        (dict(log_weights=np.zeros((3, 2)), rewards=np.zeros((2, 1, 2))), "do not broadcast"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    for fn in (reply_mechanism.allocation, reply_mechanism.payments):
        with pytest.raises(ValueError, match=match):
            fn(**kwargs)


def test_minus_inf_weight_drops_a_candidate():
    rewards = np.array([[1.0, 2.0, -1.0]])
    pi = np.asarray(reply_mechanism.allocation(np.array([0.0, -np.inf, 0.0]), rewards))
    assert pi[1] == 0.0
    np.testing.assert_allclose(pi[[0, 2]], ref_allocation(np.zeros(2), rewards[:, [0, 2]], 1.0), rtol=1e-6)


def test_log_allocation_is_the_log_of_the_allocation_and_reply_re_exports_the_mechanism():
    rng = np.random.default_rng(3)
    log_w, rewards = random_instance(rng, 3, 5, batch=(2,))
    log_w[0, 1] = -np.inf  # a dropped candidate: -inf in log space, 0 in probability
    with jax.enable_x64(True):
        log_pi = np.asarray(reply_mechanism.log_allocation(log_w, rewards, 0.8))
        pi = np.asarray(reply_mechanism.allocation(log_w, rewards, 0.8))
    assert log_pi[0, 1] == -np.inf
    np.testing.assert_allclose(np.exp(log_pi), pi, rtol=1e-12)
    np.testing.assert_allclose(pi[1], ref_allocation(log_w[1], rewards[1], 0.8), rtol=1e-10)
    assert (reply.allocation, reply.payments, reply.welfare) == (
        reply_mechanism.allocation,
        reply_mechanism.payments,
        reply_mechanism.welfare,
    )
