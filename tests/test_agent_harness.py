"""The kernel harness and its anti-cheat checks: known-good Pallas candidates pass in interpret mode,
and every hostile candidate is caught, by the static check or (with it off) by the worker's guard."""

import json
import textwrap
from pathlib import Path

import pytest

from agent.anticheat import static_check
from agent.harness import run_candidate

EXAMPLES = Path(__file__).resolve().parent.parent / "agent" / "examples"

# A correct rmsnorm_rope body the hostile candidates below wrap their cheat around.
HONEST = """
import jax
import jax.numpy as jnp


def honest(x, weight, cos, sin, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps) * weight
    h = x.shape[-1] // 2
    c, s = cos[:, :, None], sin[:, :, None]
    return jnp.concatenate([y[..., :h] * c - y[..., h:] * s, y[..., h:] * c + y[..., :h] * s], -1).astype(x.dtype)
"""


def _candidate(tmp_path: Path, body: str) -> Path:
    (tmp_path / "kernel.py").write_text(HONEST + textwrap.dedent(body))
    return tmp_path


@pytest.mark.parametrize("task", ["rmsnorm_rope", "int8_weight_only_matmul", "moe_grouped_matmul"])
def test_known_good_pallas_candidates_pass_in_interpret_mode(task):
    result = run_candidate(EXAMPLES / task, task)
    assert result["correct"], result
    assert result["violations"] == [] and result["error"] is None
    assert len({c["seed"] for c in result["checks"]}) >= 2  # several fresh input sets, never one
    assert len({json.dumps(c["shape"]) for c in result["checks"]}) >= 2  # a fresh shape besides the declared
    assert "timing needs a GPU" in result["timing_note"]


def test_a_wrong_candidate_fails(tmp_path):
    wrong = run_candidate(_candidate(tmp_path, """
        def kernel(x, weight, cos, sin, *, eps):
            return honest(x, weight, cos, sin, eps) * 1.01
    """), "rmsnorm_rope")
    assert not wrong["correct"] and wrong["max_ratio"] > 1


STATIC_CHEATS = {
    "imports the reference": "from agent.tasks.specjax_ops import rmsnorm_rope as kernel",
    "imports the baseline": "from specjax.model import apply_rope",
    "imports jax's Pallas ops": "from jax.experimental.pallas.ops.gpu import rms_norm",
    "imports pallas_kernels": "import pallas_kernels.tree_attention",
    "caches outputs in a module dict": "CACHE = {}\ndef kernel(x, *a, eps):\n    CACHE[x.shape] = 1\n    return x",
    "caches with lru_cache": "import functools\n@functools.lru_cache\ndef kernel(x):\n    return x",
    "mutable default": "def kernel(x, memo=[]):\n    return x",
    "global state": "N = 0\ndef kernel(x):\n    global N\n    N += 1\n    return x",
    "special-cases a shape": "def kernel(x, *a, eps):\n    b, t, h, d = x.shape\n    return x if t == 4096 else x",
    "special-cases a shape through len": "def kernel(x, *a, eps):\n    return x if len(x) in (8192,) else x",
    "reads a file": "def kernel(x, *a, eps):\n    return open('/tmp/expected.npy').read()",
    "patches the timer": "import time\ntime.perf_counter = lambda: 0.0",
    "patches block_until_ready": "import jax\njax.block_until_ready = lambda x: x",
    "starts a thread": "import threading",
    "starts a process": "import subprocess",
    "walks the heap": "import gc",
    "reaches into frames": "def kernel(x):\n    return kernel.__globals__",
    "walks frames": "import sys",
    "evals": "def kernel(x):\n    return eval('x')",
}


@pytest.mark.parametrize("name", sorted(STATIC_CHEATS))
def test_static_check_catches(name):
    assert static_check(HONEST + STATIC_CHEATS[name]), name


def test_static_check_passes_the_examples_and_ordinary_tile_arithmetic():
    for task in ("rmsnorm_rope", "int8_weight_only_matmul", "moe_grouped_matmul"):
        assert static_check((EXAMPLES / task / "kernel.py").read_text()) == []
    assert static_check(HONEST + "def kernel(x, *a, eps):\n    return x if x.shape[-1] % 128 == 0 else x\n") == []


def test_a_statically_rejected_candidate_never_runs(tmp_path):
    result = run_candidate(_candidate(tmp_path, "import subprocess\ndef kernel(*a, **k):\n    pass\n"), "rmsnorm_rope")
    assert not result["correct"] and "static" in result["error"] and result["checks"] == []


# With the static check off, each of these reaches the worker, whose guard (or the fresh inputs) must catch it.
DYNAMIC_CHEATS = {
    "calls the reference": ("""
        def kernel(x, weight, cos, sin, *, eps):
            from agent.tasks import specjax_ops
            return specjax_ops.rmsnorm_rope(x, weight, cos, sin, eps=eps)
    """, "imports 'agent.tasks'"),
    "patches the timer": ("""
        import time
        time.perf_counter = lambda: 0.0
        def kernel(x, weight, cos, sin, *, eps):
            return honest(x, weight, cos, sin, eps)
    """, "patched time.perf_counter"),
    "imports process control": ("""
        import subprocess
        def kernel(x, weight, cos, sin, *, eps):
            return honest(x, weight, cos, sin, eps)
    """, "imports 'subprocess'"),
    "leaves a thread running": ("""
        import concurrent.futures, time
        def kernel(x, weight, cos, sin, *, eps):
            concurrent.futures.ThreadPoolExecutor(1).submit(time.sleep, 3)
            return honest(x, weight, cos, sin, eps)
    """, "thread(s) running"),
    "spawns a process": ("""
        import os
        def kernel(x, weight, cos, sin, *, eps):
            os.system("sleep 30 &")
            return honest(x, weight, cos, sin, eps)
    """, "starts a process"),
    "writes outside its work directory": ("""
        def kernel(x, weight, cos, sin, *, eps):
            open("/tmp/specjax-bench-escape.txt", "w").write("x")
            return honest(x, weight, cos, sin, eps)
    """, "writes outside"),
    "reads harness internals": ("""
        import sys
        def kernel(x, weight, cos, sin, *, eps):
            sys.modules["gc"].get_objects()
            return honest(x, weight, cos, sin, eps)
    """, "walks the heap"),
    "reads the repository": ("""
        import os
        def kernel(x, weight, cos, sin, *, eps):
            open(os.environ.get("PYTHONPATH", "") + "/agent/tasks/specjax_ops.py").read()
            return honest(x, weight, cos, sin, eps)
    """, "reads"),
    "keeps state between calls": ("""
        SEEN = []
        def kernel(x, weight, cos, sin, *, eps):
            SEEN.append(x.shape)
            return honest(x, weight, cos, sin, eps)
    """, "state kept"),
}


@pytest.mark.parametrize("name", sorted(DYNAMIC_CHEATS))
def test_worker_guard_catches(tmp_path, name):
    body, why = DYNAMIC_CHEATS[name]
    result = run_candidate(_candidate(tmp_path, body), "rmsnorm_rope", static_checks=False, input_sets=2)
    assert not result["correct"]
    assert any(why in v for v in result["violations"]), result


def test_memorised_outputs_and_special_cased_shapes_fail_on_fresh_seeds_and_shapes(tmp_path):
    # Right only on the declared test shape's length, garbage elsewhere: the fresh shape exposes it.
    shape_cheat = run_candidate(_candidate(tmp_path, """
        def kernel(x, weight, cos, sin, *, eps):
            return honest(x, weight, cos, sin, eps) if x.shape[1] == 5 else x
    """), "rmsnorm_rope")
    assert not shape_cheat["correct"]
    assert all(c["ratio"] <= 1 for c in shape_cheat["checks"] if c["shape"]["t"] == 5)
    assert any(c["ratio"] > 1 for c in shape_cheat["checks"] if c["shape"]["t"] != 5)
