"""The reply-level mechanism (after MOSAIC; docs/maths.md §8): array maths only, no model.

The agents bid for a whole reply, not for a token. Candidates ``y_1..y_M`` carry normalised importance
weights ``w_k`` (``log_weights``) and agent ``i`` reports the reward ``r_i(y_k)`` (``rewards``). With
``R = sum_i r_i``:

- allocation: ``pi_k ∝ w_k exp(R(y_k) / tau)``, the maximiser of ``sum_k pi_k R(y_k) - tau KL(pi || w)``;
- welfare of a set ``S`` of agents: ``W(S) = tau log sum_k w_k exp(sum_{i in S} r_i(y_k) / tau)``;
- Clarke-pivot payments: ``z_i = W(N minus i) - W(N) + sum_k pi_k r_i(y_k) >= 0``.

The mechanism is dominant-strategy truthful in the bid scale for a fixed candidate set. Every function
is jit-compiled, takes any leading batch axes and works in log space. :mod:`jaxauction.reply` runs it
with an LLM (and re-exports :func:`allocation`, :func:`payments` and :func:`welfare`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxauction import _validation

__all__ = ["allocation", "log_allocation", "payments", "welfare"]


def _check_inputs(fn: str, log_weights, rewards, tau, members=None):
    """Shapes and (for concrete inputs) values; returns float arrays ``(log_weights, rewards, tau, members)``."""
    log_weights, rewards = _validation.as_array(log_weights), _validation.as_array(rewards)
    tau = _validation.as_array(tau)
    lw_shape, r_shape, tau_shape = np.shape(log_weights), np.shape(rewards), np.shape(tau)
    if len(lw_shape) < 1 or lw_shape[-1] == 0:
        raise ValueError(
            f"{fn}: log_weights must have shape [..., M] with M >= 1 candidates; got shape {lw_shape}. "
            "Fix: pass one log importance weight per candidate (zeros for uniform weights)."
        )
    if len(r_shape) < 2 or r_shape[-1] != lw_shape[-1] or r_shape[-2] == 0:
        raise ValueError(
            f"{fn}: rewards must have shape [..., n, M] with n >= 1 agents and M = {lw_shape[-1]} (the "
            f"candidates of log_weights {lw_shape}); got shape {r_shape}. Fix: rewards[..., i, k] = r_i(y_k)."
        )
    try:
        lead = np.broadcast_shapes(lw_shape[:-1], r_shape[:-2], tau_shape)
    except ValueError:
        raise ValueError(
            f"{fn}: the leading (batch) axes of log_weights {lw_shape[:-1]}, rewards {r_shape[:-2]} and "
            f"tau {tau_shape} do not broadcast. Fix: give them the same leading axes, or pass a scalar tau."
        ) from None
    if members is not None:
        members = _validation.as_array(members)
        m_shape = np.shape(members)
        if len(m_shape) < 1 or m_shape[-1] != r_shape[-2]:
            raise ValueError(
                f"{fn}: members must have shape [..., n] with n = {r_shape[-2]} (the agents of rewards "
                f"{r_shape}); got shape {m_shape}. Fix: a boolean mask, True for the agents in the set."
            )
        try:
            lead = np.broadcast_shapes(lead, m_shape[:-1])
        except ValueError:
            raise ValueError(
                f"{fn}: the leading axes of members {m_shape[:-1]} do not broadcast with {lead}."
            ) from None
        members = jnp.asarray(members, bool)
    dtype = _validation.float_dtype(log_weights, rewards, tau)
    log_weights, rewards, tau = (jnp.asarray(x, dtype) for x in (log_weights, rewards, tau))
    if _validation.is_concrete(log_weights, rewards, tau):
        lw, r, t = np.asarray(log_weights), np.asarray(rewards), np.asarray(tau)
        if np.isnan(lw).any() or (lw == np.inf).any():
            raise ValueError(
                f"{fn}: log_weights (shape {lw_shape}) must be real numbers or -inf (a candidate with weight "
                "0); it contains NaN or +inf. Fix: check the sequence log-probabilities it was formed from."
            )
        if not (lw > -np.inf).any(axis=-1).all():
            raise ValueError(
                f"{fn}: log_weights (shape {lw_shape}) has a row that is -inf for every candidate; at least "
                "one candidate needs a positive weight."
            )
        if not np.isfinite(r).all():
            raise ValueError(
                f"{fn}: rewards (shape {r_shape}) must be finite; it contains NaN or inf. Fix: clip the "
                "log-likelihood ratios, or drop the candidate whose log-probability is -inf."
            )
        if not (np.isfinite(t) & (t > 0)).all():
            raise ValueError(f"{fn}: tau must be finite and > 0; got {t.tolist()!r:.80}.")
    del lead
    return log_weights, rewards, tau, members


def _normalise(log_weights: jax.Array) -> jax.Array:
    return log_weights - jax.scipy.special.logsumexp(log_weights, axis=-1, keepdims=True)


@jax.jit
def _log_allocation(log_weights, rewards, tau):
    tau = jnp.asarray(tau)[..., None]
    return jax.nn.log_softmax(_normalise(log_weights) + rewards.sum(axis=-2) / tau, axis=-1)


@jax.jit
def _payments(log_weights, rewards, tau):
    # z_i = W(N \ i) - W(N) + E_pi[r_i] = tau log E_pi[exp(-(r_i - E_pi r_i) / tau)]: a Jensen gap, >= 0.
    # Centring r_i at its mean keeps the exponent small; rounding can still leave about -1e-7 relative,
    # which is clipped at 0.
    log_pi = _log_allocation(log_weights, rewards, tau)[..., None, :]  # [..., 1, M]
    tau = jnp.asarray(tau)[..., None]
    pi = jnp.exp(log_pi)
    mean = jnp.sum(pi * rewards, axis=-1, keepdims=True)  # [..., n, 1]
    gap = tau * jax.scipy.special.logsumexp(log_pi - (rewards - mean) / tau[..., None], axis=-1)
    return jnp.maximum(gap, 0.0)


@jax.jit
def _welfare(log_weights, rewards, tau, members):
    tau = jnp.asarray(tau)[..., None]
    total = jnp.sum(jnp.where(members[..., None], rewards, 0.0), axis=-2)
    return tau[..., 0] * jax.scipy.special.logsumexp(_normalise(log_weights) + total / tau, axis=-1)


def log_allocation(log_weights, rewards, tau=1.0) -> jax.Array:
    """``[..., M]`` the log of :func:`allocation` (computed in log space: ``-inf`` only for a dropped candidate).

    Args, Raises: as :func:`allocation`.
    """
    log_weights, rewards, tau, _ = _check_inputs("reply.allocation", log_weights, rewards, tau)
    return _log_allocation(log_weights, rewards, tau)


def allocation(log_weights, rewards, tau=1.0) -> jax.Array:
    """The reply auction's allocation over the candidates: ``pi_k ∝ w_k exp(sum_i r_i(y_k) / tau)``.

    Args:
      log_weights: ``[..., M]`` log importance weights ``log w_k`` (any normalisation; ``-inf`` drops
        a candidate).
      rewards: ``[..., n, M]`` reported rewards ``r_i(y_k)`` (finite).
      tau: ``[...]`` or scalar ``> 0``, the KL regularisation strength.

    Returns:
      ``[..., M]`` probabilities (a softmax in log space: never NaN for finite inputs; ``M = 1`` gives 1).
      Inside ``jit`` a NaN input gives NaN outputs for its batch entry (nothing is replaced by 0).

    Raises:
      ValueError: (outside jit) shapes that do not fit, NaN/+inf log weights, a row of all ``-inf``
        weights, non-finite rewards, or ``tau <= 0``.
    """
    return jnp.exp(log_allocation(log_weights, rewards, tau))


def payments(log_weights, rewards, tau=1.0) -> jax.Array:
    """Clarke-pivot payments ``z_i = W(N minus i) - W(N) + sum_k pi_k r_i(y_k)`` (docs/maths.md §8).

    Computed as ``tau log sum_k pi_k exp(-(r_i(y_k) - E_pi r_i) / tau)`` (the same quantity, in log
    space), which is ``>= 0`` by Jensen's inequality; float rounding below 0 is clipped to 0. ``n = 1``
    and ``M = 1`` are handled (``M = 1`` gives 0: nobody changes the outcome).

    Args: as :func:`allocation`. Returns: ``[..., n]`` payments.
    """
    log_weights, rewards, tau, _ = _check_inputs("reply.payments", log_weights, rewards, tau)
    return _payments(log_weights, rewards, tau)


def welfare(log_weights, rewards, tau=1.0, members=None) -> jax.Array:
    """``W(S) = tau log sum_k w_k exp(sum_{i in S} r_i(y_k) / tau)`` with ``w`` normalised (docs/maths.md §8).

    Args:
      log_weights, rewards, tau: as :func:`allocation`.
      members: ``[..., n]`` bool, the agents in ``S``; ``None`` means all agents (``S = N``).

    Returns:
      ``[...]`` the welfare, i.e. ``max_pi sum_k pi_k r_S(y_k) - tau KL(pi || w)``; 0 for the empty set.
    """
    fn = "reply.welfare"
    if members is None:
        members = np.ones(np.shape(rewards)[-2:-1], bool) if np.ndim(rewards) >= 2 else np.ones((1,), bool)
    log_weights, rewards, tau, members = _check_inputs(fn, log_weights, rewards, tau, members)
    return _welfare(log_weights, rewards, tau, members)
