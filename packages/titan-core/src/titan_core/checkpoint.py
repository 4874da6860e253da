"""DCP checkpoints of the full training state, written atomically, resumable under any layout.

On disk, ``<dump_folder>/<checkpoint.folder>/step-N/`` holds:

- the DCP shards and ``.metadata`` of ``{"model": ..., "optimizer": ...}``, keyed by parameter
  names (FSDP/TP shards are DTensors, so DCP reshards them on load into any layout);
- ``titan.json``: step, tokens seen, the LR scheduler, the data loader's position (every row of
  the global batch, merged from all data-parallel ranks, so it loads under another DP degree),
  the RNG state, and what the checkpoint is (model name, flavor, args with the positions the
  architecture handles, the tokenizer and its token ids, the resolved config);
- ``tokenizer/``: the files of the tokenizer the run used (and generation_config.json when its
  folder has one), so the checkpoint alone is enough to run the model or export it.

A checkpoint is written to a hidden ``.step-N.partial/`` folder and renamed to ``step-N/`` only
when every rank has finished, so a ``step-N/`` folder is complete by construction; a crash during a
save leaves only a partial folder, which is ignored (and removed by the next save). A ``step-N``
folder that titan did not write in this run is never deleted by a save of the same step: it is
moved aside. Nothing is unpickled from a checkpoint except through ``checkpoint_safety``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading
import time
import warnings
from concurrent.futures import Future
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

from titan_core.checkpoint_files import (
    META_FILE,
    NO_DIST_WARNING,
    TOKEN_IDS,
    TOKENIZER_DIR,
    complete_steps,
    plain_tensor,
    single_process_dcp,
    step_dir,
)
from titan_core.checkpoint_safety import (
    check_checkpoint_folder,
    check_checkpoint_model,
    load_checkpoint,
    refusal_in,
)
from titan_core.checkpoint_safety import read_titan_json as _meta
from titan_core.config import to_toml
from titan_core.errors import UserError
from titan_core.hf import flavor_name
from titan_core.hf_export import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    read_json_object,
    save_tokenizer_files,
    token_ids,
    tokenizer_source,
)
from titan_core.hf_load import load_hf_weights

logger = logging.getLogger("titan")


LOADABLE_PARTS = ("model", "optimizer", "lr_scheduler", "dataloader", "rng")


def initial_step_folder(source: Path) -> Path:
    """The checkpoint ``checkpoint.initial_load_path`` names: a step-N folder or the newest
    complete one under a checkpoint folder."""
    if (source / META_FILE).is_file() and (source / ".metadata").is_file():
        return source
    steps = complete_steps(source)
    if steps:
        return step_dir(source, steps[-1])
    raise UserError(
        f"checkpoint.initial_load_path: {source} is neither a complete titan checkpoint "
        f"(.metadata and {META_FILE}) nor a folder holding step-N checkpoints; for a Hugging "
        "Face folder add --checkpoint.initial_load_in_hf"
    )


def check_initial_source(
    spec: Any, model_args: Any, source: Path, model_name: str, flavor: str
) -> Path:
    """The checkpoint ``checkpoint.initial_load_path`` names, refused now (one line) if it is
    damaged, of another model, or holds code; see :func:`check_checkpoint_model`."""
    path = initial_step_folder(source)
    try:
        check_checkpoint_model(spec, model_args, path, model_name, flavor)
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"checkpoint.initial_load_path: {path} cannot be read ({_first_line(e)}); the "
            "checkpoint is damaged: pick another"
        ) from None
    return path


def resume_candidates(folder: Path, load_step: int) -> list[int]:
    """Steps to try resuming from, newest first; ``load_step`` >= 0 picks exactly one.

    Raises:
        UserError: the folder or an entry in it would make a later save fail, or ``load_step``
            names no complete checkpoint.
    """
    check_checkpoint_folder(folder)
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


def _writer(path: Path) -> dcp.FileSystemWriter:
    # NOTE: two writer threads per rank: while one thread serialises a tensor, the other's
    # write() and fsync wait on the disk (measured: ~1.3x the throughput of one thread).
    return dcp.FileSystemWriter(str(path), thread_count=2)


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


def _move_aside(path: Path) -> None:
    """Keep a ``step-N`` a save replaces (an older run's, a damaged or a foreign one): titan
    deletes only what it knows it wrote."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.replaced-{stamp}")
    n = 1
    while aside.exists() or aside.is_symlink():
        aside, n = path.with_name(f"{path.name}.replaced-{stamp}-{n}"), n + 1
    path.rename(aside)
    logger.warning("checkpoint: moved the existing %s to %s before saving that step", path, aside)


@dataclasses.dataclass
class _PendingSave:
    """A background save: committed to ``step-N/`` when every rank's future is done."""

    step: int
    partial: Path
    meta: dict[str, Any]
    future: Future
    started: float


@dataclasses.dataclass
class TrainState:
    """Everything a checkpoint saves or restores, handed to the :class:`Checkpointer`.

    Args:
        model_parts: this rank's model (or pipeline stages), possibly parallelised.
        optimizer: their optimizer; its per-parameter state is saved by parameter name.
        scheduler: the LR scheduler (``state_dict``, ``load_state_dict``, ``get_last_lr``).
        loader: the data loader (``state_dict``, ``load_state_dict``).
        spec: the model family, to rebuild the model on the meta device for checks.
        model_args: the model's architecture.
        config: the resolved job config, saved with every checkpoint.
        global_batch_size: sequences per optimizer step, for ``tokens_seen``.
        tokenizer: the run's tokenizer: its ids go into ``titan.json``, its files into
            ``tokenizer/``.
        max_positions: the positions the architecture handles, recorded as ``max_seq_len``
            in place of the RoPE table length training uses (see ``describe``).
    """

    model_parts: list[nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    spec: Any
    model_args: Any
    config: Any
    global_batch_size: int
    tokenizer: Any = None
    max_positions: int | None = None


class Checkpointer:
    """Saves and restores a run's state under ``<dump_folder>/<checkpoint.folder>``.

    Args:
        state: what is saved and restored.
    """

    def __init__(self, state: TrainState) -> None:
        self.state = state
        cfg = state.config
        self.cfg = cfg.checkpoint
        self.folder = Path(cfg.job.dump_folder) / cfg.checkpoint.folder
        self._pruner: threading.Thread | None = None
        self._pending: _PendingSave | None = None
        self._group: Any = None
        self._poll: Any = None
        self._stager: Any = None
        self._hf_source: dict[str, Any] | None = None

    # ---- what is saved ---------------------------------------------------------------

    def tensor_state(self) -> dict[str, Any]:
        """Model and optimizer tensors keyed by parameter name, for every model part.

        Names are the same under every layout (a pipeline stage keeps its blocks' names), so
        the state of one layout maps onto another; DCP reshards the DTensors.
        """
        parts = self.state.model_parts
        model: dict[str, Any] = {}
        for part in parts:
            model.update(get_model_state_dict(part))
        optimizer = optimizer_state(parts, self.state.optimizer)
        return {
            "model": {name: plain_tensor(t) for name, t in model.items()},
            "optimizer": {name: plain_tensor(t) for name, t in optimizer.items()},
        }

    def describe(self) -> dict[str, Any]:
        """What the checkpoint is: enough to rebuild the model with no other flag."""
        t, c = self.state, self.state.config
        args = t.model_args
        flavor = c.model.flavor
        if c.checkpoint.initial_load_in_hf:  # the args are the HF config's: name them truly
            flavor = flavor_name(t.spec, args)
        if t.max_positions is not None and hasattr(args, "max_seq_len"):
            # NOTE: the model trained with a RoPE table of training.seq_len rows; the weights do
            # not depend on its length, so the checkpoint describes the architecture's.
            args = dataclasses.replace(args, max_seq_len=t.max_positions)
        return {
            "model": c.model.name,
            "flavor": flavor,
            "model_args": dataclasses.asdict(args) if dataclasses.is_dataclass(args) else {},
            "tokenizer": c.model.hf_assets_path or "embedded",
            TOKEN_IDS: token_ids(t.tokenizer),
            "config": to_toml(c),
            **self.hf_source(),
        }

    def hf_source(self) -> dict[str, Any]:
        """The HF folder's config.json and generation_config.json (read once) when the run
        started from one: exports keep its token ids and generation settings."""
        if self._hf_source is None:
            self._hf_source = {}
            if self.cfg.initial_load_in_hf and self.cfg.initial_load_path:
                source = Path(self.cfg.initial_load_path)
                self._hf_source = {
                    "hf_config": read_json_object(source / CONFIG_FILE),
                    "hf_generation_config": read_json_object(source / GENERATION_CONFIG_FILE),
                }
        return self._hf_source

    def _loader_rows(self) -> dict[str, Any]:
        """Every row position of the global batch, merged from all data-parallel ranks."""
        state = self.state.loader.state_dict()
        if dist.is_initialized():
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
            for other in states:
                state["rows"].update(other["rows"])
                if "streams" in other:  # each data-parallel rank's stream position
                    state["streams"].update(other["streams"])
        state["rows"] = {str(j): list(pos) for j, pos in sorted(state["rows"].items())}
        return state

    # ---- save ------------------------------------------------------------------------

    def maybe_save(self, step: int, last: bool) -> float | None:
        """Save if ``step`` is due; return the seconds training was blocked, or None."""
        if not self.cfg.enable or not (step % self.cfg.interval == 0 or last):
            return None
        if last and self.cfg.last_save_model_only:
            self.wait()
            return self.save(step, model_only=True, dtype=self.cfg.export_dtype)
        return self.save(step, asynchronous=self.cfg.async_mode != "disabled")

    def save(
        self,
        step: int,
        model_only: bool = False,
        dtype: str = "float32",
        asynchronous: bool = False,
        folder: Path | None = None,
    ) -> float:
        """Write ``step-N/`` atomically: shards to a partial folder, renamed when complete.

        Args:
            step: the optimizer steps taken.
            model_only: weights only (a seed checkpoint or a final export): no optimizer,
                scheduler or data state.
            dtype: the weights' dtype on disk (a model-only export may be bfloat16).
            asynchronous: copy the state and write it in a background thread; the checkpoint
                is committed (renamed to ``step-N/``) once every rank's write has finished.
            folder: where ``step-N/`` goes (default: the run's checkpoint folder).

        Returns:
            The seconds this call blocked training.
        """
        started = time.perf_counter()
        self.wait()  # one save in flight at a time; commits the previous one
        folder = folder or self.folder
        partial = folder / f".step-{step}.partial"
        if _is_main():
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        state = self.tensor_state()
        if model_only:
            del state["optimizer"]
            if dtype != "float32":
                cast = getattr(torch, dtype)
                state["model"] = {k: v.to(cast) for k, v in state["model"].items()}
        meta = self.train_state(step, model_only, dtype)
        if asynchronous:
            self._start_async_save(step, partial, state, meta)
            blocked = time.perf_counter() - started
            logger.info(
                "checkpoint step-%d: state copied in %.3f s, writing in the background",
                step,
                blocked,
            )
            return blocked
        with single_process_dcp():
            dcp.save(state, storage_writer=_writer(partial))
        self._commit(step, partial, meta, folder)
        blocked = time.perf_counter() - started
        logger.info("saved checkpoint %s in %.3f s", step_dir(folder, step), blocked)
        return blocked

    def _start_async_save(
        self, step: int, partial: Path, state: dict[str, Any], meta: dict[str, Any]
    ) -> None:
        """Copy ``state`` and hand it to DCP's background writer; :meth:`wait` commits it."""
        if not dist.is_initialized():
            # NOTE: not single_process_dcp(): the write thread warns after this call returns,
            # so the filter stays for the process (a one-process trainer: the warning is noise).
            warnings.filterwarnings("ignore", message=NO_DIST_WARNING)
        response = dcp.async_save(
            state,
            storage_writer=_writer(partial),
            process_group=self._async_group(),
            async_stager=self._async_stager(),
        )
        future = getattr(response, "upload_completion", response)
        self._pending = _PendingSave(step, partial, meta, future, time.perf_counter())

    def train_state(self, step: int, model_only: bool, dtype: str) -> dict[str, Any]:
        """Everything but the tensors (``titan.json``), captured when the save starts."""
        t = self.state
        return {
            "step": step,
            "model_only": model_only,
            "dtype": dtype,
            "tokens_seen": step * t.global_batch_size * t.config.training.seq_len,
            "lr_scheduler": t.scheduler.state_dict(),
            "loader": self._loader_rows(),
            "rng": torch.get_rng_state().tolist(),
            **self.describe(),
        }

    def _commit(
        self, step: int, partial: Path, meta: dict[str, Any], folder: Path | None = None
    ) -> None:
        """Make ``step-N/`` appear, complete, once every rank has written its shards."""
        folder = folder or self.folder
        _barrier()
        if _is_main():
            t = self.state
            source = tokenizer_source(t.tokenizer, t.config.model.hf_assets_path)
            save_tokenizer_files(source, partial / TOKENIZER_DIR)
            (partial / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
            final = step_dir(folder, step)
            if final.exists() or final.is_symlink():
                _move_aside(final)
            partial.rename(final)  # atomic: the checkpoint appears complete or not at all
            if folder == self.folder:
                self._prune_in_background()
        _barrier()

    def _async_group(self) -> Any:
        """A gloo group of its own, so the background write never interleaves with training's."""
        if not dist.is_initialized():
            return None
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _async_stager(self) -> Any:
        """The stager that copies the state off the training tensors (kept: it reuses buffers)."""
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            pinned = self.cfg.async_mode == "async_with_pinned_mem"
            self._stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=pinned,
                    use_shared_memory=False,
                    use_async_staging=False,
                    use_non_blocking_copy=False,
                )
            )
        return self._stager

    def poll(self) -> None:
        """Commit a background save if every rank has finished writing (called every step)."""
        if self._pending is None:
            return
        done = torch.tensor(int(self._pending.future.done()))
        if dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self._poll_group())
        if done.item():
            self.wait()

    def _poll_group(self) -> Any:
        # NOTE: a CPU tensor needs a gloo group; the default group may be NCCL on GPU.
        if self._poll is None:
            self._poll = (
                dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            )
        return self._poll

    def wait(self) -> None:
        """Finish the save in flight (if any) and commit it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pending.future.result()  # re-raises a failed write
        self._commit(pending.step, pending.partial, pending.meta)
        logger.info(
            "checkpoint %s complete (written in the background in %.2f s)",
            step_dir(self.folder, pending.step),
            time.perf_counter() - pending.started,
        )

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
        """Finish a background save and the pruning; release the staging buffers."""
        self.wait()
        if self._pruner is not None:
            self._pruner.join()
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    # ---- load ------------------------------------------------------------------------

    def resume(self, candidates: list[int]) -> int:
        """Load the newest loadable checkpoint of ``candidates``; return its step (0 if none).

        A damaged checkpoint is reported and skipped; one of another model or holding code
        (a UserError) stops the run. With none to resume from, start from
        ``checkpoint.initial_load_path`` if it is set.
        """
        for i, step in enumerate(candidates):
            path = step_dir(self.folder, step)
            try:
                if self._is_export(path, step):
                    continue
                self.load(path, exclude=set(self.cfg.exclude_from_loading))
            except UserError:
                raise  # another model, or code in the checkpoint: never skipped silently
            except (CheckpointException, Exception) as e:  # any unreadable state: fall back
                refusal = refusal_in(e)
                if refusal is not None:
                    raise refusal from None
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
        if candidates and not self.cfg.initial_load_path:
            raise UserError(
                f"checkpoint: {self.folder} holds only model-only exports, which cannot resume "
                "training; start from one with checkpoint.initial_load_path or use another "
                "job.dump_folder"
            )
        if self.cfg.initial_load_path:
            return self.load_initial()
        return 0

    def _is_export(self, path: Path, step: int) -> bool:
        """A final export holds no optimizer or data position: it cannot continue a run."""
        if step > 0 and self.cfg.load_step < 0 and _meta(path).get("model_only"):
            logger.warning("checkpoint %s is a model-only export; not resuming from it", path)
            return True
        return False

    def load_initial(self) -> int:
        """Start from ``checkpoint.initial_load_path`` (weights only unless told otherwise)."""
        source = Path(self.cfg.initial_load_path)
        if self.cfg.initial_load_in_hf:
            load_hf_weights(self.state, source)
            logger.info("loaded the Hugging Face weights of %s", source)
            return 0
        path = initial_step_folder(source)
        if self.cfg.initial_load_model_only:
            self.load(path, exclude={"optimizer", "lr_scheduler", "dataloader", "rng"})
            logger.info("loaded the weights of %s; training starts at step 1", path)
            return 0
        self.load(path, exclude=set(self.cfg.exclude_from_loading))
        logger.info("started from %s", path)
        return int(_meta(path)["step"])

    def load(self, path: Path, exclude: set[str] = frozenset()) -> None:
        """Restore the state in ``path`` except the parts named in ``exclude``."""
        meta = _meta(path)
        self.check_same_model(path)
        if meta.get("model_only"):  # a seed checkpoint or export: weights only
            exclude = exclude | {"optimizer", "lr_scheduler", "dataloader", "rng"}
        state = self.tensor_state()
        for part in ("model", "optimizer"):
            if part in exclude:
                del state[part]
        if state:
            with single_process_dcp():  # in place, into parameters and moments
                load_checkpoint(state, path)
        if "model" in state:
            for part in self.state.model_parts:
                set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
        if "lr_scheduler" not in exclude:
            scheduler = self.state.scheduler
            scheduler.load_state_dict(meta["lr_scheduler"])
            # The scheduler's state does not touch the optimizer: set the lr of the next step.
            for group, lr in zip(
                self.state.optimizer.param_groups, scheduler.get_last_lr(), strict=True
            ):
                group["lr"] = lr
        if "dataloader" not in exclude:
            self.state.loader.load_state_dict(meta["loader"])
        if "rng" not in exclude:
            torch.set_rng_state(torch.tensor(meta["rng"], dtype=torch.uint8))

    def check_same_model(self, path: Path) -> None:
        """Refuse a checkpoint of another model or flavor, listing the differing tensors."""
        c = self.state.config
        check_checkpoint_model(
            self.state.spec, self.state.model_args, path, c.model.name, c.model.flavor
        )
