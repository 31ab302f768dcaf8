"""The engine behind `jaxauction.generate` as a whole on a tiny random Llama: chunking under a memory
budget (same results, every chunk within the budget) and the compiled programs its calls share.

What an auction produces (against a plain reference loop) is tested in test_generation.py; the engine's
modules on their own in test_engine_plan.py, test_engine_rows.py, test_engine_runtime.py and
test_engine_request.py.
"""

import collections

import jax
import numpy as np
import pytest
from tiny_llm import MIXED, PROMPTS, TinyTokenizer, tiny_llama

from jaxauction.engine import generate

VOCAB = 16


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(VOCAB, seed=0), TinyTokenizer(VOCAB)


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


def test_chunks_of_different_auctions_share_one_program(tiny, chunk_runs, empty_program_table):
    """Chunks with different row counts (one-agent auctions, then three-agent ones) are laid out with
    the batch's row counts: one prefill and one auction program for all chunks, same results."""
    from jaxauction.engine import runtime

    auctions = [MIXED[2]] * 4 + [MIXED[0], MIXED[1]] * 2
    before = runtime.compilations()
    chunked = generate(auctions, decoding="greedy", max_new_tokens=7, model=tiny, memory_budget=60_000)
    after = runtime.compilations()
    assert len(chunk_runs) >= 3, "precondition: the batch runs in several chunks"
    for name in ("_prefill_program", "_auction_program"):
        assert after.get(name, 0) - before.get(name, 0) == 1, (name, before, after)
    whole = generate(auctions, decoding="greedy", max_new_tokens=7, model=tiny)
    np.testing.assert_array_equal(chunked.tokens, whole.tokens)
    np.testing.assert_allclose(chunked.payments, whole.payments, rtol=1e-5, atol=1e-8)


def _model_programs() -> collections.Counter:
    """The held model programs: how many of each ``(graphdef, capacity, mesh)`` (one per argument shapes)."""
    from jaxauction.engine import runtime

    return collections.Counter(
        static for function, static in runtime.held_programs() if function.__name__ == "_model_program"
    )


def test_every_rule_payment_and_decoding_shares_the_model_programs(tiny, empty_program_table):
    """The model is compiled once per shape and row capacity: a new rule, payment or decoding
    compiles one auction program (no model in it) and reuses the prefill and model programs."""
    from jaxauction.engine import runtime

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
        new_capacities = {static[1] for static in now} - {static[1] for static in models}
        # Only a row capacity no earlier call needed (sampling forks more rows) compiles the model.
        assert grew == {"_auction_program": 1, **({"_model_program": len(new_capacities)} if new_capacities else {})}
        assert now.total() == models.total() + len(new_capacities), (variant, grew)
        assert not models - now  # the earlier model programs are all still held
        models = now


def test_nearby_lengths_share_the_compiled_programs(tiny, empty_program_table):
    """``max_new_tokens`` 3 and 8 round up to the same 8 token slots: the second call compiles nothing,
    returns ``[A, 3]`` tokens and payments, and greedy decoding gives the first 3 tokens of the 8."""
    from jaxauction.engine import plan, runtime

    assert [plan.token_slots(t) for t in (1, 3, 8, 9, 48, 50)] == [8, 8, 8, 16, 48, 56]
    bids = np.array([[1.0, 2.0, 0.5], [0.2, 0.1, 3.0]])
    long = generate(PROMPTS, bids, decoding="greedy", max_new_tokens=8, model=tiny)
    before = runtime.compilations()
    short = generate(PROMPTS, bids, decoding="greedy", max_new_tokens=3, model=tiny)
    assert runtime.compilations() == before
    assert short.tokens.shape == (2, 3) and short.token_payments.shape == (2, 3, 3)
    np.testing.assert_array_equal(short.tokens, long.tokens[:, :3])
    np.testing.assert_array_equal(short.lengths, np.minimum(long.lengths, 3))
    np.testing.assert_allclose(short.token_payments, long.token_payments[:, :3], rtol=1e-6)


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


def test_lengths_are_not_rounded_past_the_context(tiny, chunk_runs):
    """Near the tiny model's 128 positions the length is rounded up only as far as the context allows:
    a 121-token prompt leaves room for 7 tokens, so lengths 3 and 7 share programs compiled for 7
    slots; a 125-token prompt leaves room for exactly 3. The cache ends at the context each time."""
    from jaxauction.engine import runtime

    context = tiny[0].config.max_position_embeddings
    three = generate([[3] * 121, [4] * 119], [1.0, 2.0], decoding="greedy", max_new_tokens=3, model=tiny)
    before = runtime.compilations()
    seven = generate([[3] * 121, [4] * 119], [1.0, 2.0], decoding="greedy", max_new_tokens=7, model=tiny)
    assert runtime.compilations() == before
    np.testing.assert_array_equal(three.tokens, seven.tokens[:3])
    tight = generate([[3] * 125, [4] * 123], [1.0, 2.0], decoding="greedy", max_new_tokens=3, model=tiny)
    assert tight.tokens.shape == (3,) and tight.valid
    assert [max_length for _, max_length, _ in chunk_runs] == [context] * 3


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


def test_generate_plans_with_the_bucketed_row_count(tiny, chunk_runs):
    """Through ``generate``: a budget that seven three-agent auctions fill exactly before their 21
    rows are bucketed to 22; every chunk run stays within it."""
    from jaxauction.engine import plan

    plans = chunk_runs
    auctions = [MIXED[0]] * 7  # three agents each
    generate(auctions[:1], decoding="greedy", max_new_tokens=4, model=tiny)
    _, max_length, _ = plans.pop()
    slots = len(MIXED[0].prompts)
    row_bytes, other_bytes = plan.memory_terms(tiny[0], slots, max_length, slots, plan.token_slots(4))
    budget = 21 * row_bytes + 7 * other_bytes
    result = generate(auctions, decoding="greedy", max_new_tokens=4, model=tiny, memory_budget=budget)
    assert plans, "the batch ran"
    for num_rows, length, size in plans:
        assert length == max_length
        assert num_rows * row_bytes + size * other_bytes <= budget, (num_rows, size)
    assert result.tokens.shape[0] == 7


def test_a_20000_point_sweep_of_two_tokens_runs_in_chunks(tiny):
    bids = np.stack([np.linspace(0.0, 1.0, 20_000), np.linspace(1.0, 0.0, 20_000), np.full(20_000, 0.5)], axis=1)
    result = generate(PROMPTS, bids, decoding="greedy", max_new_tokens=2, model=tiny, memory_budget="8MB")
    assert result.tokens.shape == (20_000, 2) and result.valid.all()
    for a in (0, 9_999, 19_999):
        alone = generate(PROMPTS, bids[a], decoding="greedy", max_new_tokens=2, model=tiny)
        np.testing.assert_array_equal(alone.tokens, result.tokens[a])
        np.testing.assert_allclose(alone.payments, result.payments[a], rtol=1e-5, atol=1e-8)


@pytest.fixture
def host_reads(monkeypatch):
    """Every blocking read of the decode loop (``loop.row_counts``), the rest of the loop running
    under ``jax.transfer_guard_device_to_host("disallow")`` (on an accelerator any other read from
    the devices then fails; JAX does not enforce the guard on CPU, whose arrays are host memory)."""
    from jaxauction.engine import loop

    reads = []
    row_counts, decode = loop.row_counts, loop.decode

    def counted(sizes):
        with jax.transfer_guard_device_to_host("allow"):
            reads.append(row_counts(sizes))
        return reads[-1]

    def guarded(*args, **kwargs):
        with jax.transfer_guard_device_to_host("disallow"):
            return decode(*args, **kwargs)

    monkeypatch.setattr(loop, "row_counts", counted)
    monkeypatch.setattr(loop, "decode", guarded)
    return reads


def test_the_decode_loop_reads_the_devices_once_every_k_tokens(tiny, host_reads, monkeypatch):
    """Three agents with their own prompts (rows never shared: the capacity is settled from the first
    step): 48 tokens read the row counts at most ceil(48 / READ_EVERY) times, with the tokens and
    payments of reading after every token (today's loop read 47 times)."""
    from jaxauction.engine import loop

    model = (tiny_llama(VOCAB, seed=3, sharpness=0.2), tiny[1])  # flat: no EOS in 48 tokens
    few = generate(PROMPTS, [1.0, 0.5, 2.0], decoding="greedy", max_new_tokens=48, model=model)
    assert few.lengths == 48, "precondition: the auction runs all 48 tokens"
    assert len(host_reads) <= -(-48 // loop.READ_EVERY) and loop.READ_EVERY > 1
    host_reads.clear()
    monkeypatch.setattr(loop, "READ_EVERY", 1)
    every = generate(PROMPTS, [1.0, 0.5, 2.0], decoding="greedy", max_new_tokens=48, model=model)
    assert len(host_reads) == 47  # after every token but the last
    np.testing.assert_array_equal(few.tokens, every.tokens)
    np.testing.assert_allclose(few.token_payments, every.token_payments, rtol=1e-6, atol=1e-9)


def test_unsettled_rows_are_read_every_token_with_the_same_results(tiny, host_reads, monkeypatch):
    """A sampled batch whose auctions share prompts (their rows fork as the tokens differ) and end at
    different lengths: the same tokens and payments as reading after every token."""
    from jaxauction.engine import loop

    keys = jax.random.split(jax.random.key(5), len(MIXED) * 2)
    few = generate(MIXED * 2, key=keys, max_new_tokens=12, model=tiny, payment="kl")
    assert len(set(few.lengths.tolist())) > 1, "precondition: auctions end at different steps"
    reads = len(host_reads)
    monkeypatch.setattr(loop, "READ_EVERY", 1)
    every = generate(MIXED * 2, key=keys, max_new_tokens=12, model=tiny, payment="kl")
    assert reads <= len(host_reads)
    np.testing.assert_array_equal(few.tokens, every.tokens)
    np.testing.assert_allclose(few.token_payments, every.token_payments, rtol=1e-5, atol=1e-8)
