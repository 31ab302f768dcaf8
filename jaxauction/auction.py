"""A token auction as one object: aggregation rule, payment rule, optional base distribution."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxauction import _validation, aggregation, payments, rules
from jaxauction.mechanism import MechanismSpec, SpecError

__all__ = ["AuctionOutcome", "TokenAuction", "token_outcome"]


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
      payment: a payment kind (:data:`jaxauction.mechanism.PAYMENTS`): ``"second_price"`` (robust
        allocation, docs/maths.md §5), ``"kl"`` (Myerson payments for the rule's KL valuation,
        docs/maths.md §7) or ``None`` (all zero).
      base_logits: optional ``[..., V]`` base (platform) distribution; takes part in ``q`` with
        ``base_bid`` and counts in every agent's competing bid ``B``, but is never charged.
      base_bid: ``[...]`` or scalar, non-negative.
      quadrature: integration rule for the payments.

    Calling ``auction(logits [..., n, V], bids [..., n])`` returns an :class:`AuctionOutcome`. The
    rule and payment are checked as :meth:`jaxauction.mechanism.MechanismSpec.create` checks them
    (the same messages as ``generate``, prefixed ``TokenAuction:``). Eager calls run one compiled
    function per shapes (no recompilation on a second call). It runs :func:`token_outcome`, the
    engine's per-token step: under ``jit`` an auction that is not ``ok`` there (a NaN or infinite
    bid, a NaN or ``+inf`` logit, a rule giving NaN or ``+inf`` or no token with positive
    probability, a payment that is not finite) gets NaN ``log_q`` and payments.
    """

    rule: Any = dataclasses.field(default=rules.linear, metadata=dict(static=True))
    payment: str | None = dataclasses.field(default="second_price", metadata=dict(static=True))
    base_logits: jax.Array | None = None
    base_bid: jax.Array | float = 0.0
    quadrature: payments.Quadrature = dataclasses.field(default=payments.Quadrature(), metadata=dict(static=True))

    def __call__(self, logits: jax.Array, bids: jax.Array) -> AuctionOutcome:
        fn = "TokenAuction"
        try:
            spec = MechanismSpec.create(rule=self.rule, payment=self.payment)
        except SpecError as error:
            raise ValueError(f"{fn}: {error}") from None
        payments._check_method(fn, "auto", self.quadrature)  # the quadrature's check, named for this door
        if self.base_logits is None and _validation.is_concrete(self.base_bid):  # a base bid alone is ignored
            _validation.check_base_pair(None, self.base_bid, base_field="base_logits", fn=f"{fn}: ")
        logits, bids = _validation.mechanism_inputs(fn, logits, bids)
        base_logits, base_bid = _validation.base_inputs(fn, logits, self.base_logits, self.base_bid)
        arrays = (logits, bids, base_logits, base_bid)
        entry = _outcome_jit if _validation.is_concrete(*arrays) else _outcome
        return entry(spec.rule, spec.allocation, self.quadrature, *arrays)


def token_outcome(rule, allocation, quadrature, logits, bids, num_charged: int):
    """The mechanism for one token: ``(log_q [..., V], payments [..., n], ok [...])``.

    The one per-token step of :class:`TokenAuction` and of the engine
    (:func:`jaxauction.engine.step.auction_step`). Traceable, nothing checked on the host.

    Args:
      rule: a resolved :class:`jaxauction.base.Rule`. allocation: ``"robust"``, ``"kl"`` or None (no
        payments): :func:`jaxauction.mechanism.allocation` of the payment kind. quadrature: for the
        payments.
      logits: ``[..., m, V]`` every row's logits, the ``n = num_charged`` charged agents first (then a
        base row, never charged); an absent row has every logit ``-inf`` and bid 0.
      bids: ``[..., m]``.

    Returns:
      ``log_q`` the aggregate, ``payments`` the charged agents' expected payments (0 without a payment
      kind) and ``ok``: False for an auction with a NaN or infinite bid or a NaN or ``+inf`` logit,
      a ``log_q`` with a NaN or ``+inf`` or no token of positive probability, or a payment that is not
      finite. Where ``ok`` is False ``log_q`` and the payments are meaningless: :class:`TokenAuction`
      sets them to NaN, the engine stops that auction and flags it invalid.
    """
    log_q = rule(logits, bids)
    if allocation is None:
        lead = jnp.broadcast_shapes(logits.shape[:-2], bids.shape[:-1])
        charged = jnp.zeros(lead + (num_charged,), log_q.dtype)
    else:
        charged = payments.charged_payments(
            rule, logits, bids, num_charged=num_charged, allocation=allocation, quadrature=quadrature
        )
    ok = ~aggregation.invalid_auctions(logits, bids)
    ok &= jnp.all(~jnp.isnan(log_q) & (log_q < jnp.inf), axis=-1) & jnp.any(log_q > -jnp.inf, axis=-1)
    return log_q, charged, ok & jnp.all(jnp.isfinite(charged), axis=-1)


def _outcome(rule, allocation, quadrature, logits, bids, base_logits, base_bid) -> AuctionOutcome:
    all_logits, all_bids = aggregation.append_base(logits, bids, base_logits, base_bid)
    log_q, charged, ok = token_outcome(rule, allocation, quadrature, all_logits, all_bids, bids.shape[-1])
    return AuctionOutcome(
        log_q=jnp.where(ok[..., None], log_q, jnp.nan), payments=jnp.where(ok[..., None], charged, jnp.nan)
    )


_outcome_jit = jax.jit(_outcome, static_argnums=(0, 1, 2))
