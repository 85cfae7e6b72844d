"""The committed draft models of the built-in target: resolvable by name, within the compute budget
of a draft, and useful: speculation with them is lossless and accepts real work."""

from pathlib import Path

import numpy as np
import pytest

import specjax
from specjax.checkpoints.registry import BUILTIN_DRAFTS, resolve_draft
from specjax.cli import main
from specjax.draft import compute_ratio, draft_meta, load_draft
from specjax.llm import LLM
from specjax.runner import EngineConfig
from specjax.sampling import SamplingParams


@pytest.fixture(scope="module", params=sorted(BUILTIN_DRAFTS))
def builtin_draft(request):
    return request.param, load_draft(resolve_draft(request.param))


def test_builtin_drafts_fit_the_target(builtin_draft, smollm2):
    name, draft = builtin_draft
    assert draft.vocab.target_size == smollm2.config.vocab_size
    # At most 1/8 of the target's per-token compute, LM heads included (issue 3's budget).
    assert compute_ratio(draft.config, smollm2.config, context=0) <= 1 / 8
    assert all(draft.vocab.in_vocab(np.int32(t)) for t in smollm2.config.eos_token_ids)
    assert draft_meta(resolve_draft(name))["target"] == "smollm2-135m"


def test_specjax_models_lists_every_shipped_draft(capsys):
    """Users find the drafts through `specjax models`: a draft shipped but not listed is undiscoverable."""
    shipped = sorted(d.name for d in (Path(specjax.__file__).parent / "drafts").iterdir() if d.is_dir())
    assert shipped
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    for name in shipped:
        assert f"\n  {name} " in listing, f"{name} is missing from `specjax models`:\n{listing}"
    assert listing.count("target smollm2-135m; 3 layers") == len(shipped)


def test_unknown_draft_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown draft"):
        resolve_draft("smollm2-135m-draft-z")


@pytest.mark.parametrize("name", sorted(BUILTIN_DRAFTS))
def test_builtin_draft_speculates_losslessly_and_accepts(name, smollm2):
    engine = EngineConfig(kv_cache_bytes=64 << 20)
    messages = [{"role": "user", "content": "Write a Python function that returns the factorial of n."}]
    params = SamplingParams(temperature=0, max_tokens=48)
    plain = LLM(smollm2, engine=engine).chat(messages, params)[0]
    spec = LLM(smollm2, draft=name, num_speculative_tokens=4, engine=engine).chat(messages, params)[0]
    assert spec.token_ids == plain.token_ids
    # A random draft gives about 1.0 tokens per target step; a trained one well above.
    assert spec.stats.speculation.tau > 1.5
