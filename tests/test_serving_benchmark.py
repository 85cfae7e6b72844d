"""benchmarks/serving.py end to end on a tiny random model: real servers on 127.0.0.1, compiled
ahead, a streamed load at three levels (one closed-loop client, two open-loop rates) in two rounds,
and the JSON it writes."""

import json

import pytest

from benchmarks import serving
from tests.test_speculation_benchmarks import target_dir  # noqa: F401 (the tiny target, a fixture)

MAX_TOKENS = 8
RATES = [2.0, 50.0]
LOADS = ["1 client", "2/s", "50/s"]
N = 3
# Every server compiles its own steps, so the smoke run keeps to two: plain, and batch-aware suffix
# speculation for the speculation statistics (a draft chain's server compiles three times as many
# step shapes, and the benchmark treats every method alike; test_serving serves draft chains).
METHODS = ["plain", "batch-aware"]


def test_every_method_serves_every_request_at_every_rate(target_dir, tmp_path):  # noqa: F811
    out = tmp_path / "serving.json"
    assert serving.main(["--target", str(target_dir), "--draft", "target", "--k", "3", "--max-spec-tokens", "3", "--workloads", "code",
                         "--methods", ",".join(METHODS),
                         "--clients", "1", "--rates", ",".join(map(str, RATES)), "--n", str(N), "--rounds", "2",
                         "--max-tokens", str(MAX_TOKENS), "--warmup", "3", "--max-batch", "2", "--page-size", "64",
                         "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["methods"] == METHODS
    assert all(payload["servers"][m]["shapes_compiled"] > 0 for m in METHODS)
    # Round by round, each load level, each method in turn, the order turning each round.
    turned = METHODS[1:] + METHODS[:1]
    assert [(r["round"], r["load"], r["method"]) for r in payload["runs"]] == \
        [(0, load, m) for load in LOADS for m in METHODS] + [(1, load, m) for load in LOADS for m in turned]
    assert [(r["clients"], r["rate"]) for r in payload["runs"][:len(METHODS)]] == [(1, None)] * len(METHODS)
    for run in payload["runs"]:
        assert run["compile_s"] == 0  # compiled ahead
    assert [(r["load"], r["method"]) for r in payload["results"]] == [(load, m) for load in LOADS for m in METHODS]
    for run in payload["results"]:
        assert run["rounds"] == 2 and run["completed"] == 2 * N and run["errors"] == 0
        assert run["output_tokens"] == 2 * N * MAX_TOKENS  # the tiny tokenizer has no end-of-sequence token
        assert run["tokens_per_s"] > 0 and run["seconds"] > 0 and min(run["load_average_1m"]) >= 0
        for request in run["requests"]:
            assert 0 < request["ttft_s"] <= request["latency_s"]
            assert request["tpot_s"] > 0 and request["end_s"] >= request["start_s"] >= 0
        if run["clients"] == 1:  # one request at a time, each sent when the last one ended
            for rounds_requests in (run["requests"][:N], run["requests"][N:]):
                starts = sorted(rounds_requests, key=lambda q: q["start_s"])
                assert all(a["end_s"] <= b["start_s"] for a, b in zip(starts, starts[1:]))
        assert run["ttft"]["median_ms"] <= run["ttft"]["p99_ms"] and run["tpot"]["n"] == 2 * N
        spec = run["speculation"]
        if run["method"] == "plain":
            assert spec is None and run["vs_plain"] == 1.0
        else:
            assert spec["steps"] > 0 and spec["tau"] >= 1 and 0 <= spec["acceptance_rate"] <= 1
        assert run["same_text_as_plain"] == 2 * N  # greedy and lossless
    for arrivals in payload["arrivals"][str(RATES[0])]:
        assert arrivals[0] == 0 and arrivals == sorted(arrivals) and len(arrivals) == N


def test_bad_command_lines_are_refused_with_a_reason(capsys):
    for argv, message in ((["--rates", "0,1"], "positive numbers"), (["--methods", "plain,nope"], "unknown method"),
                          (["--workloads", "poems"], "unknown workload"), (["--n", "0"], "--n must be positive"),
                          (["--rates", "1,1"], "a rate twice"), (["--clients", "0"], "positive integers"),
                          (["--clients", "", "--rates", ""], "no load level")):
        with pytest.raises(SystemExit):
            serving.parse_args(argv)
        assert message in capsys.readouterr().err


def test_quick_fills_in_only_what_was_not_given():
    args = serving.parse_args(["--quick", "--n", "2"])
    assert args.n == 2 and args.rates == serving.QUICK["rates"] and args.max_tokens == serving.QUICK["max_tokens"]
    assert [load.label for load in args.loads] == ["1 client", "0.5/s", "2/s"]


def test_poisson_arrivals_are_seeded_and_average_the_rate():
    offsets = serving.poisson_offsets(4.0, 2000, seed=0)
    assert offsets == serving.poisson_offsets(4.0, 2000, seed=0) != serving.poisson_offsets(4.0, 2000, seed=1)
    assert offsets[-1] / (len(offsets) - 1) == pytest.approx(0.25, rel=0.1)
