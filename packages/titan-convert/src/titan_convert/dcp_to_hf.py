"""titan checkpoint -> HF folder (config.json, sharded safetensors, index, tokenizer files)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from titan_convert.output import Progress, check_output, staged
from titan_core.errors import UserError
from titan_core.hf import DEFAULT_MAX_SHARD_BYTES, CheckpointExport
from titan_core.pretrained import checkpoint_folder

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str) -> int:
    """``5GB``, ``500MiB`` or a byte count -> bytes."""
    match = _SIZE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise UserError(
            f"--max-shard-size '{text}': expected a positive size such as 5GB, 500MB or 2GiB"
        )
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def dcp_to_hf(
    ckpt_dir: Path,
    out_dir: Path,
    export_dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Convert a titan checkpoint into the HF folder ``out_dir``.

    Everything is checked before anything is written: the checkpoint's model, its tensors
    against its args, and ``out_dir``.

    Args:
        ckpt_dir: a ``step-N`` folder, or a checkpoint or dump folder (its newest complete step).
        out_dir: the HF folder to create.
        export_dtype: dtype of the safetensors weights (float32 keeps a float32 checkpoint's
            bits exactly).
        overwrite: replace a non-empty ``out_dir``.
        max_shard_bytes: the largest safetensors shard.
    """
    if not ckpt_dir.exists():
        raise UserError(f"CKPT_DIR {ckpt_dir} does not exist")
    folder = checkpoint_folder(ckpt_dir, who="CKPT_DIR")
    export = CheckpointExport(folder, export_dtype)
    check_output(out_dir, folder, overwrite)
    progress = Progress(export.total_bytes, "dcp-to-hf")
    with staged(out_dir) as temp:
        export.write(temp, max_shard_bytes, progress.update)
        progress.close()
    return out_dir
