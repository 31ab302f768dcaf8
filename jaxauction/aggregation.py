"""Aggregation rules: bids and the agents' next-token distributions in, one distribution out.

Shapes: ``logits: [..., n, V]`` (unnormalised, ``-inf`` marks a masked token), ``bids: [..., n]``
(non-negative); leading axes broadcast. Both rules return normalised log-probabilities
``log q: [..., V]`` and depend on the bids only through the weights ``lambda_i = b_i / sum_j b_j``.

Conventions shared by every rule here (docs/maths.md §2):

* An agent with ``lambda_i = 0`` has no effect at all, even on tokens it masks with ``-inf``.
* All bids zero: every agent gets the same weight ``1/n`` (the outcome is then the rule applied with
  equal bids). The second-price payments are all zero in that case (every agent is a lone bidder).
* Under ``jit`` values are not checked (outside ``jit`` bad values raise ``ValueError``): a negative
  bid is treated as 0, an agent whose logits are ``-inf`` everywhere is treated as bidding 0, and NaN
  (or ``+inf``) in the logits and NaN or infinite bids give NaN for that auction
  (:func:`invalid_auctions` marks them).
* Derivatives in a bid at ``b_i = 0`` are the right-hand derivatives (for the log-linear rule without
  the jump at ``b_i = 0`` that removes the tokens agent ``i`` masks).
* float32 by default; float64 when ``jax_enable_x64`` is on and the inputs are float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxauction import _validation

__all__ = [
    "linear",
    "log_linear",
    "linear_probabilities",
    "agent_log_probs",
    "effective_bids",
    "bid_weights",
    "log_bid_weights",
    "weighted_sum",
    "append_base",
    "invalid_auctions",
]


def safe_log(x: jax.Array) -> jax.Array:
    """``log x`` for ``x >= 0`` with ``log 0 = -inf`` and zero (not NaN) gradients at 0; NaN stays NaN."""
    positive = x > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, x, 1.0)), jnp.where(jnp.isnan(x), jnp.nan, -jnp.inf))


def _has_mass(logits: jax.Array) -> jax.Array:
    """``[..., n]``: True where the agent allows at least one token (or has a NaN logit, which propagates)."""
    return ~(jnp.max(logits, axis=-1) == -jnp.inf)


def invalid_auctions(logits: jax.Array, bids: jax.Array) -> jax.Array:
    """``[...]``: True for an auction with a NaN or infinite bid, or a NaN or ``+inf`` logit.

    ``logits: [..., n, V]``, ``bids: [..., n]``. Traceable: under ``jit``, where values cannot be
    rejected, the mechanism's outputs for such an auction are set to NaN (never a silent 0).
    """
    bad_logits = jnp.any(jnp.isnan(logits) | (logits == jnp.inf), axis=(-2, -1))
    bad_bids = jnp.any(~jnp.isfinite(bids), axis=-1)
    return bad_logits | bad_bids


def agent_log_probs(logits: jax.Array) -> jax.Array:
    """``log p_i = log_softmax(l_i)``: ``[..., n, V] -> [..., n, V]``.

    A row of all ``-inf`` (invalid outside ``jit``) gives a row of ``-inf`` instead of NaN.
    """
    # log_softmax written out around one max (also the mass test): about 2x faster on XLA:CPU than
    # masking the input of jax.nn.log_softmax, which takes the max again.
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    has_mass = ~(top == -jnp.inf)  # a NaN logit propagates
    top = jnp.where(has_mass, top, 0.0)
    log_normaliser = jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True)) + top
    return jnp.where(has_mass, logits - log_normaliser, -jnp.inf)


def effective_bids(logits: jax.Array, bids: jax.Array) -> jax.Array:
    """Bids as the rules use them: negative bids and agents without any allowed token count as 0.

    ``logits: [..., n, V]``, ``bids: [..., n]`` -> ``[...broadcast, n]``. A NaN bid stays NaN.
    """
    return jnp.where((_has_mass(logits) & (bids >= 0)) | jnp.isnan(bids), bids, 0.0)


def bid_weights(logits: jax.Array, bids: jax.Array) -> jax.Array:
    """``lambda = b / sum b``: ``[..., n]``; equal weights (over agents with a token) if all bids are 0."""
    has_mass = _has_mass(logits)
    bids = effective_bids(logits, bids)
    total = jnp.sum(bids, axis=-1, keepdims=True)
    positive = (total > 0) | jnp.isnan(total)  # a NaN or infinite bid gives NaN weights, not equal ones
    count = jnp.maximum(jnp.sum(has_mass, axis=-1, keepdims=True), 1).astype(bids.dtype)
    equal = jnp.broadcast_to(has_mass / count, bids.shape)
    return jnp.where(positive, bids / jnp.where(positive, total, 1.0), equal)


@jax.jit
def log_bid_weights(bids: jax.Array, gamma: jax.Array | float = 1.0, eligible: jax.Array | None = None) -> jax.Array:
    """``log lambda: [..., n]`` with ``lambda_i = b_i**gamma / sum_j b_j**gamma`` (the power-mean family's bid
    transform, docs/maths.md §3; ``gamma = 1`` gives :func:`bid_weights` in log space).

    Zero bids get ``-inf``. If every bid is zero, the ``eligible`` agents (default: all) get equal
    weights, as in the core rules. Gradients in ``bids`` and ``gamma`` are finite (zero bids
    contribute none).
    """
    eligible = jnp.ones(bids.shape, bool) if eligible is None else jnp.broadcast_to(eligible, bids.shape)
    positive = bids > 0
    log_bids = jnp.log(jnp.where(positive, bids, 1.0))
    scores = jnp.where(positive, gamma * log_bids, -jnp.inf)
    none_positive = ~positive.any(axis=-1, keepdims=True)
    scores = jnp.where(none_positive, jnp.where(eligible, 0.0, -jnp.inf), scores)
    return scores - jax.nn.logsumexp(scores, axis=-1, keepdims=True)


# Up to this many agents the weighted sum over agents is written out term by term (unrolled while
# tracing): XLA:CPU then fuses it with the elementwise work around it into one pass over the
# vocabulary, where a dot would write its [..., V] result to memory first. For the payments, which
# evaluate the rule at many bid profiles, this is about 2x faster at V = 49152.
_UNROLL_AGENTS = 16


def weighted_sum(weights: jax.Array, values: jax.Array) -> jax.Array:
    """``sum_i weights[..., i] * values[..., i, :]``: ``[..., n], [..., n, V] -> [..., V]``."""
    n = weights.shape[-1]
    if n > _UNROLL_AGENTS:
        return jnp.matmul(weights[..., None, :], values)[..., 0, :]
    total = weights[..., 0, None] * values[..., 0, :]
    for i in range(1, n):
        total = total + weights[..., i, None] * values[..., i, :]
    return total


def linear_from_log_probs(log_p: jax.Array, weights: jax.Array) -> jax.Array:
    """``log sum_i lambda_i p_i`` from ``log_p: [..., n, V]`` and ``weights: [..., n]``.

    Each token is scaled by its largest agent log-probability (a constant in the bids, so it is
    computed once when the weights are batched under ``vmap``); the mixture is then a matrix
    product. A token whose every positively weighted agent has probability below the dtype's
    smallest normal number relative to the largest one (``exp(-87)`` in float32) may come out as
    ``-inf``; a token masked by every positively weighted agent is exactly ``-inf``.
    """
    top = jax.lax.stop_gradient(jnp.max(log_p, axis=-2))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    scaled = jnp.exp(log_p - top[..., None, :])
    return safe_log(weighted_sum(weights, scaled)) + top


def log_linear_from_log_probs(log_p: jax.Array, weights: jax.Array) -> jax.Array:
    """``log_softmax(sum_i lambda_i log p_i)`` from ``log_p: [..., n, V]`` and ``weights: [..., n]``.

    A token masked by any positively weighted agent gets ``-inf``. If the positively weighted agents
    share no token at all, the result is the limit of smoothing every ``p_i`` by ``eps -> 0``: the
    tokens masked by the least total weight remain, with the geometric mean of the agents that
    allow them.
    """
    masked = log_p == -jnp.inf
    score = weighted_sum(weights, jnp.where(masked, 0.0, log_p))
    masked_weight = weighted_sum(weights, masked.astype(log_p.dtype))
    least = jnp.min(masked_weight, axis=-1, keepdims=True)
    tolerance = 8 * jnp.finfo(log_p.dtype).eps
    allowed = masked_weight <= least * (1 + tolerance)
    return jax.nn.log_softmax(jnp.where(allowed, score, -jnp.inf), axis=-1)


@jax.jit
def _linear(logits: jax.Array, bids: jax.Array) -> jax.Array:
    return linear_from_log_probs(agent_log_probs(logits), bid_weights(logits, bids))


@jax.jit
def _log_linear(logits: jax.Array, bids: jax.Array) -> jax.Array:
    return log_linear_from_log_probs(agent_log_probs(logits), bid_weights(logits, bids))


def linear(logits: jax.Array, bids: jax.Array) -> jax.Array:
    """Linear aggregation ``q = sum_i lambda_i p_i`` (docs/maths.md §2), in log space.

    The unique minimiser of ``sum_i b_i KL(p_i || q)``; monotone (raising ``b_i`` moves ``q`` along
    the segment towards ``p_i``).

    Args:
      logits: ``[..., n, V]`` unnormalised next-token logits of the ``n`` agents (``-inf`` allowed).
      bids: ``[..., n]`` non-negative bids.

    Returns:
      ``log q: [..., V]``, normalised. A token masked by every agent with positive weight is ``-inf``.
    """
    logits, bids = _validation.mechanism_inputs("linear", logits, bids)
    return _linear(logits, bids)


@jax.jit
def _linear_probabilities(logits: jax.Array, bids: jax.Array) -> jax.Array:
    return weighted_sum(bid_weights(logits, bids), jnp.exp(agent_log_probs(logits)))


def linear_probabilities(logits: jax.Array, bids: jax.Array) -> jax.Array:
    """``q = sum_i lambda_i p_i`` in probability space: ``exp(linear(logits, bids))`` without logs.

    ``logits: [..., n, V]``, ``bids: [..., n]`` -> ``q: [..., V]``. Available as
    ``linear.probabilities``: :func:`jaxauction.payments.second_price` differentiates it for the
    robust allocation (a sum of probabilities), which saves a log, an exp and a division per token.
    """
    logits, bids = _validation.mechanism_inputs("linear_probabilities", logits, bids)
    return _linear_probabilities(logits, bids)


def log_linear(logits: jax.Array, bids: jax.Array) -> jax.Array:
    """Log-linear aggregation ``q ∝ exp(sum_i lambda_i log p_i)`` (docs/maths.md §2).

    The unique minimiser of ``sum_i b_i KL(q || p_i)``; not monotone in general (docs/maths.md §4).

    Args:
      logits: ``[..., n, V]`` unnormalised next-token logits of the ``n`` agents (``-inf`` allowed).
      bids: ``[..., n]`` non-negative bids.

    Returns:
      ``log q: [..., V]``, normalised. A token masked by any agent with positive weight is ``-inf``;
      when those agents share no token, see :func:`log_linear_from_log_probs`.
    """
    logits, bids = _validation.mechanism_inputs("log_linear", logits, bids)
    return _log_linear(logits, bids)


def append_base(
    logits: jax.Array,
    bids: jax.Array,
    base_logits: jax.Array | None,
    base_bid: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Add the base distribution as an extra last agent: ``[..., n, V], [..., n] -> [..., n+1, V], [..., n+1]``.

    ``base_logits: [..., V]`` and ``base_bid: [...]`` (or a scalar) broadcast against the leading
    axes. Returns the inputs unchanged when ``base_logits`` is None.
    """
    if base_logits is None:
        return logits, bids
    lead = jnp.broadcast_shapes(logits.shape[:-2], bids.shape[:-1], base_logits.shape[:-1], jnp.shape(base_bid))
    n, vocab = logits.shape[-2:]
    all_logits = jnp.concatenate(
        [
            jnp.broadcast_to(logits, lead + (n, vocab)),
            jnp.broadcast_to(base_logits[..., None, :], lead + (1, vocab)),
        ],
        axis=-2,
    )
    all_bids = jnp.concatenate(
        [
            jnp.broadcast_to(bids, lead + (n,)),
            jnp.broadcast_to(jnp.asarray(base_bid, bids.dtype)[..., None], lead + (1,)),
        ],
        axis=-1,
    )
    return all_logits, all_bids
