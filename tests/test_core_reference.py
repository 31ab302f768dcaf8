"""Independent float64 NumPy/SciPy references for the core mechanism, and checks of the references.

The references follow SPEC's formulas literally in probability space (no log-space tricks, no
autodiff): other test modules import them (``from test_core_reference import ...``).
"""

import numpy as np
import pytest
from scipy import integrate, special


def ref_probs(logits):
    """softmax over the last axis with -inf allowed (float64)."""
    logits = np.asarray(logits, np.float64)
    return np.exp(special.log_softmax(logits, axis=-1))


def ref_weights(bids):
    bids = np.asarray(bids, np.float64)
    total = bids.sum(-1, keepdims=True)
    equal = np.full_like(bids, 1.0 / bids.shape[-1])
    return np.where(total > 0, bids / np.where(total > 0, total, 1.0), equal)


def ref_linear(logits, bids):
    """q = sum_i lambda_i p_i (probabilities, [..., V])."""
    return np.einsum("...i,...iv->...v", ref_weights(bids), ref_probs(logits))


def ref_log_linear(logits, bids):
    """q ∝ prod_i p_i^lambda_i over the tokens every positively weighted agent allows."""
    lam = ref_weights(bids)
    p = ref_probs(logits)
    positive = lam[..., :, None] > 0
    allowed = np.all(~positive | (p > 0), axis=-2)
    with np.errstate(divide="ignore"):
        logp = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), -np.inf)
    score = np.sum(np.where(positive & (p > 0), lam[..., :, None] * np.where(p > 0, logp, 0), 0), axis=-2)
    score = np.where(allowed, score, -np.inf)
    return np.exp(special.log_softmax(score, axis=-1))


def ref_linear_closed_form(logits, bids):
    """SPEC §4 closed form, one auction: logits [n, V], bids [n] -> [n]."""
    p = ref_probs(logits)
    bids = np.asarray(bids, np.float64)
    out = np.zeros(len(bids))
    for i in range(len(bids)):
        others = np.delete(np.arange(len(bids)), i)
        big_b = bids[others].sum()
        if big_b == 0 or bids[i] == 0:
            continue
        q_others = ref_linear(logits[others], bids[others])
        tv = np.maximum(p[i] - q_others, 0).sum()
        r = bids[i] / big_b
        out[i] = big_b * tv * (np.log1p(r) - r / (1 + r))
    return out


def ref_allocation(rule, logits, bids, i, kind):
    """x_i(s) as a Python function of the own bid s (SPEC §4 robust, §5 KL)."""
    p = ref_probs(logits)
    bids = np.asarray(bids, np.float64)

    def q_at(s):
        b = bids.copy()
        b[i] = s
        return rule(logits, b)

    q0 = q_at(0.0)
    pushed_up = p[i] > q0

    def x(s):
        q = q_at(s)
        if kind == "robust":
            return q[pushed_up].sum()
        if kind == "forward_kl":
            keep = p[i] > 0
            return -np.sum(p[i][keep] * (np.log(p[i][keep]) - np.log(q[keep])))
        if kind == "reverse_kl":
            keep = q > 0
            return -np.sum(q[keep] * (np.log(q[keep]) - np.log(p[i][keep])))
        raise ValueError(kind)

    return x


def ref_payment(rule, logits, bids, i, kind):
    """z_i = int_0^{b_i} (x_i(b_i) - x_i(s)) ds by adaptive quadrature (scipy.integrate.quad)."""
    bids = np.asarray(bids, np.float64)
    b = bids[i]
    if b == 0 or np.delete(bids, i).sum() == 0:
        return 0.0
    x = ref_allocation(rule, logits, bids, i, kind)
    top = x(b)
    edges = np.concatenate([[0.0], b * np.geomspace(1e-12, 1.0, 25)])
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        total += integrate.quad(lambda s: top - x(s), lo, hi, epsabs=0.0, epsrel=1e-11, limit=200)[0]
    return total


def random_auction(rng, n, vocab, scale=2.0, mask_fraction=0.0):
    logits = rng.normal(size=(n, vocab)) * scale
    if mask_fraction:
        mask = rng.random((n, vocab)) < mask_fraction
        mask[np.arange(n), rng.integers(0, vocab, n)] = False
        logits = np.where(mask, -np.inf, logits)
    bids = rng.uniform(0.2, 1.0, size=n)
    return logits, bids


# ---- checks of the references themselves ----


def test_reference_linear_is_a_mixture_of_the_agents():
    rng = np.random.default_rng(0)
    logits, bids = random_auction(rng, 3, 6)
    q = ref_linear(logits, bids)
    np.testing.assert_allclose(q.sum(), 1.0, rtol=1e-14)
    p = ref_probs(logits)
    np.testing.assert_allclose(q, sum(b / bids.sum() * p[k] for k, b in enumerate(bids)), rtol=1e-14)


def test_reference_log_linear_matches_the_spec_counterexample():
    p1 = np.array([0.30, 0.01, 0.69])
    p2 = np.array([0.29, 0.70, 0.01])
    logits = np.log(np.stack([p1, p2]))
    assert ref_log_linear(logits, [0.3, 0.7])[0] == pytest.approx(0.5588, abs=1e-4)
    assert ref_log_linear(logits, [0.5, 0.5])[0] == pytest.approx(0.6389, abs=1e-4)


def test_reference_payment_matches_closed_form():
    rng = np.random.default_rng(1)
    logits, bids = random_auction(rng, 3, 7)
    closed = ref_linear_closed_form(logits, bids)
    quad = [ref_payment(ref_linear, logits, bids, i, "robust") for i in range(3)]
    np.testing.assert_allclose(quad, closed, rtol=1e-8)
