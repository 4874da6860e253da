"""torchrun worker: Qwen3's per-head q/k norms under tensor parallel, against one-device math.

Every rank seeds identically and builds the same tiny Qwen3 and the same batch; one copy runs
unsharded (the reference), the other under ``parallelize_qwen3`` with TP over every rank. Logits
and every parameter's gradient (gathered from its shards) must match the reference.

A second model with the dense plan alone (q/k norms left as plain local modules) is the
negative control: each rank then sees only its own heads' part of the norms' gradient, so the
check must fail on exactly those weights. That proves the check would catch the mistake, which
the per-step loss curve barely shows in a few steps.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        tests/dist_scripts/qk_norm_tp_check.py

Prints "OK" (rank 0) and exits 0; any mismatch raises.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.testing import assert_close

from titan_core.config import JobConfig
from titan_core.distributed import destroy_process_group, exit_now
from titan_core.parallel import ParallelDims
from titan_core.parallel.decoder import apply_tp, dense_tp_plan
from titan_qwen3 import Qwen3Args, Qwen3Transformer, parallelize_qwen3

B, S = 2, 16
ARGS = Qwen3Args(
    dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=48, vocab_size=64,
    max_seq_len=S,
)  # fmt: skip
TOL = {"rtol": 1e-5, "atol": 1e-6}
NORMS = ("attention.q_norm.weight", "attention.k_norm.weight")


def reference_and_copy() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = Qwen3Transformer(ARGS)
    model.init_weights()
    with torch.no_grad():  # non-trivial norm scales, different per entry
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model, copy.deepcopy(model)


def loss_of(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    if isinstance(logits, DTensor):
        logits = logits.full_tensor()
    return F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())


def gradient_mismatches(reference: torch.nn.Module, model: torch.nn.Module) -> list[str]:
    """Names of the parameters whose (gathered) gradient differs from the reference's."""
    wrong = []
    for (name, ref), param in zip(reference.named_parameters(), model.parameters(), strict=True):
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        try:
            assert_close(grad, ref.grad, **TOL)
        except AssertionError:
            wrong.append(name)
    return wrong


def main() -> None:
    dist.init_process_group("gloo")
    try:
        config = JobConfig()
        config.parallelism.tensor_parallel_degree = dist.get_world_size()
        config.parallelism.disable_loss_parallel = True
        dims = ParallelDims.from_config(config.parallelism, dist.get_world_size())
        mesh = dims.build_mesh("cpu")
        tokens = torch.randint(
            0, ARGS.vocab_size, (B, S), generator=torch.Generator().manual_seed(1)
        )

        reference, model = reference_and_copy()
        loss_of(reference, tokens).backward()
        parallelize_qwen3(model, dims, mesh, config)
        loss = loss_of(model, tokens)
        loss.backward()
        assert_close(loss, loss_of(reference, tokens).detach(), **TOL)
        q_norm = model.layers["0"].attention.q_norm.weight
        assert isinstance(q_norm, DTensor) and q_norm.placements[0].is_replicate()
        wrong = gradient_mismatches(reference, model)
        assert not wrong, f"gradients differ from one device: {wrong}"

        # Negative control: without the q/k norm entries only those gradients go wrong.
        _, unplanned = reference_and_copy()
        apply_tp(unplanned, mesh, dense_tp_plan(loss_parallel=False))
        loss_of(unplanned, tokens).backward()
        wrong = gradient_mismatches(reference, unplanned)
        expected = [f"layers.{i}.{norm}" for i in range(ARGS.n_layers) for norm in NORMS]
        assert sorted(wrong) == sorted(expected), wrong
        if dist.get_rank() == 0:
            print("OK")
    finally:
        destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now(0)  # gloo threads can abort the interpreter's teardown (see exit_now)
