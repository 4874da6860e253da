"""``load_pretrained``: a trained model from a titan checkpoint or an HF folder, for inference;
``load_pretrained_tokenizer``: the tokenizer it was trained with."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from titan_core.checkpoint_files import (
    META_FILE,
    TOKEN_IDS,
    TOKENIZER_DIR,
    complete_steps,
    model_args_of,
    read_meta,
    single_process_dcp,
    step_dir,
)
from titan_core.checkpoint_safety import load_checkpoint
from titan_core.data.tokenizer import EMBEDDED, Tokenizer, load_tokenizer
from titan_core.errors import UserError
from titan_core.hf import (
    CONFIG_FILE,
    adapter_of,
    read_titan_tensor,
    spec_for_hf_folder,
)
from titan_core.hf_quant import open_hf_reader
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

    spec = spec_for_hf_folder(folder)
    adapter = adapter_of(spec)
    args = adapter.args_from_hf_folder(folder)
    reader = open_hf_reader(folder)
    reader.validate(adapter.expected_hf(args), adapter.ignorable_hf(args, reader.keys()))
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

    if (folder / CONFIG_FILE).is_file() and not (folder / META_FILE).is_file():
        return _load_hf(folder, device).eval()
    return _load_checkpoint(folder, device).eval()


_WHO = "load_pretrained_tokenizer"
_TOKENIZER_FILE = "tokenizer.json"


def load_pretrained_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer a model was trained with, for the same paths as :func:`load_pretrained`.

    Args:
        path: a Hugging Face folder (its ``tokenizer.json``), or a ``step-N`` checkpoint folder,
            the checkpoint folder holding them or a run's dump folder: the checkpoint's own
            ``tokenizer/`` copy, else the tokenizer its ``titan.json`` names.

    Returns:
        The tokenizer, with the BOS/EOS ids the run trained with.

    Raises:
        UserError: no tokenizer can be found for ``path`` (one line naming what was looked at).
    """
    folder = Path(path)
    if not folder.exists():
        raise UserError(f"{_WHO}: {folder} does not exist")
    if (folder / CONFIG_FILE).is_file() and not (folder / META_FILE).is_file():
        if not (folder / _TOKENIZER_FILE).is_file():
            raise UserError(
                f"{_WHO}: the Hugging Face folder {folder} has no {_TOKENIZER_FILE}; copy the "
                "model's tokenizer files into it"
            )
        return load_tokenizer(str(folder), field=_WHO)
    step = checkpoint_folder(folder, who=_WHO)
    return _checkpoint_tokenizer(step, read_meta(step))


def _checkpoint_tokenizer(step: Path, meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer of a checkpoint: its ``tokenizer/`` copy, else the one titan.json names."""
    own = step / TOKENIZER_DIR
    name = meta.get("tokenizer")
    if (own / _TOKENIZER_FILE).is_file():
        tokenizer = load_tokenizer(str(own), field=_WHO)
    elif name == EMBEDDED:
        tokenizer = load_tokenizer(EMBEDDED, field=_WHO)
    elif isinstance(name, str) and name and (Path(name) / _TOKENIZER_FILE).is_file():
        tokenizer = load_tokenizer(name, field=_WHO)
    else:
        raise UserError(
            f"{_WHO}: {step} holds no {TOKENIZER_DIR}/{_TOKENIZER_FILE} and its {META_FILE} "
            f"names the tokenizer {name!r}, which is not a folder holding {_TOKENIZER_FILE}; "
            f"copy the tokenizer the model was trained with into {step / TOKENIZER_DIR}"
        )
    # NOTE: the ids the run trained with (a TrainSpec's build_tokenizer_fn may choose them).
    ids = meta.get(TOKEN_IDS) or {}
    tokenizer.bos_id = ids.get("bos_token_id", tokenizer.bos_id)
    tokenizer.eos_id = ids.get("eos_token_id", tokenizer.eos_id)
    tokenizer.pad_id = ids.get("pad_token_id", tokenizer.pad_id)
    return tokenizer
