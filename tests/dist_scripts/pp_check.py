"""torchrun worker: a pipelined step equals one process on the whole model.

Run as ``python -m torch.distributed.run --standalone --nproc-per-node 2 pp_check.py
--schedule 1F1B [GPipe ...]``. Every rank builds the same tiny Llama, computes the single-process reference
(loss, gradients, total gradient norm of the mean cross-entropy over the whole batch), then runs
the pipeline and checks its own stages against it:

1. the loss on the last-stage rank and every gradient, by parameter name, after one step();
2. the global gradient norm from clip_grad_norm_ (max_norm=inf);
3. gradients halve with loss_scale=0.5, and two such calls accumulate to the reference;
4. clipping to half the norm scales every gradient by the same factor.

Prints ``OK rank R NAME`` per schedule that passes (``FAIL rank R NAME: why`` otherwise) and
exits 0 when all pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from titan_core.distributed import destroy_process_group, exit_now
from titan_core.parallel import pipeline
from titan_core.parallel.grad_norm import clip_grad_norm_
from titan_llama3 import LLAMA3_FLAVORS, Transformer

B, S = 4, 16
TOL = {"rtol": 1e-5, "atol": 1e-7}


def build_model() -> nn.Module:
    args = dataclasses.replace(LLAMA3_FLAVORS["debugmodel"], n_layers=4, max_seq_len=S)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model


def loss_fn(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the tokens; logits (B, S, V), labels (B, S)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def reference(model: nn.Module, inputs: Tensor, labels: Tensor) -> tuple[Tensor, dict, Tensor]:
    """Loss, gradients by name and total gradient norm of the whole model on the whole batch."""
    loss = loss_fn(model(inputs), labels)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    # The exact norm: squares summed in float64, as clip_grad_norm_ does.
    norm = torch.stack([g.double().square().sum() for g in grads.values()]).sum().sqrt().float()
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, norm


def grads_of(parts: list[nn.Module]) -> dict[str, Tensor]:
    return {n: _full(p.grad).clone() for part in parts for n, p in part.named_parameters()}


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_part(mesh: DeviceMesh) -> Callable[[nn.Module], None]:
    """FSDP2 per block and at the root of a stage: its gradients become DTensors."""

    def apply(part: nn.Module) -> None:
        for block in part.layers.values():
            fully_shard(block, mesh=mesh, reshard_after_forward=False)
        fully_shard(part, mesh=mesh, reshard_after_forward=False)

    return apply


def check_grads(got: dict[str, Tensor], ref: dict[str, Tensor], factor: float, what: str) -> None:
    assert got, "this rank holds no parameters"
    for name, grad in got.items():
        torch.testing.assert_close(grad, ref[name] * factor, **TOL, msg=f"{what}: {name}")


def run(schedule: str, microbatches: int, fsdp: bool) -> None:
    world = dist.get_world_size()
    # With --fsdp, a (pp, dp_shard=1) mesh: FSDP on one rank still makes every gradient a
    # DTensor, which is what clip_grad_norm_ has to handle.
    world_mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("pp", "dp_shard"))
    mesh = world_mesh["pp"]
    model = build_model()
    gen = torch.Generator().manual_seed(1)
    vocab = model.args.vocab_size
    inputs = torch.randint(0, vocab, (B, S), generator=gen)
    labels = torch.randint(0, vocab, (B, S), generator=gen)
    ref_loss, ref_grads, ref_norm = reference(model, inputs, labels)
    pipe = pipeline.build_pipeline(
        model,
        pp_mesh=mesh,
        schedule_name=schedule,
        n_microbatches=microbatches,
        layers_per_stage=None,
        loss_fn=loss_fn,
        device=torch.device("cpu"),
        parallelize_part=shard_part(world_mesh["dp_shard"]) if fsdp else None,
    )
    parts = pipe.model_parts

    def zero() -> None:
        for part in parts:
            part.zero_grad(set_to_none=True)

    # All collectives first, checks after: a failed check on one rank cannot strand the other.
    loss = pipe.step(inputs, labels)
    norm = clip_grad_norm_(parts, math.inf, mesh)
    full = grads_of(parts)
    sharded = all(isinstance(p.grad, DTensor) for part in parts for p in part.parameters())
    zero()
    half_loss = pipe.step(inputs, labels, loss_scale=0.5)
    half = grads_of(parts)
    pipe.step(inputs, labels, loss_scale=0.5)
    accumulated = grads_of(parts)
    clip_norm = clip_grad_norm_(parts, ref_norm.item() / 2, mesh)
    clipped = grads_of(parts)

    assert sharded == fsdp, f"DTensor gradients: {sharded}, FSDP applied: {fsdp}"
    if pipe.has_last_stage:
        torch.testing.assert_close(loss, ref_loss, **TOL, msg="loss")
        torch.testing.assert_close(half_loss, ref_loss, **TOL, msg="loss with loss_scale=0.5")
    else:
        assert loss.item() == 0.0, f"a rank without the last stage returned {loss}"
    torch.testing.assert_close(norm, ref_norm, **TOL, msg="global grad norm")
    torch.testing.assert_close(clip_norm, ref_norm, **TOL, msg="norm before clipping")
    check_grads(full, ref_grads, 1.0, "one step")
    check_grads(half, ref_grads, 0.5, "loss_scale=0.5")
    check_grads(accumulated, ref_grads, 1.0, "two accumulated steps of loss_scale=0.5")
    coef = (ref_norm.item() / 2) / (ref_norm.item() + 1e-6)
    check_grads(clipped, ref_grads, coef, "clipped to half the norm")


def say(verdict: str) -> None:
    """One write per verdict: two ranks share the pipe, and print() writes the line and its end
    separately, so another rank's verdict could land in between."""
    sys.stdout.write(verdict + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", nargs="+", required=True, help="one or more schedules")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 on each stage")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, failed = dist.get_rank(), False
    try:
        # Several schedules share one launch: starting torchrun costs more than a schedule.
        for name in args.schedule:
            try:
                run(name, args.microbatches, args.fsdp)
                say(f"OK rank {rank} {name};")
            except AssertionError as e:
                # Checks run after every collective, so the ranks stay in step.
                failed = True
                say(f"FAIL rank {rank} {name}; {e}")
    finally:
        destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    exit_now(main())  # gloo threads can abort the interpreter's teardown (see exit_now)
