"""Pipeline parallelism: split a model into stages and run them with a torch schedule.

The model is cut along its naming contract: ``tok_embeddings`` on the first stage, the blocks of
``layers`` (a ModuleDict keyed by the block's original index) spread over the stages, ``norm``
and ``output`` on the last stage, ``rope`` on every stage. Each pipeline rank holds one stage
(``GPipe``, ``1F1B``) or two (the multi-stage schedules), placed loop style (rank ``r`` holds
``r, r + pp``) or V style (rank ``r`` holds ``r`` and ``2 pp - 1 - r``).

Gradient scaling is ours, not the schedule's: schedules are built with ``scale_grads=False``
and the loss each microbatch back-propagates is ``loss_fn(...) * loss_scale / n_microbatches``.
NOTE: torch (2.11 and 2.13 alike) implements ``scale_grads=True`` by dividing every ``.grad`` of
the stage by ``n_microbatches`` at the end of ``schedule.step()``, which would also divide the
gradients kept from earlier steps of a gradient-accumulation window; scaling the loss instead
leaves accumulated gradients alone.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from titan_core.errors import UserError
from titan_core.models.moe import MoE
from titan_core.parallel.pipeline_eval import stagewise_eval_losses

_WANTED = (
    "GPipe",
    "1F1B",
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    "ZBVZeroBubble",
    "DualPipeV",
)
_SINGLE_STAGE = ("GPipe", "1F1B")
_V_STYLE = ("ZBVZeroBubble", "DualPipeV")


@functools.cache
def installed_schedules() -> tuple[str, ...]:
    """The schedules of :data:`_WANTED` this torch has (also readable as ``SCHEDULES``)."""
    # NOTE: imported here, not at the top: torch.distributed.pipelining pulls in torch._dynamo
    # (0.5 s), and every model package imports this module for its TrainSpec, so each command
    # (titan-convert, titan-train --help) would pay for it without a pipeline.
    from torch.distributed.pipelining.schedules import get_schedule_class

    def installed(name: str) -> bool:
        try:
            get_schedule_class(name)
        except ValueError:
            return False
        return True

    return tuple(name for name in _WANTED if installed(name))


def __getattr__(name: str) -> Any:
    if name == "SCHEDULES":
        return installed_schedules()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _canonical(name: str) -> str:
    """The SCHEDULES spelling of ``name`` (matched case-insensitively, as torch does)."""
    for known in installed_schedules():
        if known.lower() == name.lower():
            return known
    raise UserError(
        f"parallelism.pipeline_parallel_schedule: '{name}' is not a pipeline schedule of this "
        f"torch ({torch.__version__}); use one of {', '.join(installed_schedules())}"
    )


def schedule_class(name: str) -> type:
    """The torch schedule class for a name in :data:`SCHEDULES` (case-insensitive).

    Args:
        name: the value of ``parallelism.pipeline_parallel_schedule``.
    """
    from torch.distributed.pipelining.schedules import get_schedule_class

    return get_schedule_class(_canonical(name))


def has_eval_path(name: str) -> bool:
    """Whether torch's schedule can run forward only (``schedule.eval()``).

    NOTE: torch 2.13's V schedules (ZBVZeroBubble, DualPipeV) fail there ("can't
    steal_bwd_input if this stage doesn't have backward"): their action lists assume a backward
    for every forward. :mod:`titan_core.parallel.pipeline_eval` runs their stages instead.
    """
    return _canonical(name) not in _V_STYLE


def stages_per_rank(name: str) -> int:
    """How many stages each pipeline rank holds under schedule ``name``: 1 or 2.

    Args:
        name: a schedule name in :data:`SCHEDULES`.
    """
    return 1 if _canonical(name) in _SINGLE_STAGE else 2


def stage_ids(name: str, pp_degree: int, pp_rank: int) -> list[int]:
    """The stages rank ``pp_rank`` holds, in stage order.

    Args:
        name: a schedule name in :data:`SCHEDULES`.
        pp_degree: number of pipeline ranks.
        pp_rank: this rank's index in the pipeline group.
    """
    if not 0 <= pp_rank < pp_degree:
        raise ValueError(f"pp_rank {pp_rank} is outside a pipeline of {pp_degree} ranks")
    if stages_per_rank(name) == 1:
        return [pp_rank]
    if _canonical(name) in _V_STYLE:
        # V: down the ranks and back up, so the first and last stage share rank 0.
        return [pp_rank, 2 * pp_degree - 1 - pp_rank]
    return [pp_rank, pp_rank + pp_degree]


def _microbatch_rule(name: str, pp_degree: int, n: int) -> str | None:
    """What schedule ``name`` needs that ``n`` microbatches lack, or None if it runs.

    NOTE: found by running every schedule on 2 and 4 ranks with 1..12 microbatches (torch 2.13;
    torch 2.11 has the same checks): GPipe, LoopedBFS and ZBVZeroBubble run any count; 1F1B and
    DualPipeV need one microbatch per stage; the interleaved schedules run in rounds of
    ``pp_degree`` microbatches and need the count to be a multiple of the number of rounds.
    """
    n_stages = pp_degree * stages_per_rank(name)
    if name in ("1F1B", "DualPipeV") and n < n_stages:
        return f"at least {n_stages} (one per stage)"
    rounds = max(1, n // pp_degree)
    if name in ("Interleaved1F1B", "InterleavedZeroBubble") and n % rounds:
        return (
            f"a multiple of its {rounds} rounds of {pp_degree} (a multiple of "
            f"{pp_degree}, or fewer than {2 * pp_degree})"
        )
    return None


def check_microbatches(name: str, pp_degree: int, n_microbatches: int) -> None:
    """Refuse a microbatch count the schedule cannot run, naming the batch-size keys.

    Args:
        name: a schedule name in :data:`SCHEDULES`.
        pp_degree: number of pipeline ranks.
        n_microbatches: ``training.local_batch_size // parallelism.pipeline_parallel_microbatch_size``.
    """
    name = _canonical(name)
    need = "at least 1" if n_microbatches < 1 else None
    need = need or _microbatch_rule(name, pp_degree, n_microbatches)
    if need:
        raise UserError(
            "training.local_batch_size / parallelism.pipeline_parallel_microbatch_size gives "
            f"{n_microbatches} microbatches, but {name} on {pp_degree} pipeline ranks needs "
            f"{need}; change training.local_batch_size or "
            "parallelism.pipeline_parallel_microbatch_size"
        )


def microbatch_count(name: str, pp_degree: int, local_batch_size: int, microbatch_size: int) -> int:
    """Number of pipeline microbatches per local batch, checked before any process starts.

    Args:
        name: a schedule name in :data:`SCHEDULES`.
        pp_degree: number of pipeline ranks.
        local_batch_size: ``training.local_batch_size`` (sequences per rank per step call).
        microbatch_size: ``parallelism.pipeline_parallel_microbatch_size``.
    """
    if microbatch_size < 1 or local_batch_size % microbatch_size:
        raise UserError(
            f"parallelism.pipeline_parallel_microbatch_size={microbatch_size}: must be >= 1 "
            f"and divide training.local_batch_size={local_batch_size}; pick a divisor"
        )
    n = local_batch_size // microbatch_size
    check_microbatches(name, pp_degree, n)
    return n


def layer_split(
    n_layers: int, n_stages: int, layers_per_stage: int | None, *, stages_per_rank: int = 1
) -> list[list[int]]:
    """The block indices of each stage, contiguous and in order.

    Without ``layers_per_stage`` the blocks are balanced counting the embedding as one more
    block on the first stage and norm + output as one more on the last, so those two get fewer
    blocks when the count does not divide evenly; every stage still gets at least one block.

    Args:
        n_layers: number of transformer blocks in the model.
        n_stages: total number of pipeline stages (pp degree x stages per rank).
        layers_per_stage: ``parallelism.pipeline_parallel_layers_per_stage``, or None.
        stages_per_rank: the schedule's stages per rank, only to word the error message.
    """
    if layers_per_stage is not None:
        counts = _fixed_counts(n_layers, n_stages, layers_per_stage, stages_per_rank)
    else:
        counts = _balanced_counts(n_layers, n_stages)
    splits, start = [], 0
    for count in counts:
        splits.append(list(range(start, start + count)))
        start += count
    return splits


def _fixed_counts(n_layers: int, n_stages: int, per_stage: int, per_rank: int) -> list[int]:
    if per_stage < 1 or n_layers % per_stage or n_layers // per_stage != n_stages:
        raise UserError(
            f"parallelism.pipeline_parallel_layers_per_stage={per_stage}: needs "
            f"n_layers / layers_per_stage = pipeline_parallel_degree x the schedule's stages "
            f"per rank, but {n_layers} / {per_stage} != {n_stages // per_rank} x {per_rank}; "
            f"use a divisor of {n_layers} that gives {n_stages} stages, or leave it unset"
        )
    return [per_stage] * n_stages


def _balanced_counts(n_layers: int, n_stages: int) -> list[int]:
    if n_layers < n_stages:
        raise UserError(
            f"parallelism.pipeline_parallel_degree: {n_stages} pipeline stages need at least "
            f"{n_stages} transformer blocks, but the model has {n_layers}; lower "
            "pipeline_parallel_degree or use a single-stage schedule (GPipe, 1F1B)"
        )
    counts = [1] * n_stages
    # The embedding and norm + output each weigh one block.
    extra = [0] * n_stages
    extra[0] += 1
    extra[-1] += 1
    for _ in range(n_layers - n_stages):
        # Add to the lightest stage; on ties prefer a middle one, then the earliest.
        lightest = min(
            range(n_stages),
            key=lambda i: (counts[i] + extra[i], i in (0, n_stages - 1), i),
        )
        counts[lightest] += 1
    return counts


def split_model(model: nn.Module, layers: list[int], is_first: bool, is_last: bool) -> nn.Module:
    """A copy of ``model`` holding only one stage: the given blocks, and the ends it owns.

    Names are preserved (``layers.3.attention.wq.weight`` stays so), so TP plans, FSDP wrapping
    and checkpoints key on them unchanged. Parameters are new tensors, independent of the
    model's and of every other stage's.

    Args:
        model: a Transformer with ``tok_embeddings``, ``layers`` (ModuleDict), ``norm``,
            ``output``; materialised or on the meta device.
        layers: block indices this stage keeps.
        is_first: keep ``tok_embeddings``.
        is_last: keep ``norm`` and ``output``.
    """
    missing = [i for i in layers if str(i) not in model.layers]
    if missing:
        raise ValueError(f"split_model: the model has no blocks {missing}")
    keep = {str(i) for i in layers}
    dropped: list[nn.Module] = [m for k, m in model.layers.items() if k not in keep]
    if not is_first:
        dropped.append(model.tok_embeddings)
    if not is_last:
        dropped += [model.norm, model.output]
    # NOTE: a memo entry mapping a module to None makes deepcopy skip it, so the dropped
    # modules' weights are never copied (a stage costs its own size, not the model's).
    memo: dict[int, Any] = {id(m): None for m in dropped if m is not None}
    part = copy.deepcopy(model, memo)
    for key in [k for k, m in part.layers._modules.items() if m is None]:
        del part.layers[key]
    return part


class MicrobatchLoss:
    """``loss_fn`` scaled so the step's gradients are those of the mean microbatch loss.

    Args:
        loss_fn: ``(logits, labels) -> mean loss of one microbatch``.
        n_microbatches: microbatches per ``schedule.step()``.
    """

    def __init__(self, loss_fn: Callable[[Tensor, Tensor], Tensor], n_microbatches: int) -> None:
        self.loss_fn = loss_fn
        self.n_microbatches = n_microbatches
        self.loss_scale = 1.0  # set by Pipeline.step for each call

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.loss_fn(logits, labels) * (self.loss_scale / self.n_microbatches)


@dataclass
class Pipeline:
    """This rank's stages and the schedule that runs them.

    Args:
        schedule: the torch pipelining schedule.
        model_parts: this rank's stage modules, in stage order.
        stage_ids: the stage index of each part.
        has_first_stage: this rank feeds the token ids.
        has_last_stage: this rank computes the loss.
        loss: the scaled loss the schedule calls (see :class:`MicrobatchLoss`).
        placement: stage id -> the pipeline rank holding it, for every stage.
        group: the pipeline process group.
        schedule_evaluates: the schedule can run forward only (see :func:`has_eval_path`).
    """

    schedule: Any
    model_parts: list[nn.Module]
    stage_ids: list[int]
    has_first_stage: bool
    has_last_stage: bool
    loss: MicrobatchLoss = field(repr=False)
    placement: dict[int, int] = field(default_factory=dict)
    group: Any = None
    schedule_evaluates: bool = True

    def step(self, inputs: Tensor, labels: Tensor, loss_scale: float = 1.0) -> Tensor:
        """Forward and backward of one local batch, split into the schedule's microbatches.

        Gradients accumulate into ``.grad`` as ``loss_scale x`` those of the mean microbatch
        loss, so ``A`` calls with ``loss_scale = 1 / A`` average a gradient-accumulation window.

        Args:
            inputs: token ids (B, S); only the rank with the first stage reads them.
            labels: target ids (B, S); only the rank with the last stage reads them.
            loss_scale: factor on this call's gradients (> 0).

        Returns:
            The mean microbatch loss (detached, unscaled) on the rank holding the last stage,
            a zero scalar elsewhere.
        """
        n = self.loss.n_microbatches
        if loss_scale <= 0:
            raise ValueError(f"loss_scale must be > 0, got {loss_scale}")
        if inputs.shape[0] % n:
            raise ValueError(f"a batch of {inputs.shape[0]} does not split into {n} microbatches")
        self.loss.loss_scale = loss_scale
        losses: list[Tensor] = []
        args = (inputs,) if self.has_first_stage else ()
        target = labels if self.has_last_stage else None
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        if not self.has_last_stage:
            return torch.zeros((), device=inputs.device)
        # Each entry is loss_i * loss_scale / n, so their sum over loss_scale is the mean.
        return (torch.stack(losses).sum() / loss_scale).detach()

    def eval_losses(self, inputs: Tensor, labels: Tensor) -> list[Tensor]:
        """Forward only (the schedule's eval path): each microbatch's own mean loss.

        Args:
            inputs: token ids (B, S) in the shape training uses (the stages' buffers are sized
                by the first step); only the first stage reads them.
            labels: target ids (B, S); only the last stage reads them.

        Returns:
            One detached loss per microbatch, in order, on the rank holding the last stage;
            an empty list elsewhere.
        """
        if not self.schedule_evaluates:  # the V schedules: stage by stage, outside torch's
            parts = dict(zip(self.stage_ids, self.model_parts, strict=True))
            return stagewise_eval_losses(
                parts, self.placement, self.group, inputs, labels, self.loss.loss_fn,
                self.loss.n_microbatches,
            )  # fmt: skip
        # loss_fn x loss_scale / n is the schedule's entry: a scale of n leaves each mean as is
        self.loss.loss_scale = float(self.loss.n_microbatches)
        losses: list[Tensor] = []
        args = (inputs,) if self.has_first_stage else ()
        target = labels if self.has_last_stage else None
        self.schedule.eval(*args, target=target, losses=losses, return_outputs=False)
        return [loss.detach() for loss in losses] if self.has_last_stage else []


def build_pipeline(
    model: nn.Module,
    *,
    pp_mesh: DeviceMesh,
    schedule_name: str,
    n_microbatches: int,
    layers_per_stage: int | None,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    device: torch.device,
    parallelize_part: Callable[[nn.Module], None] | None = None,
) -> Pipeline:
    """Split ``model`` for this pipeline rank, parallelise each part, and build the schedule.

    The caller should drop its reference to ``model`` afterwards: the parts are copies.

    Args:
        model: the whole model (materialised, or on meta to be materialised per part later).
        pp_mesh: the 1-D ``pp`` mesh.
        schedule_name: ``parallelism.pipeline_parallel_schedule``.
        n_microbatches: microbatches per ``step()`` (see :func:`microbatch_count`).
        layers_per_stage: ``parallelism.pipeline_parallel_layers_per_stage``, or None.
        loss_fn: ``(logits, labels) -> mean cross-entropy of one microbatch``.
        device: device the stages run on.
        parallelize_part: applied to each part before it is wrapped (TP, FSDP, ...).
    """
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle

    PipelineStage = _stage_class()

    name = _canonical(schedule_name)
    pp, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    per_rank = stages_per_rank(name)
    n_stages = pp * per_rank
    check_microbatches(name, pp, n_microbatches)
    _check_untied(model, n_stages)
    splits = layer_split(len(model.layers), n_stages, layers_per_stage, stages_per_rank=per_rank)
    ids = stage_ids(name, pp, pp_rank)
    parts, stages = [], []
    for sid in ids:
        part = split_model(model, splits[sid], is_first=sid == 0, is_last=sid == n_stages - 1)
        if parallelize_part is not None:
            parallelize_part(part)
        parts.append(part)
        stages.append(PipelineStage(part, sid, n_stages, device, group=pp_mesh.get_group()))
    loss = MicrobatchLoss(loss_fn, n_microbatches)
    cls = schedule_class(name)
    # NOTE: scale_grads=False, explicit: the loss is scaled instead (see the module docstring).
    schedule = cls(
        stages[0] if issubclass(cls, PipelineScheduleSingle) else stages,
        n_microbatches=n_microbatches,
        loss_fn=loss,
        scale_grads=False,
    )
    return Pipeline(
        schedule=schedule,
        model_parts=parts,
        stage_ids=ids,
        has_first_stage=0 in ids,
        has_last_stage=n_stages - 1 in ids,
        loss=loss,
        placement={sid: r for r in range(pp) for sid in stage_ids(name, pp, r)},
        group=pp_mesh.get_group(),
        schedule_evaluates=has_eval_path(name),
    )


@functools.cache
def _stage_class() -> type:
    """torch's ``PipelineStage``, whose shape-inference forward leaves MoE token counts alone."""
    from torch.distributed.pipelining import PipelineStage

    class Stage(PipelineStage):
        """NOTE: on the first step torch runs each stage's forward once more, on stand-in
        tensors, to learn the shapes it will send (runtime metadata inference). MoE layers count
        the tokens each expert receives in training forwards (for the expert-bias update), so
        that extra forward would count one more microbatch in the first step; it runs with the
        MoE layers in eval mode, where they count nothing."""

        def _forward_metadata_inference(self, *args: Any, **kwargs: Any) -> Any:
            moe = [m for m in self.submod.modules() if isinstance(m, MoE) and m.training]
            for m in moe:
                m.train(False)
            try:
                return super()._forward_metadata_inference(*args, **kwargs)
            finally:
                for m in moe:
                    m.train(True)

    return Stage


def _check_untied(model: nn.Module, n_stages: int) -> None:
    """Tied embedding/output weights would become two independent copies in two stages."""
    args = getattr(model, "args", None)
    if n_stages > 1 and getattr(args, "tie_word_embeddings", False):
        raise UserError(
            "parallelism.pipeline_parallel_degree: this model.flavor ties the embedding and "
            "output weights, which pipeline stages cannot share; use pipeline_parallel_degree=1 "
            "or a flavor without tie_word_embeddings"
        )
