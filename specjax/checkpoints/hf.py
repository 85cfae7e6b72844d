"""Load Hugging Face model directories (config.json + safetensors, single file or sharded).

safetensors files are read through a small memory-mapped reader of our own rather than
``safetensors.safe_open``: ours returns each tensor as a read-only view of the file, where safe_open
copies it into a new array first (``framework="numpy"``, bf16 only from safetensors 0.8) or onto the
device (``"flax"``, slower still). Loading SmolLM2-135M-shaped bf16 and fp32 files to fp32 or bf16
weights took 3-22% longer through safe_open(numpy) (median of 20 paired runs, 2-core CPU,
safetensors 0.8.0). ``ml_dtypes`` supplies the numpy bf16 type. Tensors are read lazily, one at a
time, while Params are assembled.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from specjax.checkpoints.loaded_model import LoadedModel, merge_eos
from specjax.config import ModelConfig, resolve_dtype
from specjax.params import CheckpointError, params_from_hf_tensors, read_json_object
from specjax.tokenizer import Tokenizer

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER_BYTES = 100 * 2**20  # the format's own limit; a larger length means a corrupt file


class SafetensorsFile:
    """A memory-mapped ``.safetensors`` file: ``names()`` and ``get(name) -> np.ndarray`` (read-only view).

    Layout: an 8-byte little-endian header length N, N bytes of JSON mapping each name to
    ``{dtype, shape, data_offsets: [begin, end]}`` (offsets relative to the data after the header),
    then the data. The header is validated up front so a corrupt file fails here, naming the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"missing weights file {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw_len = f.read(8)
            n = struct.unpack("<Q", raw_len)[0] if len(raw_len) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{self.path} is not a valid safetensors file (bad header length)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path} is not a valid safetensors file (corrupt header: {e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path} is not a valid safetensors file (header is not a JSON object)")
        header.pop("__metadata__", None)
        data_size = size - 8 - n
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for name, entry in header.items():
            try:
                dtype = _DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed or unsupported header "
                                      f"entry {entry!r}") from None
            if end - begin != int(np.prod(shape)) * dtype.itemsize or not 0 <= begin <= end <= data_size:
                raise CheckpointError(f"{self.path} is corrupt or truncated: tensor {name!r} does not fit the file")
            self._entries[name] = (dtype, shape, 8 + n + begin)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> np.ndarray:
        dtype, shape, start = self._entries[name]  # KeyError for a missing tensor, as callers expect
        count = int(np.prod(shape))
        return self._map[start:start + count * dtype.itemsize].view(dtype).reshape(shape)


def load_hf(directory: str | os.PathLike, dtype=None) -> LoadedModel:
    """Load an HF model directory: config.json, model.safetensors or model.safetensors.index.json plus its
    shards, generation_config.json (its eos ids join the config's) and, when tokenizer.json is present,
    the tokenizer (with tokenizer_config.json and chat_template.jinja); otherwise ``tokenizer`` is None.

    ``dtype`` is the weight dtype (``None``/"auto": bf16 on accelerators, fp32 on CPU); norms stay fp32.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no model directory at {directory}")
    config = ModelConfig.from_hf_dict(read_json_object(directory / "config.json"))
    generation = directory / "generation_config.json"
    if generation.is_file():  # lists every end id (Llama-3: <|end_of_text|>, <|eom_id|>, <|eot_id|>)
        eos = read_json_object(generation).get("eos_token_id")
        eos = [e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)]
        config = config.replace(eos_token_ids=tuple(dict.fromkeys(config.eos_token_ids + tuple(eos))))
    get = _weight_reader(directory)
    # A weights-only directory (save_pretrained without a tokenizer) loads with tokenizer None.
    tokenizer = Tokenizer.from_hf_dir(directory) if (directory / "tokenizer.json").is_file() else None
    if tokenizer is not None:
        config = merge_eos(config, tokenizer)
    params = params_from_hf_tensors(config, get, resolve_dtype(dtype))
    return LoadedModel(config=config, params=params, tokenizer=tokenizer, source=f"hf:{directory}")


def _weight_reader(directory: Path):
    """A ``get(name) -> np.ndarray`` over the directory's safetensors, opening shards on first use."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        f = SafetensorsFile(single)
        return f.get
    if not index.is_file():
        legacy = " (PyTorch .bin checkpoints are not supported; convert to safetensors)" if any(
            directory.glob("*.bin")) else ""
        raise CheckpointError(f"{directory} has neither model.safetensors nor model.safetensors.index.json{legacy}")
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} has no 'weight_map' object")
    # Open (and so validate) every shard now, so a missing shard fails before any tensor is converted.
    shards = {name: SafetensorsFile(directory / name) for name in sorted(set(weight_map.values()))}

    def get(name: str) -> np.ndarray:
        return shards[weight_map[name]].get(name)

    return get
