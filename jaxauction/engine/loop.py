"""The decode loop: a host loop over three compiled programs per token.

Each token runs the *auction program* (the rule, the payments and the draw for every auction), the
*rows program* (:func:`jaxauction.engine.rows.next_rows`: which cache row each slot reads next), then
the *model program* (row copies, the model on the first live rows, the new keys and values appended).
The rows and model programs depend on the shapes (and the model and row capacity) only, so every
rule, payment and decoding shares them; the auction program holds no model and compiles in about a
second. The host reads the live-row count to pick the model's row capacity (compiling a capacity the
first time a step needs it) and stops when no auction is running: once the rows can no longer outgrow
the capacity (the live slots, which never increase, fit it), at most once every :data:`READ_EVERY`
tokens, dispatching the programs in between without waiting for them.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxauction import sharding
from jaxauction.engine import runtime
from jaxauction.engine.rows import RowUpdate, next_rows, row_capacities
from jaxauction.engine.step import auction_step
from jaxauction.mechanism import MechanismSpec
from jaxauction.models.base import LanguageModel, RowCache

__all__ = ["READ_EVERY", "ChunkInputs", "DecodeSpec", "DecodeState", "decode", "prefill", "row_counts"]

READ_EVERY = 8
"""Tokens :func:`decode` runs per blocking host read once the row capacity is settled."""


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """The static settings of a decode loop (hashable: part of the auction program's key).

    Attributes:
      mechanism: the rule, payment kind and decoding (see :func:`jaxauction.generate`). Its
        temperature is 1: the temperature enters as an array (:attr:`ChunkInputs.temperature`), so
        every temperature shares one compiled auction program.
      num_charged: ``n``, the slots that pay (the base slot never pays).
      token_slots: ``T``, the token columns of the state (at least the tokens generated).
      pad_id: the token of finished auctions. eos_ids: the stop tokens.
    """

    mechanism: MechanismSpec
    num_charged: int
    token_slots: int
    pad_id: int
    eos_ids: tuple[int, ...]


@flax.struct.dataclass
class DecodeState:
    """What the auction program carries from token to token (a pytree, donated every step)."""

    step: jax.Array  # int32 scalar, the token being decided
    slot_rows: jax.Array  # [A, m] int32, the cache row each slot reads
    tokens: jax.Array  # [A, T] int32, the tokens so far (pad_id after an auction ended)
    done: jax.Array  # [A] bool, the auction has stopped (EOS, broken, or length)
    token_payments: jax.Array  # [A, T, n] each agent's payment for each token
    valid: jax.Array  # [A] bool, q and the payments stayed finite
    lengths: jax.Array  # [A] int32, tokens generated, EOS included

    @classmethod
    def start(cls, slot_rows: np.ndarray, spec: DecodeSpec, dtype) -> DecodeState:
        """The state before the first token (host arrays)."""
        num_auctions = slot_rows.shape[0]
        return cls(
            step=np.int32(0),
            slot_rows=slot_rows.astype(np.int32),
            tokens=np.full((num_auctions, spec.token_slots), spec.pad_id, np.int32),
            done=np.zeros((num_auctions,), bool),
            token_payments=np.zeros((num_auctions, spec.token_slots, spec.num_charged), dtype),
            valid=np.ones((num_auctions,), bool),
            lengths=np.zeros((num_auctions,), np.int32),
        )


@flax.struct.dataclass
class ChunkInputs:
    """The auction program's fixed inputs for one chunk."""

    bids: jax.Array  # [A, m]
    real: jax.Array  # [A, m] bool, False for absent slots (their logits become -inf)
    keys: jax.Array  # [A] PRNG keys
    temperature: jax.Array  # scalar dividing every row's logits


def auction_update(spec: DecodeSpec, state: DecodeState, logits, inputs: ChunkInputs):
    """One token of every auction from its rows' ``logits: [P, V]``; returns ``(state, token [A], live
    [A, m])``: the state after the token (``slot_rows`` not yet moved, see :func:`rows_update`), the
    tokens and the slots that continue.

    A finished auction gets ``pad_id`` and payments 0. An auction whose step is not ``ok`` (see
    :func:`jaxauction.engine.step.auction_step`) stops there: token ``pad_id``, NaN payments for its
    real agents at that step, and ``valid`` False.
    """
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(inputs.keys, state.step)
    with jax.named_scope("auction_step"):
        rows = jnp.take(logits / inputs.temperature, state.slot_rows, axis=0, mode="clip")
        rows = jnp.where(inputs.real[..., None], rows, -jnp.inf)
        token, charged, ok = auction_step(
            rows,
            inputs.bids,
            step_keys,
            mechanism=spec.mechanism,
            num_charged=spec.num_charged,
        )
    done = state.done
    broken = ~done & ~ok
    stopped = (done | broken)[:, None]
    token = jnp.where(done | broken, spec.pad_id, token.astype(jnp.int32))
    charged_real = inputs.real[:, : spec.num_charged]
    charged = jnp.where(broken[:, None] & charged_real, jnp.nan, jnp.where(stopped, 0, charged))
    done = done | broken | jnp.isin(token, jnp.asarray(spec.eos_ids, jnp.int32))
    state = state.replace(
        step=state.step + 1,
        tokens=state.tokens.at[:, state.step].set(token),
        done=done,
        token_payments=state.token_payments.at[:, state.step].set(charged.astype(state.token_payments.dtype)),
        valid=state.valid & ~broken,
        lengths=state.lengths + (~stopped[:, 0]).astype(jnp.int32),
    )
    return state, token, inputs.real & ~done[:, None]


def rows_update(num_rows: int, slot_rows, token, live) -> tuple[RowUpdate, jax.Array]:
    """:func:`jaxauction.engine.rows.next_rows` with ``count`` and ``copies`` of shape [1] (one per
    device under ``shard_map``), and ``sizes: [1, 2]`` int32: the live rows and the live slots (a
    bound on the rows of every later step: slots only stop). Its own program: it depends on the
    shapes only, so every mechanism shares it (about 0.4 s of compilation that a new rule or payment
    does not repeat)."""
    update = next_rows(slot_rows, token, live, num_rows)
    sizes = jnp.stack([update.count, jnp.sum(live, dtype=jnp.int32)])[None]
    return update._replace(count=update.count[None], copies=update.copies[None]), sizes


def model_step(graphdef, capacity: int, weights, cache: RowCache, rows: RowUpdate):
    """The model on the first ``capacity`` rows of ``cache`` after the row copies of ``rows``.

    Returns ``(logits [P, V], cache)``: zero logits from ``capacity`` on (free rows), the first
    ``capacity`` rows' new tokens written (rows past the live ones hold garbage until a copy fills
    them). The model's :meth:`~jaxauction.models.base.LanguageModel.decode` writes after its reads,
    so the donated cache is updated in place."""
    with jax.named_scope("row_copies"):
        cache = cache.copy_rows(rows.copy_from, rows.copy_to, rows.copies[0])
    model: LanguageModel = nnx.merge(graphdef, weights)
    logits, cache = model.decode(rows.row_tokens[:capacity], cache)
    return jnp.pad(logits, ((0, cache.batch_size - capacity), (0, 0))), cache


def prefill_body(graphdef, weights, prefix_ids, input_ids, attention_mask, rows, cache):
    """Prefill the unique sequences once, then gather the cache rows ``rows: [P]`` and their logits.

    ``prefix_ids: [1, c]`` (or None) is the token prefix common to all ``U`` unique sequences: it is
    prefilled once into the one-row ``cache`` and copied to ``U`` rows, then ``input_ids: [U, T]``
    (the sequences' remainders, left-padded) continue it; without a prefix, ``cache`` has ``U`` rows
    and ``input_ids`` are the whole sequences. (The empty cache is an argument: created inside ``jit``
    it would be a constant that XLA spends a long time folding.)"""
    model = nnx.merge(graphdef, weights)
    if prefix_ids is not None:
        _, cache = model.prefill(prefix_ids, None, cache)
        cache = cache.take_rows(jnp.zeros((input_ids.shape[0],), jnp.int32))
    logits, cache = model.prefill(input_ids, attention_mask, cache)
    return jnp.take(logits, rows, axis=0), cache.take_rows(rows)


def _auction_program(spec, mesh, state, logits, inputs):
    if mesh is None:
        return auction_update(spec, state, logits, inputs)
    split, whole = PartitionSpec(sharding.AXIS), PartitionSpec()
    state_specs = DecodeState(whole, split, split, split, split, split, split)
    input_specs = ChunkInputs(split, split, split, whole)
    body = jax.shard_map(
        lambda s, x, i: auction_update(spec, s, x, i),
        mesh=mesh,
        in_specs=(state_specs, split, input_specs),
        out_specs=(state_specs, split, split),
        check_vma=False,
    )
    return body(state, logits, inputs)


def _rows_program(num_rows, mesh, slot_rows, token, live):
    if mesh is None:
        return rows_update(num_rows, slot_rows, token, live)
    split = PartitionSpec(sharding.AXIS)
    body = jax.shard_map(
        functools.partial(rows_update, num_rows), mesh=mesh, in_specs=split, out_specs=split, check_vma=False
    )
    return body(slot_rows, token, live)


def _model_program(graphdef, capacity, mesh, weights, cache, rows):
    if mesh is None:
        return model_step(graphdef, capacity, weights, cache, rows)
    # Manual over "auctions" only: a "model" axis stays automatic, so XLA partitions the model over it
    # from its weights' and cache's shardings and inserts the collectives.
    # The logits (split by vocabulary under a "model" axis) are gathered for the auction program, and
    # the cache keeps the layout it came with (the next step's program was compiled for it).
    split = PartitionSpec(sharding.AXIS)
    cache_specs = model_specs((graphdef, weights), mesh)[1]
    body = jax.shard_map(
        lambda w, c, r: model_step(graphdef, capacity, w, c, r),
        mesh=mesh,
        in_specs=(PartitionSpec(), _auction_only(cache_specs), split),
        out_specs=(split, _auction_only(cache_specs)),
        axis_names={sharding.AXIS},
        check_vma=False,
    )
    logits, cache = body(weights, cache, rows)
    return jax.lax.with_sharding_constraint((logits, cache), _shardings((split, cache_specs), mesh))


def _auction_only(specs):
    """``specs`` (a tree of ``PartitionSpec``) with every mesh axis but ``"auctions"`` dropped: the
    specs of ``shard_map``'s manual axis (the weights are never split over ``"auctions"``)."""

    def keep(spec):
        return PartitionSpec(*(name if name == sharding.AXIS else None for name in spec))

    return jax.tree.map(keep, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _prefill_program(graphdef, mesh, weights, prefix_ids, input_ids, attention_mask, rows, cache):
    if mesh is None:
        return prefill_body(graphdef, weights, prefix_ids, input_ids, attention_mask, rows, cache)
    # Each device prefills its own sequences into its own rows (manual over "auctions"; a "model"
    # axis stays automatic as in the model program); the shared prefix is replicated.
    split = PartitionSpec(sharding.AXIS)
    cache_specs = model_specs((graphdef, weights), mesh)[1]
    body = jax.shard_map(
        lambda w, p, i, m, r, c: prefill_body(graphdef, w, p, i, m, r, c),
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec(), split, split, split, _auction_only(cache_specs)),
        out_specs=(split, _auction_only(cache_specs)),
        axis_names={sharding.AXIS},
        check_vma=False,
    )
    logits, cache = body(weights, prefix_ids, input_ids, attention_mask, rows, cache)
    return jax.lax.with_sharding_constraint((logits, cache), _shardings((split, cache_specs), mesh))


def prefill(graphdef, weights, cache: RowCache, prompt_arrays: tuple, mesh=None):
    """:func:`prefill_body` compiled (once per shape); ``prompt_arrays`` are its four array arguments.
    With a ``mesh`` every argument but the weights and the prefix is split over its ``"auctions"``
    axis and each device prefills its own rows (the cache as :func:`shard_cache` places it)."""
    args = (weights, *prompt_arrays, cache)
    return runtime.compiled(_prefill_program, (graphdef, mesh), args)(*args)


def model_specs(model: tuple, mesh) -> tuple:
    """``(weights, cache)`` partition specs of ``model = (graphdef, weights)`` on ``mesh``: the cache
    rows over ``"auctions"``, the model split over a ``"model"`` axis as it declares
    (:meth:`~jaxauction.models.base.LanguageModel.partition_specs`; ValueError if it cannot)."""
    llm = nnx.merge(*model)
    if sharding.model_devices(mesh) == 1:
        return llm.partition_specs(sharding.AXIS)
    return llm.partition_specs(sharding.AXIS, sharding.MODEL_AXIS, sharding.model_devices(mesh))


def _shardings(specs, mesh):
    """The ``NamedSharding`` tree of a ``PartitionSpec`` tree on ``mesh``."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _place(tree, specs, mesh):
    return sharding.put(tree, _shardings(specs, mesh))


def shard_weights(model: tuple, mesh) -> tuple:
    """``model = (graphdef, weights)`` with its weights placed on ``mesh`` as the model's partition
    specs say: replicated, or split over a ``"model"`` axis (unchanged without a mesh)."""
    if mesh is None:
        return model
    return model[0], _place(model[1], model_specs(model, mesh)[0], mesh)


def shard_cache(model: tuple, cache: RowCache, mesh) -> RowCache:
    """The cache with its rows split over ``mesh`` (and its heads over a ``"model"`` axis) as the
    model's partition specs say (unchanged without a mesh); ``model`` is ``(graphdef, weights)``."""
    if mesh is None:
        return cache
    return _place(cache, model_specs(model, mesh)[1], mesh)


def row_counts(sizes) -> tuple[int, int]:
    """``(rows, live slots)``, the largest over the devices, from the rows program's ``sizes [D, 2]``:
    the decode loop's one blocking read from the devices (all processes' devices on several hosts)."""
    largest = np.asarray(sharding.host_value(sizes)).reshape(-1, 2).max(axis=0)
    return int(largest[0]), int(largest[1])


def decode(
    model: tuple,
    cache: RowCache,
    logits,
    state: DecodeState,
    inputs: ChunkInputs,
    spec: DecodeSpec,
    max_new_tokens: int,
    context,
):
    """Runs the auctions of one chunk to the end (EOS or ``max_new_tokens <= spec.token_slots``
    tokens); returns the final :class:`DecodeState`.

    ``model`` is ``(graphdef, weights)``, ``cache`` holds the chunk's ``P`` rows after the prompts
    (live rows first) and ``logits: [P, V]`` their next-token logits. ``context`` is ``(mesh,
    progress)`` with ``progress`` a :class:`jaxauction.engine.runtime.TokenProgress`.

    The host reads the row counts (:func:`row_counts`) after a step to pick the model's capacity, the
    smallest of :func:`~jaxauction.engine.rows.row_capacities` holding the live rows. When that
    capacity also holds the live slots (no later step can need more) the next
    :data:`READ_EVERY` - 1 steps run on it unread; an auction that ends meanwhile gives the pad
    token and no payment, so the results equal reading every step.
    """
    if not 1 <= max_new_tokens <= spec.token_slots:
        raise ValueError(f"max_new_tokens: expected 1 to spec.token_slots = {spec.token_slots}; got {max_new_tokens}.")
    graphdef, weights = model
    mesh, progress = context
    num_rows = cache.batch_size // sharding.auction_devices(mesh)
    capacities = row_capacities(num_rows)
    auction = runtime.compiled(_auction_program, (spec, mesh), (state, logits, inputs), donate=(0,))
    rows_program = None
    models: dict[int, object] = {}
    capacity, next_read = 0, 0
    for step in range(max_new_tokens):
        state, token, live = auction(state, logits, inputs)
        if rows_program is None:
            rows_program = runtime.compiled(_rows_program, (num_rows, mesh), (state.slot_rows, token, live))
        rows, sizes = rows_program(state.slot_rows, token, live)
        state = state.replace(slot_rows=rows.slot_rows)
        progress.advance()
        if step + 1 == max_new_tokens:
            break
        if step == next_read:
            count, bound = row_counts(sizes)
            if count == 0:
                break
            capacity = capacities[int(np.searchsorted(capacities, count))]
            settled = bound <= capacity
            next_read = step + (READ_EVERY if settled else 1)
        rows = rows._replace(slot_rows=None, count=None)  # the model program reads the rows' tokens and copies
        if capacity not in models:
            models[capacity] = runtime.compiled(
                _model_program, (graphdef, capacity, mesh), (weights, cache, rows), donate=(1,)
            )
        logits, cache = models[capacity](weights, cache, rows)
    return state
