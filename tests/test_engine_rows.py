"""engine/rows.py: which KV-cache row each auction slot reads (shared by equal sequences, forked when
they diverge), and the row capacities the model program is compiled for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxauction.engine import next_rows, row_capacities


@pytest.mark.parametrize("seed", range(12))
def test_next_rows_against_brute_force(seed):
    """One row per distinct (row, token) continuation of a live slot, in rows 0 .. count - 1; a first
    continuation keeps its row when that row is below count, every other one gets a copy of its
    parent's cache into a row no continuation keeps."""
    rng = np.random.default_rng(seed)
    num_auctions, m = rng.integers(1, 7), rng.integers(1, 4)
    num_rows = int(rng.integers(num_auctions * m, num_auctions * m + 4))
    slot_rows = rng.integers(0, num_rows, (num_auctions, m))
    token = rng.integers(0, 3, num_auctions)
    live = rng.random((num_auctions, m)) < 0.7
    out = jax.jit(next_rows, static_argnums=3)(jnp.asarray(slot_rows), jnp.asarray(token), jnp.asarray(live), num_rows)
    new_rows, row_tokens, count, copy_from, copy_to, copies = (np.asarray(x) for x in out)
    children = sorted({(slot_rows[a, j], token[a]) for a in range(num_auctions) for j in range(m) if live[a, j]})
    assert count == len(children)
    child_row = {}
    for a in range(num_auctions):
        for j in range(m):
            if live[a, j]:
                assert child_row.setdefault((slot_rows[a, j], token[a]), new_rows[a, j]) == new_rows[a, j]
            else:
                assert new_rows[a, j] == 0
    assert sorted(child_row.values()) == list(range(count))  # distinct rows, compacted
    for (_, t), row in child_row.items():
        assert row_tokens[row] == t
    assert np.all(row_tokens[count:] == 0)
    kept = {parent for parent, _ in children}
    for parent in kept:  # the first continuation (lowest token) keeps a row below count
        first = min(t for p, t in children if p == parent)
        assert (child_row[(parent, first)] == parent) == (parent < count)
    expected = {(p, child_row[(p, t)]) for p, t in children if child_row[(p, t)] != p}
    pairs = [(int(copy_from[i]), int(copy_to[i])) for i in range(copies)]
    assert len(pairs) == len(expected) and set(pairs) == expected
    assert not {target for _, target in pairs} & kept  # copies never overwrite a source


def test_next_rows_eager_equals_jitted_and_keeps_unforked_rows_in_place():
    """Three auctions of two slots, every slot in its own row and one new token per auction: nothing
    forks, so every slot keeps its row and no copy is made; eager and jitted calls agree."""
    slot_rows = jnp.array([[0, 1], [2, 3], [4, 5]])
    token, live = jnp.array([7, 8, 9]), jnp.ones((3, 2), bool)
    eager = next_rows(slot_rows, token, live, 6)
    jitted = jax.jit(next_rows, static_argnums=3)(slot_rows, token, live, 6)
    for a, b in zip(eager, jitted):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(eager.slot_rows, slot_rows)
    np.testing.assert_array_equal(eager.row_tokens, [7, 7, 8, 8, 9, 9])
    assert int(eager.count) == 6 and int(eager.copies) == 0


def test_next_rows_shared_row_forks_into_a_copy():
    """Two auctions share row 0 (the same prompt) and draw different tokens: the lower token keeps
    row 0, the other continuation gets row 1 (a hole) filled by a copy of row 0; no slot is live
    in row 1 before, so it is free."""
    out = next_rows(jnp.array([[0], [0]]), jnp.array([5, 3]), jnp.ones((2, 1), bool), 2)
    np.testing.assert_array_equal(out.slot_rows, [[1], [0]])
    np.testing.assert_array_equal(out.row_tokens, [3, 5])
    assert int(out.count) == 2 and int(out.copies) == 1
    assert (int(out.copy_from[0]), int(out.copy_to[0])) == (0, 1)


def test_next_rows_with_every_slot_dead():
    out = next_rows(jnp.array([[2, 3]]), jnp.array([4]), jnp.zeros((1, 2), bool), 4)
    assert int(out.count) == 0 and int(out.copies) == 0
    np.testing.assert_array_equal(out.slot_rows, [[0, 0]])
    np.testing.assert_array_equal(out.row_tokens, [0, 0, 0, 0])


def test_row_capacities():
    assert row_capacities(2) == (2,) and row_capacities(4) == (4,) and row_capacities(5) == (4, 5)
    assert row_capacities(22) == (4, 8, 16, 22)
    assert row_capacities(16) == (4, 8, 16)


@pytest.mark.parametrize("num_rows", range(1, 70))
def test_row_capacities_are_the_powers_of_two_from_4_below_the_rows_then_the_rows(num_rows):
    capacities = row_capacities(num_rows)
    expected = [2**k for k in range(2, 8) if 2**k < num_rows] + [num_rows]
    assert list(capacities) == expected
    assert all(a < b for a, b in zip(capacities, capacities[1:]))  # strictly increasing: searchsorted finds one
