"""benchmarks/kernels.py: refuses to time anything off NVIDIA GPUs, and its interpreted smoke run works."""

import json

import pytest

from benchmarks import kernels
from pallas_kernels import backend


def test_refuses_to_run_off_gpus_without_interpret(monkeypatch):
    monkeypatch.setattr(backend, "on_nvidia_gpu", lambda: False)
    with pytest.raises(SystemExit, match="Pass --interpret"):
        kernels.main([])


def test_interpreted_smoke_run_writes_results(tmp_path):
    out = tmp_path / "kernels.json"
    kernels.main(["--interpret", "--q-heads", "4", "--kv-heads", "2", "--head-dim", "16", "--prefix", "40",
                  "--tree", "1,3", "--repeats", "1", "--copy-bytes", "1048576", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [(r["prefix"], r["tree"]) for r in results] == [(40, 1), (40, 3)]
    for row in results:
        assert row["max_abs_diff_vs_xla"] < 2e-2  # bf16
        assert row["pallas"]["median_s"] > 0 and row["xla"]["median_s"] > 0
    assert results[0]["jax"]["median_s"] > 0 and "jax" not in results[1]  # jax's kernel is decode-only
