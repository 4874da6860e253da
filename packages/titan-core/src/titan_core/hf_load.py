"""Hugging Face weights in and out of a training run, under any parallel layout.

``checkpoint.initial_load_in_hf``: every rank reads, tensor by tensor, only the rows (and columns)
of its own shards from the HF safetensors files, through the model family's adapter; nobody
holds a full copy of the model. ``checkpoint.last_save_in_hf``: the final weights are written as
an HF folder (from a model-only DCP checkpoint, converted tensor by tensor by rank 0).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from titan_core.errors import UserError
from titan_core.hf import (
    adapter_of,
    convert_dcp_to_hf,
    read_hf_config,
    read_titan_tensor,
)
from titan_core.hf_quant import open_hf_reader

logger = logging.getLogger("titan")


def hf_model_args(spec: Any, folder: Path) -> Any:
    """The model args an HF folder's config.json describes (its max_position_embeddings).

    Raises:
        UserError: no config.json, or one of another model family.
    """
    adapter = adapter_of(spec)
    config = read_hf_config(folder)
    if config.get("model_type") not in adapter.model_types:
        raise UserError(
            f"checkpoint.initial_load_path: {folder / 'config.json'} has model_type "
            f"'{config.get('model_type')}', not one of {spec.name}'s "
            f"({', '.join(adapter.model_types)}); set model.name to the matching family"
        )
    return adapter.args_from_hf_folder(folder)


def check_hf_source(spec: Any, args: Any, folder: Path) -> None:
    """Before any work: every tensor the model of ``args`` needs is in the folder, with its
    shape."""
    adapter = adapter_of(spec)
    reader = open_hf_reader(folder)
    reader.validate(adapter.expected_hf(args), adapter.ignorable_hf(args, reader.keys()))


def _local_box(tensor: DTensor) -> tuple[slice | None, slice | None] | None:
    """The rows and columns of the global tensor that this rank's shard holds, or None when
    the shard is not one box (a strided FSDP-over-TP shard)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    # NOTE: exact types: _StridedShard (FSDP over TP on the same dim) subclasses Shard.
    if any(type(p) not in (Shard, Replicate) for p in tensor.placements):
        return None
    dims = {p.dim for p in tensor.placements if isinstance(p, Shard)}
    if not dims <= {0, 1} or tensor.dim() == 0:
        return None
    shape, offset = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements
    )
    rows = slice(offset[0], offset[0] + shape[0]) if 0 in dims else None
    cols = slice(offset[1], offset[1] + shape[1]) if 1 in dims else None
    return rows, cols


@torch.no_grad()
def load_hf_weights(trainer: Any, folder: Path) -> None:
    """Copy the HF weights in ``folder`` into the trainer's (parallelised) model parts."""
    adapter = adapter_of(trainer.spec)
    args = trainer.model_args
    reader = open_hf_reader(folder)
    for part in trainer.model_parts:
        for name, tensor in part.state_dict(keep_vars=True).items():
            if isinstance(tensor, DTensor):
                box = _local_box(tensor)
                local = tensor.to_local()
                if box is None:
                    full = read_titan_tensor(reader, adapter, args, name)
                    full = full.to(device=local.device, dtype=local.dtype)
                    shard = distribute_tensor(
                        full, tensor.device_mesh, tensor.placements, src_data_rank=None
                    ).to_local()
                else:
                    rows, cols = box
                    shard = read_titan_tensor(reader, adapter, args, name, rows=rows, cols=cols)
                local.copy_(shard)
            else:
                tensor.copy_(read_titan_tensor(reader, adapter, args, name))


def save_hf_weights(trainer: Any, step: int) -> Path:
    """Write the final model as ``<dump_folder>/hf/`` (config.json, sharded safetensors).

    The weights go through a model-only DCP checkpoint (any layout, PP included), which rank 0
    then converts tensor by tensor.
    """

    dump = Path(trainer.config.job.dump_folder)
    out = dump / "hf"
    staging = dump / ".hf-export"
    checkpointer = trainer.checkpointer
    dtype = trainer.config.checkpoint.export_dtype
    checkpointer.save(step, model_only=True, dtype=dtype, folder=staging)
    source = staging / f"step-{step}"
    if not dist.is_initialized() or dist.get_rank() == 0:
        tmp = staging / "hf"
        convert_dcp_to_hf(source, tmp, export_dtype=getattr(torch, dtype))
        if out.exists():  # an earlier run's export: keep it, as the run's other files are kept
            out.rename(dump / f"hf.previous-{time.strftime('%Y%m%d-%H%M%S')}")
        tmp.rename(out)
        shutil.rmtree(staging, ignore_errors=True)
        logger.info("wrote the final model as a Hugging Face folder: %s", out)
    if dist.is_initialized():
        dist.barrier()
    return out
