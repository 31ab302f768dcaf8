"""Independent float64 NumPy/SciPy references for the core mechanism, shared by the tests.

They follow docs/maths.md's formulas literally in probability space (no log-space tricks, no autodiff, no
JAX): ``from references import ref_linear, ...``. ``test_core_reference.py`` checks them.
"""

import decimal
import warnings

import numpy as np
from scipy import integrate, optimize, special


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


def ref_log1p_minus_ratio(r):
    """log(1 + r) - r/(1 + r) with 60-digit decimal arithmetic (no cancellation at any ratio)."""
    with decimal.localcontext() as context:
        context.prec = 60
        x = decimal.Decimal(float(r))
        return float((1 + x).ln() - x / (1 + x))


def ref_linear_closed_form(logits, bids):
    """docs/maths.md §5 closed form, one auction: logits [n, V], bids [n] -> [n]."""
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
        out[i] = big_b * tv * ref_log1p_minus_ratio(bids[i] / big_b)
    return out


def ref_allocation(rule, logits, bids, i, kind):
    """x_i(s) as a Python function of the own bid s (docs/maths.md §5 robust, §5 KL)."""
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


def ref_payment_in_u(rule_name, logits, bids, i, kind):
    """docs/maths.md §5/§5 payment ``int_0^{b_i} s x_i'(s) ds`` of one agent, float64, for very wide bid ratios.

    Changed to ``u = log(1 + s/B)``: ``z_i = B int_0^U (1 - e^{-u}) e^u x_i'(u) du``; ``x_i'(u)`` is the
    analytic derivative (no autodiff) along ``lambda_i = 1 - e^{-u}``, others ``e^{-u} w``:
    ``dq/du = e^{-u} (p_i - q_-i)`` (linear) and ``dlog q/du = e^{-u} (D - E_q D)`` with
    ``D = log p_i - sum_j w_j log p_j`` (log-linear). Integrated by scipy.integrate.quad on panels.
    ``kind``: "robust", "forward_kl" or "reverse_kl".
    """
    p = ref_probs(logits)
    bids = np.asarray(bids, np.float64)
    others = np.delete(np.arange(len(bids)), i)
    big_b = bids[others].sum()
    if bids[i] == 0 or big_b == 0:
        return 0.0
    w = np.zeros(len(bids))
    w[others] = bids[others] / big_b
    with np.errstate(divide="ignore"):
        logp = np.log(p)

    def q_and_dq(u):  # q(u) and e^u dq/du
        lam = np.exp(-u) * w
        lam[i] = -np.expm1(-u)
        if rule_name == "linear":
            q_others = w @ p
            return lam @ p, p[i] - q_others
        q = ref_log_linear(logits, lam)
        ok = q > 0
        d = np.where(ok, logp[i] - np.sum(np.where(w[:, None] > 0, w[:, None] * np.where(p > 0, logp, 0), 0), 0), 0)
        return q, q * (d - np.sum(q[ok] * d[ok]))

    q0 = q_and_dq(0.0)[0]
    pushed_up = p[i] > q0

    def slope(u):  # e^u dx/du
        q, dq = q_and_dq(u)
        if kind == "robust":
            return np.sum(dq[pushed_up])
        if kind == "forward_kl":
            keep = p[i] > 0
            return np.sum(p[i][keep] * dq[keep] / q[keep])
        keep = q > 0
        return -np.sum(dq[keep] * (np.log(q[keep]) - logp[i][keep]))

    upper = np.log1p(bids[i] / big_b)
    edges = np.unique(np.concatenate([[0.0], upper * np.geomspace(1e-9, 1.0, 30), np.minimum(np.arange(1, 60), upper)]))
    integrand = lambda u: -np.expm1(-u) * slope(u)
    with warnings.catch_warnings():  # quad reports roundoff at epsrel 1e-12 on panels where it is reached
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        total = sum(
            integrate.quad(integrand, lo, hi, epsabs=0.0, epsrel=1e-12, limit=200)[0]
            for lo, hi in zip(edges[:-1], edges[1:])
        )
    return big_b * total


def ref_power_weights(bids, gamma):
    """lambda_j = b_j**gamma / sum_k b_k**gamma in float64 logs (zero bids weigh 0)."""
    bids = np.asarray(bids, np.float64)
    with np.errstate(divide="ignore"):
        scores = np.where(bids > 0, gamma * np.log(np.where(bids > 0, bids, 1.0)), -np.inf)
    return np.exp(scores - special.logsumexp(scores))


def _quad_between(integrand, points) -> float:
    """SciPy's adaptive quadrature of ``integrand`` over consecutive sorted ``points`` (float64, rtol 1e-13)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        return sum(
            integrate.quad(integrand, lo, hi, epsabs=0.0, epsrel=1e-13, limit=400)[0]
            for lo, hi in zip(points[:-1], points[1:])
            if hi > lo
        )


def ref_power_weight_payment(logits, bids, gamma, n=None):
    """Robust second-price payments ``[n]`` of ``q = sum_j lambda_j p_j``, ``lambda_j ∝ b_j**gamma`` (one auction).

    docs/maths.md §5 literally: ``x_i(s) = x_i(0) + TV(p_i, q_-i) h(s)``, ``h(s) = s**g / (s**g + F)``, ``F = sum_{j != i}
    b_j**g``, and ``z_i = TV int_0^{b_i} s h'(s) ds``, integrated by adaptive quadrature (scipy.integrate.quad) in
    ``v = log(s / b_i)``: ``s h'(s) ds = b_i e^v g sigma'(Y + g v) dv`` with ``Y = log(b_i**g / F)``, on panels
    around ``v = -Y/g`` (where ``h = 1/2``). Rows from ``n`` on (a base) take part but are not charged.
    """
    p = ref_probs(logits)
    bids = np.asarray(bids, np.float64)
    n = len(bids) if n is None else n
    out = np.zeros(n)
    for i in range(n):
        others = np.delete(np.arange(len(bids)), i)
        if bids[i] == 0 or bids[others].sum() == 0:
            continue
        tv = np.maximum(p[i] - ref_power_weights(bids[others], gamma) @ p[others], 0).sum()
        log_f = special.logsumexp(gamma * np.log(bids[others][bids[others] > 0]))
        logit = gamma * np.log(bids[i]) - log_f

        def integrand(v):
            y = abs(logit + gamma * v)
            return gamma * np.exp(v - y - 2 * np.log1p(np.exp(-y)))

        centre = -logit / gamma
        points = {0.0, -60.0, -30.0, -10.0, -3.0, -1.0}
        points |= {min(centre + d / gamma, 0.0) for d in (-60, -40, -10, -3, -1, 0, 1, 3, 10)}
        points = sorted(points)
        total = _quad_between(integrand, points)
        out[i] = bids[i] * tv * total
    return out


def ref_monotone_weight_log(x, gamma, steps, knots, width):
    """``G(x) = gamma x + sum_k a_k expit((x - c_k) / w)`` and ``G'(x)`` in float64 (the learned family's log g)."""
    x = np.asarray(x, np.float64)[..., None]
    z = (x - np.asarray(knots, np.float64)) / width
    s = special.expit(z)
    steps = np.asarray(steps, np.float64)
    return gamma * x[..., 0] + (steps * s).sum(-1), gamma + (steps * s * (1 - s)).sum(-1) / width


def ref_monotone_weight_payment(logits, bids, gamma, steps, knots, width, n=None):
    """Robust second-price payments ``[n]`` of ``q = sum_j lambda_j p_j``, ``lambda_j ∝ g(b_j / u)`` (one auction).

    The unit ``u`` is the last row's bid. docs/maths.md §5 literally: ``x_i(s) = x_i(0) + TV(p_i, q_-i) h(s)`` with
    ``h(s) = g(s/u) / (g(s/u) + W)``, ``W = sum_{j != i} g(b_j/u)``, ``z_i = TV int_0^{b_i} s h'(s) ds``, by adaptive
    quadrature (scipy.integrate.quad) in ``x = log(s/u)``: ``s h'(s) ds = u e^x sigma'(G(x) - log W) G'(x) dx``,
    on panels cut at the knots, at ``X = log(b_i/u)`` and around ``x*`` where ``G(x*) = log W``.
    """
    p = ref_probs(logits)
    bids = np.asarray(bids, np.float64)
    n = len(bids) if n is None else n
    unit = bids[-1]
    out = np.zeros(n)
    with np.errstate(divide="ignore"):
        scores = np.where(
            bids > 0, ref_monotone_weight_log(np.log(bids / unit), gamma, steps, knots, width)[0], -np.inf
        )
    for i in range(n):
        others = np.delete(np.arange(len(bids)), i)
        if bids[i] == 0 or bids[others].sum() == 0:
            continue
        log_w = special.logsumexp(scores[others])
        weights = np.exp(scores[others] - log_w)
        tv = np.maximum(p[i] - weights @ p[others], 0).sum()
        own = np.log(bids[i] / unit)

        def integrand(x):
            value, slope = ref_monotone_weight_log(x, gamma, steps, knots, width)
            y = abs(value - log_w)
            return np.exp(x - own - y - 2 * np.log1p(np.exp(-y))) * slope

        centre = optimize.brentq(lambda x: ref_monotone_weight_log(x, gamma, steps, knots, width)[0] - log_w, -1e4, 1e4)
        points = {own, own - 80.0, *(c for c in knots)}
        points |= {centre + d for d in (-60, -30, -10, -3, -1, -0.3, 0, 0.3, 1, 3, 10)}
        points = sorted(min(max(p_, own - 80.0), own) for p_ in points)
        total = _quad_between(integrand, points)
        out[i] = bids[i] * tv * total
    return out
