"""DCP checkpoints of the full training state, written atomically, resumable under any layout.

On disk, ``<dump_folder>/<checkpoint.folder>/step-N/`` holds:

- the DCP shards and ``.metadata`` of ``{"model": ..., "optimizer": ...}``, keyed by parameter
  names (FSDP/TP shards are DTensors, so DCP reshards them on load into any layout);
- ``titan.json``: step, tokens seen, the LR scheduler, the data loader's position (every row of
  the global batch, merged from all data-parallel ranks, so it loads under another DP degree),
  the RNG state, and what the checkpoint is (model name, flavor, args, tokenizer, resolved config).

A checkpoint is written to a hidden ``.step-N.partial/`` folder and renamed to ``step-N/`` only
when every rank has finished, so a ``step-N/`` folder is complete by construction; a crash during a
save leaves only a partial folder, which is ignored (and removed by the next save).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    _init_optim_state,
    get_model_state_dict,
    set_model_state_dict,
)

from titan_core.errors import UserError

logger = logging.getLogger("titan")

_STEP_DIR = re.compile(r"^step-(\d+)$")
META_FILE = "titan.json"


def complete_steps(folder: Path) -> list[int]:
    """Steps of the checkpoints in ``folder`` that are complete (both metadata files), sorted."""
    if not folder.is_dir():
        return []
    steps = []
    for path in folder.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / ".metadata").is_file() and (path / META_FILE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def step_dir(folder: Path, step: int) -> Path:
    return folder / f"step-{step}"


def resume_candidates(folder: Path, load_step: int) -> list[int]:
    """Steps to try resuming from, newest first; ``load_step`` >= 0 picks exactly one."""
    steps = complete_steps(folder)
    if load_step < 0:
        return steps[::-1]
    if load_step not in steps:
        listing = ", ".join(map(str, steps)) or "none"
        raise UserError(
            f"checkpoint.load_step={load_step}: no complete checkpoint of that step in {folder} "
            f"(available: {listing}); pick one of them or -1 for the newest"
        )
    return [load_step]


def optimizer_state(parts: list[nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's per-parameter tensors as ``{"<param name>.<key>": tensor}``.

    The values are the optimizer's own tensors, so DCP loads into them in place. Hyperparameters
    are not saved: they come from the config, and the lr from the restored scheduler.
    """
    # NOTE: Adam creates its moments on the first step; a fresh optimizer gets zero-filled ones
    # here (torch's own state-dict helper does the same) so there is something to load into.
    _init_optim_state(optimizer)
    names = {p: name for part in parts for name, p in part.named_parameters()}
    state: dict[str, Any] = {}
    for param, values in optimizer.state.items():
        for key, value in values.items():
            state[f"{names[param]}.{key}"] = value
    return state


def _first_line(error: BaseException) -> str:
    """A short reason; DCP wraps each rank's failure, so take the innermost message's first line."""
    text = str(error).strip()
    for line in text.splitlines():
        if "Error" in line and ":" in line:
            return line.strip()[:200]
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    """Saves and restores the trainer's state under ``<dump_folder>/<checkpoint.folder>``.

    Args:
        trainer: the Trainer whose model parts, optimizer, scheduler and loader are saved.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        cfg = trainer.config
        self.cfg = cfg.checkpoint
        self.folder = Path(cfg.job.dump_folder) / cfg.checkpoint.folder
        self._pruner: threading.Thread | None = None

    # ---- what is saved ---------------------------------------------------------------

    def tensor_state(self) -> dict[str, Any]:
        """Model and optimizer tensors keyed by parameter name, for every model part.

        Names are the same under every layout (a pipeline stage keeps its blocks' names), so
        the state of one layout maps onto another; DCP reshards the DTensors.
        """
        parts = self.trainer.model_parts
        model: dict[str, Any] = {}
        for part in parts:
            model.update(get_model_state_dict(part))
        return {"model": model, "optimizer": optimizer_state(parts, self.trainer.optimizer)}

    def describe(self) -> dict[str, Any]:
        """What the checkpoint is: enough to rebuild the model with no other flag."""
        from titan_core.config import to_toml

        t, c = self.trainer, self.trainer.config
        args = t.model_args
        return {
            "model": c.model.name,
            "flavor": c.model.flavor,
            "model_args": dataclasses.asdict(args) if dataclasses.is_dataclass(args) else {},
            "tokenizer": c.model.hf_assets_path or "embedded",
            "config": to_toml(c),
        }

    def _loader_rows(self) -> dict[str, Any]:
        """Every row position of the global batch, merged from all data-parallel ranks."""
        state = self.trainer.loader.state_dict()
        if dist.is_initialized():
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
            for other in states:
                state["rows"].update(other["rows"])
        state["rows"] = {str(j): list(pos) for j, pos in sorted(state["rows"].items())}
        return state

    # ---- save ------------------------------------------------------------------------

    def maybe_save(self, step: int, last: bool) -> None:
        if self.cfg.enable and (step % self.cfg.interval == 0 or last):
            self.save(step)

    def save(self, step: int, model_only: bool = False) -> None:
        """Write ``step-N/`` atomically: shards to a partial folder, renamed when complete.

        Args:
            step: the optimizer steps taken.
            model_only: weights only (a seed checkpoint): no optimizer, scheduler or data state.
        """
        partial = self.folder / f".step-{step}.partial"
        if _is_main():
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        state = self.tensor_state()
        if model_only:
            del state["optimizer"]
        dcp.save(state, checkpoint_id=str(partial))
        meta = {
            "step": step,
            "model_only": model_only,
            "tokens_seen": step
            * self.trainer.global_batch_size
            * self.trainer.config.training.seq_len,
            "lr_scheduler": self.trainer.scheduler.state_dict(),
            "loader": self._loader_rows(),
            "rng": torch.get_rng_state().tolist(),
            **self.describe(),
        }
        if _is_main():
            (partial / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
            final = step_dir(self.folder, step)
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)  # atomic: the checkpoint appears complete or not at all
            logger.info("saved checkpoint %s", final)
            self._prune_in_background()
        _barrier()

    def _prune_in_background(self) -> None:
        """Delete all but the newest ``keep_latest_k`` complete checkpoints, off the step path."""
        keep = self.cfg.keep_latest_k
        if keep <= 0:
            return
        if self._pruner is not None:
            self._pruner.join()
        old = complete_steps(self.folder)[:-keep]
        doomed = [step_dir(self.folder, s) for s in old]
        self._pruner = threading.Thread(
            target=lambda: [shutil.rmtree(p, ignore_errors=True) for p in doomed], daemon=True
        )
        self._pruner.start()

    def close(self) -> None:
        if self._pruner is not None:
            self._pruner.join()

    # ---- load ------------------------------------------------------------------------

    def resume(self, candidates: list[int]) -> int:
        """Load the newest loadable checkpoint of ``candidates``; return its step (0 if none)."""
        for i, step in enumerate(candidates):
            path = step_dir(self.folder, step)
            try:
                self.load(path)
            except UserError:
                raise  # a checkpoint of another model: not corrupt, never skipped silently
            except (CheckpointException, Exception) as e:  # any unreadable state: fall back
                reason = _first_line(e)
                if i == len(candidates) - 1 or self.cfg.load_step >= 0:
                    raise UserError(
                        f"checkpoint: {path} cannot be loaded ({reason}); delete it or pick "
                        "another with checkpoint.load_step"
                    ) from None
                logger.warning("checkpoint %s is corrupt (%s); trying an older one", path, reason)
                continue
            logger.info("resumed from %s", path)
            return step
        return 0

    def load(self, path: Path) -> None:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        self.check_same_model(meta, path)
        state = self.tensor_state()
        if meta.get("model_only"):  # a seed checkpoint: weights only, training starts at step 1
            del state["optimizer"]
        dcp.load(state, checkpoint_id=str(path))  # in place, into parameters and moments
        for part in self.trainer.model_parts:
            set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
        if meta.get("model_only"):
            return
        scheduler = self.trainer.scheduler
        scheduler.load_state_dict(meta["lr_scheduler"])
        # The scheduler's state does not touch the optimizer: set the lr of the next step.
        for group, lr in zip(
            self.trainer.optimizer.param_groups, scheduler.get_last_lr(), strict=True
        ):
            group["lr"] = lr
        self.trainer.loader.load_state_dict(meta["loader"])
        torch.set_rng_state(torch.tensor(meta["rng"], dtype=torch.uint8))

    def check_same_model(self, meta: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint of another model or flavor, listing the differing tensors."""
        # The whole model's names and shapes (a pipeline rank holds only some of them).
        with torch.device("meta"):
            whole = self.trainer.spec.model_cls(self.trainer.model_args)
        expected = {k: tuple(v.shape) for k, v in get_model_state_dict(whole).items()}
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        found = {
            k.removeprefix("model."): tuple(m.size)
            for k, m in stored.items()
            if k.startswith("model.") and hasattr(m, "size")
        }
        if found == expected:
            return
        diffs = sorted(
            f"{k}: checkpoint {found.get(k, 'missing')} vs model {expected.get(k, 'missing')}"
            for k in set(found) | set(expected)
            if found.get(k) != expected.get(k)
        )
        shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
        raise UserError(
            f"checkpoint: {path} holds {meta.get('model')} {meta.get('flavor')}, which does not "
            f"match {self.trainer.config.model.name} {self.trainer.config.model.flavor} "
            f"({shown}); use the checkpoint's model.name/model.flavor or another dump folder"
        )
