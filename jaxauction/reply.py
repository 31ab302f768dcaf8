"""A reply-level auction (after MOSAIC; docs/maths.md §8): the agents bid for a whole reply, not for a token.

Candidates ``y_1..y_M`` are drawn from a proposal ``pi_gen``; ``pi_ref`` is the base (no-ad) prompt's LLM
and the importance weights are ``w_k ∝ pi_ref(y_k) / pi_gen(y_k)`` (normalised). Agent ``i`` reports the
reward ``r_i(y) = b_i (log pi_i(y) - log pi_ref(y))``. With ``R = sum_i r_i``:

- allocation: ``pi_k ∝ w_k exp(R(y_k) / tau)``, the maximiser of ``sum_k pi_k R(y_k) - tau KL(pi || w)``;
- welfare of a set ``S`` of agents: ``W(S) = tau log sum_k w_k exp(sum_{i in S} r_i(y_k) / tau)``;
- Clarke-pivot payments: ``z_i = W(N minus i) - W(N) + sum_k pi_k r_i(y_k) >= 0``.

The mechanism is dominant-strategy truthful in the bid scale for a fixed candidate set, and as
``M -> inf`` the chosen reply follows ``pi* ∝ pi_ref^(1 - sum_i b_i/tau) prod_i pi_i^(b_i/tau)``.

Array level (jit-compiled, any leading batch axes, log space): :func:`allocation`, :func:`payments`,
:func:`welfare`. LLM level: :func:`auction` draws, scores and allocates with a model;
:func:`token_log_probs` is the batched teacher-forced scorer it (and :mod:`jaxauction.compare`) uses.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxauction import _validation
from jaxauction import engine as generation_lib
from jaxauction import prompts as prompts_lib

__all__ = ["PROPOSALS", "ReplyResult", "allocation", "auction", "payments", "token_log_probs", "welfare"]

PROPOSALS = ("base", "mixture")


# ----------------------------------------------------------------------------------------------
# Array level.


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
    log_weights, rewards, tau, _ = _check_inputs("reply.allocation", log_weights, rewards, tau)
    return jnp.exp(_log_allocation(log_weights, rewards, tau))


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


# ----------------------------------------------------------------------------------------------
# Teacher-forced scoring.

# Logit elements (rows * T * V) per forward pass in :func:`token_log_probs`: 2**25 float32 = 128 MiB.
_SCORE_ELEMENTS = 2**25


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_rows(graphdef, state, input_ids, attention_mask, targets):
    """``[B, T]`` ids -> ``[B, T - 1]`` log-probability of each next token ``input_ids[:, 1:]``."""
    model = nnx.merge(graphdef, state)
    logits = model(input_ids, attention_mask)[:, :-1]
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]


def token_log_probs(model, prompts: Sequence[Any], tokens, lengths=None) -> np.ndarray:
    """Teacher-forced ``log p_j(y_t | y_<t)`` of every continuation under every prompt, in one padded batch.

    Args:
      model: ``(model, tokenizer)`` as for :func:`jaxauction.generate`.
      prompts: ``R`` prompts (strings, chat messages or token ids, as in :func:`jaxauction.generate`).
      tokens: ``[K, T]`` token ids of the continuations (or a list of ``K`` id sequences).
      lengths: ``[K]`` number of valid tokens of each row (default: all ``T``, or each list's length).

    Returns:
      ``[R, K, T]`` float32 log-probabilities; 0 beyond each row's length. All ``R * K`` rows
      ``prompt_j + y_k`` are left-padded into one batch and run through the model's full forward pass
      in chunks of rows (so the ``[rows, T, V]`` logits stay under 128 MiB); the chunking
      changes no number.
    """
    llm, tokenizer = _unpack_model(model)
    if isinstance(tokens, np.ndarray) or (isinstance(tokens, jax.Array)):
        token_rows = np.asarray(tokens)
        if token_rows.ndim != 2:
            raise ValueError(f"tokens: expected shape [K, T]; got {token_rows.shape}.")
        lengths = np.full(len(token_rows), token_rows.shape[1]) if lengths is None else np.asarray(lengths)
        rows = [list(map(int, r[: int(n)])) for r, n in zip(token_rows, lengths)]
        width = token_rows.shape[1]
    else:
        rows = [list(map(int, r)) for r in tokens]
        if lengths is not None:
            rows = [r[: int(n)] for r, n in zip(rows, lengths)]
        width = max((len(r) for r in rows), default=0)
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("tokens: expected K >= 1 continuations, each with at least one token.")
    vocab = llm.config.vocab_size
    if any(not 0 <= t < vocab for r in rows for t in r):
        raise ValueError(f"tokens: token ids must lie in [0, {vocab}) (the model's vocabulary).")
    encoded = [prompts_lib.encode_prompt(tokenizer, p, argument=f"prompts[{j}]") for j, p in enumerate(prompts)]
    sequences = [p + r for p in encoded for r in rows]
    pad = prompts_lib.pad_id(tokenizer)
    input_ids, mask = prompts_lib.left_pad(sequences, pad)
    if input_ids.shape[1] > llm.config.max_position_embeddings:
        raise ValueError(
            f"prompts: a prompt plus its continuation has {input_ids.shape[1]} tokens (padded), more than the "
            f"model's context of {llm.config.max_position_embeddings}. Shorten the prompts or the replies."
        )
    num_rows = len(sequences)
    # Row counts are rounded up to powers of two (and chunks are powers of two), so that batches of
    # similar sizes share one compiled program; the padding rows are dropped.
    budget = max(1, _SCORE_ELEMENTS // (input_ids.shape[1] * vocab))
    chunk = min(1 << (num_rows - 1).bit_length(), 1 << (budget.bit_length() - 1))
    padded = -(-num_rows // chunk) * chunk
    input_ids = np.concatenate([input_ids, np.full((padded - num_rows, input_ids.shape[1]), pad, np.int32)])
    mask = np.concatenate([mask, np.zeros((padded - num_rows, mask.shape[1]), np.int32)])
    mask[num_rows:, -1] = 1  # padding rows: one real token, so no row is fully masked
    graphdef, state = nnx.split(llm)
    scored = np.concatenate(
        [
            np.asarray(
                _score_rows(
                    graphdef,
                    state,
                    jnp.asarray(input_ids[s : s + chunk]),
                    jnp.asarray(mask[s : s + chunk]),
                    jnp.asarray(input_ids[s : s + chunk, 1:]),
                )
            )
            for s in range(0, padded, chunk)
        ]
    )[:num_rows]
    # Row j * K + k ends with y_k: its t-th token sits at column P - L_k + t of the ids, predicted at P - L_k + t - 1.
    lengths_k = np.array([len(r) for r in rows])
    steps = np.arange(width)
    valid = steps[None] < lengths_k[:, None]  # [K, width]
    cols = np.where(valid, input_ids.shape[1] - lengths_k[:, None] + steps[None] - 1, 0)
    scored = scored.reshape(len(encoded), len(rows), -1)
    out = np.take_along_axis(scored, np.broadcast_to(cols, scored.shape[:2] + (width,)), axis=-1)
    return np.where(valid[None], out, 0.0).astype(np.float32)
    return out


def _unpack_model(model):
    if model is None:
        model = importlib.import_module("jaxauction.models").default()
    try:
        llm, tokenizer = model
    except (TypeError, ValueError):
        raise ValueError(
            "model: expected the (model, tokenizer) pair returned by jaxauction.models.load(...)"
        ) from None
    return llm, tokenizer


# ----------------------------------------------------------------------------------------------
# LLM level.


@dataclasses.dataclass(frozen=True)
class ReplyResult:
    """What :func:`auction` returns (numpy arrays, host side).

    For ``bids: [A, n]`` (``A`` bid profiles sharing one candidate set) the arrays carry the ``A`` axis;
    for ``bids: [n]`` it is dropped and ``texts`` holds one string (``text`` gives it directly).

    Attributes:
      texts: ``A`` chosen replies (decoded).
      chosen: ``[A]`` index of the chosen candidate.
      tokens: ``[A, T]`` token ids of the chosen reply (pad id after its length); ``lengths: [A]``.
      payments: ``[A, n]`` Clarke-pivot payments.
      probabilities: ``[A, M]`` the allocation over the candidates.
      rewards: ``[A, n, M]`` ``b_i (log pi_i(y_k) - log pi_ref(y_k))``.
      log_weights: ``[M]`` normalised ``log w_k = log pi_ref(y_k) - log pi_gen(y_k)``.
      candidates: ``M`` candidate texts; ``candidate_tokens: [M, T]``, ``candidate_lengths: [M]``.
      log_likelihood_ratios: ``[n, M]`` ``log pi_i(y_k) - log pi_ref(y_k)``.
      log_ref: ``[M]`` ``log pi_ref(y_k)``.
      bids: ``[A, n]``; ``tau``: the temperature used.
    """

    texts: list[str]
    chosen: np.ndarray
    tokens: np.ndarray
    lengths: np.ndarray
    payments: np.ndarray
    probabilities: np.ndarray
    rewards: np.ndarray
    log_weights: np.ndarray
    candidates: list[str]
    candidate_tokens: np.ndarray
    candidate_lengths: np.ndarray
    log_likelihood_ratios: np.ndarray
    log_ref: np.ndarray
    bids: np.ndarray
    tau: float

    @property
    def text(self) -> str:
        """The first (for a single profile, the only) chosen reply."""
        return self.texts[0]


def auction(
    prompts,
    bids,
    *,
    base_prompt,
    num_candidates: int = 8,
    proposal: str = "base",
    tau: float = 1.0,
    key=None,
    max_new_tokens: int = 48,
    model=None,
) -> ReplyResult:
    """Runs the reply-level auction of docs/maths.md §8 with an LLM.

    1. Draw ``M = num_candidates`` replies from the proposal in one batched generation: ``"base"``
       samples from the base prompt's LLM (``pi_gen = pi_ref``, uniform weights); ``"mixture"`` draws
       each candidate from a uniformly chosen agent's LLM (``pi_gen = (1/n) sum_i pi_i``).
    2. Score every candidate under every agent's prompt and the base prompt (:func:`token_log_probs`:
       one padded teacher-forced batch of ``(n + 1) M`` rows).
    3. Rewards ``r_i = b_i (log pi_i - log pi_ref)``, allocation and payments (:func:`allocation`,
       :func:`payments`), and one reply drawn from the allocation per bid profile.

    A candidate that reaches ``max_new_tokens`` without EOS is scored as that prefix under every LLM,
    so the outcome space (replies ending in EOS, or cut at the limit) is the same for all of them.

    Args:
      prompts: the ``n`` agents' prompts (as for :func:`jaxauction.generate`).
      bids: ``[n]`` or ``[A, n]`` non-negative bids; the ``A`` profiles share one candidate set (the
        proposal does not depend on the bids), each with its own draw of the reply.
      base_prompt: the platform's no-ad prompt, whose LLM is ``pi_ref``.
      num_candidates: ``M >= 1``.
      proposal: ``"base"`` or ``"mixture"``.
      tau: ``> 0``.
      key: a PRNG key (default ``jax.random.key(0)``).
      max_new_tokens: length limit of each candidate.
      model: ``(model, tokenizer)``; ``None`` loads the bundled model.

    Returns:
      A :class:`ReplyResult`.
    """
    llm, tokenizer = _unpack_model(model)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"prompts: expected a non-empty list with one prompt per agent; got {prompts!r:.80}.")
    if base_prompt is None:
        raise ValueError("base_prompt: required; its LLM is the reference pi_ref (e.g. the user's query alone).")
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal: expected one of {PROPOSALS}; got {proposal!r}.")
    if not isinstance(num_candidates, (int, np.integer)) or num_candidates < 1:
        raise ValueError(f"num_candidates: expected a positive integer; got {num_candidates!r}.")
    if not (np.ndim(tau) == 0 and np.isfinite(tau) and tau > 0):
        raise ValueError(f"tau: expected a finite number > 0; got {tau!r}.")
    num_agents = len(prompts)
    bid_array = _validation.host_bids("bids", bids, num_agents=num_agents)
    single = bid_array.ndim == 1
    bid_array = np.atleast_2d(bid_array)
    key = jax.random.key(0) if key is None else key
    draw_key, mix_key, choice_key = jax.random.split(key, 3)
    m = int(num_candidates)

    if proposal == "base":
        candidates = generation_lib.generate(
            [base_prompt], np.ones((m, 1)), rule="linear", payment=None, key=draw_key,
            max_new_tokens=max_new_tokens, model=(llm, tokenizer),
        )  # fmt: skip
    else:
        # One-hot bids under the linear rule: candidate k is sampled from exactly agent j_k's LLM.
        chosen_agents = np.asarray(jax.random.randint(mix_key, (m,), 0, num_agents))
        candidates = generation_lib.generate(
            list(prompts), np.eye(num_agents)[chosen_agents], rule="linear", payment=None, key=draw_key,
            max_new_tokens=max_new_tokens, model=(llm, tokenizer),
        )  # fmt: skip
    cand_tokens, cand_lengths = np.atleast_2d(candidates.tokens), np.atleast_1d(candidates.lengths)

    scores = token_log_probs((llm, tokenizer), [*prompts, base_prompt], cand_tokens, cand_lengths).astype(np.float64)
    seq = scores.sum(axis=-1)  # [n + 1, M]
    log_agents, log_ref = seq[:num_agents], seq[num_agents]
    if proposal == "base":
        log_gen = log_ref
    else:
        log_gen = np.logaddexp.reduce(log_agents, axis=0) - np.log(num_agents)
    log_weights = log_ref - log_gen
    log_weights = log_weights - np.logaddexp.reduce(log_weights)
    ratios = log_agents - log_ref[None]  # [n, M]
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    rewards = bid_array[:, :, None] * ratios[None]  # [A, n, M]
    lw = jnp.asarray(log_weights, dtype)
    rw = jnp.asarray(rewards, dtype)
    log_pi = _log_allocation(*_check_inputs("reply.auction", lw, rw, tau)[:3])
    z = _payments(lw, rw, jnp.asarray(tau, dtype))
    chosen = np.asarray(jax.random.categorical(choice_key, log_pi, axis=-1))
    pad = prompts_lib.pad_id(tokenizer)
    tokens = cand_tokens[chosen]
    lengths = cand_lengths[chosen]
    cand_texts = list(candidates.texts)
    result = ReplyResult(
        texts=[cand_texts[k] for k in chosen],
        chosen=chosen,
        tokens=np.where(np.arange(tokens.shape[1])[None] < lengths[:, None], tokens, pad),
        lengths=lengths,
        payments=np.asarray(z),
        probabilities=np.exp(np.asarray(log_pi)),
        rewards=rewards,
        log_weights=log_weights,
        candidates=cand_texts,
        candidate_tokens=cand_tokens,
        candidate_lengths=cand_lengths,
        log_likelihood_ratios=ratios,
        log_ref=log_ref,
        bids=bid_array,
        tau=float(tau),
    )
    if single:
        result = dataclasses.replace(
            result,
            chosen=result.chosen[0],
            tokens=result.tokens[0],
            lengths=result.lengths[0],
            payments=result.payments[0],
            probabilities=result.probabilities[0],
            rewards=result.rewards[0],
            bids=result.bids[0],
        )
    return result
