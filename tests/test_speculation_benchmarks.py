"""The speculation benchmarks end to end on a tiny random model saved to disk: acceptance of chains and
trees through the real speculative step, the interleaved timing against plain decoding, and the
verification cost curve. Each script's main() runs as its command line would."""

import json

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer as Backend, models, pre_tokenizers

from benchmarks import acceptance, lora, speculative, suffix
from specjax.checkpoints import load_model, save_checkpoint
from specjax.config import ModelConfig
from specjax.llm import LLM
from specjax.params import random_params
from specjax.runner import EngineConfig
from specjax.speculation.speculator import SPECINFER_EXPANSION
from specjax.tokenizer import Tokenizer

VOCAB = 101
TARGET = ModelConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=12, max_position_embeddings=512)
K = 3
# After the prefill's token, three steps of K + 1 tokens when every proposal is right.
MAX_TOKENS = 1 + 3 * (K + 1)
# One page holds a whole request, so each model compiles few shape buckets.
WORKLOAD = ["--workload", "code", "--n", "2", "--max-tokens", str(MAX_TOKENS), "--ignore-eos", "--page-size", "64"]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """A tiny random target with a word-level tokenizer (token i is ``t<i>``, other words ``t0``) and
    a chat template, so the workloads' requests become prompts."""
    backend = Backend(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = Tokenizer(backend, chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}")
    path = tmp_path_factory.mktemp("tiny") / "target"
    save_checkpoint(path, TARGET, random_params(TARGET, jax.random.key(0), scale=0.3), tokenizer)
    return path


def run(script, argv, tmp_path) -> dict:
    out = tmp_path / "result.json"
    assert script.main([*argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------- acceptance.py
def test_chains_from_the_target_itself_and_from_a_random_draft(target_dir, tmp_path, capsys):
    payload = run(acceptance, ["--target", str(target_dir), "--draft", "target", "--draft", "random",
                               "--methods", "chain", "--k", str(K), *WORKLOAD], tmp_path)
    itself, random = payload["methods"]
    assert itself["kind"] == random["kind"] == "chain" and itself["nodes"] == K + 1
    assert itself["drafts"] == ["target"] and random["drafts"] == ["random"]
    total = itself["total"]
    assert total["tau"] == 1 + K and total["acceptance_rate"] == 1.0 and total["wasted_share"] == 0.0
    assert total["acceptance_by_depth"] == [1.0] * K
    assert 1.0 <= random["total"]["tau"] < 1.3 and random["total"]["wasted_share"] > 0.8
    for method in (itself, random):  # lossless: the outputs are plain greedy decoding's
        assert method["identical"] == 2 and [r["output_tokens"] for r in method["requests"]] == [MAX_TOKENS] * 2
    assert payload["environment"]["jax_version"] == jax.__version__
    table = capsys.readouterr().out
    assert "identical" in table and "k=3" in table


def test_methods_are_planned_within_the_node_budget():
    kinds = acceptance.default_methods(["a", "b"])
    methods = acceptance.plan_methods(kinds, ["a", "b", "a"])
    assert [(m.kind, m.draft_names) for m in methods] == [
        ("chain", "a"), ("chain", "b"), ("tree", "a"), ("tree", "b"), ("dynamic", "a"), ("dynamic", "b"),
        ("merged", "a+b"), ("merged-dynamic", "a+b")]
    nodes = {m.kind: m.nodes for m in methods}
    # Chains as deep as the tree; one draft's SpecInfer tree; two merged; dynamic trees fill the budget
    # (shared between two drafts: 1 + 2 * 31).
    assert nodes == {"chain": len(SPECINFER_EXPANSION) + 1, "tree": 21, "merged": 41, "dynamic": 64,
                     "merged-dynamic": 63}
    assert [m.shape for m in acceptance.plan_methods(["chain"], ["a"], ks=[2, 5])] == ["k=2", "k=5"]
    with pytest.raises(ValueError, match="at least two drafts"):
        acceptance.plan_methods(["merged"], ["a", "a"])
    with pytest.raises(ValueError, match="more than max_nodes=16"):
        acceptance.plan_methods(["tree"], ["a"], max_nodes=16)
    with pytest.raises(ValueError, match="unknown method"):
        acceptance.plan_methods(["beam"], ["a"])


# ---------------------------------------------------------------------------- speculative.py
def test_generation_is_timed_interleaved_against_plain_decoding(target_dir, tmp_path, capsys):
    # A tree from the target itself: its first child at each node is the target's own next token.
    payload = run(speculative, ["--target", str(target_dir), "--draft", "target", "--methods", "tree",
                                "--expansion", "2,1,1", "--max-nodes", "16", "--rounds", "2", *WORKLOAD], tmp_path)
    plain, tree = payload["methods"]
    assert plain["label"] == "plain" and plain["speculation"] is None and plain["speedup"] == 1.0
    spec = tree["speculation"]
    assert tree["kind"] == "tree" and tree["nodes"] == 7
    assert spec["tau"] == 1 + K and spec["acceptance_by_depth"] == [1.0] * K and spec["acceptance_rate"] == 0.5
    assert tree["identical"] == plain["identical"] == 4 and tree["tokens"] == plain["tokens"] == 4 * MAX_TOKENS
    assert tree["speedup"] == pytest.approx(tree["tokens_per_s"] / plain["tokens_per_s"])
    assert tree["decode_speedup"] > 0 and len(tree["run_speedups"]) == 4 and plain["run_speedups"] == [1.0] * 4
    # Two groups of one request, two rounds: each group starts with the next method in turn.
    assert [(r["round"], r["group"], r["label"].split()[0]) for r in payload["runs"]] == [
        (0, 0, "plain"), (0, 0, "tree"), (0, 1, "tree"), (0, 1, "plain"),
        (1, 0, "plain"), (1, 0, "tree"), (1, 1, "tree"), (1, 1, "plain")]
    assert all(r["seconds"] > 0 and r["output_tokens"] == [MAX_TOKENS] for r in payload["runs"])
    assert "speedup" in capsys.readouterr().out


def test_a_run_that_compiled_is_run_again(target_dir):
    llm = LLM(load_model(target_dir), engine=EngineConfig(page_size=16, kv_cache_bytes=1 << 20))
    outputs, seconds, reruns = speculative.timed_generate(llm, [[5, 6, 7]], acceptance.greedy_params(4))
    assert reruns == 1 and llm.compile_time_s > 0 and len(outputs[0].token_ids) == 4
    assert speculative.timed_generate(llm, [[5, 6, 7]], acceptance.greedy_params(4))[2] == 0


def test_the_schedule_rotates_which_method_goes_first():
    order = speculative.schedule(["a", "b", "c"], groups=2, rounds=2)
    assert [label for _, _, label in order] == list("abc" "bca" "cab" "abc")
    assert [(r, g) for r, g, _ in order[::3]] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_the_verification_cost_curve(target_dir, tmp_path):
    # Both prefixes fit one page: the second reuses the first's compiled steps.
    payload = run(speculative, ["--verify-cost", "--target", str(target_dir), "--tree-sizes", "1,4",
                                "--batch-sizes", "2", "--prefix-lens", "10,20", "--repeats", "2",
                                "--page-size", "64"], tmp_path)
    assert [(r["batch"], r["prefix"]) for r in payload["results"]] == [(2, 10), (2, 20)]
    for result in payload["results"]:
        assert result["decode"]["n"] == 2 and result["decode"]["median_ms"] > 0
        assert [t["nodes"] for t in result["trees"]] == [1, 4]
        for t in result["trees"]:
            assert t["n"] == 2 and t["x_decode"] == pytest.approx(t["median_ms"] / result["decode"]["median_ms"])
            assert t["nodes_per_decode_step"] == pytest.approx(t["nodes"] / t["x_decode"])


def test_cost_trees_are_heap_ordered_binary_trees_of_exactly_their_size():
    tree = speculative.cost_tree(6, VOCAB, np.random.default_rng(0))
    assert tree.size == tree.num_nodes == 6
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 2] and tree.depths.tolist() == [0, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("script, argv, message", [
    (acceptance, ["--draft", "a", "--methods", "merged"], "at least two drafts"),
    (acceptance, ["--draft", "a", "--max-nodes", "16"], "more than max_nodes=16"),
    (acceptance, ["--draft", "a", "--k", "2,x"], "comma-separated integers"),
    (speculative, [], "at least one --draft"),
    (speculative, ["--draft", "a", "--methods", "chain-replay"], "no speed to measure"),
    (speculative, ["--verify-cost", "--draft", "a"], "drop --draft"),
    (speculative, ["--verify-cost", "--tree-sizes", "256"], "at most 128 nodes"),
    (lora, ["--kernels", "gather,bgmv"], "unknown kernel(s) bgmv"),
    (lora, ["--max-loras", "2"], "at least 4"),
    (lora, ["--finetune-len", "0"], "--finetune-len must be positive"),
])
def test_bad_arguments_fail_before_any_model_loads(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------------------- suffix.py
def test_suffix_benchmark_warms_its_cache_and_stays_lossless(target_dir, tmp_path):
    payload = run(suffix, ["--target", str(target_dir), "--draft", "target", "--k", str(K), "--workload", "code",
                           "--methods", "draft,suffix-warm,hybrid-cold", "--n", "2", "--warm", "2",
                           "--max-tokens", str(MAX_TOKENS), "--max-spec-tokens", "7"], tmp_path)
    methods = {m["method"]: m for m in payload["methods"]}
    assert list(methods) == ["plain", "draft", "suffix-warm", "hybrid-cold"]
    assert all(m["identical"] == 2 for m in methods.values())  # lossless: every output is plain greedy's
    assert methods["draft"]["tau"] > K  # the target drafting for itself: all accepted but the last steps
    for name in ("suffix-warm", "hybrid-cold"):
        assert methods[name]["tau"] >= 1 and methods[name]["host_us_per_step"] > 0
    assert set(methods["hybrid-cold"]["sources"]) <= {"suffix", "draft"}
    assert all(m["tokens_per_s"] > 0 for m in methods.values())


def test_suffix_benchmark_samples_with_seeds_as_plain_decoding_does(target_dir, tmp_path):
    payload = run(suffix, ["--target", str(target_dir), "--draft", "target", "--k", str(K), "--workload", "code",
                           "--methods", "hybrid-cold,hybrid-cold-unseeded", "--temperature", "0.8", "--n", "2",
                           "--warm", "0", "--max-tokens", str(MAX_TOKENS)], tmp_path)
    methods = {m["method"]: m for m in payload["methods"]}
    assert list(methods) == ["plain", "hybrid-cold", "hybrid-cold-unseeded"]
    assert methods["hybrid-cold"]["identical"] == 2  # seeded: plain sampling's tokens, whichever source served
    assert methods["hybrid-cold"]["sources"].get("draft", 0) > 0 and methods["hybrid-cold-unseeded"]["tau"] > 1
