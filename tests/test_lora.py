"""LoRA adapters against Hugging Face PEFT on transformers: both ways through PEFT's files, logits
equal; the adapted forward's gradients against central differences and against the merged-weight
model; bad adapters refused, naming what is wrong. In the engine: mixed batches of adapters (and
speculation over them) against each adapter merged into plain weights."""

import copy
import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from specjax.attention import AttentionMetadata, causal_mask  # noqa: E402
from specjax.checkpoints import LoadedModel  # noqa: E402
from specjax.checkpoints.hf import load_hf  # noqa: E402
from specjax.engine.adapters import AdapterInUse  # noqa: E402
from specjax.engine.request import RequestError  # noqa: E402
from specjax.linear import Bf16Bits  # noqa: E402
from specjax.llm import LLM  # noqa: E402
from specjax.lora import (MODULES, AdapterError, LoraAdapter, LoraConfig, adapt, init_adapter, load_peft,  # noqa: E402
                          merged_params, save_peft)
from specjax.model import forward  # noqa: E402
from specjax.runner import EngineConfig  # noqa: E402
from specjax.sampling import SamplingParams  # noqa: E402
from tests.test_model import _save_tiny, _torch_logits  # noqa: E402
from tests.test_serving import ENGINE, tiny_target  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, specjax config, specjax params) of one random tiny Llama."""
    torch_model, path = _save_tiny(tmp_path_factory, "lora-llama", transformers.LlamaConfig,
                                   transformers.LlamaForCausalLM, tie_word_embeddings=False)
    loaded = load_hf(path, dtype=jnp.float32)
    return torch_model, loaded.config, loaded.params


def logits_of(params, config, tokens):
    b, t = tokens.shape
    meta = AttentionMetadata(block_tables=jnp.zeros((b, 0), jnp.int32), context_lens=jnp.zeros((b,), jnp.int32),
                             new_mask=causal_mask(b, t))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    return forward(params, config, jnp.asarray(tokens), positions, None, meta).logits


def random_adapter(config, model, seed):
    """An adapter with random A and B (a fresh one's B is zero, which would hide a misplaced B)."""
    adapter = init_adapter(config, model, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(adapter.b)))
    b = {m: 0.1 * jax.random.normal(next(keys), x.shape) for m, x in adapter.b.items()}
    return type(adapter)(a=adapter.a, b=b, config=config)


def tokens_for(config, seed=0, shape=(2, 11)):
    return np.random.default_rng(seed).integers(0, config.vocab_size, shape)


def test_a_fresh_adapter_is_the_base_model(tiny):
    _, config, params = tiny
    adapter = init_adapter(LoraConfig(r=4, target_modules=MODULES), config, jax.random.key(0))
    tokens = tokens_for(config)
    np.testing.assert_array_equal(np.asarray(logits_of(adapt(params, adapter, config), config, tokens)),
                                  np.asarray(logits_of(params, config, tokens)))
    bound = 1 / np.sqrt(config.hidden_size)  # PEFT's kaiming-uniform with a = sqrt(5)
    a = np.asarray(adapter.a["q_proj"])
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound


@pytest.mark.parametrize("rslora", [False, True])
def test_an_adapter_made_by_peft_loads_with_the_same_logits(tiny, tmp_path, rslora):
    torch_model, config, params = tiny
    settings = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(MODULES), use_rslora=rslora,
                               init_lora_weights=False, task_type="CAUSAL_LM")  # B random too
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(copy.deepcopy(torch_model), settings).eval()
    peft_model.save_pretrained(tmp_path)
    adapter = load_peft(tmp_path, config)
    assert adapter.config.scale == pytest.approx(8 / (2 if rslora else 4))
    tokens = tokens_for(config, 1)
    got = np.asarray(logits_of(adapt(params, adapter, config), config, tokens))
    np.testing.assert_allclose(got, _torch_logits(peft_model, tokens), atol=TOL, rtol=0)
    assert np.abs(got - _torch_logits(torch_model, tokens)).max() > 100 * TOL  # the adapter does change them


def test_an_adapter_written_by_specjax_loads_in_peft_with_the_same_logits(tiny, tmp_path):
    torch_model, config, params = tiny
    lora = LoraConfig(r=3, lora_alpha=6, target_modules=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
                      base_model_name_or_path="tiny-llama")
    adapter = random_adapter(lora, config, 5)
    save_peft(tmp_path, adapter)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["r"] == 3 and written["base_model_name_or_path"] == "tiny-llama"
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path).eval()
    tokens = tokens_for(config, 2)
    np.testing.assert_allclose(np.asarray(logits_of(adapt(params, adapter, config), config, tokens)),
                               _torch_logits(peft_model, tokens), atol=TOL, rtol=0)
    # PEFT's own keys and shapes, read back by PEFT's loader rather than ours.
    state = peft.get_peft_model_state_dict(peft_model)
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (3, config.hidden_size)
    assert state["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (config.hidden_size, 3)
    again = load_peft(tmp_path, config)
    for m in lora.target_modules:
        np.testing.assert_array_equal(np.asarray(again.a[m]), np.asarray(adapter.a[m]))
        np.testing.assert_array_equal(np.asarray(again.b[m]), np.asarray(adapter.b[m]))


def _loss(params, config, tokens):
    logp = jax.nn.log_softmax(logits_of(params, config, tokens[:, :-1]), -1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


def test_gradients_equal_finite_differences_and_the_merged_weights_gradient(tiny):
    _, config, params = tiny
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=("k_proj", "o_proj", "gate_proj", "down_proj"))
    tokens = jnp.asarray(tokens_for(config, 4, (2, 9)))
    adapter = random_adapter(lora, config, 7)
    loss = jax.jit(lambda ad: _loss(adapt(params, ad, config), config, tokens))
    grads = jax.grad(loss)(adapter)
    # Central differences along random unit directions of every factor at once (the forward
    # accumulates in fp32 whatever its inputs: eps is sized to that).
    rng = np.random.default_rng(0)
    for _ in range(3):
        direction = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), adapter)
        norm = np.sqrt(sum(float(jnp.sum(d * d)) for d in jax.tree.leaves(direction)))
        direction = jax.tree.map(lambda d: d / norm, direction)
        eps = 1e-2
        numeric = (loss(jax.tree.map(lambda x, d: x + eps * d, adapter, direction))
                   - loss(jax.tree.map(lambda x, d: x - eps * d, adapter, direction))) / (2 * eps)
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        assert float(analytic) == pytest.approx(float(numeric), rel=2e-2, abs=1e-4)
    # The same gradients through plain weights W + scale * A @ B (no LoraLinear anywhere).
    merged = jax.grad(lambda ad: _loss(merged_params(params, ad, config), config, tokens))(adapter)
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(merged)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-3, atol=1e-6)
    assert min(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-4  # every factor learns


def _write_peft(path, config=None, tensors=None):
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    base = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps({**base, **(config or {})}))
    if tensors is not None:
        save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


@pytest.mark.parametrize("field, value, message", [
    ("use_dora", True, "use_dora"), ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("layers_to_transform", [0], "layers_to_transform"), ("bias", "all", "bias"),
    ("target_modules", ["q_proj", "embed_tokens"], "embed_tokens"), ("target_modules", ".*proj", "pattern"),
    ("r", 0, "r must be"), ("lora_alpha", -1, "lora_alpha"), ("peft_type", "IA3", "peft_type"),
    ("r", 100, "larger than q_proj"),
])
def test_unsupported_or_bad_settings_are_refused_naming_the_field(tiny, tmp_path, field, value, message):
    _, config, _ = tiny
    with pytest.raises(AdapterError, match=message):
        load_peft(_write_peft(tmp_path / "adapter", {field: value}), config)


def test_adapters_for_another_model_or_broken_files_are_refused(tiny, tmp_path):
    _, config, _ = tiny
    d, q = config.hidden_size, config.q_size

    def layer_tensors(layers, width):
        return {f"base_model.model.model.layers.{i}.self_attn.q_proj.{f}.weight": np.zeros(s, np.float32)
                for i in range(layers) for f, s in (("lora_A", (2, width)), ("lora_B", (q, 2)))}

    with pytest.raises(AdapterError, match="another base model"):  # wider hidden size
        load_peft(_write_peft(tmp_path / "wide", tensors=layer_tensors(config.num_layers, 2 * d)), config)
    with pytest.raises(AdapterError, match="another base model"):  # more layers
        load_peft(_write_peft(tmp_path / "deep", tensors=layer_tensors(config.num_layers + 1, d)), config)
    with pytest.raises(AdapterError, match="missing tensor"):
        load_peft(_write_peft(tmp_path / "short", tensors=layer_tensors(config.num_layers - 1, d)), config)
    extra = {**layer_tensors(config.num_layers, d),
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": np.zeros(q, np.float32)}
    with pytest.raises(AdapterError, match="lora_B.bias"):
        load_peft(_write_peft(tmp_path / "bias", tensors=extra), config)
    with pytest.raises(AdapterError, match="missing adapter_model.safetensors"):
        load_peft(_write_peft(tmp_path / "none"), config)
    broken = _write_peft(tmp_path / "broken", tensors=layer_tensors(config.num_layers, d))
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(AdapterError, match="safetensors"):
        load_peft(broken, config)
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_peft(broken, config)
    with pytest.raises(AdapterError, match="does not exist"):
        load_peft(tmp_path / "nowhere", config)


# ---------------------------------------------------------------------------- adapters in the engine
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, seed=11, max_tokens=10, ignore_eos=True)
PROMPTS = [[1, 2, 3], [9, 8, 7, 6], [1, 2, 3], [40, 41], [5, 5, 5, 5, 5]]
NAMES = ["a0", "a1", None, "a2", "a3"]


@pytest.fixture(scope="module")
def target():
    return tiny_target()


@pytest.fixture(scope="module")
def adapters(target):
    # Different ranks (padded to the slots' rank) and different target modules per adapter.
    targets = [MODULES, ("q_proj", "v_proj"), ("o_proj", "down_proj"), ("gate_proj", "up_proj", "k_proj")]
    return {f"a{i}": random_adapter(LoraConfig(r=2 + i, lora_alpha=4.0, target_modules=modules,
                                               use_rslora=i == 1), target.config, 20 + i)
            for i, modules in enumerate(targets)}


_jitted_logits = jax.jit(logits_of, static_argnums=1)


def reference_decode(config, params, prompt, sampling, width=32):
    """Decoding by whole-sequence forward passes (no cache, no engine), each token chosen as
    plain decoding defines it: the argmax, or ``sampling.sample`` with key fold_in(key(seed), i)."""
    from specjax.sampling import row_keys, sample

    tokens = list(prompt)
    key = jax.random.key(sampling.seed) if sampling.temperature > 0 else None
    for i in range(sampling.max_tokens):
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(tokens)] = tokens  # causal: padding after the sequence changes nothing before it
        logits = _jitted_logits(params, config, jnp.asarray(padded))[:, len(tokens) - 1]
        if key is None:
            tokens.append(int(jnp.argmax(logits[0])))
        else:
            tokens.append(int(sample(logits, row_keys(key[None], jnp.array([i])), jnp.array([sampling.temperature]),
                                     jnp.array([sampling.top_k]), jnp.array([sampling.top_p]))[0]))
    return tokens[len(prompt):]


@pytest.fixture(scope="module")
def merged_outputs(target, adapters):
    """Greedy and seeded tokens of every prompt on its adapter merged into plain weights."""
    out = {}
    for prompt, name in zip(PROMPTS, NAMES):
        params = target.params if name is None else merged_params(target.params, adapters[name], target.config)
        out[tuple(prompt), name] = [reference_decode(target.config, params, prompt, p) for p in (GREEDY, SEEDED)]
    return out


@pytest.fixture(scope="module")
def two_slots(target):
    """An LLM with two adapter slots and room for one adapter in host memory, shared by the tests below."""
    return LLM(target, engine=dataclasses.replace(ENGINE, max_loras=2, max_lora_rank=8, max_cpu_loras=1), seed=0)


def test_a_mixed_batch_of_adapters_equals_each_alone_and_the_merged_models(target, adapters, merged_outputs):
    llm = LLM(target, engine=dataclasses.replace(ENGINE, max_loras=4, max_lora_rank=8), adapters=adapters, seed=0)
    assert llm.adapters == list(adapters)
    mixed = llm.generate(PROMPTS * 2, [GREEDY] * 5 + [SEEDED] * 5, adapter=NAMES * 2)
    for i, (prompt, name) in enumerate(zip(PROMPTS, NAMES)):
        greedy, seeded = merged_outputs[tuple(prompt), name]
        assert mixed[i].token_ids == greedy and mixed[i + 5].token_ids == seeded, name
        assert llm.generate([prompt], SEEDED, adapter=name)[0].token_ids == seeded  # alone
    assert mixed[0].token_ids != mixed[2].token_ids  # same prompt: the adapter changes the output


def test_slots_beside_bf16_bit_weights_hold_bf16_factors_and_equal_the_merged_model(target, adapters):
    """Over bf16-bit weights (the CPU's bf16 storage) the slots are bf16 bits too: a mixed batch
    equals plain fp32 weights holding the bf16-rounded base plus each adapter's bf16-rounded A and
    scaled B, merged."""
    from specjax.params import store_bf16

    def bf16(x):
        return x.astype(jnp.bfloat16).astype(jnp.float32)

    packed = dataclasses.replace(target, params=store_bf16(target.params))
    llm = LLM(packed, engine=dataclasses.replace(ENGINE, max_loras=4, max_lora_rank=8), adapters=adapters, seed=0)
    assert isinstance(llm.runner.cell.state.target.adapters.a["wqkv"], Bf16Bits)
    layers = target.params.layers
    rounded = dataclasses.replace(target.params, layers=dataclasses.replace(
        layers, wqkv=bf16(layers.wqkv), wo=bf16(layers.wo), w_gate_up=bf16(layers.w_gate_up), w_down=bf16(layers.w_down)))
    outs = llm.generate(PROMPTS, GREEDY, adapter=NAMES)
    for out, prompt, name in zip(outs, PROMPTS, NAMES):
        params = rounded
        if name is not None:
            a = adapters[name]  # scale 1: the rounded factors are exactly what the slots hold
            exact = LoraAdapter(a={m: bf16(x) for m, x in a.a.items()},
                                b={m: bf16(x * a.config.scale) for m, x in a.b.items()},
                                config=dataclasses.replace(a.config, lora_alpha=float(a.config.r), use_rslora=False))
            params = merged_params(rounded, exact, target.config)
        assert out.token_ids == reference_decode(target.config, params, prompt, GREEDY), name


def test_more_adapters_than_slots_take_turns_and_stay_exact(two_slots, adapters, merged_outputs):
    for name, adapter in adapters.items():
        two_slots.add_adapter(name, adapter)
    outs = two_slots.generate(PROMPTS, GREEDY, adapter=NAMES)
    assert [o.token_ids for o in outs] == [merged_outputs[tuple(p), n][0] for p, n in zip(PROMPTS, NAMES)]
    for name in adapters:
        two_slots.remove_adapter(name)


def test_speculation_with_an_adapter_stays_lossless(target, adapters, merged_outputs):
    from specjax.speculation.speculator import TreeSpeculation
    from specjax.speculation.suffix import HybridSpeculation, SuffixSpeculation

    # Drafts propose without adapters (the base target drafting for itself); the adapted target verifies.
    llm = LLM(target, engine=dataclasses.replace(ENGINE, max_loras=2, max_lora_rank=8), seed=0,
              adapters={"a0": adapters["a0"], "a2": adapters["a2"]},
              speculation=HybridSpeculation(suffix=SuffixSpeculation(max_spec_tokens=6),
                                            tree=TreeSpeculation(drafts=[target], expansion=(1, 1, 1))))
    names = ["a0", None, "a2"]
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[3]]
    for _ in range(2):  # the second time, the suffix cache holds each adapter's own outputs
        outs = llm.generate(prompts, GREEDY, adapter=names)
        assert [o.token_ids for o in outs] == [merged_outputs[tuple(p), n][0] for p, n in zip(prompts, names)]
    assert all(o.stats.speculation.accepted > 0 for o in outs)


def test_adapter_mistakes_are_refused(target, two_slots, adapters, tmp_path):
    with pytest.raises(AdapterError, match="no adapter slots"):
        LLM(target, engine=ENGINE).add_adapter("a0", adapters["a0"])
    llm = two_slots
    with pytest.raises(AdapterError, match="max_lora_rank"):
        llm.add_adapter("big", random_adapter(LoraConfig(r=9), target.config, 1))
    llm.add_adapter("a0", adapters["a0"])
    with pytest.raises(AdapterError, match="already loaded"):
        llm.add_adapter("a0", adapters["a0"])
    with pytest.raises(RequestError, match="no adapter named 'nope'"):
        llm.generate([[1, 2]], GREEDY, adapter="nope")
    with pytest.raises(AdapterError, match="does not exist"):
        llm.add_adapter("missing", tmp_path / "nowhere")
    other = dataclasses.replace(target.config, hidden_size=2 * target.config.hidden_size)
    with pytest.raises(AdapterError, match="another base model"):
        llm.add_adapter("other", random_adapter(LoraConfig(r=2), other, 2))
    # In use: a request holding the adapter's slot keeps it until it leaves the batch.
    scheduler = llm.scheduler()
    request = llm.new_request([1, 2, 3], GREEDY, adapter="a0")
    scheduler.add(request)
    scheduler.step()
    with pytest.raises(AdapterInUse, match="in use by 1"):
        llm.remove_adapter("a0")
    while scheduler.has_work:
        scheduler.step()
    llm.remove_adapter("a0")
    assert llm.adapters == []
    with pytest.raises(AdapterError, match="no adapter named"):
        llm.remove_adapter("a0")
    # A request whose adapter is unloaded while it waits fails alone.
    llm.add_adapter("a0", adapters["a0"])
    doomed = llm.new_request([1, 2, 3], GREEDY, adapter="a0")
    bystander = llm.new_request([1, 2, 3], GREEDY)
    llm.remove_adapter("a0")  # nothing holds it yet
    scheduler.add(doomed)
    scheduler.add(bystander)
    while scheduler.has_work:
        scheduler.step()
    assert doomed.output.finish_reason == "error" and "unloaded" in doomed.output.error
    assert bystander.output.token_ids == reference_decode(target.config, target.params, [1, 2, 3], GREEDY)


def test_engine_lora_settings_are_checked():
    for bad in (dict(max_loras=-1), dict(max_loras=1.5), dict(max_lora_rank=0), dict(max_cpu_loras=0)):
        with pytest.raises(ValueError):
            EngineConfig(**bad)


def test_the_server_serves_adapters_by_model_name_and_loads_them_at_run_time(target, two_slots, adapters,
                                                                             merged_outputs, tmp_path):
    import openai

    from tests.test_serving import KEY, request, serving

    for name in ("a0", "a1", "a2"):
        save_peft(tmp_path / name, adapters[name])
    llm = two_slots
    for name in ("a0", "a1"):
        llm.add_adapter(name, tmp_path / name)
    auth = {"Authorization": f"Bearer {KEY}"}

    def text(prompt, name):
        return target.tokenizer.decode(merged_outputs[tuple(prompt), name][0])

    with serving(llm, "tiny", app_options={"allow_runtime_lora": True}) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny", "a0", "a1"]
        cases = [(PROMPTS[0], "a0"), (PROMPTS[1], "a1"), (PROMPTS[2], None), (PROMPTS[0], None)]
        with ThreadPoolExecutor(len(cases)) as pool:  # one batch of two adapters and the base model
            replies = list(pool.map(lambda case: client.completions.create(
                model=case[1] or "tiny", prompt=case[0], max_tokens=10, temperature=0, extra_body={"ignore_eos": True}),
                cases))
        assert [r.choices[0].text for r in replies] == [text(p, n) for p, n in cases]
        assert replies[0].model == "a0"
        with pytest.raises(openai.NotFoundError, match="a2"):
            client.completions.create(model="a2", prompt=PROMPTS[3], max_tokens=4)

        status, _, body = request(url, "POST", "/v1/load_lora_adapter", {"lora_name": "a2", "lora_path": str(
            tmp_path / "a2")}, auth)
        assert status == 200, body
        reply = client.completions.create(model="a2", prompt=PROMPTS[3], max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert reply.choices[0].text == text(PROMPTS[3], "a2")
        # Unloading an adapter a request is using is refused until it finishes; the request is unharmed.
        # (a long request, so it is still running when the unload arrives)
        stream = client.completions.create(model="a0", prompt=PROMPTS[0], max_tokens=200, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        pieces = [next(iter(stream)).choices[0].text]
        status, _, body = request(url, "POST", "/v1/unload_lora_adapter", {"lora_name": "a0"}, auth)
        assert status == 409 and "in use" in body["error"]["message"]
        pieces += [c.choices[0].text for c in stream]
        assert "".join(pieces).startswith(text(PROMPTS[0], "a0")) and len("".join(pieces).split()) == 200
        status, _, body = request(url, "POST", "/v1/unload_lora_adapter", {"lora_name": "a0"}, auth)
        assert status == 200, body
        assert [m.id for m in client.models.list()] == ["tiny", "a1", "a2"]
        for path, payload, code, param in [
                ("/v1/unload_lora_adapter", {"lora_name": "a0"}, 404, "lora_name"),
                ("/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": str(tmp_path / "a1")}, 400, "lora_name"),
                ("/v1/load_lora_adapter", {"lora_name": "tiny", "lora_path": str(tmp_path / "a1")}, 400, "lora_name"),
                ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "nowhere")}, 400, "lora_path"),
                ("/v1/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path")]:
            status, _, body = request(url, "POST", path, payload, auth)
            assert (status, body["error"]["param"]) == (code, param), body
    with serving(llm, "tiny") as (url, _):  # run-time loading is off unless asked for
        status, _, body = request(url, "POST", "/v1/load_lora_adapter", {"lora_name": "a0", "lora_path": str(
            tmp_path / "a0")}, auth)
        assert status == 403 and "--allow-runtime-lora" in body["error"]["message"]


@pytest.mark.parametrize("bf16_bits", [False, True])
@pytest.mark.parametrize("kernel", ["auto", "gather", "onehot", "ragged"])
def test_grouped_lora_kernels_equal_each_rows_product_in_float64(kernel, bf16_bits):
    """Every kernel, on slots as arrays or as bf16 bits, whole or one layer's read in place, against
    each row's (x @ A_m) @ B_m in numpy float64 from the slot values (one matrix fusing two
    modules, as q/k/v and gate/up do)."""
    from specjax.lora import GROUPED_LORA, grouped_lora_reference
    from specjax.params import AtLayer

    rng = np.random.default_rng(hash((kernel, bf16_bits)) % 2**32)
    for b, t, slots in ((5, 1, 4), (3, 7, 2), (8, 2, 1)):
        x = jnp.asarray(rng.standard_normal((b, t, 24)), jnp.float32)
        a = jnp.asarray(rng.standard_normal((slots + 1, 24, 12)), jnp.float32).at[0].set(0)
        bs = tuple(jnp.asarray(rng.standard_normal((slots + 1, 6, n)), jnp.float32).at[0].set(0) for n in (10, 4))
        if bf16_bits:
            a, bs = Bf16Bits.pack(a), tuple(Bf16Bits.pack(w) for w in bs)
        values = [np.asarray(w.widen() if bf16_bits else w, np.float64) for w in (a, *bs)]
        rows = np.asarray(rng.integers(0, slots + 1, b), np.int32)
        x64 = np.asarray(x, np.float64)
        want = [np.stack([(x64[i] @ values[0][rows[i]][:, 6 * m:6 * (m + 1)]) @ values[1 + m][rows[i]]
                          for i in range(b)]) for m in range(2)]

        def layer_1_of_3(w):  # as a layer body reads slots in place: layer 1 of a stack of other layers' noise
            noise = jax.tree.map(lambda v: jnp.asarray(rng.integers(0, 2**15, (3,) + v.shape), v.dtype)
                                 if v.dtype == jnp.uint16 else jnp.asarray(rng.standard_normal((3,) + v.shape), v.dtype), w)
            return AtLayer(jax.tree.map(lambda n, v: n.at[1].set(v), noise, w), jnp.int32(1))

        for fn in (GROUPED_LORA[kernel], grouped_lora_reference):
            for args in ((a, bs), (layer_1_of_3(a), tuple(layer_1_of_3(w) for w in bs))):
                got = jax.jit(fn)(x, *args, jnp.asarray(rows))
                for g, w in zip(got, want, strict=True):
                    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-4)
