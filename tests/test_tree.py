"""Token trees: construction, validation, masks, device trees, merging; greedy tree verification is lossless."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.acceptance import greedy_continuation
from specjax.config import ModelConfig
from specjax.params import random_params
from specjax.runner import EngineConfig, ModelRunner, StepInput
from specjax.speculation.merge import merge_trees
from specjax.speculation.tree import TokenTree, TreeError, device_ancestor_mask, stack_trees, tree_bucket
from specjax.speculation.tree_draft import DraftTree, TreeShape

TARGET = ModelConfig(vocab_size=101, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=12, max_position_embeddings=512)


def test_tree_arrays_masks_and_paths():
    #        root(7)
    #       /       \
    #     a(1)      b(2)
    #    /   \        \
    #  c(3)  d(4)     e(5)
    tree = TokenTree.build(7, tokens=[1, 2, 3, 4, 5], parents=[0, 0, 1, 1, 2])
    assert tree.size == 8 and tree.num_nodes == 6  # the smallest bucket that holds 6
    np.testing.assert_array_equal(tree.depths[:6], [0, 1, 1, 2, 2, 2])
    mask = tree.ancestor_mask
    np.testing.assert_array_equal(np.nonzero(mask[4])[0], [0, 1, 4])
    np.testing.assert_array_equal(np.nonzero(mask[5])[0], [0, 2, 5])
    assert mask[7].sum() == 1 and mask[7, 7]  # padding sees only itself
    assert sorted(tree.paths()) == [[1, 3], [1, 4], [2, 5]]
    assert tree.pretty().splitlines()[0] == "[0] 7" and "    [3] 3" in tree.pretty()
    assert "paths=3" in repr(tree)


def test_device_trees_read_back_and_masks_agree():
    tree = TokenTree.build(7, tokens=[1, 2, 3, 4, 5, 6], parents=[0, 0, 1, 1, 2, 5])
    mask = device_ancestor_mask(jnp.asarray(tree.parents[None]), jnp.asarray(stack_trees([tree])["live"]), 6)
    np.testing.assert_array_equal(np.asarray(mask[0]), tree.ancestor_mask)
    # The same tree with dead nodes strewn in: node 2 (token 9) and its child are dead.
    tokens, parents = [7, 1, 9, 2, 3, 8, 4, 5, 6], [-1, 0, 0, 0, 1, 2, 1, 3, 7]
    live = [True, True, False, True, True, False, True, True, True]
    read = TokenTree.from_arrays(tokens, parents, live)
    assert sorted(read.paths()) == sorted(tree.paths())
    with pytest.raises(TreeError, match="dead or missing parent"):
        TokenTree.from_arrays(tokens, parents, [True, True, False] + [True] * 6)  # 8 under the dead 9


def test_tree_shapes_count_their_nodes():
    specinfer = TreeShape((1, 1, 3, 1, 1, 1, 1, 1))
    assert specinfer.level_sizes == (1, 1, 1, 3, 3, 3, 3, 3, 3) and specinfer.num_nodes == 21
    assert specinfer.num_fed == 1 + 1 + 3 * 5 and specinfer.samples
    beam = TreeShape((4, 4, 4), beam=2, budget=10)
    assert beam.level_sizes == (1, 4, 8, 8) and beam.num_nodes == 10 and not beam.samples
    assert TreeShape(()).num_nodes == 1
    with pytest.raises(ValueError, match="positive integers"):
        TreeShape((2, 0))
    with pytest.raises(ValueError, match="budget 30 exceeds"):
        TreeShape((2, 2), budget=30)


def _draft_tree(tokens, parents, live):
    """A DraftTree of one row from lists (the fields merging does not read are placeholders)."""
    n = len(tokens)

    def row(x, dtype):
        return jnp.asarray([x], dtype)

    return DraftTree(tokens=row(tokens, jnp.int32), parents=row(parents, jnp.int32), depths=row(
        TokenTree.build(tokens[0], tokens[1:], [max(p, 0) for p in parents[1:]]).depths[:n], jnp.int32),
        live=row(live, bool), scratch=jnp.full((1, n), -1, jnp.int32), logq=jnp.zeros((1, n)),
        q_logits=None, length=jnp.zeros(1, jnp.int32))


def test_merged_trees_keep_every_sequence_and_share_prefixes():
    """SpecInfer Def. 3.2: every token sequence of every draft's tree is in the merged tree, and
    sequences with a common prefix share its nodes."""
    a = _draft_tree([7, 1, 2, 3, 4, 9], [-1, 0, 0, 1, 1, 2], [True] * 5 + [False])  # 9 is dead
    b = _draft_tree([7, 1, 5, 3, 6], [-1, 0, 0, 1, 2], [True] * 5)  # 1 -> 3 repeats a's path
    merged = merge_trees([a, b], size=16, max_depth=3)
    tree = TokenTree.from_arrays(merged.tokens[0], merged.parents[0], merged.live[0])
    assert sorted(tree.paths()) == [[1, 3], [1, 4], [2], [5, 6]]
    assert tree.num_nodes == 7  # root, 1, 2, 3, 4, 5, 6: b's 1 and 1 -> 3 were shared
    np.testing.assert_array_equal(np.asarray(merged.mask[0]), device_ancestor_mask(
        merged.parents, merged.live, 3)[0])
    # Every proposal still points at the merged node it became and the node it hangs under.
    canon, under = np.asarray(merged.canon[0]), np.asarray(merged.under[0])
    assert canon[6] == 1 and canon[8] == 3 and under[8] == 1  # b's nodes 1 and 3 sit at 6 and 8
    assert list(np.asarray(merged.draft[0, :10])) == [-1, 0, 0, 0, 0, 0, 1, 1, 1, 1]


def test_bad_trees_are_rejected():
    with pytest.raises(TreeError, match="parent"):
        TokenTree.build(0, tokens=[1, 2], parents=[0, 2])  # a node cannot be its own parent
    with pytest.raises(TreeError, match="tokens but"):
        TokenTree.build(0, tokens=[1, 2], parents=[0])
    with pytest.raises(ValueError, match="at most 128"):
        tree_bucket(129)
    with pytest.raises(TreeError, match="share a size"):
        stack_trees([TokenTree.chain(0, [1]), TokenTree.chain(0, [1] * 20)])


def _random_tree(rng, root, truth, vocab):
    """A tree whose first branch follows ``truth`` for a random number of levels, with decoy siblings
    and random subtrees hanging off it."""
    tokens, parents = [], []
    correct = int(rng.integers(0, len(truth) + 1))
    node = 0
    for level in range(correct):
        for _ in range(int(rng.integers(0, 3))):  # decoys beside the true token
            tokens.append(int(rng.integers(0, vocab)))
            parents.append(node)
        tokens.append(truth[level])
        parents.append(node)
        node = len(tokens)
    for _ in range(int(rng.integers(0, 6))):  # random growth anywhere
        parents.append(int(rng.integers(0, len(tokens) + 1)))
        tokens.append(int(rng.integers(0, vocab)))
    return TokenTree.build(root, tokens, parents)


def test_greedy_tree_verification_equals_plain_greedy_decoding():
    params = random_params(TARGET, jax.random.key(0), scale=0.3)
    engine = EngineConfig(page_size=4, kv_cache_bytes=1 << 20)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, TARGET.vocab_size, n).tolist() for n in (6, 17)]
    plain = ModelRunner(TARGET, params, engine)
    expected = [greedy_continuation(plain, i, p, 40) for i, p in enumerate(prompts)]

    runner = ModelRunner(TARGET, params, engine)
    outputs, accepted = [], 0
    for i, prompt in enumerate(prompts):
        runner.add_sequence(i, len(prompt) + 40 + 16)
    first, _ = runner.step([StepInput(i, p) for i, p in enumerate(prompts)])
    outputs = [[int(t)] for t in first]
    while min(len(o) for o in outputs) < 40:
        trees = [_random_tree(rng, o[-1], expected[i][len(o): len(o) + 4], TARGET.vocab_size)
                 for i, o in enumerate(outputs)]
        trees = [TokenTree.build(int(t.tokens[0]), t.tokens[1:t.num_nodes], t.parents[1:t.num_nodes], 32)
                 for t in trees]  # one size for the batch
        new_tokens, _ = runner.verify(list(range(len(prompts))), trees)
        for out, new in zip(outputs, new_tokens):
            out.extend(new)
            accepted += len(new) - 1
        for i, out in enumerate(outputs):
            assert runner.pages.length(i) == len(prompts[i]) + len(out) - 1  # all but the newest are cached
    for out, want in zip(outputs, expected):
        assert out[:40] == want
    assert accepted > 10  # the trees did get tokens accepted
