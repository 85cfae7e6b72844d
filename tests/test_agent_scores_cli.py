"""Scores over harness results (fast_p, geometric-mean speedup, the markdown report) and the CLI."""

import json
import math

import pytest

from agent import cli, scores


def _result(task, family, correct, speed=None):
    timing = {"speedup": speed, "bandwidth_fraction": 0.5, "flops_fraction": 0.25} if speed else None
    return {"task": task, "family": family, "level": 1, "correct": correct, "max_ratio": 0.1, "timing": timing,
            "violations": [], "error": None}


RESULTS = [_result("a", "moe", True, 2.0), _result("b", "moe", True, 0.5), _result("c", "moe", False, 9.0),
           _result("d", "ssm", True)]


def test_fast_p_counts_only_correct_timed_results_faster_than_p():
    assert scores.fast_p(RESULTS, 1.0) == 0.25  # c is fast but wrong; d is untimed
    assert scores.fast_p(RESULTS, 0.0) == 0.5
    assert scores.fast_p([], 1.0) == 0.0


def test_family_summary_and_geomean():
    summary = scores.summarise(RESULTS)
    assert summary["moe"]["correct"] == 2 and summary["moe"]["timed"] == 2
    assert math.isclose(summary["moe"]["geomean_speedup"], 1.0)
    assert summary["ssm"]["geomean_speedup"] is None and summary["all"]["results"] == 4


def test_report_from_json_through_the_cli(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    assert cli.main(["kernels", "report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| a | moe | L1 | yes | 0.1 | 2.00 | 50.0% | 25.0% |" in out
    assert "| moe | 3 | 2 | 2 | 33% | 33% | 1.00 |" in out


def test_cli_list_show_and_clear_errors(tmp_path, capsys):
    assert cli.main(["kernels", "list"]) == 0
    assert capsys.readouterr().out.count("\n") >= 20
    assert cli.main(["kernels", "show", "moe_grouped_matmul"]) == 0
    shown = capsys.readouterr().out
    assert "ragged_dot" in shown and '"k": 14336' in shown
    assert cli.main(["kernels", "show", "nope"]) == 2
    assert "no task 'nope'" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"x": 1}')
    assert cli.main(["kernels", "report", str(tmp_path / "bad.json")]) == 2
    (tmp_path / "kernel.py").write_text("def kernel(x):\n    return x\n")
    with pytest.raises(SystemExit, match="no task"):
        cli.main(["kernels", "run", str(tmp_path)])


def test_baselines_are_checked_timed_and_reported(tmp_path, capsys):
    out = tmp_path / "baselines.json"
    assert cli.main(["kernels", "baselines", "--task", "moe_grouped_matmul", "--task", "rmsnorm_rope",
                     "--repeats", "2", "--input-sets", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["task"] for r in report["tasks"]] == ["moe_grouped_matmul", "rmsnorm_rope"]
    grouped = report["tasks"][0]
    assert set(grouped["baselines"]) == {"xla", "ragged_dot"}  # every baseline, not just XLA's
    for row in report["tasks"]:
        assert row["bytes"] > 0 and row["flops"] > 0
        for entry in row["baselines"].values():
            assert entry["max_ratio"] <= 1 and entry["seconds"] > 0
            assert math.isclose(entry["bandwidth_fraction"] * entry["seconds"] * report["peaks"]["bandwidth"],
                                row["bytes"], rel_tol=1e-9)
    text = capsys.readouterr().out
    assert "| moe_grouped_matmul | moe | ragged_dot |" in text and "jax " in text


def test_baselines_of_an_unknown_task_is_a_clear_error(capsys):
    assert cli.main(["kernels", "baselines", "--task", "no_such_task"]) == 2
    assert "no task 'no_such_task'" in capsys.readouterr().err
