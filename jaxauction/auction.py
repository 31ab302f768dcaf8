"""A token auction as one object: aggregation rule, payment rule, optional base distribution."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxauction import _validation, aggregation, payments

__all__ = ["TokenAuction", "AuctionOutcome"]

PAYMENT_KINDS = ("second_price", "kl", None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AuctionOutcome:
    """Result of one token auction (a pytree).

    log_q: ``[..., V]`` normalised log-probabilities of the next token.
    payments: ``[..., n]`` expected payment of each agent for this token (the base is never charged).
    """

    log_q: jax.Array
    payments: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenAuction:
    """Mechanism = aggregation rule + payment rule + optional base distribution (SPEC §1).

    A pytree: ``base_logits`` and ``base_bid`` are leaves (they can be traced, batched with
    ``vmap`` and differentiated); ``rule``, ``payment`` and ``quadrature`` are static.

    Attributes:
      rule: ``rule(logits [..., m, V], bids [..., m]) -> log q [..., V]``; default the linear rule.
      payment: ``"second_price"`` (robust allocation, SPEC §4), ``"kl"`` (Myerson payments for KL
        valuations, SPEC §5; linear and log-linear rules only) or ``None`` (all payments zero).
      base_logits: optional ``[..., V]`` base (platform) distribution; takes part in ``q`` with
        ``base_bid`` and counts in every agent's competing bid ``B``, but is never charged.
      base_bid: ``[...]`` or scalar, non-negative.
      quadrature: integration rule for the payments.

    Calling ``auction(logits [..., n, V], bids [..., n])`` returns an :class:`AuctionOutcome`.
    """

    rule: Callable = dataclasses.field(default=aggregation.linear, metadata=dict(static=True))
    payment: str | None = dataclasses.field(default="second_price", metadata=dict(static=True))
    base_logits: jax.Array | None = None
    base_bid: jax.Array | float = 0.0
    quadrature: payments.Quadrature = dataclasses.field(default=payments.Quadrature(), metadata=dict(static=True))

    def __call__(self, logits: jax.Array, bids: jax.Array) -> AuctionOutcome:
        fn = "TokenAuction"
        _validation.check_rule(self.rule, fn)
        _validation.choice(fn, "payment", self.payment, PAYMENT_KINDS)
        logits, bids = _validation.mechanism_inputs(fn, logits, bids)
        base_logits, base_bid = _validation.base_inputs(fn, logits, self.base_logits, self.base_bid)
        all_logits, all_bids = aggregation.append_base(logits, bids, base_logits, base_bid)
        log_q = self.rule(all_logits, all_bids)
        n = bids.shape[-1]
        if self.payment is None:
            lead = jnp.broadcast_shapes(all_logits.shape[:-2], all_bids.shape[:-1])
            z = jnp.zeros(lead + (n,), logits.dtype)
        else:
            allocation = "robust" if self.payment == "second_price" else "kl"
            z = payments.charged_payments(
                self.rule, all_logits, all_bids, num_charged=n, allocation=allocation, quadrature=self.quadrature
            )
        return AuctionOutcome(log_q=log_q, payments=z)
