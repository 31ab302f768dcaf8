"""Prompts to token ids: the chat template, left padding and the end tokens (one home for all callers)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

__all__ = [
    "PROMPT_BUCKET",
    "SHARED_PREFIX_MIN",
    "encode_prompt",
    "eos_ids",
    "left_pad",
    "pad_id",
    "shared_prefix_length",
]


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, or its EOS id when it has none."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def encode_prompt(tokenizer, prompt, *, argument: str = "prompts") -> list[int]:
    """Turns one prompt into token ids.

    A string becomes one user message passed through the tokenizer's chat template (with the
    assistant turn opened); a list of ``{"role", "content"}`` messages goes through the chat template
    as it is; a list of ints is used exactly as given.
    """
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        messages = list(prompt)
        for j, message in enumerate(messages):
            if not (isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
                raise ValueError(
                    f"{argument}[{j}]: a chat message must be a dict with string 'role' and 'content' keys, e.g. "
                    f"{{'role': 'user', 'content': 'Hi'}}; got {message!r:.80}."
                )
    elif (
        isinstance(prompt, (list, tuple, np.ndarray))
        and len(prompt) > 0
        and all(isinstance(t, (int, np.integer)) for t in prompt)
    ):
        ids = [int(t) for t in prompt]
        vocab = len(tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{argument}: token ids {bad[:5]} are outside the vocabulary [0, {vocab}).")
        return ids
    else:
        raise ValueError(
            f"{argument}: each prompt must be a non-empty string, a list of chat messages "
            f"({{'role': ..., 'content': ...}}) or a non-empty list of token ids; got {prompt!r:.80}."
        )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


PROMPT_BUCKET = 32


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, *, bucket: int = PROMPT_BUCKET, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``[m, P]`` left-padded ids and the attention mask.

    ``P`` is ``width`` if given, else the longest prompt rounded up to a multiple of ``bucket`` (default
    ``PROMPT_BUCKET``), so that prompts of similar lengths share one compiled program (padding is
    masked out and changes no logit); ``bucket=1`` pads to the longest prompt exactly.
    """
    longest = max(len(s) for s in sequences)
    if width is None:
        width = -(-longest // bucket) * bucket
    elif width < longest:
        raise ValueError(f"width: {width} is shorter than the longest sequence ({longest} tokens).")
    ids = np.full((len(sequences), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(sequences), width), dtype=np.int32)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    return ids, mask


SHARED_PREFIX_MIN = 16
"""The shortest token prefix (after rounding down to a multiple of 8) that :func:`shared_prefix_length`
reports: shorter common prefixes are not worth a separate prefill."""


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix common to all distinct ``sequences``, for prefilling it once.

    Rounded down to a multiple of 8 and short enough that every sequence keeps at least one token of
    its own; 0 when there are fewer than two distinct sequences or the prefix is shorter than
    :data:`SHARED_PREFIX_MIN` (read at call time).
    """
    distinct = {tuple(seq) for seq in sequences}
    if len(distinct) < 2:
        return 0
    common = min(len(os.path.commonprefix(list(distinct))), min(map(len, distinct)) - 1) // 8 * 8
    return common if common >= SHARED_PREFIX_MIN else 0


def eos_ids(llm, tokenizer) -> tuple[int, ...]:
    """The end-of-sequence token ids of a model and its tokenizer (all of them, sorted)."""
    ids = set()
    for value in (
        getattr(llm.config, "eos_token_id", None),
        getattr(llm.config, "eos_token_ids", None),
        tokenizer.eos_token_id,
    ):
        if value is None:
            continue
        ids.update([value] if isinstance(value, (int, np.integer)) else value)
    return tuple(sorted(int(i) for i in ids))
