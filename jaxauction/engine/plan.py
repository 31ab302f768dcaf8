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

import jax
import numpy as np

from jaxauction import prompts as prompts_lib
from jaxauction.engine.request import EncodedAuction, GenerateOptions, Request, real_scalar
from jaxauction.models.base import LanguageModel

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "DEVICE_MEMORY_FRACTION",
    "ChunkLayout",
    "DeviceMemory",
    "Plan",
    "bucket",
    "default_memory_budget",
    "device_memory",
    "make_plan",
    "memory_terms",
    "parse_memory_budget",
    "plan_chunks",
    "token_slots",
]

DEFAULT_MEMORY_BUDGET = 4 * 1024**3
"""Largest default working-memory budget of one generation chunk on a host's CPU devices in bytes
(4 GiB, model weights excluded); see :func:`default_memory_budget`."""


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


DEVICE_MEMORY_FRACTION = 0.5
"""The share of an accelerator's free memory (``bytes_limit - bytes_in_use`` of its
``memory_stats()``) the default budget takes: the plan counts the live arrays, XLA's temporary
buffers and compiled programs need the rest."""


def _free_device_bytes(device) -> int | None:
    """``bytes_limit - bytes_in_use`` of ``device.memory_stats()``, or None when it reports none (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # a backend without memory statistics
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return max(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), 0)


def default_memory_budget(devices=None) -> int:
    """The working-memory budget of one device's part of a chunk, in bytes.

    ``JAXAUCTION_MEMORY_BUDGET`` if set. Else, when every device of ``devices`` (default: JAX's first
    device) this process holds reports its memory (GPU, TPU: ``memory_stats()["bytes_limit"]``),
    :data:`DEVICE_MEMORY_FRACTION` of the least free memory among them (what the weights already
    placed there leave), at least 64 MiB. Else (CPU) from host RAM: 4 GiB, lowered to a quarter of the
    address space a ``ulimit -v``/``prlimit --as`` leaves this process (XLA's temporary buffers and
    compilations need the rest), at least 64 MiB, shared by this process's devices among ``devices``.
    """
    env = os.environ.get("JAXAUCTION_MEMORY_BUDGET")
    if env:
        return parse_memory_budget(env, argument="JAXAUCTION_MEMORY_BUDGET")
    devices = jax.devices()[:1] if devices is None else list(devices)
    local = [device for device in devices if getattr(device, "process_index", 0) == jax.process_index()]
    free = [_free_device_bytes(device) for device in local]  # another host's devices report to it
    if local and all(f is not None for f in free):
        return int(max(64 * 1024**2, DEVICE_MEMORY_FRACTION * min(free)))
    host = int(max(64 * 1024**2, min(DEFAULT_MEMORY_BUDGET, _address_space_left() / 4)))
    return host // max(len(local), 1)


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """Estimated peak bytes on one device while a chunk runs (:func:`device_memory`).

    Attributes:
      weights: the model's weights on the device (``weight_bytes(model_size=t)``: ``1 / t`` of the
        split ones).
      cache: the ``P`` decode cache rows with their one-token activations (``1 / t`` of the
        key/value heads when they split over the ``"model"`` axis).
      prefill: the device's ``U`` distinct prompts: their cache rows and ``W``-token activations.
      logits: the float32 logits of the decode rows and of the prefilled rows, ``4 V`` each.
      auctions: the device's ``C / a`` auctions' rule and payment intermediates and outputs.
    """

    weights: int
    cache: int
    prefill: int
    logits: int
    auctions: int

    @property
    def working(self) -> int:
        """Every term but the weights: what the memory budget bounds."""
        return self.cache + self.prefill + self.logits + self.auctions


def device_memory(llm: LanguageModel, geometry: tuple[int, int, int], counts: tuple[int, int, int], shape):
    """The :class:`DeviceMemory` of one device's part of a chunk.

    ``geometry = (cache_length S, prompt width W, model_size t)``; ``counts = (cache rows P, prefilled
    rows U, auctions C / a)`` on the device; ``shape = (slots m, num_charged n, token_slots T)``.
    """
    cache_length, width, model_size = geometry
    rows, prefill_rows, auctions = counts
    slots, num_charged, token_slots = shape
    _, auction_bytes = memory_terms(llm, slots, cache_length, num_charged, token_slots)
    return DeviceMemory(
        weights=llm.weight_bytes(model_size=model_size),
        cache=rows * llm.decode_row_bytes(cache_length, model_size=model_size),
        prefill=prefill_rows * llm.decode_row_bytes(cache_length, model_size=model_size, tokens=width),
        logits=4 * llm.config.vocab_size * (rows + prefill_rows),
        auctions=auctions * auction_bytes,
    )


def memory_terms(
    llm: LanguageModel, slots: int, cache_length: int, num_charged: int, token_slots: int, model_size: int = 1
) -> tuple[int, int]:
    """``(row_bytes, auction_bytes)``: estimated peak working memory of the decode loop per cache row and
    per auction beyond its rows, on one device of a ``"model"`` axis of ``model_size`` devices.

    Per cache row: what the model says one row of ``S = cache_length`` slots needs while decoding
    (:meth:`~jaxauction.models.base.LanguageModel.decode_row_bytes`: for a Llama its keys and values
    and one row's activations), and its logits ``V``. Per auction, for its ``slots = m`` slots: the logits and the
    rule/payment intermediates, about ``(8 + 2 n) V`` floats each (``log p``, ``q``, the closed form's
    ``[n, V]`` leave-one-out mixtures); plus the outputs ``T (n + 2)``, ``T = token_slots``.
    """
    vocab_size = llm.config.vocab_size
    vocab = vocab_size * 4 * (8 + 2 * num_charged)
    row = llm.decode_row_bytes(cache_length, model_size=model_size) + 4 * vocab_size
    return row, slots * vocab + 4 * token_slots * (num_charged + 2)


def plan_chunks(
    num_auctions: int, auction_bytes: int, budget: int, devices: int = 1, chunk_bytes=None
) -> tuple[int, int]:
    """``(chunk_size, num_chunks)``: equal chunks of at most ``budget // auction_bytes`` auctions on
    each of ``devices`` devices (``budget`` is one device's).

    The chunk size is bucketed (:func:`bucket`) and a multiple of ``devices``; the last chunk is
    padded with copies of the last auction (sliced off), so every chunk runs the same program.
    ``chunk_bytes``, if given, maps a chunk size to one device's actual bytes of such a chunk (which
    may exceed ``size / devices * auction_bytes``, e.g. when its row count is bucketed too): the plan
    then shrinks the chunks until ``chunk_bytes(size) <= budget``, down to ``devices`` auctions.
    """
    fit = devices * max(1, budget // max(auction_bytes, 1))
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

    def device_sequences(self, devices: int) -> list[np.ndarray]:
        """The distinct sequences (indices into :attr:`unique`, ascending) of each device's real
        slots when the chunk's auctions are split over ``devices`` devices in order."""
        source, real = self.source.reshape(devices, -1), self.real.reshape(devices, -1)
        return [np.unique(source[d][real[d]]) for d in range(devices)]


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a request runs: chunk sizes, the prompt geometry and every chunk's layout.

    Attributes:
      chunk_size, num_chunks: equal chunks (the last padded with copies of the last auction).
      devices: the devices each chunk is split over (the mesh's ``"auctions"`` axis, ``a``).
      model_devices: the devices each model is split over (the mesh's ``"model"`` axis, ``t``).
      prefill_rows: ``U``, the distinct sequences each device prefills per chunk (padded, bucketed).
      num_rows: ``P``, the cache rows of one device (bucketed, at least its real slots).
      width: the prompt slots of the cache (the longest prompt, bucketed); the tokens end there.
      prefix_length: the token prefix shared by every prompt of the batch (prefilled once), or 0.
      suffix_width: the width the prompts' remainders after that prefix are left-padded to.
      max_new_tokens: the tokens each auction may generate.
      token_slots: the compiled token columns (:func:`token_slots`).
      layouts: one :class:`ChunkLayout` per chunk.
      memory: the estimated peak bytes of one device (:class:`DeviceMemory`).
      max_length: (derived) the cache's slots, ``width + token_slots``.
    """

    chunk_size: int
    num_chunks: int
    devices: int
    model_devices: int
    prefill_rows: int
    num_rows: int
    width: int
    prefix_length: int
    suffix_width: int
    max_new_tokens: int
    token_slots: int
    layouts: tuple[ChunkLayout, ...]
    memory: DeviceMemory

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


def make_plan(
    request: Request,
    llm: LanguageModel,
    options: GenerateOptions,
    budget: int,
    devices: int = 1,
    model_devices: int = 1,
) -> Plan:
    """The :class:`Plan` of ``request`` on a mesh of ``devices`` x ``model_devices`` devices (its
    ``"auctions"`` and ``"model"`` axes) within ``budget`` bytes of working memory per device."""
    auctions, n_max, max_new_tokens = request.auctions, request.n_max, options.max_new_tokens
    sequences = [seq for a in auctions for seq in a.sequences]
    width, prefix_length, suffix_width, slots = _prompt_geometry(
        sequences, max_new_tokens, llm.config.max_position_embeddings
    )
    geometry = (width + slots, suffix_width, model_devices)
    shape = (request.slots, n_max, slots)
    # Every chunk is laid out with the batch's largest row count, bucketed: plan with the largest
    # auction's rows and the bucketed row count; a device prefills at most its rows and at most the
    # batch's distinct sequences.
    cache_rows, distinct = max(len(a.sequences) for a in auctions), len(set(sequences))

    def memory(size: int) -> DeviceMemory:
        rows = size // devices * cache_rows
        return device_memory(llm, geometry, (device_rows(rows), bucket(min(rows, distinct)), size // devices), shape)

    row_bytes, other_bytes = memory_terms(llm, request.slots, width + slots, n_max, slots, model_devices)
    chunk, num_chunks = plan_chunks(
        len(auctions), cache_rows * row_bytes + other_bytes, budget, devices, chunk_bytes=lambda s: memory(s).working
    )
    padded = auctions + [auctions[-1]] * (chunk * num_chunks - len(auctions))
    layouts = tuple(
        ChunkLayout.of(padded[c * chunk : (c + 1) * chunk], n_max, request.has_base) for c in range(num_chunks)
    )
    prefill_rows = bucket(max(len(d) for layout in layouts for d in layout.device_sequences(devices)))
    num_rows = device_rows(max(int(layout.real.reshape(devices, -1).sum(axis=1).max()) for layout in layouts))
    return Plan(
        chunk_size=chunk,
        num_chunks=num_chunks,
        devices=devices,
        model_devices=model_devices,
        prefill_rows=prefill_rows,
        num_rows=num_rows,
        width=width,
        prefix_length=prefix_length,
        suffix_width=suffix_width,
        max_new_tokens=max_new_tokens,
        token_slots=slots,
        layouts=layouts,
        memory=device_memory(llm, geometry, (num_rows, prefill_rows, chunk // devices), shape),
    )
