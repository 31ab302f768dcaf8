"""Shared test fixtures."""

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
