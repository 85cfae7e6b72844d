"""benchmarks/serving.py end to end on a tiny random model: real servers on 127.0.0.1, compiled
ahead, a streamed open-loop load at two rates in two rounds, and the JSON it writes."""

import json

import pytest

from benchmarks import serving
from tests.test_speculation_benchmarks import target_dir  # noqa: F401 (the tiny target, a fixture)

MAX_TOKENS = 8
RATES = [2.0, 50.0]
N = 3
# Every server compiles its own steps, so the smoke run keeps to three: hybrid covers the draft
# chain's and the suffix cache's paths.
METHODS = ["plain", "hybrid", "batch-aware"]


def test_every_method_serves_every_request_at_every_rate(target_dir, tmp_path):  # noqa: F811
    out = tmp_path / "serving.json"
    assert serving.main(["--target", str(target_dir), "--draft", "target", "--k", "3", "--max-spec-tokens", "3", "--workloads", "code",
                         "--methods", ",".join(METHODS),
                         "--rates", ",".join(map(str, RATES)), "--n", str(N), "--rounds", "2",
                         "--max-tokens", str(MAX_TOKENS), "--warmup", "3", "--max-batch", "2", "--page-size", "64",
                         "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["methods"] == METHODS
    assert all(payload["servers"][m]["shapes_compiled"] > 0 for m in METHODS)
    # Round by round, each rate, each method in turn, the order turning each round.
    turned = METHODS[1:] + METHODS[:1]
    assert [(r["round"], r["rate"], r["method"]) for r in payload["runs"]] == \
        [(0, rate, m) for rate in RATES for m in METHODS] + [(1, rate, m) for rate in RATES for m in turned]
    for run in payload["runs"]:
        assert run["compile_s"] == 0  # compiled ahead
    assert [(r["rate"], r["method"]) for r in payload["results"]] == [(rate, m) for rate in RATES for m in METHODS]
    for run in payload["results"]:
        assert run["rounds"] == 2 and run["completed"] == 2 * N and run["errors"] == 0
        assert run["output_tokens"] == 2 * N * MAX_TOKENS  # the tiny tokenizer has no end-of-sequence token
        assert run["tokens_per_s"] > 0 and run["seconds"] > 0 and min(run["load_average_1m"]) >= 0
        for request in run["requests"]:
            assert 0 < request["ttft_s"] <= request["latency_s"]
            assert request["tpot_s"] > 0 and request["end_s"] >= request["start_s"] >= 0
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
                          (["--rates", "1,1"], "a rate twice")):
        with pytest.raises(SystemExit):
            serving.parse_args(argv)
        assert message in capsys.readouterr().err


def test_quick_fills_in_only_what_was_not_given():
    args = serving.parse_args(["--quick", "--n", "2"])
    assert args.n == 2 and args.rates == serving.QUICK["rates"] and args.max_tokens == serving.QUICK["max_tokens"]


def test_poisson_arrivals_are_seeded_and_average_the_rate():
    offsets = serving.poisson_offsets(4.0, 2000, seed=0)
    assert offsets == serving.poisson_offsets(4.0, 2000, seed=0) != serving.poisson_offsets(4.0, 2000, seed=1)
    assert offsets[-1] / (len(offsets) - 1) == pytest.approx(0.25, rel=0.1)
