"""Routed experts as stacked 3-D weights, run as one grouped matmul or as a loop."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _local(weight: torch.Tensor) -> torch.Tensor:
    """This rank's experts of a weight expert parallel made a DTensor (sharded on dim 0).

    NOTE: duck-typed (``to_local``) so that model code never imports torch.distributed; the
    routed tokens arriving here are plain tensors of this rank's experts only.
    """
    return weight.to_local() if hasattr(weight, "to_local") else weight


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs ``x`` against ``weights`` here: fp32 on CPU, bf16 on
    CUDA, one dtype throughout, and every row of the operands a multiple of 16 bytes long."""
    wanted = {"cpu": torch.float32, "cuda": torch.bfloat16}.get(x.device.type)
    if x.dtype != wanted or any(w.dtype != wanted for w in weights):
        return False
    row_elems = 16 // x.element_size()
    return all(w.shape[-1] % row_elems == 0 and w.shape[-2] % row_elems == 0 for w in weights)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    NOTE: ``torch._grouped_mm``'s backward fails on a stride-0 gradient (e.g. from
    ``out.sum()``); a contiguous one works.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _grouped_swiglu(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    num_tokens_per_expert: torch.Tensor,
) -> torch.Tensor:
    """Every expert's SwiGLU over its rows of ``x`` (N, dim), three grouped matmuls."""
    rows = x.shape[0]
    # NOTE: the kernels want every operand's rows 16-byte aligned, and x is read transposed in
    # the weights' backward: pad N with zero rows, given to the last expert (they add nothing
    # to its weights' gradients and their outputs are cut off).
    pad = -rows % (16 // x.element_size())
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    offsets = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)  # group ends
    if pad:
        offsets = torch.cat([offsets[:-1], offsets[-1:] + pad])
    h = F.silu(torch._grouped_mm(x, w1.transpose(-2, -1), offs=offsets))  # (N, hidden)
    h = h * torch._grouped_mm(x, w3.transpose(-2, -1), offs=offsets)
    out = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offsets)  # (N, dim)
    return _ContiguousGrad.apply(out[:rows] if pad else out)


@functools.cache
def _grouped_swiglu_eager() -> Callable[..., torch.Tensor]:
    """:func:`_grouped_swiglu` kept out of torch.compile.

    NOTE: torch.compile's fake-tensor rule for _grouped_mm accepts bf16 only; the fp32 (CPU)
    kernel therefore runs eagerly, a graph break inside a compiled block. Built on first use:
    ``torch.compiler.disable`` imports torch._dynamo, which importing a model must not.
    """
    return torch.compiler.disable(_grouped_swiglu)


def _looped_swiglu(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    num_tokens_per_expert: torch.Tensor,
) -> torch.Tensor:
    """The same as :func:`_grouped_swiglu`, one matmul per expert (reads the counts on host)."""
    outs = []
    for e, x_e in enumerate(torch.split(x, num_tokens_per_expert.tolist())):
        h = F.silu(x_e @ w1[e].T) * (x_e @ w3[e].T)  # (n_e, hidden)
        outs.append(h @ w2[e].T)  # (n_e, dim)
    return torch.cat(outs)


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU experts, ``w2[e](silu(w1[e] x) * w3[e] x)``, weights stacked:
    ``w1``/``w3`` (E, hidden, dim), ``w2`` (E, dim, hidden), each expert's matrix laid out as
    an ``nn.Linear`` weight (out, in).

    Expert parallel shards the weights on dim 0 and wraps this module from outside (dispatch
    before, combine after); the forward then sees this rank's experts and their tokens only.

    Args:
        dim: model width.
        hidden_dim: inner width of one expert.
        num_experts: experts (E).
        use_grouped_mm: one ``torch._grouped_mm`` per projection where
            :func:`grouped_mm_supported`, else a loop over experts.
    """

    def __init__(
        self, dim: int, hidden_dim: int, num_experts: int, use_grouped_mm: bool = True
    ) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.use_grouped_mm = use_grouped_mm

    def forward(
        self, routed_input: torch.Tensor, num_tokens_per_expert: torch.Tensor
    ) -> torch.Tensor:
        """Run each expert on its rows.

        Args:
            routed_input: (N, dim) tokens sorted by expert: the first
                ``num_tokens_per_expert[0]`` rows go to expert 0, and so on.
            num_tokens_per_expert: (E,) integer rows per expert, summing to N.

        Returns:
            (N, dim), row i the output of row i's expert.
        """
        w1, w2, w3 = _local(self.w1), _local(self.w2), _local(self.w3)
        if self.use_grouped_mm and grouped_mm_supported(routed_input, w1, w2, w3):
            run = (
                _grouped_swiglu if routed_input.dtype == torch.bfloat16 else _grouped_swiglu_eager()
            )
        else:
            run = _looped_swiglu
        return run(routed_input, w1, w2, w3, num_tokens_per_expert)

    def init_weights(self, init_std: float) -> None:
        """``w1`` at std 0.02, ``w2``/``w3`` at the depth-scaled ``init_std`` (as a dense FFN)."""
        nn.init.trunc_normal_(self.w1, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.w2, mean=0.0, std=init_std)
        nn.init.trunc_normal_(self.w3, mean=0.0, std=init_std)
