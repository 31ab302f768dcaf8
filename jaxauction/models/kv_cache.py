"""The key/value cache of a Llama-family decoder: the only code that knows its axes.

Keys are stored ``[L, B, K, hd, S]`` (slots minor) and values ``[L, B, K, S, hd]``, with batch rows
``B`` on axis 1 of both; ``valid`` and ``positions`` have the rows on axis 0. Padding is on the
left, so one write index ``index`` is shared by every row.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxauction.models.config import LlamaConfig


@flax.struct.dataclass
class KVCache:
    """Fixed-size key/value cache, a pytree.

    Attributes:
      k: ``[L, B, K, hd, S]`` keys (after RoPE) of every layer, slots minor: a decoding query's
        product with the keys then sums over a major axis (see docs/performance.md).
      v: ``[L, B, K, S, hd]`` values of every layer, ``hd`` minor (the weighted sum runs over slots).
      valid: ``[B, S]`` bool, the slot holds a real (non-padding) token.
      positions: ``[B]`` int32, rotary position of the next token of each row (its count of real tokens).
      index: int32 scalar, the next slot to write (shared by all rows: padding is on the left).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    positions: jax.Array
    index: jax.Array

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_length(self) -> int:
        return self.v.shape[3]

    def take_rows(self, rows: jax.Array) -> KVCache:
        """The cache of rows ``rows: [R]`` (any row may repeat), same ``index``."""
        return self.replace(
            k=jnp.take(self.k, rows, axis=1),
            v=jnp.take(self.v, rows, axis=1),
            valid=jnp.take(self.valid, rows, axis=0),
            positions=jnp.take(self.positions, rows, axis=0),
        )

    def copy_rows(self, sources: jax.Array, targets: jax.Array, count: jax.Array) -> KVCache:
        """Copies rows ``sources[i] -> targets[i]`` for ``i < count`` (``sources, targets: [R]`` int),
        one row at a time, in place when the cache is donated. Targets must not be sources of a
        later copy (the decode engine copies into free rows only)."""

        def copy(i, cache):
            source, target = sources[i], targets[i]

            def move(x, axis):
                start = [jnp.zeros((), jnp.int32)] * x.ndim
                size = list(x.shape)
                start[axis], size[axis] = source, 1
                block = jax.lax.dynamic_slice(x, start, size)
                start[axis] = target
                return jax.lax.dynamic_update_slice(x, block, start)

            return cache.replace(
                k=move(cache.k, 1), v=move(cache.v, 1), valid=move(cache.valid, 0), positions=move(cache.positions, 0)
            )

        return jax.lax.fori_loop(0, count, copy, self)

    def append(self, keys: jax.Array, values: jax.Array, mask: jax.Array, *, after: jax.Array | None = None) -> KVCache:
        """Writes ``T`` new tokens of the leading ``R <= B`` rows at slots ``index .. index + T - 1``
        (one in-place ``dynamic_update_slice`` per array when the cache is donated).

        Args:
          keys, values: ``[L, R, T, K, hd]`` the new tokens' keys (after RoPE) and values, as the
            model's layers return them (:meth:`Llama.decode_kv` gives ``[L, R, K, hd]``: ``keys[:, :, None]``).
          mask: ``[R, T]`` bool, the token is real (marks its slot valid and advances ``positions``).
          after: optional array computed from every read of this cache (e.g. the last hidden state):
            the write is ordered after it (:func:`index_after`), so a donated cache is updated in place.
        Returns:
          The cache with ``index + T``; rows ``R ..`` keep their slots and positions. Inside ``jit`` a
          write past ``max_length`` is clamped to the last slots (it overwrites them).
        """
        if after is not None:
            self = self.replace(index=index_after(self.index, after))
        zero = jnp.zeros((), jnp.int32)
        keys, values = jnp.transpose(keys, (0, 1, 3, 4, 2)), jnp.swapaxes(values, 2, 3)  # [L, R, K, hd|T, T|hd]
        rows = mask.shape[0]
        return KVCache(
            k=jax.lax.dynamic_update_slice(self.k, keys.astype(self.k.dtype), (zero, zero, zero, zero, self.index)),
            v=jax.lax.dynamic_update_slice(self.v, values.astype(self.v.dtype), (zero, zero, zero, self.index, zero)),
            valid=jax.lax.dynamic_update_slice(self.valid, mask, (zero, self.index)),
            positions=self.positions.at[:rows].add(mask.sum(axis=1, dtype=jnp.int32)),
            index=self.index + mask.shape[1],
        )

    @staticmethod
    def partition_specs(axis: str, heads: str | None = None) -> KVCache:
        """The cache's ``PartitionSpec`` tree with its rows split over mesh axis ``axis`` and, if
        ``heads`` is given, its key/value heads over mesh axis ``heads`` (for
        ``shard_map``/``NamedSharding``); ``index`` is replicated."""
        rows = PartitionSpec(None, axis) if heads is None else PartitionSpec(None, axis, heads)
        leading = PartitionSpec(axis)
        return KVCache(k=rows, v=rows, valid=leading, positions=leading, index=PartitionSpec())


def index_after(index: jax.Array, value: jax.Array) -> jax.Array:
    """``index`` (int32) with a data dependency on ``value``: a cache write at the returned index runs
    after everything ``value`` depends on.

    ``value > inf`` is always false (NaN included), so the index is unchanged. Without the dependency
    XLA may schedule the write before some layer's read of the cache; its copy insertion then
    duplicates the whole cache every step instead of updating the donated buffers in place.
    """
    return (index + (value.reshape(-1)[0] > jnp.inf)).astype(jnp.int32)


def init_cache(config: LlamaConfig, batch_size: int, max_length: int, dtype=jnp.float32) -> KVCache:
    """An empty cache: zeros, no valid slot, positions 0, index 0."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}.")
    if max_length > config.max_position_embeddings:
        raise ValueError(
            f"max_length={max_length} exceeds the model's context, max_position_embeddings="
            f"{config.max_position_embeddings}; use a shorter cache."
        )
    shape = (config.num_layers, batch_size, config.num_kv_heads, max_length, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape[:3] + (config.head_dim, max_length), dtype),
        v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch_size, max_length), bool),
        positions=jnp.zeros((batch_size,), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )
