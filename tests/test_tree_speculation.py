"""Tree speculation through the LLM API and the CLI, on tiny random models: lossless output,
speculation statistics, sampled requests, the chain shorthand, and bad input caught early."""

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer as Backend, models, pre_tokenizers

from specjax import cli
from specjax.checkpoints import LoadedModel, save_checkpoint
from specjax.config import ModelConfig
from specjax.draft import DraftVocab, save_draft
from specjax.llm import LLM
from specjax.params import random_params
from specjax.runner import EngineConfig
from specjax.sampling import SamplingParams
from specjax.speculation.speculator import TreeSpeculation

VOCAB = 101
TARGET = ModelConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=12, max_position_embeddings=512)
DRAFT = TARGET.replace(num_layers=1)
# One page and one prefill chunk hold a whole sequence, so the steps share a few compiled buckets.
ENGINE = EngineConfig(page_size=64, kv_cache_bytes=4 << 20, prefill_chunk=32)
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def word_tokenizer(size: int = VOCAB):
    """Token i is the word ``t<i>``."""
    from specjax.tokenizer import Tokenizer

    backend = Backend(models.WordLevel({f"t{i}": i for i in range(size)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend)


def tiny(config, seed, name):
    return LoadedModel(config, random_params(config, jax.random.key(seed), scale=0.3), word_tokenizer(), name)


@pytest.fixture(scope="module")
def target():
    return tiny(TARGET, 0, "tiny target")


@pytest.fixture(scope="module")
def draft():
    return tiny(DRAFT, 1, "tiny draft")


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB, n).tolist() for n in (5, 13, 21)]


@pytest.fixture(scope="module")
def plain(target, prompts):
    return [o.token_ids for o in LLM(target, engine=ENGINE).generate(prompts, GREEDY)]


@pytest.fixture(scope="module")
def merged(target, draft):
    """The draft and the target itself, merged: the target's own proposals are always accepted."""
    return LLM(target, engine=ENGINE, seed=0,
               speculation=TreeSpeculation(drafts=[draft, target], expansion=(2, 2, 1), max_nodes=32))


def test_merged_tree_greedy_equals_plain_and_reports_its_statistics(merged, prompts, plain):
    outs = merged.generate(prompts, GREEDY)
    for out, want in zip(outs, plain):
        assert out.token_ids == want and out.finish_reason == "length"
        s = out.stats.speculation
        assert s.steps > 0 and s.tokens == len(want) - 1  # the first token comes from the prefill
        assert s.acceptance_by_depth[0] == 1.0 and len(s.acceptance_by_depth) == 3
        assert s.tau > 3.5 and s.proposed > s.accepted  # the random draft's nodes are mostly wasted
    assert merged.runner.pages.num_used == 0
    assert all(r.pages.num_used == 0 for r in merged.engine.proposers["tree"].runners)


def test_one_device_state_holds_every_model_and_steps_donate_only_its_caches(merged, target, prompts, plain):
    tree = merged.engine.proposers["tree"]
    before = merged.runner.cell.state
    assert len(before.drafts) == 2 and before.drafts[1].vocab_maps is not None and before.target.vocab_maps is None
    out = merged.generate(prompts[:1], GREEDY)[0]
    assert out.token_ids == plain[0]
    after = merged.runner.cell.state
    # Prompt steps, draft prompt steps and fused tree steps each wrote their caches in place...
    assert all(x.is_deleted() for x in jax.tree.leaves(before.caches()))
    # ...and left every weight alone: the target's are shared with `plain` and with the second draft.
    assert not any(x.is_deleted() for x in jax.tree.leaves(after.without_caches()) + jax.tree.leaves(target.params))
    assert merged.runner.cache is after.target.cache
    assert all(r.cache is d.cache and r.params is d.params for r, d in zip(tree.runners, after.drafts))


def test_sampled_requests_speculate_and_are_reproducible(merged, prompts):
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=16, seed=7, ignore_eos=True)
    first = merged.generate(prompts, params)
    shuffled = merged.generate([prompts[2], prompts[0], prompts[1]], params)  # other batch positions
    assert [o.token_ids for o in first] == [o.token_ids for o in (shuffled[1], shuffled[2], shuffled[0])]
    for out in first:
        s = out.stats.speculation
        assert len(out.token_ids) == 16 and s.steps > 0 and s.acceptance_rate > 0  # the target's proposals pass
    reseeded = merged.generate(prompts, SamplingParams(temperature=0.8, max_tokens=16, seed=8, ignore_eos=True))
    assert [o.token_ids for o in reseeded] != [o.token_ids for o in first]
    assert merged.runner.pages.num_used == 0


def test_draft_shorthand_is_a_chain(target, draft):
    # (Its generation is tested in test_llm.py with the built-in model as its own draft.)
    llm = LLM(target, engine=ENGINE, draft=draft, num_speculative_tokens=3)
    assert llm.speculation == TreeSpeculation(drafts=(draft,), expansion=(1, 1, 1), max_nodes=4)
    tree = llm.engine.proposers["tree"]
    assert tree.spec.num_nodes == 4 and tree.depth == 3  # verified unpadded


def test_bad_speculation_settings_fail_before_any_compilation(target, draft, tmp_path):
    with pytest.raises(ValueError, match="more than max_nodes=16"):
        TreeSpeculation(drafts=[draft], expansion=(1, 1, 3, 1, 1, 1, 1, 1), max_nodes=16)
    with pytest.raises(ValueError, match=r"max_nodes must be an integer in \[1, 128\]"):
        TreeSpeculation(drafts=[draft], max_nodes=200)
    with pytest.raises(ValueError, match="positive integers"):
        TreeSpeculation(drafts=[draft], expansion=(2, 0))
    with pytest.raises(ValueError, match="at least one draft"):
        TreeSpeculation(drafts=[])
    with pytest.raises(ValueError, match="either draft="):
        LLM(target, draft=draft, speculation=TreeSpeculation(drafts=[draft]))

    other_vocab = tiny(DRAFT.replace(vocab_size=VOCAB - 1), 2, "other vocabulary")
    with pytest.raises(ValueError, match=r"vocabulary \(100\) differs from the target's \(101\)"):
        LLM(target, engine=ENGINE, speculation=TreeSpeculation(drafts=[other_vocab], expansion=(2,)))
    renamed = LoadedModel(DRAFT, draft.params, word_tokenizer(VOCAB - 1), "other tokenizer")
    with pytest.raises(ValueError, match="another tokenizer"):
        LLM(target, engine=ENGINE, speculation=TreeSpeculation(drafts=[renamed], expansion=(2,)))
    ids = np.arange(0, 50, dtype=np.int32)
    vocab = DraftVocab(draft_to_target=ids, target_to_draft=np.arange(60, dtype=np.int32) % 50)
    config = DRAFT.replace(vocab_size=50)
    save_draft(tmp_path / "draft-for-60", config, random_params(config, jax.random.key(3)), vocab)
    with pytest.raises(ValueError, match="vocabulary of 60 tokens; the target has 101"):
        LLM(target, engine=ENGINE, speculation=TreeSpeculation(drafts=[str(tmp_path / "draft-for-60")]))

    pool = 2 * 16 * 2 * TARGET.num_layers * TARGET.kv_size * 4  # two pages of 16 tokens
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        LLM(target, engine=EngineConfig(page_size=16, kv_cache_bytes=pool),
            speculation=TreeSpeculation(drafts=[draft], expansion=(1,) * 40, max_nodes=41))


def test_cli_generates_with_a_tree(target, draft, tmp_path, capsys):
    save_checkpoint(tmp_path / "target", target.config, target.params, target.tokenizer)
    vocab = DraftVocab(draft_to_target=np.arange(VOCAB, dtype=np.int32), target_to_draft=np.arange(VOCAB, dtype=np.int32))
    save_draft(tmp_path / "draft", DRAFT, draft.params, vocab)
    code = cli.main(["generate", "--model", str(tmp_path / "target"), "--prompt", "t1 t2 t3", "--max-tokens", "6",
                     "--speculate", "tree", "--draft", str(tmp_path / "draft"), "--expansion", "2",
                     "--max-nodes", "8", "--no-stream"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert len(out.out.split()) == 6  # six words t<i>
    assert "speculation:" in out.err and "tree <2>" in out.err and "tokens per target step" in out.err
    assert cli.main(["generate", "--prompt", "hi", "--speculate", "tree"]) == 2
    assert "at least one --draft" in capsys.readouterr().err
    assert cli.main(["generate", "--prompt", "hi", "--draft", "x", "--speculate", "tree", "--expansion", "2,a"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
