"""A reply-level auction with an LLM (after MOSAIC; docs/maths.md §8): the agents bid for a whole reply.

Candidates ``y_1..y_M`` are drawn from a proposal ``pi_gen``; ``pi_ref`` is the base (no-ad) prompt's LLM
and the importance weights are ``w_k ∝ pi_ref(y_k) / pi_gen(y_k)`` (normalised). Agent ``i`` reports the
reward ``r_i(y) = b_i (log pi_i(y) - log pi_ref(y))``; the allocation and the Clarke-pivot payments are
those of :mod:`jaxauction.reply_mechanism`. As ``M -> inf`` the chosen reply follows
``pi* ∝ pi_ref^(1 - sum_i b_i/tau) prod_i pi_i^(b_i/tau)``.

This module is the workflow: :func:`auction` draws the candidates with the engine, scores them with
:func:`jaxauction.engine.scoring.token_log_probs` and allocates. It re-exports the array-level mechanism
(:func:`allocation`, :func:`payments`, :func:`welfare`) and the scorer (:func:`token_log_probs`), so
``jaxauction.reply.*`` keeps its names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxauction import _validation, engine, reply_mechanism
from jaxauction import prompts as prompts_lib
from jaxauction.engine.request import GenerateOptions, validate_model
from jaxauction.engine.scoring import token_log_probs
from jaxauction.mechanism import real_scalar
from jaxauction.reply_mechanism import allocation, payments, welfare

__all__ = ["PROPOSALS", "ReplyResult", "allocation", "auction", "payments", "token_log_probs", "welfare"]

PROPOSALS = ("base", "mixture")


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
    bid_array = _check_arguments(prompts, bids, base_prompt, num_candidates, proposal, tau)
    GenerateOptions.create(max_new_tokens=max_new_tokens)  # its check, before the model loads
    model = validate_model(model)
    key = jax.random.key(0) if key is None else key
    draw_key, mix_key, choice_key = jax.random.split(key, 3)
    candidates = _draw_candidates(
        model, prompts, base_prompt, proposal, int(num_candidates), draw_key, mix_key, max_new_tokens
    )
    cand_tokens, cand_lengths = np.atleast_2d(candidates.tokens), np.atleast_1d(candidates.lengths)
    scores = token_log_probs(model, [*prompts, base_prompt], cand_tokens, cand_lengths).astype(np.float64)
    seq = scores.sum(axis=-1)  # [n + 1, M]
    log_agents, log_ref = seq[:-1], seq[-1]
    log_weights = _log_importance_weights(log_agents, log_ref, proposal)
    ratios = log_agents - log_ref[None]  # [n, M]
    rewards = np.atleast_2d(bid_array)[:, :, None] * ratios[None]  # [A, n, M]
    log_pi, z = _allocate(log_weights, rewards, tau)
    chosen = np.asarray(jax.random.categorical(choice_key, log_pi, axis=-1))
    tokens, lengths = cand_tokens[chosen], cand_lengths[chosen]
    pad = prompts_lib.pad_id(model[1])
    cand_texts = list(candidates.texts)
    result = ReplyResult(
        texts=[cand_texts[k] for k in chosen],
        chosen=chosen,
        tokens=np.where(np.arange(tokens.shape[1])[None] < lengths[:, None], tokens, pad),
        lengths=lengths,
        payments=z,
        probabilities=np.exp(log_pi),
        rewards=rewards,
        log_weights=log_weights,
        candidates=cand_texts,
        candidate_tokens=cand_tokens,
        candidate_lengths=cand_lengths,
        log_likelihood_ratios=ratios,
        log_ref=log_ref,
        bids=np.atleast_2d(bid_array),
        tau=float(tau),
    )
    return _single_profile(result) if bid_array.ndim == 1 else result


def _check_arguments(prompts, bids, base_prompt, num_candidates, proposal, tau) -> np.ndarray:
    """Checks :func:`auction`'s arguments; returns the bids as float64 ``[n]`` or ``[A, n]``."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"prompts: expected a non-empty list with one prompt per agent; got {prompts!r:.80}.")
    if base_prompt is None:
        raise ValueError("base_prompt: required; its LLM is the reference pi_ref (e.g. the user's query alone).")
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal: expected one of {PROPOSALS}; got {proposal!r}.")
    if (
        isinstance(num_candidates, (bool, np.bool_))
        or not isinstance(num_candidates, (int, np.integer))
        or num_candidates < 1
    ):
        raise ValueError(f"num_candidates: expected a positive integer (a count, not a bool); got {num_candidates!r}.")
    value = real_scalar(tau, "tau", "a finite number > 0")
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"tau: expected a finite number > 0; got {tau!r}.")
    return _validation.host_bids("bids", bids, num_agents=len(prompts))


def _draw_candidates(model, prompts, base_prompt, proposal, m, draw_key, mix_key, max_new_tokens):
    """``M = m`` candidates from the proposal, in one batched generation (a :class:`GenerationResult`).

    ``"base"`` samples from the base prompt's LLM; ``"mixture"`` samples candidate ``k`` from agent
    ``j_k``'s LLM (``j_k`` uniform, drawn with ``mix_key``): one-hot bids under the linear rule.
    """
    if proposal == "base":
        sources, bids = [base_prompt], np.ones((m, 1))
    else:
        num_agents = len(prompts)
        sources, bids = list(prompts), np.eye(num_agents)[np.asarray(jax.random.randint(mix_key, (m,), 0, num_agents))]
    return engine.generate(
        sources, bids, rule="linear", payment=None, key=draw_key, max_new_tokens=max_new_tokens, model=model
    )


def _log_importance_weights(log_agents: np.ndarray, log_ref: np.ndarray, proposal: str) -> np.ndarray:
    """``[M]`` normalised ``log w_k = log pi_ref(y_k) - log pi_gen(y_k)`` from ``log_agents [n, M]``, ``log_ref [M]``."""
    if proposal == "base":
        log_gen = log_ref
    else:
        log_gen = np.logaddexp.reduce(log_agents, axis=0) - np.log(len(log_agents))
    log_weights = log_ref - log_gen
    return log_weights - np.logaddexp.reduce(log_weights)


def _allocate(log_weights: np.ndarray, rewards: np.ndarray, tau) -> tuple[np.ndarray, np.ndarray]:
    """``(log pi [A, M], payments [A, n])`` in the default float type (float64 under x64)."""
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    lw, rw = jnp.asarray(log_weights, dtype), jnp.asarray(rewards, dtype)
    log_pi = reply_mechanism.log_allocation(lw, rw, tau)
    return np.asarray(log_pi), np.asarray(reply_mechanism.payments(lw, rw, tau))


def _single_profile(result: ReplyResult) -> ReplyResult:
    """``result`` with the profile axis ``A = 1`` dropped (for ``bids: [n]``)."""
    batched = ("chosen", "tokens", "lengths", "payments", "probabilities", "rewards", "bids")
    return dataclasses.replace(result, **{name: getattr(result, name)[0] for name in batched})
