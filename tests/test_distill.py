"""Draft models and their distillation: reduced vocabularies, checkpoints, teacher cache, training.

Everything here runs on tiny random models: the 135M target appears only through its config
(for the compute ratio of draft A).
"""

import dataclasses
import hashlib
import json
import os
import pydoc_data.topics
import site
import subprocess
import sysconfig
import tokenize
import venv
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax.attention import AttentionMetadata, causal_mask
from specjax.config import ModelConfig
from specjax.datasets.splits import is_heldout
from specjax.draft import (
    DraftVocab,
    build_draft_vocab,
    compute_ratio,
    draft_config,
    draft_forward,
    init_from_target,
    load_draft,
    save_draft,
)
from specjax.params import random_params
from training import data
from training.distill_draft import (
    DRAFT_ARCHS,
    Corpus,
    TrainSettings,
    batch_arrays,
    boost_weights,
    distill_loss,
    make_optimizer,
    make_train_step,
    read_log,
    train,
)
from training.teacher import build_teacher_cache, full_forward, open_cache

TARGET = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,))
SPECIAL = (0, 1, 2)
K = 8


@pytest.fixture(scope="module")
def target():
    # A larger init scale than random_params' default makes the teacher's distributions peaked.
    return random_params(TARGET, jax.random.key(0), scale=0.3)


@pytest.fixture(scope="module")
def windows():
    # Skewed token frequencies, so the reduced vocabulary is a real choice.
    rng = np.random.default_rng(0)
    return np.minimum(rng.zipf(1.3, size=(16, 32)), TARGET.vocab_size - 1).astype(np.int32)


@pytest.fixture(scope="module")
def vocab(target, windows):
    counts = np.bincount(windows.ravel(), minlength=TARGET.vocab_size)
    return build_draft_vocab(counts, 64, SPECIAL, np.asarray(target.embed))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, target, windows):
    cache = build_teacher_cache(target, TARGET, windows, tmp_path_factory.mktemp("cache"), k=K, batch_size=4,
                                progress=False)
    return Corpus("text", windows, cache)


def tiny_draft(vocab):
    return draft_config(TARGET, vocab, num_layers=1)


# ---------------------------------------------------------------------------- vocabulary
def test_vocab_keeps_specials_and_most_frequent(windows, vocab):
    counts = np.bincount(windows.ravel(), minlength=TARGET.vocab_size)
    d2t = vocab.draft_to_target
    assert d2t.dtype == np.int32 and d2t.size == 64 and np.all(np.diff(d2t) > 0)
    assert set(SPECIAL) <= set(d2t.tolist())
    kept, dropped = counts[d2t], np.delete(counts, d2t)
    assert np.sort(kept)[len(SPECIAL)] >= dropped.max()  # apart from the specials, nothing rarer is kept


def test_reduced_vocab_maps_back_to_target_ids(vocab):
    logits = jax.random.normal(jax.random.key(1), (3, 5, vocab.size)) * 4
    full = vocab.target_logits(logits)
    assert full.shape == (3, 5, TARGET.vocab_size)
    # The draft's argmax, mapped to target ids, is the argmax of the expanded logits.
    np.testing.assert_array_equal(vocab.target_ids(jnp.argmax(logits, -1)), jnp.argmax(full, -1))
    # Outside the draft vocabulary: -inf, so the expanded softmax is the draft's distribution on target ids.
    outside = np.setdiff1d(np.arange(TARGET.vocab_size), vocab.draft_to_target)
    assert np.all(np.isneginf(np.asarray(full)[..., outside]))
    np.testing.assert_allclose(jax.nn.softmax(full, -1)[..., vocab.draft_to_target], jax.nn.softmax(logits, -1),
                               rtol=1e-6, atol=1e-7)
    # Inputs: in-vocabulary target ids round-trip; others are fed as some in-vocabulary stand-in.
    ids = np.arange(TARGET.vocab_size)
    in_vocab = vocab.in_vocab(ids)
    assert in_vocab.sum() == vocab.size
    np.testing.assert_array_equal(vocab.target_ids(vocab.draft_inputs(ids))[in_vocab], ids[in_vocab])
    assert np.all((vocab.draft_inputs(ids) >= 0) & (vocab.draft_inputs(ids) < vocab.size))


def test_out_of_vocab_inputs_use_the_nearest_embedding():
    embed = np.eye(4, dtype=np.float32)
    embed[3] = [0.9, 0.1, 0, 0]  # token 3 looks like token 0
    vocab = build_draft_vocab(np.array([5, 1, 4, 0]), 3, [1], embed)
    np.testing.assert_array_equal(vocab.draft_to_target, [0, 1, 2])
    assert vocab.target_to_draft[3] == 0


def test_bad_vocab_maps_are_rejected():
    with pytest.raises(ValueError):
        DraftVocab(np.array([2, 1], np.int32), np.array([0, 1, 0], np.int32))
    with pytest.raises(ValueError):
        DraftVocab(np.array([0, 1], np.int32), np.array([1, 0, 0], np.int32))  # 0 must map to draft id 0


# ---------------------------------------------------------------------------- compute budget
def test_draft_a_is_at_most_an_eighth_of_the_target():
    smollm2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                          num_kv_heads=3, head_dim=64, tie_word_embeddings=True)
    vocab = DraftVocab(np.arange(8192, dtype=np.int32), np.minimum(np.arange(49152), 8191).astype(np.int32))
    arch = DRAFT_ARCHS["a"]
    config = draft_config(smollm2, vocab, arch.num_layers, intermediate_size=arch.intermediate_size)
    for context in (0, 256, 1024, 8192):
        assert compute_ratio(config, smollm2, context) <= 1 / 8
    # The full-vocabulary head alone would blow the budget: that is why the vocabulary is reduced.
    assert compute_ratio(config.replace(vocab_size=49152), smollm2, 0) > 1 / 8


# ---------------------------------------------------------------------------- checkpoints
def test_saved_draft_restores_bit_exactly(tmp_path, target, vocab):
    config = tiny_draft(vocab)
    params = init_from_target(random_params(TARGET.replace(num_layers=3), jax.random.key(2)),
                              TARGET.replace(num_layers=3), config, vocab, [2])
    save_draft(tmp_path / "d", config, params, vocab, {"note": "test"})
    loaded = load_draft(tmp_path / "d")
    assert loaded.config == config
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded.params)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(loaded.params)
    np.testing.assert_array_equal(loaded.vocab.draft_to_target, vocab.draft_to_target)
    np.testing.assert_array_equal(loaded.vocab.target_to_draft, vocab.target_to_draft)
    # The loaded draft runs on target ids, its inputs mapped through the saved input map.
    tokens = jnp.asarray([[1, 200, 7, 255]], jnp.int32)
    meta = AttentionMetadata(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1,), jnp.int32), causal_mask(1, 4))
    logits = draft_forward(loaded, tokens, jnp.arange(4)[None], None, meta).logits
    np.testing.assert_array_equal(logits, full_forward(params, config, jnp.asarray(vocab.draft_inputs(tokens))))


# ---------------------------------------------------------------------------- teacher cache
def test_teacher_cache_holds_the_top_k_and_resumes_identically(tmp_path, target, windows, corpus):
    logprobs = jax.nn.log_softmax(full_forward(target, TARGET, jnp.asarray(windows[:4])), -1)
    best = np.argsort(-np.asarray(logprobs), axis=-1)[..., :K]
    np.testing.assert_array_equal(corpus.cache.ids[:4], best)
    np.testing.assert_allclose(corpus.cache.logprobs[:4], np.take_along_axis(np.asarray(logprobs), best, -1),
                               atol=2e-2, rtol=1e-3)
    # Stop after the first batch, then finish: the same bytes as one uninterrupted build.
    partial = build_teacher_cache(target, TARGET, windows, tmp_path, k=K, batch_size=4, max_seconds=0,
                                  progress=False)
    assert partial.rows_done == 4 and not partial.complete
    resumed = build_teacher_cache(target, TARGET, windows, tmp_path, k=K, batch_size=4, progress=False)
    assert resumed.complete
    np.testing.assert_array_equal(resumed.ids, corpus.cache.ids)
    np.testing.assert_array_equal(resumed.logprobs, corpus.cache.logprobs)
    with pytest.raises(ValueError, match="other data"):
        open_cache(tmp_path, windows[::-1], k=K)


# ---------------------------------------------------------------------------- training
def test_distillation_step_reduces_kl_on_a_fixed_batch(vocab, corpus):
    config = tiny_draft(vocab)
    params = random_params(config, jax.random.key(3))
    settings = TrainSettings(text_steps=20, batch_size=8, learning_rate=1e-2, warmup_steps=1)
    optimizer = make_optimizer(settings)
    step = make_train_step(config, vocab, optimizer)
    batch = {k: jnp.asarray(v) for k, v in batch_arrays(corpus, np.arange(8)).items()}
    evaluate = jax.jit(lambda p: distill_loss(p, config, vocab, batch)[0])
    losses = [float(evaluate(params))]
    opt_state = optimizer.init(params)
    for _ in range(settings.text_steps):
        params, opt_state, _, _ = step(params, opt_state, batch)
        losses.append(float(evaluate(params)))
    assert losses[2] < losses[1] < losses[0] or losses[2] < losses[1] == losses[0]  # step 0 has lr 0 (warmup)
    assert losses[-1] < 0.5 * losses[0], losses


def test_kl_is_zero_when_the_draft_is_the_teacher(target, vocab, corpus):
    # A draft with every target token and the target's weights reproduces the teacher exactly.
    everything = DraftVocab(np.arange(TARGET.vocab_size, dtype=np.int32), np.arange(TARGET.vocab_size, dtype=np.int32))
    batch = {k: jnp.asarray(v) for k, v in batch_arrays(corpus, np.arange(4)).items()}
    config = draft_config(TARGET, everything, TARGET.num_layers)
    params = init_from_target(target, TARGET, config, everything, range(TARGET.num_layers))
    loss, metrics = distill_loss(params, config, everything, batch)
    assert abs(float(loss)) < 2e-3 and float(metrics["agree"]) == 1.0


def test_resume_continues_exactly(tmp_path, target, vocab, corpus, windows):
    config = tiny_draft(vocab)
    init = random_params(config, jax.random.key(4))
    # Text steps then generation steps, so a resume crosses a phase boundary too.
    gen = Corpus("gen", windows[::-1].copy(), corpus.cache)
    settings = TrainSettings(text_steps=4, gen_steps=3, batch_size=4, learning_rate=1e-3, warmup_steps=2,
                             save_every=2)
    whole = train(tmp_path / "whole", config, vocab, init, settings, corpus, gen, progress=False)
    train(tmp_path / "killed", config, vocab, init, settings, corpus, gen, stop_at=5, progress=False)
    with pytest.raises(SystemExit, match="--resume"):
        train(tmp_path / "killed", config, vocab, init, settings, corpus, gen, progress=False)
    resumed = train(tmp_path / "killed", config, vocab, init, settings, corpus, gen, resume=True, progress=False)
    log_whole, log_resumed = read_log(tmp_path / "whole"), read_log(tmp_path / "killed")
    assert sorted(log_whole) == sorted(log_resumed) == list(range(7))
    assert [log_whole[s]["loss"] for s in range(7)] == [log_resumed[s]["loss"] for s in range(7)]
    assert [log_whole[s]["corpus"] for s in range(7)] == ["text"] * 4 + ["gen"] * 3
    for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_boost_weights_mark_where_draft_a_misses(tmp_path, vocab, corpus):
    config = tiny_draft(vocab)
    draft_a = (config, random_params(config, jax.random.key(5)), vocab)
    weights = boost_weights(tmp_path / "boost.npy", corpus, draft_a, 4.0, batch_size=4)
    logits = full_forward(draft_a[1], config, jnp.asarray(vocab.draft_inputs(corpus.windows)))
    misses = vocab.target_ids(np.asarray(jnp.argmax(logits, -1))) != corpus.cache.ids[..., 0]
    np.testing.assert_array_equal(weights, np.where(misses, 4.0, 1.0))
    assert (tmp_path / "boost.npy").is_file()


# ---------------------------------------------------------------------------- data
def test_batches_are_a_function_of_seed_and_step():
    epoch = np.concatenate([data.batch_rows(10, 3, s, seed=7) for s in range(3)])
    assert len(set(epoch.tolist())) == 9  # no row twice within an epoch
    np.testing.assert_array_equal(data.batch_rows(10, 3, 4, seed=7), data.batch_rows(10, 3, 4, seed=7))
    assert not np.array_equal(data.batch_rows(10, 3, 0, seed=7), data.batch_rows(10, 3, 3, seed=7))


def test_pack_windows_joins_documents_with_separators():
    windows = data.pack_windows([[5, 6, 7], [8], [9, 10, 11, 12]], seq_len=4, separator_id=0)
    np.testing.assert_array_equal(windows, [[5, 6, 7, 0], [8, 0, 9, 10]])


def _venv_python(tmp_path: Path) -> Path:
    """A fresh venv's interpreter that sees this environment's packages as a new user's venv sees its
    own: through a site-packages outside the stdlib root, setuptools' ``distutils`` shim included."""
    venv.create(tmp_path / "venv", with_pip=False)
    (site_packages,) = (tmp_path / "venv").glob("lib/python*/site-packages")
    adds = "; ".join(f"site.addsitedir({d!r})" for d in site.getsitepackages())
    (site_packages / "this_environment.pth").write_text(f"import site; {adds}\n")
    return tmp_path / "venv" / "bin" / "python"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _stdlib_files_by_hash() -> dict[str, list[Path]]:
    """Every readable .py file under the stdlib root, by the hash of its text; site-packages left out."""
    root = Path(sysconfig.get_path("stdlib"))
    found: dict[str, list[Path]] = {}
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "dist-packages")]
        for path in (Path(directory, name) for name in files if name.endswith(".py")):
            try:
                with tokenize.open(path) as f:
                    found.setdefault(_sha256(f.read()), []).append(path.relative_to(root))
            except (SyntaxError, UnicodeDecodeError):  # test data with broken encodings
                continue
    return found


def test_installed_training_reads_only_training_side_stdlib_files_in_a_venv(tmp_path):
    """Run as an installed package (no checkout on the path) in a venv, where the import system resolves
    ``distutils`` to setuptools' copy outside the stdlib root, training reads what a checkout reads:
    the source of training-side stdlib files (and pydoc's topics), nothing from site-packages."""
    report = ("import hashlib, json; from training import data; texts, source = data.stdlib_texts(); "
              "print(json.dumps([source, [hashlib.sha256(t.encode()).hexdigest() for t in texts]]))")
    run = subprocess.run([_venv_python(tmp_path), "-I", "-c", report], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    source, installed = json.loads(run.stdout)
    texts, checkout_source = data.stdlib_texts()
    assert (source, installed) == (checkout_source, [_sha256(t) for t in texts])
    files = _stdlib_files_by_hash()
    topics = {_sha256(t) for t in pydoc_data.topics.topics.values()}
    assert len(installed) > 300
    for digest in installed:
        tops = [path.parts[0].removesuffix(".py") for path in files.get(digest, [])]
        assert any(not is_heldout("stdlib", top) for top in tops) or digest in topics


def test_generations_are_made_once(tmp_path):
    class FakeLLM:
        calls = 0

        def generate(self, prompts, params):
            FakeLLM.calls += 1
            return [type("Out", (), {"prompt_token_ids": [1, 2], "token_ids": [3, 4, len(prompts)]})()
                    for _ in prompts]

    first = data.generate_continuations(FakeLLM(), ["a", "b", "c"], tmp_path, chunk=2)
    assert FakeLLM.calls == 2 and [s.tolist() for s in first] == [[1, 2, 3, 4, 2]] * 2 + [[1, 2, 3, 4, 1]]
    again = data.generate_continuations(lambda: pytest.fail("must not rebuild the LLM"), ["a", "b", "c"], tmp_path,
                                        chunk=2)
    assert [s.tolist() for s in again] == [s.tolist() for s in first]


def test_chat_prompts_take_first_user_turns():
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
             [{"role": "assistant", "content": "x"}, {"role": "user", "content": "q"}]]
    prompts = data.chat_prompts(convs, 5, seed=0)
    assert sorted(p[0]["content"] for p in prompts) == ["hi", "q"]
    assert data.normalize_messages([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                    {"from": "gpt", "value": " "}]) == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


def test_train_settings_round_trip():
    settings = TrainSettings(text_steps=3, gen_steps=2)
    assert settings.total_steps == 5 and dataclasses.asdict(settings)["batch_size"] == 16
