"""Fixtures of the kernel tests."""

import pytest


@pytest.fixture
def fresh_interpreter():
    """Resets the Mosaic GPU interpreter around a test: after a failing kernel, later kernels would hang."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    interpret_pallas_call.reset_gpu_interpret_mode_state()
    yield interpret_pallas_call
    interpret_pallas_call.reset_gpu_interpret_mode_state()
