"""Context parallelism (CP): each of ``cp`` ranks holds a slice of every sequence.

The sequence is cut into ``2 * cp`` equal chunks and rank ``r`` holds chunks ``r`` and
``2 * cp - 1 - r``, in that order. Under a causal mask early chunks attend to little and late ones
to a lot, so pairing them gives every rank the same attention work.

The model stays untouched: :func:`apply_context_parallel` swaps its attention kernels
(``ScaledDotProductAttention``) for :class:`ContextParallelAttention` and its ``rope`` for
:class:`ContextParallelRoPE`; the trainer shards tokens and labels with the positions it returns.

NOTE: PyTorch's own ``context_parallel`` dispatches through DTensor and has no sharding rule for
the CPU flash kernel, so we gather or rotate keys and values ourselves, with autograd-aware
functional collectives, and call plain kernels on plain tensors.
"""

from __future__ import annotations

import math

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from titan_core.models.attention import ScaledDotProductAttention

ROTATE_METHODS = ("allgather", "alltoall")


def load_balanced_positions(seq_len: int, cp_degree: int, cp_rank: int) -> torch.Tensor:
    """Global positions held by ``cp_rank``: chunks ``cp_rank`` and ``2*cp_degree-1-cp_rank``.

    Args:
        seq_len: full (global) sequence length; a multiple of ``2 * cp_degree``.
        cp_degree: number of context-parallel ranks.
        cp_rank: this rank's index in the CP group, ``0 <= cp_rank < cp_degree``.

    Returns:
        int64 tensor of length ``seq_len // cp_degree``, on CPU.
    """
    if cp_degree < 1 or not 0 <= cp_rank < cp_degree:
        raise ValueError(f"cp_rank={cp_rank} is not a rank of a CP group of size {cp_degree}")
    if seq_len % (2 * cp_degree):
        raise ValueError(
            f"seq_len={seq_len} is not divisible by 2 * context_parallel_degree = "
            f"{2 * cp_degree}; context parallelism cuts each sequence into that many equal "
            "chunks, so pick a seq_len that is a multiple of it"
        )
    chunk = seq_len // (2 * cp_degree)
    late = 2 * cp_degree - 1 - cp_rank
    return torch.cat(
        (
            torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk),
            torch.arange(late * chunk, (late + 1) * chunk),
        )
    )


class ContextParallelRoPE(nn.Module):
    """Wraps a RoPE module so its (cos, sin) rows are those of this rank's global positions.

    Args:
        rope: the model's RoPE module; called as ``rope(n)`` for the first ``n`` positions.
        positions: int64 global positions this rank holds (see :func:`load_balanced_positions`).
    """

    def __init__(self, rope: nn.Module, positions: torch.Tensor) -> None:
        super().__init__()
        self.inner = rope
        positions = positions.detach().cpu().to(torch.long)
        # NOTE: a plain CPU copy survives ``to_empty`` (which the trainer runs after parallelising
        # a meta-device model on GPU); reset_parameters() refills the buffer from it.
        self._positions_cpu = positions.clone()
        self._span = int(positions.max()) + 1  # rows of the inner table we need
        device = next(rope.buffers(), positions).device  # sit with the tables (or on meta)
        self.register_buffer("positions", positions.to(device), persistent=False)

    def reset_parameters(self) -> None:
        """Rebuild the wrapped tables and the positions after materialisation from meta."""
        if hasattr(self.inner, "reset_parameters"):
            self.inner.reset_parameters()
        if not self.positions.is_meta:
            with torch.no_grad():
                self.positions.copy_(self._positions_cpu)

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cos, sin) rows of this rank's positions, each (S_local, D/2).

        Args:
            seq_len: the full sequence length (unused: this rank's rows are fixed); the
                attention checks that its inputs hold exactly these positions.
        """
        cos, sin = self.inner(self._span)
        return cos.index_select(0, self.positions), sin.index_select(0, self.positions)


class ContextParallelAttention(nn.Module):
    """Causal (GQA) attention for a rank holding only its CP slice of each sequence.

    A drop-in replacement for ``ScaledDotProductAttention``: queries are (B, H, S_local, D), keys
    and values (B, H_kv, S_local, D), all at this rank's global ``positions``; the output holds
    exactly the rows full causal attention over the whole sequence gives at those positions.

    Args:
        cp_mesh: 1-D mesh of the CP group.
        positions: this rank's global positions, as :func:`load_balanced_positions` gives them.
        rotate_method: ``allgather`` (gather all keys/values, one masked SDPA call) or
            ``alltoall`` (a ring: pass key/value blocks to the next rank ``cp - 1`` times,
            overlapping each hop with the previous block's math, and merge per-block attention
            by log-sum-exp). Autograd keeps every block for backward in both methods.
    """

    def __init__(
        self,
        cp_mesh: DeviceMesh,
        positions: torch.Tensor,
        rotate_method: str,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        _check_rotate_method(rotate_method)
        self.scale = scale
        if cp_mesh.ndim != 1:
            raise ValueError(f"context parallel needs a 1-D cp mesh, got {cp_mesh.ndim} dims")
        self.rotate_method = rotate_method
        self.group = cp_mesh.get_group()
        self.cp_degree = cp_mesh.size()
        self.cp_rank = cp_mesh.get_local_rank()
        seq_len = positions.numel() * self.cp_degree
        key_positions = torch.stack(
            [load_balanced_positions(seq_len, self.cp_degree, r) for r in range(self.cp_degree)]
        )  # (cp, S_local): row r holds rank r's positions, the order gathered blocks arrive in
        if not torch.equal(positions.cpu().to(torch.long), key_positions[self.cp_rank]):
            raise ValueError(
                f"CP rank {self.cp_rank} got positions that are not its load-balanced layout; "
                "build them with load_balanced_positions(seq_len, cp_degree, cp_rank)"
            )
        # NOTE: plain attributes, not buffers: a buffer would be left uninitialised by the
        # trainer's ``to_empty`` after parallelising on meta; forward moves them to q's device.
        self.key_positions = key_positions

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of the local queries over the whole sequence, (B, H, S_local, D)."""
        local = self.key_positions.shape[1]
        if q.shape[2] != local or k.shape[2] != local:
            raise ValueError(
                f"context parallel attention expects {local} local positions per rank, got "
                f"q {tuple(q.shape)} and k {tuple(k.shape)}; shard inputs with the positions "
                "apply_context_parallel returned"
            )
        key_positions = self.key_positions.to(q.device)
        if self.rotate_method == "allgather":
            return self._allgather_attention(q, k, v, key_positions)
        return self._ring_attention(q, k, v, key_positions)

    def _allgather_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_positions: torch.Tensor
    ) -> torch.Tensor:
        # One collective for both: (B, H_kv, S_local, D + Dv) -> (B, H_kv, S, D + Dv), rank-major
        # (keys and values side by side: their head sizes may differ, as in MLA).
        kv = funcol.all_gather_single_autograd(torch.cat((k, v), dim=-1), 2, self.group)
        k, v = kv.split([k.shape[-1], v.shape[-1]], dim=-1)
        query_pos = key_positions[self.cp_rank]
        mask = key_positions.flatten()[None, :] <= query_pos[:, None]  # (S_local, S)
        # NOTE: SDPA with a boolean mask (and enable_gqa) runs the CPU flash kernel, forward and
        # backward; every row keeps its own diagonal key, so no row is fully masked.
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=gqa, scale=self.scale
        )

    def _ring_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_positions: torch.Tensor
    ) -> torch.Tensor:
        query_pos = key_positions[self.cp_rank]
        key_dim = k.shape[-1]
        kv = torch.cat((k, v), dim=-1)  # (B, H_kv, S_local, D + Dv): one message per hop
        out = lse = None
        for step in range(self.cp_degree):
            # NOTE: start the next hop before computing on the current block, so the transfer
            # overlaps the math (functional collectives wait only when the result is read).
            next_kv = self._rotate(kv) if step < self.cp_degree - 1 else None
            # The block we hold at this step started on rank (r - step) mod cp.
            source = (self.cp_rank - step) % self.cp_degree
            k, v = kv.split([key_dim, kv.shape[-1] - key_dim], dim=-1)
            block_out, block_lse = _block_attention(
                q, k, v, query_pos, key_positions[source], self.scale
            )
            out, lse = _merge_blocks(out, lse, block_out, block_lse)
            kv = next_kv
        return out.to(q.dtype)

    def _rotate(self, kv: torch.Tensor) -> torch.Tensor:
        """Send ``kv`` whole to rank r+1 and receive rank r-1's (dim 0 carries the splits)."""
        send = [0] * self.cp_degree
        recv = [0] * self.cp_degree
        send[(self.cp_rank + 1) % self.cp_degree] = kv.shape[0]
        recv[(self.cp_rank - 1) % self.cp_degree] = kv.shape[0]
        return funcol.all_to_all_single_autograd(kv.contiguous(), recv, send, self.group)


def _block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q over one key/value block, with the block's log-sum-exp.

    Args:
        q: (B, H, Sq, D) queries.
        k: (B, H_kv, Sk, D) keys; H is a multiple of H_kv.
        v: (B, H_kv, Sk, Dv) values.
        query_pos: (Sq,) global positions of the queries.
        key_pos: (Sk,) global positions of the keys.
        scale: the softmax scale; None: ``1 / sqrt(D)``.

    Returns:
        out (B, H, Sq, Dv) normalised within the block, and lse (B, H, Sq, 1) in at least
        float32.
    """
    batch, heads, q_len, head_dim = q.shape
    kv_heads = k.shape[1]
    # GQA without copies: query head h uses kv head h // group, as SDPA's enable_gqa does.
    q = q.view(batch, kv_heads, heads // kv_heads, q_len, head_dim)  # (B, H_kv, G, Sq, D)
    k, v = k.unsqueeze(2), v.unsqueeze(2)  # (B, H_kv, 1, Sk, D), broadcast over G
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H_kv, G, Sq, Sk)
    visible = key_pos[None, :] <= query_pos[:, None]  # (Sq, Sk)
    # NOTE: the dtype's most negative finite value, not -inf: a row that sees no key of this
    # block then gets a finite lse about that small, and a merge weight of exactly 0, not NaN.
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, H_kv, G, Sq, 1)
    out = torch.exp(scores - lse) @ v  # (B, H_kv, G, Sq, Dv)
    lse = lse.to(_merge_dtype(lse.dtype))
    return out.flatten(1, 2), lse.flatten(1, 2)  # (B, H, Sq, Dv), (B, H, Sq, 1)


def _merge_blocks(
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    block_out: torch.Tensor,
    block_lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax-normalised partial attentions by their log-sum-exps.

    NOTE: the running output and lse are at least float32 (a no-op for fp32 inputs) so that bf16
    runs do not round the merge weights at every hop; each block's own math stays in the input
    dtype.
    """
    if out is None or lse is None:
        return block_out.to(_merge_dtype(block_out.dtype)), block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    merged = out * torch.exp(lse - new_lse) + block_out * torch.exp(block_lse - new_lse)
    return merged, new_lse


def _merge_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself for float32 and float64."""
    return torch.promote_types(dtype, torch.float32)


def _check_rotate_method(rotate_method: str) -> None:
    if rotate_method not in ROTATE_METHODS:
        raise ValueError(
            f"context parallel rotate_method={rotate_method!r} is not one of {ROTATE_METHODS}"
        )


def apply_context_parallel(
    model: nn.Module, cp_mesh: DeviceMesh, seq_len: int, rotate_method: str
) -> torch.Tensor:
    """Make ``model`` attend and rotate as if each rank held the whole sequence.

    Replaces every ``ScaledDotProductAttention`` submodule with a :class:`ContextParallelAttention`
    and ``model.rope`` with a :class:`ContextParallelRoPE`.

    Args:
        model: a model with a ``rope`` attribute and ``ScaledDotProductAttention`` kernels.
        cp_mesh: 1-D mesh of the CP group.
        seq_len: global training sequence length; a multiple of ``2 * cp_mesh.size()``.
        rotate_method: ``allgather`` or ``alltoall``.

    Returns:
        This rank's int64 global positions (CPU); index tokens and labels (dim 1) with them.
    """
    _check_rotate_method(rotate_method)
    if not isinstance(getattr(model, "rope", None), nn.Module):
        raise ValueError(f"{type(model).__name__} has no `rope` module for context parallelism")
    positions = load_balanced_positions(seq_len, cp_mesh.size(), cp_mesh.get_local_rank())
    kernels = [
        name for name, m in model.named_modules() if isinstance(m, ScaledDotProductAttention)
    ]
    if not kernels or "" in kernels:
        raise ValueError(
            f"{type(model).__name__} has no ScaledDotProductAttention submodule to replace; "
            "context parallelism swaps that kernel"
        )
    for name in kernels:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        scale = parent.get_submodule(child).scale
        setattr(parent, child, ContextParallelAttention(cp_mesh, positions, rotate_method, scale))
    model.rope = ContextParallelRoPE(model.rope, positions)
    return positions
