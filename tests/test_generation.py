"""Auction generation on a tiny random Llama: the compiled loop against a plain reference loop.

The reference re-runs the model's full forward pass (no KV cache) on every agent's whole sequence at
every step, in Python, and charges the closed-form linear payments: it shares neither the cache,
the batching, the masking nor the autodiff payment path with `jaxauction.generate`.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_llm import EOS, PAD, TinyTokenizer, tiny_llama

from jaxauction import aggregation, payments, prompts
from jaxauction.engine import Auction, generate, next_rows, parse_memory_budget, plan_chunks, row_capacities
from jaxauction.models import jit_forward

VOCAB = 16


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(VOCAB, seed=0), TinyTokenizer(VOCAB)


PROMPTS = [[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14]]


def reference_auction(model, prompts, bids, *, max_new_tokens, base=None, base_bid=0.0):
    """Greedy linear auction, recomputing every agent's full sequence each step (no cache)."""
    sequences = [list(p) for p in prompts] + ([list(base)] if base is not None else [])
    all_bids = np.append(bids, base_bid) if base is not None else np.asarray(bids)
    tokens, charged = [], []
    for _ in range(max_new_tokens):
        logits = jnp.stack([jit_forward(model, jnp.asarray([s]))[0, -1] for s in sequences])
        log_q = aggregation.linear(logits, jnp.asarray(all_bids, jnp.float32))
        token = int(jnp.argmax(log_q))
        charged.append(np.asarray(payments.linear_closed_form(logits, jnp.asarray(all_bids)))[: len(prompts)])
        tokens.append(token)
        if token == EOS:
            break
        for s in sequences:
            s.append(token)
    return np.array(tokens), np.array(charged)


def test_greedy_auction_matches_uncached_reference_loop(tiny):
    model, _ = tiny
    bids = np.array([[1.0, 0.5, 2.0], [0.2, 3.0, 0.0]])
    result = generate(
        PROMPTS, bids, rule="linear", payment="second_price", decoding="greedy", max_new_tokens=8, model=tiny
    )
    for a in range(len(bids)):
        tokens, charged = reference_auction(model, PROMPTS, bids[a], max_new_tokens=8)
        length = int(result.lengths[a])
        assert length == len(tokens)
        np.testing.assert_array_equal(result.tokens[a, :length], tokens)
        np.testing.assert_allclose(result.token_payments[a, :length], charged, rtol=2e-3, atol=1e-6)
        assert np.all(result.tokens[a, length:] == PAD)
        assert np.all(result.token_payments[a, length:] == 0)
    np.testing.assert_allclose(result.payments, result.token_payments.sum(axis=1), rtol=1e-6)


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
    out = next_rows(jnp.asarray(slot_rows), jnp.asarray(token), jnp.asarray(live), num_rows)
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


def test_row_capacities():
    assert row_capacities(2) == (2,) and row_capacities(4) == (4,) and row_capacities(5) == (4, 5)
    assert row_capacities(22) == (4, 8, 16, 22)
    assert row_capacities(16) == (4, 8, 16)


def test_sweep_points_that_share_and_fork_histories_match_the_reference(tiny):
    """A greedy bid sweep: auctions with the same tokens share model rows until they diverge (a fork
    copies the row's cache). Every auction equals the uncached reference loop."""
    model, _ = tiny
    prompts = PROMPTS[:2]
    shares = np.linspace(0.0, 1.0, 9)
    bids = np.stack([shares, 1.0 - shares], axis=1)
    result = generate(prompts, bids, rule="linear", decoding="greedy", max_new_tokens=10, model=tiny)
    histories = [tuple(result.tokens[a, : result.lengths[a]]) for a in range(len(bids))]
    assert len(set(histories)) < len(bids), "precondition: some auctions repeat another's tokens"
    forked = any(h[0] == g[0] and h != g for h in histories for g in histories)
    assert forked, "precondition: two auctions share a first token, then diverge"
    for a in range(len(bids)):
        tokens, charged = reference_auction(model, prompts, bids[a], max_new_tokens=10)
        assert histories[a] == tuple(tokens)
        np.testing.assert_allclose(result.token_payments[a, : len(tokens)], charged, rtol=2e-3, atol=1e-6)


def test_base_prompt_takes_part_and_is_never_charged(tiny):
    model, _ = tiny
    base = [2, 2, 3]
    bids = np.array([1.0, 0.0, 0.0])
    result = generate(PROMPTS, bids, decoding="greedy", max_new_tokens=6, model=tiny, base_prompt=base, base_bid=0.7)
    tokens, charged = reference_auction(model, PROMPTS, bids, max_new_tokens=6, base=base, base_bid=0.7)
    assert result.payments.shape == (3,)
    np.testing.assert_array_equal(result.tokens[: len(tokens)], tokens)
    np.testing.assert_allclose(result.token_payments[: len(tokens)], charged, rtol=2e-3, atol=1e-6)
    # The lone paying bidder faces the base bid, so it pays; zero bidders never pay.
    assert result.payments[0] > 0 and np.all(result.payments[1:] == 0)


def test_same_key_same_result_and_batch_equals_each_alone(tiny):
    bids = np.array(
        [
            [1.0, 1.0, 1.0],
            [5.0, 0.1, 0.1],
            [0.0, 0.0, 2.0],
            [0.3, 0.3, 0.9],
            [2.0, 0.0, 0.0],
            [0.1, 0.1, 0.1],
            [1.0, 4.0, 0.2],
            [0.5, 0.0, 0.5],
        ]
    )
    keys = jax.random.split(jax.random.key(42), len(bids))
    batch = generate(PROMPTS, bids, key=keys, max_new_tokens=16, model=tiny)
    again = generate(PROMPTS, bids, key=keys, max_new_tokens=16, model=tiny)
    np.testing.assert_array_equal(batch.tokens, again.tokens)
    np.testing.assert_array_equal(batch.token_payments, again.token_payments)
    assert any(length < 16 for length in batch.lengths), "precondition: some auction ends at EOS"
    for a in range(len(bids)):
        alone = generate(PROMPTS, bids[a], key=keys[a][None], max_new_tokens=16, model=tiny)
        assert alone.tokens.shape == (16,) and alone.payments.shape == (3,)
        np.testing.assert_array_equal(alone.tokens, batch.tokens[a])
        assert alone.lengths == batch.lengths[a] and alone.text == batch.texts[a]
        np.testing.assert_allclose(alone.token_payments, batch.token_payments[a], rtol=1e-4, atol=1e-6)
    other = generate(PROMPTS, bids, key=jax.random.key(7), max_new_tokens=16, model=tiny)
    assert not np.array_equal(other.tokens, batch.tokens)


def test_sampled_tokens_follow_the_aggregate(tiny):
    """The first token of many auctions is distributed as q (chi-square against the exact q)."""
    model, _ = tiny
    bids = np.array([0.6, 0.3, 0.1])
    num = 3000
    result = generate(
        PROMPTS, np.tile(bids, (num, 1)), key=jax.random.key(3), max_new_tokens=1, model=tiny, payment=None
    )
    logits = jnp.stack([jit_forward(model, jnp.asarray([p]))[0, -1] for p in PROMPTS])
    q = np.exp(np.asarray(aggregation.linear(logits, jnp.asarray(bids))))
    counts = np.bincount(result.tokens[:, 0], minlength=VOCAB)
    expected = num * q
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < 50.0, (chi2, counts, expected)  # 15 degrees of freedom: P(chi2 > 50) < 1e-5


def test_stable_decoding_pays_realized_thresholds(tiny):
    bids = np.tile([0.7, 0.3], (64, 1))
    result = generate(PROMPTS[:2], bids, decoding="stable", max_new_tokens=4, model=tiny, key=jax.random.key(5))
    assert result.token_payments.shape == (64, 4, 2)
    assert np.all(result.token_payments >= 0)
    # At most one agent pays for any token (the one whose bid the outcome's switch depends on).
    assert np.all((result.token_payments > 0).sum(axis=-1) <= 1)
    with pytest.raises(ValueError, match="two agents"):
        generate(PROMPTS, [1.0, 1.0, 1.0], decoding="stable", model=tiny)


def test_temperature_scales_agent_logits(tiny):
    """Temperature T equals feeding logits / T: checked by greedy equality at T and by the closed form."""
    model, _ = tiny
    bids = np.array([1.0, 2.0, 0.5])
    hot = generate(PROMPTS, bids, decoding="greedy", max_new_tokens=1, model=tiny, temperature=3.0)
    logits = jnp.stack([jit_forward(model, jnp.asarray([p]))[0, -1] for p in PROMPTS])
    expected = payments.linear_closed_form(logits / 3.0, jnp.asarray(bids))
    np.testing.assert_allclose(hot.token_payments[0], expected, rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bids=[1.0, -1.0, 1.0]), "bids: .*negative bid"),
        (dict(bids=[1.0, np.nan, 1.0]), "bids: .*non-finite"),
        (
            dict(bids=[1.0, 1.0]),
            r"bids: expected .* shape \[3\] or \[batch, 3\], one bid per agent \(3\); got shape \(2,\)",
        ),
        (dict(bids=[[[1.0, 1.0, 1.0]]]), r"bids: expected .*\(1 or 2 axes\); got shape \(1, 1, 3\)"),
        (dict(rule="quadratic"), "rule: unknown rule 'quadratic'"),
        (dict(payment="first_price"), "payment: expected one of"),
        (dict(decoding="beam"), "decoding: expected one of"),
        (dict(max_new_tokens=0), "max_new_tokens: expected a positive integer"),
        (dict(temperature=0.0), "temperature: expected a finite number > 0"),
        (dict(base_bid=-1.0, base_prompt=[2]), "base_bid"),
        (dict(key=jax.random.split(jax.random.key(0), 5)), r"key: a batch of keys must have shape"),
        (dict(prompts=[[3, 4], [99], [5]]), r"prompts\[1\]: token ids \[99\] are outside the vocabulary"),
        (dict(prompts=[]), "prompts: expected a non-empty list"),
        (dict(prompts=[3.5, [2], [5]]), r"prompts\[0\]: each prompt must be"),
        (dict(max_new_tokens=200), "the model's context of 128"),
        (dict(model="llama"), r"model: expected the \(model, tokenizer\) pair"),
    ],
)
def test_bad_input_is_named(tiny, kwargs, match):
    arguments = dict(prompts=PROMPTS, bids=[1.0, 1.0, 1.0], model=tiny)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(arguments.pop("prompts"), arguments.pop("bids"), **arguments)


# ---------------------------------------------------------------------------------------------- mixed batches

MIXED = [
    Auction([[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14]], [1.0, 0.5, 2.0]),
    Auction([[5, 6], [7, 8, 9, 10, 11, 12]], [0.3, 1.2], base_prompt=[2, 2, 3], base_bid=0.7),
    Auction([[13, 12, 11]], [2.0]),
    Auction([[4, 4, 4, 4], [9, 8]], [0.0, 0.0]),
    Auction([[3, 4, 5, 6, 7], [8, 9, 10]], [0.2, 3.0], base_prompt=[2, 2, 3], base_bid=0.1),
]


def test_mixed_batch_each_auction_equals_alone_and_the_reference(tiny):
    model, _ = tiny
    batch = generate(MIXED, decoding="greedy", max_new_tokens=8, model=tiny)
    assert batch.tokens.shape == (5, 8) and batch.payments.shape == (5, 3) and batch.token_payments.shape == (5, 8, 3)
    np.testing.assert_array_equal(batch.num_agents, [3, 2, 1, 2, 2])
    np.testing.assert_array_equal(batch.bids[1], [0.3, 1.2, 0.0])
    assert batch.valid.all()
    for a, auction in enumerate(MIXED):
        n = len(auction.prompts)
        alone = generate(auction, decoding="greedy", max_new_tokens=8, model=tiny)
        assert alone.payments.shape == (n,) and alone.num_agents == n and alone.valid
        np.testing.assert_array_equal(alone.tokens, batch.tokens[a])
        assert alone.lengths == batch.lengths[a] and alone.text == batch.texts[a]
        np.testing.assert_allclose(alone.token_payments, batch.token_payments[a, :, :n], rtol=1e-5, atol=1e-7)
        assert np.all(batch.token_payments[a, :, n:] == 0)  # padded agents are never charged
        tokens, charged = reference_auction(
            model, auction.prompts, auction.bids, max_new_tokens=8, base=auction.base_prompt, base_bid=auction.base_bid
        )
        length = int(batch.lengths[a])
        np.testing.assert_array_equal(batch.tokens[a, :length], tokens)
        np.testing.assert_allclose(batch.token_payments[a, :length, :n], charged, rtol=2e-3, atol=1e-6)


SHARED = [2, 3, 4, 5, 6, 7, 8, 9] * 3  # a 24-token prefix common to every prompt below (a system prompt)
SHARED_MIXED = [
    Auction([SHARED + [10, 11], SHARED + [12], SHARED + [13, 14, 15]], [1.0, 0.4, 2.0]),
    Auction([SHARED + [15, 2, 3, 4], SHARED + [5]], [0.3, 1.2], base_prompt=SHARED + [6, 7], base_bid=0.5),
]


def test_shared_prefix_length_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        head = list(rng.integers(2, 4, rng.integers(0, 40)))
        seqs = [head + list(rng.integers(2, 4, rng.integers(0, 6))) for _ in range(rng.integers(1, 5))]
        distinct = {tuple(q) for q in seqs}
        common = 0  # brute force: the longest c with one prefix and at least one own token per sequence
        for c in range(min(map(len, distinct))):
            if len({q[:c] for q in distinct}) == 1:
                common = c
        expected = common // 8 * 8 if len(distinct) > 1 else 0
        assert prompts.shared_prefix_length(seqs) == (expected if expected >= prompts.SHARED_PREFIX_MIN else 0)
    ids, mask = prompts.left_pad([[5, 6], [7]], 0, width=4)
    np.testing.assert_array_equal(ids, [[0, 0, 5, 6], [0, 0, 0, 7]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="width: 1 is shorter than the longest sequence"):
        prompts.left_pad([[5, 6]], 0, width=1)


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_shared_prompt_prefix_is_prefilled_once_with_the_same_result(tiny, monkeypatch, x64):
    model, _ = tiny
    found = []
    measure = prompts.shared_prefix_length
    monkeypatch.setattr(prompts, "shared_prefix_length", lambda seqs: found.append(measure(seqs)) or found[-1])
    with jax.enable_x64(x64):
        shared = generate(SHARED_MIXED, decoding="greedy", max_new_tokens=6, model=tiny)
        chunked = generate(SHARED_MIXED, decoding="greedy", max_new_tokens=6, model=tiny, memory_budget=1)
        monkeypatch.setattr(prompts, "SHARED_PREFIX_MIN", 10**9)  # every prompt prefilled whole
        whole = generate(SHARED_MIXED, decoding="greedy", max_new_tokens=6, model=tiny)
    assert found == [24, 24, 0]  # the whole 24-token prefix is shared (a multiple of 8), then not at all
    for other in (chunked, whole):
        np.testing.assert_array_equal(shared.tokens, other.tokens)
        np.testing.assert_allclose(shared.token_payments, other.token_payments, rtol=1e-5, atol=1e-7)
    for a, auction in enumerate(SHARED_MIXED):
        n = len(auction.prompts)
        tokens, charged = reference_auction(
            model, auction.prompts, auction.bids, max_new_tokens=6, base=auction.base_prompt, base_bid=auction.base_bid
        )
        length = int(shared.lengths[a])
        np.testing.assert_array_equal(shared.tokens[a, :length], tokens)
        np.testing.assert_allclose(shared.token_payments[a, :length, :n], charged, rtol=2e-3, atol=1e-6)


def test_mixed_batch_sampled_with_per_auction_keys(tiny):
    keys = jax.random.split(jax.random.key(11), len(MIXED))
    batch = generate(MIXED, key=keys, max_new_tokens=6, model=tiny, payment="kl", rule="log_linear")
    for a in (0, 2, 4):
        alone = generate(MIXED[a], key=keys[a][None], max_new_tokens=6, model=tiny, payment="kl", rule="log_linear")
        np.testing.assert_array_equal(alone.tokens, batch.tokens[a])
        n = len(MIXED[a].prompts)
        np.testing.assert_allclose(alone.payments, batch.payments[a, :n], rtol=1e-4, atol=1e-6)


def test_prompt_form_equals_auction_form(tiny):
    bids = np.array([[1.0, 0.5, 2.0], [0.2, 3.0, 0.1]])
    swept = generate(PROMPTS, bids, decoding="greedy", max_new_tokens=6, model=tiny, base_prompt=[2, 3], base_bid=0.4)
    auctions = [Auction(PROMPTS, row, base_prompt=[2, 3], base_bid=0.4) for row in bids]
    listed = generate(auctions, decoding="greedy", max_new_tokens=6, model=tiny)
    np.testing.assert_array_equal(swept.tokens, listed.tokens)
    np.testing.assert_allclose(swept.token_payments, listed.token_payments, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(swept.num_agents, [3, 3])


# ---------------------------------------------------------------------------------------------- broken auctions


def nan_for_marked_auctions(logits, bids):
    """The linear rule, except NaN for every auction whose first bid is exactly 7 (a broken rule)."""
    log_q = aggregation.linear(logits, bids)
    return jnp.where((bids[..., :1] == 7.0), jnp.nan, log_q)


def test_a_nan_distribution_is_flagged_not_reported_as_token_zero(tiny):
    bids = np.array([[1.0, 0.5, 2.0], [7.0, 1.0, 1.0], [0.2, 3.0, 0.0]])
    result = generate(PROMPTS, bids, rule=nan_for_marked_auctions, decoding="greedy", max_new_tokens=6, model=tiny)
    np.testing.assert_array_equal(result.valid, [True, False, True])
    assert np.all(np.isnan(result.payments[1])) and result.lengths[1] == 0 and result.texts[1] == ""
    assert np.all(result.tokens[1] == PAD)
    healthy = generate(PROMPTS, bids[[0, 2]], decoding="greedy", max_new_tokens=6, model=tiny)
    np.testing.assert_array_equal(result.tokens[[0, 2]], healthy.tokens)
    np.testing.assert_allclose(result.payments[[0, 2]], healthy.payments, rtol=2e-3, atol=1e-6)


def test_nan_weights_flag_every_auction(tiny):
    model, tokenizer = tiny
    graphdef, state = nnx.split(model)
    broken = nnx.merge(graphdef, jax.tree.map(lambda x: x * jnp.nan if x.ndim == 2 else x, state))
    result = generate(PROMPTS, [[1.0, 1.0, 1.0], [2.0, 0.0, 1.0]], max_new_tokens=4, model=(broken, tokenizer))
    assert not result.valid.any() and np.all(np.isnan(result.payments))
    assert np.all(result.lengths == 0)


# ---------------------------------------------------------------------------------------------- memory budget


def test_chunked_batch_equals_one_chunk(tiny):
    rng = np.random.default_rng(4)
    bids = rng.exponential(size=(21, 3))
    whole = generate(PROMPTS, bids, decoding="greedy", max_new_tokens=5, model=tiny)
    chunked = generate(PROMPTS, bids, decoding="greedy", max_new_tokens=5, model=tiny, memory_budget="300KB")
    np.testing.assert_array_equal(chunked.tokens, whole.tokens)
    np.testing.assert_allclose(chunked.token_payments, whole.token_payments, rtol=1e-5, atol=1e-8)
    mixed = generate(MIXED * 3, decoding="greedy", max_new_tokens=5, model=tiny, memory_budget=120_000)
    alone = generate(MIXED * 3, decoding="greedy", max_new_tokens=5, model=tiny)
    np.testing.assert_array_equal(mixed.tokens, alone.tokens)
    np.testing.assert_allclose(mixed.payments, alone.payments, rtol=1e-5, atol=1e-8)


def test_chunks_of_different_auctions_share_one_program(tiny, chunk_runs):
    """Chunks with different row counts (one-agent auctions, then three-agent ones) are laid out with
    the batch's row counts: one prefill and one auction program for all chunks, same results."""
    from jaxauction.engine import runtime

    auctions = [MIXED[2]] * 4 + [MIXED[0], MIXED[1]] * 2
    before = runtime.compilations()
    chunked = generate(auctions, decoding="greedy", max_new_tokens=7, model=tiny, memory_budget=60_000)
    after = runtime.compilations()
    assert len(chunk_runs) >= 3, "precondition: the batch runs in several chunks"
    for name in ("prefill_body", "_auction_program"):
        assert after.get(name, 0) - before.get(name, 0) == 1, (name, before, after)
    whole = generate(auctions, decoding="greedy", max_new_tokens=7, model=tiny)
    np.testing.assert_array_equal(chunked.tokens, whole.tokens)
    np.testing.assert_allclose(chunked.payments, whole.payments, rtol=1e-5, atol=1e-8)


def _model_programs():
    from jaxauction.engine import loop, runtime

    return {key: program for key, program in runtime._PROGRAMS.items() if key[0] is loop._model_program}


def test_every_rule_payment_and_decoding_shares_the_model_programs(tiny, monkeypatch):
    """The model is compiled once per shape and row capacity: a new rule, payment or decoding
    compiles one auction program (no model in it) and reuses the prefill and model programs."""
    import collections

    from jaxauction.engine import runtime

    # An empty program table: programs of earlier tests (other cache shapes, same capacities) would
    # hide which capacities this test's calls compiled.
    monkeypatch.setattr(runtime, "_PROGRAMS", collections.OrderedDict())
    bids = np.array([[1.0, 2.0, 0.5], [0.2, 0.1, 3.0], [1.0, 1.0, 1.0]])
    generate(PROMPTS, bids, decoding="greedy", max_new_tokens=6, model=tiny)
    models = _model_programs()
    assert models, "precondition: the first call compiled model programs"
    variants = [
        dict(rule="log_linear"),
        dict(payment="kl"),
        dict(decoding="sample"),
        dict(payment=None, rule=lambda logits, bids: jax.nn.log_softmax(logits.mean(axis=-2), axis=-1)),
    ]
    for variant in variants:
        before = runtime.compilations()
        result = generate(PROMPTS, bids, **{"decoding": "greedy", **variant}, max_new_tokens=6, model=tiny)
        after = runtime.compilations()
        assert result.valid.all()
        grew = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
        now = _model_programs()
        new_capacities = {key[1][1] for key in now} - {key[1][1] for key in models}
        # Only a row capacity no earlier call needed (sampling forks more rows) compiles the model.
        assert grew == {"_auction_program": 1, **({"_model_program": len(new_capacities)} if new_capacities else {})}
        assert len(now) == len(models) + len(new_capacities), (variant, grew)
        assert all(program is now.get(key) for key, program in models.items())
        models = now


def test_compiled_programs_stay_bounded_over_many_shapes(tiny, monkeypatch):
    """Beyond ``MAX_PROGRAMS`` the least recently used program is dropped, and its memory mappings
    with it: a process meeting many shapes holds a bounded number of programs and mappings."""
    from jaxauction.engine import runtime

    def mappings():
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)

    monkeypatch.setattr(runtime, "MAX_PROGRAMS", 6)
    rng = np.random.default_rng(0)
    rules = ["linear", "log_linear"]

    def varied_call(i):
        agents = int(rng.integers(1, 7))
        prompts = [rng.integers(2, 16, int(rng.integers(5, 100))).tolist() for _ in range(agents)]
        bids = rng.exponential(size=(int(rng.integers(1, 4)), agents))
        generate(prompts, bids, rule=rules[i % 2], decoding="greedy", max_new_tokens=3, model=tiny)

    for i in range(3):
        varied_call(i)
    settled, compiled_before = mappings(), sum(runtime.compilations().values())
    for i in range(3, 12):
        varied_call(i)
    compiled = sum(runtime.compilations().values()) - compiled_before
    assert runtime.program_count() <= 6
    assert compiled >= 15, "precondition: the calls compiled many programs"
    # Unbounded, every program kept about 170 mappings (8,557 more after 50 programs).
    assert mappings() - settled < 2 * compiled, (settled, mappings(), compiled)


@pytest.fixture
def chunk_runs(monkeypatch):
    """The ``(num_rows, max_length, chunk size)`` of every chunk ``generate`` runs (a spy on
    ``engine.chunk.run_chunk``), appended as they run."""
    from jaxauction.engine import chunk

    runs = []
    run_chunk = chunk.run_chunk

    def spy(model, layout, keys, plan, spec, **options):
        runs.append((plan.num_rows, plan.max_length, len(keys)))
        return run_chunk(model, layout, keys, plan, spec, **options)

    monkeypatch.setattr(chunk, "run_chunk", spy)
    return runs


def test_chunks_fit_the_budget_when_auctions_differ_in_size(tiny, chunk_runs, monkeypatch):
    """Every chunk holds the batch's largest row count, so the plan counts the largest auction's rows:
    planned on the mean (1.5 rows here), the chunk of four three-agent auctions held 12 rows."""
    plans = chunk_runs
    auctions = [MIXED[2]] * 12 + [MIXED[0]] * 4  # one agent, then three agents
    budget = 100_000
    chunked = generate(auctions, decoding="greedy", max_new_tokens=4, model=tiny, memory_budget=budget)
    config = tiny[0].config
    assert len(plans) > 1, "precondition: the batch runs in several chunks"
    for num_rows, max_length, _ in plans:
        kv_bytes = 2 * config.num_layers * max_length * config.num_kv_heads * config.head_dim * 4
        assert num_rows * kv_bytes <= budget, (num_rows, kv_bytes)
    monkeypatch.undo()
    whole = generate(auctions, decoding="greedy", max_new_tokens=4, model=tiny)
    np.testing.assert_array_equal(chunked.tokens, whole.tokens)
    np.testing.assert_allclose(chunked.payments, whole.payments, rtol=1e-5, atol=1e-8)


def test_plan_chunks_respects_the_budget():
    for num, each, budget, devices in [(20_000, 10**6, 4 * 1024**3, 1), (21, 50_000, 300_000, 1), (7, 1, 10**9, 4)]:
        size, chunks = plan_chunks(num, each, budget, devices)
        assert size * chunks >= num and size * (chunks - 1) < num
        assert size % devices == 0
        assert size * each <= max(budget, devices * each)
    assert plan_chunks(20_000, 10**6, 4 * 1024**3) == (4096, 5)  # 4294 fit: 5 chunks of 4000 -> bucket 4096


def test_plan_chunks_counts_the_bucketed_row_count():
    """A chunk's cache rows are bucketed (21 rows -> 22): planned on ``size * auction_bytes`` alone,
    seven three-row auctions of 1,000 bytes per row fill a 21,000-byte budget and their 22 rows
    exceed it; with ``chunk_bytes`` the plan takes two chunks of four (12 rows each)."""
    from jaxauction.engine.plan import bucket

    def chunk_bytes(size):
        return bucket(3 * size) * 1000

    assert chunk_bytes(7) > 21_000, "precondition: the bucketed rows of a chunk of 7 exceed the budget"
    assert plan_chunks(7, 3000, 21_000) == (7, 1)
    size, chunks = plan_chunks(7, 3000, 21_000, chunk_bytes=chunk_bytes)
    assert (size, chunks) == (4, 2)  # 2 chunks of ceil(7 / 2) = 4 auctions (12 rows)
    for num, budget, devices in [(1000, 170_000, 1), (1000, 170_000, 4), (33, 10**5, 2), (5, 1000, 1)]:
        size, chunks = plan_chunks(num, 3000, budget, devices, chunk_bytes=chunk_bytes)
        assert size * chunks >= num and size * (chunks - 1) < num and size % devices == 0
        assert chunk_bytes(size) <= budget or size == devices, (num, budget, devices, size)


def test_generate_plans_with_the_bucketed_row_count(tiny, chunk_runs):
    """Through ``generate``: a budget that seven three-agent auctions fill exactly before their 21
    rows are bucketed to 22; every chunk run stays within it."""
    from jaxauction.engine import plan

    plans = chunk_runs
    auctions = [MIXED[0]] * 7  # three agents each
    generate(auctions[:1], decoding="greedy", max_new_tokens=4, model=tiny)
    _, max_length, _ = plans.pop()
    slots = len(MIXED[0].prompts)
    row_bytes, other_bytes = plan.memory_terms(tiny[0], slots, max_length, slots, 4)
    budget = 21 * row_bytes + 7 * other_bytes
    result = generate(auctions, decoding="greedy", max_new_tokens=4, model=tiny, memory_budget=budget)
    assert plans, "the batch ran"
    for num_rows, length, size in plans:
        assert length == max_length
        assert num_rows * row_bytes + size * other_bytes <= budget, (num_rows, size)
    assert result.tokens.shape[0] == 7


def test_memory_budget_strings_and_environment(tiny, monkeypatch):
    assert parse_memory_budget("4GB") == 4 * 1024**3 and parse_memory_budget("512 MiB") == 512 * 1024**2
    assert parse_memory_budget(2e9) == 2 * 10**9
    for bad in ("lots", "-1GB", 0, True):
        with pytest.raises(ValueError, match="memory_budget"):
            parse_memory_budget(bad)
    monkeypatch.setenv("JAXAUCTION_MEMORY_BUDGET", "plenty")
    with pytest.raises(ValueError, match="JAXAUCTION_MEMORY_BUDGET: expected a positive size"):
        generate(PROMPTS, [1.0, 1.0, 1.0], max_new_tokens=1, model=tiny)


def test_a_20000_point_sweep_of_two_tokens_runs_in_chunks(tiny):
    bids = np.stack([np.linspace(0.0, 1.0, 20_000), np.linspace(1.0, 0.0, 20_000), np.full(20_000, 0.5)], axis=1)
    result = generate(PROMPTS, bids, decoding="greedy", max_new_tokens=2, model=tiny, memory_budget="8MB")
    assert result.tokens.shape == (20_000, 2) and result.valid.all()
    for a in (0, 9_999, 19_999):
        alone = generate(PROMPTS, bids[a], decoding="greedy", max_new_tokens=2, model=tiny)
        np.testing.assert_array_equal(alone.tokens, result.tokens[a])
        np.testing.assert_allclose(alone.payments, result.payments[a], rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------- bad input


def wrong_shape_rule(logits, bids):
    return logits[..., 0, :3]  # [A, 3] instead of [A, V]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mesh="cpu"), r"mesh: expected None or a jax.sharding.Mesh.*got str 'cpu'"),
        (dict(mesh=5), r"mesh: expected None or a jax.sharding.Mesh.*got int 5"),
        (dict(mesh=jax.devices()), r"mesh: expected None or a jax.sharding.Mesh.*got list"),
        (dict(bids=["1", "2", "3"]), r"bids: expected numeric bids .*got dtype <U1"),
        (dict(bids=[[1.0, 1.0, 1.0], [1.0, 1.0]]), r"bids: expected .*got a ragged or non-numeric value"),
        (dict(bids=[1e33, 1.0, 1.0]), r"bids: .*above the largest accepted bid 3.4e\+30"),
        (dict(max_new_tokens=True), r"max_new_tokens: expected a positive integer; got bool True"),
        (dict(max_new_tokens=2.0), r"max_new_tokens: expected a positive integer; got float 2.0"),
        (dict(key="abc"), r"key: expected a PRNG key .*got str 'abc'"),
        (dict(temperature=None), r"temperature: expected a finite number > 0; got NoneType None"),
        (dict(temperature="1"), r"temperature: expected a finite number > 0; got str '1'"),
        (dict(temperature=1e-40), r"temperature: 1 / temperature overflows float32"),
        (dict(base_bid="x", base_prompt=[2]), r"base_bid: expected a number >= 0; got str 'x'"),
        (dict(base_bid=np.array([1.0, 2.0]), base_prompt=[2]), r"base_bid: expected a number >= 0; got ndarray"),
        (dict(rule=wrong_shape_rule), r"rule: expected rule\(logits \[A, m, V\], bids \[A, m\]\) to return .*\(2, 3\)"),
        (dict(prompts=[[{"text": "hi"}], [2], [3]]), r"prompts\[0\]\[0\]: a chat message must be a dict with string"),
        (dict(prompts=[[{"role": "user"}], [2], [3]]), r"prompts\[0\]\[0\]: a chat message must be a dict with string"),
        (dict(progress="yes"), r"progress: expected True or False"),
        (dict(memory_budget="lots"), r"memory_budget: expected a positive size"),
    ],
)
def test_generate_rejects_bad_arguments_by_name(tiny, kwargs, match):
    arguments = dict(prompts=PROMPTS, bids=[1.0, 1.0, 1.0], model=tiny, max_new_tokens=2)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(arguments.pop("prompts"), arguments.pop("bids"), **arguments)


def test_generate_rejects_a_swapped_or_wrong_model_pair(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"model: the first element must be the language model"):
        generate(PROMPTS, [1.0, 1.0, 1.0], model=(tokenizer, model))
    with pytest.raises(ValueError, match=r"model: the second element must be the tokenizer"):
        generate(PROMPTS, [1.0, 1.0, 1.0], model=(model, "tokenizer"))
    with pytest.raises(ValueError, match=r"model: expected the \(model, tokenizer\) pair"):
        generate(PROMPTS, [1.0, 1.0, 1.0], model=(model, tokenizer, 3))


def test_auction_list_errors_name_the_auction(tiny):
    with pytest.raises(ValueError, match=r"auctions\[1\]\.bids: expected .* one bid per agent \(2\); got shape \(1,\)"):
        generate([MIXED[0], Auction([[3], [4]], [1.0])], model=tiny)
    with pytest.raises(ValueError, match=r"auctions\[0\]\.base_bid: expected a number >= 0; got str"):
        generate([Auction([[3]], [1.0], base_prompt=[2], base_bid="x")], model=tiny)
    with pytest.raises(ValueError, match=r"auctions\[0\]\.prompts: expected a non-empty list"):
        generate([Auction([], [])], model=tiny)
    with pytest.raises(ValueError, match=r"bids/base_prompt: with a list of jaxauction.Auction"):
        generate(MIXED, [1.0], model=tiny)
    with pytest.raises(ValueError, match=r"decoding='stable'.*got n = \[1, 2, 3\]"):
        generate(MIXED, decoding="stable", model=tiny)


# ---------------------------------------------------------------------------------------------- compilation cache

CACHE_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import jax
    from flax import nnx
    from jaxauction.engine import generate
    from jaxauction.models import Llama, LlamaConfig

    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None
    )
    from jaxauction.engine import enable_compilation_cache
    enable_compilation_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # tiny programs are stored too

    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, max_position_embeddings=64, eos_token_ids=(1,), pad_token_id=0)

    class Tok:
        pad_token_id, eos_token_id = 0, 1
        def __len__(self): return 16
        def decode(self, ids, skip_special_tokens=True): return " ".join(map(str, ids))

    model = (Llama(config, rngs=nnx.Rngs(0)), Tok())
    start = time.perf_counter()
    result = generate([[3, 4, 5], [6, 7]], [[1.0, 2.0], [0.5, 0.1]], max_new_tokens=4, model=model)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "dir": jax.config.jax_compilation_cache_dir, "hits": len(hits),
                      "tokens": result.tokens.tolist()}))
""")


def _run_cache_script(cache_dir: str) -> dict:
    env = dict(os.environ, JAXAUCTION_CACHE_DIR=cache_dir, JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", CACHE_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_reuses_the_compiled_programs(tmp_path):
    folder = tmp_path / "xla"
    first = _run_cache_script(str(folder))
    assert first["dir"] == str(folder) and any(folder.iterdir()), "the first process wrote the cache"
    second = _run_cache_script(str(folder))
    assert second["tokens"] == first["tokens"]
    # The second process loads the prefill, auction and model programs instead of compiling them.
    assert first["hits"] == 0 and second["hits"] >= 3, (first, second)
    script = "import jax; from jaxauction import engine; print(engine.enable_compilation_cache(), jax.config.jax_compilation_cache_dir)"
    for setting in ("off", ""):
        env = dict(os.environ, JAXAUCTION_CACHE_DIR=setting, JAX_PLATFORMS="cpu")
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
        assert done.stdout.split() == ["None", "None"], (done.stdout, done.stderr[-2000:])
