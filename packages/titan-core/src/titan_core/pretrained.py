"""``load_pretrained``: a trained model from a titan checkpoint or an HF folder, for inference."""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any

import torch
from torch import nn

from titan_core.checkpoint import META_FILE, complete_steps, single_process_dcp, step_dir
from titan_core.checkpoint_safety import load_checkpoint
from titan_core.errors import UserError
from titan_core.train_spec import TrainSpec, get_train_spec


def checkpoint_folder(path: Path, who: str = "load_pretrained") -> Path:
    """``path`` itself if it is a checkpoint, else the newest complete one under it."""
    if (path / META_FILE).is_file():
        return path
    for folder in (path, path / "checkpoint"):
        steps = complete_steps(folder)
        if steps:
            return step_dir(folder, steps[-1])
    raise UserError(
        f"{who}: {path} is not a titan checkpoint (no {META_FILE}) and holds no "
        "complete step-N/ checkpoint; pass a step-N folder, a checkpoint folder or a dump "
        "folder (or an HF folder with config.json)"
    )


def read_meta(folder: Path) -> dict[str, Any]:
    """A checkpoint's ``titan.json``."""
    path = folder / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read ({e}); the checkpoint is damaged") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise UserError(f"{path} names no model; the checkpoint is damaged")
    return meta


def _dataclass_from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    """``cls(**values)``, building nested dataclass fields (e.g. RoPE scaling) from dicts."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(
            f"{where}: model_args has fields {unknown} that {cls.__name__} lacks; the "
            "checkpoint is from a newer titan or another model (upgrade the model package)"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        nested = [t for t in typing.get_args(hints[name]) if dataclasses.is_dataclass(t)]
        if dataclasses.is_dataclass(hints[name]):
            nested = [hints[name]]
        if isinstance(value, dict) and nested:
            value = _dataclass_from_dict(nested[0], value, where)
        kwargs[name] = value
    return cls(**kwargs)


def model_args_of(spec: TrainSpec, meta: dict[str, Any], where: str) -> Any:
    """The model args a checkpoint's ``titan.json`` stores (its flavor's, if it stores none)."""
    saved = meta.get("model_args") or {}
    flavor = meta.get("flavor")
    if saved:
        cls = type(next(iter(spec.flavors.values())))
        return _dataclass_from_dict(cls, saved, where)
    if flavor not in spec.flavors:
        raise UserError(
            f"{where} is {meta.get('model')} flavor '{flavor}', which the installed package "
            f"does not have (flavors: {', '.join(spec.flavors)})"
        )
    return spec.flavors[flavor]


def build_model(spec: TrainSpec, args: Any, device: str | torch.device) -> nn.Module:
    """The model of ``args`` on ``device``, with buffers (RoPE tables) set; weights undefined."""
    with torch.device("meta"):
        model = spec.model_cls(args)
    model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.init_weights()  # buffers (RoPE tables); every weight is overwritten by the caller
    return model


def _load_checkpoint(folder: Path, device: str | torch.device) -> nn.Module:
    folder = checkpoint_folder(folder)
    meta = read_meta(folder)
    spec = get_train_spec(meta["model"])
    model = build_model(spec, model_args_of(spec, meta, f"load_pretrained: {folder}"), device)
    state = {"model": model.state_dict()}
    with single_process_dcp():
        load_checkpoint(state, folder, no_dist=True)
    model.load_state_dict(state["model"])
    return model


def _load_hf(folder: Path, device: str | torch.device) -> nn.Module:
    from titan_core.hf import (
        HFReader,
        adapter_of,
        read_titan_tensor,
        spec_for_hf_folder,
    )

    spec = spec_for_hf_folder(folder)
    adapter = adapter_of(spec)
    args = adapter.args_from_hf_folder(folder)
    reader = HFReader(folder)
    reader.validate(adapter.expected_hf(args), adapter.redundant_hf(args))
    model = build_model(spec, args, device)
    tied = adapter.titan_layout(args)[1]  # shares its twin's tensor: loaded with it
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name not in tied:
                tensor.copy_(read_titan_tensor(reader, adapter, args, name))
    return model


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model a checkpoint or HF folder describes and load its weights; eval mode.

    Args:
        path: a ``step-N`` checkpoint folder, the checkpoint folder holding them (the newest
            complete one is used), a run's dump folder, or a Hugging Face folder
            (``config.json`` and safetensors) of a family whose package is installed.
        device: where the model's weights go.

    Returns:
        The model: ``model(tokens)`` maps (B, S) token ids to (B, S, vocab) logits.
    """
    folder = Path(path)
    if not folder.exists():
        raise UserError(f"load_pretrained: {folder} does not exist")
    from titan_core.hf import CONFIG_FILE

    if (folder / CONFIG_FILE).is_file() and not (folder / META_FILE).is_file():
        return _load_hf(folder, device).eval()
    return _load_checkpoint(folder, device).eval()
