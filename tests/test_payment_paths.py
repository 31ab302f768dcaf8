"""The structured payments of the built-in rules (docs/maths.md §5, "Structured payments"; issue 37).

``method="auto"`` computes linear KL payments in closed form and log-linear robust and KL payments from the
exponential family along each agent's path; ``method="quadrature"`` is the generic autodiff path they replace
(the same quadrature nodes). Both are checked against each other and against SciPy float64 references of the
definitions (tests/references.py), in float32 and float64, at bid ratios 1e-12..1e12, and the fallback to the
generic path where the structured one does not apply.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from references import random_auction, ref_payment_in_u

import jaxauction
from jaxauction import payments

WIDE = 10.0 ** np.arange(-12, 13, 3)
KINDS = [("log_linear", "robust", "robust"), ("log_linear", "kl", "reverse_kl"), ("linear", "kl", "forward_kl")]


@functools.cache
def _reference(rule, kind, seed):
    """The auction of ``seed`` (masked tokens from seed 1), its wide-ratio profiles and the float64 payments."""
    logits, bids = random_auction(np.random.default_rng(seed), 3, 7, mask_fraction=0.3 if seed else 0.0)
    profiles = _profiles(bids[1:])
    if seed and rule == "log_linear":  # SciPy takes minutes on the masked log-linear auction: generic path only
        return logits, profiles, None
    expected = np.array([[ref_payment_in_u(rule, logits, b, i, kind) for i in range(3)] for b in profiles])
    return logits, profiles, expected


def _profiles(others, ratios=WIDE):
    others = np.asarray(others)
    return np.concatenate([ratios[:, None] * others.sum(), np.broadcast_to(others, (len(ratios), len(others)))], 1)


def _both(rule, logits, bids, allocation, **kwargs):
    fast = payments.second_price(rule, logits, bids, allocation, **kwargs)
    generic = payments.second_price(rule, logits, bids, allocation, method="quadrature", **kwargs)
    return np.asarray(fast), np.asarray(generic)


def test_built_in_rules_declare_their_path_and_others_take_the_generic_one():
    assert jaxauction.linear.path == "linear" and jaxauction.log_linear.path == "log_linear"
    assert payments._path_kind(jaxauction.log_linear, None) == "log_linear_robust"
    assert payments._path_kind(jaxauction.log_linear, payments.reverse_kl_value) == "log_linear_kl"
    assert payments._path_kind(jaxauction.linear, payments.forward_kl_value) == "linear_kl"
    assert payments._path_kind(jaxauction.log_linear, payments.forward_kl_value) is None  # another valuation
    assert payments._path_kind(jaxauction.as_rule(lambda l, b: jaxauction.log_linear(l, b)), None) is None


@pytest.mark.parametrize("rule,allocation,kind", KINDS)
def test_structured_payments_match_scipy_and_the_generic_path_for_ratios_1e_minus_12_to_1e12(
    rule, allocation, kind, dtype
):
    """Every agent at every ratio, 2 auctions (one with masked tokens), against the float64 references."""
    worst_ref, worst_generic = 0.0, 0.0
    for seed in range(2):
        logits, profiles, expected = _reference(rule, kind, seed)
        fast, generic = _both(rule, jnp.asarray(logits, dtype), jnp.asarray(profiles, dtype), allocation)
        assert fast.dtype == dtype and np.all(np.isfinite(fast))
        noise = 1e-12  # of b_i min(1, b_i / B): the references' rounding noise on payments that are 0
        if expected is None:
            expected, noise = generic.astype(np.float64), 1e-8  # the generic path's noise there: +-1e-9
        others = profiles.sum(-1, keepdims=True) - profiles
        scale = profiles * np.minimum(1.0, profiles / others)
        real = np.abs(expected) > noise * scale  # payments that are 0 up to rounding are not compared
        worst_ref = max(worst_ref, np.max(np.abs(fast - expected)[real] / expected[real]))
        worst_generic = max(worst_generic, np.max(np.abs(fast - generic)[real] / np.abs(generic[real])))
        assert np.all(np.abs(fast[~real]) <= 1e-7 * scale[~real])
    print(f"{rule} {allocation} {dtype.__name__}: vs SciPy {worst_ref:.1e}, vs the generic path {worst_generic:.1e}")
    # measured: float32 at most 3e-6 against the references (the generic path: 7e-6), float64 3e-8 (linear KL 2e-11)
    assert worst_ref < {jnp.float32: 1e-5, jnp.float64: 1e-7}[dtype]
    # the closed forms (KL) are exact and the robust path's 2 x 21 Gauss-Kronrod nodes far more accurate than the
    # generic path's 80: the difference is the generic path's own quadrature error (log-linear up to 5e-10 in
    # float64 here, linear KL up to 7e-6)
    assert worst_generic < {jnp.float32: 2e-5, jnp.float64: 1e-8 if rule == "log_linear" else 2e-5}[dtype]


def _peaked_auctions(rng, auctions, agents, vocab, spread=4.0):
    """LLM-like next-token logits: a shared heavy-tailed base plus per-agent preferences (``[A, m, V]``)."""
    shared = rng.standard_normal(vocab) * spread
    own = rng.standard_normal((auctions, agents, vocab)) * spread / 2
    return (shared + own).astype(np.float32)


@pytest.mark.parametrize("rule,allocation", [(r, a) for r, a, _ in KINDS])
def test_peaked_auctions_with_a_base_row_agree_with_the_generic_path_in_float32(rule, allocation):
    """A 2,000-token vocabulary, two charged agents and a base row, bids 0.01..100 times the others'."""
    rng = np.random.default_rng(17)
    logits = jnp.asarray(_peaked_auctions(rng, 5, 2, 2000))
    base = jnp.asarray(_peaked_auctions(rng, 5, 1, 2000)[:, 0])
    bids = jnp.asarray(10.0 ** rng.uniform(-2, 2, (5, 2)), jnp.float32)
    fast, generic = _both(rule, logits, bids, allocation, base_logits=base, base_bid=0.3)
    assert fast.shape == (5, 2) and np.all(fast > 0)
    np.testing.assert_allclose(fast, generic, rtol=1e-5)


def test_auctions_outside_the_structured_path_fall_back_to_the_generic_one(dtype):
    """No token the agents share (log-linear) and a log-probability below the KL floor: those auctions are flagged
    and recomputed by the generic path, the others keep the structured result. The robust path flags the second
    too: its ``d = log p_0 - L_w`` of about -90 (float32) or -710 (float64) on one token puts a feature at
    ``a ~ 1/|d|`` that the Gauss-10 rule misses by more than ``ROBUST_TOLERANCE`` (its error estimate)."""
    rng = np.random.default_rng(5)
    logits = np.stack([random_auction(rng, 2, 6)[0] for _ in range(3)])
    logits[1, 0, :3] = -np.inf  # agent 0 allows tokens 3..5 only, agent 1 tokens 0..2 only
    logits[1, 1, 3:] = -np.inf
    floor = float(np.log(jnp.finfo(dtype).tiny))
    logits[2, 0, 0] = logits[2, 0, 1:].max() + floor - 5.0  # log p_0 below the floor, on the support
    bids = jnp.asarray([[1.0, 2.0], [0.5, 1.5], [3.0, 1.0]], dtype)
    jl = jnp.asarray(logits, dtype)
    n = 2
    for allocation, kind in [("robust", "log_linear_robust"), ("kl", "log_linear_kl")]:
        z, fallback = payments._structured_payments(
            kind, jaxauction.log_linear, jl, bids / bids.max(-1, keepdims=True), n, payments.Quadrature(), 1 << 19
        )
        assert fallback.tolist() == [False, True, True]
        fast, generic = _both(jaxauction.log_linear, jl, bids, allocation)
        np.testing.assert_array_equal(fast[fallback], generic[fallback])  # the generic path's own numbers
        np.testing.assert_allclose(
            fast[~fallback], generic[~fallback], rtol={jnp.float32: 2e-5, jnp.float64: 1e-12}[dtype]
        )


def test_structured_payments_under_jit_vmap_grad_scale_and_num_charged():
    rng = np.random.default_rng(8)
    logits = jnp.asarray(rng.normal(size=(4, 3, 40)) * 2, jnp.float32)
    bids = jnp.asarray(rng.uniform(0.05, 1, size=(4, 3)), jnp.float32)
    for rule, allocation, _ in KINDS:
        eager = payments.second_price(rule, logits, bids, allocation)
        call = functools.partial(payments.second_price, rule, allocation=allocation)
        np.testing.assert_allclose(jax.jit(jax.vmap(call))(logits, bids), eager, rtol=1e-5)
        np.testing.assert_allclose(call(logits, bids * 1e20), eager * 1e20, rtol=1e-5)
        charged = payments.charged_payments(rule, logits, bids, num_charged=2, allocation=allocation)
        with_base = payments.second_price(
            rule, logits[:, :2], bids[:, :2], allocation, base_logits=logits[:, 2], base_bid=bids[:, 2]
        )
        np.testing.assert_allclose(charged, with_base, rtol=1e-6)
        lone = payments.second_price(rule, logits, bids.at[:, 1:].set(0.0), allocation)
        assert np.all(np.asarray(lone) == 0)
        nan = jax.jit(call)(logits, bids.at[0, 1].set(jnp.nan))
        assert np.all(np.isnan(nan[0])) and np.all(np.isfinite(nan[1:]))
        small = payments.Quadrature(order=4, zero_panels=1, body_panels=1, tail_panels=1)
        revenue = lambda method: (
            lambda l, b: payments.second_price(rule, l, b, allocation, quadrature=small, method=method).sum()
        )
        if rule == "linear":  # exact: against finite differences (the 12-node generic path is off by 1e-2)
            with jax.enable_x64(True):
                inputs = (jnp.asarray(logits[:2, :, :12], jnp.float64), jnp.asarray(bids[:2], jnp.float64))
                check_grads(revenue("auto"), inputs, order=1, modes=("rev",))
            continue
        grads = jax.grad(revenue("auto"), argnums=(0, 1))(logits[:2, :, :12], bids[:2])
        generic = jax.grad(revenue("quadrature"), argnums=(0, 1))(logits[:2, :, :12], bids[:2])
        for got, expected in zip(grads, generic):
            np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-5)


def test_linear_kl_closed_form_at_extreme_ratios_keeps_the_others_weight(dtype):
    """At own ratio 1e12 the others' weight 1/(1 + r) must not round away where ``p_i << r`` (float32)."""
    logits = np.log(np.array([[0.70, 0.2999, 1e-4], [0.10, 0.10, 0.80]]))
    profiles = _profiles([1.0], 10.0 ** np.arange(0, 13, 3))
    got = payments.second_price("linear", jnp.asarray(logits, dtype), jnp.asarray(profiles, dtype), "kl")
    expected = np.array([[ref_payment_in_u("linear", logits, b, i, "forward_kl") for i in range(2)] for b in profiles])
    np.testing.assert_allclose(got, expected, rtol={jnp.float32: 5e-6, jnp.float64: 1e-10}[dtype])


def test_gauss_kronrod_21_nodes_and_weights_have_the_rules_degrees():
    """The Gauss nodes and weights are numpy's 10-point Gauss-Legendre rule; the Kronrod weights integrate
    ``x^k`` exactly for ``k <= 31`` (3n + 1) and the Gauss weights for ``k <= 19`` (2n - 1), not beyond."""
    x, kronrod, gauss = payments.gauss_kronrod_21()
    assert x.shape == kronrod.shape == gauss.shape == (21,) and np.all(np.diff(x) > 0)
    nodes, weights = np.polynomial.legendre.leggauss(10)
    np.testing.assert_allclose(x[1::2], nodes, atol=1e-15)
    np.testing.assert_allclose(gauss[1::2], weights, atol=1e-15)
    assert np.all(gauss[::2] == 0)
    for k in range(0, 36, 2):  # odd powers integrate to 0 on symmetric nodes at any degree
        assert (abs(kronrod @ x**k - 2.0 / (k + 1)) < 1e-14) == (k <= 31), k
        assert (abs(gauss @ x**k - 2.0 / (k + 1)) < 1e-14) == (k <= 19), k


def test_robust_rows_over_the_tolerance_are_refined_up_to_a_share_then_take_the_generic_path():
    """Peaked agents at bid ratio 9: the one-panel rule's Gauss-Kronrod difference exceeds the tolerance on some
    rows. The first ``ceil(R / _REFINED_SHARE)`` of them get the two-panel rule; the others (and refined rows
    still over it) are flagged, and their auctions get the generic path's payments."""
    rng = np.random.default_rng(17)
    logits = jnp.asarray(_peaked_auctions(rng, 8, 2, 2000, spread=8.0))
    bids = jnp.asarray(np.stack([np.full(8, 9.0), np.ones(8)], 1), jnp.float32)
    normalised = bids / bids.max(-1, keepdims=True)
    log_p = jaxauction.aggregation.agent_log_probs(logits)
    (lw, lpi, shifted), (_, _, ratio), _ = payments._log_linear_tokens(log_p, normalised, 2, False)
    lw, lpi, shifted, ratio = (x.reshape((16,) + x.shape[2:]) for x in (lw, lpi, shifted, ratio))
    cut = jnp.minimum(jnp.log1p(ratio), np.log1p(10.0))
    one, two = (
        payments._robust_panels(lw, lpi, shifted, 0 * cut, cut, p, 1 << 26) for p in (1, payments.ROBUST_PANELS)
    )
    over = lambda k, err: np.asarray(err > payments.ROBUST_TOLERANCE * k)
    flagged = np.flatnonzero(over(*one[:2]))
    refined = flagged[: -(-16 // payments._REFINED_SHARE)]
    assert len(flagged) > len(refined) >= 1  # both branches are exercised
    expected = np.asarray(one[0]).copy()
    expected[refined] = np.asarray(two[0])[refined]
    still = np.isin(np.arange(16), flagged) & ~np.isin(np.arange(16), refined) | np.isin(np.arange(16), refined) & over(
        *two[:2]
    )
    z, _, uncertain = payments._log_linear_robust_payments(logits, normalised, 2, 10.0, 1 << 26)
    np.testing.assert_array_equal(np.asarray(uncertain).reshape(16), still)
    np.testing.assert_allclose(np.asarray(z).reshape(16)[~still], expected[~still], rtol=1e-6)
    fast, generic = _both(jaxauction.log_linear, logits, bids, "robust")
    fallback = still.reshape(8, 2).any(-1)
    np.testing.assert_array_equal(fast[fallback], generic[fallback])
    np.testing.assert_allclose(fast[~fallback], generic[~fallback], rtol=2e-5)
