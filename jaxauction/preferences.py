"""Robust preferences and the monotonicity of aggregation rules (docs/maths.md §4).

* :func:`prefers`: the robust order (``q'`` lies between ``q`` and ``p`` on every token).
* :func:`monotonicity_violation`: the smooth differential violation (a penalty for search).
* :func:`certify`: the strict check a monotonicity claim must pass (raise each bid by a few factors,
  test every token), returning a :class:`Certificate`.

Both array functions are jit-compiled at the public boundary with the rule as a static argument
(resolved by :func:`jaxauction.base.as_rule`, which gives a hashable :class:`~jaxauction.base.Rule`):
eager calls with the same rule and shapes compile once. Called inside a trace they inline.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxauction import _validation, aggregation, base

__all__ = ["Certificate", "certify", "monotonicity_violation", "prefers"]

DEFAULT_FACTORS = (1.01, 1.1, 2.0)


def _default_atol(dtype) -> float:
    return 16 * float(jnp.finfo(dtype).eps)


def prefers(p: jax.Array, q_new: jax.Array, q_old: jax.Array, *, atol: float | None = None) -> jax.Array:
    """Whether an agent with distribution ``p`` weakly prefers ``q_new`` to ``q_old`` (robust order).

    True iff for every token ``t``, ``q_new(t)`` lies between ``q_old(t)`` and ``p(t)`` (inclusive),
    up to the absolute tolerance ``atol``:
    ``min(q_old, p) - atol <= q_new <= max(q_old, p) + atol``.

    Args:
      p, q_new, q_old: probabilities (not log-probabilities), ``[..., V]``; leading axes broadcast.
      atol: absolute tolerance on each probability; default ``16 * eps`` of the dtype
        (about 1.9e-6 in float32, 3.6e-15 in float64).

    Returns:
      ``[...]`` booleans. Many pairs are incomparable (neither is preferred).
    """
    fn = "prefers"
    p = _validation.probabilities(fn, "p", p)
    q_new = _validation.probabilities(fn, "q_new", q_new)
    q_old = _validation.probabilities(fn, "q_old", q_old)
    if not (p.shape[-1] == q_new.shape[-1] == q_old.shape[-1]):
        raise ValueError(
            f"{fn}: p, q_new, q_old must share the vocabulary axis; got shapes {p.shape}, {q_new.shape}, {q_old.shape}."
        )
    if atol is None:
        atol = _default_atol(jnp.result_type(p, q_new, q_old))
    return _between_excess(p, q_new, q_old) <= atol


def _between_excess(p: jax.Array, q_new: jax.Array, q_old: jax.Array) -> jax.Array:
    """``max_t`` of how far ``q_new(t)`` lies outside ``[min(q_old, p), max(q_old, p)]``: ``[...] >= 0`` (NaN kept)."""
    low = jnp.minimum(q_old, p)
    high = jnp.maximum(q_old, p)
    excess = jnp.maximum(jnp.maximum(low - q_new, q_new - high), 0.0)
    excess = jnp.where(jnp.isnan(q_new) | jnp.isnan(q_old), jnp.nan, excess)  # maximum(nan, 0) keeps NaN
    return jnp.max(excess, axis=-1)


def _hashable(rule) -> bool:
    try:
        hash(rule)
    except TypeError:
        return False
    return True


def monotonicity_violation(rule, logits: jax.Array, bids: jax.Array) -> jax.Array:
    """Differential monotonicity violation of ``rule`` for each agent (docs/maths.md §4): ``[..., n] >= 0``.

    ``violation_i = sum_t max(0, -(p_i(t) - q_t) dq_t/db_i)``, with ``dq/db_i`` a forward-mode
    derivative (``jax.jvp``) in agent ``i``'s bid. Zero for every agent and every bid profile iff the
    rule is monotone. The unit is probability squared per unit of bid (it scales like ``1/sum b``).
    At ``b_i = 0`` the right-hand derivative is used. A smooth penalty for search, not a certificate
    (use :func:`certify` for a claim).

    Args:
      rule: a name, a :class:`~jaxauction.base.Rule` or ``rule(logits [..., n, V], bids [..., n]) -> log q [..., V]``.
      logits: ``[..., n, V]``; bids: ``[..., n]``.

    Eager calls are compiled once per (rule, shapes, dtypes): pass the same rule object (a name, a
    :class:`~jaxauction.base.Rule` or one function), since a new closure per call compiles anew; an
    unhashable callable runs op by op. Inside ``jit`` it inlines, nothing is validated and NaN inputs
    give NaN violations.
    """
    fn = "monotonicity_violation"
    rule = base.as_rule(rule, argument=f"{fn}: rule")
    logits, bids = _validation.mechanism_inputs(fn, logits, bids)
    if not _validation.is_concrete(logits, bids) or not _hashable(rule):
        return _violation(rule, logits, bids)
    return _violation_jit(rule, logits, bids)


def _violation(rule, logits, bids):
    n = bids.shape[-1]
    p = jnp.exp(aggregation.agent_log_probs(logits))

    def violation(i):
        direction = jnp.broadcast_to(jnp.arange(n) == i, bids.shape).astype(bids.dtype)
        log_q, dlog_q = jax.jvp(lambda b: rule(logits, b), (bids,), (direction,))
        q = jnp.exp(log_q)
        dq = jnp.where(q > 0, q * dlog_q, 0.0)
        p_i = jnp.take(p, i, axis=-2)
        return jnp.sum(jnp.maximum(0.0, -(p_i - q) * dq), axis=-1)

    return jnp.moveaxis(jax.vmap(violation)(jnp.arange(n)), 0, -1)


_violation_jit = jax.jit(_violation, static_argnums=0)


@dataclasses.dataclass(frozen=True)
class Certificate:
    """The strict monotonicity check of a rule on a set of auctions (docs/maths.md §4).

    Attributes:
      passed: ``[..., n]`` bools: agent ``i`` of an auction passes iff for every factor ``f`` the
        outcome at bid ``f b_i`` (others fixed) is weakly preferred by agent ``i`` to the outcome at
        ``b_i``, on every token, up to ``atol``.
      excess: ``[..., n]``: the largest amount (probability units, over factors and tokens) by which
        the raised-bid outcome leaves the interval between the old outcome and ``p_i``; 0 if inside.
      share: the fraction of (auction, agent) pairs that pass (1.0: monotone on these auctions).
      worst: ``max excess`` over all pairs (NaN if some outcome was NaN).
      factors: the bid factors tested; atol: the tolerance used.
    """

    passed: np.ndarray
    excess: np.ndarray
    share: float
    worst: float
    factors: tuple[float, ...]
    atol: float

    @property
    def monotone(self) -> bool:
        """True iff every (auction, agent) pair passed (``share == 1.0``)."""
        return self.share == 1.0

    def to_dict(self) -> dict[str, float]:
        """``share``, ``worst``, ``pairs``, ``factors`` and ``atol`` as plain values (for JSON and tables)."""
        return dict(
            share=self.share,
            worst=self.worst,
            pairs=int(self.passed.size),
            monotone=self.monotone,
            factors=list(self.factors),
            atol=self.atol,
        )


def certify(
    rule,
    logits: jax.Array,
    bids: jax.Array,
    *,
    factors: tuple[float, ...] = DEFAULT_FACTORS,
    atol: float | None = None,
    n_checked: int | None = None,
) -> Certificate:
    """The strict monotonicity check of docs/maths.md §4: raise each bid by each factor and test every token.

    For every auction, agent ``i`` (of the first ``n_checked``) and factor ``f > 1``, with ``q`` the
    outcome at ``bids`` and ``q'`` the outcome with ``b_i`` replaced by ``f b_i``, the agent passes iff
    ``min(q, p_i) - atol <= q' <= max(q, p_i) + atol`` on every token (``p_i = softmax(logits_i)``).
    A rule is monotone on these auctions iff ``share == 1.0``. A zero bid stays zero when scaled, so
    such an agent passes trivially.

    Args:
      rule: a name, a :class:`~jaxauction.base.Rule` or ``rule(logits, bids) -> log q [..., V]``.
      logits: ``[..., n, V]``; bids: ``[..., n]`` (validated: finite logits or ``-inf``, bids >= 0).
      factors: bid factors, each finite and > 1; default ``(1.01, 1.1, 2.0)``.
      atol: tolerance on each probability; default ``16 * eps`` of the dtype (float rounding only:
        1.9e-6 in float32, 3.6e-15 in float64).
      n_checked: check only the first ``n_checked`` agents (the later rows, e.g. a base distribution,
        take part in the rule but bid no money); default all ``n``.

    Returns:
      A :class:`Certificate` (host values; computed by one compiled program per rule, shapes and
      factors: repeated eager calls do not recompile). A NaN outcome fails its pair.
    """
    fn = "certify"
    rule = base.as_rule(rule, argument=f"{fn}: rule")
    logits, bids = _validation.mechanism_inputs(fn, logits, bids)
    if not _validation.is_concrete(logits, bids):
        raise ValueError(f"{fn}: needs concrete arrays (it returns host values); call it outside jax.jit.")
    try:
        factors = tuple(float(f) for f in factors)
    except (TypeError, ValueError):
        raise ValueError(
            f"{fn}: factors must be a sequence of numbers > 1, e.g. (1.01, 1.1, 2.0); got {factors!r}."
        ) from None
    if not factors or not all(np.isfinite(f) and f > 1 for f in factors):
        raise ValueError(f"{fn}: factors must be a non-empty sequence of finite numbers > 1; got {factors!r}.")
    n = bids.shape[-1]
    if n_checked is None:
        n_checked = n
    if isinstance(n_checked, bool) or not isinstance(n_checked, (int, np.integer)) or not 1 <= n_checked <= n:
        raise ValueError(f"{fn}: n_checked must be an int in [1, {n}] (the number of agents); got {n_checked!r}.")
    scaled_max = float(jnp.max(bids)) * max(factors) if bids.size else 0.0
    if not scaled_max <= float(jnp.finfo(bids.dtype).max):
        raise ValueError(
            f"{fn}: the largest bid times the largest factor overflows {bids.dtype}; rescale the bids "
            "(only their ratios matter) or use smaller factors."
        )
    if atol is None:
        atol = _default_atol(bids.dtype)
    if not (np.isfinite(atol) and atol >= 0):
        raise ValueError(f"{fn}: atol must be a finite number >= 0; got {atol!r}.")
    compute = _certify_excess_jit if _hashable(rule) else _certify_excess
    excess = np.asarray(compute(rule, logits, bids, factors, int(n_checked)))
    passed = excess <= atol  # NaN fails
    return Certificate(
        passed=passed,
        excess=excess,
        share=float(np.mean(passed)),
        worst=float(np.max(excess)),
        factors=factors,
        atol=float(atol),
    )


def _certify_excess(rule, logits, bids, factors, n_checked):
    """``[..., n_checked]``: the largest excess over factors and tokens for each agent."""
    n = bids.shape[-1]
    p = jnp.exp(aggregation.agent_log_probs(logits))
    q_old = jnp.exp(rule(logits, bids))

    def one(factor, i):
        scale = jnp.where(jnp.arange(n) == i, factor, 1.0).astype(bids.dtype)
        q_new = jnp.exp(rule(logits, bids * scale))
        return _between_excess(jnp.take(p, i, axis=-2), q_new, q_old)

    factor_array = jnp.asarray(factors, bids.dtype)
    per = jax.vmap(lambda i: jax.vmap(lambda f: one(f, i))(factor_array))(jnp.arange(n_checked))  # [k, F, ...]
    per = jnp.max(per, axis=1)
    return jnp.moveaxis(per, 0, -1)


_certify_excess_jit = jax.jit(_certify_excess, static_argnums=(0, 3, 4))
