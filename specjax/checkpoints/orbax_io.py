"""specjax's native checkpoint: Params saved with orbax, the ModelConfig as JSON beside them.

Layout of a checkpoint directory::

    specjax_config.json   {"format": "specjax-orbax", "version": 2, "config": {ModelConfig fields}}
    params/               orbax StandardCheckpointHandler tree of Params (None leaves stay None)
    tokenizer.json ...    optional, written by Tokenizer.save (makes the directory loadable by load_model)

Restoring reads the saved array metadata to build the restore target, so weights come back with the
dtypes they were saved with, placed on the default device or with the shardings asked for. Version
1 checkpoints hold the fused q/k/v and gate/up matrices in contiguous blocks; they are regrouped
(``params.regroup_legacy_layers``) as they are read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from specjax.config import ModelConfig, RopeScaling
from specjax.params import CheckpointError, LayerWeights, Params, random_params, read_json_object, regroup_legacy_layers
from specjax.tokenizer import Tokenizer

CONFIG_FILE = "specjax_config.json"
PARAMS_DIR = "params"
_FORMAT, _VERSION = "specjax-orbax", 2
_READABLE = (1, 2)  # 1: fused matrices in contiguous blocks, regrouped when read


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)  # nests rope_scaling as a dict
    d["eos_token_ids"] = list(config.eos_token_ids)
    return d


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    rope = d.pop("rope_scaling", None)
    eos = tuple(d.pop("eos_token_ids", ()))
    try:
        return ModelConfig(**d, rope_scaling=RopeScaling(**rope) if rope else None, eos_token_ids=eos)
    except TypeError as e:  # unknown or missing field names
        raise CheckpointError(f"{CONFIG_FILE} does not describe a ModelConfig: {e}") from None


def save_checkpoint(directory: str | os.PathLike, config: ModelConfig, params: Params,
                    tokenizer: Tokenizer | None = None, *, overwrite: bool = False) -> None:
    """Save ``params`` (shapes checked against ``config``) and ``config``; with ``tokenizer`` too, the
    directory is a complete model for :func:`~specjax.checkpoints.load_model`."""
    directory = Path(directory).absolute()
    _check_shapes(config, jax.tree_util.tree_map(lambda x: x.shape, params), f"params for {directory}")
    if (directory / PARAMS_DIR).exists() and not overwrite:
        raise CheckpointError(f"{directory} already holds a checkpoint; pass overwrite=True to replace it")
    directory.mkdir(parents=True, exist_ok=True)
    # Synchronous checkpointer: the caller waits for the write anyway, so async saving buys nothing.
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, args=ocp.args.StandardSave(params), force=overwrite)
    meta = {"format": _FORMAT, "version": _VERSION, "config": config_to_dict(config)}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(directory)


def restore_checkpoint(directory: str | os.PathLike, shardings: Params | None = None) -> tuple[ModelConfig, Params]:
    """Load ``(config, params)`` written by :func:`save_checkpoint`; CheckpointError if missing or
    corrupt. ``shardings``: a Params of ``jax.sharding.Sharding`` (``sharding.param_shardings``) to
    read the arrays into; default: the first device."""
    directory = Path(directory).absolute()
    config, version = _read_meta(directory)
    params_dir = directory / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{directory} has no {PARAMS_DIR}/ directory")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    # Old layouts are regrouped on the host first, then placed.
    read_into = shardings if shardings is not None and version == _VERSION else None
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
            tree = getattr(checkpointer.metadata(params_dir).item_metadata, "tree", None)
            if tree is None:
                raise CheckpointError(f"orbax checkpoint {params_dir} is corrupt or unreadable: "
                                      "its array metadata is missing or damaged")
            target = _params_from_tree(tree, lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device))
            if read_into is not None:
                target = jax.tree_util.tree_map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s),
                                                target, read_into)
            _check_shapes(config, jax.tree_util.tree_map(lambda x: x.shape, target), str(params_dir))
            params = checkpointer.restore(params_dir, args=ocp.args.StandardRestore(target))
    except CheckpointError:
        raise
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise CheckpointError(f"orbax checkpoint {params_dir} is corrupt or unreadable "
                              f"({type(e).__name__}: {str(e)[:300]})") from None
    if version == 1:
        params = dataclasses.replace(params, layers=regroup_legacy_layers(params.layers, config))
        if shardings is not None:
            params = jax.device_put(params, shardings)
    return config, params


def read_checkpoint_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint directory, without reading its arrays."""
    return _read_meta(directory)[0]


def _read_meta(directory: str | os.PathLike) -> tuple[ModelConfig, int]:
    """(ModelConfig, format version) of a checkpoint directory."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a specjax checkpoint (no {CONFIG_FILE})")
    meta = read_json_object(path)
    if meta.get("format") != _FORMAT or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path} is not a {_FORMAT} config file")
    if meta.get("version") not in _READABLE:
        raise CheckpointError(f"{path} has format version {meta.get('version')!r}; this specjax reads "
                              f"{', '.join(map(str, _READABLE))}")
    return config_from_dict(meta["config"]), meta["version"]


def _params_from_tree(tree: Any, leaf) -> Params:
    """Params from orbax's nested-dict metadata, mapping each array entry through ``leaf``."""
    def build(cls, node: dict):
        fields = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(node, dict) or set(node) != set(fields):
            raise CheckpointError(f"saved tree does not match {cls.__name__} (fields {sorted(fields)})")
        return cls(**{k: None if node[k] is None else
                      build(LayerWeights, node[k]) if k == "layers" else leaf(node[k]) for k in fields})
    return build(Params, tree)


def _check_shapes(config: ModelConfig, shapes: Params, what: str) -> None:
    """Raise CheckpointError unless every array of ``shapes`` (a Params of shape tuples) fits ``config``."""
    expected = jax.eval_shape(lambda: random_params(config, jax.random.key(0)))
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    flat_actual = dict(jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0])
    if flat_expected.keys() != flat_actual.keys():
        names = sorted(jax.tree_util.keystr(k) for k in flat_expected.keys() ^ flat_actual.keys())
        raise CheckpointError(f"{what}: arrays {', '.join(names)} are present in only one of params and config")
    for key, spec in flat_expected.items():
        if tuple(flat_actual[key]) != spec.shape:
            raise CheckpointError(f"{what}: {jax.tree_util.keystr(key)} has shape {tuple(flat_actual[key])}, "
                                  f"config expects {spec.shape}")
