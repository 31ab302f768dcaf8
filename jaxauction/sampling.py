"""Stable sampling with realized threshold payments: two agents, linear rule (docs/maths.md §5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxauction import _validation, aggregation

__all__ = ["stable_sample_two"]


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def stable_sample_two(key: jax.Array, logits: jax.Array, bids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Draw one token from the linear aggregate of two agents, with realized threshold payments.

    With ``alpha = b_1/(b_1 + b_2)``, ``d = p_1 - p_2``, ``TV = sum d+``: draw ``X ~ p_2``,
    ``U ~ U[0, 1]``, ``Y ~ d+/TV``; output ``Y`` if ``U < alpha d-(X)/p_2(X)``, else ``X``. The output
    has law ``q = alpha p_1 + (1 - alpha) p_2``, and for fixed randomness it only switches from a
    token agent 1 pushes down to one it pushes up as ``b_1`` rises (the reverse as ``b_2`` rises).
    With ``alpha* = U p_2(X)/d-(X)``: if the output is ``Y``, agent 1 pays ``b_2 alpha*/(1 - alpha*)``;
    if the output is ``X`` and ``alpha* < 1``, agent 2 pays ``b_1 (1 - alpha*)/alpha*``; else nobody
    pays. The mean payments equal :func:`jaxauction.payments.linear_closed_form`.

    Args:
      key: a PRNG key; one key draws every auction of the leading axes (independently).
      logits: ``[..., 2, V]``; bids: ``[..., 2]``. All bids zero: ``alpha = 1/2`` and no payments.

    Returns:
      ``token: [...]`` (int32) and realized ``payments: [..., 2]``.
    """
    logits, bids = _validation.mechanism_inputs("stable_sample_two", logits, bids, n_agents=2)
    return _stable_sample_two(key, logits, bids)


@jax.jit
def _stable_sample_two(key: jax.Array, logits: jax.Array, bids: jax.Array) -> tuple[jax.Array, jax.Array]:
    lead = jnp.broadcast_shapes(logits.shape[:-2], bids.shape[:-1])
    log_p = jnp.broadcast_to(aggregation.agent_log_probs(logits), lead + logits.shape[-2:])
    bids = jnp.broadcast_to(aggregation.effective_bids(logits, bids), lead + (2,))
    alpha = aggregation.bid_weights(logits, bids)[..., 0]
    b1, b2 = bids[..., 0], bids[..., 1]
    log_p1, log_p2 = log_p[..., 0, :], log_p[..., 1, :]
    p1, p2 = jnp.exp(log_p1), jnp.exp(log_p2)
    d = p1 - p2
    d_plus, d_minus = jnp.maximum(d, 0.0), jnp.maximum(-d, 0.0)
    has_plus = jnp.any(d_plus > 0, axis=-1, keepdims=True)

    key_x, key_u, key_y = jax.random.split(key, 3)
    x = jax.random.categorical(key_x, log_p2, axis=-1)
    y = jax.random.categorical(key_y, jnp.where(has_plus, aggregation.safe_log(d_plus), 0.0), axis=-1)
    u = jax.random.uniform(key_u, lead, dtype=log_p.dtype)

    take = lambda a: jnp.take_along_axis(a, x[..., None], axis=-1)[..., 0]
    ratio = _safe_div(take(d_minus), take(p2))  # d-(X)/p2(X) in [0, 1]
    output_y = u < alpha * ratio
    token = jnp.where(output_y, y, x).astype(jnp.int32)

    alpha_star = jnp.where(ratio > 0, u / jnp.where(ratio > 0, ratio, 1.0), jnp.inf)
    pay_1 = jnp.where(output_y, b2 * _safe_div(alpha_star, 1.0 - alpha_star), 0.0)
    threshold_2 = alpha_star < 1
    threshold_ratio = _safe_div(1.0 - alpha_star, jnp.where(threshold_2, alpha_star, 1.0))
    pay_2 = jnp.where(~output_y & threshold_2, b1 * threshold_ratio, 0.0)
    return token, jnp.stack([pay_1, pay_2], axis=-1)
