"""Shared by tests/ and parity_tests/: float32 matmuls at the highest precision, and `jax_device`."""

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(params=jax.devices(), ids=lambda d: f"{d.platform}{d.id}")
def jax_device(request):
    """Every JAX device present: CPU always, GPU/TPU when there."""
    with jax.default_device(request.param):
        yield request.param
