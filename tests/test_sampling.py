"""Stable sampling with realized payments (docs/maths.md §5), checked by Monte Carlo with 5-sigma tolerances."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import ref_linear, ref_linear_closed_form, ref_probs

from jaxauction import sampling

N_DRAWS = 40_000
LOGITS = np.log(np.array([[0.35, 0.05, 0.30, 0.10, 0.15, 0.05], [0.10, 0.30, 0.05, 0.25, 0.05, 0.25]]))
BIDS = np.array([0.8, 1.5])

draw_many = jax.jit(jax.vmap(sampling.stable_sample_two, in_axes=(0, None, None)))


def _draws(bids, n=N_DRAWS, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    tokens, pays = draw_many(keys, jnp.asarray(LOGITS, jnp.float32), jnp.asarray(bids, jnp.float32))
    return np.asarray(tokens), np.asarray(pays, np.float64)


def test_output_law_is_the_linear_aggregate():
    tokens, _ = _draws(BIDS)
    q = ref_linear(LOGITS, BIDS)
    freq = np.bincount(tokens, minlength=6) / N_DRAWS
    np.testing.assert_array_less(np.abs(freq - q), 5 * np.sqrt(q * (1 - q) / N_DRAWS) + 1e-12)


def test_mean_realized_payments_equal_expected_payments():
    _, pays = _draws(BIDS, seed=1)
    expected = ref_linear_closed_form(LOGITS, BIDS)
    standard_error = pays.std(axis=0) / np.sqrt(N_DRAWS)
    assert np.all(standard_error > 0)
    np.testing.assert_array_less(np.abs(pays.mean(axis=0) - expected), 5 * standard_error)
    # at most one agent pays per draw, and never more than its bid
    assert np.all((pays[:, 0] == 0) | (pays[:, 1] == 0))
    assert np.all(pays <= BIDS * (1 + 1e-5))


def test_outputs_switch_only_towards_the_raising_agent():
    """Same randomness, rising b_1: the token only switches from one agent 1 pushes down to one it pushes up."""
    d = np.diff(ref_probs(LOGITS)[::-1], axis=0)[0]  # p_1 - p_2
    keys = jax.random.split(jax.random.key(2), N_DRAWS)
    previous = None
    for b1 in [0.0, 0.1, 0.5, 1.0, 3.0, 30.0]:
        tokens, _ = draw_many(keys, jnp.asarray(LOGITS, jnp.float32), jnp.asarray([b1, 1.0], jnp.float32))
        tokens = np.asarray(tokens)
        if previous is not None:
            changed = tokens != previous
            assert np.all(d[previous[changed]] < 0) and np.all(d[tokens[changed]] > 0)
        previous = tokens


def test_realized_payments_are_the_threshold_bids():
    """Bidding just above the realized payment keeps the outcome the payer won; just below loses it."""
    keys = jax.random.split(jax.random.key(3), 500)
    logits = jnp.asarray(LOGITS, jnp.float32)
    draw_rows = jax.jit(jax.vmap(sampling.stable_sample_two, in_axes=(0, None, 0)))
    _, pays = draw_rows(keys, logits, jnp.broadcast_to(jnp.asarray(BIDS, jnp.float32), (500, 2)))
    pays = np.asarray(pays)
    d = np.diff(ref_probs(LOGITS)[::-1], axis=0)[0]
    for agent in (0, 1):
        paying = pays[:, agent] > 0
        assert paying.sum() > 20
        for factor, wins in ((1.001, True), (0.999, False)):
            bids = np.broadcast_to(BIDS, (500, 2)).copy()
            bids[:, agent] = np.where(paying, pays[:, agent] * factor, bids[:, agent])
            got = np.asarray(draw_rows(keys, logits, jnp.asarray(bids, jnp.float32))[0])[paying]
            favoured = d[got] > 0 if agent == 0 else d[got] <= 0
            assert np.all(favoured == wins)


def test_batch_axes_zero_bids_and_shapes():
    logits = jnp.asarray(np.stack([LOGITS, LOGITS[::-1]]), jnp.float32)
    token, pays = sampling.stable_sample_two(jax.random.key(4), logits, jnp.array([[1.0, 0.0], [0.0, 0.0]]))
    assert token.shape == (2,) and token.dtype == jnp.int32 and pays.shape == (2, 2)
    np.testing.assert_array_equal(pays, 0.0)  # a lone bidder and all-zero bids pay nothing
    with pytest.raises(ValueError, match="exactly 2 agents"):
        sampling.stable_sample_two(jax.random.key(0), jnp.zeros((3, 4)), jnp.ones(3))


def test_all_zero_bids_sample_the_equal_mixture():
    tokens, pays = _draws(np.zeros(2), seed=5)
    q = ref_linear(LOGITS, np.ones(2))
    freq = np.bincount(tokens, minlength=6) / N_DRAWS
    np.testing.assert_array_less(np.abs(freq - q), 5 * np.sqrt(q * (1 - q) / N_DRAWS) + 1e-12)
    assert np.all(pays == 0)
