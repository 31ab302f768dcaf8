"""engine/runtime.py: the bounded table of compiled programs, the disk cache of compiled programs and
the progress bar."""

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_llm import TinyTokenizer, tiny_llama

from jaxauction.engine import generate, runtime

VOCAB = 16


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(VOCAB, seed=0), TinyTokenizer(VOCAB)


def scaled(scale, x):
    return x * scale


def shifted(shift, x):
    return x + shift


def test_compiled_reuses_a_program_per_function_settings_and_shapes(empty_program_table):
    before = runtime.compilations().get("scaled", 0)
    x = jnp.arange(3.0)
    double = runtime.compiled(scaled, (2.0,), (x,))
    np.testing.assert_array_equal(double(x), [0.0, 2.0, 4.0])
    assert runtime.compiled(scaled, (2.0,), (jnp.ones(3),)) is double  # same shapes and dtypes: reused
    assert runtime.compilations()["scaled"] == before + 1
    assert runtime.compile_seconds()["scaled"] > 0
    others = [
        runtime.compiled(scaled, (3.0,), (x,)),  # new static settings
        runtime.compiled(scaled, (2.0,), (jnp.arange(4.0),)),  # new shape
        runtime.compiled(scaled, (2.0,), (jnp.arange(3),)),  # new dtype
        runtime.compiled(shifted, (2.0,), (x,)),  # new function
    ]
    assert all(program is not double for program in others)
    assert runtime.compilations()["scaled"] == before + 4
    assert runtime.program_count() == 5
    assert runtime.held_programs() == [
        (scaled, (2.0,)),
        (scaled, (3.0,)),
        (scaled, (2.0,)),
        (scaled, (2.0,)),
        (shifted, (2.0,)),
    ]
    texts = runtime.program_texts("scaled")
    assert len(texts) == 4 and all("HloModule" in text for text in texts)
    assert len(runtime.program_texts("shifted")) == 1 and runtime.program_texts("absent") == []


def test_compiled_donates_the_given_arguments(empty_program_table):
    x, y = jnp.arange(3.0), jnp.arange(3.0)
    runtime.compiled(scaled, (2.0,), (x,), donate=(0,))(x)
    runtime.compiled(shifted, (2.0,), (y,))(y)
    assert x.is_deleted() and not y.is_deleted()


def test_the_table_drops_the_least_recently_used_program(empty_program_table, monkeypatch):
    monkeypatch.setattr(runtime, "MAX_PROGRAMS", 2)
    before = runtime.compilations().get("scaled", 0)
    first = runtime.compiled(scaled, (1.0,), (jnp.ones(1),))
    runtime.compiled(scaled, (2.0,), (jnp.ones(1),))
    assert runtime.compiled(scaled, (1.0,), (jnp.ones(1),)) is first  # now the most recently used
    runtime.compiled(scaled, (3.0,), (jnp.ones(1),))  # drops (2.0,), the least recently used
    assert runtime.held_programs() == [(scaled, (1.0,)), (scaled, (3.0,))]
    assert runtime.program_count() == 2
    runtime.compiled(scaled, (2.0,), (jnp.ones(1),))  # compiled again
    assert runtime.compilations()["scaled"] == before + 4


def test_empty_program_table_restores_the_earlier_programs_with_the_new_ones():
    with runtime.empty_program_table():
        runtime.compiled(scaled, (5.0,), (jnp.ones(2),))
        outer = runtime.held_programs()
        with runtime.empty_program_table():
            assert runtime.program_count() == 0
            runtime.compiled(scaled, (6.0,), (jnp.ones(2),))
            with pytest.raises(ZeroDivisionError), runtime.empty_program_table():
                runtime.compiled(scaled, (7.0,), (jnp.ones(2),))
                1 / 0  # noqa: B018  (the table comes back after an error too)
            assert runtime.held_programs() == [(scaled, (6.0,)), (scaled, (7.0,))]
        assert runtime.held_programs() == [*outer, (scaled, (6.0,)), (scaled, (7.0,))]


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
    # count moves with the sizes of the programs the table happens to hold: within about 130 mappings,
    # about 220 since the log-linear payments' program holds the structured path and its generic fallback, 300
    # (36 compilations) since its robust path holds the refinement and the tail too.
    assert mappings() - settled < 10 * compiled, (settled, mappings(), compiled)


def test_default_cache_dir_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert runtime.default_cache_dir() == tmp_path / "jaxauction" / "xla"
    for unset in ("", None):
        if unset is None:
            monkeypatch.delenv("XDG_CACHE_HOME")
        else:
            monkeypatch.setenv("XDG_CACHE_HOME", unset)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert runtime.default_cache_dir() == tmp_path / "home" / ".cache" / "jaxauction" / "xla"


def test_token_progress(capsys):
    with runtime.TokenProgress(tokens_per_chunk=3, num_chunks=2, enabled=False) as progress:
        progress.advance()
        progress.finish_chunk()
    assert capsys.readouterr().err == ""
    with runtime.TokenProgress(tokens_per_chunk=3, num_chunks=2, enabled=True) as progress:
        progress.advance()
        progress.finish_chunk()  # a chunk that stopped early counts whole
        for _ in range(3):
            progress.advance()
    assert "tokens" in capsys.readouterr().err


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
    blocked = tmp_path / "a_file"
    blocked.write_text("")  # a folder below a file cannot be made: no cache, and generation goes on
    for setting in ("off", "", str(blocked / "xla")):
        env = dict(os.environ, JAXAUCTION_CACHE_DIR=setting, JAX_PLATFORMS="cpu")
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
        assert done.stdout.split() == ["None", "None"], (done.stdout, done.stderr[-2000:])
