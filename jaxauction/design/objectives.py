"""Design objectives over a batch of auctions, jit-compiled and differentiable in the family parameters.

Each objective takes ``(params, batch: AuctionBatch)`` for the parameters of any registered family
(:mod:`jaxauction.design.base`: the power mean, the learned monotone family, a user's) and returns a
scalar: a mean over the ``A`` auctions of a sum over the ``n`` agents. The rule is the family's
``params -> Rule`` map (its closed-form payment, if any, is what :func:`revenue` charges). When the
batch has a base distribution it takes part in the rule as one more (last) agent with the family's base
bid (``params.base_bid``, docs/maths.md §1); it is never charged and has no value, so it is left out of
the sums.

* :func:`welfare`: bid-weighted welfare ``sum_i b_i v_i(q)`` under KL valuations (docs/maths.md §7):
  ``v_i = -KL(p_i || q)`` ("forward", the linear rule's) or ``-KL(q || p_i)`` ("reverse", the
  log-linear rule's). Bids are the agents' values (truthful bidding).
* :func:`revenue`: ``sum_i z_i``, expected payments of a payment kind (``"second_price"`` or ``"kl"``,
  :mod:`jaxauction.mechanism`'s vocabulary) computed by the core ``jaxauction.payments.second_price``
  (autodiff of the allocation in the own bid, and quadrature).
* :func:`violation`: ``sum_i`` of the core ``jaxauction.preferences.monotonicity_violation``
  (docs/maths.md §4), zero for a monotone rule.
* :func:`distance`: ``KL(q_ref || q)`` ("forward") or ``KL(q || q_ref)`` ("reverse") to a reference
  rule applied to the agents alone.
* :func:`certify_rule`: the strict monotonicity certificate (docs/maths.md §4) of a family member on a batch
  (use held-out auctions: a claim of monotonicity needs ``share == 1.0`` there).

The KL valuations have one home, :func:`jaxauction.payments.forward_kl_value` and
:func:`jaxauction.payments.reverse_kl_value`; :func:`kl_divergence` is ``-forward_kl_value``. Both
floor a zero probability in the second argument at the dtype's smallest normal number, so a token with
``q = 0`` that some agent gives positive probability costs a finite ``p_t * (log p_t - log tiny)``
(about ``87 p_t`` in float32) instead of ``+inf``. Inside jit nothing is validated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxauction import aggregation, base, mechanism, payments, preferences
from jaxauction.design.base import Family, family_of
from jaxauction.design.data import AuctionBatch
from jaxauction.design.families import fixed_rule

Rule = Callable[[jax.Array, jax.Array], jax.Array]

VALUATIONS = tuple(payments.KL_VALUATIONS)
"""The KL directions (``"forward"``, ``"reverse"``) that name the agents' valuation in :func:`welfare` and
:func:`revenue` (``payment="kl"``) and the divergence in :func:`distance`: not payment kinds."""


def kl_divergence(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """``KL(p || q) = sum_t p_t (log p_t - log q_t)`` over the last axis: ``-payments.forward_kl_value``.

    Terms with ``p_t = 0`` are 0; ``q_t = 0 < p_t`` counts ``q_t`` as the dtype's smallest normal
    number (finite, as in the payments' valuation: the two always agree).
    """
    return -payments.forward_kl_value(log_p, log_q)


def _family(params, batch, fn: str) -> Family:
    """The family of ``params`` (checked) and, for one that needs it, the batch's base distribution."""
    family = family_of(params, fn)
    if not isinstance(batch, AuctionBatch):  # a TypeError: search() explains data=None
        raise TypeError(
            f"{fn}: batch must be a jaxauction.design.AuctionBatch (design.make_batch, design.dirichlet_auctions), "
            f"got {type(batch).__name__}."
        )
    if family.needs_base and batch.base_logits is None:
        raise ValueError(
            f"{fn}: family {family.name!r} needs a base distribution (its bid is the unit of the bids); the batch "
            "has none. Fix: draw it with with_base=True or give make_batch base_logits."
        )
    return family


def augmented(params, batch: AuctionBatch) -> tuple[jax.Array, jax.Array]:
    """The batch with its base distribution as the last agent: ``[A, m, V]`` and ``[A, m]``."""
    family = _family(params, batch, "augmented")
    return aggregation.append_base(batch.logits, batch.bids, batch.base_logits, family.base_bid(params))


def rule_of(params, fn: str = "design") -> base.Rule:
    """The family's rule at ``params`` (concrete or traced; checked to be a :class:`jaxauction.base.Rule`)."""
    return family_of(params, fn).rule_of(params, fn)


def aggregate(params, batch: AuctionBatch) -> jax.Array:
    """``log q: [A, V]`` of the family's rule at ``params``, base included."""
    logits, bids = augmented(params, batch)
    return rule_of(params, "aggregate")(logits, bids)


@functools.partial(jax.jit, static_argnames="valuation")
def welfare(params, batch: AuctionBatch, valuation: str = "forward") -> jax.Array:
    """Mean over auctions of ``sum_i b_i v_i(q)`` with ``v_i = -KL(p_i || q)`` or ``-KL(q || p_i)``."""
    value = payments.kl_valuation(valuation)
    log_q = aggregate(params, batch)[..., None, :]
    log_p = jax.nn.log_softmax(batch.logits, axis=-1)
    log_q = jnp.broadcast_to(log_q, log_p.shape)
    return jnp.mean(jnp.sum(batch.bids * value(log_p, log_q), axis=-1))


@functools.partial(jax.jit, static_argnames=("payment", "valuation"))
def revenue(params, batch: AuctionBatch, payment: str = "second_price", valuation: str = "forward") -> jax.Array:
    """Mean over auctions of the agents' total expected payment (the base pays nothing).

    ``payment``: a payment kind that charges (:data:`jaxauction.mechanism.PAYMENTS`): ``"second_price"``
    (the robust allocation, docs/maths.md §5) or ``"kl"``: Myerson payments for the KL valuation
    ``valuation`` (docs/maths.md §7), ``"forward"`` (``-KL(p_i || q)``) or ``"reverse"``
    (``-KL(q || p_i)``); the family's rule carries no valuation of its own, so it is named here.
    """
    kind = mechanism.allocation(payment)
    if kind is None:
        raise ValueError("payment: revenue needs a payment kind that charges, 'second_price' or 'kl'; got None.")
    family = _family(params, batch, "revenue")
    charged = payments.second_price(
        family.rule_of(params, "revenue"),
        batch.logits,
        batch.bids,
        kind if kind != "kl" else payments.kl_valuation(valuation),
        base_logits=batch.base_logits,
        base_bid=family.base_bid(params),
    )
    return jnp.mean(jnp.sum(charged, axis=-1))


@jax.jit
def violation(params, batch: AuctionBatch) -> jax.Array:
    """Mean over auctions of ``sum_i`` monotonicity violation (docs/maths.md §4) of the agents (not the base)."""
    logits, bids = augmented(params, batch)
    per_agent = preferences.monotonicity_violation(rule_of(params, "violation"), logits, bids)
    return jnp.mean(jnp.sum(per_agent[..., : batch.num_agents], axis=-1))


@functools.partial(jax.jit, static_argnames=("reference", "direction"))
def distance(
    params,
    batch: AuctionBatch,
    reference: Rule = aggregation.linear,
    direction: str = "forward",
) -> jax.Array:
    """Mean over auctions of ``KL(q_ref || q)`` ("forward") or ``KL(q || q_ref)`` ("reverse").

    ``reference(batch.logits, batch.bids)`` sees the agents alone (no base distribution).
    """
    value = payments.kl_valuation(direction, argument="direction")
    log_q = aggregate(params, batch)
    log_reference = reference(batch.logits, batch.bids)
    return jnp.mean(-value(log_reference, log_q))


@jax.jit
def _all_objectives(params, batch: AuctionBatch) -> dict[str, jax.Array]:
    return {
        "revenue": revenue(params, batch),
        "welfare_forward": welfare(params, batch),
        "welfare_reverse": welfare(params, batch, valuation="reverse"),
        "violation": violation(params, batch),
    }


def evaluate(params, batch: AuctionBatch) -> dict[str, float]:
    """Revenue (robust), both welfares and the violation at ``params`` as plain floats (one program)."""
    return {name: float(value) for name, value in _all_objectives(params, batch).items()}


def certify_rule(
    params,
    batch: AuctionBatch,
    *,
    factors: tuple[float, ...] = preferences.DEFAULT_FACTORS,
    atol: float | None = None,
) -> preferences.Certificate:
    """The strict monotonicity certificate (docs/maths.md §4) of the member ``params`` (any family) on ``batch``.

    :func:`jaxauction.preferences.certify` on the batch's agents (the base distribution, if any,
    takes part with bid ``params.base_bid`` but is not checked). Pass held-out auctions (drawn with
    another seed than the search's): a rule is monotone there only if ``certificate.share == 1.0``.
    Repeated calls with equal parameters and shapes compile once.
    """
    logits, bids = augmented(params, batch)
    return preferences.certify(fixed_rule(params), logits, bids, factors=factors, atol=atol, n_checked=batch.num_agents)
