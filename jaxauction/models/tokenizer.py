"""Tokenizers: built from GGUF metadata (byte-level BPE, no torch) or read from ``tokenizer.json``.

Both give a ``transformers.PreTrainedTokenizerFast`` with left padding (the model expects it), the
chat template, and ``eos_token_id``/``pad_token_id`` set.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

_CONTROL, _USER_DEFINED = 3, 4

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> the split Hugging Face's tokenizer.json uses.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, characters)))


def _pre_tokenizer(pre: str | None, source: str):
    """The pre-tokenizer for llama.cpp's ``tokenizer.ggml.pre`` name."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in (None, "default", "gpt2", "gpt-2"):
        return byte_level
    if pre == "smollm":  # llama.cpp: "\p{N}" then the GPT-2 split; SmolLM's tokenizer.json: Digits + ByteLevel
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )
    warnings.warn(
        f"{source}: unknown pre-tokenizer tokenizer.ggml.pre={pre!r}; using the GPT-2 split, so text may "
        "tokenize differently from llama.cpp.",
        stacklevel=3,
    )
    return byte_level


def tokenizer_from_gguf(metadata: Mapping[str, Any], *, source: str = "GGUF file") -> PreTrainedTokenizerFast:
    """A fast tokenizer from GGUF tokenizer metadata (``tokenizer.ggml.*`` and ``tokenizer.chat_template``).

    Supports byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``): the vocabulary and merges
    as stored, control tokens (type 3) as special added tokens, user-defined tokens (type 4) as added
    tokens, BOS prepended when ``tokenizer.ggml.add_bos_token`` is true.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{source}: tokenizer.ggml.model={kind!r} is not supported; only byte-level BPE ('gpt2') "
            "vocabularies can be built without torch. Export the model to a folder with tokenizer.json instead."
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    merges = metadata.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ValueError(f"{source}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing.")
    alphabet = set(bytes_to_unicode().values())
    spelling = bytes_to_unicode()
    token_types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if token_types[index] not in (_CONTROL, _USER_DEFINED) and not set(token) <= alphabet:
            token = "".join(spelling[byte] for byte in token.encode("utf-8"))
        vocab.setdefault(token, index)
    merge_pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _pre_tokenizer(metadata.get("tokenizer.ggml.pre"), source)
    backend.decoder = decoders.ByteLevel()
    added = [
        AddedToken(token, special=kind_ == _CONTROL, normalized=False)
        for token, kind_ in zip(tokens, token_types)
        if kind_ in (_CONTROL, _USER_DEFINED)
    ]
    backend.add_tokens(added)

    def token_of(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}")
        return None if index is None or not 0 <= index < len(tokens) else tokens[index]

    bos, eos, unk, pad = (
        token_of("bos_token_id"),
        token_of("eos_token_id"),
        token_of("unknown_token_id"),
        token_of("padding_token_id"),
    )
    byte_level_post = processors.ByteLevel(trim_offsets=False)
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        template = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
        backend.post_processor = processors.Sequence([byte_level_post, template])
    else:
        backend.post_processor = byte_level_post
    special = [token for token, kind_ in zip(tokens, token_types) if kind_ == _CONTROL]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad if pad is not None else eos,
        additional_special_tokens=[t for t in special if t not in (bos, eos, unk, pad)],
        chat_template=metadata.get("tokenizer.chat_template"),
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def tokenizer_from_folder(folder: Path) -> PreTrainedTokenizerFast:
    """``tokenizer.json`` (+ ``tokenizer_config.json``/``chat_template.jinja``) of a Hugging Face folder."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: jaxauction.models needs a fast tokenizer file next to config.json."
        )
    try:
        Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a plain Exception on malformed JSON
        raise ValueError(f"{path} is corrupted: {error}") from None
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
