"""The mechanism for one token of a batch of auctions: aggregate, charge, draw."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxauction import aggregation, payments, sampling
from jaxauction.auction import token_outcome
from jaxauction.mechanism import MechanismSpec

__all__ = ["auction_step"]

_QUADRATURE = payments.Quadrature()


def auction_step(logits, bids, key, *, mechanism: MechanismSpec, num_charged: int):
    """One token of ``A`` auctions: :func:`jaxauction.auction.token_outcome` (what :class:`TokenAuction`
    runs), then the draw of ``mechanism.decoding``.

    Args:
      logits: ``[A, m, V]`` next-token logits of every row (the temperature already applied): the
        ``n = num_charged`` agents first, then the base row if ``m = n + 1``. An absent (padded) row
        has every logit ``-inf``.
      bids: ``[A, m]`` bids (the base row's fixed bid last; 0 for absent rows).
      key: ``[A]`` PRNG keys, one per auction.
      mechanism: the rule, payment kind and decoding (its temperature is not used here).
        ``"stable"`` (two agents, linear rule, no base row) draws with docs/maths.md §5's sampler and
        charges the realized threshold payments instead.
      num_charged: ``n``, the number of rows that pay (the base row never pays).

    Returns:
      ``(token [A], payments [A, n], ok [A])``: ``ok`` as :func:`~jaxauction.auction.token_outcome`
      defines it (False for NaN or infinite bids, NaN or ``+inf`` logits, a ``q`` with NaN, ``+inf``
      or no token of positive probability, a payment that is not finite); the caller flags such an
      auction, whose token and payments are then meaningless.
    """
    if mechanism.decoding == "stable":
        token, charged = jax.vmap(sampling.stable_sample_two)(key, logits, bids)
        ok = ~aggregation.invalid_auctions(logits, bids)
        return token, charged, ok & jnp.all(jnp.isfinite(charged), axis=-1)
    log_q, charged, ok = token_outcome(mechanism.rule, mechanism.allocation, _QUADRATURE, logits, bids, num_charged)
    if mechanism.decoding == "greedy":
        token = jnp.argmax(log_q, axis=-1)
    else:
        token = jax.vmap(jax.random.categorical)(key, log_q)
    return token, charged, ok
