"""LoRA: low-rank adapters on the decoder's projections, in Hugging Face PEFT's format.

An adapter on projection W (x @ W, ``[in, out]``) adds ``scale * (x @ A) @ B`` with A ``[in, r]``
and B ``[r, out]``; W stays frozen and shared. ``scale`` is ``lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA. PEFT stores the same factors transposed (``lora_A.weight``
``[r, in]``, ``lora_B.weight`` ``[out, r]``); ``load_peft`` and ``save_peft`` convert.

The decoder fuses q/k/v into one matrix and gate/up into another (``params``), so an adapted
fused matrix becomes one ``LoraLinear`` weight: the A factors of its modules side by side
(``[in, r_q + r_k + r_v]``: they all read the same x) and their B factors stacked, each placed in
its own module's output columns of the fused layout (zeros elsewhere), with the scale folded in.
``adapt`` builds that from a ``LoraAdapter`` (PEFT's per-module factors, the trainable pytree),
differentiably, so ``jax.grad`` through the adapted forward gives the factors' gradients.

``LoraLinear`` is a weight type of ``linear.linear`` (an ``OverBase``): the layer body does not know about LoRA.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from specjax.config import ModelConfig, matmul_precision
from specjax.linear import Bf16Bits, OverBase, linear, update
from specjax.params import (AtLayer, CheckpointError, Params, ReadInPlace, fuse_gate_up, fuse_qkv,
                            read_json_object)
from specjax.pytree import pytree_dataclass, static_field

# PEFT's module names, by the fused matrix of ``LayerWeights`` each belongs to (in fused order).
FUSED = {"wqkv": ("q_proj", "k_proj", "v_proj"), "wo": ("o_proj",), "w_gate_up": ("gate_proj", "up_proj"),
         "w_down": ("down_proj",)}
MODULES = tuple(m for modules in FUSED.values() for m in modules)
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter this model cannot use: bad settings, another base model, a corrupt file."""


def module_shape(module: str, config: ModelConfig) -> tuple[int, int]:
    """(in, out) of a projection of ``config``'s decoder."""
    c = config
    return {"q_proj": (c.hidden_size, c.q_size), "k_proj": (c.hidden_size, c.kv_size),
            "v_proj": (c.hidden_size, c.kv_size), "o_proj": (c.q_size, c.hidden_size),
            "gate_proj": (c.hidden_size, c.intermediate_size), "up_proj": (c.hidden_size, c.intermediate_size),
            "down_proj": (c.intermediate_size, c.hidden_size)}[module]


@dataclass(frozen=True)
class LoraConfig:
    """An adapter's settings, with PEFT's names.

    r: rank; lora_alpha: the scale's numerator; target_modules: which of q/k/v/o/gate/up/down_proj
    are adapted; use_rslora: scale by alpha / sqrt(r) rather than alpha / r; lora_dropout: dropout
    on the adapter's input while finetuning (inference ignores it); base_model_name_or_path: the
    model it was trained on, recorded in the PEFT config.
    """

    r: int = 16
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    use_rslora: bool = False
    lora_dropout: float = 0.0
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        modules = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
        if not modules:
            raise AdapterError("target_modules must name at least one projection")
        unknown = [m for m in modules if m not in MODULES]
        if unknown:
            raise AdapterError(f"target_modules: {', '.join(map(repr, unknown))} not among {', '.join(MODULES)}")
        # Fused order, duplicates dropped: the layout does not depend on how the list was written.
        object.__setattr__(self, "target_modules", tuple(m for m in MODULES if m in modules))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise AdapterError(f"r must be a positive integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise AdapterError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise AdapterError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def check_fits(self, model: ModelConfig) -> None:
        """Refuse a rank larger than an adapted projection's smaller side (it would add nothing a
        full-rank update does not, and PEFT's own checks would not catch it here)."""
        for m in self.target_modules:
            n_in, n_out = module_shape(m, model)
            if self.r > min(n_in, n_out):
                raise AdapterError(f"r = {self.r} is larger than {m} ({n_in} -> {n_out}) of this model")


@pytree_dataclass
class LoraAdapter:
    """An adapter's factors, per target module, stacked over layers: ``a[m]`` [L, in, r] and
    ``b[m]`` [L, r, out] (PEFT's ``lora_A``/``lora_B`` transposed), and its settings."""

    a: dict
    b: dict
    config: LoraConfig = static_field()

    @property
    def num_layers(self) -> int:
        return next(iter(self.a.values())).shape[0]


def init_adapter(config: LoraConfig, model: ModelConfig, key: jax.Array, dtype=jnp.float32) -> LoraAdapter:
    """A fresh adapter as PEFT initialises one: A kaiming-uniform (a = sqrt(5), so uniform in
    +-1/sqrt(in)), B zeros, so the adapted model starts as the base model."""
    config.check_fits(model)
    a, b = {}, {}
    for m, k in zip(config.target_modules, jax.random.split(key, len(config.target_modules))):
        n_in, n_out = module_shape(m, model)
        bound = 1.0 / math.sqrt(n_in)
        a[m] = jax.random.uniform(k, (model.num_layers, n_in, config.r), dtype, -bound, bound)
        b[m] = jnp.zeros((model.num_layers, config.r, n_out), dtype)
    return LoraAdapter(a=a, b=b, config=config)


# ---------------------------------------------------------------------------- the weight type
def _fuse_outputs(matrix: str, parts: dict, model: ModelConfig):
    """Per module of one fused matrix, its columns (weights [..., out_m] or activations) -> the
    fused column layout (``params``' own); a module missing from ``parts`` gets zeros."""
    modules = FUSED[matrix]
    some = next(iter(parts.values()))
    full = {m: parts[m] if m in parts else jnp.zeros(some.shape[:-1] + (module_shape(m, model)[1],), some.dtype)
            for m in modules}
    if matrix == "wqkv":
        return fuse_qkv(full["q_proj"], full["k_proj"], full["v_proj"], model, xp=jnp)
    if matrix == "w_gate_up":
        return fuse_gate_up(full["gate_proj"], full["up_proj"], xp=jnp)
    return full[modules[0]]


def _split_rank(low: jax.Array, bs: tuple) -> list:
    """The shrunk activations [..., sum of ranks] -> one part per B factor of ``bs``."""
    ends = np.cumsum([b.shape[-2] for b in bs])[:-1].tolist()
    return jnp.split(low, ends, axis=-1)


@pytree_dataclass
class LoraLinear(OverBase):
    """A frozen projection with a low-rank update per adapted module of a fused matrix:
    ``x @ base + fuse((x @ a)_m @ b_m)``. base is any weight type of ``linear``; a [in, R] holds the
    modules' A factors side by side (they read the same x), ``b`` one [r, out_m] per module in
    ``modules`` (scale folded in), so no module's B is padded across its siblings' columns; a
    leading layer axis on each when stacked. ``matrix``/``model`` say how the modules' outputs fuse."""

    base: object
    a: jax.Array
    b: tuple
    modules: tuple = static_field()
    matrix: str = static_field()
    model: ModelConfig = static_field()


@update.register
def _(w: LoraLinear, x: jax.Array) -> jax.Array:
    low = linear(x, w.a)
    deltas = {m: linear(part, b) for m, part, b in zip(w.modules, _split_rank(low, w.b), w.b)}
    return _fuse_outputs(w.matrix, deltas, w.model)


def fused_factors(adapter: LoraAdapter, model: ModelConfig, rank: int | None = None) -> dict:
    """Per fused matrix with an adapted module: (modules, a [L, in, R], b: one [L, r, out_m] per
    module, scale folded in). ``rank`` pads every module of the matrix to that rank, adapted or
    not (zeros), for the fixed layout of adapter slots."""
    cfg = adapter.config
    r = cfg.r if rank is None else rank
    if r < cfg.r:
        raise AdapterError(f"adapter rank {cfg.r} exceeds the slots' rank {rank}")
    out = {}
    for matrix, modules in FUSED.items():
        present = modules if rank is not None else tuple(m for m in modules if m in cfg.target_modules)
        if not present:
            continue
        a_blocks, b_blocks = [], []
        for m in present:
            n_in, n_out = module_shape(m, model)
            if m in cfg.target_modules:
                a_blocks.append(jnp.pad(adapter.a[m], ((0, 0), (0, 0), (0, r - cfg.r))))
                b_blocks.append(jnp.pad(adapter.b[m] * cfg.scale, ((0, 0), (0, r - cfg.r), (0, 0))))
            else:
                a_blocks.append(jnp.zeros((model.num_layers, n_in, r), jnp.float32))
                b_blocks.append(jnp.zeros((model.num_layers, r, n_out), jnp.float32))
        out[matrix] = (present, jnp.concatenate(a_blocks, axis=-1), tuple(b_blocks))
    return out


def adapt(params: Params, adapter: LoraAdapter, model: ModelConfig) -> Params:
    """``params`` with the adapter's matrices as ``LoraLinear`` weights (the base ones shared)."""
    check_adapter(adapter, model)
    layers = params.layers
    updates = {matrix: LoraLinear(getattr(layers, matrix), a.astype(jnp.float32),
                                  tuple(b.astype(jnp.float32) for b in bs), modules, matrix, model)
               for matrix, (modules, a, bs) in fused_factors(adapter, model).items()}
    return dataclasses.replace(params, layers=dataclasses.replace(layers, **updates))


def merged_params(params: Params, adapter: LoraAdapter, model: ModelConfig) -> Params:
    """Plain-array params with the adapter merged in (W + scale * A @ B): what an exported merged
    model holds, and an independent path to the adapted model's outputs."""
    layers = params.layers
    updates = {}
    for matrix, (modules, a, bs) in fused_factors(adapter, model).items():
        base = getattr(layers, matrix)
        deltas = {m: jnp.einsum("lir,lro->lio", part, b) for m, part, b in zip(modules, _split_rank(a, bs), bs)}
        updates[matrix] = (base + _fuse_outputs(matrix, deltas, model)).astype(base.dtype)
    return dataclasses.replace(params, layers=dataclasses.replace(layers, **updates))


def check_adapter(adapter: LoraAdapter, model: ModelConfig) -> None:
    """Refuse an adapter whose factors do not fit ``model`` (trained on another base model)."""
    cfg = adapter.config
    cfg.check_fits(model)
    for m in cfg.target_modules:
        n_in, n_out = module_shape(m, model)
        for name, factors, want in (("lora_A", adapter.a, (model.num_layers, n_in, cfg.r)),
                                    ("lora_B", adapter.b, (model.num_layers, cfg.r, n_out))):
            if m not in factors:
                raise AdapterError(f"the adapter targets {m} but has no {name} factors for it")
            if tuple(factors[m].shape) != want:
                raise AdapterError(f"{m} {name} is {_peft_shape(factors[m].shape)} over "
                                   f"{factors[m].shape[0]} layers; this model needs {_peft_shape(want)} over "
                                   f"{model.num_layers}: an adapter for another base model")


def _peft_shape(stacked) -> list[int]:
    """One layer's factor shape as PEFT stores it ([r, in] or [out, r]) from ours ([L, in, r] or [L, r, out])."""
    return [stacked[2], stacked[1]]


# ---------------------------------------------------------------------------- PEFT files
def _key(layer: int, module: str, factor: str) -> str:
    return f"base_model.model.model.layers.{layer}.{_PARENT[module]}.{module}.{factor}.weight"


# Settings PEFT may write that change what the adapter computes, with the value that does not.
_UNSUPPORTED = {"use_dora": (False, None), "modules_to_save": (None, []), "layers_to_transform": (None, []),
                "layers_pattern": (None, [], ""), "rank_pattern": (None, {}), "alpha_pattern": (None, {}),
                "bias": ("none", None), "fan_in_fan_out": (False, None), "use_qalora": (False, None),
                "lora_bias": (False, None), "trainable_token_indices": (None, {}, []),
                "target_parameters": (None, [])}


def config_from_peft(raw: dict, source: str) -> LoraConfig:
    """A ``LoraConfig`` from an ``adapter_config.json`` object; anything this engine would compute
    differently from PEFT is refused, naming the field."""
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{source}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
    for field, harmless in _UNSUPPORTED.items():
        if field in raw and raw[field] not in harmless:
            raise AdapterError(f"{source}: {field} = {raw[field]!r} is not supported (only {harmless[0]!r})")
    task = raw.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise AdapterError(f"{source}: task_type {task!r} is not supported (only CAUSAL_LM)")
    modules = raw.get("target_modules")
    if modules == "all-linear":
        modules = MODULES
    if isinstance(modules, str):
        raise AdapterError(f"{source}: target_modules as a pattern ({modules!r}) is not supported: list the "
                           f"modules, from {', '.join(MODULES)}")
    if not isinstance(modules, (list, tuple)):
        raise AdapterError(f"{source}: target_modules must be a list of module names, got {modules!r}")
    for field in ("r", "lora_alpha"):
        if field not in raw:
            raise AdapterError(f"{source}: missing {field}")
    try:
        return LoraConfig(r=raw["r"], lora_alpha=raw["lora_alpha"], target_modules=tuple(modules),
                          use_rslora=bool(raw.get("use_rslora", False)), lora_dropout=raw.get("lora_dropout", 0.0),
                          base_model_name_or_path=raw.get("base_model_name_or_path"))
    except AdapterError as e:
        raise AdapterError(f"{source}: {e}") from None


def peft_config(config: LoraConfig) -> dict:
    """``adapter_config.json``'s object for ``config``, as PEFT writes one."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": config.base_model_name_or_path,
            "r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "target_modules": list(config.target_modules), "use_rslora": config.use_rslora, "bias": "none",
            "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}, "revision": None}


def load_peft(path: str | os.PathLike, model: ModelConfig, dtype=jnp.float32) -> LoraAdapter:
    """Read a PEFT adapter directory (``adapter_config.json`` and ``adapter_model.safetensors``)
    for ``model``; ``AdapterError`` names what does not fit."""
    from specjax.checkpoints.hf import SafetensorsFile

    directory = Path(path)
    if not directory.is_dir():
        raise AdapterError(f"adapter directory {directory} does not exist")
    try:
        config = config_from_peft(read_json_object(directory / ADAPTER_CONFIG, AdapterError), str(directory))
    except CheckpointError as e:
        raise AdapterError(str(e)) from None
    config.check_fits(model)
    weights_path = directory / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        other = " (adapter_model.bin is PyTorch pickle: save it with safe_serialization)" if (
            directory / "adapter_model.bin").is_file() else ""
        raise AdapterError(f"missing {ADAPTER_WEIGHTS} in {directory}{other}")
    try:
        weights = SafetensorsFile(weights_path)
    except CheckpointError as e:
        raise AdapterError(str(e)) from None
    expected = {_key(i, m, f) for i in range(model.num_layers) for m in config.target_modules
                for f in ("lora_A", "lora_B")}
    names = set(weights.names())
    if extra := sorted(names - expected):
        layers = [n for n in extra if ".layers." in n and int(n.split(".layers.")[1].split(".")[0]) >= model.num_layers]
        why = (f"the adapter has layers past this model's {model.num_layers}: an adapter for another base model"
               if layers else "tensors this engine does not apply")
        raise AdapterError(f"{weights_path}: unexpected tensor {extra[0]!r} ({len(extra)} in all): {why}")
    if missing := sorted(expected - names):
        raise AdapterError(f"{weights_path}: missing tensor {missing[0]!r} ({len(missing)} in all)")
    a, b = {}, {}
    for m in config.target_modules:
        n_in, n_out = module_shape(m, model)
        for factor, want, store in (("lora_A", (config.r, n_in), a), ("lora_B", (n_out, config.r), b)):
            layers = []
            for i in range(model.num_layers):
                x = np.asarray(weights.get(_key(i, m, factor)))
                if tuple(x.shape) != want:
                    raise AdapterError(f"{_key(i, m, factor)} is {list(x.shape)}, this model needs {list(want)}: "
                                       "an adapter for another base model (or another r)")
                layers.append(x.astype(np.float32).T)
            store[m] = jnp.asarray(np.stack(layers), dtype)
    return LoraAdapter(a=a, b=b, config=config)


def save_peft(path: str | os.PathLike, adapter: LoraAdapter) -> Path:
    """Write ``adapter`` as a PEFT adapter directory (fp32 factors); returns the directory. The
    weights are written to a temporary name first, so a reader never sees half a file."""
    from safetensors.numpy import save_file

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for m in adapter.config.target_modules:
        a, b = np.asarray(adapter.a[m], np.float32), np.asarray(adapter.b[m], np.float32)
        for i in range(a.shape[0]):
            tensors[_key(i, m, "lora_A")] = np.ascontiguousarray(a[i].T)
            tensors[_key(i, m, "lora_B")] = np.ascontiguousarray(b[i].T)
    tmp = directory / (ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / ADAPTER_WEIGHTS)
    tmp = directory / (ADAPTER_CONFIG + ".tmp")
    tmp.write_text(json.dumps(peft_config(adapter.config), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, directory / ADAPTER_CONFIG)
    return directory


# ---------------------------------------------------------------------------- many adapters per batch
def _values(w, index: tuple, dtype) -> jax.Array:
    """``w[index]`` in ``dtype``, for slots as an array or ``Bf16Bits``, or one layer's of them
    read in place (``AtLayer``: only the indexed part of that layer is read)."""
    if isinstance(w, AtLayer):
        return _values(w.stacked, (w.layer,) + index, dtype)
    if isinstance(w, Bf16Bits):
        return Bf16Bits(w.bits[index]).widen().astype(dtype)
    return w[index].astype(dtype)


def _set_slot(w, slot, values: jax.Array):
    """``w`` ([L, S + 1, ...], an array or ``Bf16Bits``) with ``values`` [L, ...] in ``slot``."""
    if isinstance(w, Bf16Bits):
        return Bf16Bits(w.bits.at[:, slot].set(Bf16Bits.pack(values).bits))
    return w.at[:, slot].set(values.astype(w.dtype))


@pytree_dataclass
class LoraSlots:
    """Device slots for the adapters a batch may use, in ``fused_factors``' layout at one rank:
    per fused matrix, a [L, S + 1, in, n * R] (its n modules' A side by side) and b, one
    [L, S + 1, R, out_m] per module (scale folded in). Slot 0 is all zeros: rows without an
    adapter use it, so a batch mixes adapted and base rows in one executable. Stored as the base
    weights are (``Bf16Bits`` beside bf16-bit weights: reading the slots is most of their cost).
    ``kernel``: how a step batches the rows' products (``GROUPED_LORA``)."""

    a: dict
    b: dict
    kernel: str = static_field(default="auto")

    @property
    def num_slots(self) -> int:
        """Adapter slots, slot 0 (no adapter) not counted."""
        return next(iter(self.a.values())).shape[1] - 1

    @property
    def rank(self) -> int:
        return self.b["wo"][0].shape[-2]


def init_slots(model: ModelConfig, max_loras: int, max_rank: int, dtype=jnp.float32, kernel: str = "auto",
               bf16_bits: bool = False) -> LoraSlots:
    """Empty slots for ``max_loras`` adapters of rank up to ``max_rank`` on every projection, as
    ``dtype`` arrays or, with ``bf16_bits``, as ``Bf16Bits``."""
    if kernel not in GROUPED_LORA:
        raise ValueError(f"kernel must be one of {', '.join(GROUPED_LORA)}, got {kernel!r}")

    def zeros(shape):
        return Bf16Bits(jnp.zeros(shape, jnp.uint16)) if bf16_bits else jnp.zeros(shape, dtype)

    a, b = {}, {}
    for matrix, modules in FUSED.items():
        n_in = module_shape(modules[0], model)[0]
        a[matrix] = zeros((model.num_layers, max_loras + 1, n_in, max_rank * len(modules)))
        b[matrix] = tuple(zeros((model.num_layers, max_loras + 1, max_rank, module_shape(m, model)[1]))
                          for m in modules)
    return LoraSlots(a=a, b=b, kernel=kernel)


def write_slot(slots: LoraSlots, slot: int, adapter: LoraAdapter, model: ModelConfig) -> LoraSlots:
    """``slots`` with ``adapter`` in ``slot`` (1 .. num_slots), padded to the slots' rank."""
    if isinstance(slot, int) and not 1 <= slot <= slots.num_slots:  # (traced under jit: the caller's check)
        raise ValueError(f"slot {slot} is not one of 1 .. {slots.num_slots}")
    check_adapter(adapter, model)
    factors = fused_factors(adapter, model, rank=slots.rank)
    return LoraSlots(a={m: _set_slot(x, slot, factors[m][1]) for m, x in slots.a.items()},
                     b={m: tuple(_set_slot(x, slot, f) for x, f in zip(bs, factors[m][2]))
                        for m, bs in slots.b.items()},
                     kernel=slots.kernel)


def _f32_einsum(spec: str, *operands):
    return jnp.einsum(spec, *operands, preferred_element_type=jnp.float32,
                      precision=matmul_precision(operands[0].dtype))


# Each kernel: x [B, T, in], a [S + 1, in, R] (modules' A side by side), bs one [S + 1, r_m, out_m]
# per module, rows [B] slot per row -> one [B, T, out_m] float32 product per module. Slot arrays may
# be ``Bf16Bits``.
def grouped_lora_reference(x, a, bs, rows) -> tuple:
    """Each row's low-rank products, one row at a time: the plain reference of the kernels below."""
    outs = []
    for i in range(x.shape[0]):
        low = x[i].astype(jnp.float32) @ _values(a, (rows[i],), jnp.float32)
        outs.append([part @ _values(b, (rows[i],), jnp.float32) for part, b in zip(_split_rank(low, bs), bs)])
    return tuple(jnp.stack(per_module) for per_module in zip(*outs))


def grouped_lora_gather(x, a, bs, rows) -> tuple:
    """BGMV: each row gathers its slot's factors (B small matrices read, whatever the mix)."""
    low = _f32_einsum("bti,bir->btr", x, _values(a, (rows,), x.dtype))
    return tuple(_f32_einsum("btr,bro->bto", part.astype(x.dtype), _values(b, (rows,), x.dtype))
                 for part, b in zip(_split_rank(low, bs), bs))


def grouped_lora_onehot(x, a, bs, rows) -> tuple:
    """Every slot's product for every row, the row's own kept by a one-hot mask: each slot's
    factors read once, S times the low-rank work (slot 0, all zeros, is skipped)."""
    mask = jax.nn.one_hot(rows - 1, a.shape[0] - 1, dtype=x.dtype)  # row 0 (no adapter): all zeros
    low = _f32_einsum("bti,sir->btsr", x, _values(a, (slice(1, None),), x.dtype)) * mask[:, None, :, None]
    return tuple(_f32_einsum("btsr,sro->bto", part.astype(x.dtype), _values(b, (slice(1, None),), x.dtype))
                 for part, b in zip(_split_rank(low, bs), bs))


def grouped_lora_ragged(x, a, bs, rows) -> tuple:
    """Rows sorted by slot, then ``lax.ragged_dot`` over the groups (SGMV's form)."""
    bsz, t, n_in = x.shape
    token_rows = jnp.repeat(rows, t)
    order = jnp.argsort(token_rows, stable=True)
    sizes = jnp.bincount(token_rows, length=a.shape[0]).astype(jnp.int32)
    everything = (slice(None),)
    low = jax.lax.ragged_dot(x.reshape(bsz * t, n_in)[order], _values(a, everything, x.dtype), sizes,
                             preferred_element_type=jnp.float32)
    outs = []
    for part, b in zip(_split_rank(low, bs), bs):
        out = jax.lax.ragged_dot(part.astype(x.dtype), _values(b, everything, x.dtype), sizes,
                                 preferred_element_type=jnp.float32)
        outs.append(jnp.zeros_like(out).at[order].set(out).reshape(bsz, t, -1))
    return tuple(outs)


def grouped_lora_auto(x, a, bs, rows) -> tuple:
    """By the step's (static) shape: "onehot" for decode rows at least as many as the slots (each
    slot's factors read once, not once per row), "gather" otherwise (fewer rows than slots, or
    prefill, where onehot's S times the low-rank work is no longer free)."""
    slots = a.shape[0] - 1
    if x.shape[1] == 1 and x.shape[0] >= slots:
        return grouped_lora_onehot(x, a, bs, rows)
    return grouped_lora_gather(x, a, bs, rows)


GROUPED_LORA = {"auto": grouped_lora_auto, "gather": grouped_lora_gather, "onehot": grouped_lora_onehot,
                "ragged": grouped_lora_ragged}


@pytree_dataclass
class RowLoraLinear(OverBase):
    """A frozen projection with each row's adapter: ``x[i] @ base + fuse((x[i] @ a[s])_m @ b_m[s])``
    for x [B, T, in] and s = rows[i]; a and b as in ``LoraSlots`` (for one matrix), rows [B] slot
    indices (0: none), all with a leading layer axis when stacked (a and b as ``ReadInPlace``,
    so a layer body sees them as ``AtLayer``). ``kernel``: how the rows' products are batched
    (``GROUPED_LORA``); ``matrix``/``model``: how the modules' outputs fuse."""

    base: object
    a: jax.Array
    b: tuple
    rows: jax.Array
    kernel: str = static_field()
    matrix: str = static_field()
    model: ModelConfig = static_field()


@update.register
def _(w: RowLoraLinear, x: jax.Array) -> jax.Array:
    def deltas():
        parts = GROUPED_LORA[w.kernel](x, w.a, w.b, w.rows)
        return _fuse_outputs(w.matrix, dict(zip(FUSED[w.matrix], parts)), w.model).astype(x.dtype)

    out = x.shape[:-1] + (sum(module_shape(m, w.model)[1] for m in FUSED[w.matrix]),)
    # A step none of whose rows has an adapter (most steps on a server with few adapter requests) skips the work.
    return jax.lax.cond(jnp.any(w.rows > 0), deltas, lambda: jnp.zeros(out, x.dtype))


def with_row_adapters(params: Params, slots: LoraSlots, rows: jax.Array, model: ModelConfig) -> Params:
    """``params`` whose projections add each row's adapter (``rows`` [B]: slot per row, 0 none)."""
    layers = params.layers
    per_layer = jnp.broadcast_to(rows.astype(jnp.int32), (layers.attn_norm.shape[0],) + rows.shape)
    # The slots are read in place: a step reads only its rows' adapters, and none when no row has one.
    updates = {m: RowLoraLinear(getattr(layers, m), ReadInPlace(slots.a[m]), tuple(ReadInPlace(b) for b in slots.b[m]),
                                per_layer, slots.kernel, m, model)
               for m in slots.a}
    return dataclasses.replace(params, layers=dataclasses.replace(layers, **updates))
