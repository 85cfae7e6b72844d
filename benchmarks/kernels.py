"""How fast is the Pallas tree-attention kernel against the XLA reference and jax's own Pallas paged
decode attention, and how close does it come to the GPU's memory bandwidth?

    python benchmarks/kernels.py                                   # the full sweep (NVIDIA GPU)
    python benchmarks/kernels.py --batch 1,8 --prefix 4096 --tree 1,64
    python benchmarks/kernels.py --interpret                       # tiny smoke run, interpreted (CPU)

Shapes: Llama-3-8B's attention (32 query heads, 8 KV heads, head_dim 128; ``--q-heads`` etc. to
change), bf16, 16-token pages, one layer. Each of ``--batch`` sequences has a ``--prefix``-token
committed prefix on pages in shuffled order, and ``--tree`` new tokens: a random tree (a chain of
one node at 1). Three implementations score the same step:

* ``pallas``: ``pallas_kernels.tree_attention`` (``--num-splits``, default automatic);
* ``xla``: ``specjax.attention.paged_attention``, the reference (gathers the pages, then einsums);
* ``jax``: ``jax.experimental.pallas.ops.gpu.paged_attention``, decode only (tree 1), on a copy of
  the pool in its [Hkv, N, page, hd] layout. It attends over the prefix alone, ours over the prefix
  and the new token: one key more out of thousands.

Each is timed over several input sets (different pools, together ``--rotate-bytes`` of K/V, so the
L2 cache cannot serve a call from the last one), called back to back inside one jit-compiled
executable: a run pays one dispatch and one synchronisation for all of them. A compiling run comes
first, then ``--repeats`` timed runs; the median over calls is reported. Achieved
bandwidth = bytes of K/V the step must read (batch x prefix x 2 x Hkv x head_dim x 2 bytes) /
median time, shown against the device's copy bandwidth (``common.measure_copy_bandwidth``). A case
that fails (e.g. the reference running out of memory on a large batch x prefix x tree) is recorded
with its error and the sweep goes on.

GPU only: on other devices the script exits unless ``--interpret`` is given, which runs the
interpreted kernels on tiny shapes (batch 1, prefix 64, trees 1 and 4) as a smoke test.

Results: a table on stdout and JSON in benchmarks/results/kernels-<subject>-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:  # run as `python benchmarks/kernels.py`: the repository's packages
    sys.path.insert(0, str(_REPO_ROOT))

from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged  # noqa: E402

from benchmarks import common  # noqa: E402
from pallas_kernels import backend  # noqa: E402
from pallas_kernels.tree_attention import reference, tree_attention  # noqa: E402
from specjax.attention import AttentionMetadata  # noqa: E402
from specjax.speculation.tree import TokenTree  # noqa: E402

SMOKE = dict(batch=[1], prefix=[64], tree=[1, 4], repeats=2, copy_bytes=1 << 24, rotate_bytes=0)
FULL = dict(batch=[1, 8, 64], prefix=[1024, 8192, 32768], tree=[1, 16, 128], repeats=20, copy_bytes=1 << 30,
            rotate_bytes=256 << 20)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=common.int_list, help=f"sequences (default {FULL['batch']})")
    parser.add_argument("--prefix", type=common.int_list, help=f"committed tokens each (default {FULL['prefix']})")
    parser.add_argument("--tree", type=common.int_list, help=f"new tokens each (default {FULL['tree']})")
    parser.add_argument("--repeats", type=int, help=f"timed runs per case (default {FULL['repeats']})")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--num-splits", type=int, default=None, help="prefix splits of the Pallas kernel (auto)")
    parser.add_argument("--block-k", type=common.int_list, default=[64],
                        help="prefix keys per inner step of the kernel (a list sweeps them; default 64)")
    parser.add_argument("--num-warps", type=common.int_list, default=[0],
                        help="Triton warps per program (a list sweeps them; 0: the kernel's choice)")
    parser.add_argument("--num-stages", type=common.int_list, default=[0],
                        help="Triton pipelining stages (a list sweeps them; 0: the kernel's choice)")
    parser.add_argument("--block-rows", type=int, default=128, help="most query rows per tile of the kernel")
    parser.add_argument("--interpret", action="store_true",
                        help="run interpreted (any device); defaults shrink to a smoke run: " + str(SMOKE))
    parser.add_argument("--rotate-bytes", type=int,
                        help="K/V bytes of the input sets one timed run rotates through (default 256 MiB, "
                             "past an H100's 50 MB L2)")
    parser.add_argument("--copy-bytes", type=int,
                        help=f"array size for the copy bandwidth (default {FULL['copy_bytes']})")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/kernels-...)")
    args = parser.parse_args(argv)
    for name, value in (SMOKE if args.interpret else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def _case(key: jax.Array, batch: int, prefix: int, tree: int, args: argparse.Namespace):
    """Inputs of one step: q, new K/V, a one-layer pool on shuffled pages, layer, metadata."""
    dtype = jnp.dtype(args.dtype)
    page, hkv, hd = args.page_size, args.kv_heads, args.head_dim
    pages = -(-prefix // page)
    rng = np.random.default_rng(batch * 1_000_003 + prefix * 131 + tree)
    tables = rng.permutation(batch * pages).reshape(batch, pages)
    parents = [int(rng.integers(0, i)) for i in range(1, tree)]
    mask = TokenTree.build(0, [0] * (tree - 1), parents, size=tree).ancestor_mask
    meta = AttentionMetadata(block_tables=jnp.asarray(tables, jnp.int32),
                             context_lens=jnp.full((batch,), prefix, jnp.int32),
                             new_mask=jnp.broadcast_to(jnp.asarray(mask), (batch, tree, tree)))
    keys = jax.random.split(key, 5)
    pool_shape = (1, batch * pages, page, hkv, hd)
    k_pool, v_pool = (jax.random.normal(k, pool_shape, dtype) for k in keys[:2])
    q = jax.random.normal(keys[2], (batch, tree, args.q_heads, hd), dtype)
    new_k, new_v = (jax.random.normal(k, (batch, tree, hkv, hd), dtype) for k in keys[3:])
    return q, new_k, new_v, k_pool, v_pool, jnp.int32(0), meta


def _jax_decode(q, k_pool, v_pool, meta, interpret: bool) -> tuple[Callable, tuple]:
    """jax's Pallas paged decode attention on this case (T = 1): the function and its arguments, the
    pools copied into its [Hkv, N, page, hd] layout."""
    k_pages, v_pages = (jnp.transpose(pool[0], (2, 0, 1, 3)) for pool in (k_pool, v_pool))
    pages = meta.block_tables.shape[1]
    splits = math.gcd(pages, 16)  # its splits and compute blocks must divide the pages evenly
    fn = functools.partial(jax_paged.paged_attention, k_splits=splits,
                           pages_per_compute_block=math.gcd(pages // splits, 8), interpret=interpret)
    return fn, (q[:, 0], k_pages, v_pages, meta.block_tables, meta.context_lens)


def rotation(kv_bytes: int, args: argparse.Namespace) -> int:
    """Input sets per timed run: enough that their K/V (``--rotate-bytes`` together) outgrows the L2
    cache, so no call finds the last one's pages cached; at least 4, to amortise the run's launch (one
    for an interpreted smoke run, which times nothing worth amortising)."""
    if args.interpret:
        return 1
    return max(4, min(32, -(-args.rotate_bytes // max(kv_bytes, 1))))


def _timed(fn: Callable, cases: list[tuple], repeats: int) -> tuple[float, Any]:
    """(median seconds per call, the first case's output). One jit-compiled executable calls ``fn``
    on every case back to back, so a timed run pays one dispatch and one host synchronisation for
    ``len(cases)`` calls instead of one per call: at ~10 µs per kernel, a wait per call would be timed
    as much as the kernel. The cases stay separate arguments: slices of one stacked array would be
    copied out before a custom call (a Pallas kernel) could read them, and the copy timed with it."""
    run = jax.jit(lambda all_cases: [fn(*case) for case in all_cases])
    out = jax.block_until_ready(run(cases))  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(cases))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / len(cases), out[0]


def run_case(batch: int, prefix: int, tree: int, args: argparse.Namespace) -> dict[str, Any]:
    kv_bytes = batch * prefix * 2 * args.kv_heads * args.head_dim * jnp.dtype(args.dtype).itemsize
    sets = rotation(kv_bytes, args)
    cases = [_case(key, batch, prefix, tree, args) for key in jax.random.split(jax.random.key(0), sets)]
    configs = [dict(block_k=k, num_warps=w or None, num_stages=st or None)
               for k in args.block_k for w in args.num_warps for st in args.num_stages]
    impls = {_config_name(c): (functools.partial(tree_attention, num_splits=args.num_splits, block_rows=args.block_rows,
                                                 interpret=args.interpret, **c), cases) for c in configs}
    impls["xla"] = (reference, cases)
    if tree == 1:
        decode = [_jax_decode(q, k_pool, v_pool, meta, args.interpret) for q, _, _, k_pool, v_pool, _, meta in cases]
        impls["jax"] = (decode[0][0], [arguments for _, arguments in decode])
    row: dict[str, Any] = {"batch": batch, "prefix": prefix, "tree": tree, "kv_bytes": kv_bytes, "input_sets": sets}
    outputs = {}
    for name, (fn, inputs) in impls.items():
        try:
            seconds, outputs[name] = _timed(fn, inputs, args.repeats)
        except Exception as error:  # noqa: BLE001 (out of memory, unsupported shape: record it, go on)
            row[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            continue
        row[name] = {"median_s": seconds, "bandwidth_bytes_per_s": kv_bytes / seconds}
    # The fastest configuration is the row's "pallas"; every one is kept under "pallas_configs".
    timed = [name for name in map(_config_name, configs) if "median_s" in row[name]]
    best = min(timed, key=lambda name: row[name]["median_s"]) if timed else _config_name(configs[0])
    row["pallas_configs"] = {name: row.pop(name) for name in map(_config_name, configs)}
    row["pallas"] = {**row["pallas_configs"][best], "config": best}
    if best in outputs and "xla" in outputs:  # a timing of a wrong kernel is worth nothing
        diff = jnp.abs(outputs[best].astype(jnp.float32) - outputs["xla"].astype(jnp.float32))
        row["max_abs_diff_vs_xla"] = float(diff.max())
    return row


def _config_name(config: dict[str, Any]) -> str:
    return "pallas " + ",".join(f"{k}={v or 'auto'}" for k, v in config.items())


def _cell(row: dict[str, Any], name: str, field: str, scale: float, digits: int = 3) -> str | None:
    result = row.get(name)
    if result is None:
        return None
    if "error" in result:
        return "error"
    return common.fmt(result[field] * scale, digits)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.interpret and not backend.on_nvidia_gpu():
        sys.exit(f"benchmarks/kernels.py times compiled kernels on an NVIDIA GPU; JAX's backend here is "
                 f"{jax.default_backend()!r}. Pass --interpret for a tiny interpreted smoke run.")
    env = common.environment()
    copy = common.measure_copy_bandwidth(args.copy_bytes)
    peak = copy["bandwidth_bytes_per_s"]
    rows = []
    for batch in args.batch:
        for prefix in args.prefix:
            for tree in args.tree:
                rows.append(run_case(batch, prefix, tree, args))
                print(f"batch {batch} prefix {prefix} tree {tree}: done", file=sys.stderr, flush=True)

    def percent_of_copy(row, name):
        result = row.get(name) or {}
        return common.fmt(100 * result["bandwidth_bytes_per_s"] / peak) if "median_s" in result else None

    def speedup(row):
        pallas, xla = row["pallas"], row["xla"]
        return common.fmt(xla["median_s"] / pallas["median_s"], 2) if "median_s" in pallas and "median_s" in xla \
            else None

    common.print_table(
        f"Tree attention, {args.q_heads}q/{args.kv_heads}kv heads x {args.head_dim}, {args.dtype}, "
        f"page {args.page_size}{' (interpreted)' if args.interpret else ''}",
        ["batch", "prefix", "tree", "pallas ms", "xla ms", "jax ms", "pallas GB/s", "pallas % copy",
         "jax % copy", "xla / pallas", "max |pallas - xla|"],
        [[r["batch"], r["prefix"], r["tree"], _cell(r, "pallas", "median_s", 1e3), _cell(r, "xla", "median_s", 1e3),
          _cell(r, "jax", "median_s", 1e3), _cell(r, "pallas", "bandwidth_bytes_per_s", 1e-9, 1),
          percent_of_copy(r, "pallas"), percent_of_copy(r, "jax"), speedup(r),
          common.fmt(r.get("max_abs_diff_vs_xla"), 4)] for r in rows],
        notes=[f"copy bandwidth {peak / 1e9:,.1f} GB/s ({copy['kernel']}); GB/s = K/V bytes of the prefix / median",
               *([] if len(rows[0]["pallas_configs"]) == 1 else
                 [f"pallas: the fastest of {len(rows[0]['pallas_configs'])} configurations per row, "
                  "all in the JSON; per row: " + "; ".join(r["pallas"].get("config", "?") for r in rows)])],
    )
    payload = {"environment": env, "copy_bandwidth": copy, "config": vars(args), "results": rows}
    subject = f"tree-attention-{args.q_heads}q-{args.kv_heads}kv-{args.head_dim}d-{args.dtype}"
    path = args.out or common.default_results_path("kernels", subject, env)
    print(f"wrote {common.write_json(path, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
