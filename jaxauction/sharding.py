"""Sharding the auction batch axis over devices with ``jax.sharding``.

Auctions are independent, so the batch axis is split over a one-dimensional device mesh (axis name
``"auctions"``) and everything else (model weights, shared agent distributions) is replicated. The
same code runs on one CPU, one GPU or many accelerators: with one device the mesh has one entry and
sharding is a no-op. On several hosts (TPU pods, GPU clusters) call ``jax.distributed.initialize()``
first on every host; ``jax.devices()`` then lists every host's devices and :func:`auction_mesh`
spans them all (each host feeds and reads its own shards, see the README).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "auctions"


def auction_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-dimensional mesh named ``"auctions"`` over ``devices`` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices: expected at least one device; got an empty list.")
    return Mesh(np.asarray(devices), (AXIS,))


def batch_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
    """Sharding of an ``ndim``-dimensional array whose ``axis`` is the auction batch axis."""
    spec = [None] * ndim
    spec[axis] = AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def padded_size(size: int, mesh: Mesh | None) -> int:
    """``size`` rounded up to a multiple of the number of devices in ``mesh``."""
    devices = 1 if mesh is None else mesh.size
    return -(-size // devices) * devices


def pad_batch(x, size: int, axis: int = 0):
    """Pads ``x`` along ``axis`` to ``size`` by repeating its last entry (results are sliced off)."""
    missing = size - x.shape[axis]
    if missing < 0:
        raise ValueError(f"pad_batch: the batch has {x.shape[axis]} entries, more than size = {size}.")
    if missing == 0:
        return x
    last = jax.lax.slice_in_dim(x, x.shape[axis] - 1, x.shape[axis], axis=axis)
    reps = [1] * x.ndim
    reps[axis] = missing
    return jnp.concatenate([x, jnp.tile(last, reps)], axis=axis)


def shard_batch(x, mesh: Mesh | None, axis: int = 0):
    """Places ``x`` with its ``axis`` split over ``mesh`` (unchanged when ``mesh`` is None).

    Raises ``ValueError`` naming the fix when the batch does not divide evenly (pad it first with
    :func:`pad_batch` and :func:`padded_size`).
    """
    if mesh is None:
        return x
    if x.shape[axis] % mesh.size:
        raise ValueError(
            f"shard_batch: axis {axis} of shape {x.shape} does not divide over "
            f"{mesh.size} devices; pad it to padded_size({x.shape[axis]}, mesh) first."
        )
    return jax.device_put(x, batch_sharding(mesh, x.ndim, axis))


def replicate(tree, mesh: Mesh | None):
    """Places every leaf of ``tree`` on every device of ``mesh`` (unchanged when ``mesh`` is None)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, replicated(mesh))
