"""One SpecInfer step as pure, jit-able functions: draft trees, merge, verify in one target pass,
accept (greedy or multi-step speculative sampling), commit K/V.

Two ways in:

* ``speculative_step(spec, target_params, drafts, target_cache, draft_caches, batch)``: arrays in,
  arrays out. The engine behind ``LLM`` (``speculator.TreeSpeculator``) fills a ``StepBatch`` from
  its page tables and runs it compiled per shape bucket.
* ``init_state`` and ``step`` over a ``SpecState`` pytree (a token buffer, caches with fixed pages
  per row, sampling settings, keys) for your own jitted loops. The whole generation can be one
  ``lax.while_loop``:

>>> import jax, jax.numpy as jnp
>>> from specjax.config import ModelConfig
>>> from specjax.params import random_params
>>> from specjax.speculation.specinfer import SpecInfer, init_state, step
>>> from specjax.speculation.tree_draft import DraftModel, TreeShape
>>> target_config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
...                             num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256)
>>> draft_config = target_config.replace(num_layers=1)
>>> target = random_params(target_config, jax.random.key(0), scale=0.3)
>>> drafts = (DraftModel.same_vocab(random_params(draft_config, jax.random.key(1), scale=0.3), 64),)
>>> spec = SpecInfer(target_config, (draft_config,), (TreeShape(expansion=(2, 2, 1)),))
>>> prompts, prompt_lens = jnp.array([[5, 6, 7, 8], [9, 10, 11, 0]]), jnp.array([4, 3])
>>> state = init_state(spec, target, drafts, prompts, prompt_lens, max_new_tokens=12,
...                    temperature=jnp.array([0.0, 0.8]), seeds=jnp.array([0, 1]))
>>> @jax.jit
... def generate(state, target, drafts):
...     def one_step(state):
...         return step(spec, state, target, drafts)[0]
...     return jax.lax.while_loop(lambda s: jnp.any(s.length < s.limit), one_step, state)
>>> done = generate(state, target, drafts)
>>> done.length.tolist()  # each row: its prompt and 12 new tokens
[16, 15]
>>> new_tokens = done.tokens[0, 4:16]  # row 0 is greedy: exactly the target's greedy continuation

Row 0 is greedy, row 1 samples at temperature 0.8 with multi-step speculative sampling; both follow
the target's own distribution exactly (see ``verify``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from specjax.attention import AttentionMetadata, causal_mask
from specjax.config import ModelConfig
from specjax.kv_cache import KVCache, copy_kv, init_kv_cache, slot_ids, write_kv
from specjax.model import ForwardOutput, forward
from specjax.params import Params
from specjax.pytree import pytree_dataclass
from specjax.sampling import row_keys, sample
from specjax.speculation.merge import merge_trees
from specjax.speculation.tree import tree_bucket
from specjax.speculation.tree_draft import DraftModel, TreeShape, draft_tree
from specjax.speculation.verify import VerifyTree, verify_and_commit


@dataclass(frozen=True)
class SpecInfer:
    """The static side of a speculative setup: the target's and drafts' configs and each draft's
    tree shape. Hashable, so jitted functions close over it or take it as a static argument."""

    target: ModelConfig
    drafts: tuple[ModelConfig, ...]
    shapes: tuple[TreeShape, ...]
    attention_backend: str | None = None  # ``attention.attention``'s, for the target and the drafts

    def __post_init__(self):
        object.__setattr__(self, "drafts", tuple(self.drafts))
        object.__setattr__(self, "shapes", tuple(self.shapes))
        if not self.drafts or len(self.drafts) != len(self.shapes):
            raise ValueError(f"need one tree shape per draft, got {len(self.drafts)} drafts and {len(self.shapes)} shapes")
        tree_bucket(self.merged_nodes)  # at most 128 nodes

    @property
    def depth(self) -> int:
        return max(s.depth for s in self.shapes)

    @property
    def merged_nodes(self) -> int:
        """Nodes of the merged tree before duplicates are found: the root and every draft's others."""
        return 1 + sum(s.num_nodes - 1 for s in self.shapes)

    @property
    def num_nodes(self) -> int:
        """Static size of the verified tree: exactly ``merged_nodes``. The shapes fix it, so padding
        to a bucket would save no compilation, and every padded node costs verification time."""
        return self.merged_nodes


@pytree_dataclass
class StepBatch:
    """What one step needs per row, B rows (padding rows have ``active`` false).

    root_pos [B]: the root's position, i.e. the tokens in the target's cache; target_blocks [B, Pt]
    covering positions up to ``root_pos + depth``. Per draft (tuples): blocks [B, Pd] covering its
    pending tokens and scratch, lengths [B] its committed tokens, pending [B, Tp] the tokens it has
    not run (root last), pending_len [B]. Sampling: temperature, top_k, top_p [B]; keys [B] typed,
    this step's key of each row. Optionally plain_draws [B] bool, rows whose sampled tokens must be
    plain sampling's own (``verify.verify_and_commit``), with depth_keys [B, D + 1] typed: the key
    of the token drawn after a node at each depth (depth 0's is ``keys``).
    """

    active: jax.Array
    root_pos: jax.Array
    target_blocks: jax.Array
    draft_blocks: tuple
    draft_lengths: tuple
    pending: tuple
    pending_len: tuple
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    keys: jax.Array
    plain_draws: jax.Array | None = None
    depth_keys: jax.Array | None = None


@pytree_dataclass
class StepResult:
    """tokens [B, D + 1]: the accepted tokens then the bonus token, ``count`` [B] of them valid;
    accepted [B] tree tokens accepted; proposed [B] live tree nodes besides the root; depth [B] the
    tree's depth; draft_lengths (tuple of [B]) each draft cache's committed tokens afterwards;
    logprobs: None, or ``verify.emitted_logprobs`` of ``tokens`` (logprobs [B, D + 1], top ids and
    top logprobs [B, D + 1, K])."""

    tokens: jax.Array
    count: jax.Array
    accepted: jax.Array
    proposed: jax.Array
    depth: jax.Array
    draft_lengths: tuple
    logprobs: tuple | None = None


def verify_tree(config: ModelConfig, params: Params, cache: KVCache, block_tables: jax.Array, root_pos: jax.Array,
                tokens: jax.Array, depths: jax.Array, mask: jax.Array, attention_backend: str | None = None
                ) -> ForwardOutput:
    """The target's logits at every node of token trees, in one forward pass.

    block_tables [B, P] and root_pos [B] (committed tokens; the root sits at that position);
    tokens, depths [B, N]; mask [B, N, N] ancestor-or-self. Each node attends to the committed
    prefix, its ancestors and itself at position root_pos + depth, exactly as if its path had been
    decoded token by token. Returns the ``ForwardOutput``: logits [B, N, V] and the nodes' new_k,
    new_v [L, B, N, Hkv, hd] (nothing is written: the caller commits what it accepts).
    """
    meta = AttentionMetadata(block_tables=block_tables, context_lens=root_pos, new_mask=mask)
    return forward(params, config, tokens, root_pos[:, None] + depths, cache, meta, attention_backend=attention_backend)


def speculative_step(spec: SpecInfer, target_params: Params, drafts: tuple[DraftModel, ...], target_cache: KVCache,
                     draft_caches: tuple[KVCache, ...], batch: StepBatch, all_greedy: bool = False,
                     logprobs: bool = False) -> tuple[StepResult, KVCache, tuple[KVCache, ...]]:
    """Draft, verify, accept and commit for every active row (pure; jit with ``spec``,
    ``all_greedy`` and ``logprobs`` static). ``all_greedy``: every row is greedy (temperature 0),
    which skips the draft distributions and multi-step speculative sampling altogether; the result
    is the same. ``logprobs``: also score the emitted tokens (``StepResult.logprobs``)."""
    b = batch.active.shape[0]
    n, d = spec.num_nodes, spec.depth
    rows = jnp.arange(b)[:, None]
    trees, new_caches = [], []
    for s, (config, shape, draft, cache) in enumerate(zip(spec.drafts, spec.shapes, drafts, draft_caches)):
        tree, cache = draft_tree(config, shape, draft, cache, block_tables=batch.draft_blocks[s],
                                 lengths=batch.draft_lengths[s], pending=batch.pending[s],
                                 pending_len=batch.pending_len[s], active=batch.active,
                                 temperature=batch.temperature, top_k=batch.top_k, top_p=batch.top_p,
                                 key=jax.vmap(jax.random.fold_in, (0, None))(batch.keys, 2 + s), all_greedy=all_greedy,
                                 top_k_rows=batch.plain_draws, attention_backend=spec.attention_backend)
        trees.append(tree)
        new_caches.append(cache)
    tree = merge_trees(trees, n, d, drafts)

    out = verify_tree(spec.target, target_params, target_cache, batch.target_blocks, batch.root_pos,
                      tree.tokens, tree.depths, tree.mask, spec.attention_backend)
    logits, new_k, new_v = out.logits, out.new_k, out.new_v
    samples = None
    if tree.q_logits is not None:
        samples = jnp.array([s.samples for s in spec.shapes])[jnp.maximum(tree.draft, 0)]
    to_verify = VerifyTree(tokens=tree.tokens, parents=tree.parents, depths=tree.depths, mask=tree.mask,
                           live=tree.live, canon=tree.canon, under=tree.under, group=tree.group,
                           proposed=tree.proposed, q_logits=tree.q_logits, samples=samples)
    slots_by_depth = slot_ids(batch.target_blocks, batch.root_pos[:, None] + jnp.arange(d + 1),
                              jnp.ones((b, d + 1), bool), target_cache.page_size)
    node_keys = None
    if batch.plain_draws is not None:
        node_keys = jax.vmap(lambda keys, depths: keys[depths])(batch.depth_keys, tree.depths)
    verified, target_cache = verify_and_commit(logits, new_k, new_v, target_cache, to_verify, slots_by_depth,
                                               batch.active, batch.temperature, batch.top_k, batch.top_p, batch.keys,
                                               all_greedy=all_greedy, logprobs=logprobs, width=d + 1,
                                               node_keys=node_keys, plain_draws=batch.plain_draws)
    accepted = verified.accepted
    index = jnp.arange(n, dtype=jnp.int32)
    on_path = verified.path_nodes[:, :d]  # the accepted path's nodes by depth 1..d (-1 past its end)
    level = jnp.arange(d)
    draft_lengths = []
    for s, (cache, draft_tree_s) in enumerate(zip(new_caches, trees)):
        # The K/V of the accepted nodes this draft ran move from its scratch to their final positions.
        owner = jnp.full((b, n), -1, jnp.int32).at[rows, jnp.where(tree.proposed & (tree.draft == s), tree.canon, n)].set(
            jnp.broadcast_to(index, (b, n)), mode="drop")
        own = jnp.where(on_path >= 0, jnp.take_along_axis(owner, jnp.maximum(on_path, 0), 1), -1)
        offset = jnp.where(own >= 0, jnp.take_along_axis(tree.scratch, jnp.maximum(own, 0), 1), -1)
        kept = jnp.cumprod((offset >= 0) & (level < accepted[:, None]), axis=1).astype(bool) & batch.active[:, None]
        length = draft_tree_s.length
        blocks = batch.draft_blocks[s]
        src = slot_ids(blocks, length[:, None] + offset, kept, cache.page_size)
        dst = slot_ids(blocks, length[:, None] + level, kept, cache.page_size)
        new_caches[s] = copy_kv(cache, src, dst)
        draft_lengths.append(length + jnp.sum(kept, axis=1, dtype=jnp.int32))
    result = StepResult(tokens=verified.tokens, count=verified.count, accepted=accepted,
                        proposed=jnp.sum(tree.live, axis=1, dtype=jnp.int32) - 1,
                        depth=jnp.max(jnp.where(tree.live, tree.depths, 0), axis=1), draft_lengths=tuple(draft_lengths),
                        logprobs=verified.logprobs)
    return result, target_cache, tuple(new_caches)


# ---------------------------------------------------------------------------- a state for user loops
@pytree_dataclass
class SpecState:
    """B sequences between speculative steps, all on the device.

    tokens [B, S] int32: prompt then generated tokens; length [B]: tokens so far (the last one is
    the next tree's root, not yet in the target's cache); limit [B]: the length a row stops at.
    Caches with fixed pages per row: target_cache, target_blocks [B, Pt]; per draft (tuples)
    draft_caches, draft_blocks, draft_lengths [B]. Sampling: temperature, top_k, top_p [B];
    keys [B] typed base keys (token i of a row is drawn with ``fold_in(key, i)``).
    """

    tokens: jax.Array
    length: jax.Array
    limit: jax.Array
    target_cache: KVCache
    target_blocks: jax.Array
    draft_caches: tuple
    draft_blocks: tuple
    draft_lengths: tuple
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    keys: jax.Array


def _prefill(config: ModelConfig, params: Params, cache: KVCache, blocks: jax.Array, tokens: jax.Array,
             lengths: jax.Array) -> tuple[jax.Array, KVCache]:
    """Run prompts [B, L] (``lengths`` valid) into an empty cache; returns each row's last logits [B, V]."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    meta = AttentionMetadata(block_tables=blocks, context_lens=jnp.zeros(b, jnp.int32), new_mask=causal_mask(b, t))
    out = forward(params, config, tokens, positions, cache, meta, logit_indices=(lengths - 1)[:, None])
    logits, new_k, new_v = out.logits, out.new_k, out.new_v
    cache = write_kv(cache, new_k, new_v, slot_ids(blocks, positions, positions < lengths[:, None], cache.page_size))
    return logits[:, 0], cache


def _fixed_pages(config: ModelConfig, batch: int, tokens: int, page_size: int, dtype) -> tuple[KVCache, jax.Array]:
    """A cache giving each of ``batch`` rows its own pages for ``tokens`` tokens, and their block tables."""
    per_row = -(-tokens // page_size)
    cache = init_kv_cache(config, batch * per_row, page_size, dtype)
    return cache, jnp.arange(batch * per_row, dtype=jnp.int32).reshape(batch, per_row)


def init_state(spec: SpecInfer, target_params: Params, drafts: tuple[DraftModel, ...], prompts: jax.Array,
               prompt_lens: jax.Array, max_new_tokens: int, *, temperature: jax.Array | None = None,
               top_k: jax.Array | None = None, top_p: jax.Array | None = None, seeds: jax.Array | None = None,
               page_size: int = 16) -> SpecState:
    """Prefill prompts [B, L] (``prompt_lens`` [B] valid tokens each) into fresh caches and sample
    each row's first token. Sampling settings are per row ([B]; default greedy); ``seeds`` [B]
    make each row's tokens reproducible. Jit-able with ``max_new_tokens`` and ``page_size`` static.
    """
    b, width = prompts.shape
    prompts, prompt_lens = prompts.astype(jnp.int32), prompt_lens.astype(jnp.int32)
    temperature = jnp.zeros(b, jnp.float32) if temperature is None else jnp.asarray(temperature, jnp.float32)
    top_k = jnp.zeros(b, jnp.int32) if top_k is None else jnp.asarray(top_k, jnp.int32)
    top_p = jnp.ones(b, jnp.float32) if top_p is None else jnp.asarray(top_p, jnp.float32)
    keys = jax.vmap(jax.random.key)(jnp.zeros(b, jnp.uint32) if seeds is None else jnp.asarray(seeds, jnp.uint32))
    # The last step may emit depth + 1 tokens past a row's limit; its draft also needs scratch.
    capacity = width + max_new_tokens + spec.depth + 1
    target_cache, target_blocks = _fixed_pages(spec.target, b, capacity, page_size, target_params.embed.dtype)
    logits, target_cache = _prefill(spec.target, target_params, target_cache, target_blocks, prompts, prompt_lens)
    first = sample(logits, row_keys(keys, prompt_lens), temperature, top_k, top_p)
    tokens = jnp.zeros((b, capacity), jnp.int32).at[:, :width].set(prompts).at[jnp.arange(b), prompt_lens].set(first)
    draft_caches, draft_blocks = [], []
    for config, shape, draft in zip(spec.drafts, spec.shapes, drafts):
        cache, blocks = _fixed_pages(config, b, capacity + shape.num_fed, page_size, draft.params.embed.dtype)
        _, cache = _prefill(config, draft.params, cache, blocks, draft.target_to_draft[prompts], prompt_lens)
        draft_caches.append(cache)
        draft_blocks.append(blocks)
    return SpecState(tokens=tokens, length=prompt_lens + 1, limit=prompt_lens + max_new_tokens,
                     target_cache=target_cache, target_blocks=target_blocks, draft_caches=tuple(draft_caches),
                     draft_blocks=tuple(draft_blocks), draft_lengths=(prompt_lens,) * len(drafts),
                     temperature=temperature, top_k=top_k, top_p=top_p, keys=keys)


def step(spec: SpecInfer, state: SpecState, target_params: Params, drafts: tuple[DraftModel, ...],
         all_greedy: bool = False) -> tuple[SpecState, StepResult]:
    """One speculative step for every row still short of its limit (pure; jit with ``spec`` and
    ``all_greedy`` static; ``all_greedy`` promises that every row is greedy, see ``speculative_step``)."""
    b, capacity = state.tokens.shape
    active = state.length < state.limit
    span = jnp.arange(spec.depth + 1)
    # A draft lags the sequence by its pending tokens: at most the accepted ones it did not run, and the root.
    pending = tuple(jnp.take_along_axis(state.tokens, jnp.clip(length[:, None] + span, 0, capacity - 1), 1)
                    for length in state.draft_lengths)
    batch = StepBatch(active=active, root_pos=state.length - 1, target_blocks=state.target_blocks,
                      draft_blocks=state.draft_blocks, draft_lengths=state.draft_lengths, pending=pending,
                      pending_len=tuple(state.length - length for length in state.draft_lengths),
                      temperature=state.temperature, top_k=state.top_k, top_p=state.top_p,
                      keys=row_keys(state.keys, state.length))
    result, target_cache, draft_caches = speculative_step(spec, target_params, drafts, state.target_cache,
                                                          state.draft_caches, batch, all_greedy)
    positions = state.length[:, None] + span
    keep = active[:, None] & (span < result.count[:, None]) & (positions < state.limit[:, None])
    tokens = state.tokens.at[jnp.arange(b)[:, None], jnp.where(keep, positions, capacity)].set(result.tokens, mode="drop")
    state = dataclasses.replace(
        state, tokens=tokens, length=state.length + jnp.sum(keep, axis=1, dtype=jnp.int32), target_cache=target_cache,
        draft_caches=draft_caches,
        draft_lengths=tuple(jnp.where(active, new, old) for new, old in zip(result.draft_lengths, state.draft_lengths)))
    return state, result
