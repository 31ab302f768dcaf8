"""Which KV-cache row each auction slot reads: rows shared by equal sequences, forked when they diverge."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["RowUpdate", "next_rows", "row_capacities"]


class RowUpdate(NamedTuple):
    """The rows of the next decode step (:func:`next_rows`).

    Attributes:
      slot_rows: ``[A, m]`` int32, the row each auction slot reads (0 for dead slots).
      row_tokens: ``[P]`` int32, the new token of every row (0 from ``count`` on).
      count: int32 scalar, the number of live rows (rows ``0 .. count - 1``).
      copy_from, copy_to: ``[P]`` int32, cache row copies ``copy_from[i] -> copy_to[i]`` to make
        before the model reads the rows ...
      copies: int32 scalar, ... for ``i < copies``.
    """

    slot_rows: jax.Array
    row_tokens: jax.Array
    count: jax.Array
    copy_from: jax.Array
    copy_to: jax.Array
    copies: jax.Array


def row_capacities(num_rows: int) -> tuple[int, ...]:
    """The batch sizes the model program is compiled for with ``num_rows`` physical rows: 4, 8,
    16, ... below ``num_rows``, then ``num_rows`` itself. Each step runs the model on the smallest one
    that holds the step's distinct live rows, compiled the first time a step needs it. (Decoding 2
    rows costs about as much as 4: the weights' reads dominate; docs/performance.md.)"""
    return (*(2**k for k in range(2, num_rows.bit_length()) if 2**k < num_rows), num_rows)


def next_rows(slot_rows, token, live, num_rows: int):
    """The rows of the next step, compacted: one per distinct ``(row, token)`` continuation of a live
    slot, in rows ``0 .. count - 1``.

    Slots whose row and new token agree continue identical token sequences, so they keep sharing one
    row. The first continuation (lowest token) of a row keeps it if the row is below ``count``;
    every other continuation, and a kept row at or above ``count``, moves to a *hole* (a row below
    ``count`` that no continuation keeps), which must first receive a copy of its source's cache.
    Sources are always kept rows and targets never are, so the copies can run in any order. Keeping
    the live rows first lets the model decode the first rows of the cache (``LanguageModel.decode``)
    instead of gathering rows (docs/performance.md).

    Args:
      slot_rows: ``[A, m]`` int, the row each auction slot reads now. token: ``[A]`` the auctions' new
        tokens. live: ``[A, m]`` bool, the slot continues (a real agent of a running auction).
      num_rows: ``P``, the number of rows; at most ``P`` slots may be live.

    Returns:
      A :class:`RowUpdate`.
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
    return RowUpdate(
        new_slot_rows, row_tokens, count.astype(jnp.int32), copy_from, holes.astype(jnp.int32), copies.astype(jnp.int32)
    )
