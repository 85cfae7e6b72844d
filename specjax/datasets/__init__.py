"""The corpora that draft training and the benchmark workloads share, and the one split between them.

Packaged (unlike ``benchmarks/``) so that an installed ``training`` reads exactly the data a checkout
does. ``splits``: which records are held out; ``stdlib`` and ``sharegpt``: the two corpora;
``code_prompts``: how a documented function becomes a "write this function" request.
"""
