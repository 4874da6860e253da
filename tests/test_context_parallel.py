"""Context parallelism: positions, RoPE rows, the ring merge, and attention under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.testing import assert_close

from helpers import REPO
from titan_core.models import RoPE
from titan_core.parallel.context import (
    ContextParallelAttention,
    ContextParallelRoPE,
    _block_attention,
    _merge_blocks,
    apply_context_parallel,
    load_balanced_positions,
)
from titan_llama3.args import Llama3Args
from titan_llama3.model import Transformer

WORKER = REPO / "tests" / "dist_scripts" / "cp_attention_check.py"


def test_positions_pair_early_and_late_chunks():
    assert load_balanced_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert load_balanced_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert load_balanced_positions(8, 2, 0).dtype == torch.int64


@pytest.mark.parametrize(("seq_len", "cp"), [(8, 2), (16, 4), (24, 3), (6, 1)])
def test_positions_cover_the_sequence_once(seq_len, cp):
    held = torch.cat([load_balanced_positions(seq_len, cp, r) for r in range(cp)])
    assert len(held) == seq_len
    assert sorted(held.tolist()) == list(range(seq_len))


def test_positions_reject_indivisible_seq_len():
    with pytest.raises(ValueError, match=r"seq_len=12 .* 2 \* context_parallel_degree = 8"):
        load_balanced_positions(12, 4, 0)
    with pytest.raises(ValueError, match="cp_rank=2"):
        load_balanced_positions(8, 2, 2)


def test_rope_rows_are_the_held_positions():
    rope = RoPE(head_dim=8, max_seq_len=32)
    positions = load_balanced_positions(16, 2, 1)  # [4..7, 8..11]
    cos, sin = ContextParallelRoPE(rope, positions)(len(positions))
    assert_close(cos, rope.cos[4:12])
    assert_close(sin, rope.sin[4:12])
    # The model asks for the full sequence; the rows are this rank's either way.
    full_cos, _ = ContextParallelRoPE(rope, positions)(16)
    assert_close(full_cos, cos)


def test_rope_survives_meta_materialisation():
    """The trainer parallelises on meta on GPU, then runs to_empty and init (reset_parameters)."""
    positions = load_balanced_positions(16, 2, 0)
    with torch.device("meta"):
        wrapped = ContextParallelRoPE(RoPE(head_dim=8, max_seq_len=32), positions)
    wrapped.to_empty(device="cpu")
    wrapped.reset_parameters()
    expected = ContextParallelRoPE(RoPE(head_dim=8, max_seq_len=32), positions)(8)
    assert_close(wrapped(8), expected)


def test_ring_merge_equals_full_attention():
    """Per-block attention merged by log-sum-exp equals one SDPA call, values and grads, with a
    block that no query can see (the merge must give it weight 0, not NaN)."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 12, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 12, 8, dtype=torch.float64, requires_grad=True)
    query_pos = torch.tensor([2, 3, 4, 5])
    key_pos = torch.arange(12)
    mask = key_pos[None, :] <= query_pos[:, None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))

    out = lse = None
    for block in (slice(4, 8), slice(0, 4), slice(8, 12)):  # the last is invisible to all
        b_out, b_lse = _block_attention(
            q, k[:, :, block], v[:, :, block], query_pos, key_pos[block]
        )
        out, lse = _merge_blocks(out, lse, b_out, b_lse)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert_close(out.to(q.dtype), ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_close(g, g_ref)


@pytest.fixture
def single_rank_mesh():
    """A one-process gloo group, so modules that need a mesh can be built in-process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("cp",))
    finally:
        dist.destroy_process_group()


def test_unknown_rotate_method_is_named(single_rank_mesh):
    positions = load_balanced_positions(8, 1, 0)
    with pytest.raises(ValueError, match="rotate_method='ring'"):
        ContextParallelAttention(single_rank_mesh, positions, "ring")
    model = Transformer(Llama3Args(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=32))
    with pytest.raises(ValueError, match="rotate_method='ring'"):
        apply_context_parallel(model, single_rank_mesh, 8, "ring")


@pytest.mark.parametrize("method", ["allgather", "alltoall"])
def test_cp_of_one_leaves_the_model_unchanged(single_rank_mesh, method):
    torch.manual_seed(0)
    args = Llama3Args(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=64)
    model = Transformer(args)
    model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    ref = model(tokens)
    keys = list(model.state_dict())
    positions = apply_context_parallel(model, single_rank_mesh, 16, method)
    assert list(model.state_dict()) == keys  # checkpoints stay layout-independent
    assert positions.tolist() == list(range(16))
    kernels = [m for m in model.modules() if isinstance(m, ContextParallelAttention)]
    assert len(kernels) == args.n_layers
    assert isinstance(model.rope, ContextParallelRoPE)
    assert_close(model(tokens), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("nproc", "method"), [(2, "allgather"), (2, "alltoall"), (4, "alltoall"), (4, "allgather")]
)
def test_context_parallel_attention_matches_one_device(nproc, method):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(nproc), str(WORKER), "--method", method,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.strip().splitlines()[-1] == "OK"
