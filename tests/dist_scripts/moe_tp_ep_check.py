"""torchrun worker (4 ranks): a Qwen3-MoE with shared experts under FSDP 2 x TP 2 x EP 2, every
parameter's gradient against one-device math.

The parity matrix's debugmodel_moe has no shared experts; this tiny model has one (TP-sharded,
column-wise in / row-wise out over the tp ranks' gathered tokens), a router whose replicated
weight must sum its gradient over the tp ranks (each routes its own slice of the sequence), and
routed experts dispatched over ep = tp. Every rank seeds identically and builds the same model
and global batch; the reference runs it whole, the parallel copy runs this data-parallel rank's
rows. The loss and every gradient (gathered from its shards) must match the reference.

    python -m torch.distributed.run --standalone --nproc-per-node 4 \\
        tests/dist_scripts/moe_tp_ep_check.py

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
from titan_core.models.moe import MoEArgs
from titan_core.parallel import ParallelDims
from titan_qwen3 import Qwen3Args, Qwen3Transformer, parallelize_qwen3

B, S = 4, 16
ARGS = Qwen3Args(
    dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=48, vocab_size=64,
    max_seq_len=S,
    moe=MoEArgs(num_experts=4, top_k=2, hidden_dim=16, num_shared_experts=1, norm_topk_prob=True),
)  # fmt: skip
TOL = {"rtol": 1e-5, "atol": 1e-6}


def loss_of(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    if isinstance(logits, DTensor):
        logits = logits.full_tensor()
    return F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())


def main() -> None:
    dist.init_process_group("gloo")
    try:
        config = JobConfig()
        p = config.parallelism
        p.tensor_parallel_degree, p.expert_parallel_degree = 2, 2
        p.disable_loss_parallel = True
        dims = ParallelDims.from_config(p, dist.get_world_size())
        assert (dims.dp_shard, dims.dp_shard_mod_ep, dims.dp_shard_in_ep) == (2, 2, 1)
        mesh = dims.build_mesh("cpu")
        tokens = torch.randint(
            0, ARGS.vocab_size, (B, S), generator=torch.Generator().manual_seed(1)
        )

        torch.manual_seed(0)
        reference = Qwen3Transformer(ARGS)
        reference.init_weights()
        model = copy.deepcopy(reference)
        ref_loss = loss_of(reference, tokens)
        ref_loss.backward()

        parallelize_qwen3(model, dims, mesh, config)
        experts = model.layers["0"].moe.experts
        assert (
            isinstance(experts.w1, DTensor) and experts.w1.to_local().shape[0] == 1
        )  # 4 / (ep 2 x fsdp 2)
        rows = B // dims.dp
        dp_rank = dims.dp_rank(dist.get_rank())
        loss = loss_of(model, tokens[dp_rank * rows : (dp_rank + 1) * rows])
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG, group=mesh.get("dp").get_group())
        assert_close(mean_loss, ref_loss.detach(), **TOL)

        wrong = []
        for (name, ref), param in zip(
            reference.named_parameters(), model.parameters(), strict=True
        ):
            grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            try:
                assert_close(grad, ref.grad, **TOL)
            except AssertionError:
                wrong.append(name)
        assert not wrong, f"gradients differ from one device: {wrong}"
        if dist.get_rank() == 0:
            print("OK")
    finally:
        destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now(0)  # gloo threads can abort the interpreter's teardown (see exit_now)
