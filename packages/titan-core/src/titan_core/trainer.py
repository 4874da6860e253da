"""The training loop, as a short sequence of named steps.

``Trainer(config)`` checks everything a person could have got wrong (model, flavor, layout,
tokenizer, data, batch sizes) before it starts a process group or allocates a model; ``train()``
then runs ``train_step`` (``forward_backward`` per microbatch, clip, optimizer and scheduler
step) ``training.steps`` times, logging every ``metrics.log_freq`` steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor.parallel import loss_parallel

from titan_core.aux_loss import attach_to_stages
from titan_core.checkpoint import (
    Checkpointer,
    TrainState,
    step_dir,
)
from titan_core.config import JobConfig, to_toml
from titan_core.data import GlobalBatchLoader
from titan_core.data.loader import check_streaming_keys
from titan_core.data.prefetch import Prefetcher
from titan_core.determinism import set_determinism
from titan_core.distributed import (
    Runtime,
    as_local,
    init_process_group,
    runtime_from_env,
    set_collective_timeout,
)
from titan_core.errors import RunStopped
from titan_core.hf_load import save_hf_weights
from titan_core.metrics import (
    MetricsLogger,
    device_peak_flops,
    memory_gib,
)
from titan_core.optim import (
    build_lr_scheduler,
    build_optimizer,
)
from titan_core.parallel import (
    ParallelMesh,
    compile_loss,
    isolate_compile_cache,
)
from titan_core.parallel.grad_norm import clip_grad_norm_
from titan_core.precision import describe_precision, fsdp_casts_parameters, param_and_reduce_dtypes
from titan_core.profiling import StepProfiler
from titan_core.quantize import apply_converters
from titan_core.run_folder import prepare_dump_folder
from titan_core.stopping import StopSignals, finite_step, stopped_by_signal
from titan_core.trainer_checks import InputChecks

logger = logging.getLogger("titan")


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy, computed in fp32: (B, S, V) logits, (B, S) labels."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


class Trainer(InputChecks):
    """One training job. Construction validates and builds; ``train()`` runs it."""

    def __init__(self, config: JobConfig) -> None:
        self.config = config
        self.runtime: Runtime = runtime_from_env()
        self.check_inputs()
        set_determinism(config)
        self.prepare_dump_folder()
        init_process_group(self.runtime, config.comm.init_timeout_seconds)
        self.mesh = self.build_mesh()
        self.loss_fn = self.build_loss_fn()
        self.model_parts = self.build_model()
        self.optimizer = self.build_optimizer()
        self.scheduler = build_lr_scheduler(
            self.optimizer, config.lr_scheduler, config.training.steps
        )
        self.metrics = self.build_metrics()
        self.step_metrics: dict[str, float] = {}  # what the spec's post-optimizer hook reports
        self.validation_seconds = 0.0  # left out of the summary's tokens/s
        self.checkpointer = Checkpointer(
            TrainState(
                model_parts=self.model_parts,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                loader=self.loader,
                spec=self.spec,
                model_args=self.model_args,
                config=config,
                global_batch_size=self.global_batch_size,
                tokenizer=self.tokenizer,
                max_positions=self.max_positions,
            )
        )
        self.step = self.checkpointer.resume(self.resume_steps)

    # ---- build steps -------------------------------------------------------------------

    def prepare_dump_folder(self) -> None:
        """Create the dump folder, keep an earlier run's files, write the resolved config."""
        if self.runtime.is_main:
            text = to_toml(self.config)
            tb = self.config.metrics.save_tb_folder
            prepare_dump_folder(self.dump, text, bool(self.resume_steps), tb)
            if self.config.job.print_config:
                logger.info("resolved config:\n%s", text)

    def build_mesh(self) -> ParallelMesh | None:
        if self.runtime.world_size == 1:
            return None
        return self.dims.build_mesh(self.runtime.device.type)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The spec's optimizer builder if it has one, else AdamW/Adam from ``[optimizer]``."""
        build = self.spec.build_optimizer_fn or build_optimizer
        return build(self.model_parts, self.config.optimizer)

    def build_loss_fn(self) -> Any:
        """The spec's loss (or cross entropy), compiled when ``compile.components`` says so."""
        loss_fn = self.spec.build_loss_fn(self.config) if self.spec.build_loss_fn else None
        loss_fn = loss_fn or cross_entropy_loss
        c = self.config.compile
        if c.enable and self.runtime.world_size > 1:
            isolate_compile_cache(self.runtime.rank)
        if c.enable and "loss" in c.components:
            if self.dims.tp > 1 and not self.config.parallelism.disable_loss_parallel:
                # NOTE: a compiled loss-parallel cross entropy failed on the second TP group
                # ("Could not resolve the process group registered under the name ..."); the
                # loss then runs eagerly on its vocab shards, as DTensor ops.
                logger.warning("compile.components: the loss is not compiled under loss parallel")
                return loss_fn
            return compile_loss(loss_fn)
        return loss_fn

    def build_model(self) -> list[nn.Module]:
        """Build on meta, count, then initialise, split into pipeline stages and parallelise.

        Returns this rank's model parts: the whole model, or its pipeline stages.
        """
        model = self.new_model()
        self.num_params = sum(p.numel() for p in model.parameters())
        apply_converters(model, self.converters)  # e.g. Float8: before any parallelism
        fpt = self.spec.flops_per_token_fn
        seq_len = self.config.training.seq_len
        self.flops_per_token = fpt(self.model_args, self.num_params, seq_len) if fpt else 0.0
        device = self.runtime.device
        # NOTE: on CPU the full model is initialised before it is split and sharded, so every
        # layout starts from the same weights (DTensor's sharded RNG is only layout-independent
        # on CUDA). On GPU the model stays on meta until sharded: no rank ever holds all of it.
        on_cpu = self.initialise_before_parallelize()
        if on_cpu:
            self._materialize(model, device)
        self.pipeline = self.build_pipeline(model) if self.dims.pp > 1 else None
        parts = self.pipeline.model_parts if self.pipeline else [model]
        if self.pipeline is None:
            self._parallelize(model)
        for part in parts:
            if not on_cpu:
                self._materialize(part, device)
            part.train()
        self.autocast_dtype = self.precision(parts)
        logger.info(
            "model %s %s: %s parameters, %.3g training FLOPs/token",
            self.config.model.name,
            self.config.model.flavor,
            f"{self.num_params:,}",
            self.flops_per_token,
        )
        return parts

    def initialise_before_parallelize(self) -> bool:
        """Whether the whole model is initialised before it is split and sharded (CPU)."""
        return self.runtime.device.type == "cpu"

    def new_model(self) -> nn.Module:
        """The model on the meta device: shapes only, initialised later by ``_materialize``."""
        with torch.device("meta"):
            return self.spec.model_cls(self.model_args)

    def precision(self, parts: list[nn.Module]) -> torch.dtype | None:
        """Log the precision the step computes in; the dtype autocast must apply, if any.

        FSDP's policy casts the parameters where it wraps the model; every other layout
        (one process, TP, PP, CP without FSDP) gets the requested dtype through autocast.
        """
        _, reduce = param_and_reduce_dtypes(self.config.training, self.runtime.device.type)
        by_fsdp = fsdp_casts_parameters(parts)
        logger.info("precision: %s", describe_precision(self.param_dtype, reduce, by_fsdp))
        if self.param_dtype == torch.float32 or by_fsdp:
            return None
        return self.param_dtype

    def _parallelize(self, part: nn.Module) -> None:
        self.spec.parallelize_fn(part, self.dims, self.mesh, self.config)

    def build_pipeline(self, model: nn.Module) -> Any:
        p, t = self.config.parallelism, self.config.training
        pipeline = self.spec.pipelining_fn(
            model,
            pp_mesh=self.mesh.get("pp"),
            schedule_name=p.pipeline_parallel_schedule,
            n_microbatches=t.local_batch_size // p.pipeline_parallel_microbatch_size,
            layers_per_stage=p.pipeline_parallel_layers_per_stage,
            loss_fn=self.loss_fn,
            device=self.runtime.device,
            parallelize_part=self._parallelize,
        )
        if self.spec.aux_loss_fn is not None:
            loss = pipeline.loss  # the schedule's scaled loss: the same scale for the extra term
            attach_to_stages(
                pipeline.model_parts,
                lambda part: self.spec.aux_loss_fn(part, self.mesh),
                lambda: loss.loss_scale / loss.n_microbatches,
            )
        return pipeline

    def _materialize(self, model: nn.Module, device: torch.device) -> None:
        model.to_empty(device=device)
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # to_empty makes new tensors, which unties shared ones
        torch.manual_seed(self.config.training.seed)
        model.init_weights()

    def build_loader(self) -> Prefetcher:
        t = self.config.training
        check_streaming_keys(t)
        loader = GlobalBatchLoader(
            None,
            self.tokenizer,
            seq_len=t.seq_len,
            global_batch_size=self.global_batch_size,
            local_batch_size=t.local_batch_size,
            dp_rank=self.dims.dp_rank(self.runtime.rank),
            dp_degree=self.dims.dp,
            dataset=t.dataset,
            dataset_path=t.dataset_path,
            seed=t.seed,
            streaming=t.dataset_streaming,
            shuffle_buffer=t.shuffle_buffer,
        )
        return Prefetcher(loader, t.data_prefetch)

    def build_metrics(self) -> MetricsLogger:
        m = self.config.metrics
        self.peak_flops, peak_desc = device_peak_flops(self.runtime.device)
        logger.info("MFU is measured against %.3g FLOP/s (%s)", self.peak_flops, peak_desc)
        return MetricsLogger(
            self.config.job.dump_folder,
            enabled=self.runtime.is_main,
            enable_tensorboard=m.enable_tensorboard,
            enable_wandb=m.enable_wandb,
            wandb_config=dataclasses.asdict(self.config),
            tb_subdir=m.save_tb_folder,
            color=not m.disable_color_printing and sys.stderr.isatty(),
        )

    # ---- the step ----------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast where no FSDP mixed-precision policy does the casting."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=self.autocast_dtype)

    def loss_context(self) -> contextlib.AbstractContextManager:
        """Loss parallel: the cross entropy runs on vocab-sharded logits (TP, unless disabled)."""
        if self.dims.tp > 1 and not self.config.parallelism.disable_loss_parallel:
            return loss_parallel()
        return contextlib.nullcontext()

    def forward_backward(
        self, inputs: torch.Tensor, labels: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Loss of one microbatch (mean over its tokens); backward of ``loss * scale``."""
        if self.pipeline is not None:
            with self.loss_context(), self.autocast():
                return as_local(self.pipeline.step(inputs, labels, loss_scale=scale))
        (model,) = self.model_parts
        with self.autocast():
            logits = model(inputs)  # (B, S, V)
        with self.loss_context():
            loss = self.loss_fn(logits, labels)
            terms = [loss * scale]
            aux = self.spec.aux_loss_fn(model, self.mesh) if self.spec.aux_loss_fn else None
            if aux is not None:  # a plain tensor: kept apart from a loss-parallel DTensor
                terms.append(aux * scale)
            torch.autograd.backward(terms)
        return as_local(loss.detach())

    def train_step(
        self, microbatches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[float, float]:
        """One optimizer step over the microbatches; returns (global mean loss, grad norm)."""
        n = len(microbatches)
        device = self.runtime.device
        loss = torch.zeros((), device=device)
        for i, (inputs, labels) in enumerate(microbatches):
            for part in self.model_parts:
                if hasattr(part, "set_requires_gradient_sync"):
                    # Reduce gradients across ranks only after the last microbatch.
                    part.set_requires_gradient_sync(i == n - 1)
            inputs, labels = self.shard_sequence(inputs.to(device), labels.to(device))
            loss += self.forward_backward(inputs, labels, 1.0 / n) / n
        max_norm = self.config.training.max_norm or float("inf")
        pp_mesh = self.mesh.get("pp") if self.pipeline is not None else None
        grad_norm = clip_grad_norm_(self.model_parts, max_norm, pp_mesh).item()
        if self.mesh is not None:
            if self.pipeline is not None:  # only the last stage holds the loss
                dist.all_reduce(loss, group=self.mesh.get("pp").get_group())
            dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=self.mesh.get("dp_cp").get_group())
        # Both numbers are global, so every rank takes the same decision.
        skip = self.config.training.skip_nonfinite_steps
        if finite_step(self.step, loss.item(), grad_norm, skip):
            self.optimizer.step()
        for converter in self.converters:
            converter.after_optimizer_step(self.model_parts)
        if self.spec.post_optimizer_fn is not None:
            self.step_metrics = dict(self.spec.post_optimizer_fn(self.model_parts, self.mesh) or {})
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), grad_norm

    def shard_sequence(
        self, inputs: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context parallel: keep this rank's load-balanced positions of the sequence."""
        if self.dims.cp == 1:
            return inputs, labels
        from titan_core.parallel.context import load_balanced_positions

        cp_mesh = self.mesh.get("cp")
        positions = load_balanced_positions(
            inputs.shape[1], self.dims.cp, cp_mesh.get_local_rank()
        ).to(inputs.device)
        return inputs[:, positions], labels[:, positions]

    # ---- the loop ----------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Run ``training.steps`` steps; return the summary the CLI prints.

        Raises:
            RunStopped: a signal or a non-finite loss ended the run early (its state is saved
                as far as it is good).
        """
        t = self.config.training
        if self.config.checkpoint.create_seed_checkpoint:
            return self.write_seed_checkpoint()
        first_step = self.step + 1
        r = self.runtime
        self.profiler = StepProfiler(self.config.profiling, self.dump, r.rank, r.device, self.step)
        start = time.perf_counter()
        try:
            with StopSignals() as signals:
                first_loss, loss = self.run_steps(first_step, start, signals)
        except RunStopped:  # every rank stops here: commit a save in flight, flush the metrics
            self.checkpointer.close()
            self.metrics.close()
            raise
        finally:
            self.profiler.close()
            self.loader.close()
        self.checkpointer.close()
        self.metrics.close()
        if self.config.checkpoint.last_save_in_hf:
            save_hf_weights(self, self.step)
        elapsed = time.perf_counter() - start - self.validation_seconds  # training time only
        steps_run = max(t.steps - first_step + 1, 1)
        tokens_per_step = self.tokens_per_device_step()
        return {
            "steps": t.steps,
            "first_loss": first_loss,
            "final_loss": loss,
            "tps": tokens_per_step * steps_run / elapsed,
            "dump_folder": os.path.abspath(self.config.job.dump_folder),
        }

    def tokens_per_device_step(self) -> float:
        """This device's share of a step's tokens: its data-parallel rank's tokens, split over
        the ranks that process them together (TP, PP, CP), as torchtitan counts them."""
        t = self.config.training
        local = t.local_batch_size * t.seq_len * self.loader.grad_accum_steps
        return local / self.dims.model_parallel

    def run_steps(self, first_step: int, start: float, signals: StopSignals) -> tuple[float, float]:
        """Steps ``first_step``..``training.steps``, logged and checkpointed; (first, last) loss."""
        t = self.config.training
        tokens_per_step = self.tokens_per_device_step()
        first_loss = loss = float("nan")
        window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
        for self.step in range(first_step, t.steps + 1):
            lr = self.scheduler.get_last_lr()[0]
            loss, grad_norm = self.train_step(self.loader.next_batch())
            self.profiler.step(self.step)
            if self.step == first_step:
                self.first_step_done = (first_step, time.perf_counter())  # ETA's origin
                if self.mesh is not None:
                    groups = self.mesh.world.get_all_groups()
                    set_collective_timeout(self.config.comm.train_timeout_seconds, groups)
            first_loss = loss if self.step == first_step else first_loss
            window_tokens, window_steps = window_tokens + tokens_per_step, window_steps + 1
            self.checkpointer.poll()
            blocked = self.checkpointer.maybe_save(self.step, last=self.step == t.steps)
            due = self.step % self.config.metrics.log_freq == 0 or self.step in (
                first_step,
                t.steps,
            )
            now = time.perf_counter()  # the window's tokens/s leaves validation out
            extra = {} if blocked is None else {"checkpoint_blocking_s": blocked}
            if self.validator is not None and self.validator.due(self.step):
                extra.update(self.validator.run(self))
                self.validation_seconds += extra["validation_time"]
            if due or extra:  # a save's blocking time and validation are logged with their step
                tps = window_tokens / (now - window_start)
                extra["data_wait_s"] = self.loader.take_wait() / window_steps  # mean per step
                self.log_step(loss, grad_norm, lr, tps, now - start, extra)
                window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
            signum = signals.agreed(self.runtime.device)
            if signum and self.step < t.steps:
                self.stop_on_signal(signum, saved=blocked is not None)
        return first_loss, loss

    def stop_on_signal(self, signum: int, saved: bool) -> None:
        """Save this step (unless it was just saved) and end the run with :class:`RunStopped`."""
        ck = self.checkpointer
        path = None
        if ck.cfg.enable:
            if not saved:
                ck.save(self.step)
            ck.wait()  # an asynchronous save of this step is committed before the exit
            path = str(step_dir(ck.folder, self.step))
        raise stopped_by_signal(signum, self.step, path)

    def write_seed_checkpoint(self) -> dict[str, Any]:
        """Save the initial weights as ``step-0`` (model only) instead of training."""
        self.checkpointer.save(0, model_only=True)
        self.metrics.close()
        nan = float("nan")
        return {
            "steps": 0,
            "first_loss": nan,
            "final_loss": nan,
            "tps": 0.0,
            "dump_folder": os.path.abspath(self.config.job.dump_folder),
        }

    def peak_memory_gib(self) -> float:
        """The largest peak memory of any rank (ranks of a pipeline or of TP differ)."""
        peak = torch.tensor(memory_gib(self.runtime.device), device=self.runtime.device)
        if self.mesh is not None:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return peak.item()

    def eta_seconds(self, now: float) -> float:
        """Time left to ``training.steps`` at the mean pace since the first step (which also
        pays for warm-up and compilation, so it is left out); NaN until a second step ends."""
        first, t0 = self.first_step_done
        done, left = self.step - first, self.config.training.steps - self.step
        if left == 0 or done == 0:
            return 0.0 if left == 0 else math.nan
        return (now - t0) / done * left

    def log_step(
        self,
        loss: float,
        grad_norm: float,
        lr: float,
        tps: float,
        elapsed: float,
        extra: dict[str, float] | None = None,
    ) -> None:
        """One metrics record: the step's numbers, progress and ETA, plus ``extra`` (a save's
        blocking time, validation results)."""
        flops = self.flops_per_token * tps
        steps = self.config.training.steps
        self.metrics.log(
            {
                "step": self.step,
                "total_steps": steps,
                "loss": loss,
                "grad_norm": grad_norm,
                "lr": lr,
                "tps": tps,
                "tflops": flops / 1e12,
                "mfu": flops / self.peak_flops if self.peak_flops else 0.0,
                "memory_gib": self.peak_memory_gib(),
                "tokens_seen": self.step * self.global_batch_size * self.config.training.seq_len,
                "time": elapsed,
                "eta_s": self.eta_seconds(time.perf_counter()),
                **self.step_metrics,
                **(extra or {}),
            }
        )
