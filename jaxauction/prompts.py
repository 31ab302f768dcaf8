"""Prompts to token ids: the chat template, left padding and the end tokens (one home for all callers)."""

from __future__ import annotations

import os
import re
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


def check_prompt(prompt, *, argument: str = "prompts") -> list[dict] | list[int]:
    """The one check of a prompt's form, without a tokenizer (so before any model loads).

    Returns the chat messages of a string (one user message) or of a list of ``{"role", "content"}``
    messages, or the token ids of a non-empty list of non-negative ints (NumPy ints and arrays too).
    ValueError naming ``argument`` otherwise: an empty or blank string, a message without string
    ``role`` and ``content``, a negative id, text that is not valid UTF-8 (a lone UTF-16 surrogate).
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{argument}: a prompt must be a non-empty string; got {prompt!r}.")
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
        and all(isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_)) for t in prompt)
    ):
        ids = [int(t) for t in prompt]
        if min(ids) < 0:
            raise ValueError(f"{argument}: token ids must be >= 0; got {min(ids)}.")
        return ids
    else:
        raise ValueError(
            f"{argument}: each prompt must be a non-empty string, a list of chat messages "
            f"({{'role': ..., 'content': ...}}) or a non-empty list of token ids; got {prompt!r:.80}."
        )
    for j, message in enumerate(messages):
        for key in ("role", "content"):
            try:
                message[key].encode("utf-8")
            except UnicodeEncodeError as error:
                where = argument if isinstance(prompt, str) else f"{argument}[{j}].{key}"
                raise ValueError(
                    f"{where}: character {error.start} ({message[key][error.start]!r}) cannot be encoded as UTF-8 "
                    "(a lone UTF-16 surrogate?); give valid text."
                ) from None
    return messages


def encode_prompt(tokenizer, prompt, *, argument: str = "prompts") -> list[int]:
    """Turns one prompt into token ids (its form checked by :func:`check_prompt`).

    A string becomes one user message passed through the tokenizer's chat template (with the
    assistant turn opened); a list of ``{"role", "content"}`` messages goes through the chat template
    as it is; a list of ints is used exactly as given (the way to send control tokens on purpose), and
    must lie in the vocabulary.

    Message text is untrusted: only the template's own structure becomes control tokens. A
    ``<|im_end|>`` (or any special token's string) inside a content is encoded as text, so it cannot
    close the turn; a role containing one is refused (see :func:`_chat_ids`).
    """
    checked = check_prompt(prompt, argument=argument)
    if checked and isinstance(checked[0], dict):
        return _chat_ids(tokenizer, checked, argument)
    vocab = len(tokenizer)
    bad = [t for t in checked if t >= vocab]
    if bad:
        raise ValueError(f"{argument}: token ids {bad[:5]} are outside the vocabulary [0, {vocab}).")
    return checked


def _chat_ids(tokenizer, messages: list[dict], argument: str) -> list[int]:
    """The chat template applied to ``messages``, with the special tokens of its own text only.

    The template is rendered twice: with the contents, and with a marker in place of each content. The
    marked text is the template's own: its special-token strings become their ids. The contents are put
    back where the markers were (as given, or stripped for a template that trims them; the result must
    be the first rendering) and are encoded with special tokens split, as text. Between two special
    tokens the text is encoded as one piece, as the tokenizer does itself, so a prompt without special
    strings gets the ids it always had. A tokenizer without special tokens (a test's minimal one) has
    nothing to inject and is used as it is.
    """
    specials = _special_tokens(tokenizer)
    if not specials:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return [int(t) for t in (ids["input_ids"] if hasattr(ids, "keys") else ids)]
    for j, message in enumerate(messages):
        found = [t for t in specials if t in message["role"]]
        if found:
            raise ValueError(
                f"{argument}[{j}]: the role {message['role']!r:.80} contains the control token {found[0]!r}."
            )
    pieces = _template_pieces(tokenizer, messages, specials, argument)
    return _encode_pieces(tokenizer, pieces, specials)


_MARK = re.compile("\ue000(\\d+)\ue001")


def _special_tokens(tokenizer) -> dict[str, tuple[int, bool, bool]]:
    """The tokenizer's special tokens (control tokens): string -> (id, lstrip, rstrip); empty for a minimal
    tokenizer. ``lstrip``/``rstrip``: the token takes the whitespace on its left/right, as in ``tokenizers``."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {
        token.content: (int(i), bool(getattr(token, "lstrip", False)), bool(getattr(token, "rstrip", False)))
        for i, token in decoder.items()
        if getattr(token, "special", False)
    }


def _template_pieces(tokenizer, messages, specials, argument) -> list[tuple[str, bool]]:
    """The rendered prompt as ``(text, is_content)`` pieces (see :func:`_chat_ids`)."""

    def render(messages):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    text = render(messages)
    marked = render([{**m, "content": f"\ue000{j}\ue001"} for j, m in enumerate(messages)])
    parts = _MARK.split(marked)  # template, index, template, index, ..., template
    for put_back in (lambda c: c, str.strip):
        pieces = [(parts[0], False)]
        for k in range(1, len(parts), 2):
            pieces += [(put_back(messages[int(parts[k])]["content"]), True), (parts[k + 1], False)]
        if "".join(piece for piece, _ in pieces) == text:
            return pieces
    found = [t for m in messages for t in specials if t in m["content"]]
    if not found:
        return [(text, False)]  # the template changes the contents, but they hold no control token
    raise ValueError(
        f"{argument}: the text contains the control token {found[0]!r}, and this tokenizer's chat template "
        "changes the messages in a way that keeps it from being encoded as plain text; remove it, or pass "
        "token ids."
    )


def _encode_pieces(tokenizer, pieces, specials) -> list[int]:
    """Token ids of ``(text, is_content)`` pieces: special tokens from the template's text only."""
    pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
    items: list[str | int] = [""]  # text runs and special ids, alternating
    for text, is_content in pieces:
        if is_content:
            items[-1] += text
            continue
        start = 0
        for match in pattern.finditer(text):
            items[-1] += text[start : match.start()]
            items += [specials[match.group()][0], ""]
            start = match.end()
        items[-1] += text[start:]
    flags = {i: (lstrip, rstrip) for i, lstrip, rstrip in specials.values()}
    for k in range(1, len(items), 2):  # items alternate: text, id, text, ..., id, text
        lstrip, rstrip = flags[items[k]]
        items[k - 1] = items[k - 1].rstrip() if lstrip else items[k - 1]
        items[k + 1] = items[k + 1].lstrip() if rstrip else items[k + 1]
    runs = [item for item in items if isinstance(item, str) and item]
    encoded = iter(tokenizer(runs, add_special_tokens=False, split_special_tokens=True)["input_ids"] if runs else [])
    ids: list[int] = []
    for item in items:
        if isinstance(item, int):
            ids.append(item)
        elif item:
            ids.extend(int(t) for t in next(encoded))
    return ids


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
