"""Arrays built shard by shard from host reads: a weight is never whole on the host.

Each device's shard of a weight is read by a callback ``read(index) -> np.ndarray`` (``index`` a tuple
of concrete ``slice(start, stop)``, one per axis, as ``jax.make_array_from_callback`` passes it),
cast to the weight's dtype and copied to its device before the next shard is read; devices that hold
the same slice (replicas) share one read. A weight stacked over layers (``[L, ...]``, the model scans
over them) is filled one layer at a time into a buffer on its devices (a donated in-place update), so
the host holds at most one layer's slice of one weight for one device at a time.

Without a sharding the arrays go to the default device, uncommitted (as ``jnp.asarray`` puts them).

:func:`place_whole` is the path for one device (or full replicas): each weight is stacked on the host
in its dtype and put once, with no compiled program (the buffer updates cost about 30 small
compilations and a second device copy of each weight while it is filled).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding

Index = tuple[slice, ...]
"""Concrete slices ``slice(start, stop)``, one per axis of the global array."""
Read = Callable[[Index], np.ndarray]
"""``index -> array[index]``: the host values of one shard (any dtype that casts to the weight's)."""


def concrete_index(index: tuple, shape: tuple[int, ...]) -> Index:
    """``index`` (slices, possibly ``slice(None)``, as a sharding's device map gives them) with every
    slice made ``slice(start, stop)`` on ``shape``; missing trailing axes are whole."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out = []
    for part, size in zip(index, shape):
        start, stop, step = part.indices(size)
        if step != 1:
            raise ValueError(f"placement: a shard index with step {step} (expected contiguous slices).")
        out.append(slice(start, stop))
    return tuple(out)


def _host_shard(read: Read, index: Index, dtype) -> np.ndarray:
    expected = tuple(s.stop - s.start for s in index)
    host = np.asarray(read(index), dtype)
    if host.shape != expected:
        raise ValueError(f"placement: a reader gave shape {host.shape} for the shard {index}; expected {expected}.")
    return host


def from_shards(shape: tuple[int, ...], dtype, sharding: Sharding | None, read: Read) -> jax.Array:
    """The ``shape`` array of ``dtype`` with ``sharding`` (None: the default device, uncommitted),
    each distinct shard read once by ``read`` and copied to its devices before the next is read."""
    if sharding is None:
        host = _host_shard(read, concrete_index((), shape), dtype)
        return jax.device_put(host, may_alias=False).block_until_ready()
    groups: dict[tuple, list[jax.Device]] = {}  # (start, stop) per axis -> the devices holding that shard
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple((part.start, part.stop) for part in concrete_index(index, shape))
        groups.setdefault(key, []).append(device)
    placed: dict[jax.Device, jax.Array] = {}
    for key, devices in groups.items():
        host = _host_shard(read, tuple(slice(*bounds) for bounds in key), dtype)
        copies = [jax.device_put(host, device, may_alias=False) for device in devices]
        placed.update(zip(devices, jax.block_until_ready(copies)))
        del host, copies
    arrays = [placed[device] for device in sharding.addressable_devices_indices_map(shape)]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


@functools.lru_cache(maxsize=64)
def _setter(sharding: Sharding | None) -> Callable:
    """``(buffer [n, ...], part [m, ...], i) -> buffer`` with rows ``i .. i + m`` replaced by ``part``, in
    place (the buffer is donated): the result is XLA's own buffer, whatever ``part`` borrowed from the
    host (on CPU a copied-in array may keep its numpy source alive)."""

    def put(buffer, part, i):
        return jax.lax.dynamic_update_slice_in_dim(buffer, part, i, 0)

    if sharding is None:
        return jax.jit(put, donate_argnums=0)
    return jax.jit(put, donate_argnums=0, out_shardings=sharding)


def _empty(shape: tuple[int, ...], dtype, sharding: Sharding | None) -> jax.Array:
    return jnp.zeros(shape, dtype) if sharding is None else jnp.zeros(shape, dtype, device=sharding)


def _fill(buffer: jax.Array, sharding: Sharding | None, read: Read, layer: int | None) -> jax.Array:
    """``buffer`` with layer ``layer`` (``[1, ...]`` of ``read``), or all of it when None, read shard by shard."""
    shape = buffer.shape if layer is None else (1, *buffer.shape[1:])
    if layer is not None:
        read = functools.partial(lambda index, read: read((slice(layer, layer + 1), *index[1:])), read=read)
    part = from_shards(shape, buffer.dtype, sharding, read)
    return _setter(sharding)(buffer, part, np.int32(layer or 0))


def place(
    leaves: Mapping[Any, tuple[jax.ShapeDtypeStruct, Sharding | None, Read]], stacked: Callable[[Any], bool]
) -> dict[Any, jax.Array]:
    """Every leaf ``key -> (abstract [shape, dtype], sharding, read)`` as an array, read shard by shard
    into a buffer on its devices.

    Leaves for which ``stacked(key)`` is true are ``[L, ...]`` stacks of layers, all with the same
    ``L``: they are filled layer by layer (layer-major: all stacked leaves of layer 0, then layer 1, so
    a reader may cache what one layer's leaves share); their ``read`` gets index ``(slice(i, i + 1),
    ...)`` and returns ``[1, ...]``.
    """
    buffers = {key: _empty(a.shape, a.dtype, s) for key, (a, s, _) in leaves.items()}
    for key, (_, sharding, read) in leaves.items():
        if not stacked(key):
            buffers[key] = _fill(buffers[key], sharding, read, None)
    layered = [key for key in leaves if stacked(key)]
    num_layers = {leaves[key][0].shape[0] for key in layered}
    if len(num_layers) > 1:
        raise ValueError(f"placement: stacked leaves with different layer counts {sorted(num_layers)}.")
    for i in range(num_layers.pop() if num_layers else 0):
        for key in layered:
            buffers[key] = _fill(buffers[key], leaves[key][1], leaves[key][2], i)
    return jax.block_until_ready(buffers)


def _put(host: np.ndarray, sharding: Sharding | None) -> jax.Array:
    """``host`` (a buffer of ours: nothing else refers to it; on CPU the device array may keep it as
    its own) on ``sharding``'s devices (None: the default device, uncommitted), finished."""
    return jax.device_put(host, sharding, may_alias=True).block_until_ready()


def _read_whole(abstract: jax.ShapeDtypeStruct, read: Read) -> np.ndarray:
    """A new host buffer of ``abstract`` holding all of ``read`` (never the reader's own array)."""
    host = np.empty(abstract.shape, abstract.dtype)
    index = concrete_index((), abstract.shape)
    host[...] = _host_shard(read, index, abstract.dtype)
    return host


def place_whole(
    leaves: Mapping[Any, tuple[jax.ShapeDtypeStruct, Sharding | None, Read]], group: Callable[[Any], Hashable | None]
) -> dict[Any, jax.Array]:
    """Every leaf ``key -> (abstract [shape, dtype], sharding, read)`` read whole on the host in its
    dtype and put once (``jax.device_put``, no compiled program); each ``sharding`` None (the default
    device) or one that holds the whole array on each of its devices.

    Leaves with ``group(key)`` not None are ``[L, ...]`` stacks of layers: the leaves of one group are
    stacked together layer-major (``read`` gets ``(slice(i, i + 1), ...)`` and returns ``[1, ...]``; a
    reader may cache what one layer's leaves of a group share), put, and dropped before the next group:
    the host holds one group's stacks in their dtype plus one layer's read, never the model.
    """
    arrays, groups = {}, {}
    for key, (abstract, sharding, read) in leaves.items():
        if group(key) is None:
            arrays[key] = _put(_read_whole(abstract, read), sharding)
        else:
            groups.setdefault(group(key), []).append(key)
    for keys in groups.values():
        hosts = {key: np.empty(leaves[key][0].shape, leaves[key][0].dtype) for key in keys}
        for i in range(leaves[keys[0]][0].shape[0]):
            for key in keys:
                abstract, _, read = leaves[key]
                index = concrete_index((slice(i, i + 1),), abstract.shape)
                hosts[key][index] = _host_shard(read, index, abstract.dtype)
        for key in keys:
            arrays[key] = _put(hosts.pop(key), leaves[key][1])
    return arrays
