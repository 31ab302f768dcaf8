"""Teacher-forced scoring: an LLM's full forward pass over given sequences, in padded row chunks.

- :func:`token_log_probs`: ``log p_j(y_t | y_<t)`` of every continuation under every prompt (the
  reply auction's and :mod:`jaxauction.compare`'s scorer).
- :func:`next_token_log_probs`: the full next-token distributions at the last positions of token
  sequences (what :func:`jaxauction.design.llm_auctions` records along a decoded continuation).

Rows are left-padded into one batch and run in chunks of a power-of-two number of rows, so that the
``[rows, T, V]`` logits stay under 128 MiB and batches of similar sizes share one compiled program;
the chunking changes no number.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxauction import prompts as prompts_lib
from jaxauction.engine.request import validate_model

__all__ = ["next_token_log_probs", "token_log_probs"]

# Logit elements (rows * T * V) per forward pass: 2**25 float32 = 128 MiB.
_SCORE_ELEMENTS = 2**25


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_rows(graphdef, state, input_ids, attention_mask):
    """``[B, T]`` ids -> ``[B, T - 1]`` log-probability of each next token ``input_ids[:, 1:]``."""
    model = nnx.merge(graphdef, state)
    logits = model(input_ids, attention_mask)[:, :-1]
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_p, input_ids[:, 1:, None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "count"))
def _last_log_probs(graphdef, state, input_ids, attention_mask, count):
    """``[B, T]`` ids -> ``[B, count, V]`` float32 next-token log-probabilities after the last ``count`` positions."""
    model = nnx.merge(graphdef, state)
    logits = model(input_ids, attention_mask)[:, -count:]
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _in_chunks(llm, input_ids: np.ndarray, mask: np.ndarray, pad: int, run: Callable) -> np.ndarray:
    """``run(graphdef, state, ids [c, T], mask [c, T])`` over power-of-two chunks of rows, concatenated.

    The row count is rounded up to a power of two (at most the 128 MiB logits budget); the padding rows
    (one real token each, so that no row is fully masked) are dropped from the result.
    """
    num_rows, width = input_ids.shape
    budget = max(1, _SCORE_ELEMENTS // (width * llm.config.vocab_size))
    chunk = min(1 << (num_rows - 1).bit_length(), 1 << (budget.bit_length() - 1))
    padded = -(-num_rows // chunk) * chunk
    input_ids = np.concatenate([input_ids, np.full((padded - num_rows, width), pad, np.int32)])
    mask = np.concatenate([mask, np.zeros((padded - num_rows, width), np.int32)])
    mask[num_rows:, -1] = 1
    graphdef, state = nnx.split(llm)
    parts = [
        np.asarray(run(graphdef, state, jnp.asarray(input_ids[s : s + chunk]), jnp.asarray(mask[s : s + chunk])))
        for s in range(0, padded, chunk)
    ]
    return np.concatenate(parts)[:num_rows]


def _check_width(llm, width: int, what: str, fix: str) -> None:
    if width > llm.config.max_position_embeddings:
        raise ValueError(
            f"{what} has {width} tokens (padded), more than the model's context of "
            f"{llm.config.max_position_embeddings}. {fix}"
        )


def _continuation_rows(tokens, lengths, vocab: int) -> tuple[list[list[int]], int]:
    """``tokens [K, T]`` (or ``K`` id lists) and ``lengths [K]`` -> the ``K`` id lists and the width ``T``."""
    if isinstance(tokens, (np.ndarray, jax.Array)):
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
    if any(not 0 <= t < vocab for r in rows for t in r):
        raise ValueError(f"tokens: token ids must lie in [0, {vocab}) (the model's vocabulary).")
    return rows, width


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
      in chunks of rows (see the module docstring).
    """
    llm, tokenizer = validate_model(model)
    rows, width = _continuation_rows(tokens, lengths, llm.config.vocab_size)
    encoded = [prompts_lib.encode_prompt(tokenizer, p, argument=f"prompts[{j}]") for j, p in enumerate(prompts)]
    pad = prompts_lib.pad_id(tokenizer)
    input_ids, mask = prompts_lib.left_pad([p + r for p in encoded for r in rows], pad)
    _check_width(
        llm, input_ids.shape[1], "prompts: a prompt plus its continuation", "Shorten the prompts or the replies."
    )
    scored = _in_chunks(llm, input_ids, mask, pad, _score_rows)
    # Row j * K + k ends with y_k: its t-th token sits at column P - L_k + t of the ids, predicted at P - L_k + t - 1.
    lengths_k = np.array([len(r) for r in rows])
    steps = np.arange(width)
    valid = steps[None] < lengths_k[:, None]  # [K, width]
    cols = np.where(valid, input_ids.shape[1] - lengths_k[:, None] + steps[None] - 1, 0)
    scored = scored.reshape(len(encoded), len(rows), -1)
    out = np.take_along_axis(scored, np.broadcast_to(cols, scored.shape[:2] + (width,)), axis=-1)
    return np.where(valid[None], out, 0.0).astype(np.float32)


def next_token_log_probs(model, sequences: Sequence[Sequence[int]], count: int) -> np.ndarray:
    """The next-token distributions after each of the last ``count`` tokens of every sequence.

    Args:
      model: ``(model, tokenizer)`` as for :func:`jaxauction.generate`.
      sequences: ``B`` token-id lists, each with at least ``count`` tokens.
      count: ``>= 1`` positions per sequence.

    Returns:
      ``[B, count, V]`` float32 normalised log-probabilities: entry ``[b, s]`` is
      ``log p(. | sequences[b][:len - count + s + 1])``, from one teacher-forced forward pass.
    """
    llm, tokenizer = validate_model(model)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"count: expected a positive int; got {count!r}.")
    if not sequences or min(len(s) for s in sequences) < count:
        raise ValueError(f"sequences: expected at least one sequence, each with at least count = {count} tokens.")
    pad = prompts_lib.pad_id(tokenizer)
    input_ids, mask = prompts_lib.left_pad(sequences, pad)
    _check_width(llm, input_ids.shape[1], "sequences: the longest sequence", "Shorten the sequences.")
    return _in_chunks(llm, input_ids, mask, pad, functools.partial(_last_log_probs, count=int(count)))
