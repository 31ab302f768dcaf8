"""Robust preferences and the monotonicity of aggregation rules (SPEC §3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxauction import _validation, aggregation

__all__ = ["monotonicity_violation", "prefers"]


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
        atol = 16 * float(jnp.finfo(jnp.result_type(p, q_new, q_old)).eps)
    low = jnp.minimum(q_old, p) - atol
    high = jnp.maximum(q_old, p) + atol
    return jnp.all((q_new >= low) & (q_new <= high), axis=-1)


def monotonicity_violation(rule, logits: jax.Array, bids: jax.Array) -> jax.Array:
    """Differential monotonicity violation of ``rule`` for each agent (SPEC §3): ``[..., n] >= 0``.

    ``violation_i = sum_t max(0, -(p_i(t) - q_t) dq_t/db_i)``, with ``dq/db_i`` a forward-mode
    derivative (``jax.jvp``) in agent ``i``'s bid. Zero for every agent and every bid profile iff the
    rule is monotone. The unit is probability squared per unit of bid (it scales like ``1/sum b``).
    At ``b_i = 0`` the right-hand derivative is used.

    Args:
      rule: ``rule(logits [..., n, V], bids [..., n]) -> log q [..., V]``.
      logits: ``[..., n, V]``; bids: ``[..., n]``.
    """
    fn = "monotonicity_violation"
    _validation.check_rule(rule, fn)
    logits, bids = _validation.mechanism_inputs(fn, logits, bids)
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
