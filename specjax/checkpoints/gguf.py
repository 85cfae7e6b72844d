"""Load llama.cpp GGUF files (Llama, Mistral, Qwen2) into specjax Params.

The file is memory-mapped by ``gguf.GGUFReader``; each tensor is dequantised to fp32 on the host only
when :func:`~specjax.params.params_from_hf_tensors` asks for it, one at a time. GGUF names are mapped
to HF names and llama.cpp's rotary row order of q/k is undone, so GGUF and safetensors checkpoints
share one conversion path.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from specjax.checkpoints.loaded_model import LoadedModel, merge_eos
from specjax.config import ModelConfig, resolve_dtype
from specjax.params import CheckpointError, params_from_hf_tensors
from specjax.tokenizer import Tokenizer

_Q = gguf.GGMLQuantizationType
# Types we dequantise: float formats and the simple block quants (one scale, or scale+min, per 32).
SUPPORTED_GGUF_TYPES = (_Q.F32, _Q.F16, _Q.BF16, _Q.Q8_0, _Q.Q4_0, _Q.Q4_1)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def unpermute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's conversion permute of a q or k projection, ``[n_heads * head_dim, ...]``.

    HF orders each head's rows as two halves (RoPE rotates row i with row i + head_dim/2); llama.cpp
    rotates adjacent rows, so its converter reorders rows as ``(head, half, i) -> (head, i, half)``.
    Viewing the GGUF rows as ``(head, i, half)`` and swapping the last two restores HF order.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A GGUF file's metadata as ``{key: value}`` (arrays as lists), without touching tensor data."""
    path = Path(path)
    return _metadata(_open_reader(path), path)


def load_gguf(path: str | os.PathLike, dtype=None) -> LoadedModel:
    """Load a GGUF file: config from its metadata, tokenizer from ``tokenizer.ggml.*`` (None when the file
    has none), dequantised weights.

    ``dtype`` is the weight dtype (``None``/"auto": bf16 on accelerators, fp32 on CPU); norms stay fp32.
    Raises CheckpointError for unreadable files and unsupported tensor types, ConfigError for
    architectures specjax does not run; both before any weight is dequantised.
    """
    path = Path(path)
    reader = _open_reader(path)
    meta = _metadata(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    _check_tensors(tensors, path)
    config = ModelConfig.from_gguf_metadata(meta, tied_embeddings="output.weight" not in tensors)
    # Files without tokenizer metadata are weights-only, like a tokenizer-less HF directory.
    tokenizer = Tokenizer.from_gguf_metadata(meta) if "tokenizer.ggml.model" in meta else None
    if tokenizer is not None:
        config = merge_eos(config, tokenizer)

    by_hf_name = {hf_tensor_name(name): t for name, t in tensors.items()}
    rotary_permuted = config.architecture != "qwen2"  # llama.cpp's converter permutes Llama/Mistral only

    def get(name: str) -> np.ndarray:
        t = by_hf_name[name]  # KeyError -> params_from_hf_tensors reports the missing tensor
        w = _dequantize(t)
        if rotary_permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute_rotary_rows(w, config.num_heads if "q_proj" in name else config.num_kv_heads)
        return w

    params = params_from_hf_tensors(config, get, resolve_dtype(dtype))
    return LoadedModel(config=config, params=params, tokenizer=tokenizer, source=f"gguf:{path}")


def _dequantize(t) -> np.ndarray:
    """fp32 array in PyTorch layout: GGUF dims are innermost-first, so ``[in, out]`` reads as ``[out, in]``."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


def _open_reader(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise CheckpointError(f"no GGUF file at {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    if len(head) < 24:
        raise CheckpointError(f"{path} is truncated: {size} bytes is shorter than a GGUF header")
    # Sanity-check the counts first: the reader loops over them, so garbage here would spin for a long time.
    n_tensors, n_kv = struct.unpack("<QQ", head[8:24])
    if n_tensors * 24 + n_kv * 12 > size:
        raise CheckpointError(f"{path} is corrupt or truncated: its header claims {n_tensors} tensors and "
                              f"{n_kv} metadata entries, more than {size} bytes can hold")
    try:
        try:
            reader = _PlainArrayReader(path)
        except TypeError:  # a gguf release whose private _get differs: take the stock reader
            reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/KeyError on damaged files
        raise CheckpointError(f"{path} is corrupt or truncated and cannot be read as GGUF "
                              f"({type(e).__name__}: {e})") from None
    if reader.byte_order != "I":
        raise CheckpointError(f"{path} is a big-endian GGUF file; only little-endian files are supported")
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(f"{path} is truncated: tensor {t.name!r} ends past the end of the file")
    return reader


class _PlainArrayReader(gguf.GGUFReader):
    """GGUFReader that slices a plain ndarray view of its memory map instead of the ``np.memmap`` itself.

    The reader makes ~250k tiny slices while parsing a 49k-token vocabulary, and ``np.memmap``'s
    per-slice bookkeeping made that 3x slower (3 s -> 1 s for SmolLM2). The view shares the mapping,
    so tensor data is still read lazily from the file.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        dtype, count = np.dtype(dtype), int(count)
        arr = plain[offset:offset + dtype.itemsize * count].view(dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(override_order or self.byte_order))


def _metadata(reader: gguf.GGUFReader, path: Path) -> dict:
    try:
        return {key: field.contents() for key, field in reader.fields.items()}
    except (UnicodeDecodeError, IndexError, ValueError) as e:
        raise CheckpointError(f"{path} has corrupt metadata ({type(e).__name__}: {e})") from None


def _check_tensors(tensors: dict, path: Path) -> None:
    supported = ", ".join(q.name for q in SUPPORTED_GGUF_TYPES)
    for name, t in tensors.items():
        if t.tensor_type not in SUPPORTED_GGUF_TYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has type {t.tensor_type.name}, which specjax cannot "
                                  f"dequantise; supported types: {supported}")
    unknown = sorted(name for name in tensors if hf_tensor_name(name) is None)
    if unknown:
        hint = (" (rope_freqs holds Llama-3.1 RoPE scaling, which specjax does not read from GGUF)"
                if "rope_freqs.weight" in unknown else "")
        raise CheckpointError(f"{path} has tensors specjax does not know: {', '.join(unknown[:5])}"
                              f"{' ...' if len(unknown) > 5 else ''}{hint}")
