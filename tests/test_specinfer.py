"""SpecInfer steps as pure functions: greedy output equals plain greedy decoding for chains,
expansion trees, merged and degenerate trees; multi-step speculative sampling follows the target's
distribution exactly; tree verification equals decoding each path; the caches after every step
are what plain decoding builds; the documented jitted loop runs."""

import doctest
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax.attention import AttentionMetadata, causal_mask
from specjax.config import ModelConfig
from specjax.model import forward
from specjax.params import random_params
from specjax.runner import EngineConfig, ModelRunner, StepInput
from specjax.sampling import process_logits
from specjax.speculation import specinfer
from specjax.speculation.specinfer import SpecInfer, init_state, step, verify_tree
from specjax.speculation.tree import TokenTree, stack_trees
from specjax.speculation.tree_draft import DraftModel, TreeShape

TARGET = ModelConfig(vocab_size=101, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=12, max_position_embeddings=512)
SMALL = TARGET.replace(num_layers=1)
NEW_TOKENS = 24
PAGE = 4  # small pages: every sequence and every draft scratch crosses page boundaries
# Module-level jits, so every test with the same SpecInfer and shapes shares one compilation.
INIT = jax.jit(init_state, static_argnums=0, static_argnames=("max_new_tokens", "page_size"))
STEP = jax.jit(step, static_argnums=0, static_argnames="all_greedy")


def _no_mask_meta(b, t):
    return AttentionMetadata(block_tables=jnp.zeros((b, 0), jnp.int32), context_lens=jnp.zeros((b,), jnp.int32),
                             new_mask=causal_mask(b, t))


@functools.partial(jax.jit, static_argnames=("config", "steps"))
def reference_greedy(params, tokens, lengths, *, config, steps):
    """Greedy continuations [B, steps] by re-running the whole sequence per token: no cache, no trees."""
    b, width = tokens.shape
    buffer = jnp.zeros((b, width + steps), jnp.int32).at[:, :width].set(tokens)
    positions = jnp.broadcast_to(jnp.arange(width + steps), buffer.shape)

    def next_token(i, buffer):
        logits = forward(params, config, buffer, positions, None, _no_mask_meta(b, width + steps),
                               logit_indices=(lengths + i - 1)[:, None]).logits
        return buffer.at[jnp.arange(b), lengths + i].set(jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32))

    buffer = jax.lax.fori_loop(0, steps, next_token, buffer)
    return jnp.take_along_axis(buffer, lengths[:, None] + jnp.arange(steps), 1)


@pytest.fixture(scope="module")
def targets():
    """Two random targets of one shape: one compiled step serves both."""
    return [random_params(TARGET, jax.random.key(seed), scale=0.3) for seed in (0, 1)]


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    lengths = np.array([3, 7, 12, 5, 9, 1], np.int32)
    tokens = np.zeros((len(lengths), lengths.max()), np.int32)
    for row, n in enumerate(lengths):
        tokens[row, :n] = rng.integers(0, TARGET.vocab_size, n)
    return jnp.asarray(tokens), jnp.asarray(lengths)


@pytest.fixture(scope="module")
def expected(targets, prompts):
    return [np.asarray(reference_greedy(t, *prompts, config=TARGET, steps=NEW_TOKENS)) for t in targets]


def _generate(spec, target, drafts, prompts, temperature=None, max_new_tokens=NEW_TOKENS, all_greedy=False,
              **sampling):
    """Speculative generation to every row's limit; returns the final state and each step's result."""
    state = INIT(spec, target, drafts, *prompts, max_new_tokens=max_new_tokens, page_size=PAGE,
                 temperature=temperature, **sampling)
    results = []
    while bool(jnp.any(state.length < state.limit)):
        active = np.asarray(state.length < state.limit)
        state, result = STEP(spec, state, target, drafts, all_greedy=all_greedy)
        results.append((active, jax.tree_util.tree_map(np.asarray, result)))
    return state, results


def _rolled_head(params):
    """The target with its output columns shifted by one: its argmax is always the target's plus one."""
    return params.__class__(embed=params.embed, layers=params.layers, final_norm=params.final_norm,
                            lm_head=jnp.roll(params.lm_head, 1, axis=1))


def _reduced_vocab_draft(seed):
    """A one-layer draft predicting 64 of the target's 101 tokens; the others are fed as its id 0."""
    d2t = np.sort(np.random.default_rng(seed).choice(TARGET.vocab_size, 64, replace=False)).astype(np.int32)
    t2d = np.zeros(TARGET.vocab_size, np.int32)
    t2d[d2t] = np.arange(64)
    config = SMALL.replace(vocab_size=64)
    return config, DraftModel(random_params(config, jax.random.key(seed), scale=0.3), jnp.asarray(d2t), jnp.asarray(t2d))


def _same_vocab(params):
    return DraftModel.same_vocab(params, TARGET.vocab_size)


CASES = {
    # name: (draft configs, shapes, drafts from the target's params, what acceptance must look like)
    "chain, random draft": ((TARGET,), (TreeShape((1, 1, 1)),),
                            lambda t: (_same_vocab(random_params(TARGET, jax.random.key(9), scale=0.3)),), None),
    "chain, all rejected": ((TARGET,), (TreeShape((1, 1, 1)),), lambda t: (_same_vocab(_rolled_head(t)),), "none"),
    "chain, all accepted": ((TARGET,), (TreeShape((1, 1, 1)),), lambda t: (_same_vocab(t),), "all"),
    "expansion tree, reduced vocabulary": ((_reduced_vocab_draft(3)[0],), (TreeShape((2, 2, 1)),),
                                           lambda t: (_reduced_vocab_draft(3)[1],), None),
    "one-node tree": ((SMALL,), (TreeShape(()),),
                      lambda t: (_same_vocab(random_params(SMALL, jax.random.key(5), scale=0.3)),), "none"),
    "merged: expansion + dynamic": (
        (TARGET, SMALL), (TreeShape((2, 2, 1)), TreeShape((3, 3), beam=2, budget=6)),
        lambda t: (_same_vocab(jax.tree_util.tree_map(
            lambda w: w + 0.05 * jax.random.normal(jax.random.key(2), w.shape), t)),
                   _same_vocab(random_params(SMALL, jax.random.key(4), scale=0.3))), "some"),
}


@pytest.mark.parametrize("case", CASES)
def test_greedy_speculation_equals_plain_greedy(case, targets, prompts, expected):
    configs, shapes, make_drafts, acceptance = CASES[case]
    spec = SpecInfer(TARGET, configs, shapes)
    # Row 2 samples in the mixed runs: the batch then goes through multi-step speculative
    # sampling, where the greedy rows must still come out exactly greedy.
    mixed = jnp.zeros(len(prompts[1]), jnp.float32).at[2].set(0.9)
    greedy_rows = [r for r in range(len(prompts[1])) if r != 2]
    accepted = []
    for target, want in zip(targets, expected):
        drafts = make_drafts(target)
        # The all-greedy step (no draft distributions, no sampling) must do what the general one does.
        for temperature, all_greedy in ((None, False), (None, True), (mixed, False)):
            state, results = _generate(spec, target, drafts, prompts, temperature, all_greedy=all_greedy)
            tokens = np.asarray(state.tokens)
            rows = range(len(want)) if temperature is None else greedy_rows
            for row in rows:
                start = int(prompts[1][row])
                np.testing.assert_array_equal(tokens[row, start:start + NEW_TOKENS], want[row], err_msg=f"row {row}")
            greedy = np.isin(np.arange(len(want)), list(rows))
            accepted += [int(a) for active, result in results for a in result.accepted[active & greedy]]
            for active, result in results:
                assert np.all(result.count[active] == result.accepted[active] + 1)
                assert np.all(result.depth[active] <= spec.depth)
    if acceptance == "none":
        assert max(accepted) == 0
    elif acceptance == "all":
        assert min(accepted) == spec.depth
    elif acceptance == "some":
        assert 0 < np.mean(accepted) < spec.depth


def test_caches_after_each_step_hold_exactly_the_accepted_tokens(targets, prompts):
    """After every step, each row's target cache holds the K/V plain decoding would have built for
    the committed tokens and nothing past them (rejected nodes are never written); each draft's
    cache holds its committed tokens' K/V, the accepted tree nodes moved to their final positions."""
    configs, shapes, make_drafts, _ = CASES["merged: expansion + dynamic"]
    spec = SpecInfer(TARGET, configs, shapes)
    target = targets[0]
    drafts = make_drafts(target)
    state = INIT(spec, target, drafts, *prompts, max_new_tokens=NEW_TOKENS, page_size=PAGE)
    kv = jax.jit(lambda params, config, tokens: forward(params, config, tokens,
                                                        jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape),
                                                        None, _no_mask_meta(*tokens.shape)).new_k, static_argnums=1)

    def cached(cache, blocks, row):  # [L, positions, Hkv, hd] of one row's pages, in position order
        return np.asarray(cache.k[:, blocks[row]]).reshape(cache.k.shape[0], -1, *cache.k.shape[3:])

    moved = 0
    while bool(jnp.any(state.length < state.limit)):
        state, result = STEP(spec, state, target, drafts)
        moved += int(np.sum(np.asarray(result.accepted)))
        want_k = kv(target, TARGET, state.tokens)
        for row in range(len(prompts[1])):
            committed = int(state.length[row]) - 1
            got = cached(state.target_cache, state.target_blocks, row)
            np.testing.assert_allclose(got[:, :committed], np.asarray(want_k)[:, row, :committed], atol=1e-4)
            if state.length[row] < state.limit[row]:  # a finished row's last step may pass its limit
                assert not np.any(got[:, committed:]), f"row {row}: K/V past the committed tokens"
        for config, draft, cache, blocks, lengths in zip(configs, drafts, state.draft_caches, state.draft_blocks,
                                                         state.draft_lengths):
            draft_k = kv(draft.params, config, draft.target_to_draft[state.tokens])
            for row in range(len(prompts[1])):
                n = min(int(lengths[row]), int(state.length[row]) - 1)  # finished rows: the tokens kept
                assert n == int(lengths[row]) or state.length[row] == state.limit[row]
                np.testing.assert_allclose(cached(cache, blocks, row)[:, :n], np.asarray(draft_k)[:, row, :n],
                                           atol=1e-4)
    assert moved > 0


def test_tree_verification_logits_equal_decoding_each_path(targets):
    """Every node's logits from the one-pass tree verification equal the logits of its path run
    as an ordinary sequence after the prompt."""
    rng = np.random.default_rng(1)
    target = targets[1]
    runner = ModelRunner(TARGET, target, EngineConfig(page_size=PAGE, kv_cache_bytes=1 << 20))
    prompt = rng.integers(0, TARGET.vocab_size, 10).tolist()
    runner.add_sequence("s", 64)
    runner.step([StepInput("s", prompt[:-1])])  # the last prompt token is the tree's root
    parents = [0] + [int(rng.integers(0, i)) for i in range(2, 31)]
    tree = TokenTree.build(prompt[-1], rng.integers(0, TARGET.vocab_size, 30).tolist(), parents)
    arrays = stack_trees([tree])
    logits = jax.jit(verify_tree, static_argnums=0)(
        TARGET, target, runner.cache, jnp.asarray(runner.pages.block_table(["s"], 16)), jnp.array([len(prompt) - 1]),
        jnp.asarray(arrays["tokens"]), jnp.asarray(arrays["depths"]), jnp.asarray(arrays["mask"])).logits

    paths = []
    for node in range(tree.num_nodes):  # the prompt, then the node's ancestors and itself
        path, i = [], node
        while i > 0:
            path.append(int(tree.tokens[i]))
            i = int(tree.parents[i])
        paths.append(prompt + path[::-1])
    width = max(map(len, paths))
    sequences = jnp.asarray([p + [0] * (width - len(p)) for p in paths])
    want = forward(target, TARGET, sequences, jnp.broadcast_to(jnp.arange(width), sequences.shape), None,
                         _no_mask_meta(*sequences.shape), logit_indices=jnp.asarray([[len(p) - 1] for p in paths])).logits
    np.testing.assert_allclose(np.asarray(logits)[0, : tree.num_nodes], np.asarray(want)[:, 0], atol=1e-4)


# ---------------------------------------------------------------------------- stochastic acceptance
SMALL_VOCAB = ModelConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                          num_kv_heads=1, head_dim=8, max_position_embeddings=64)


def _chi_square_p(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's test, cells with fewer than 5 expected pooled; the p-value from the chi-square tail."""
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    statistic = float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]))
    dof = int(keep.sum()) - 1
    return float(jax.scipy.special.gammaincc(dof / 2, statistic / 2))


def _exact_distribution(params, prompt, length, temperature, top_k, top_p):
    """P(first ``length`` generated tokens) under the target's processed distribution, for every sequence."""
    vocab = SMALL_VOCAB.vocab_size
    prefixes = np.array(list(itertools.product(range(vocab), repeat=length - 1)), np.int32).reshape(-1, length - 1)
    sequences = np.concatenate([np.tile(prompt, (len(prefixes), 1)), prefixes], axis=1)
    b, t = sequences.shape
    logits = forward(params, SMALL_VOCAB, jnp.asarray(sequences), jnp.broadcast_to(jnp.arange(t), (b, t)), None,
                           _no_mask_meta(b, t)).logits
    logits = logits[:, len(prompt) - 1:].reshape(-1, vocab)
    rows = logits.shape[0]
    probs = np.asarray(jax.nn.softmax(process_logits(logits, jnp.full(rows, temperature), jnp.full(rows, top_k, jnp.int32),
                                                     jnp.full(rows, top_p)), axis=-1)).reshape(b, length, vocab)
    joint = np.ones((len(prefixes), vocab))
    for i in range(length - 1):
        joint *= probs[np.arange(len(prefixes)), i, prefixes[:, i]][:, None]
    return (joint * probs[:, -1]).reshape(-1)  # index: the sequence read as a base-V number


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 4, 0.8)])
def test_multi_step_speculative_sampling_follows_the_target_exactly(temperature, top_k, top_p):
    """The first three generated tokens over 4096 seeds against the target's exact joint
    distribution. The drafts differ from the target (so proposals get rejected): one samples
    three children then two without replacement, the other proposes deterministically
    (a budgeted tree), and their merged trees share nodes. Skipping the residual update, or
    treating siblings drawn without replacement as independent draws, fails this by far."""
    rows, length, prompt = 4096, 3, [1, 2, 3]
    target = random_params(SMALL_VOCAB, jax.random.key(0), scale=0.3)
    drafts = tuple(DraftModel.same_vocab(random_params(SMALL_VOCAB, jax.random.key(s), scale=0.3), 6) for s in (5, 6))
    spec = SpecInfer(SMALL_VOCAB, (SMALL_VOCAB,) * 2, (TreeShape((3, 2)), TreeShape((2, 2), budget=4)))
    prompts = (jnp.asarray([prompt] * rows), jnp.full(rows, len(prompt)))
    state, results = _generate(spec, target, drafts, prompts, jnp.full(rows, temperature), max_new_tokens=length,
                               top_k=jnp.full(rows, top_k), top_p=jnp.full(rows, top_p), seeds=jnp.arange(rows))
    assert np.all(np.asarray(state.length) == len(prompt) + length)
    accepted = np.concatenate([r.accepted[a] for a, r in results])
    assert 0 < accepted.mean() < 2  # proposals were accepted and rejected

    exact = _exact_distribution(target, prompt, length, temperature, top_k, top_p)
    sequences = np.asarray(state.tokens[:, len(prompt): len(prompt) + length])
    observed = np.bincount(sequences @ (6 ** np.arange(length)[::-1]), minlength=exact.size)
    assert observed[exact == 0].sum() == 0  # never a token the target's filters exclude
    assert _chi_square_p(observed, exact * rows) > 1e-3


def test_host_trees_sampled_through_the_runner_follow_the_target_exactly():
    """Trees proposed on the host (point-mass proposals, as a suffix cache makes) verified by
    ``ModelRunner.verify`` at temperature 1: the first two tokens after the root, over 4096 keys,
    against the target's exact joint distribution. Rows whose whole tree was rejected get their
    second token from a plain sampled step."""
    rows, batch, prompt, root = 4096, 512, [1, 2, 3], 4
    params = random_params(SMALL_VOCAB, jax.random.key(0), scale=0.3)
    runner = ModelRunner(SMALL_VOCAB, params, EngineConfig(page_size=8, max_num_seqs=batch, kv_cache_bytes=1 << 20))
    exact = _exact_distribution(params, prompt + [root], 2, 1.0, 0, 1.0)
    joint = exact.reshape(6, 6)
    # Two children of the root (each with children of its own), the target's likeliest, so that
    # proposals are both accepted and rejected whatever the random weights.
    a, b = np.argsort(-joint.sum(axis=1))[:2]
    c, d = np.argsort(-joint[a])[:2]
    tree = TokenTree.build(root, [a, b, c, d, int(np.argmax(joint[b]))], [0, 0, 1, 1, 2], size=8)
    firsts = []
    for start in range(0, rows, batch):
        ids = list(range(start, start + batch))
        keys = [np.asarray(jax.random.key_data(jax.random.key(i)), np.uint32) for i in ids]
        for i in ids:
            runner.add_sequence(i, 16)
        runner.step([StepInput(i, prompt) for i in ids])
        sampling = [StepInput(i, [], temperature=1.0, base_key=k, sample_index=0) for i, k in zip(ids, keys)]
        new_tokens, _ = runner.verify(ids, [tree] * batch, sampling)
        short = [row for row, new in enumerate(new_tokens) if len(new) == 1]
        if short:
            second, _ = runner.step([StepInput(ids[r], new_tokens[r], temperature=1.0, base_key=keys[r],
                                               sample_index=1) for r in short])
            for r, token in zip(short, second):
                new_tokens[r] = new_tokens[r] + [int(token)]
        firsts += [new[:2] for new in new_tokens]
        for i in ids:
            runner.release(i)
    sequences = np.array(firsts)
    observed = np.bincount(sequences @ np.array([6, 1]), minlength=exact.size)
    assert 0.05 < np.isin(sequences[:, 0], [a, b]).mean() < 0.95  # proposals were accepted and rejected
    assert _chi_square_p(observed, exact * rows) > 1e-3


@pytest.mark.parametrize("top_k", [0, 3, 40, 70])
def test_draft_distributions_on_draft_ids_widen_to_those_on_target_ids(top_k):
    """Drafts process their logits on their own ids; widened to the target's ids, that is the
    distribution processing the widened logits gives (top-k past the draft's vocabulary included)."""
    _, draft = _reduced_vocab_draft(3)
    rows = 64
    logits = 3 * jax.random.normal(jax.random.key(0), (rows, 64))
    temperature = jax.random.uniform(jax.random.key(1), (rows,), minval=0.3, maxval=1.5).at[:4].set(0.0)
    top_p = jax.random.uniform(jax.random.key(2), (rows,), minval=0.5, maxval=1.0).at[4:8].set(1.0)
    settings = (temperature, jnp.full(rows, top_k, jnp.int32), top_p)
    on_draft_ids = draft.on_target_ids(process_logits(logits, *settings))
    on_target_ids = process_logits(draft.on_target_ids(logits), *settings)
    np.testing.assert_array_equal(np.isfinite(on_draft_ids), np.isfinite(on_target_ids))
    np.testing.assert_allclose(jax.nn.softmax(on_draft_ids), jax.nn.softmax(on_target_ids), atol=1e-6)


def test_the_documented_jitted_loop_runs():
    results = doctest.testmod(specinfer, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 5 and results.failed == 0
