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

    Each XLA:CPU executable keeps its kernels in separate memory mappings, and the decode loops
    (one copy of the model per batch-size branch) have thousands of kernels: a whole test session
    that keeps them all reaches Linux's default limit of 65530 mappings per process
    (``vm.max_map_count``), after which mmap fails inside XLA and the process crashes.
    """
    yield
    jax.clear_caches()
