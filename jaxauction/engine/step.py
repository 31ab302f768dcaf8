"""The mechanism for one token of a batch of auctions: aggregate, charge, draw."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxauction import base, payments, sampling

__all__ = ["auction_step"]


def auction_step(logits, bids, key, *, rule: base.Rule, payment: str | None, decoding: str, num_charged: int):
    """One token of ``A`` auctions.

    Args:
      logits: ``[A, m, V]`` next-token logits of every row: the ``n = num_charged`` agents first,
        then the base row if ``m = n + 1``. An absent (padded) row has every logit ``-inf``.
      bids: ``[A, m]`` bids (the base row's fixed bid last; 0 for absent rows).
      key: ``[A]`` PRNG keys, one per auction.
      rule: aggregation rule ``(logits [..., m, V], bids [..., m]) -> log q [..., V]``.
      payment: ``"second_price"`` (robust allocation), ``"kl"`` or ``None``.
      decoding: ``"sample"``, ``"greedy"`` or ``"stable"`` (two agents, linear rule, no base row).
      num_charged: ``n``, the number of rows that pay (the base row never pays).

    Returns:
      ``(token [A], payments [A, n], ok [A])``: ``ok`` is False where ``q`` had a NaN or ``+inf``, no
      token with positive probability, or a payment was not finite (the caller flags the auction;
      its token and payments are then meaningless).
    """
    if decoding == "stable":
        token, charged = jax.vmap(sampling.stable_sample_two)(key, logits, bids)
        ok = jnp.all(~jnp.isnan(logits) & (logits < jnp.inf), axis=(-2, -1))
        return token, charged, ok & jnp.all(jnp.isfinite(charged), axis=-1)
    log_q = rule(logits, bids)
    ok = jnp.all(~jnp.isnan(log_q) & (log_q < jnp.inf), axis=-1) & jnp.any(log_q > -jnp.inf, axis=-1)
    if payment is None:
        charged = jnp.zeros(bids.shape[:-1] + (num_charged,), logits.dtype)
    else:
        allocation = "robust" if payment == "second_price" else "kl"
        charged = payments.charged_payments(rule, logits, bids, num_charged=num_charged, allocation=allocation)
        ok &= jnp.all(jnp.isfinite(charged), axis=-1)
    if decoding == "greedy":
        token = jnp.argmax(log_q, axis=-1)
    else:
        token = jax.vmap(jax.random.categorical)(key, log_q)
    return token, charged, ok
