"""Logical axes on every leaf, and tensor-parallel placement on a mesh of fake CPU devices: each
device's shard of the fused q/k/v and gate/up matrices holds whole KV-head groups and whole
gate/up pairs (checked against the HF tensors they came from), the sharded model computes what
the unsharded one does, and an orbax checkpoint loads straight into its shards."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax

from specjax.config import ModelConfig
from specjax.kv_cache import init_kv_cache
from specjax.params import random_params, store_bf16
from specjax.sharding import LOGICAL_AXES, logical_axes

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, attention_bias=True, attention_out_bias=True, tie_word_embeddings=False)


def test_every_parameter_and_cache_leaf_has_logical_axes_of_its_rank():
    for tree in (random_params(CONFIG, jax.random.key(0)), store_bf16(random_params(CONFIG, jax.random.key(0))),
                 init_kv_cache(CONFIG, 4, 8)):
        axes = logical_axes(tree)
        for leaf, names in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(
                axes, is_leaf=lambda x: isinstance(x, tuple))):
            assert len(names) == leaf.ndim, (names, leaf.shape)
    assert set(LOGICAL_AXES) >= {"layers/wqkv", "layers/w_gate_up", "k", "v"}


MESH_SCRIPT = textwrap.dedent('''
    import dataclasses, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType
    from specjax.attention import AttentionMetadata, causal_mask
    from specjax.checkpoints import load_model, save_checkpoint
    from specjax.config import ModelConfig
    from specjax.model import forward
    from specjax.params import params_from_hf_tensors
    from specjax.sharding import TENSOR_PARALLEL, place

    assert jax.device_count() == 2
    c = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, attention_bias=True, tie_word_embeddings=True)
    rng = np.random.default_rng(0)
    hf = {"model.embed_tokens.weight": rng.standard_normal((64, 32)), "model.norm.weight": rng.standard_normal(32)}
    shapes = {"q_proj.weight": (32, 32), "k_proj.weight": (16, 32), "v_proj.weight": (16, 32),
              "o_proj.weight": (32, 32), "q_proj.bias": (32,), "k_proj.bias": (16,), "v_proj.bias": (16,)}
    for i in range(2):
        for name, shape in shapes.items():
            hf[f"model.layers.{i}.self_attn.{name}"] = rng.standard_normal(shape) * 0.3
        for name, shape in (("gate_proj", (48, 32)), ("up_proj", (48, 32)), ("down_proj", (32, 48))):
            hf[f"model.layers.{i}.mlp.{name}.weight"] = rng.standard_normal(shape) * 0.3
        for name in ("input_layernorm", "post_attention_layernorm"):
            hf[f"model.layers.{i}.{name}.weight"] = 1 + 0.1 * rng.standard_normal(32)
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    params = params_from_hf_tensors(c, hf.__getitem__)
    mesh = jax.make_mesh((2,), ("model",), axis_types=(AxisType.Auto,))
    sharded = place(params, mesh, TENSOR_PARALLEL)

    # Device d's block of wqkv: KV head d's two query heads, then its key and value head.
    for shard in sharded.layers.wqkv.addressable_shards:
        d = shard.index[2].start // (4 * 8)
        block = np.asarray(shard.data)[0]  # layer 0, [D, (G + 2) * hd]
        want = np.concatenate([hf["model.layers.0.self_attn.q_proj.weight"][16 * d: 16 * (d + 1)].T,
                               hf["model.layers.0.self_attn.k_proj.weight"][8 * d: 8 * (d + 1)].T,
                               hf["model.layers.0.self_attn.v_proj.weight"][8 * d: 8 * (d + 1)].T], axis=1)
        np.testing.assert_array_equal(block, want)
    # ... and of w_gate_up: gate and up of MLP columns 24d .. 24d + 23, pair by pair.
    for shard in sharded.layers.w_gate_up.addressable_shards:
        d = shard.index[2].start // 48
        pairs = np.asarray(shard.data)[0].reshape(32, 24, 2)
        np.testing.assert_array_equal(pairs[..., 0], hf["model.layers.0.mlp.gate_proj.weight"][24 * d: 24 * (d + 1)].T)
        np.testing.assert_array_equal(pairs[..., 1], hf["model.layers.0.mlp.up_proj.weight"][24 * d: 24 * (d + 1)].T)

    tokens = jnp.asarray(rng.integers(0, 64, (2, 9)), jnp.int32)
    meta = AttentionMetadata(block_tables=jnp.zeros((2, 0), jnp.int32), context_lens=jnp.zeros(2, jnp.int32),
                             new_mask=causal_mask(2, 9))
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    run = jax.jit(lambda p: forward(p, c, tokens, positions, None, meta).logits)
    np.testing.assert_allclose(np.asarray(run(sharded)), np.asarray(run(params)), atol=1e-5, rtol=1e-5)

    save_checkpoint(sys.argv[1], c, params)
    loaded = load_model(sys.argv[1], "float32", mesh=mesh)
    assert loaded.params.layers.wqkv.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
    assert loaded.params.layers.attn_norm.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(loaded.params.layers.wqkv), np.asarray(params.layers.wqkv))
    print("ok")
''')


def test_tensor_parallel_placement_on_two_fake_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    done = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(tmp_path / "ckpt")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
