"""Peak memory of one training step, measured by running titan's own code on fake tensors.

The probe builds the model through the TrainSpec, applies the spec's real parallelize (and
pipeline) hook on a mesh over PyTorch's fake process group at the target world size, as one chosen
rank, and runs two training steps (forward and backward through the trainer's own
``forward_backward``, gradient clipping, optimizer step) under ``FakeTensorMode``: nothing is
allocated, no collective moves data, yet every tensor the real step creates exists with its true
shape and dtype. torch's ``MemTracker`` records each tensor's storage by role and keeps the peak.

What differs from a real step, each for a stated reason:

- weights are not initialised (``init_weights`` draws random numbers, which need data);
- the fused AdamW kernel's fake implementation allocates new outputs where the real kernel
  updates in place, so the probe steps the for-loop implementation and lets none of its
  temporaries set the peak (the fused kernel has none; its states count as they are created);
- ``torch.compile`` is not applied (eager memory; compile usually lowers activation memory);
- pipeline stages learn their neighbours' tensor shapes from this process instead of from the
  other ranks (a fake group delivers nothing; every boundary carries the same hidden state).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from titan_core.config import JobConfig
from titan_core.determinism import apply_moe_debug, resolve_debug
from titan_core.distributed import Runtime
from titan_core.errors import UserError
from titan_core.parallel import ParallelDims, check_supported, validate_layout
from titan_core.parallel.grad_norm import clip_grad_norm_
from titan_core.parallel.pipeline import split_model, stages_per_rank
from titan_core.plan.probe_moe import moe_stand_ins
from titan_core.precision import param_and_reduce_dtypes
from titan_core.preflight import flavor_args, training_args, validate_training
from titan_core.quantize import build_converters
from titan_core.train_spec import get_train_spec
from titan_core.trainer import Trainer

CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "buffers")
# MemTracker's reference types -> the categories the plan reports (temporaries of the backward
# and anything else a step creates count as activations: they are what batch size scales).
_ROLE = {
    "Parameter": "parameters",
    "Gradient": "gradients",
    "Optstate": "optimizer",
    "Activation": "activations",
    "Temp": "activations",
    "Other": "activations",
    "Buffer": "buffers",
}


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes held at the step's peak on one rank, by category (see :data:`CATEGORIES`)."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    buffers: float

    @property
    def total(self) -> float:
        return sum(getattr(self, c) for c in CATEGORIES)

    def blend(self, other: StepMemory, weight: float) -> StepMemory:
        """``self + weight * (other - self)`` per category: linear inter/extrapolation."""
        return StepMemory(
            **{
                c: getattr(self, c) + weight * (getattr(other, c) - getattr(self, c))
                for c in CATEGORIES
            }
        )


def probe_config(config: JobConfig) -> JobConfig:
    """The config the probe runs: the user's, without compile (nor async TP, a compile pass)
    and with for-loop AdamW."""
    probe = copy.deepcopy(config)
    probe.compile.enable = False
    probe.parallelism.enable_async_tensor_parallel = False  # a compile pass
    if probe.optimizer.implementation == "fused":
        probe.optimizer.implementation = "for-loop"
    resolve_debug(probe)
    return probe


class ProbeTrainer(Trainer):
    """The trainer's build steps and step, on fake tensors, for one rank of ``world_size``.

    Nothing of ``Trainer.__init__`` that reads data, writes files or starts a real process
    group runs; the layout checks are titan-train's own.
    """

    def __init__(self, config: JobConfig, world_size: int, rank: int, n_layers: int | None):
        self.config = config
        self.runtime = Runtime(rank, rank, world_size, torch.device("cpu"))
        self.spec = _train_spec(config.model.name)
        args = training_args(flavor_args(self.spec, config), config.training.seq_len)
        if n_layers is not None:  # a reduced depth; pipeline stages get equal shares
            args = dataclasses.replace(args, n_layers=n_layers)
            pp = config.parallelism
            if pp.pipeline_parallel_degree > 1:
                stages = pp.pipeline_parallel_degree * stages_per_rank(
                    pp.pipeline_parallel_schedule
                )
                pp.pipeline_parallel_layers_per_stage = n_layers // stages
        self.model_args = apply_moe_debug(args, config)
        self.dims = ParallelDims.from_config(config.parallelism, world_size)
        check_supported(self.dims)
        validate_layout(self.dims, config, self.model_args)
        self.global_batch_size = validate_training(config, self.dims)
        if self.dims.pp > 1:
            self.check_pipeline()
        with _quiet("titan"):  # warnings about running Float8 on CPU concern real CPU runs
            self.converters = build_converters(config, self.runtime.device)
        self.param_dtype, _ = param_and_reduce_dtypes(config.training, "cpu")
        self.fake_mode = _fake_mode()

    # The model stays on meta until parallelised (the GPU path), then becomes fake tensors.
    def initialise_before_parallelize(self) -> bool:
        return False

    def _materialize(self, model: nn.Module, device: torch.device) -> None:
        with self.fake_mode:
            model.to_empty(device=device)

    def build(self) -> None:
        self.mesh = self.build_mesh()
        self.loss_fn = self.build_loss_fn()
        self.model_parts = self.build_model()
        if self.pipeline is not None:
            _stages_learn_shapes_locally(self)
        with self.fake_mode:
            self.optimizer = self.build_optimizer()

    def fake_step(self) -> None:
        """One training step on a random fake batch: the trainer's forward/backward, clipping,
        optimizer step and converter hooks."""
        t = self.config.training
        vocab = self.model_args.vocab_size
        inputs = torch.randint(0, vocab, (t.local_batch_size, t.seq_len))
        labels = torch.randint(0, vocab, (t.local_batch_size, t.seq_len))
        inputs, labels = self.shard_sequence(inputs, labels)
        self.forward_backward(inputs, labels, 1.0)
        pp_mesh = self.mesh.get("pp") if self.pipeline is not None else None
        clip_grad_norm_(self.model_parts, t.max_norm or float("inf"), pp_mesh)
        self._optimizer_step()

    def prime_optimizer(self) -> None:
        """The state a first training step leaves behind, without its forward and backward:
        an optimizer step on zero gradients creates the optimizer's lazily built state."""
        with torch.no_grad():
            for part in self.model_parts:
                for param in part.parameters():
                    if param.requires_grad:
                        param.grad = torch.zeros_like(param)
        self._optimizer_step()

    def _optimizer_step(self) -> None:
        self.optimizer.step()
        for converter in self.converters:
            converter.after_optimizer_step(self.model_parts)
        self.optimizer.zero_grad(set_to_none=True)


@functools.cache
def _train_spec(name: str) -> Any:
    """The TrainSpec, looked up once per process (a search checks thousands of layouts, and
    each lookup reads every installed distribution's entry points)."""
    return get_train_spec(name)


def probe_rank(
    config: JobConfig, world_size: int, rank: int, n_layers: int | None = None
) -> StepMemory:
    """The peak of a training step on ``rank`` of ``world_size``, for ``config`` (see the
    module docstring); ``n_layers`` overrides the model's depth.

    Raises:
        UserError: the layout or config is refused, exactly as titan-train refuses it.
    """
    with _fake_process_group(world_size, rank), moe_stand_ins():
        trainer = ProbeTrainer(probe_config(config), world_size, rank, n_layers)
        trainer.build()
        fused = config.optimizer.implementation == "fused"
        tracker = _step_tracker(optimizer_temporaries=not fused)
        for part in trainer.model_parts:
            tracker.track_external(part)
        with trainer.fake_mode:
            tracker.track_external(trainer.optimizer)
            with tracker, _sharding_propagation_untracked(tracker), _shape_inference_unhooked():
                for recording, step in (
                    (False, trainer.prime_optimizer),
                    (True, trainer.fake_step),
                ):
                    tracker.reset_mod_stats()
                    tracker.recording = recording
                    step()
        return _peak(tracker)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _fake_mode() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    # NOTE: non-fake inputs are allowed because the mesh's rank tables are real tensors.
    return FakeTensorMode(allow_non_fake_inputs=True)


@contextlib.contextmanager
def _fake_process_group(world_size: int, rank: int) -> Iterator[None]:
    """PyTorch's fake backend as this process's default group: collectives return at once."""
    if world_size == 1:
        yield
        return
    if dist.is_initialized():
        raise RuntimeError("probe_rank needs a process without a process group")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _tracker_class() -> type:
    from torch.distributed._tools.mem_tracker import MemTracker

    class StepTracker(MemTracker):
        """MemTracker that accepts a module running several times in one step (pipeline
        microbatches): only its first call records per-module statistics, which the plan
        does not use; the peak and the roles of tensors are tracked throughout.

        Without ``optimizer_temporaries`` the optimizer step's own temporaries never set the
        peak (the fused kernel the probe stands in for updates in place); its states count
        from their creation on.
        """

        optimizer_temporaries = True
        recording = False  # set for the steady-state step only
        propagating = False  # inside DTensor's sharding propagation

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # NOTE: DTensor computes each op's output shapes by running the op on fake tensors
            # of the *global* shape, in the ambient fake mode when there is one: here, the
            # probe's. Those tensors are not memory a real step holds (on a real device they
            # never exist); counting them made a 70B TP 8 step look 50 GiB larger.
            if self.propagating:
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _update_peak_stats(self, peak_state: Any) -> None:
            # NOTE: only the whole-process peak, not MemTracker's per-module peaks: those
            # walk every module on every op (minutes for a deep model) and the plan has no use
            # for them.
            if not self.recording or (self._in_opt and not self.optimizer_temporaries):
                return
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot["Total"]:
                    self._peak_mem[device] = snapshot["Total"]
                    self._peak_mem_snap[device] = dict(snapshot)

        def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                return
            super()._pre_fw_hook(module, inputs)

    return StepTracker


def _step_tracker(optimizer_temporaries: bool) -> Any:
    tracker = _tracker_class()()
    tracker.optimizer_temporaries = optimizer_temporaries
    return tracker


@contextlib.contextmanager
def _sharding_propagation_untracked(tracker: Any) -> Iterator[None]:
    """Mark DTensor's shape propagation so the tracker lets its fake tensors pass uncounted."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    propagate = ShardingPropagator._propagate_tensor_meta_non_cached

    def untracked(self: Any, *args: Any, **kwargs: Any) -> Any:
        outer, tracker.propagating = tracker.propagating, True
        try:
            return propagate(self, *args, **kwargs)
        finally:
            tracker.propagating = outer

    ShardingPropagator._propagate_tensor_meta_non_cached = untracked
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = propagate


@contextlib.contextmanager
def _shape_inference_unhooked() -> Iterator[None]:
    """No tracker hooks on the pipeline stages' one-off shape-inference forward.

    NOTE: the tracker's module hooks hold the autograd nodes of each module's inputs and
    outputs, and the nodes hold the hooks: a cycle through C++ that Python never collects.
    A normal backward frees what they keep; the stages' shape-inference forward (first step)
    has no backward through it, so a whole microbatch of activations stayed alive for the rest
    of the probe (+16% and +24% on PP 2 x FSDP 2 without AC, against real gloo runs).
    """
    from torch.distributed._tools import mod_tracker
    from torch.distributed.pipelining.stage import PipelineStage

    hook = mod_tracker.register_multi_grad_hook
    inferring = [0]

    def maybe_hook(*args: Any, **kwargs: Any) -> Any:
        return None if inferring[0] else hook(*args, **kwargs)

    originals = {}
    for name in ("_forward_metadata_inference", "_backward_metadata_inference"):
        originals[name] = method = getattr(PipelineStage, name, None)
        if method is None:  # older torch infers shapes another way
            continue

        def unhooked(self: Any, *args: Any, _method: Any = method, **kwargs: Any) -> Any:
            inferring[0] += 1
            try:
                return _method(self, *args, **kwargs)
            finally:
                inferring[0] -= 1

        setattr(PipelineStage, name, unhooked)
    mod_tracker.register_multi_grad_hook = maybe_hook
    try:
        yield
    finally:
        mod_tracker.register_multi_grad_hook = hook
        for name, method in originals.items():
            if method is not None:
                setattr(PipelineStage, name, method)


def _peak(tracker: Any) -> StepMemory:
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for by_role in tracker.get_tracker_snapshot("peak").values():
        for role, nbytes in by_role.items():
            name = getattr(role, "value", role)
            if name in _ROLE:
                totals[_ROLE[name]] += nbytes
    return StepMemory(**totals)


def _stages_learn_shapes_locally(trainer: ProbeTrainer) -> None:
    """Let this rank's pipeline stages run without their neighbours.

    On its first step a stage asks its neighbours for the shapes they send (torch's runtime
    metadata exchange); a fake group delivers nothing. Every stage boundary carries the same
    tensor, the hidden state a first stage produces, so the probe computes it here with a
    one-block first stage built and parallelised like a real one, and answers
    the stages' requests with it (forward: its metadata; backward: its gradient's, the same).
    """
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from torch.distributed.pipelining._utils import (
            _StageBackwardMeta,
            _StageForwardMeta,
            extract_tensor_metas,
        )
    except ImportError:
        raise UserError(
            f"parallelism.pipeline_parallel_degree={trainer.dims.pp}: titan-plan probes "
            f"pipeline stages through torch >= 2.13's stage metadata (this is torch "
            f"{torch.__version__}); plan with pipeline_parallel_degree=1 or upgrade torch"
        ) from None
    meta = extract_tensor_metas((_boundary_tensor(trainer),))
    schedule = trainer.pipeline.schedule
    for stage in getattr(schedule, "_stages", None) or [schedule._stage]:

        def recv(src_stage: int, stage: Any = stage) -> Any:
            forward = src_stage < stage.stage_index
            return _StageForwardMeta(meta) if forward else _StageBackwardMeta(meta)

        stage._recv_meta = recv
        stage._send_meta = lambda meta, dst_stage: None
    warmup = getattr(schedule, "_warmup_p2p", None)
    if warmup is not None:  # its vote reads a received flag with .item(): run it on real tensors

        def real_warmup(*args: Any, **kwargs: Any) -> Any:
            with unset_fake_temporarily():
                return warmup(*args, **kwargs)

        schedule._warmup_p2p = real_warmup


def _boundary_tensor(trainer: ProbeTrainer) -> torch.Tensor:
    """The hidden state one microbatch carries between pipeline stages (fake): the output of
    a first stage holding one block, built and parallelised as the real one."""
    first = split_model(trainer.new_model(), [0], is_first=True, is_last=False)
    trainer._parallelize(first)
    trainer._materialize(first, trainer.runtime.device)
    p, t = trainer.config.parallelism, trainer.config.training
    with trainer.fake_mode, torch.no_grad(), trainer.autocast():
        tokens = torch.zeros(
            p.pipeline_parallel_microbatch_size, t.seq_len // trainer.dims.cp, dtype=torch.long
        )
        # a real stage's output requires grad: the next stage sends its gradient back
        return first(tokens).detach().requires_grad_()
