"""The speculation benchmarks end to end on a tiny random model saved to disk: acceptance of chains and
trees through the real speculative step. Each script's main() runs as its command line would."""

import json

import jax
import pytest
from tokenizers import Tokenizer as Backend, models, pre_tokenizers

from benchmarks import acceptance
from specjax.checkpoints import save_checkpoint
from specjax.config import ModelConfig
from specjax.params import random_params
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


@pytest.mark.parametrize("script, argv, message", [
    (acceptance, ["--draft", "a", "--methods", "merged"], "at least two drafts"),
    (acceptance, ["--draft", "a", "--max-nodes", "16"], "more than max_nodes=16"),
    (acceptance, ["--draft", "a", "--k", "2,x"], "comma-separated integers"),
])
def test_bad_arguments_fail_before_any_model_loads(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
