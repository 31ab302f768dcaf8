"""Shared test fixtures."""

import jax
import pytest


@pytest.fixture
def x64():
    """Run the test body with float64 enabled (other tests keep JAX's float32 default)."""
    with jax.enable_x64(True):
        yield
