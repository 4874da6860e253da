"""The run's own folder (``job.dump_folder``): checked before anything is written, then prepared.

A new run never erases an earlier one: its ``config.toml``, ``metrics.jsonl`` and ``tb/`` are moved
to ``previous-runs/<time>/`` first. A resumed run appends to its own files instead.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from titan_core.errors import UserError

logger = logging.getLogger("titan")

RUN_FILES = ("config.toml", "metrics.jsonl")


def check_dump_folder(value: str) -> Path:
    """Refuse a dump folder that is empty, not a folder, or not writable; write nothing.

    Args:
        value: ``job.dump_folder`` as configured.

    Returns:
        The folder as a path (it may not exist yet).
    """
    if not value.strip():
        raise UserError(
            "job.dump_folder: empty; name the folder for this run's outputs "
            "(e.g. --job.dump_folder ./outputs)"
        )
    dump = Path(value)
    existing = dump
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is" if existing == dump else f"lies under {existing}, which is"
        raise UserError(f"job.dump_folder: {dump} {what} a file, not a folder; pick a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == dump else f" ({existing} cannot hold new folders)"
        raise UserError(
            f"job.dump_folder: {dump} is not writable{where}; pick a folder you can write to"
        )
    return dump


def archive_previous_run(dump: Path, tb_folder: str = "tb") -> None:
    """Move an earlier run's files (and its TensorBoard folder ``tb_folder``) to
    ``previous-runs/<time>/`` so a new run never erases them."""
    present = [dump / name for name in (*RUN_FILES, tb_folder) if (dump / name).exists()]
    if not present:
        return
    target = dump / "previous-runs" / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True, exist_ok=True)
    for path in present:
        path.rename(target / path.name)
    logger.info("moved the previous run's files in %s to %s", dump, target)


def prepare_dump_folder(dump: Path, config_toml: str, resumed: bool, tb_folder: str = "tb") -> None:
    """Create the folder, keep an earlier run's files (unless ``resumed``), write the config."""
    try:
        dump.mkdir(parents=True, exist_ok=True)
        if not resumed:  # a resumed run appends to its own files
            archive_previous_run(dump, tb_folder)
        (dump / "config.toml").write_text(config_toml, encoding="utf-8")
    except OSError as e:
        raise UserError(
            f"job.dump_folder: cannot write to {dump} ({e.strerror or e}); "
            "pick a folder you can write to"
        ) from None
