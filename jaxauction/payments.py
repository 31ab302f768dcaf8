"""Second-price payments derived from any aggregation rule by autodiff and quadrature.

For agent ``i`` with bid ``b_i``, the others' total bid ``B = sum_{j != i} b_j`` (a base bid
included) and an allocation ``x_i(s)`` that is non-decreasing in the own bid ``s``, the payment is
(docs/maths.md §5, §5)

    z_i = b_i x_i(b_i) - int_0^{b_i} x_i(s) ds = int_0^{b_i} s x_i'(s) ds  >= 0.

Allocations:

* ``"robust"`` (docs/maths.md §5): ``x_i(s) = sum_{t in T_i+} q_t(s, b_-i)`` with ``T_i+ = {t : p_i(t) > q_t(0, b_-i)}``.
  This is the expected threshold payment of stable sampling.
* ``"kl"`` (docs/maths.md §7, Myerson): ``x_i(s) = v_i(q(s, b_-i))`` with ``v_i = -KL(p_i || q)`` for
  :func:`~jaxauction.aggregation.linear` and ``-KL(q || p_i)`` for
  :func:`~jaxauction.aggregation.log_linear`. For any other rule pass the valuation itself.
* a callable ``valuation(log_p, log_q) -> [...]`` (``log_p, log_q: [..., V]``): Myerson payments
  for that valuation, e.g. :func:`forward_kl_value` (:data:`KL_VALUATIONS` names both KL valuations).

The string allocations are the values of :data:`jaxauction.mechanism.ALLOCATIONS`, the one map from
a mechanism's payment kind (``"second_price"``, ``"kl"``, None) to what it charges for.

Rules are resolved with :func:`jaxauction.base.as_rule` (a name, a :class:`~jaxauction.base.Rule`,
a ``jax.jit`` of one or a plain function). A rule with a closed-form robust payment (docs/maths.md §5:
the linear rule, and :class:`PowerWeightClosedForm` for weights ``∝ b**gamma``, which the power-mean rule
at ``rho = 1, temperature = 1`` carries) uses it for ``allocation="robust"`` unless ``method="quadrature"``. Otherwise the robust
allocation differentiates the rule's ``probabilities`` form when it has one (no log, exp and division
per token), else ``exp(rule(...))``.

Numerics (docs/maths.md §5). The bids are first normalised by their largest one and the payments scaled back
(``z(c b) = c z(b)``; every bid up to :func:`max_bid` gives finite payments). With the others' total
``B`` and ``u = log(1 + s/B)``, the own bid enters as the bid profile ``(1 - e^{-u}) e_i + e^{-u} w``
(``w`` the others' shares; the rule depends on ratios only), so ``dlambda/du = e^{-u} (e_i - w)`` is
formed without cancellation at any ratio; ``g(u) = e^u dx_i/du`` is one ``jax.jvp`` in the fixed
direction ``e_i - w``, and ``z_i = B int_0^{log1p(b_i/B)} (1 - e^{-u}) g(u) du`` is a fixed-size
composite Gauss-Legendre rule (:class:`Quadrature`). For the linear rule ``g = TV(p_i, q_-i)`` is
constant, so the quadrature is exact to rounding for any bid ratio. A lone bidder (``B = 0``) and a
zero bid pay 0.

Structured payments (docs/maths.md §5, issue 37). A rule that declares its family (``Rule.path``: the
linear and log-linear rules) skips autodiff under ``method="auto"``. KL payments have closed forms: linear
one log per token, log-linear ``z_i = B KL(q(b_i) || q(0))`` over the agent's support (a few exps per token).
Log-linear robust payments integrate ``Cov_q(1_T, d)`` along the exponential family ``q_a ∝ exp(L_w + a d)``
with 21 Gauss-Kronrod nodes (one exp per node and token) and an error estimate per payment (the Gauss rule
on the same nodes, :data:`ROBUST_TOLERANCE`; 42 nodes where it is exceeded); ``quadrature`` then only places the tail
(``body_ratio``). Auctions outside those methods (agents sharing no token, a clamped ``log p_i``, an
estimate over the tolerance) are recomputed by the generic path; ``method="quadrature"`` always takes it.
Measured accuracy (against the closed form, bid ratios 1e-12..1e12): see
``tests/test_payments.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxauction import _validation, aggregation, base
from jaxauction.mechanism import ALLOCATIONS

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "METHODS",
    "ROBUST_PANELS",
    "ROBUST_TOLERANCE",
    "Quadrature",
    "gauss_kronrod_21",
    "charged_payments",
    "max_bid",
    "second_price",
    "linear_closed_form",
    "PowerWeightClosedForm",
    "power_weight_integral",
    "MonotoneWeightClosedForm",
    "monotone_weight_integral",
    "monotone_weight_inverse",
    "monotone_weight_log",
    "forward_kl_value",
    "reverse_kl_value",
    "KL_VALUATIONS",
    "kl_valuation",
]

Valuation = Callable[[jax.Array, jax.Array], jax.Array]

max_bid = _validation.max_bid

# (quadrature nodes x vocabulary) elements that one vectorised step handles; larger problems run
# sequentially over nodes, agents and auctions (lax.map). Steps whose buffers stay in the CPU caches
# (8 nodes x 49152 tokens here) measured fastest, and it bounds memory under an outer vmap.
DEFAULT_CHUNK_ELEMENTS = 1 << 19


@dataclasses.dataclass(frozen=True)
class Quadrature:
    """Composite Gauss-Legendre rule in ``u = log(1 + s/B)`` over ``[0, U]``, ``U = log(1 + b_i/B)``.

    ``[0, min(U, u_c)]`` (``u_c = log(1 + body_ratio)``) is split into ``body_panels`` equal panels,
    the first of which is split further into ``zero_panels`` panels shrinking geometrically by
    ``zero_ratio`` towards 0 (Myerson payments have features on a logarithmic scale near ``s = 0``).
    ``[u_c, U]`` (bid ratios above ``body_ratio``, where ``q`` saturates) gets ``tail_panels`` panels.
    Every panel has ``order`` nodes: ``size = order * (zero_panels + body_panels + tail_panels)``.

    Accuracy of the default (80 nodes), bid ratios 1e-12 to 1e12, measured against float64 SciPy
    references of the definitions (docs/maths.md) (tests/test_payments.py): the linear rule's generic robust path
    about 1e-9 relative in float64 and 4e-7 in float32 (its integrand is entire); KL (Myerson)
    payments of the linear rule and robust and KL payments of the log-linear rule about 5e-7 in
    float64 and 2e-6 in float32 for moderately peaked agents (raise ``tail_panels`` and
    ``body_panels`` for agents whose log-probabilities differ by tens of nats). The tail panels
    resolve features at ``u ~ log(p_j/p_i)``. Cost is linear in ``size``.
    """

    order: int = 8
    zero_panels: int = 2
    body_panels: int = 4
    tail_panels: int = 4
    body_ratio: float = 10.0
    zero_ratio: float = math.exp(-2.0)

    def __post_init__(self):
        for name in ("order", "body_panels", "tail_panels", "zero_panels"):
            _validation.check_count(getattr(self, name), f"Quadrature: {name}", minimum=0)
        for name in ("body_ratio", "zero_ratio"):
            _validation.check_real_number(getattr(self, name), f"Quadrature: {name}")
        if self.order < 1 or self.body_panels < 1 or self.tail_panels < 1 or self.zero_panels < 0:
            raise ValueError(f"Quadrature: order, body_panels, tail_panels >= 1 and zero_panels >= 0; got {self}.")
        if not (self.body_ratio > 0 and 0 < self.zero_ratio < 1):
            raise ValueError(f"Quadrature: need body_ratio > 0 and 0 < zero_ratio < 1; got {self}.")

    @property
    def size(self) -> int:
        return self.order * (self.zero_panels + self.body_panels + self.tail_panels)

    def _unit_rule(self, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, w = np.polynomial.legendre.leggauss(self.order)
        left, right = edges[:-1, None], edges[1:, None]
        nodes = left + (x[None, :] + 1) / 2 * (right - left)
        weights = (right - left) / 2 * w[None, :]
        return nodes.ravel(), weights.ravel()

    def unit_rules(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Nodes and weights on ``[0, 1]`` for the body and for the tail (float64 numpy)."""
        first = 1.0 / self.body_panels
        grading = [first * self.zero_ratio**j for j in range(self.zero_panels, 0, -1)]
        body_edges = np.array([0.0, *grading, *(first * np.arange(1, self.body_panels + 1))])
        tail_edges = np.linspace(0.0, 1.0, self.tail_panels + 1)
        return (*self._unit_rule(body_edges), *self._unit_rule(tail_edges))

    def nodes(self, upper: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Nodes and weights ``[..., size]`` for integrals over ``u`` in ``[0, upper]``, ``upper: [...]``."""
        body_x, body_w, tail_x, tail_w = (jnp.asarray(a, upper.dtype) for a in self.unit_rules())
        body_end = jnp.minimum(upper, math.log1p(self.body_ratio))[..., None]
        tail_length = upper[..., None] - body_end
        u = jnp.concatenate([body_end * body_x, body_end + tail_length * tail_x], axis=-1)
        w = jnp.concatenate([body_end * body_w, tail_length * tail_w], axis=-1)
        return u, w


def _floor_log(log_x: jax.Array) -> jax.Array:
    """Clamp log-probabilities at the log of the dtype's smallest normal number (finite KL values)."""
    return jnp.maximum(log_x, math.log(float(jnp.finfo(log_x.dtype).tiny)))


def forward_kl_value(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """``-KL(p || q)`` from log-probabilities ``[..., V] -> [...]`` (the linear rule's valuation).

    A token with ``p > 0 = q`` counts as ``q`` = the dtype's smallest normal number, so the value is
    finite (about ``-87 p`` per such token in float32) instead of ``-inf``.
    """
    p_positive = log_p > -jnp.inf
    log_p_safe = jnp.where(p_positive, log_p, 0.0)
    terms = jnp.where(p_positive, jnp.exp(log_p_safe) * (_floor_log(log_q) - log_p_safe), 0.0)
    return jnp.sum(terms, axis=-1)


def reverse_kl_value(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """``-KL(q || p)`` from log-probabilities ``[..., V] -> [...]`` (the log-linear rule's valuation).

    A token with ``q > 0 = p`` counts as ``p`` = the dtype's smallest normal number (finite value).
    """
    q_positive = log_q > -jnp.inf
    log_q_safe = jnp.where(q_positive, log_q, 0.0)
    terms = jnp.where(q_positive, jnp.exp(log_q_safe) * (log_q_safe - _floor_log(log_p)), 0.0)
    return -jnp.sum(terms, axis=-1)


KL_VALUATIONS = {"forward": forward_kl_value, "reverse": reverse_kl_value}
"""The two KL valuations by the direction of the divergence: ``"forward"`` ``-KL(p || q)`` (the linear
rule's), ``"reverse"`` ``-KL(q || p)`` (the log-linear rule's). A valuation, not a payment kind: the
``"kl"`` payment kind uses the rule's own one."""


def kl_valuation(direction: str, argument: str = "valuation") -> Valuation:
    """The KL valuation of ``direction`` (:data:`KL_VALUATIONS`); ``ValueError`` naming ``argument`` otherwise."""
    if isinstance(direction, str) and direction in KL_VALUATIONS:
        return KL_VALUATIONS[direction]
    raise ValueError(
        f"{argument}: expected one of {list(KL_VALUATIONS)} ('forward': -KL(p || q), 'reverse': -KL(q || p)); "
        f"got {direction!r}."
    )


def _probabilities(rule: base.Rule) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The rule in probability space: its ``probabilities`` form, else ``exp(rule(...))``."""
    if rule.probabilities is not None:
        return rule.probabilities
    return lambda logits, bids: jnp.exp(rule(logits, bids))


def _resolve_allocation(fn: str, rule: base.Rule, allocation) -> Valuation | None:
    """None for the robust allocation, else the valuation ``(log_p, log_q) -> value``."""
    if isinstance(allocation, str) and allocation == ALLOCATIONS["second_price"]:
        return None
    if isinstance(allocation, str) and allocation == ALLOCATIONS["kl"]:
        if rule.valuation is not None:
            return rule.valuation
        raise ValueError(
            f"{fn}: allocation='kl' needs the rule's valuation (jaxauction.linear: -KL(p_i || q), "
            f"jaxauction.log_linear: -KL(q || p_i)); rule {rule.name!r} has none. Fix: pass the valuation, "
            f"e.g. allocation=jaxauction.payments.forward_kl_value or reverse_kl_value, or any "
            f"valuation(log_p, log_q) -> [...] that the rule makes non-decreasing in the own bid."
        )
    if callable(allocation):
        return allocation
    raise ValueError(
        f"{fn}: allocation must be 'robust' (payment kind 'second_price'), 'kl' (payment kind 'kl') or a "
        f"callable valuation(log_p, log_q); got {allocation!r}."
    )


METHODS = ("auto", "quadrature")
"""``method`` of the payments: ``"auto"`` uses a rule's closed-form robust payment when it has one;
``"quadrature"`` always runs the generic autodiff + quadrature path (to check one against the other)."""


def _check_method(fn: str, method: str, quadrature=None) -> None:
    """``method`` one of :data:`METHODS` and ``quadrature`` a :class:`Quadrature` (static: fine under ``jit``)."""
    if quadrature is not None and not isinstance(quadrature, Quadrature):
        raise ValueError(
            f"{fn}: quadrature: expected a jaxauction.payments.Quadrature (e.g. Quadrature(order=8)); got "
            f"{type(quadrature).__name__} {quadrature!r:.60}."
        )
    if not (isinstance(method, str) and method in METHODS):
        raise ValueError(
            f"{fn}: method must be one of {METHODS} ('auto': a rule's closed form when it has one, "
            f"'quadrature': always the generic path); got {method!r}."
        )


def _chunked_map(f, xs, chunk: int):
    """``vmap(f)(xs)`` evaluated ``chunk`` leading elements at a time (sequentially, via lax.map)."""
    length = jax.tree_util.tree_leaves(xs)[0].shape[0]
    if chunk >= length:
        return jax.vmap(f)(xs)
    if chunk <= 1:
        return jax.lax.map(f, xs)
    return jax.lax.map(f, xs, batch_size=chunk)


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, max(limit, 1)) + 1) if n % d == 0)


@dataclasses.dataclass(frozen=True)
class _Chunks:
    """How many auctions, agents and quadrature nodes one vectorised step handles."""

    auctions: int
    agents: int
    nodes: int

    @classmethod
    def plan(cls, n_auctions: int, n_agents: int, n_nodes: int, vocab: int, chunk_elements: int) -> _Chunks:
        nodes = _largest_divisor_at_most(n_nodes, chunk_elements // vocab)
        agents = 1
        if nodes == n_nodes:
            agents = _largest_divisor_at_most(n_agents, chunk_elements // (n_nodes * vocab))
        auctions = 1
        if agents == n_agents:
            auctions = max(1, min(n_auctions, chunk_elements // (n_agents * n_nodes * vocab)))
        return cls(auctions, agents, nodes)


def _competition(bids: jax.Array, n: int):
    """For bids ``[..., m]`` (effective): the others' total ``B [..., n]``, their shares ``w [..., n, m]`` (0 at
    ``j = i``), whether agent ``i`` pays (``b_i > 0``, ``B > 0``) and its ratio ``b_i / B`` (0 if not)."""
    not_self = ~jnp.eye(bids.shape[-1], dtype=bool)[:n]
    others_bids = jnp.where(not_self, bids[..., None, :], 0.0)
    others = jnp.sum(others_bids, axis=-1)
    own = bids[..., :n]
    pays = (others > 0) & (own > 0)
    safe_others = jnp.where(pays, others, 1.0)
    ratio = jnp.where(pays, own, 0.0) / safe_others
    return others, others_bids / safe_others[..., None], pays, ratio


def _auction_payments(
    rule: base.Rule,
    valuation: Valuation | None,
    n_charged: int,
    quadrature: Quadrature,
    chunks: _Chunks,
    logits: jax.Array,
    bids: jax.Array,
) -> jax.Array:
    """Payments ``[n_charged]`` of one auction: ``logits: [m, V]``, effective bids ``[m]`` (normalised).

    Only bid ratios matter, so the own bid ``s = B expm1(u)`` is applied as the profile
    ``lambda(u) = (1 - e^{-u}) e_i + e^{-u} w`` (``w = b_-i / B``, the others' shares), which sums to
    1. Its derivative ``d lambda / du = e^{-u} (e_i - w)``: the jvp in the fixed direction
    ``e_i - w`` gives ``g(u) = e^u dx_i/du`` without cancellation at any ratio, and
    ``z_i = B int_0^U (1 - e^{-u}) g(u) du`` with ``U = log(1 + b_i/B)``.
    """
    log_p = aggregation.agent_log_probs(logits)
    is_self = jnp.eye(bids.shape[-1], dtype=bool)[:n_charged]  # [n, m]
    others, shares, pays, ratio = _competition(bids, n_charged)  # shares w: [n, m], 0 at i
    directions = jnp.where(is_self, 1.0, -shares)  # e_i - w
    u, w = quadrature.nodes(jnp.log1p(ratio))  # [n, K]

    if valuation is None:
        log_q0 = jax.vmap(lambda b: rule(logits, b))(shares)
        reference = log_p[:n_charged] > log_q0  # T_i+: the tokens agent i pushes up
        probabilities = _probabilities(rule)
        value = lambda pushed_up, b: jnp.sum(jnp.where(pushed_up, probabilities(logits, b), 0.0), axis=-1)
    else:
        reference = log_p[:n_charged]
        value = lambda log_p_i, b: valuation(log_p_i, rule(logits, b))

    def agent_payment(agent):
        is_self_i, shares_i, direction_i, reference_i, u_i, w_i = agent

        @jax.checkpoint
        def slope(u_node):
            profile = jnp.where(is_self_i, -jnp.expm1(-u_node), shares_i * jnp.exp(-u_node))
            return jax.jvp(lambda b: value(reference_i, b), (profile,), (direction_i,))[1]

        g = _chunked_map(slope, u_i, chunks.nodes)
        return jnp.sum(w_i * -jnp.expm1(-u_i) * g)

    z = _chunked_map(agent_payment, (is_self, shares, directions, reference, u, w), chunks.agents)
    return jnp.where(pays, others * z, 0.0)


def _quadrature_payments(
    rule: base.Rule,
    valuation: Valuation | None,
    logits: jax.Array,
    bids: jax.Array,
    n_charged: int,
    quadrature: Quadrature,
    chunk_elements: int,
) -> jax.Array:
    """Payments ``[..., n_charged]`` for ``logits: [..., m, V]``, ``bids: [..., m]`` (charged first)."""
    m, vocab = logits.shape[-2:]
    lead = jnp.broadcast_shapes(logits.shape[:-2], bids.shape[:-1])
    flat_bids = jnp.broadcast_to(bids, lead + (m,)).reshape(-1, m)
    n_auctions = flat_bids.shape[0]
    chunks = _Chunks.plan(n_auctions, n_charged, quadrature.size, vocab, chunk_elements)
    one = functools.partial(_auction_payments, rule, valuation, n_charged, quadrature, chunks)
    if logits.ndim == 2:
        out = _chunked_map(lambda b: one(logits, b), flat_bids, chunks.auctions)
    else:
        flat_logits = jnp.broadcast_to(logits, lead + (m, vocab)).reshape(-1, m, vocab)
        out = _chunked_map(lambda lb: one(*lb), (flat_logits, flat_bids), chunks.auctions)
    return out.reshape(lead + (n_charged,))


# ---- Structured payments (docs/maths.md §5, "Structured payments"): the built-in rules' one-parameter paths ----

PATH_KINDS = ("linear", "log_linear")
"""The values of :attr:`jaxauction.base.Rule.path` that :func:`second_price` knows."""

# Elements (rows x nodes x tokens) of one vectorised step of the robust node sums on an accelerator (every
# row's whole vocabulary at once up to this bound); on CPU the steps are one row's chunk of _CPU_TOKEN_CHUNK.
_PATH_CHUNK_ELEMENTS_ACCELERATOR = 1 << 26
_OFF_SUPPORT = 1e4  # exponents of tokens off the path's support, below the largest one


def _path_kind(rule: base.Rule, valuation: Valuation | None) -> str | None:
    """``"log_linear_robust"``, ``"log_linear_kl"``, ``"linear_kl"`` or None (the generic path)."""
    if rule.path == "log_linear" and valuation is None:
        return "log_linear_robust"
    if rule.path == "log_linear" and valuation is reverse_kl_value:
        return "log_linear_kl"
    if rule.path == "linear" and valuation is forward_kl_value:
        return "linear_kl"
    return None


def _path_chunk_elements(chunk_elements: int) -> int:
    """The structured path's bound on an accelerator's step: :data:`_PATH_CHUNK_ELEMENTS_ACCELERATOR` unless the
    caller chose one (the generic path's default is sized for a CPU cache)."""
    return chunk_elements if chunk_elements != DEFAULT_CHUNK_ELEMENTS else _PATH_CHUNK_ELEMENTS_ACCELERATOR


def _series(x: jax.Array, coefficients) -> jax.Array:
    """``x^2 sum_k c_k x^k`` (Horner): the tails of the series below, for ``|x| < 1/2`` (callers mask ``x``)."""
    total = jnp.full_like(x, coefficients[-1])
    for c in coefficients[-2::-1]:
        total = total * x + c
    return x * x * total


def _small(x: jax.Array) -> jax.Array:
    """``x`` where ``|x| < 1/2`` (where :func:`_series` is used), else 0."""
    return jnp.where(jnp.abs(x) < 0.5, x, 0.0)


# x^2 sum_k (-x)^k / (k + 2) = x - log(1 + x) (30 terms) and x^2 sum_k x^k / (k + 2) = -log(1 - x) - x (49 terms)
_X_MINUS_LOG1P = tuple((-1.0) ** k / (k + 2) for k in range(30))
_MINUS_LOG1M_MINUS_X = tuple(1.0 / (k + 2) for k in range(49))


def _x_minus_log1p(x: jax.Array) -> jax.Array:
    """``phi(x) = x - log(1 + x) >= 0`` for ``x > -1``: the series ``sum_{k >= 2} (-x)^k / k`` (Horner, 30
    terms) for ``|x| < 1/2``, where the difference cancels; the difference itself beyond (``phi >= 0.19 |x|``)."""
    small = jnp.abs(x) < 0.5
    return jnp.where(small, _series(_small(x), _X_MINUS_LOG1P), x - jnp.log1p(jnp.where(small, 0.0, x)))


def _linear_kl_payments(logits: jax.Array, bids: jax.Array, n: int) -> jax.Array:
    """KL (Myerson) payments of the linear rule in closed form (docs/maths.md §7): ``[..., m, V] -> [..., n]``.

    With ``r = sum_{j != i} w_j p_j``, ``A = b_i / (b_i + B)`` and ``rho = r({t : p_i(t) = 0})``,
    ``z_i = B [sum_{t: p_i > 0} r_t phi(A (p_i - r)_t / r_t) + rho (log(1 + b_i/B) - b_i/(b_i + B))]``,
    ``phi(x) = x - log(1 + x)`` (a token with ``r_t = 0`` gives ``A p_i(t)``). Every term is ``>= 0``.
    ``bids``: effective and normalised (largest 1). One log per token and agent; no quadrature.
    """
    others, shares, pays, ratio = _competition(bids, n)
    p = jnp.exp(aggregation.agent_log_probs(logits))
    r = aggregation.weighted_sum(shares, p[..., None, :, :])  # [..., n, V]
    p_i = p[..., :n, :]
    own_weight = (ratio / (1.0 + ratio))[..., None]
    others_weight = (1.0 / (1.0 + ratio))[..., None]  # 1 - A, not rounded away at large ratios
    mixed = r > 0
    safe_r = jnp.where(mixed, r, 1.0)
    x = own_weight * (p_i - r) / safe_r
    small = jnp.abs(x) < 0.5
    # r phi(x), without forming r x where x is large: (p_i - r) A - r log(q_A / r), q_A = (1 - A) r + A p_i
    q_bid = others_weight * r + own_weight * p_i
    log_ratio = jnp.log(jnp.where(small, 1.0, q_bid)) - jnp.log(safe_r)
    large = (p_i - r) * own_weight - r * jnp.where(small, 0.0, log_ratio)
    term = jnp.where(mixed, jnp.where(small, r * _x_minus_log1p(jnp.where(small, x, 0.0)), large), p_i * own_weight)
    tokens = jnp.sum(jnp.where(p_i > 0, term, 0.0), axis=-1)
    rho = jnp.sum(jnp.where(p_i > 0, 0.0, r), axis=-1)
    return jnp.where(pays, others * (tokens + rho * _log1p_minus_ratio(ratio)), 0.0)


def _log_linear_tokens(log_p: jax.Array, bids: jax.Array, n: int, kl: bool):
    """Per-agent data of the log-linear path (docs/maths.md §5, "Structured payments"), for every auction at once.

    ``log_p: [A, m, V]``, effective normalised ``bids: [A, m]``. Along agent ``i``'s path ``q_a ∝ exp(L_w + a d)``
    on the tokens no positively weighted agent masks (the support ``S``), ``L_w = sum_j w_j log p_j``,
    ``d = log p_i - L_w``. Returns ``(tokens, (others, pays, ratio) [A, n], bad [A, n])``, ``bad``: the agent pays
    but the path is outside this method (no common token; KL: a clamped ``log p_i`` on ``S``). ``tokens``, each
    ``[A, n, V]``: KL ``(L_w, log p_i, S)``; robust ``(lw, lpi, shifted)``, ``L_w`` and ``log p_i`` less their
    maxima over ``S`` (``_OFF_SUPPORT`` below 0 off it) and ``d - c`` on ``S`` (``c = -log Z_0``: ``T_i+ = {d > c}``).
    """
    others, shares, pays, ratio = _competition(bids, n)
    masked = log_p == -jnp.inf
    lw_all = aggregation.weighted_sum(shares, jnp.where(masked, 0.0, log_p)[..., None, :, :])  # [A, n, V]
    masked_w = aggregation.weighted_sum(shares, masked.astype(log_p.dtype)[..., None, :, :]) > 0
    own = log_p[..., :n, :]
    support = ~masked_w & ~masked[..., :n, :]
    bad = ~jnp.any(support, axis=-1)
    if kl:  # reverse_kl_value clamps log p_i at log(tiny): those tokens take the generic path
        floor = math.log(float(jnp.finfo(log_p.dtype).tiny))
        bad |= jnp.any(support & (own < floor), axis=-1)
        return (lw_all, own, support), (others, pays, ratio), pays & bad
    top_w = jnp.max(jnp.where(support, lw_all, -jnp.inf), axis=-1, keepdims=True)
    top_i = jnp.max(jnp.where(support, own, -jnp.inf), axis=-1, keepdims=True)
    top_w, top_i = (jax.lax.stop_gradient(jnp.where(bad[..., None], 0.0, t)) for t in (top_w, top_i))
    # off the support both exponents sit _OFF_SUPPORT below their maxima: exp(-1e4) = 0, no mask per node
    lw = jnp.where(support, lw_all - top_w, -_OFF_SUPPORT)
    lpi = jnp.where(support, own - top_i, -_OFF_SUPPORT)
    log_z0 = jax.nn.logsumexp(jnp.where(masked_w, -jnp.inf, lw_all), axis=-1, keepdims=True)  # q(0) = e^(L_w) / Z_0
    shift = jnp.where(jnp.isfinite(log_z0), -log_z0, 0.0)
    shifted = jnp.where(support, own - lw_all - shift, 0.0)
    return (lw, lpi, shifted), (others, pays, ratio), pays & bad


# x^2 sum_k x^k / (k + 2)! = e^x - 1 - x and x^2 sum_k (k + 1) x^k / (k + 2)! = 1 + e^x (x - 1), |x| < 1/2: the
# first omitted terms are below 5e-17 of the sums
_EXPM1_MINUS_X = tuple(1.0 / math.factorial(k + 2) for k in range(15))
_KL_GENERATOR = tuple((k + 1) / math.factorial(k + 2) for k in range(15))
_KL_EXPONENT_CAP = 60.0  # A d' above this: kappa from exp(A d' - shift) (float32 overflows at 88)


def _log_linear_kl_payments(lw, lpi, support, ratio):
    """Reverse-KL payments of the log-linear rule in closed form (docs/maths.md §5): ``[..., V] -> [...]`` per agent.

    ``z_i / B = int_0^A a Var_{q_a}(d) da = KL(q_A || q_0)`` (``A = b_i / (b_i + B)``), summed as
    ``sum_S q_0 f(y)``, ``y = log(q_A / q_0) = A d' - kappa``, ``f(y) = 1 + e^y (y - 1) >= 0``: every term is
    non-negative. ``d' = d - E_0[d]`` and the cumulant ``kappa = log E_0[e^{A d'}] = log1p(sum_S q_0 (e^{A d'} - 1 -
    A d') + A sum_S q_0 d')`` keep ``y`` accurate at small ``A`` (the payment is second order in ``kappa``'s
    error); where some ``A d'`` exceeds :data:`_KL_EXPONENT_CAP`, ``kappa = s + log E_0[e^{A d' - s}]``.
    ``lw, lpi, support [..., V]``: ``L_w``, ``log p_i`` and ``S`` (:func:`_log_linear_tokens`); ``ratio [...]``.
    Two exponentials per token (``q_0``, ``e^{A d' - s}``) besides the normaliser's.
    """
    log_z = jax.nn.logsumexp(jnp.where(support, lw, -jnp.inf), axis=-1, keepdims=True)
    log_q0 = jnp.where(support, lw - jnp.where(jnp.isfinite(log_z), log_z, 0.0), -jnp.inf)
    q0 = jnp.exp(log_q0)
    d = jnp.where(support, lpi - lw, 0.0)
    centred = d - jnp.sum(q0 * d, axis=-1, keepdims=True)
    own_weight = (ratio / (1.0 + ratio))[..., None]
    x = own_weight * centred
    top = jnp.max(jnp.where(support, x, -jnp.inf), axis=-1, keepdims=True)
    shift = jax.lax.stop_gradient(jnp.maximum(jnp.where(jnp.isfinite(top), top, 0.0) - _KL_EXPONENT_CAP, 0.0))
    scaled = jnp.where(support, jnp.exp(x - shift), 0.0)  # e^x unless shift > 0
    excess = jnp.where(jnp.abs(x) < 0.5, _series(_small(x), _EXPM1_MINUS_X), scaled - 1.0 - x)
    moment = jnp.sum(q0 * excess, axis=-1, keepdims=True) + own_weight * jnp.sum(q0 * centred, axis=-1, keepdims=True)
    large = jnp.log(jnp.sum(q0 * scaled, axis=-1, keepdims=True)) + shift
    kappa = jnp.where(shift > 0, large, jnp.log1p(moment))
    y = x - kappa
    q_bid = q0 * scaled * jnp.exp(shift - kappa)  # q_A = q_0 e^y
    terms = jnp.where(jnp.abs(y) < 0.5, q0 * _series(_small(y), _KL_GENERATOR), q_bid * (y - 1.0) + q0)
    return jnp.sum(jnp.where(support, terms, 0.0), axis=-1)


# Gauss-Kronrod (G10, K21) on [-1, 1] (QUADPACK's qk21; the Gauss nodes are every other one from the second).
_GK21_NODES = (
    0.995657163025808080735527280689003, 0.973906528517171720077964012084452, 0.930157491355708226001207180059508,
    0.865063366688984510732096688423493, 0.780817726586416897063717578345042, 0.679409568299024406234327365114874,
    0.562757134668604683339000099272694, 0.433395394129247190799265943165784, 0.294392862701460198131126603103866,
    0.148874338981631210884826001129720, 0.0,
)  # fmt: skip
_GK21_KRONROD = (
    0.011694638867371874278064396062192, 0.032558162307964727478818972459390, 0.054755896574351996031381300244580,
    0.075039674810919952767043140916190, 0.093125454583697605535065465083366, 0.109387158802297641899210590325805,
    0.123491976262065851077958109831074, 0.134709217311473325928054001771707, 0.142775938577060080797094273138717,
    0.147739104901338491374841515972068, 0.149445554002916905664936468389821,
)  # fmt: skip
_GK21_GAUSS = (
    0.066671344308688137593568809893332, 0.149451349150580593145776339657697, 0.219086362515982043995534934228163,
    0.269266719309996355091226921569469, 0.295524224714752870173892994651338,
)  # fmt: skip


def gauss_kronrod_21() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nodes ``[21]`` on ``[-1, 1]`` and the Kronrod and Gauss weights ``[21]`` (0 at the Kronrod-only nodes)."""
    half = np.asarray(_GK21_NODES)
    nodes = np.concatenate([-half[:-1], half[::-1]])
    kronrod = np.concatenate([_GK21_KRONROD[:-1], _GK21_KRONROD[::-1]])
    gauss_half = np.zeros(11)
    gauss_half[1::2] = _GK21_GAUSS
    return nodes, kronrod, np.concatenate([gauss_half[:-1], gauss_half[::-1]])


ROBUST_TOLERANCE = 1e-5
"""Relative Gauss-Kronrod difference the log-linear robust path accepts per payment; above it, the generic path."""
ROBUST_PANELS = 2
"""Equal panels of Gauss-Kronrod 21 where one is not enough: the refined body rows and the tail ``[u_c, U]``."""
_REFINED_SHARE = 8  # at most ceil(rows / 8) rows of a call get the refined body rule; the rest, the generic path

_CPU_TOKEN_CHUNK = 1 << 16  # tokens of one (row, chunk) step of the node sums on CPU (one row of V <= 65,536)


def _robust_sums(lw, lpi, shifted, a, e, chunk_elements: int):
    """Node sums of ``q = exp(e_k lw + a_k lpi)`` times ``1_T, 1_N, 1_T (d - c), 1_N (c - d)`` (``T = {d > c}``).

    ``lw, lpi, shifted [R, V]`` (:func:`_log_linear_tokens`; ``q = 0`` off the support), ``a, e [R, K]`` ->
    ``[R, K, 4]``. One exponential per (row, node, token), laid out ``[nodes, tokens]`` (tokens minor:
    vectorised for any node count) and contracted with the statistics, formed per chunk, as a matrix product:
    a chunk of the vocabulary of one row at a time on CPU (``lax.map``), every row at once on an accelerator
    (``chunk_elements`` bounds the block). Nothing of size ``[R, V, 4]`` is materialised.
    """
    rows, vocab = lw.shape
    nodes = a.shape[-1]
    cpu = jax.default_backend() == "cpu"
    chunk = min(vocab, _CPU_TOKEN_CHUNK) if cpu else vocab
    pieces = -(-vocab // chunk)
    pad = pieces * chunk - vocab
    if pad:  # padded tokens are off the support: exp(-1e4) = 0
        lw, lpi = (jnp.pad(x, ((0, 0), (0, pad)), constant_values=-_OFF_SUPPORT) for x in (lw, lpi))
        shifted = jnp.pad(shifted, ((0, 0), (0, pad)))
    steps = rows * pieces
    lw, lpi, shifted = (x.reshape(steps, chunk) for x in (lw, lpi, shifted))
    a, e = (jnp.repeat(x, pieces, axis=0) for x in (a, e))

    def one(x):
        lw_c, lpi_c, shifted_c, a_c, e_c = x
        block = jnp.exp(e_c[:, None] * lw_c[None, :] + a_c[:, None] * lpi_c[None, :])  # [K, chunk]
        above = shifted_c > 0
        zero = jnp.zeros_like(shifted_c)
        stats = jnp.stack([above, ~above, jnp.where(above, shifted_c, zero), jnp.where(above, zero, -shifted_c)])
        return jnp.einsum("kc,jc->kj", block, stats.astype(block.dtype), precision=jax.lax.Precision.HIGHEST)

    batch = 2 if cpu else max(1, min(steps, chunk_elements // (nodes * chunk)))
    sums = _chunked_map(one, (lw, lpi, shifted, a, e), batch)
    return sums.reshape(rows, pieces, nodes, 4).sum(axis=1)


def _robust_panels(lw, lpi, shifted, lower, upper, panels: int, chunk_elements: int):
    """Kronrod sum and Gauss-Kronrod difference of ``int a Cov_q(1_T, d) du`` over ``[lower, upper]`` (rows ``[R]``).

    ``panels`` equal panels of Gauss-Kronrod 21 (a row with ``upper <= lower`` gets 0). Returns the Kronrod
    sum, ``sum_panels |K - G|`` (the Gauss-10 rule's error estimate: the Kronrod sum's own error is far
    smaller) and the smallest node sum ``Z`` (for the underflow check).
    """
    x, kronrod, gauss = (jnp.asarray(np.tile(v, panels), lw.dtype) for v in gauss_kronrod_21())
    panel = jnp.repeat(jnp.arange(panels, dtype=lw.dtype), x.size // panels)
    half = jnp.maximum(upper - lower, 0.0)[:, None] / (2 * panels)
    u = lower[:, None] + half * (2 * panel + x + 1.0)  # [R, panels * 21]
    a, e = -jnp.expm1(-u), jnp.exp(-u)
    sums = _robust_sums(lw, lpi, shifted, a, e, chunk_elements)
    s_t, s_n, up, down = (sums[..., j] for j in range(4))
    z = s_t + s_n
    safe = jnp.where(z > 0, z, 1.0)
    h = a * (s_n * up + s_t * down) / safe / safe  # a Cov_q(1_T, d) >= 0
    per_panel = lambda w: jnp.sum((half * w * h).reshape(h.shape[0], panels, -1), axis=-1)
    k_sum, g_sum = per_panel(kronrod), per_panel(gauss)
    z_min = jnp.min(jnp.where(half > 0, z, jnp.inf), axis=-1)
    return jnp.sum(k_sum, axis=-1), jnp.sum(jnp.abs(k_sum - g_sum), axis=-1), z_min


def _robust_rows(log_p, bids, n):
    """:func:`_log_linear_tokens` (robust) with the agents of every auction as rows: ``lw, lpi, shifted [R, V]``,
    ``(others, pays, ratio) [A, n]`` and ``bad [A, n]``."""
    tokens, competition, bad = _log_linear_tokens(log_p, bids, n, False)
    return tuple(x.reshape((-1,) + x.shape[2:]) for x in tokens), competition, bad


def _log_linear_robust_payments(logits, bids, n, body_ratio, chunk_elements):
    """Robust payments ``z_i / B = int_0^U a Cov_q(1_T, d) du`` (``U = log(1 + b_i/B)``): ``[A, m, V] -> [A, n]``.

    One panel of Gauss-Kronrod 21 over ``[0, min(U, u_c)]`` (``u_c = log(1 + body_ratio)``) for every row (agent
    of an auction); the rows whose Gauss-Kronrod difference exceeds :data:`ROBUST_TOLERANCE` (at most ``ceil(R /
    _REFINED_SHARE)`` of them, gathered) again with :data:`ROBUST_PANELS` panels; when some ``U`` exceeds ``u_c``,
    :data:`ROBUST_PANELS` panels over ``[u_c, U]`` for every row, under a ``lax.cond`` whose operands are this
    call's inputs (the tail recomputes the rows: a cond over the rows themselves costs their materialisation
    when it is not taken). Returns ``z / B``, ``(others, pays)`` and whether the agent pays but its path is
    outside the method (no common token, a difference still over the tolerance, an underflowing node sum).
    """
    (lw, lpi, shifted), (others, pays, ratio), bad = _robust_rows(aggregation.agent_log_probs(logits), bids, n)
    rows = lw.shape[0]
    upper = jnp.log1p(ratio.reshape(-1))
    cut = jnp.minimum(upper, math.log1p(body_ratio))
    zero = jnp.zeros_like(cut)
    k_sum, error, z_min = _robust_panels(lw, lpi, shifted, zero, cut, 1, chunk_elements)
    (index,) = jnp.nonzero(error > ROBUST_TOLERANCE * k_sum, size=-(-rows // _REFINED_SHARE), fill_value=rows)
    take = lambda x: jnp.take(x, index, axis=0, mode="clip")  # the fill value takes the last row: dropped below
    k_fine, error_fine, z_fine = _robust_panels(
        *map(take, (lw, lpi, shifted, zero, cut)), ROBUST_PANELS, chunk_elements
    )
    put = lambda full, part: full.at[index].set(part, mode="drop")
    k_sum, error, z_min = put(k_sum, k_fine), put(error, error_fine), put(z_min, jnp.minimum(take(z_min), z_fine))

    def tail(logits, bids, k_sum, error, z_min):
        (lw, lpi, shifted), _, _ = _robust_rows(aggregation.agent_log_probs(logits), bids, n)
        k, err, zm = _robust_panels(lw, lpi, shifted, cut, upper, ROBUST_PANELS, chunk_elements)
        return k_sum + k, error + err, jnp.minimum(z_min, zm)

    body = lambda logits, bids, *sums: sums
    k_sum, error, z_min = jax.lax.cond(jnp.any(upper > cut), tail, body, logits, bids, k_sum, error, z_min)
    underflow = z_min < lw.shape[-1] * 1e8 * float(jnp.finfo(lw.dtype).tiny)
    uncertain = ((error > ROBUST_TOLERANCE * k_sum) | underflow).reshape(ratio.shape)
    return k_sum.reshape(ratio.shape), (others, pays), bad | (pays & uncertain)


def _structured_payments(kind, rule, logits, bids, n, quadrature, chunk_elements):
    """Payments ``[..., n]`` on a rule's one-parameter path; auctions the path cannot certify take the generic one.

    ``logits: [..., m, V]``, effective normalised ``bids: [..., m]``. Returns ``(z, fallback [...])``:
    ``fallback`` marks the auctions recomputed by :func:`_quadrature_payments` (``lax.cond`` on whether any
    auction needs it; under an outer ``vmap`` both branches run).
    """
    if kind == "linear_kl":
        z = _linear_kl_payments(logits, bids, n)
        return z, jnp.zeros(z.shape[:-1], bool)
    m, vocab = logits.shape[-2:]
    lead = jnp.broadcast_shapes(logits.shape[:-2], bids.shape[:-1])
    flat_logits = jnp.broadcast_to(logits, lead + (m, vocab)).reshape(-1, m, vocab)
    flat_bids = jnp.broadcast_to(bids, lead + (m,)).reshape(-1, m)
    kl = kind == "log_linear_kl"
    if kl:
        tokens, (others, pays, ratio), bad = _log_linear_tokens(
            aggregation.agent_log_probs(flat_logits), flat_bids, n, kl
        )
        z = _log_linear_kl_payments(*tokens, ratio)
    else:
        elements = _path_chunk_elements(chunk_elements)
        z, (others, pays), bad = _log_linear_robust_payments(flat_logits, flat_bids, n, quadrature.body_ratio, elements)
    z = jnp.where(pays, others * z, 0.0)
    fallback = jnp.any(bad, axis=-1)
    valuation = reverse_kl_value if kl else None

    def generic():
        exact = _quadrature_payments(rule, valuation, flat_logits, flat_bids, n, quadrature, chunk_elements)
        return jnp.where(fallback[:, None], exact, z)

    z = jax.lax.cond(jnp.any(fallback), generic, lambda: z)
    return z.reshape(lead + (n,)), fallback.reshape(lead)


def _core(
    rule: base.Rule,
    logits: jax.Array,
    bids: jax.Array,
    num_charged: int,
    allocation,
    quadrature: Quadrature,
    chunk_elements: int,
    method: str,
) -> jax.Array:
    """:func:`charged_payments` for a resolved rule (traceable; every argument but the arrays static)."""
    valuation = _resolve_allocation("charged_payments", rule, allocation)
    bids = aggregation.effective_bids(logits, bids)
    lead = jnp.broadcast_shapes(logits.shape[:-2], bids.shape[:-1])
    bids = jnp.broadcast_to(bids, lead + bids.shape[-1:])
    # Scale covariance z(c b) = c z(b): compute on bids normalised by their largest one, scale back.
    scale = jax.lax.stop_gradient(jnp.max(bids, axis=-1, keepdims=True))
    scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
    normalised = bids / scale
    kind = _path_kind(rule, valuation) if method == "auto" else None
    if valuation is None and method == "auto" and rule.closed_form_payment is not None:
        z = rule.closed_form_payment(logits, normalised, num_charged)
    elif kind is not None:
        z = _structured_payments(kind, rule, logits, normalised, num_charged, quadrature, chunk_elements)[0]
    else:
        z = _quadrature_payments(rule, valuation, logits, normalised, num_charged, quadrature, chunk_elements)
    z = z * scale
    if rule.monotone:
        z = jnp.maximum(z, 0.0)  # the integrand is >= 0: only rounding could make z negative
    return jnp.where(aggregation.invalid_auctions(logits, bids)[..., None], jnp.nan, z)


_STATIC = ("rule", "num_charged", "allocation", "quadrature", "chunk_elements", "method")


def _core_entry(
    rule, logits, bids, base_logits, base_bid, *, num_charged, allocation, quadrature, chunk_elements, method
):
    all_logits, all_bids = aggregation.append_base(logits, bids, base_logits, base_bid)
    return _core(rule, all_logits, all_bids, num_charged, allocation, quadrature, chunk_elements, method)


_core_jit = jax.jit(_core_entry, static_argnames=_STATIC)


def _dispatch(rule, logits, bids, base_logits, base_bid, **static) -> jax.Array:
    """The compiled entry point (one compilation per shapes and static arguments) for eager calls;
    traced calls (under an outer ``jit``, ``vmap`` or ``grad``) inline the computation instead, so a
    rule closing over the outer trace's values never lands in a cache."""
    arrays = (logits, bids, base_logits, base_bid)
    entry = _core_jit if _validation.is_concrete(*arrays) else _core_entry
    return entry(rule, logits, bids, base_logits, base_bid, **static)


def charged_payments(
    rule,
    logits: jax.Array,
    bids: jax.Array,
    *,
    num_charged: int,
    allocation: str | Valuation = "robust",
    quadrature: Quadrature = Quadrature(),
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    method: str = "auto",
) -> jax.Array:
    """The payments core: ``logits [..., m, V]``, ``bids [..., m]`` -> payments ``[..., num_charged]``.

    The first ``num_charged`` rows are the charged agents; rows after them (a base distribution)
    take part in the rule and count in every agent's competing bid but are never charged. Values
    are not validated (call it inside ``jit``; :func:`second_price` is the checked public entry
    point): an auction with a NaN or infinite bid, or a NaN or ``+inf`` logit, gets NaN payments;
    negative bids count as 0. For the robust allocation of a rule with a closed-form payment
    (``rule.closed_form_payment``, e.g. the linear rule) that closed form is used unless
    ``method="quadrature"``; otherwise the generic autodiff + quadrature path.
    """
    fn = "charged_payments"
    rule = base.as_rule(rule, argument=f"{fn}: rule")
    _resolve_allocation(fn, rule, allocation)
    _check_method(fn, method, quadrature)
    return _dispatch(
        rule,
        logits,
        bids,
        None,
        None,
        num_charged=num_charged,
        allocation=allocation,
        quadrature=quadrature,
        chunk_elements=chunk_elements,
        method=method,
    )


def second_price(
    rule,
    logits: jax.Array,
    bids: jax.Array,
    allocation: str | Valuation = "robust",
    *,
    base_logits: jax.Array | None = None,
    base_bid: jax.Array | float = 0.0,
    quadrature: Quadrature = Quadrature(),
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    method: str = "auto",
) -> jax.Array:
    """Expected second-price payments ``[..., n]`` of a monotone rule (docs/maths.md §5, §5).

    Args:
      rule: a rule name (``"linear"``), a :class:`jaxauction.base.Rule` (``jaxauction.linear``), a
        ``jax.jit`` of one, or any function ``rule(logits [..., m, V], bids [..., m]) -> log q [..., V]``
        (resolved with :func:`jaxauction.base.as_rule`). It must be monotone for the payments to be
        truthful, depend on the bids only through their ratios, and be differentiable in the bids
        (``jax.jvp``).
      logits: ``[..., n, V]`` agents' logits; bids: ``[..., n]`` non-negative bids, at most
        :func:`max_bid` (about 3.4e30 in float32).
      allocation: ``"robust"``, ``"kl"`` or a valuation ``(log_p, log_q) -> [...]`` (module docs).
      base_logits: optional ``[..., V]`` base distribution that takes part with ``base_bid`` but is
        never charged; ``base_bid`` counts in every agent's ``B``.
      quadrature: the generic path's integration rule (static; the structured log-linear robust path
        takes only its ``body_ratio``); chunk_elements: memory bound per vectorised step.
      method: ``"auto"`` (a rule's closed-form robust payment when it has one: linear, or
        ``design.fixed_rule`` at ``rho = 1, temperature = 1``) or
        ``"quadrature"`` (always the generic autodiff path).

    Returns:
      ``z: [..., n]``, non-negative for a monotone rule; 0 for an agent with zero bid or without
      competitors; ``z(c b) = c z(b)`` (the bids are normalised by their largest one first).

    Cost: ``n * quadrature.size`` forward-mode evaluations of the rule per auction (plus ``n`` for
    the robust reference outcomes ``q(0, b_-i)``), in steps of about ``chunk_elements`` node x token
    elements; the closed forms (linear robust and KL, log-linear KL) cost about one evaluation; the
    log-linear rule's robust payments one exponential per node (21; 42 for rows whose error estimate
    asks for it, 42 more with bid ratios above ``body_ratio``), token and agent (steps sized for the backend). Eager calls run one compiled function per
    shapes and static arguments (a second call with the same shapes does not recompile).

    Under ``jit`` nothing is validated: negative bids count as 0, and an auction with a NaN or
    infinite bid or a NaN or ``+inf`` logit gets NaN payments (never a silent 0).
    """
    fn = "second_price"
    resolved = base.as_rule(rule, argument=f"{fn}: rule")
    _resolve_allocation(fn, resolved, allocation)
    _check_method(fn, method, quadrature)
    logits, bids = _validation.mechanism_inputs(fn, logits, bids)
    base_logits, base_bid = _validation.base_inputs(fn, logits, base_logits, base_bid)
    return _dispatch(
        resolved,
        logits,
        bids,
        base_logits,
        base_bid,
        num_charged=bids.shape[-1],
        allocation=allocation,
        quadrature=quadrature,
        chunk_elements=chunk_elements,
        method=method,
    )


def _log1p_minus_ratio(r: jax.Array) -> jax.Array:
    """``f(r) = log(1 + r) - r / (1 + r) >= 0`` to a few ulps for every ``r >= 0`` (float32 included).

    With ``t = r / (1 + r)``, ``f = -log(1 - t) - t = sum_{k >= 2} t^k / k``: below ``r = 1``
    (``t < 1/2``) this series of positive terms (50 terms, Horner; truncation below float64 rounding)
    has no cancellation, also where ``f ~ r^2 / 2`` is tiny. From ``r = 1`` on, ``log1p(r) - t`` loses
    at most a factor 4 (``f >= 0.19``); for huge ``r`` ``t`` rounds to 1 and ``log1p(r)`` dominates.
    """
    t = r / (1.0 + r)
    small = r < 1.0
    series = _series(jnp.where(small, t, 0.0), _MINUS_LOG1M_MINUS_X)
    rl = jnp.where(small, 1.0, r)
    return jnp.where(small, series, jnp.log1p(rl) - jnp.where(small, 0.5, t))


def linear_closed_form(
    logits: jax.Array,
    bids: jax.Array,
    *,
    base_logits: jax.Array | None = None,
    base_bid: jax.Array | float = 0.0,
) -> jax.Array:
    """Closed-form robust second-price payments of the linear rule (docs/maths.md §5): ``[..., n]``.

    ``z_i = B TV(p_i, q_-i) (log(1 + b_i/B) - b_i/(b_i + B))`` with ``B = sum_{j != i} b_j`` (base bid
    included) and ``q_-i`` the linear aggregate of the others; 0 when ``B = 0``. Computed on bids
    normalised by their largest one (scale-covariant, finite up to :func:`max_bid`); under ``jit`` an
    auction with a NaN or infinite bid or logit gets NaN. The same numbers as
    ``second_price(jaxauction.linear, ...)``.
    """
    fn = "linear_closed_form"
    logits, bids = _validation.mechanism_inputs(fn, logits, bids)
    base_logits, base_bid = _validation.base_inputs(fn, logits, base_logits, base_bid)
    return _dispatch(
        base.as_rule("linear"),
        logits,
        bids,
        base_logits,
        base_bid,
        num_charged=bids.shape[-1],
        allocation="robust",
        quadrature=Quadrature(),
        chunk_elements=DEFAULT_CHUNK_ELEMENTS,
        method="auto",
    )


def _tv_to_others(all_logits: jax.Array, weights: jax.Array, n: int) -> jax.Array:
    """``TV(p_i, q_-i) = sum_t max(p_i(t) - q_-i(t), 0)``: ``[..., n]`` for ``q_-i = sum_j weights[..., i, j] p_j``.

    ``all_logits: [..., m, V]``, ``weights: [..., n, m]`` (0 at ``j = i``). In probability space: one exp
    per agent and token (log space would take ``n * m``). A probability that underflows to 0 (below
    ``exp(-87)`` in float32) changes TV by less than that.
    """
    p = jnp.exp(aggregation.agent_log_probs(all_logits))
    q_others = aggregation.weighted_sum(weights, p[..., None, :, :])  # [..., n, V]
    return jnp.sum(jnp.maximum(p[..., :n, :] - q_others, 0.0), axis=-1)


def _others(all_logits: jax.Array, all_bids: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Effective bids ``[..., m]`` (broadcast), the others' bids ``[..., n, m]`` (0 at ``j = i``) and the mask."""
    all_bids = aggregation.effective_bids(all_logits, all_bids)
    lead = jnp.broadcast_shapes(all_logits.shape[:-2], all_bids.shape[:-1])
    all_bids = jnp.broadcast_to(all_bids, lead + all_bids.shape[-1:])
    not_self = ~jnp.eye(all_bids.shape[-1], dtype=bool)[:n]  # [n, m]
    return all_bids, jnp.where(not_self, all_bids[..., None, :], 0.0), not_self


def _linear_closed_form(all_logits: jax.Array, all_bids: jax.Array, n: int) -> jax.Array:
    """The linear rule's :data:`~jaxauction.base.ClosedFormPayment` (unvalidated, traceable)."""
    all_bids, others_bids, not_self = _others(all_logits, all_bids, n)
    others, _, pays, ratio = _competition(all_bids, n)
    weights = jnp.where(not_self, aggregation.bid_weights(all_logits[..., None, :, :], others_bids), 0.0)
    tv = _tv_to_others(all_logits, weights, n)
    return jnp.where(pays, others * tv * _log1p_minus_ratio(ratio), 0.0)


# The fixed rule of power_weight_integral: Gauss-Legendre panels of _POWER_ORDER nodes, _POWER_PANELS graded
# panels per run (docs/maths.md §5). 25 panels x 8 = 200 nodes per agent: scalar work, negligible next to TV.
_POWER_ORDER = 8
_POWER_PANELS = 8
_POWER_TAIL = (
    44.0  # e^-44 < 1e-19: the integrand below y = min(Y, 0) - D decays at least like 4 e^{(1 + 1/g) (y - top)}
)


def _graded_logit_nodes(top: jax.Array, first: jax.Array, tail: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Nodes and weights ``[..., 200]`` of the closed forms' fixed rule in ``tau = Y - y >= 0`` (docs/maths.md §5).

    ``[0, top]`` (``top = max(Y, 0)``) in :data:`_POWER_PANELS` panels graded geometrically (ratio 2) from
    each end, the first ``first`` long (shorter when ``top`` is small), and ``[top, top + tail]`` graded from
    its start; :data:`_POWER_ORDER` Gauss-Legendre nodes per panel. ``top, first, tail: [...]``.
    """
    dtype = top.dtype
    x, w = (jnp.asarray(a, dtype) for a in np.polynomial.legendre.leggauss(_POWER_ORDER))
    grading = jnp.asarray(2.0 ** np.arange(_POWER_PANELS + 1) - 1.0, dtype)  # 0, 1, 3, ..., 2^K - 1
    first = jnp.minimum(first, top / (2.0 * grading[-1]))[..., None]
    edges = jnp.concatenate(
        [
            first * grading,  # from tau = 0 (y = Y) down
            top[..., None] - first * grading[::-1],  # up to tau = max(Y, 0) (y = 0); the gap between: one panel
            top[..., None] + tail[..., None] * grading[1:] / grading[-1],  # y < min(Y, 0)
        ],
        axis=-1,
    )
    left, right = edges[..., :-1, None], edges[..., 1:, None]
    tau = (left + (x + 1.0) / 2.0 * (right - left)).reshape(edges.shape[:-1] + (-1,))
    return tau, ((right - left) / 2.0 * w).reshape(tau.shape)


def power_weight_integral(logit: jax.Array, gamma: jax.Array | float) -> jax.Array:
    """``Psi(Y, g) = int_{-inf}^{Y} e^{(y - Y)/g} sigma'(y) dy`` in ``[0, 1]`` (docs/maths.md §5): ``[...]``.

    The robust second-price payment of a rule ``q = sum_j lambda_j p_j`` with ``lambda_j ∝ b_j**g`` is
    ``z_i = b_i TV(p_i, q_-i) Psi(Y_i, g)``, with ``Y_i = log(b_i**g / sum_{j != i} b_j**g)`` the logit of
    agent ``i``'s own weight (``sigma' = sigma (1 - sigma)``; ``y`` is the logit of the weight at a
    lower own bid ``s = b_i e^{(y - Y)/g}``). ``g = 1``: ``Psi = (log(1 + r) - r/(1 + r)) / r``,
    ``r = e^Y``. ``g = 0`` gives 0 (the allocation only jumps at ``s = 0``).

    Every term is positive (no cancellation at any ratio). A fixed composite Gauss-Legendre rule in
    ``tau = Y - y >= 0``: ``[0, max(Y, 0)]`` in panels graded geometrically (ratio 2) from both ends,
    first panel ``min(g, 1, ...) / 4``, and ``[max(Y, 0), max(Y, 0) + D]``, ``D = 44 g / (1 + g)``, graded from
    its start. Measured accuracy (tests/test_payments.py): see docs/maths.md §5.

    Args:
      logit: ``Y: [...]``, finite; gamma: ``g >= 0``, finite, scalar or broadcastable. Checked when concrete
        (``ValueError``); under ``jit`` a non-finite value gives NaN.
    """
    for name, value, low in (("logit", logit, -np.inf), ("gamma", gamma, 0.0)):
        if _validation.is_concrete(value):
            array = np.asarray(value, np.float64)
            if not (np.all(np.isfinite(array)) and np.all(array >= low)):
                raise ValueError(
                    f"power_weight_integral: {name} must be finite{' and >= 0' if low == 0 else ''}; got {value!r:.60}."
                )
    logit = jnp.asarray(logit)
    dtype = jnp.result_type(logit, float)
    logit = logit.astype(dtype)
    gamma = jnp.asarray(gamma, dtype)
    positive = gamma > 0
    g = jnp.where(positive, gamma, 1.0)
    top = jnp.maximum(logit, 0.0)
    g, top = jnp.broadcast_arrays(g, top)
    tau, weights = _graded_logit_nodes(top, jnp.minimum(g, 1.0) / 4.0, _POWER_TAIL * g / (1.0 + g))
    y = jnp.abs(jnp.broadcast_to(logit, top.shape)[..., None] - tau)
    log_integrand = -tau / g[..., None] - y - 2.0 * jnp.log1p(jnp.exp(-y))  # e^{-tau/g} sigma'(Y - tau)
    return jnp.where(positive, jnp.sum(weights * jnp.exp(log_integrand), axis=-1), 0.0)


@dataclasses.dataclass(frozen=True)
class PowerWeightClosedForm:
    """The robust second-price payment of ``q = sum_j lambda_j p_j``, ``lambda_j ∝ b_j**gamma`` (docs/maths.md §5).

    A :data:`~jaxauction.base.ClosedFormPayment` (hashable by value): ``(logits [..., m, V], bids [..., m],
    n) -> [..., n]``, ``z_i = b_i TV(p_i, q_-i) Psi(Y_i, gamma)`` (:func:`power_weight_integral`), with
    ``q_-i`` the others' mixture at weights ``∝ b_j**gamma`` (base rows included) and
    ``Y_i = log(b_i**gamma / sum_{j != i} b_j**gamma)``; 0 for a zero bid or ``sum_{j != i} b_j = 0``.
    The power-mean family at ``rho = 1, temperature = 1`` carries it (:func:`jaxauction.design.fixed_rule`);
    ``gamma = 1`` is the linear rule's closed form. It costs what the linear closed form costs (one
    mixture per agent and its TV) plus a scalar integral per agent.
    """

    gamma: float

    def __call__(self, all_logits: jax.Array, all_bids: jax.Array, n: int) -> jax.Array:
        all_bids, others_bids, not_self = _others(all_logits, all_bids, n)
        eligible = not_self & aggregation._has_mass(all_logits)[..., None, :]
        weights = jnp.exp(aggregation.log_bid_weights(others_bids, self.gamma, eligible))
        tv = _tv_to_others(all_logits, weights, n)
        own = all_bids[..., :n]
        pays = (jnp.sum(others_bids, axis=-1) > 0) & (own > 0)
        positive = others_bids > 0
        log_others = jnp.log(jnp.where(positive, others_bids, 1.0))
        log_total = jax.nn.logsumexp(jnp.where(positive, self.gamma * log_others, -jnp.inf), axis=-1)
        logit = self.gamma * jnp.log(jnp.where(pays, own, 1.0)) - jnp.where(pays, log_total, 0.0)
        return jnp.where(pays, own * tv * power_weight_integral(logit, self.gamma), 0.0)


# The learned monotone weights g(s) = s^gamma exp(H(log s)) (docs/maths.md §3, §5; jaxauction.design.learned).
_INVERSE_ITERATIONS = 64  # bisection steps of monotone_weight_inverse: the bracket shrinks by 2^-64


def monotone_weight_log(x: jax.Array, gamma, steps, knots, width) -> jax.Array:
    """``G(x) = log g(e^x) = gamma x + H(x)``, ``H(x) = sum_k a_k sigmoid((x - c_k) / w)``: ``[...]``.

    ``x: [...]`` the log bid in the family's unit; ``gamma > 0``; ``steps: [K]`` the heights ``a_k >= 0``
    of the steps at ``knots: [K]`` (``c_k``) of width ``width`` (``w > 0``). ``G`` is strictly increasing
    (``G' >= gamma``), ``gamma x <= G(x) <= gamma x + sum_k a_k``; ``steps = 0`` is the power ``s^gamma``.
    """
    x = jnp.asarray(x)
    knots = jnp.asarray(knots, x.dtype)
    steps = jnp.asarray(steps, x.dtype)
    return gamma * x + jnp.sum(steps * jax.nn.sigmoid((x[..., None] - knots) / width), axis=-1)


def _monotone_weight_slope(x: jax.Array, gamma, steps, knots, width) -> jax.Array:
    """``G'(x) = gamma + sum_k a_k sigmoid'((x - c_k) / w) / w >= gamma``: ``[...]``."""
    z = (x[..., None] - jnp.asarray(knots, x.dtype)) / width
    steps = jnp.asarray(steps, x.dtype)
    return gamma + jnp.sum(steps * jax.nn.sigmoid(z) * jax.nn.sigmoid(-z), axis=-1) / width


def monotone_weight_inverse(t: jax.Array, gamma, steps, knots, width) -> jax.Array:
    """``x = G^{-1}(t)`` (:func:`monotone_weight_log`): ``[...]``, differentiable in every argument.

    Bisection on the bracket ``[(t - sum_k a_k) / gamma, t / gamma]`` (``G`` is increasing with
    ``gamma x <= G(x) <= gamma x + sum_k a_k``), then one Newton step from the (stop-gradient) bisection
    result, which carries the implicit derivative ``dx = (dt - dG) / G'``.
    """
    t = jnp.asarray(t)
    steps = jnp.asarray(steps, t.dtype)
    total = jnp.sum(steps)
    start = jax.lax.stop_gradient((jnp.minimum(t, t - total) / gamma, t / gamma, t, gamma, steps, jnp.asarray(knots)))

    def halve(_, bracket):
        low, high = bracket
        middle = (low + high) / 2.0
        below = monotone_weight_log(middle, start[3], start[4], start[5], width) < start[2]
        return jnp.where(below, middle, low), jnp.where(below, high, middle)

    low, high = jax.lax.fori_loop(0, _INVERSE_ITERATIONS, halve, start[:2])
    x0 = jax.lax.stop_gradient((low + high) / 2.0)
    residual = monotone_weight_log(x0, gamma, steps, knots, width) - t
    return x0 - residual / _monotone_weight_slope(x0, gamma, steps, knots, width)


def monotone_weight_integral(own_log: jax.Array, others_log: jax.Array, gamma, steps, knots, width) -> jax.Array:
    """``Phi = int_{-inf}^{Y} e^{x(y) - X} sigma'(y) dy`` in ``[0, sigma(Y)]`` (docs/maths.md §5): ``[...]``.

    The robust second-price payment of ``q = sum_j lambda_j p_j``, ``lambda_j ∝ g(b_j / u)``
    (:func:`monotone_weight_log`, unit ``u``) is ``z_i = b_i TV(p_i, q_-i) Phi_i`` with ``X = log(b_i / u)``
    (``own_log``), ``log W = log sum_{j != i} g(b_j / u)`` (``others_log``), ``Y = G(X) - log W`` and
    ``x(y) = G^{-1}(y + log W)`` the log own bid at which the own weight's logit is ``y``. Every term is
    positive. The fixed rule of :func:`power_weight_integral` in ``tau = Y - y``, its first panel
    ``min(G'(X), 1) / 4`` long and its tail ``44 G'_max / (1 + G'_max)`` (``G'_max = gamma + sum_k a_k / (4 w)``:
    below ``min(Y, 0)`` the integrand falls at least like ``e^{(1 + 1/G'_max)(y - min(Y, 0))}``); ``steps = 0``
    gives the same nodes as ``Psi(Y, gamma)``. Measured accuracy: docs/maths.md §5.

    Args: ``own_log, others_log: [...]`` finite; ``gamma > 0``; ``steps: [K] >= 0``; ``knots``: K floats;
      ``width > 0`` (unchecked: call it through :class:`MonotoneWeightClosedForm`).
    """
    own_log, others_log = jnp.broadcast_arrays(jnp.asarray(own_log), jnp.asarray(others_log))
    logit = monotone_weight_log(own_log, gamma, steps, knots, width) - others_log
    slope = _monotone_weight_slope(own_log, gamma, steps, knots, width)
    steepest = gamma + jnp.sum(jnp.asarray(steps, own_log.dtype)) / (4.0 * width)  # max G' (sigmoid' <= 1/4)
    top = jnp.maximum(logit, 0.0)
    tail = jnp.full_like(top, _POWER_TAIL) * steepest / (1.0 + steepest)
    tau, weights = _graded_logit_nodes(top, jnp.minimum(slope, 1.0) / 4.0, tail)
    y = logit[..., None] - tau
    x = monotone_weight_inverse(y + others_log[..., None], gamma, steps, knots, width)
    log_sigma_prime = -jnp.abs(y) - 2.0 * jnp.log1p(jnp.exp(-jnp.abs(y)))
    exponent = jnp.minimum(x - own_log[..., None], 0.0) + log_sigma_prime  # x(y) <= X for y <= Y
    return jnp.sum(weights * jnp.exp(exponent), axis=-1)


@dataclasses.dataclass(frozen=True)
class MonotoneWeightClosedForm:
    """The robust second-price payment of ``q = sum_j lambda_j p_j``, ``lambda_j ∝ g(b_j / u)`` (docs/maths.md §5).

    ``g(s) = s^gamma exp(H(log s))`` (:func:`monotone_weight_log`), the unit ``u`` the bid of the last row
    (the base distribution: :class:`jaxauction.design.MonotoneWeightParams`). A
    :data:`~jaxauction.base.ClosedFormPayment` ``(logits [..., m, V], bids [..., m], n) -> [..., n]``:
    ``z_i = b_i TV(p_i, q_-i) Phi_i`` (:func:`monotone_weight_integral`), ``q_-i`` the others' mixture
    (base included); 0 for a zero bid or no other positive weight. Hashable by value when its fields are
    Python floats and tuples (:func:`jaxauction.design.fixed_rule`); arrays (traced parameters in a search
    step) work too. The rule depends on the bid ratios only (the unit is a row), so the payments are
    computed on normalised bids like every closed form. Costs the linear closed form's TV plus, per agent,
    200 nodes of a 64-step bisection over ``K`` knots (scalar work).
    """

    gamma: Any
    steps: Any
    knots: Any  # a tuple of floats (hashable) or an array (traced: the family's knots + its learned shift)
    width: float

    def log_weights(self, bids: jax.Array) -> jax.Array:
        """``G(log(b_j / u))``: ``[..., m]`` (``-inf`` for a zero bid), ``u = bids[..., -1]``."""
        positive = bids > 0
        unit = bids[..., -1:]
        x = jnp.log(jnp.where(positive, bids, 1.0)) - jnp.log(jnp.where(unit > 0, unit, jnp.nan))
        return jnp.where(positive, monotone_weight_log(x, self.gamma, self.steps, self.knots, self.width), -jnp.inf)

    def __call__(self, all_logits: jax.Array, all_bids: jax.Array, n: int) -> jax.Array:
        if n >= all_bids.shape[-1]:  # static: refused while tracing, never run
            raise ValueError(
                f"learned monotone weights: the payments need the base distribution as the last row (g sees bids in "
                f"units of the base bid); got {all_bids.shape[-1]} rows, all charged. Fix: pass base_logits= and "
                f"base_bid= (second_price, TokenAuction) or base_prompt= and base_bid= (generate)."
            )
        all_bids, others_bids, not_self = _others(all_logits, all_bids, n)
        eligible = not_self & aggregation._has_mass(all_logits)[..., None, :]
        scores = self.log_weights(all_bids)  # [..., m]
        others_scores = jnp.where(eligible & (others_bids > 0), scores[..., None, :], -jnp.inf)  # [..., n, m]
        log_total = jax.nn.logsumexp(others_scores, axis=-1)  # [..., n]
        own = all_bids[..., :n]
        pays = jnp.isfinite(log_total) & (own > 0)
        safe_total = jnp.where(pays, log_total, 0.0)
        weights = jnp.where(pays[..., None], jnp.exp(others_scores - safe_total[..., None]), 0.0)
        tv = _tv_to_others(all_logits, weights, n)
        unit = all_bids[..., -1:]
        own_log = jnp.log(jnp.where(pays, own, 1.0)) - jnp.log(jnp.where(unit > 0, unit, jnp.nan))
        own_log = jnp.where(pays, own_log, 0.0)
        phi = monotone_weight_integral(own_log, safe_total, self.gamma, self.steps, self.knots, self.width)
        return jnp.where(pays, own * tv * phi, 0.0)
