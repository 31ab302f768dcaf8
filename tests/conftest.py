"""Shared test fixtures."""

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest


@pytest.fixture
def x64():
    """Run the test body with float64 enabled (other tests keep JAX's float32 default)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """The test body runs once in float32 (JAX's default) and once in float64 (x64 enabled)."""
    if request.param == "float64":
        with jax.enable_x64(True):
            yield jnp.float64
    else:
        yield jnp.float32


@pytest.fixture
def empty_program_table():
    """The engine's table of compiled programs starts empty for this test, so the programs of earlier
    tests cannot hide which ones the test's calls compiled; afterwards the earlier table comes back
    with the test's programs added (``jaxauction.engine.runtime.empty_program_table``)."""
    from jaxauction.engine import runtime

    with runtime.empty_program_table():
        yield


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Frees every compiled program after each test module.

    XLA:CPU's compiled programs take many memory mappings, and the decode loops hold one copy of the
    model per batch-size branch: one process running test_generation, test_generation_llm,
    test_models and test_models_io reached 43,000 mappings, and a whole session that keeps every
    program reaches Linux's default limit of 65530 (``vm.max_map_count``), then crashes inside XLA
    (segmentation fault or abort while writing or reading the compilation cache). With this fixture
    the count falls back to about 3,000 after each module.
    """
    yield
    jax.clear_caches()


def pytest_configure(config):
    """Each pytest-xdist worker runs on a core of its own (when there are as many cores as workers).

    XLA sizes its thread pools to the cores a process may use, so two workers on two cores otherwise
    run four pools on two cores. Pinned, the suite took 439.5 and 416.3 s against 473.3 and 443.1 s
    unpinned (two alternating pairs with empty compilation caches on the 2-core host,
    docs/performance.md). Subprocesses the tests start inherit the worker's core.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or workers < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= workers:
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny Llama fixture exported as a Hugging Face folder with a context long enough for the
    benchmarks' chat prompts (the experiments/ scripts' smoke tests run on it)."""
    import jaxauction.models as jm

    model, tokenizer = jm.load(Path(__file__).parent / "fixtures" / "tiny_llama3")
    model.config = dataclasses.replace(model.config, max_position_embeddings=1024)
    return jm.export_hf(model, tokenizer, tmp_path_factory.mktemp("tiny") / "model")
