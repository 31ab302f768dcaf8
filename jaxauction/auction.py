"""A token auction as one object: aggregation rule, payment rule, optional base distribution."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxauction import _validation, aggregation, base, payments, rules

__all__ = ["PAYMENT_KINDS", "AuctionOutcome", "TokenAuction", "payment_allocation"]

PAYMENT_KINDS = {"second_price": "robust", "kl": "kl", None: None}
"""The payment kinds of a :class:`TokenAuction` and the allocation each charges for (docs/maths.md §5, §5):
``"second_price"`` the robust allocation, ``"kl"`` Myerson payments for the rule's KL valuation,
``None`` no payments."""


def payment_allocation(payment: Any, argument: str = "payment") -> str | None:
    """The allocation (``"robust"``, ``"kl"`` or None) of a payment kind; ``ValueError`` for any other kind."""
    if isinstance(payment, (str, type(None))) and payment in PAYMENT_KINDS:
        return PAYMENT_KINDS[payment]
    raise ValueError(
        f"{argument}: expected one of {list(PAYMENT_KINDS)} ('second_price': robust second-price payments, "
        f"'kl': Myerson payments for KL valuations, None: no payments); got {payment!r}."
    )


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
    """Mechanism = aggregation rule + payment rule + optional base distribution (docs/maths.md §1).

    A pytree: ``base_logits`` and ``base_bid`` are leaves (they can be traced, batched with
    ``vmap`` and differentiated); ``rule``, ``payment`` and ``quadrature`` are static.

    Attributes:
      rule: a rule name (``"linear"``), a :class:`jaxauction.base.Rule` or a function
        ``rule(logits [..., m, V], bids [..., m]) -> log q [..., V]`` (resolved with
        :func:`jaxauction.base.as_rule`); default the linear rule.
      payment: a key of :data:`PAYMENT_KINDS`: ``"second_price"`` (robust allocation, docs/maths.md §5),
        ``"kl"`` (Myerson payments for the rule's KL valuation, docs/maths.md §7) or ``None`` (all zero).
      base_logits: optional ``[..., V]`` base (platform) distribution; takes part in ``q`` with
        ``base_bid`` and counts in every agent's competing bid ``B``, but is never charged.
      base_bid: ``[...]`` or scalar, non-negative.
      quadrature: integration rule for the payments.

    Calling ``auction(logits [..., n, V], bids [..., n])`` returns an :class:`AuctionOutcome`. Eager
    calls run one compiled function per shapes (no recompilation on a second call). Under ``jit`` an
    auction with a NaN or infinite bid or a NaN or ``+inf`` logit gets NaN ``log_q`` and payments.
    """

    rule: Any = dataclasses.field(default=rules.linear, metadata=dict(static=True))
    payment: str | None = dataclasses.field(default="second_price", metadata=dict(static=True))
    base_logits: jax.Array | None = None
    base_bid: jax.Array | float = 0.0
    quadrature: payments.Quadrature = dataclasses.field(default=payments.Quadrature(), metadata=dict(static=True))

    def __call__(self, logits: jax.Array, bids: jax.Array) -> AuctionOutcome:
        fn = "TokenAuction"
        rule = base.as_rule(self.rule, argument=f"{fn}: rule")
        allocation = payment_allocation(self.payment, f"{fn}: payment")
        logits, bids = _validation.mechanism_inputs(fn, logits, bids)
        base_logits, base_bid = _validation.base_inputs(fn, logits, self.base_logits, self.base_bid)
        arrays = (logits, bids, base_logits, base_bid)
        entry = _outcome_jit if _validation.is_concrete(*arrays) else _outcome
        return entry(rule, allocation, self.quadrature, *arrays)


def _outcome(rule, allocation, quadrature, logits, bids, base_logits, base_bid) -> AuctionOutcome:
    all_logits, all_bids = aggregation.append_base(logits, bids, base_logits, base_bid)
    n = bids.shape[-1]
    lead = jnp.broadcast_shapes(all_logits.shape[:-2], all_bids.shape[:-1])
    log_q = rule(all_logits, all_bids)
    if allocation is None:
        z = jnp.zeros(lead + (n,), log_q.dtype)
    else:
        z = payments.charged_payments(
            rule, all_logits, all_bids, num_charged=n, allocation=allocation, quadrature=quadrature
        )
    invalid = aggregation.invalid_auctions(all_logits, all_bids)
    log_q = jnp.where(invalid[..., None], jnp.nan, log_q)
    z = jnp.where(invalid[..., None], jnp.nan, z)
    return AuctionOutcome(log_q=log_q, payments=z)


_outcome_jit = jax.jit(_outcome, static_argnums=(0, 1, 2))
