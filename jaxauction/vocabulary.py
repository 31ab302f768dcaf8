"""Smaller outcome spaces: keep the tokens that matter and lump the tail into one "rest" token (host NumPy).

The one home of "lump the tail": :func:`jaxauction.simulation.compress_vocabulary` is this
:func:`compress_vocabulary`, and :func:`jaxauction.design.data.coarsen` calls it with ``top_k``.
"""

from __future__ import annotations

import numpy as np

from jaxauction import _validation

__all__ = ["compress_vocabulary"]


def compress_vocabulary(
    logits, mass: float | None = 0.999, *, top_k: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Keeps the tokens that matter in each logits set and lumps the rest into one extra token.

    Within a set (``[n, V]``: the agents' distributions over the same tokens), every agent's smallest
    set of most likely tokens holding at least ``mass`` of its probability is kept (none when ``mass``
    is None); the union over the agents is kept for all of them, topped up with the next most likely
    tokens (by their largest probability over the agents) so that every set keeps the same number
    ``V'`` of tokens, at least ``top_k`` (one static shape). Each agent's remaining tokens become one
    last "rest" token carrying their total probability (its logit is their logsumexp; ``-inf`` when
    nothing is left). Token identities do not matter to the mechanism, only that the agents of a set
    stay aligned, so sets may keep different tokens. Every agent keeps its total mass exactly; the
    linear rule's ``q`` is unchanged on kept tokens, and a payment or value changes by at most about
    the lumped mass ``1 - mass`` per agent (measure it on a subset, as
    ``experiments/batch_simulation.py`` does).

    Args:
      logits: ``[K, n, V]`` (or ``[n, V]``); normalised or not (the output keeps their scale).
      mass: probability to keep per agent, in ``(0, 1]``, or None.
      top_k: the fewest tokens to keep per set (``>= 1``; at most ``V`` are kept), or None.

    Returns:
      ``(compressed [K, n, V' + 1] float32, kept [K, V'])``: the logits (the kept tokens in increasing
      id order, then the rest) and the kept token ids of every set.

    Raises:
      ValueError: ``mass`` outside ``(0, 1]``, ``top_k`` not a positive int, both None, or logits that
        are not ``[K, n, V]``/``[n, V]`` real numbers or ``-inf`` with an allowed token per row.
    """
    _check_selection(mass, top_k)
    logits = np.asarray(logits, np.float64)
    single = logits.ndim == 2
    if single:
        logits = logits[None]
    if logits.ndim != 3:
        raise ValueError(f"logits: expected shape [K, n, V] or [n, V]; got {logits.shape}.")
    _validation.check_logit_values("compress_vocabulary", "logits", logits)
    p = np.exp(logits - _logsumexp(logits))
    keep = _mass_sets(p, mass)  # [K, V]
    width = min(max(int(keep.sum(axis=-1).max()), top_k or 0), p.shape[-1])
    # Top up every set to the same width with its most likely remaining tokens.
    priority = np.where(keep, np.inf, p.max(axis=1))
    kept = np.sort(np.argsort(-priority, axis=-1, kind="stable")[:, :width], axis=-1)
    compressed = _lump_tail(logits, kept).astype(np.float32)
    return (compressed[0], kept[0]) if single else (compressed, kept)


def _lump_tail(logits, kept) -> np.ndarray:
    """``logits [K, n, V]`` and distinct token ids ``kept [K, V']`` -> ``[K, n, V' + 1]`` (float64).

    The kept columns of every set, then one column holding the logsumexp of the others (``-inf`` if
    none is left).
    """
    logits, kept = np.asarray(logits, np.float64), np.asarray(kept)
    kept_logits = np.take_along_axis(logits, kept[:, None, :], axis=-1)
    rest_mask = np.ones((logits.shape[0], logits.shape[-1]), bool)
    np.put_along_axis(rest_mask, kept, False, axis=-1)
    rest = np.where(rest_mask[:, None, :], logits, -np.inf)
    return np.concatenate([kept_logits, _logsumexp(rest)], axis=-1)


def _check_selection(mass, top_k) -> None:
    if mass is None and top_k is None:
        raise ValueError("mass, top_k: give at least one (the mass to keep per agent, or the tokens to keep per set).")
    if mass is not None and not 0.0 < mass <= 1.0:
        raise ValueError(f"mass: expected a number in (0, 1] or None, got {mass}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k: expected a positive int or None, got {top_k!r}.")


def _mass_sets(p: np.ndarray, mass: float | None) -> np.ndarray:
    """``[K, V]`` bool: the union over the agents of each agent's smallest top set holding ``mass``."""
    keep = np.zeros(p.shape[0::2], bool)
    if mass is None:
        return keep
    order = np.argsort(-p, axis=-1)
    sorted_p = np.take_along_axis(p, order, axis=-1)
    needed = (np.cumsum(sorted_p, axis=-1) - sorted_p) < mass  # [K, n, V] in sorted order
    for s in range(p.shape[0]):
        keep[s, order[s][needed[s]]] = True
    return keep


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = np.max(x, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return top + np.log(np.sum(np.exp(x - top), axis=-1, keepdims=True))
