"""specjax: speculative LLM inference in JAX.

The public surface: ``LLM`` and ``SamplingParams`` for generation, ``TreeSpeculation``, ``SuffixSpeculation`` and
``HybridSpeculation`` and ``NgramSpeculation`` for speculative decoding, ``EngineConfig`` for runtime knobs, ``load_model`` for checkpoints. Everything else lives in its own module.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "specjax.llm",
    "RequestOutput": "specjax.llm",
    "SamplingParams": "specjax.sampling",
    "TreeSpeculation": "specjax.speculation.speculator",
    "SuffixSpeculation": "specjax.speculation.suffix",
    "HybridSpeculation": "specjax.speculation.suffix",
    "NgramSpeculation": "specjax.speculation.ngram",
    "EngineConfig": "specjax.runner",
    "ModelConfig": "specjax.config",
    "load_model": "specjax.checkpoints",
}


def __getattr__(name):
    # Lazy, so `specjax --help` answers without importing JAX.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'specjax' has no attribute {name!r}")


__all__ = list(_EXPORTS) + ["__version__"]
