"""Token-by-token auction generation with an LLM, for batches of different auctions.

An auction ``a`` has ``n_a`` agents (advertisers), each a prompt and a bid, and optionally a base
prompt (the platform's neutral prompt) that takes part with a fixed bid nobody pays for. A batch of
``A`` auctions is laid out as ``A * m`` rows, ``m = n_max (+ 1 if any auction has a base prompt)``:
row ``a * m + j`` is agent ``j`` of auction ``a`` (the base row last). An auction with fewer agents
(or without a base prompt) is padded with absent rows: zero bid and every logit ``-inf``, which the
built-in rules treat as an agent without any allowed token, i.e. with no effect on ``q`` or on any
payment (docs/maths.md §2), and which are never charged.

All auctions are decoded together in one compiled ``lax.while_loop``: at each step the rule forms
``log q: [A, V]`` from the agents' next-token logits, one token is drawn per auction, every agent is
charged its payment for that token (:func:`jaxauction.payments.charged_payments`: closed form for the
linear rule), and the token is appended to all ``m`` contexts of its auction.

The model decodes distinct token sequences, not slots: slots whose sequences are equal (the same
prompt and the same tokens so far, as in a bid sweep, where every auction starts from the same ``n``
prompts and greedy decoding keeps many of them together for a while) share one KV-cache row, a
sequence that diverges from its row takes a free row with a copy of the cache (:func:`next_rows`),
and rows of finished auctions are freed. The live rows are kept first in the cache, so each step
runs the model on a slice of it, at the smallest of a few compiled batch sizes that holds them
(:func:`row_capacities`). Prefill is
shared the same way: identical sequences anywhere in a chunk are prefilled once. A batch larger
than the memory budget runs in equal chunks (see :func:`plan_chunks`); shapes are bucketed (prompt
length to 32 tokens, batch size to 8 sizes per octave) so a new batch rarely compiles a new program,
and the compiled programs are kept in a persistent cache across processes
(:func:`enable_compilation_cache`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxauction import _validation, base, payments, sampling, sharding
from jaxauction import prompts as prompts_lib
from jaxauction.auction import payment_allocation

__all__ = [
    "Auction",
    "DEFAULT_MEMORY_BUDGET",
    "GenerationResult",
    "auction_step",
    "enable_compilation_cache",
    "generate",
    "next_rows",
    "parse_memory_budget",
    "plan_chunks",
    "row_capacities",
]

Rule = Callable[[jax.Array, jax.Array], jax.Array]

DECODINGS = ("sample", "greedy", "stable")

"""The largest accepted bid (about 3.4e32): bid sums and ratios stay finite in float32."""

DEFAULT_MEMORY_BUDGET = 4 * 1024**3
"""Default working-memory budget of one generation chunk in bytes (4 GiB, model weights excluded);
override with ``memory_budget=`` or the ``JAXAUCTION_MEMORY_BUDGET`` environment variable."""


@dataclasses.dataclass(frozen=True)
class Auction:
    """One auction of a heterogeneous batch (see :func:`generate`).

    Attributes:
      prompts: the ``n`` agents' prompts: each a string (the tokenizer's chat template is applied), a
        list of ``{"role", "content"}`` chat messages, or a list of token ids (used exactly as given).
      bids: ``[n]`` non-negative bids, one per prompt.
      base_prompt: optional platform prompt that takes part with ``base_bid`` and is never charged.
      base_bid: the base prompt's fixed bid (>= 0).
    """

    prompts: Sequence[Any]
    bids: Sequence[float]
    base_prompt: Any = None
    base_bid: float = 0.0


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What an auction generation returns (numpy arrays, host side).

    Attributes:
      tokens: ``[A, T]`` generated token ids, ``T = max_new_tokens``; after an auction ends (its EOS
        token included) the row holds the tokenizer's pad id.
      lengths: ``[A]`` number of generated tokens, EOS included.
      texts: ``A`` decoded strings (special tokens removed).
      payments: ``[A, n]`` each agent's total payment over the tokens of its auction (``n = n_max``,
        the batch's largest agent count; 0 for the padded agents of smaller auctions; NaN for every
        agent of an auction that is not ``valid``).
      token_payments: ``[A, T, n]`` the payment for every token (0 after the auction ended; NaN at the
        step where an invalid auction broke).
      bids: ``[A, n]`` the bids the auctions ran with (0 for padded agents).
      num_agents: ``[A]`` each auction's number of agents ``n_a``.
      valid: ``[A]`` False for an auction whose distribution ``q`` (or payment) was ever non-finite
        (NaN/inf logits, a rule returning NaN): it stopped at that step, its text is what came before.
    For a single auction (``bids: [n]`` or one :class:`Auction`) the ``A`` axis is dropped from the
    arrays and ``texts`` is a list holding one string (``text`` gives it directly).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    texts: list[str]
    payments: np.ndarray
    token_payments: np.ndarray
    bids: np.ndarray
    num_agents: np.ndarray
    valid: np.ndarray

    @property
    def text(self) -> str:
        """The first (for a single auction, the only) generated text."""
        return self.texts[0]


# ----------------------------------------------------------------------------------------------
# Model handling and the persistent compilation cache.

_DEFAULT_MODEL: tuple[Any, Any] | None = None


def default_model() -> tuple[Any, Any]:
    """Loads the bundled SmolLM2-135M-Instruct once per process and caches it."""
    global _DEFAULT_MODEL
    if _DEFAULT_MODEL is None:
        from jaxauction import models

        _DEFAULT_MODEL = models.load()
    return _DEFAULT_MODEL


_CACHE_STATE: dict[str, Any] = {}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/jaxauction/xla`` (default ``~/.cache/jaxauction/xla``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "jaxauction" / "xla"


def enable_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache for this process (once), unless already configured.

    The folder is ``JAXAUCTION_CACHE_DIR`` if set (an empty string or ``"off"`` disables the cache),
    else :func:`default_cache_dir`. Nothing changes when the user configured a cache already
    (``jax_compilation_cache_dir`` or ``JAX_COMPILATION_CACHE_DIR``). Every program taking at least
    0.1 s to compile is stored, so a second process reuses the decode loop instead of compiling it.
    Called by :func:`generate`; returns the folder in use, or None.
    """
    if "dir" in _CACHE_STATE:
        return _CACHE_STATE["dir"]
    configured = jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    setting = os.environ.get("JAXAUCTION_CACHE_DIR")
    if configured:
        folder = str(configured)
    elif setting is not None and setting.strip().lower() in ("", "off"):
        folder = None
    else:
        folder = str(Path(setting).expanduser()) if setting else str(default_cache_dir())
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError:
            folder = None  # an unwritable cache folder must not stop a generation
        if folder is not None:
            from jax.experimental.compilation_cache import compilation_cache

            jax.config.update("jax_compilation_cache_dir", folder)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
            compilation_cache.reset_cache()  # JAX decides once per process whether to use the cache
    _CACHE_STATE["dir"] = folder
    return folder


# ----------------------------------------------------------------------------------------------
# One auction step and the compiled decode loop.


def auction_step(logits, bids, key, *, rule: Rule, payment: str | None, decoding: str, num_charged: int):
    """One token of ``A`` auctions.

    Args:
      logits: ``[A, m, V]`` next-token logits of every row: the ``n = num_charged`` agents first,
        then the base row if ``m = n + 1``. An absent (padded) row has every logit ``-inf``.
      bids: ``[A, m]`` bids (the base row's fixed bid last; 0 for absent rows).
      key: ``[A]`` PRNG keys, one per auction.
      rule: aggregation rule ``(logits [..., m, V], bids [..., m]) -> log q [..., V]``.
      payment: ``"second_price"`` (robust allocation), ``"kl"`` or ``None``.
      decoding: ``"sample"``, ``"greedy"`` or ``"stable"`` (two agents, linear rule, no base row).
      num_charged: ``n``, the number of rows that pay (the base row never pays).

    Returns:
      ``(token [A], payments [A, n], ok [A])``: ``ok`` is False where ``q`` had a NaN or ``+inf``, no
      token with positive probability, or a payment was not finite (the caller flags the auction;
      its token and payments are then meaningless).
    """
    if decoding == "stable":
        token, charged = jax.vmap(sampling.stable_sample_two)(key, logits, bids)
        ok = jnp.all(~jnp.isnan(logits) & (logits < jnp.inf), axis=(-2, -1))
        return token, charged, ok & jnp.all(jnp.isfinite(charged), axis=-1)
    log_q = rule(logits, bids)
    ok = jnp.all(~jnp.isnan(log_q) & (log_q < jnp.inf), axis=-1) & jnp.any(log_q > -jnp.inf, axis=-1)
    if payment is None:
        charged = jnp.zeros(bids.shape[:-1] + (num_charged,), logits.dtype)
    else:
        allocation = "robust" if payment == "second_price" else "kl"
        charged = payments.charged_payments(rule, logits, bids, num_charged=num_charged, allocation=allocation)
        ok &= jnp.all(jnp.isfinite(charged), axis=-1)
    if decoding == "greedy":
        token = jnp.argmax(log_q, axis=-1)
    else:
        token = jax.vmap(jax.random.categorical)(key, log_q)
    return token, charged, ok


_STATIC = (
    "graphdef",
    "rule",
    "payment",
    "decoding",
    "num_charged",
    "max_new_tokens",
    "pad_id",
    "eos_ids",
    "capacities",
    "progress",
)


def row_capacities(num_rows: int) -> tuple[int, ...]:
    """The batch sizes the decode loop compiles for ``num_rows`` physical rows: 2, 4, 8, ... below
    ``num_rows``, then ``num_rows`` itself. Each step runs the model on the smallest one that holds the
    step's distinct live rows. (Adding 1.5x sizes, 12, 24, 48, ..., saved about 1% of the mixed
    benchmark's time and made the first call 30% (sweep) to 48% (mixed batch) slower.)"""
    return (*(2**k for k in range(1, num_rows.bit_length()) if 2**k < num_rows), num_rows)


def next_rows(slot_rows, token, live, num_rows: int):
    """The rows of the next step, compacted: one per distinct ``(row, token)`` continuation of a live
    slot, in rows ``0 .. count - 1``.

    Slots whose row and new token agree continue identical token sequences, so they keep sharing one
    row. The first continuation (lowest token) of a row keeps it if the row is below ``count``;
    every other continuation, and a kept row at or above ``count``, moves to a *hole* (a row below
    ``count`` that no continuation keeps), which must first receive a copy of its source's cache.
    Sources are always kept rows and targets never are, so the copies can run in any order. Keeping
    the live rows first lets the model read a slice of the cache (:meth:`KVCache.first_rows`):
    gathering the rows instead measured 1.3-1.5x slower per decode step at 8 to 22 rows and 160
    slots (micro-benchmark).

    Args:
      slot_rows: ``[A, m]`` int, the row each auction slot reads now. token: ``[A]`` the auctions' new
        tokens. live: ``[A, m]`` bool, the slot continues (a real agent of a running auction).
      num_rows: ``P``, the number of rows; at most ``P`` slots may be live.

    Returns:
      ``(slot_rows [A, m], row_tokens [P], count, copy_from [P], copy_to [P], copies)``: each slot's new
      row (dead slots get 0), the new token of every row (0 from ``count`` on), the number of live
      rows, and the ``copies`` copies ``copy_from[i] -> copy_to[i]`` to make first.
    """
    shape = slot_rows.shape
    rows = jnp.arange(num_rows)
    parent = jnp.where(live, slot_rows, num_rows).reshape(-1)  # dead slots sort last
    child_token = jnp.where(live, token[:, None], 0).reshape(-1)
    order = jnp.lexsort((child_token, parent))
    sorted_parent, sorted_token = parent[order], child_token[order]
    new_parent = jnp.concatenate([jnp.ones((1,), bool), sorted_parent[1:] != sorted_parent[:-1]])
    new_child = new_parent | jnp.concatenate([jnp.ones((1,), bool), sorted_token[1:] != sorted_token[:-1]])
    alive = sorted_parent < num_rows
    starts = new_child & alive  # the first slot of each distinct continuation
    keeps = new_parent & alive  # ... that continues its parent's row
    forks = starts & ~new_parent
    count = jnp.sum(starts)
    kept = jnp.zeros((num_rows + 1,), bool).at[jnp.where(keeps, sorted_parent, num_rows)].set(True)[:num_rows]
    movers = kept & (rows >= count)
    holes = jnp.nonzero(~kept & (rows < count), size=num_rows, fill_value=0)[0]
    num_movers = jnp.sum(movers)
    mover_rank = jnp.cumsum(movers) - 1  # [P], a mover's index among the movers
    fork_rank = num_movers + jnp.cumsum(forks) - 1  # forks take the holes after the movers
    safe_parent = jnp.clip(sorted_parent, 0, num_rows - 1)
    kept_row = jnp.where(sorted_parent < count, sorted_parent, holes[jnp.clip(mover_rank[safe_parent], 0, None)])
    start_row = jnp.where(keeps, kept_row, holes[jnp.clip(fork_rank, 0, num_rows - 1)]).astype(jnp.int32)
    child = jnp.cumsum(starts) - 1  # continuation index of every sorted slot
    child_row = jnp.zeros((num_rows,), jnp.int32).at[jnp.where(starts, child, num_rows)].set(start_row, mode="drop")
    row_tokens = (
        jnp.zeros((num_rows,), jnp.int32)
        .at[jnp.where(starts, start_row, num_rows)]
        .set(sorted_token.astype(jnp.int32), mode="drop")
    )
    sorted_rows = jnp.where(alive, child_row[jnp.clip(child, 0, num_rows - 1)], 0)
    new_slot_rows = jnp.zeros_like(sorted_rows).at[order].set(sorted_rows).reshape(shape)
    # Copy i fills holes[i]: from the i-th mover, or from the parent of fork i - (number of movers).
    mover_rows = jnp.nonzero(movers, size=num_rows, fill_value=0)[0]
    fork_parents = (
        jnp.zeros((num_rows,), jnp.int32)
        .at[jnp.where(forks, fork_rank, num_rows)]
        .set(sorted_parent.astype(jnp.int32), mode="drop")
    )
    copy_from = jnp.where(rows < num_movers, mover_rows, fork_parents).astype(jnp.int32)
    copies = num_movers + jnp.sum(forks)
    return new_slot_rows, row_tokens, count, copy_from, holes.astype(jnp.int32), copies


def _copy_rows(cache, sources, targets, count):
    """Copies cache rows ``sources[i] -> targets[i]`` for ``i < count`` in place (targets are free rows)."""

    def copy(i, cache):
        source, target = sources[i], targets[i]
        zero = jnp.zeros((), jnp.int32)

        def move(x, axis):
            start = [zero] * x.ndim
            size = list(x.shape)
            start[axis], size[axis] = source, 1
            block = jax.lax.dynamic_slice(x, start, size)
            start[axis] = target
            return jax.lax.dynamic_update_slice(x, block, start)

        return cache.replace(
            k=move(cache.k, 1), v=move(cache.v, 1), valid=move(cache.valid, 0), positions=move(cache.positions, 0)
        )

    return jax.lax.fori_loop(0, count, copy, cache)


def _decode_rows(capacity, graphdef, state, cache, tokens):
    """The model on the first ``capacity`` rows of ``cache`` (with ``tokens: [P]``), reading the cache.

    Returns ``(logits [P, V], keys [L, P, K, hd], values [L, P, K, hd])``, zero from ``capacity`` on
    (those rows are free: past the step's ``count``). The cache is only read here: writing it inside
    a ``lax.switch`` branch would copy it."""
    logits, keys, values = nnx.merge(graphdef, state).decode_kv(tokens[:capacity], cache.first_rows(capacity))
    missing = cache.batch_size - capacity
    return jnp.pad(logits, ((0, missing), (0, 0))), *(
        jnp.pad(x, ((0, 0), (0, missing), (0, 0), (0, 0))) for x in (keys, values)
    )


def _decode_loop(
    graphdef,
    state,
    cache,
    logits,
    bids,
    real,
    slot_rows,
    keys,
    temperature,
    *,
    rule,
    payment,
    decoding,
    num_charged,
    max_new_tokens,
    pad_id,
    eos_ids,
    capacities,
    progress=False,
):
    """The compiled auction decode loop; see :func:`generate`.

    The cache holds ``P = capacities[-1]`` rows, the live ones first; ``logits: [P, V]`` are the
    next-token logits of its rows after the prompts and ``slot_rows: [A, m]`` the row of each auction
    slot (slots with the same token sequence share a row). ``bids: [A, m]``, ``real: [A, m]`` (False
    for absent slots: their logits become ``-inf``), ``keys: [A]``, ``temperature`` a scalar dividing
    the agents' logits.

    Each step: the auction step on every auction, then :func:`next_rows` (slots that continue the same
    sequence share a row, a continuation that diverges from its row forks a copy of it, rows of
    finished auctions are freed, live rows are compacted to the front), then the model on the first
    rows only, at the smallest of ``capacities`` that holds the live ones (one ``lax.switch`` branch
    per capacity), and the new keys and values appended. A finished auction's tokens are ``pad_id``
    and its payments 0. An auction whose step is not ``ok`` (see :func:`auction_step`) stops there: token ``pad_id``, NaN payments for its real
    agents at that step, and ``valid`` False.

    Returns ``(tokens [A, T], token_payments [A, T, n], lengths [A], valid [A])``.
    """
    num_auctions = bids.shape[0]
    num_rows = capacities[-1]
    eos = jnp.asarray(eos_ids, jnp.int32)
    charged_real = real[:, :num_charged]
    tokens = jnp.full((num_auctions, max_new_tokens), pad_id, jnp.int32)
    token_payments = jnp.zeros((num_auctions, max_new_tokens, num_charged), logits.dtype)
    done = jnp.zeros((num_auctions,), bool)
    valid = jnp.ones((num_auctions,), bool)
    lengths = jnp.zeros((num_auctions,), jnp.int32)
    branches = [functools.partial(_decode_rows, capacity, graphdef) for capacity in capacities]

    def cond(carry):
        step, done = carry[0], carry[5]
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, slot_rows, tokens, done, token_payments, valid, lengths = carry
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        rows = jnp.take(logits / temperature, slot_rows, axis=0, mode="clip")
        rows = jnp.where(real[..., None], rows, -jnp.inf)
        token, charged, ok = auction_step(
            rows, bids, step_keys, rule=rule, payment=payment, decoding=decoding, num_charged=num_charged
        )
        broken = ~done & ~ok
        token = jnp.where(done | broken, pad_id, token.astype(jnp.int32))
        charged = jnp.where(
            broken[:, None] & charged_real, jnp.nan, jnp.where(done[:, None] | broken[:, None], 0, charged)
        )
        tokens = tokens.at[:, step].set(token)
        token_payments = token_payments.at[:, step].set(charged.astype(token_payments.dtype))
        lengths = lengths + (~done & ~broken).astype(jnp.int32)
        valid = valid & ~broken
        done = done | broken | jnp.isin(token, eos)
        if progress:
            jax.debug.callback(_report_progress, step)
        slot_rows, row_tokens, count, copy_from, copy_to, copies = next_rows(
            slot_rows, token, real & ~done[:, None], num_rows
        )
        cache = _copy_rows(cache, copy_from, copy_to, copies)
        branch = jnp.searchsorted(jnp.asarray(capacities), count)
        logits, new_keys, new_values = jax.lax.switch(branch, branches, state, cache, row_tokens)
        # Every row is written (free rows get zeros, and a copy before they are read again).
        cache = cache.append(new_keys[:, :, None], new_values[:, :, None], jnp.ones((num_rows, 1), bool))
        return step + 1, cache, logits, slot_rows, tokens, done, token_payments, valid, lengths

    carry = (jnp.int32(0), cache, logits, slot_rows, tokens, done, token_payments, valid, lengths)
    carry = jax.lax.while_loop(cond, body, carry)
    tokens, _, token_payments, valid, lengths = carry[4:]
    return tokens, token_payments, lengths, valid


def _decode(graphdef, state, cache, logits, bids, real, slot_rows, keys, temperature, *, mesh, **static):
    """:func:`_decode_loop`, or with a ``mesh`` one loop per device over its own auctions and rows
    (``jax.shard_map``: every array is split along its batch axis, the weights are replicated)."""
    loop = functools.partial(_decode_loop, graphdef, **static)
    if mesh is None:
        return loop(state, cache, logits, bids, real, slot_rows, keys, temperature)
    split, whole = jax.sharding.PartitionSpec(sharding.AXIS), jax.sharding.PartitionSpec()
    rows_split = jax.sharding.PartitionSpec(None, sharding.AXIS)
    cache_specs = cache.replace(k=rows_split, v=rows_split, valid=split, positions=split, index=whole)
    in_specs = (whole, cache_specs, split, split, split, split, split, whole)
    sharded = jax.shard_map(loop, mesh=mesh, in_specs=in_specs, out_specs=split, check_vma=False)
    return sharded(state, cache, logits, bids, real, slot_rows, keys, temperature)


@functools.cache
def _compiled_decode():
    """The decode loop jitted with the model's CPU compiler options."""
    from jaxauction.models import compiler_options

    return jax.jit(_decode, static_argnames=(*_STATIC, "mesh"), compiler_options=compiler_options() or None)


def _prefill(graphdef, state, prefix_ids, input_ids, attention_mask, rows, cache):
    """Prefill the unique sequences once, then gather the cache rows ``rows: [P]`` and their logits.

    ``prefix_ids: [1, c]`` (or None) is the token prefix common to all ``U`` unique sequences: it is
    prefilled once into the one-row ``cache`` and copied to ``U`` rows, then ``input_ids: [U, T]``
    (the sequences' remainders, left-padded) continue it; without a prefix, ``cache`` has ``U`` rows
    and ``input_ids`` are the whole sequences. (The empty cache is an argument: created inside ``jit``
    it would be a constant that XLA spends a minute folding on a 135M model.)"""
    model = nnx.merge(graphdef, state)
    if prefix_ids is not None:
        _, cache = model.prefill(prefix_ids, None, cache)
        cache = cache.take_rows(jnp.zeros((input_ids.shape[0],), jnp.int32))
    logits, cache = model.prefill(input_ids, attention_mask, cache)
    return jnp.take(logits, rows, axis=0), cache.take_rows(rows)


@functools.cache
def _compiled_prefill():
    from jaxauction.models import compiler_options

    return jax.jit(_prefill, static_argnames=("graphdef",), compiler_options=compiler_options() or None)


# ----------------------------------------------------------------------------------------------
# Validation of the public arguments.


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def _real_scalar(value, argument: str, expected: str):
    """A Python/NumPy real number (not bool, not a string, not an array), else ValueError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0 and not isinstance(value, np.bool_):
            if np.issubdtype(np.asarray(value).dtype, np.number) and np.asarray(value).dtype != bool:
                return float(value)
        raise ValueError(f"{argument}: expected {expected}; got {_describe(value)}.")
    return float(value)


def _numeric_array(values, argument: str, expected: str) -> np.ndarray:
    """``values`` as a float64 array; strings, booleans, ragged lists and objects are a ValueError."""
    try:
        raw = np.asarray(values)
    except ValueError:
        raw = None
    if raw is None or raw.dtype == object or raw.dtype.kind not in "iuf":
        what = "a ragged list" if raw is None or raw.dtype == object else f"dtype {raw.dtype}"
        raise ValueError(f"{argument}: expected {expected} of numbers; got {what}: {values!r:.120}.")
    return raw.astype(np.float64)


def _validate_keys(key, num_auctions: int):
    if key is None:
        key = jax.random.key(0)
    if isinstance(key, (str, bytes, bool)) or not (
        isinstance(key, (jax.Array, np.ndarray)) or isinstance(key, (list, tuple))
    ):
        raise ValueError(
            f"key: expected a PRNG key (jax.random.key(seed)) or [A] keys (jax.random.split(key, A)); got "
            f"{_describe(key)}."
        )
    try:
        key = key if isinstance(key, jax.Array) else jnp.asarray(key)
    except (TypeError, ValueError):
        raise ValueError(f"key: expected a PRNG key (jax.random.key(seed)); got {_describe(key)}.") from None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        typed = key
    elif key.dtype == jnp.uint32 and key.shape[-1:] == (2,):
        typed = jax.random.wrap_key_data(key)
    else:
        raise ValueError(
            f"key: expected a PRNG key (jax.random.key(seed)) or [A] keys; got dtype {key.dtype} and shape {key.shape}."
        )
    if typed.ndim == 0:
        return jax.random.split(typed, num_auctions)
    if typed.shape != (num_auctions,):
        raise ValueError(
            f"key: a batch of keys must have shape [A] = ({num_auctions},); got "
            f"{typed.shape}. Pass one key to have it split per auction."
        )
    return typed


def _validate_model(model):
    if model is None:
        model = default_model()
    try:
        llm, tokenizer = model
    except (TypeError, ValueError):
        raise ValueError(
            "model: expected the (model, tokenizer) pair returned by jaxauction.models.load(...); got "
            f"{_describe(model)}."
        ) from None
    if not all(hasattr(llm, name) for name in ("config", "init_cache", "prefill", "decode_kv")):
        raise ValueError(
            "model: the first element must be the language model (a jaxauction.models.Llama) and the second "
            f"its tokenizer, as jaxauction.models.load(...) returns them; got ({_describe(llm)}, "
            f"{_describe(tokenizer)})."
        )
    if not hasattr(tokenizer, "decode") or not (
        hasattr(tokenizer, "pad_token_id") or hasattr(tokenizer, "eos_token_id")
    ):
        raise ValueError(
            "model: the second element must be the tokenizer (with decode, pad_token_id, eos_token_id), as "
            f"jaxauction.models.load(...) returns it; got {_describe(tokenizer)}."
        )
    return llm, tokenizer


def _validate_mesh(mesh):
    if mesh is None:
        return None
    if not isinstance(mesh, jax.sharding.Mesh) or sharding.AXIS not in mesh.axis_names:
        raise ValueError(
            f"mesh: expected None or a jax.sharding.Mesh with an {sharding.AXIS!r} axis, e.g. "
            f"jaxauction.sharding.auction_mesh() or auction_mesh(jax.devices()[:4]); got {_describe(mesh)}."
        )
    return mesh


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
    number = _real_scalar(value, argument, "a positive number of bytes or a size string like '4GB'")
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{argument}: expected a positive number of bytes; got {value!r}.")
    return int(number)


def _memory_budget(value) -> int:
    if value is not None:
        return parse_memory_budget(value)
    env = os.environ.get("JAXAUCTION_MEMORY_BUDGET")
    if env:
        return parse_memory_budget(env, argument="JAXAUCTION_MEMORY_BUDGET")
    return DEFAULT_MEMORY_BUDGET


def _validate_rule_output(rule_fn: base.Rule, rows: int, vocab: int, dtype) -> None:
    """A user rule must map ``[A, m, V], [A, m]`` to ``[A, V]``: checked on shapes, without running it."""
    try:
        out = jax.eval_shape(
            rule_fn, jax.ShapeDtypeStruct((2, rows, vocab), dtype), jax.ShapeDtypeStruct((2, rows), dtype)
        )
    except Exception as error:  # noqa: BLE001 - any failure of a user rule is reported by name
        raise ValueError(
            f"rule: calling rule(logits [A, m, V], bids [A, m]) with A = 2, m = {rows}, V = {vocab} failed: "
            f"{type(error).__name__}: {str(error)[:200]}"
        ) from None
    if not hasattr(out, "shape") or tuple(out.shape) != (2, vocab):
        got = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
        raise ValueError(
            f"rule: expected rule(logits [A, m, V], bids [A, m]) to return log q of shape [A, V] = (2, {vocab}) "
            f"for A = 2, m = {rows}; got {got}. A rule aggregates over the agent axis (-2)."
        )


# ----------------------------------------------------------------------------------------------
# Batch layout, memory plan and shape buckets.


def _bucket(size: int) -> int:
    """``size`` rounded up to 8 values per octave above 16 (at most 12.5% padding): 17 -> 18, 100 -> 104."""
    if size <= 16:
        return size
    step = 1 << (size.bit_length() - 4)
    return -(-size // step) * step


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One auction as token ids: ``agents`` (n tuples), ``bids [n]``, ``base`` (tuple or None)."""

    agents: tuple[tuple[int, ...], ...]
    bids: np.ndarray
    base: tuple[int, ...] | None
    base_bid: float


def _memory_terms(llm, slots: int, cache_length: int, num_charged: int, max_new_tokens: int) -> tuple[int, int]:
    """``(row_bytes, auction_bytes)``: estimated peak working memory of the decode loop per cache row and
    per auction beyond its rows.

    Per cache row: the KV cache ``2 L S K hd`` (model dtype) and the hidden/MLP activations of one
    row. Per auction, for its ``slots = m`` slots: the logits and the rule/payment intermediates,
    about ``(8 + 2 n) V`` floats each (``log p``, ``q``, the closed form's ``[n, V]`` leave-one-out
    mixtures); plus the outputs ``T (n + 2)``.
    """
    config = llm.config
    itemsize = jnp.dtype(llm.dtype).itemsize
    kv = 2 * config.num_layers * cache_length * config.num_kv_heads * config.head_dim * itemsize
    hidden = 4 * (8 * config.hidden_size + 3 * config.intermediate_size + config.num_heads * cache_length)
    vocab = config.vocab_size * 4 * (8 + 2 * num_charged)
    return kv + hidden, slots * vocab + 4 * max_new_tokens * (num_charged + 2)


def _device_rows(real_rows: int) -> int:
    """The cache rows of one device's part of a chunk that holds ``real_rows`` real rows: bucketed
    (:func:`_bucket`) and at least 2. The memory plan and the chunk layout both use it."""
    return _bucket(max(2, real_rows))


def plan_chunks(
    num_auctions: int, auction_bytes: int, budget: int, devices: int = 1, chunk_bytes=None
) -> tuple[int, int]:
    """``(chunk_size, num_chunks)``: equal chunks of at most ``budget // auction_bytes`` auctions.

    The chunk size is bucketed (:func:`_bucket`) and a multiple of ``devices``; the last chunk is
    padded with copies of the last auction (sliced off), so every chunk runs the same program.
    ``chunk_bytes``, if given, maps a chunk size to the chunk's actual bytes (which may exceed
    ``size * auction_bytes``, e.g. when its row count is bucketed too): the plan then shrinks the
    chunks until ``chunk_bytes(size) <= budget``, down to ``devices`` auctions.
    """
    fit = max(1, budget // max(auction_bytes, 1))
    fit = max(devices, fit // devices * devices)
    while True:
        num_chunks = -(-num_auctions // fit)
        size = _bucket(-(-num_auctions // num_chunks))
        size = -(-size // devices) * devices
        if size > fit:  # bucketing overshot the budget: one more chunk
            num_chunks += 1
            size = -(-_bucket(-(-num_auctions // num_chunks)) // devices) * devices
        if chunk_bytes is None or size <= devices or chunk_bytes(size) <= budget:
            return size, -(-num_auctions // size)
        fit = max(devices, min(fit - devices, fit * 15 // 16 // devices * devices))


def _chunk_layout(specs: list[_Spec], n_max: int, has_base: bool):
    """Unique sequences, slot -> unique index ``[C, m]`` (0 for absent slots), slot is real ``[C, m]``,
    bids ``[C, m]``."""
    rows = n_max + int(has_base)
    index: dict[tuple[int, ...], int] = {}
    source = np.zeros((len(specs), rows), np.int32)
    real = np.zeros((len(specs), rows), bool)
    bids = np.zeros((len(specs), rows), np.float64)
    for a, spec in enumerate(specs):
        sequences = list(spec.agents) + ([spec.base] if spec.base is not None else [])
        slots = list(range(len(spec.agents))) + ([n_max] if spec.base is not None else [])
        for slot, seq in zip(slots, sequences):
            source[a, slot] = index.setdefault(seq, len(index))
            real[a, slot] = True
        bids[a, : len(spec.agents)] = spec.bids
        if spec.base is not None:
            bids[a, n_max] = spec.base_bid
    return list(index), source, real, bids


# ----------------------------------------------------------------------------------------------
# The public entry point.


def _auction_specs(auctions, tokenizer) -> list[_Spec]:
    specs = []
    for a, auction in enumerate(auctions):
        name = f"auctions[{a}]"
        if not isinstance(auction, Auction):
            raise ValueError(f"auctions: expected a list of jaxauction.Auction; {name} is {_describe(auction)}.")
        prompts = auction.prompts
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError(
                f"{name}.prompts: expected a non-empty list with one prompt per agent; got {_describe(prompts)}."
            )
        bids = _validation.host_bids(f"{name}.bids", auction.bids, num_agents=len(prompts), ndim=1)
        base_bid = _real_scalar(auction.base_bid, f"{name}.base_bid", "a number >= 0")
        if not (math.isfinite(base_bid) and 0 <= base_bid <= _validation.max_bid()):
            raise ValueError(
                f"{name}.base_bid: expected a finite number in [0, {_validation.max_bid():.3g}]; got {base_bid!r}."
            )
        agents = tuple(
            tuple(prompts_lib.encode_prompt(tokenizer, p, argument=f"{name}.prompts[{i}]"))
            for i, p in enumerate(prompts)
        )
        base_ids = None
        if auction.base_prompt is not None:
            base_ids = tuple(prompts_lib.encode_prompt(tokenizer, auction.base_prompt, argument=f"{name}.base_prompt"))
        specs.append(_Spec(agents, bids, base_ids, base_bid))
    return specs


def generate(
    prompts,
    bids=None,
    *,
    rule="linear",
    payment="second_price",
    decoding="sample",
    key=None,
    max_new_tokens: int = 48,
    model=None,
    base_prompt=None,
    base_bid: float = 0.0,
    temperature: float = 1.0,
    progress: bool = False,
    mesh=None,
    memory_budget=None,
) -> GenerationResult:
    """Runs ``A`` token auctions among LLM agents and returns the texts and payments.

    Two forms:

    * ``generate(auctions)`` with a list of :class:`Auction` (or one): each auction has its own
      prompts (any number of agents), bids, base prompt and base bid. Results are padded to the
      batch's largest agent count ``n_max`` (0 for padded agents) with ``result.num_agents [A]``.
    * ``generate(prompts, bids)``: one prompt set and ``bids [n]`` (one auction) or ``[A, n]`` (e.g. a
      bid sweep); ``base_prompt``/``base_bid`` apply to every auction.

    Each auction gives what it gives alone with the same key (tokens identical under greedy decoding,
    payments equal to float rounding): padded agents have zero bid and no allowed token.

    Args:
      prompts: the list of :class:`Auction`, or the ``n`` agents' prompts: each a string (the
        tokenizer's chat template is applied), a list of ``{"role", "content"}`` chat messages, or a
        list of token ids (used exactly as given).
      bids: ``[n]`` or ``[A, n]`` non-negative bids (at most :func:`jaxauction.payments.max_bid`); None with auctions.
      rule: ``"linear"``, ``"log_linear"``, a :class:`jaxauction.base.Rule` or a function
        ``(logits [..., m, V], bids [..., m]) -> log q [..., V]``.
      payment: ``"second_price"`` (robust allocation, docs/maths.md §5), ``"kl"`` (Myerson payments for KL
        valuations, docs/maths.md §7) or ``None``.
      decoding: ``"sample"`` (draw from ``q`` exactly: no temperature or truncation, which would change
        the mechanism), ``"greedy"`` (argmax of ``q``) or ``"stable"`` (two agents, linear rule, no
        base prompt: docs/maths.md §5's stable sampler; payments are the realized threshold payments).
      key: one PRNG key (split per auction) or ``[A]`` keys (auction ``a`` uses ``key[a]``, so a
        batch gives what each auction gives alone with its key). Default ``jax.random.key(0)``.
      max_new_tokens: length limit; an auction also stops at EOS (which it pays for).
      model: ``(model, tokenizer)`` from :func:`jaxauction.models.load`; ``None`` uses the bundled
        SmolLM2-135M-Instruct, loaded once per process.
      base_prompt: (prompt-list form) optional platform prompt that takes part with ``base_bid`` and
        is never charged.
      base_bid: the base prompt's fixed bid (>= 0).
      temperature: the agents' sampling temperature: every row's logits are divided by it before
        aggregation (each agent reports the distribution its LLM samples from at that temperature);
        the rule, the payments and the draw from ``q`` are applied unchanged. Default 1.
      progress: show one progress bar over the generated tokens of the whole batch (all chunks).
      mesh: optional ``jax.sharding.Mesh`` from :func:`jaxauction.sharding.auction_mesh`: the auctions
        are split over its devices (the batch is padded to a multiple of the device count and the
        padding sliced off) and the model is replicated; the result equals the unsharded one.
      memory_budget: bytes (or a string like ``"4GB"``) of working memory per chunk, model weights
        excluded; default ``JAXAUCTION_MEMORY_BUDGET`` or 4 GiB (:data:`DEFAULT_MEMORY_BUDGET`). A
        larger batch runs in equal chunks (same results, one compiled program).

    Returns:
      A :class:`GenerationResult`. Inside the compiled loop, an auction whose ``q`` or payment becomes
      non-finite stops at that step and is flagged ``valid = False`` with NaN payments; it is never
      reported as a normal ad.

    Raises:
      ValueError naming the argument, the expected type or shape and what was given.
    """
    llm, tokenizer = _validate_model(model)
    rule_fn = base.as_rule(rule)
    payment_allocation(payment)
    if decoding not in DECODINGS:
        raise ValueError(f"decoding: expected one of {DECODINGS}; got {decoding!r}.")
    if payment == "kl" and rule_fn.valuation is None:
        raise ValueError(
            f"payment: 'kl' needs the rule's valuation; rule {rule_fn.name!r} has none. Use a built-in rule, a "
            "jaxauction.base.Rule with a valuation, or payment='second_price'."
        )
    if isinstance(max_new_tokens, (bool, np.bool_)) or not isinstance(max_new_tokens, (int, np.integer)):
        raise ValueError(f"max_new_tokens: expected a positive integer; got {_describe(max_new_tokens)}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive integer; got {max_new_tokens!r}.")
    max_new_tokens = int(max_new_tokens)
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    temperature = _real_scalar(temperature, "temperature", "a finite number > 0")
    if not (math.isfinite(temperature) and temperature > 0 and np.isfinite(np.float64(1.0) / temperature)):
        raise ValueError(f"temperature: expected a finite number > 0; got {temperature!r}.")
    with np.errstate(over="ignore", divide="ignore"):
        reciprocal = np.asarray(1.0, dtype) / np.asarray(temperature, dtype)
    if not np.isfinite(reciprocal):
        raise ValueError(
            f"temperature: 1 / temperature overflows {jnp.dtype(dtype).name} for temperature = {temperature!r}; "
            f"use a temperature of at least {float(1 / np.finfo(dtype).max):.3g} (or greedy decoding)."
        )
    mesh = _validate_mesh(mesh)
    budget = _memory_budget(memory_budget)
    if not isinstance(progress, (bool, np.bool_)):
        raise ValueError(f"progress: expected True or False; got {_describe(progress)}.")

    heterogeneous = isinstance(prompts, Auction) or (
        isinstance(prompts, Sequence) and len(prompts) > 0 and all(isinstance(x, Auction) for x in prompts)
    )
    if heterogeneous:
        single = isinstance(prompts, Auction)
        auctions = [prompts] if single else list(prompts)
        if bids is not None or base_prompt is not None:
            raise ValueError(
                "bids/base_prompt: with a list of jaxauction.Auction each auction carries its own bids and base "
                "prompt; pass bids=None and base_prompt=None."
            )
        specs = _auction_specs(auctions, tokenizer)
    else:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError(
                "prompts: expected a non-empty list with one prompt per agent, or a list of jaxauction.Auction; "
                f"got {_describe(prompts)}."
            )
        if bids is None:
            raise ValueError("bids: expected [n] or [A, n] bids for the prompts; got None.")
        bid_array = _validation.host_bids("bids", bids, num_agents=len(prompts))
        single = bid_array.ndim == 1
        bid_array = np.atleast_2d(bid_array)
        base_bid = _real_scalar(base_bid, "base_bid", "a number >= 0")
        if not (math.isfinite(base_bid) and 0 <= base_bid <= _validation.max_bid()):
            raise ValueError(
                f"base_bid: expected a finite number in [0, {_validation.max_bid():.3g}]; got {base_bid!r}."
            )
        agents = tuple(
            tuple(prompts_lib.encode_prompt(tokenizer, p, argument=f"prompts[{i}]")) for i, p in enumerate(prompts)
        )
        base_ids = None
        if base_prompt is not None:
            base_ids = tuple(prompts_lib.encode_prompt(tokenizer, base_prompt, argument="base_prompt"))
        specs = [_Spec(agents, row, base_ids, base_bid) for row in bid_array]

    num_auctions = len(specs)
    counts = np.array([len(s.agents) for s in specs])
    n_max = int(counts.max())
    has_base = any(s.base is not None for s in specs)
    rows_per_auction = n_max + int(has_base)
    if decoding == "stable" and (n_max != 2 or counts.min() != 2 or has_base or rule_fn.name != "linear"):
        raise ValueError(
            "decoding='stable' is docs/maths.md §5's sampler for exactly two agents under the linear rule without a base "
            f"prompt; got n = {sorted(set(counts.tolist()))}, rule = {rule_fn.name!r}, base prompt "
            f"{'set' if has_base else 'None'}."
        )
    vocab = llm.config.vocab_size
    if all(rule_fn is not base.as_rule(name) for name in base.rule_names()):
        _validate_rule_output(rule_fn, rows_per_auction, vocab, dtype)

    # Prompt width: the longest prompt of the batch, bucketed; the cache holds it plus the new tokens.
    # A prefix common to all of the batch's prompts is prefilled once per chunk, the remainders are
    # left-padded to a multiple of 8; both are decided here so that every chunk runs the same programs.
    context = llm.config.max_position_embeddings
    sequences = [seq for s in specs for seq in (*s.agents, *([s.base] if s.base else []))]
    longest = max(map(len, sequences))
    if longest + max_new_tokens > context:
        raise ValueError(
            f"prompts: the longest prompt has {longest} tokens; with max_new_tokens = "
            f"{max_new_tokens} that is {longest + max_new_tokens} > the model's context of {context}. Shorten the "
            "prompts or lower max_new_tokens."
        )
    width = -(-longest // prompts_lib.PROMPT_BUCKET) * prompts_lib.PROMPT_BUCKET
    width = min(width, context - max_new_tokens)
    max_length = width + max_new_tokens
    prefix_length = prompts_lib.shared_prefix_length(sequences)
    suffix_width = min(-(-(longest - prefix_length) // 8) * 8, width - prefix_length) if prefix_length else width
    keys = _validate_keys(key, num_auctions)
    eos_ids = prompts_lib.eos_ids(llm, tokenizer)
    pad_id = prompts_lib.pad_id(tokenizer)

    devices = 1 if mesh is None else mesh.size
    # Every chunk is laid out with the batch's largest row count, bucketed: plan with the largest
    # auction's rows and the bucketed row count.
    cache_rows = max(len(s.agents) + (s.base is not None) for s in specs)
    row_bytes, other_bytes = _memory_terms(llm, rows_per_auction, max_length, n_max, max_new_tokens)
    chunk, num_chunks = plan_chunks(
        num_auctions,
        cache_rows * row_bytes + other_bytes,
        budget,
        devices,
        chunk_bytes=lambda size: devices * _device_rows(size // devices * cache_rows) * row_bytes + size * other_bytes,
    )
    enable_compilation_cache()

    graphdef, state = nnx.split(llm)
    if mesh is not None:
        state = sharding.replicate(state, mesh)
    padded_specs = specs + [specs[-1]] * (chunk * num_chunks - num_auctions)
    # Every chunk gets the batch's largest row counts, so all chunks run the same two programs.
    layouts = [_chunk_layout(padded_specs[c * chunk : (c + 1) * chunk], n_max, has_base) for c in range(num_chunks)]
    prefill_rows = max(_bucket(len(unique)) for unique, *_ in layouts)
    num_rows = _device_rows(max(int(real.reshape(devices, -1).sum(axis=1).max()) for _, _, real, _ in layouts))
    padded_keys = sharding.pad_batch(keys, chunk * num_chunks)
    bar = _open_progress_bar(max_new_tokens * num_chunks) if progress else None
    outputs = []
    try:
        for c in range(num_chunks):
            if bar is not None:
                bar.offset = c * max_new_tokens
            outputs.append(
                _run_chunk(
                    graphdef,
                    state,
                    layouts[c],
                    padded_keys[c * chunk : (c + 1) * chunk],
                    prefill_rows=prefill_rows,
                    num_rows=num_rows,
                    n_max=n_max,
                    width=width,
                    prefix_length=prefix_length,
                    suffix_width=suffix_width,
                    max_length=max_length,
                    pad_id=pad_id,
                    eos_ids=eos_ids,
                    mesh=mesh,
                    dtype=dtype,
                    temperature=temperature,
                    rule=rule_fn,
                    payment=payment,
                    decoding=decoding,
                    max_new_tokens=max_new_tokens,
                    progress=bool(progress),
                )
            )
            if bar is not None:
                bar.n = (c + 1) * max_new_tokens
                bar.refresh()
    finally:
        _close_progress_bar(bar)
    tokens, token_payments, lengths, valid = (np.concatenate([o[i] for o in outputs])[:num_auctions] for i in range(4))
    texts = [tokenizer.decode(row[:length], skip_special_tokens=True).strip() for row, length in zip(tokens, lengths)]
    all_bids = np.zeros((num_auctions, n_max))
    for a, s in enumerate(specs):
        all_bids[a, : len(s.agents)] = s.bids
    result = GenerationResult(
        tokens=tokens,
        lengths=lengths,
        texts=texts,
        payments=token_payments.sum(axis=1),
        token_payments=token_payments,
        bids=all_bids,
        num_agents=counts,
        valid=valid,
    )
    if single:
        result = dataclasses.replace(
            result,
            **{f: getattr(result, f)[0] for f in ("tokens", "lengths", "payments", "token_payments", "bids")},
            num_agents=result.num_agents[0],
            valid=result.valid[0],
        )
    return result


def _run_chunk(
    graphdef,
    state,
    layout,
    keys,
    *,
    prefill_rows,
    num_rows,
    n_max,
    width,
    prefix_length,
    suffix_width,
    max_length,
    pad_id,
    eos_ids,
    mesh,
    dtype,
    temperature,
    rule,
    payment,
    decoding,
    max_new_tokens,
    progress,
):
    """Prefill the chunk's unique sequences once, lay out every device's cache rows, run the decode loop.

    ``layout`` is the chunk's :func:`_chunk_layout`. The unique sequences are padded to
    ``prefill_rows``. Each device (one without a mesh) holds its share of the auctions and
    ``num_rows`` cache rows: first the distinct sequences of its auctions' real slots, then free rows
    for the forks of later steps. ``num_rows`` is at least any device's count of real slots, which no
    step can exceed; both counts are the batch's, so every chunk runs the same programs.
    """
    unique, source, real, bids = layout
    unique = unique + [unique[-1]] * (prefill_rows - len(unique))
    devices = 1 if mesh is None else mesh.size
    device_source = source.reshape(devices, -1)
    device_real = real.reshape(devices, -1)
    gather = np.zeros((devices, num_rows), np.int32)
    slot_rows = np.zeros(device_source.shape, np.int32)
    for d in range(devices):
        distinct, local = np.unique(device_source[d][device_real[d]], return_inverse=True)
        gather[d] = np.resize(distinct, num_rows)  # rows after the distinct ones are free (any content)
        slot_rows[d][device_real[d]] = local
    slot_rows = slot_rows.reshape(real.shape)
    # The prompt tokens end at slot ``width``: [invalid | shared prefix | left-padded remainders].
    input_ids, attention_mask = prompts_lib.left_pad(
        [seq[prefix_length:] for seq in unique], pad_id, width=suffix_width
    )
    cache = nnx.merge(graphdef, state).init_cache(1 if prefix_length else len(unique), max_length)
    cache = cache.replace(index=jnp.int32(width - suffix_width - prefix_length))
    logits, cache = _compiled_prefill()(
        graphdef,
        state,
        jnp.asarray([unique[0][:prefix_length]], jnp.int32) if prefix_length else None,
        jnp.asarray(input_ids),
        jnp.asarray(attention_mask),
        jnp.asarray(gather.reshape(-1)),
        cache,
    )
    batch_bids, batch_real, slot_rows = jnp.asarray(bids, dtype), jnp.asarray(real), jnp.asarray(slot_rows)
    if mesh is not None:
        cache = cache.replace(
            k=sharding.shard_batch(cache.k, mesh, 1),
            v=sharding.shard_batch(cache.v, mesh, 1),
            valid=sharding.shard_batch(cache.valid, mesh),
            positions=sharding.shard_batch(cache.positions, mesh),
            index=sharding.replicate(cache.index, mesh),
        )
        logits, batch_bids, batch_real, slot_rows, keys = (
            sharding.shard_batch(x, mesh) for x in (logits, batch_bids, batch_real, slot_rows, keys)
        )
    out = _compiled_decode()(
        graphdef,
        state,
        cache,
        logits,
        batch_bids,
        batch_real,
        slot_rows,
        keys,
        jnp.asarray(temperature, dtype),
        mesh=mesh,
        rule=rule,
        payment=payment,
        decoding=decoding,
        num_charged=n_max,
        max_new_tokens=max_new_tokens,
        pad_id=int(pad_id),
        eos_ids=eos_ids,
        capacities=row_capacities(num_rows),
        progress=progress,
    )
    return [np.asarray(x) for x in jax.device_get(out)]


_ACTIVE_BARS: list = []


def _open_progress_bar(total: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="tokens", unit="tok", leave=False)
    bar.offset = 0
    _ACTIVE_BARS.append(bar)
    return bar


def _close_progress_bar(bar) -> None:
    if bar is not None:
        _ACTIVE_BARS.remove(bar)
        bar.close()


def _report_progress(step) -> None:
    """Host callback from the compiled loop (module level, so it never triggers a recompile)."""
    if _ACTIVE_BARS:
        bar = _ACTIVE_BARS[-1]
        bar.n = bar.offset + int(step) + 1
        bar.refresh()
