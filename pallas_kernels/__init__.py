"""Pallas kernels, one per module, each beside the pure-JAX reference it is tested against.

tree_attention: attention of T new tokens (a token tree, a decode step or a prefill chunk) over the
    paged KV cache; ``specjax.attention.attention`` dispatches to it.
backend: where kernels run (compiled with Triton on NVIDIA GPUs, interpreted elsewhere) and the
    Pallas-or-XLA choice (``SPECJAX_ATTENTION``).
"""
