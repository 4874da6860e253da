"""torchrun worker: context-parallel attention (and a tiny Llama) against one-device math.

Every rank seeds identically, so each builds the same full inputs and the same reference; each
then keeps only its CP positions and checks its slice of the output and of the gradients. Key,
value and parameter gradients are partial sums per rank, so they are all-reduced before the check.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        tests/dist_scripts/cp_attention_check.py --method alltoall

Prints "OK" (rank 0) and exits 0; any mismatch raises.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.testing import assert_close

from titan_core.distributed import destroy_process_group, exit_now
from titan_core.parallel.context import (
    ContextParallelAttention,
    apply_context_parallel,
    load_balanced_positions,
)
from titan_llama3.args import Llama3Args
from titan_llama3.model import Transformer

B, H, H_KV, S, D = 2, 4, 2, 16, 8
FP32_TOL = {"rtol": 1e-5, "atol": 1e-6}
# bf16 has ~3 significant digits; this only shows the bf16 path runs and stays close.
BF16_TOL = {"rtol": 2e-2, "atol": 2e-2}


def summed_over_ranks(local_grad: torch.Tensor, positions: torch.Tensor, full_like: torch.Tensor):
    """Place a rank's gradient rows at its positions (dim 2) in a zero tensor and all-reduce."""
    full = torch.zeros_like(full_like, dtype=local_grad.dtype)
    full.index_copy_(2, positions, local_grad)
    dist.all_reduce(full)
    return full


def check_attention(mesh: DeviceMesh, method: str, dtype: torch.dtype, tol: dict) -> None:
    """ContextParallelAttention's output and q/k/v grads equal full causal SDPA's, per rank."""
    torch.manual_seed(0)
    q = torch.randn(B, H, S, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H_KV, S, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H_KV, S, D, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(B, H, S, D, dtype=dtype)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref.backward(grad_out)

    positions = load_balanced_positions(S, mesh.size(), mesh.get_local_rank())
    q_l, k_l, v_l = (t.detach().clone().index_select(2, positions) for t in (q, k, v))
    for t in (q_l, k_l, v_l):
        t.requires_grad_()
    out = ContextParallelAttention(mesh, positions, method)(q_l, k_l, v_l)
    out.backward(grad_out.index_select(2, positions))

    assert_close(out, ref.detach().index_select(2, positions), **tol)
    assert_close(q_l.grad, q.grad.index_select(2, positions), **tol)
    assert_close(summed_over_ranks(k_l.grad, positions, k), k.grad, **tol)
    assert_close(summed_over_ranks(v_l.grad, positions, v), v.grad, **tol)


def check_model(mesh: DeviceMesh, method: str) -> None:
    """A tiny Llama under apply_context_parallel: logits rows and summed parameter grads match."""
    torch.manual_seed(0)
    args = Llama3Args(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=64)
    model = Transformer(args)
    model.init_weights()
    cp_model = copy.deepcopy(model)
    tokens = torch.randint(0, args.vocab_size, (B, S))
    grad_logits = torch.randn(B, S, args.vocab_size)
    ref = model(tokens)
    ref.backward(grad_logits)

    positions = apply_context_parallel(cp_model, mesh, S, method)
    logits = cp_model(tokens.index_select(1, positions))
    logits.backward(grad_logits.index_select(1, positions))
    assert_close(logits, ref.detach().index_select(1, positions), rtol=1e-5, atol=1e-5)
    for (name, p), p_cp in zip(model.named_parameters(), cp_model.parameters(), strict=True):
        grad = p_cp.grad.clone()
        dist.all_reduce(grad)  # each rank saw only its tokens; the full gradient is their sum
        assert_close(grad, p.grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=("allgather", "alltoall"))
    method = parser.parse_args().method
    dist.init_process_group("gloo")
    try:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("cp",))
        check_attention(mesh, method, torch.float32, FP32_TOL)
        check_attention(mesh, method, torch.bfloat16, BF16_TOL)
        check_model(mesh, method)
        if dist.get_rank() == 0:
            print("OK")
    finally:
        destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now(0)  # gloo threads can abort the interpreter's teardown (see exit_now)
