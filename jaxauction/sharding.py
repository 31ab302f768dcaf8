"""Sharding the auction batch axis (and a model's weights) over devices with ``jax.sharding``.

Auctions are independent, so the batch axis is split over the mesh axis ``"auctions"``; an optional
second axis ``"model"`` splits each model's weights and cache heads (tensor parallelism, declared by
the model's ``partition_specs``), everything else (shared agent distributions) is replicated.
:func:`make_mesh` builds such a mesh and :func:`check_mesh` is the one check every entry point that
takes a mesh applies. The same code runs on one CPU, one GPU or many accelerators: with one device the
mesh has one entry and sharding is a no-op. On several hosts (TPU pods, GPU clusters) call ``jax.distributed.initialize()``
first on every host; ``jax.devices()`` then lists every host's devices and :func:`auction_mesh`
spans them all. Every process then runs the same program on the same inputs: :func:`put` places
an array every process holds whole onto a mesh that spans several processes, and :func:`host_value`
reads an array back on every process, gathering the shards other processes hold (run on two
processes of 4 CPU devices each by ``tests/test_multihost.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "auctions"
"""The mesh axis the auctions (and their cache rows) are split over."""
MODEL_AXIS = "model"
"""The mesh axis a model's weights are split over (tensor parallelism)."""


def auction_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-dimensional mesh named ``"auctions"`` over ``devices`` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices: expected at least one device; got an empty list.")
    return Mesh(np.asarray(devices), (AXIS,))


def make_mesh(auctions: int | None = None, model: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of ``auctions x model`` devices with axes ``("auctions", "model")``.

    Args:
      auctions: devices the auctions are split over (default: all the devices ``model`` leaves).
      model: devices each model is split over (tensor parallelism; 1 replicates the weights).
      devices: the devices to use, the first ``auctions * model`` of them (default ``jax.devices()``).
    Raises ``ValueError`` naming the fix when the sizes are not positive integers or need more devices
    than given.
    """
    devices = list(jax.devices() if devices is None else devices)
    for name, size in (("auctions", auctions), ("model", model)):
        if size is None and name == "auctions":
            continue
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"{name}: expected a positive integer (devices along the {name!r} axis); got {size!r}.")
    if auctions is None:
        auctions = max(1, len(devices) // model)
    if auctions * model > len(devices):
        raise ValueError(
            f"make_mesh: auctions * model = {auctions} * {model} = {auctions * model} devices, but only "
            f"{len(devices)} are given; choose sizes whose product is at most {len(devices)}."
        )
    grid = np.asarray(devices[: auctions * model], dtype=object).reshape(auctions, model)
    return Mesh(grid, (AXIS, MODEL_AXIS))


def check_mesh(mesh, argument: str = "mesh") -> Mesh | None:
    """``mesh`` if it is None or a ``jax.sharding.Mesh`` whose axes are ``("auctions",)`` or
    ``("auctions", "model")``; else ``ValueError`` naming the axes and the fix.

    A mesh whose axes are not ``Auto`` (``jax.make_mesh`` makes them ``Explicit`` by default) comes
    back as the same devices and names with ``Auto`` axes: the engine places arrays itself and lets
    XLA's partitioner propagate the model's shardings."""
    if mesh is None:
        return None
    fix = (
        f"build one with jaxauction.sharding.make_mesh(auctions=a, model=t) (axes {AXIS!r}, {MODEL_AXIS!r}) "
        "or jaxauction.sharding.auction_mesh()"
    )
    if not isinstance(mesh, Mesh):
        text = repr(mesh)
        raise ValueError(
            f"{argument}: expected None or a jax.sharding.Mesh; got {type(mesh).__name__} {text[:60]}. Fix: {fix}."
        )
    if tuple(mesh.axis_names) not in ((AXIS,), (AXIS, MODEL_AXIS)):
        raise ValueError(
            f"{argument}: expected a mesh with axes ({AXIS!r},) or ({AXIS!r}, {MODEL_AXIS!r}); got axes "
            f"{tuple(mesh.axis_names)} of sizes {tuple(mesh.devices.shape)}. Fix: {fix}."
        )
    if any(kind != jax.sharding.AxisType.Auto for kind in mesh.axis_types):
        return Mesh(mesh.devices, mesh.axis_names)
    return mesh


def auction_devices(mesh: Mesh | None) -> int:
    """Devices along the ``"auctions"`` axis (1 without a mesh): each holds ``1 / a`` of the auctions."""
    return 1 if mesh is None else int(mesh.shape[AXIS])


def model_devices(mesh: Mesh | None) -> int:
    """Devices along the ``"model"`` axis (1 without a mesh or without that axis)."""
    return 1 if mesh is None else int(dict(mesh.shape).get(MODEL_AXIS, 1))


def batch_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
    """Sharding of an ``ndim``-dimensional array whose ``axis`` is the auction batch axis."""
    spec = [None] * ndim
    spec[axis] = AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def padded_size(size: int, mesh: Mesh | None) -> int:
    """``size`` rounded up to a multiple of the devices along ``mesh``'s ``"auctions"`` axis."""
    devices = auction_devices(mesh)
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
    """Places ``x`` with its ``axis`` split over ``mesh``'s ``"auctions"`` axis (replicated over
    ``"model"``; unchanged when ``mesh`` is None).

    Raises ``ValueError`` naming the fix when the batch does not divide evenly (pad it first with
    :func:`pad_batch` and :func:`padded_size`).
    """
    if mesh is None:
        return x
    if x.shape[axis] % auction_devices(mesh):
        raise ValueError(
            f"shard_batch: axis {axis} of shape {x.shape} does not divide over the "
            f"{auction_devices(mesh)} devices of the {AXIS!r} axis; pad it to padded_size({x.shape[axis]}, mesh) first."
        )
    return put(x, batch_sharding(mesh, x.ndim, axis))


def replicate(tree, mesh: Mesh | None):
    """Places every leaf of ``tree`` on every device of ``mesh`` (unchanged when ``mesh`` is None)."""
    if mesh is None:
        return tree
    return put(tree, replicated(mesh))


def put(tree, shardings):
    """``jax.device_put(tree, shardings)`` (``shardings`` one ``NamedSharding`` or a matching tree), also when
    the mesh spans several processes: there ``device_put`` refuses an array already on a device, so a
    leaf that this process holds whole (every process computed the same value) is placed from its host
    copy, each process filling the shards on its own devices (``jax.make_array_from_callback``)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, NamedSharding):
        return jax.tree.map(lambda x: _put_global(x, shardings), tree)
    return jax.tree.map(_put_global, tree, shardings)


def _put_global(x, target: NamedSharding):
    if not isinstance(x, jax.Array) or not x.is_fully_addressable or target.is_fully_addressable:
        return jax.device_put(x, target)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _put_global(jax.random.key_data(x), target)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, target, lambda index: host[index])


def host_value(tree):
    """Every leaf of ``tree`` as a numpy array on the host (``jax.device_get``). When the arrays are
    split over several processes (a multi-host mesh), each process gathers the shards the others
    hold (a collective: every process must call it at the same point) and gets the whole value."""
    if jax.process_count() == 1:
        return jax.device_get(tree)

    def read(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(read, tree)
