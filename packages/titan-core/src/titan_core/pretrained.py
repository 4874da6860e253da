"""``load_pretrained``: a trained model from a checkpoint, ready for inference."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from titan_core.checkpoint import META_FILE, complete_steps, step_dir
from titan_core.errors import UserError
from titan_core.train_spec import get_train_spec


def _step_folder(path: Path) -> Path:
    """``path`` itself if it is a checkpoint, else the newest complete one under it."""
    if (path / META_FILE).is_file():
        return path
    for folder in (path, path / "checkpoint"):
        steps = complete_steps(folder)
        if steps:
            return step_dir(folder, steps[-1])
    raise UserError(
        f"load_pretrained: {path} is not a titan checkpoint (no {META_FILE}) and holds no "
        "complete step-N/ checkpoint; pass a step-N folder, a checkpoint folder or a dump folder"
    )


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model a checkpoint describes and load its weights; returned in eval mode.

    Args:
        path: a ``step-N`` checkpoint folder, the checkpoint folder holding them (the newest
            complete one is used), or a run's dump folder.
        device: where the model's weights go.

    Returns:
        The model: ``model(tokens)`` maps (B, S) token ids to (B, S, vocab) logits.
    """
    folder = Path(path)
    if not folder.exists():
        raise UserError(f"load_pretrained: {folder} does not exist")
    folder = _step_folder(folder)
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    spec = get_train_spec(meta["model"])
    if meta["flavor"] not in spec.flavors:
        raise UserError(
            f"load_pretrained: {folder} is {meta['model']} flavor '{meta['flavor']}', which the "
            f"installed package does not have (flavors: {', '.join(spec.flavors)})"
        )
    args = spec.flavors[meta["flavor"]]
    saved = meta.get("model_args", {})
    if "max_seq_len" in saved and hasattr(args, "max_seq_len"):
        args = dataclasses.replace(args, max_seq_len=saved["max_seq_len"])
    with torch.device("meta"):
        model = spec.model_cls(args)
    model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.init_weights()  # buffers (RoPE tables); every weight is overwritten below
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    model.load_state_dict(state["model"])
    return model.eval()
