"""The engine behind `jaxauction.generate` on a tiny random Llama: row sharing, chunking under a memory
budget, the compiled programs it shares and bounds, and the disk cache of compiled programs.

The tests of what an auction produces (against a plain reference loop) are in test_generation.py.
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
from tiny_llm import MIXED, PROMPTS, TinyTokenizer, tiny_llama

from jaxauction.engine import generate, next_rows, parse_memory_budget, plan_chunks, row_capacities

VOCAB = 16


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(VOCAB, seed=0), TinyTokenizer(VOCAB)


@pytest.fixture
def empty_program_table(monkeypatch):
    """The engine's table of compiled programs starts empty for this test, so the programs of earlier
    tests cannot hide which ones the test's calls compiled. Afterwards the earlier table comes back
    with the test's programs added as the most recently used (the next compilation trims it to
    ``MAX_PROGRAMS``), so later tests need not compile them again."""
    import collections

    from jaxauction.engine import runtime

    earlier = runtime._PROGRAMS
    monkeypatch.setattr(runtime, "_PROGRAMS", collections.OrderedDict())
    yield
    earlier.update(runtime._PROGRAMS)


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


def test_row_capacities():
    assert row_capacities(2) == (2,) and row_capacities(4) == (4,) and row_capacities(5) == (4, 5)
    assert row_capacities(22) == (4, 8, 16, 22)
    assert row_capacities(16) == (4, 8, 16)


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
    for name in ("prefill_body", "_auction_program"):
        assert after.get(name, 0) - before.get(name, 0) == 1, (name, before, after)
    whole = generate(auctions, decoding="greedy", max_new_tokens=7, model=tiny)
    np.testing.assert_array_equal(chunked.tokens, whole.tokens)
    np.testing.assert_allclose(chunked.payments, whole.payments, rtol=1e-5, atol=1e-8)


def _model_programs():
    from jaxauction.engine import loop, runtime

    return {key: program for key, program in runtime._PROGRAMS.items() if key[0] is loop._model_program}


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
        new_capacities = {key[1][1] for key in now} - {key[1][1] for key in models}
        # Only a row capacity no earlier call needed (sampling forks more rows) compiles the model.
        assert grew == {"_auction_program": 1, **({"_model_program": len(new_capacities)} if new_capacities else {})}
        assert len(now) == len(models) + len(new_capacities), (variant, grew)
        assert all(program is now.get(key) for key, program in models.items())
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


def test_compiled_programs_stay_bounded_over_many_shapes(tiny, empty_program_table, monkeypatch):
    """Beyond ``MAX_PROGRAMS`` the least recently used program is dropped, and its memory mappings
    with it: a process meeting many shapes holds a bounded number of programs and mappings. (On an
    empty table, so the programs of earlier tests are kept for later ones instead of compiled again.)"""
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
    # Unbounded, every program kept about 170 mappings (8,557 more after 50 programs). Bounded, the
    # count moves within about 130 mappings with the sizes of the programs the table happens to hold.
    assert mappings() - settled < 5 * compiled, (settled, mappings(), compiled)


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
    row_bytes, other_bytes = plan.memory_terms(tiny[0], slots, max_length, slots, plan.token_slots(4))
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
