"""HF folder -> titan checkpoint (DCP + ``titan.json``), one tensor in memory at a time."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItem

from titan_convert.output import Progress, check_output, staged
from titan_core.checkpoint import META_FILE, single_process_dcp
from titan_core.checkpoint_files import TOKEN_IDS, TOKENIZER_DIR
from titan_core.data import load_tokenizer
from titan_core.errors import UserError
from titan_core.hf import (
    GENERATION_CONFIG_FILE,
    adapter_of,
    flavor_name,
    read_hf_config,
    read_titan_tensor,
    spec_for_hf_folder,
)
from titan_core.hf_export import save_tokenizer_files, token_ids
from titan_core.hf_quant import open_hf_reader

TOKENIZER_FILE = "tokenizer.json"


class StreamingSavePlanner(DefaultSavePlanner):
    """Plans a DCP save from meta tensors and reads each tensor only when DCP writes it.

    DCP needs only names, shapes and dtypes to plan; the storage writer then asks for the
    tensors one by one through :meth:`resolve_data`, so one tensor is in memory at a time.

    Args:
        read: titan name -> the tensor to store.
    """

    def __init__(self, read: Any) -> None:
        super().__init__()
        self.read = read

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        return self.read(write_item.index.fqn.removeprefix("model."))


@contextlib.contextmanager
def _no_record_checksums() -> Iterator[None]:
    """DCP stores each tensor as a ``torch.save`` record; its CRC-32 costs ~0.4 s per GB of CPU
    here and nothing reads it (``torch.load`` does not check it), so conversions skip it."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def _describe(spec: Any, args: Any, hf_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """``titan.json`` of a converted checkpoint: what the trainer writes for a seed checkpoint,
    plus the HF config files, so converting back keeps token ids and generation settings."""
    from titan_core.config import JobConfig, to_toml

    flavor = flavor_name(spec, args)
    tokenizer = str(hf_dir.resolve()) if (hf_dir / TOKENIZER_FILE).is_file() else None
    job = JobConfig()
    job.model.name, job.model.flavor = spec.name, flavor
    if tokenizer is not None:
        job.model.hf_assets_path = tokenizer
    generation = hf_dir / GENERATION_CONFIG_FILE
    return {
        "step": 0,
        "model_only": True,
        "tokens_seen": 0,
        "model": spec.name,
        "flavor": flavor,
        "model_args": dataclasses.asdict(args),
        "tokenizer": tokenizer,
        TOKEN_IDS: _token_ids(hf_dir) if tokenizer is not None else {},
        "config": to_toml(job),
        "converted_from": str(hf_dir.resolve()),
        "hf_config": config,
        "hf_generation_config": json.loads(generation.read_text(encoding="utf-8"))
        if generation.is_file()
        else None,
    }


def _token_ids(hf_dir: Path) -> dict[str, int]:
    """The ids of the folder's tokenizer; none if titan cannot read it (its files are still
    copied, and an export keeps config.json's ids)."""
    try:
        return token_ids(load_tokenizer(str(hf_dir), field="HF_DIR"))
    except UserError:
        return {}


def hf_to_dcp(
    hf_dir: Path,
    out_dir: Path,
    model_name: str | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Convert the HF folder ``hf_dir`` into the titan checkpoint folder ``out_dir``.

    Everything is checked before anything is written: config.json, the family, every tensor's
    name and shape, every shard's size.

    Args:
        hf_dir: config.json and safetensors weights.
        out_dir: the checkpoint folder to create (``load_pretrained`` and the trainer's
            ``checkpoint.initial_load_path`` read it).
        model_name: the titan model family; default: the one claiming config.json's model_type.
        dtype: dtype of the stored weights.
        overwrite: replace a non-empty ``out_dir``.
    """
    spec = spec_for_hf_folder(hf_dir, model_name)
    adapter = adapter_of(spec)
    config = read_hf_config(hf_dir)
    args = adapter.args_from_hf_folder(hf_dir)
    reader = open_hf_reader(hf_dir)
    reader.validate(adapter.expected_hf(args), adapter.ignorable_hf(args, reader.keys()))
    check_output(out_dir, hf_dir, overwrite)

    shapes = adapter.titan_shapes(args)
    progress = Progress(sum(s.numel() for s in map(torch.Size, shapes.values())) * dtype.itemsize,
                        "hf-to-dcp")  # fmt: skip

    # NOTE: the previous tensor is kept for a tied twin (DCP writes same-size tensors one after
    # the other), and dropped before the next read, so one titan tensor is in memory at a time
    # (an MoE layer's experts of one weight, stacked as their HF tensors are read).
    ties = adapter.titan_layout(args)[1]
    last: dict[str, torch.Tensor] = {}

    def read(name: str) -> torch.Tensor:
        source = ties.get(name, name)
        if source not in last:
            last.clear()
            last[source] = read_titan_tensor(reader, adapter, args, source).to(dtype).contiguous()
        progress.update(last[source].nbytes)
        return last[source]

    state = {"model": {k: torch.empty(s, dtype=dtype, device="meta") for k, s in shapes.items()}}
    with staged(out_dir) as temp:
        writer = FileSystemWriter(str(temp), single_file_per_rank=False)
        with single_process_dcp(), _no_record_checksums():
            planner = StreamingSavePlanner(read)
            dcp.save(state, storage_writer=writer, planner=planner, no_dist=True)
        progress.close()
        meta = _describe(spec, args, hf_dir, config)
        save_tokenizer_files(hf_dir, temp / TOKENIZER_DIR)
        (temp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return out_dir
