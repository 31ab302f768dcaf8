"""The memory plan and the batch layout of a generation: host-side arithmetic, no JAX tracing.

A batch larger than the memory budget runs in equal chunks; every chunk is laid out with the
batch's largest row counts and bucketed shapes, so all chunks (and most later batches) reuse the
same compiled programs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import resource

import numpy as np

from jaxauction import prompts as prompts_lib
from jaxauction.engine.request import EncodedAuction, GenerateOptions, Request, real_scalar
from jaxauction.models.base import LanguageModel

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "ChunkLayout",
    "Plan",
    "bucket",
    "default_memory_budget",
    "make_plan",
    "memory_terms",
    "parse_memory_budget",
    "plan_chunks",
    "token_slots",
]

DEFAULT_MEMORY_BUDGET = 4 * 1024**3
"""Largest default working-memory budget of one generation chunk in bytes (4 GiB, model weights
excluded); see :func:`default_memory_budget`."""


def bucket(size: int) -> int:
    """``size`` rounded up to 8 values per octave above 16 (at most 12.5% padding): 17 -> 18, 100 -> 104."""
    if size <= 16:
        return size
    step = 1 << (size.bit_length() - 4)
    return -(-size // step) * step


def token_slots(max_new_tokens: int) -> int:
    """The token columns and cache slots a decode loop of ``max_new_tokens`` tokens is compiled for:
    rounded up to a multiple of 8 (1 -> 8, 48 -> 48, 50 -> 56), so that nearby lengths share the
    compiled programs. The loop still stops after ``max_new_tokens`` tokens; the extra columns are sliced off."""
    return -(-max_new_tokens // 8) * 8


def device_rows(real_rows: int) -> int:
    """The cache rows of one device's part of a chunk that holds ``real_rows`` real rows: bucketed
    (:func:`bucket`) and at least 2. The memory plan and the chunk layout both use it."""
    return bucket(max(2, real_rows))


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_memory_budget(value, *, argument: str = "memory_budget") -> int:
    """Bytes from an int/float or a string like ``"4GB"``, ``"512 MiB"``, ``"2e9"`` (binary units)."""
    if isinstance(value, str):
        match = _SIZE.match(value)
        number = None
        if match:
            number = float(match.group(1)) * _UNITS[(match.group(2) or "").lower()[:1]]
        else:
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is None or not math.isfinite(number) or number <= 0:
            raise ValueError(f"{argument}: expected a positive size like 4GB, 512MB or 2e9 (bytes); got {value!r}.")
        return int(number)
    number = real_scalar(value, argument, "a positive number of bytes or a size string like '4GB'")
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{argument}: expected a positive number of bytes; got {value!r}.")
    return int(number)


def _address_space_left() -> float:
    """Bytes of virtual address space this process may still map (``RLIMIT_AS``), inf without a limit."""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return math.inf
    try:
        with open("/proc/self/statm") as statm:
            used = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        used = 0
    return max(limit - used, 0)


def default_memory_budget() -> int:
    """``JAXAUCTION_MEMORY_BUDGET`` if set, else 4 GiB, lowered to a quarter of the address space a
    ``ulimit -v``/``prlimit --as`` leaves this process (XLA's temporary buffers and compilations need
    the rest), at least 64 MiB."""
    env = os.environ.get("JAXAUCTION_MEMORY_BUDGET")
    if env:
        return parse_memory_budget(env, argument="JAXAUCTION_MEMORY_BUDGET")
    return int(max(64 * 1024**2, min(DEFAULT_MEMORY_BUDGET, _address_space_left() / 4)))


def memory_terms(
    llm: LanguageModel, slots: int, cache_length: int, num_charged: int, token_slots: int
) -> tuple[int, int]:
    """``(row_bytes, auction_bytes)``: estimated peak working memory of the decode loop per cache row and
    per auction beyond its rows.

    Per cache row: what the model says one row of ``S = cache_length`` slots needs while decoding
    (:meth:`~jaxauction.models.base.LanguageModel.decode_row_bytes`: for a Llama its keys and values
    and one row's activations), and its logits ``V``. Per auction, for its ``slots = m`` slots: the logits and the
    rule/payment intermediates, about ``(8 + 2 n) V`` floats each (``log p``, ``q``, the closed form's
    ``[n, V]`` leave-one-out mixtures); plus the outputs ``T (n + 2)``, ``T = token_slots``.
    """
    vocab_size = llm.config.vocab_size
    vocab = vocab_size * 4 * (8 + 2 * num_charged)
    return llm.decode_row_bytes(cache_length) + 4 * vocab_size, slots * vocab + 4 * token_slots * (num_charged + 2)


def plan_chunks(
    num_auctions: int, auction_bytes: int, budget: int, devices: int = 1, chunk_bytes=None
) -> tuple[int, int]:
    """``(chunk_size, num_chunks)``: equal chunks of at most ``budget // auction_bytes`` auctions.

    The chunk size is bucketed (:func:`bucket`) and a multiple of ``devices``; the last chunk is
    padded with copies of the last auction (sliced off), so every chunk runs the same program.
    ``chunk_bytes``, if given, maps a chunk size to the chunk's actual bytes (which may exceed
    ``size * auction_bytes``, e.g. when its row count is bucketed too): the plan then shrinks the
    chunks until ``chunk_bytes(size) <= budget``, down to ``devices`` auctions.
    """
    fit = max(1, budget // max(auction_bytes, 1))
    fit = max(devices, fit // devices * devices)
    while True:
        num_chunks = -(-num_auctions // fit)
        size = bucket(-(-num_auctions // num_chunks))
        size = -(-size // devices) * devices
        if size > fit:  # bucketing overshot the budget: one more chunk
            num_chunks += 1
            size = -(-bucket(-(-num_auctions // num_chunks)) // devices) * devices
        if chunk_bytes is None or size <= devices or chunk_bytes(size) <= budget:
            return size, -(-num_auctions // size)
        fit = max(devices, min(fit - devices, fit * 15 // 16 // devices * devices))


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """The slots of one chunk of ``C`` auctions.

    Attributes:
      unique: the chunk's distinct token sequences (each prefilled once).
      source: ``[C, m]`` int32, the unique sequence of every slot (0 for absent slots).
      real: ``[C, m]`` bool, the slot is a real agent or base prompt.
      bids: ``[C, m]`` float64 bids (the base bid in slot ``n_max``, 0 for absent slots).
    """

    unique: list[tuple[int, ...]]
    source: np.ndarray
    real: np.ndarray
    bids: np.ndarray

    @classmethod
    def of(cls, auctions: list[EncodedAuction], n_max: int, has_base: bool) -> ChunkLayout:
        rows = n_max + int(has_base)
        index: dict[tuple[int, ...], int] = {}
        source = np.zeros((len(auctions), rows), np.int32)
        real = np.zeros((len(auctions), rows), bool)
        bids = np.zeros((len(auctions), rows), np.float64)
        for a, auction in enumerate(auctions):
            slots = list(range(len(auction.agents))) + ([n_max] if auction.base is not None else [])
            for slot, seq in zip(slots, auction.sequences):
                source[a, slot] = index.setdefault(seq, len(index))
                real[a, slot] = True
            bids[a, : len(auction.agents)] = auction.bids
            if auction.base is not None:
                bids[a, n_max] = auction.base_bid
        return cls(list(index), source, real, bids)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a request runs: chunk sizes, the prompt geometry and every chunk's layout.

    Attributes:
      chunk_size, num_chunks: equal chunks (the last padded with copies of the last auction).
      devices: the devices each chunk is split over.
      prefill_rows: the unique sequences prefilled per chunk (padded, bucketed).
      num_rows: ``P``, the cache rows of one device (bucketed, at least its real slots).
      width: the prompt slots of the cache (the longest prompt, bucketed); the tokens end there.
      prefix_length: the token prefix shared by every prompt of the batch (prefilled once), or 0.
      suffix_width: the width the prompts' remainders after that prefix are left-padded to.
      max_new_tokens: the tokens each auction may generate.
      token_slots: the compiled token columns (:func:`token_slots`).
      layouts: one :class:`ChunkLayout` per chunk.
      max_length: (derived) the cache's slots, ``width + token_slots``.
    """

    chunk_size: int
    num_chunks: int
    devices: int
    prefill_rows: int
    num_rows: int
    width: int
    prefix_length: int
    suffix_width: int
    max_new_tokens: int
    token_slots: int
    layouts: tuple[ChunkLayout, ...]

    @property
    def max_length(self) -> int:
        return self.width + self.token_slots


def _prompt_geometry(sequences, max_new_tokens: int, context: int) -> tuple[int, int, int, int]:
    """``(width, prefix_length, suffix_width, slots)``, ``slots`` the token columns (:func:`token_slots`,
    fewer where they would not fit the context); ValueError when the prompts do not fit."""
    longest = max(map(len, sequences))
    if longest + max_new_tokens > context:
        raise ValueError(
            f"prompts: the longest prompt has {longest} tokens; with max_new_tokens = "
            f"{max_new_tokens} that is {longest + max_new_tokens} > the model's context of {context}. Shorten the "
            "prompts or lower max_new_tokens."
        )
    slots = min(token_slots(max_new_tokens), context - longest)  # at least max_new_tokens (checked above)
    width = -(-longest // prompts_lib.PROMPT_BUCKET) * prompts_lib.PROMPT_BUCKET
    width = min(width, context - slots)
    prefix_length = prompts_lib.shared_prefix_length(sequences)
    suffix_width = min(-(-(longest - prefix_length) // 8) * 8, width - prefix_length) if prefix_length else width
    return width, prefix_length, suffix_width, slots


def make_plan(request: Request, llm: LanguageModel, options: GenerateOptions, budget: int, devices: int = 1) -> Plan:
    """The :class:`Plan` of ``request`` on ``devices`` devices within ``budget`` bytes per chunk."""
    auctions, n_max, max_new_tokens = request.auctions, request.n_max, options.max_new_tokens
    sequences = [seq for a in auctions for seq in a.sequences]
    width, prefix_length, suffix_width, slots = _prompt_geometry(
        sequences, max_new_tokens, llm.config.max_position_embeddings
    )
    max_length = width + slots
    # Every chunk is laid out with the batch's largest row count, bucketed: plan with the largest
    # auction's rows and the bucketed row count.
    cache_rows = max(len(a.sequences) for a in auctions)
    row_bytes, other_bytes = memory_terms(llm, request.slots, max_length, n_max, slots)
    chunk, num_chunks = plan_chunks(
        len(auctions),
        cache_rows * row_bytes + other_bytes,
        budget,
        devices,
        chunk_bytes=lambda size: devices * device_rows(size // devices * cache_rows) * row_bytes + size * other_bytes,
    )
    padded = auctions + [auctions[-1]] * (chunk * num_chunks - len(auctions))
    layouts = tuple(
        ChunkLayout.of(padded[c * chunk : (c + 1) * chunk], n_max, request.has_base) for c in range(num_chunks)
    )
    return Plan(
        chunk_size=chunk,
        num_chunks=num_chunks,
        devices=devices,
        prefill_rows=max(bucket(len(layout.unique)) for layout in layouts),
        num_rows=device_rows(max(int(layout.real.reshape(devices, -1).sum(axis=1).max()) for layout in layouts)),
        width=width,
        prefix_length=prefix_length,
        suffix_width=suffix_width,
        max_new_tokens=max_new_tokens,
        token_slots=slots,
        layouts=layouts,
    )
