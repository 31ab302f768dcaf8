"""One chunk of a generation: lay out the cache rows, prefill the distinct prompts, decode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxauction import _validation, sharding
from jaxauction import prompts as prompts_lib
from jaxauction.engine import loop
from jaxauction.engine.plan import ChunkLayout, Plan

__all__ = ["ChunkOutput", "run_chunk"]

ChunkOutput = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""``(tokens [C, T], token_payments [C, T, n], lengths [C], valid [C])`` of a chunk's auctions."""


def device_rows_of(layout: ChunkLayout, plan: Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(prefilled [D * U], gather [D * P], slot_rows [C, m])``: the ``U`` sequences every device
    prefills (indices into the unique sequences: the distinct sequences of its auctions' real slots,
    padded by repeating them), its ``P`` cache rows as indices into its own ``U`` prefilled rows (first
    its distinct sequences, then free rows for the forks of later steps) and each slot's row on its
    device."""
    devices, num_rows = plan.devices, plan.num_rows
    prefilled = np.zeros((devices, plan.prefill_rows), np.int32)
    gather = np.zeros((devices, num_rows), np.int32)
    slot_rows = np.zeros(layout.source.shape, np.int32).reshape(devices, -1)
    device_source, device_real = layout.source.reshape(devices, -1), layout.real.reshape(devices, -1)
    for d, distinct in enumerate(layout.device_sequences(devices)):
        prefilled[d] = np.resize(distinct, plan.prefill_rows)
        gather[d] = np.resize(np.arange(len(distinct)), num_rows)  # rows after the distinct ones are free
        slot_rows[d][device_real[d]] = np.searchsorted(distinct, device_source[d][device_real[d]])
    return prefilled.reshape(-1), gather.reshape(-1), slot_rows.reshape(layout.real.shape)


def _prefilled(model, layout: ChunkLayout, plan: Plan, rows: tuple[np.ndarray, np.ndarray], context):
    """``(logits [D * P, V], cache)`` after the prompts of the chunk's rows, each device prefilling
    its own distinct prompts (``rows = (prefilled, gather)`` of :func:`device_rows_of`);
    ``context = (pad_id, mesh)``."""
    graphdef, weights = model
    (prefilled, gather), (pad_id, mesh) = rows, context
    sequences = [layout.unique[i] for i in prefilled]
    # The prompt tokens end at slot ``width``: [invalid | shared prefix | left-padded remainders].
    input_ids, attention_mask = prompts_lib.left_pad(
        [seq[plan.prefix_length :] for seq in sequences], pad_id, width=plan.suffix_width
    )
    cache_rows = plan.devices if plan.prefix_length else len(sequences)  # the prefix: one row per device
    cache = nnx.merge(graphdef, weights).init_cache(cache_rows, plan.max_length)
    cache = cache.replace(index=jnp.int32(plan.width - plan.suffix_width - plan.prefix_length))
    prefix = jnp.asarray([sequences[0][: plan.prefix_length]], jnp.int32) if plan.prefix_length else None
    arrays = (jnp.asarray(input_ids), jnp.asarray(attention_mask), jnp.asarray(gather))
    if mesh is not None:
        cache = loop.shard_cache(model, cache, mesh)
        arrays = tuple(sharding.shard_batch(x, mesh) for x in arrays)
        prefix = sharding.replicate(prefix, mesh)
    return loop.prefill(graphdef, weights, cache, (prefix, *arrays), mesh)


def run_chunk(model, layout: ChunkLayout, keys, plan: Plan, spec: loop.DecodeSpec, *, mesh, temperature, progress):
    """Decodes one chunk's auctions (``keys: [C]``); returns its :class:`ChunkOutput` (host arrays).

    ``model`` is ``(graphdef, weights)`` (placed on ``mesh`` by :func:`loop.shard_weights` if given);
    each device along the mesh's ``"auctions"`` axis holds its share of the auctions and ``plan.num_rows`` cache rows, at least any device's count of real slots,
    which no step can exceed. Both counts are the batch's, so every chunk runs the same programs.
    """
    dtype = _validation.default_float_dtype()
    prefilled, gather, slot_rows = device_rows_of(layout, plan)
    logits, cache = _prefilled(model, layout, plan, (prefilled, gather), (spec.pad_id, mesh))
    state = loop.DecodeState.start(slot_rows, spec, dtype)
    inputs = loop.ChunkInputs(
        bids=jnp.asarray(layout.bids, dtype),
        real=jnp.asarray(layout.real),
        keys=keys,
        temperature=jnp.asarray(temperature, dtype),
    )
    state = jax.tree.map(jnp.asarray, state)
    if mesh is not None:
        inputs = inputs.replace(
            bids=sharding.shard_batch(inputs.bids, mesh),
            real=sharding.shard_batch(inputs.real, mesh),
            keys=sharding.shard_batch(inputs.keys, mesh),
            temperature=sharding.replicate(inputs.temperature, mesh),
        )
        state = jax.tree.map(lambda x: sharding.shard_batch(x, mesh) if x.ndim else sharding.replicate(x, mesh), state)
    state = loop.decode(model, cache, logits, state, inputs, spec, plan.max_new_tokens, (mesh, progress))
    progress.finish_chunk()
    tokens, token_payments, lengths, valid = sharding.host_value(
        (state.tokens, state.token_payments, state.lengths, state.valid)
    )
    length = plan.max_new_tokens  # the columns past it (plan.token_slots) were never written
    return (
        np.asarray(tokens)[:, :length],
        np.asarray(token_payments)[:, :length],
        np.asarray(lengths),
        np.asarray(valid),
    )
