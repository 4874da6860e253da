"""torchrun worker: expert-parallel dispatch and combine against one-device math.

Every rank builds the same ``GroupedExperts`` and can regenerate every rank's routed tokens
(seeded by rank, uneven counts, some experts and some ranks receiving nothing). The reference
runs all ranks' tokens through the unsharded experts; the expert-parallel copy (``ExpertParallel``
over every rank) runs only this rank's tokens. Outputs, input gradients and the experts' weight
gradients (gathered from their shards) must match the reference, on the grouped-mm and the
loop paths.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        tests/dist_scripts/ep_dispatch_check.py

Prints "OK" (rank 0) and exits 0; any mismatch raises.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module
from torch.testing import assert_close

from titan_core.distributed import destroy_process_group, exit_now
from titan_core.models.moe.experts import GroupedExperts
from titan_core.parallel.expert_parallel import ExpertParallel

DIM, HIDDEN, EXPERTS = 16, 24, 8
TOL = {"rtol": 1e-5, "atol": 1e-6}


def tokens_of(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s routed tokens (sorted by expert), counts, and an upstream gradient."""
    g = torch.Generator().manual_seed(100 + rank)
    counts = torch.randint(0, 6, (EXPERTS,), generator=g)
    counts[rank % EXPERTS] = 0  # an expert this rank sends nothing
    if rank == 1:
        counts[: EXPERTS // 2] = 0  # rank 1 sends nothing to the first ep rank(s)
    n = int(counts.sum())
    x = torch.randn(n, DIM, generator=g)
    grad = torch.randn(n, DIM, generator=g)
    return x, counts, grad


def main() -> None:
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
        for grouped in (True, False):
            torch.manual_seed(0)
            reference = GroupedExperts(DIM, HIDDEN, EXPERTS, use_grouped_mm=grouped)
            reference.init_weights(0.02)
            model = copy.deepcopy(reference)
            parallelize_module(model, mesh, ExpertParallel())
            assert (
                isinstance(model.w1, DTensor) and model.w1.to_local().shape[0] == EXPERTS // world
            )

            # Reference: every rank's tokens through the whole experts, one expert at a time
            # (each rank's tokens are sorted by expert, so per rank is one call).
            ref_outs = []
            for r in range(world):
                x, counts, grad = tokens_of(r)
                x.requires_grad_(True)
                out = reference(x, counts)
                (out * grad).sum().backward()
                ref_outs.append((out.detach(), x.grad))

            x, counts, grad = tokens_of(rank)
            x.requires_grad_(True)
            out = model(x, counts)
            (out * grad).sum().backward()
            assert_close(out, ref_outs[rank][0], **TOL)
            assert_close(x.grad, ref_outs[rank][1], **TOL)
            for name in ("w1", "w2", "w3"):
                full = getattr(model, name).grad.full_tensor()
                assert_close(full, getattr(reference, name).grad, **TOL)
        if rank == 0:
            print("OK")
    finally:
        destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now(0)  # gloo threads can abort the interpreter's teardown (see exit_now)
