"""What the probe does differently for mixture-of-experts models, each for a reason.

- **Routing is even.** Fake tensors have no values, so which experts a token picks is unknown,
  and expert parallelism's all-to-all needs its split sizes on the host
  (:func:`titan_core.parallel.expert_parallel.exchange_sizes`). The probe splits every rank's
  routed rows evenly over the expert-parallel ranks, the case load balancing aims at. A step
  whose routing is skewed holds more on its busiest rank than the plan says.
- **fp32 grouped matmuls have a shape rule.** The probe computes on CPU, where titan runs the
  routed experts as ``torch._grouped_mm`` in fp32; torch's fake-tensor (meta) rule for that op
  accepts bf16 only. For fp32 operands the probe gives it the output that op's own shape rule
  describes; other dtypes keep torch's rule.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import Tensor


@contextlib.contextmanager
def moe_stand_ins() -> Iterator[None]:
    """Both stand-ins of the module docstring: even routing for the duration of one probe, the
    fp32 rule from then on in this process."""
    _fp32_grouped_mm_rule()
    with _even_expert_routing():
        yield


def even_split(rows: int, ranks: int) -> list[int]:
    """``rows`` over ``ranks`` as evenly as whole rows allow (the remainder to the last)."""
    sizes = [rows // ranks] * ranks
    sizes[-1] += rows - sum(sizes)
    return sizes


@contextlib.contextmanager
def _even_expert_routing() -> Iterator[None]:
    from titan_core.parallel import expert_parallel

    def even(send: Tensor, receive: Tensor, rows: int) -> tuple[list[int], list[int]]:
        # Every rank routes the same number of rows, so what it receives mirrors what it sends.
        sizes = even_split(rows, send.shape[0])
        return sizes, list(sizes)

    original = expert_parallel.exchange_sizes
    expert_parallel.exchange_sizes = even
    try:
        yield
    finally:
        expert_parallel.exchange_sizes = original


@functools.cache
def _fp32_grouped_mm_rule() -> torch.library.Library:
    """Register the fp32 rule, once per process (the cache keeps the library that holds it).

    NOTE: it stays for the rest of the process: after the library that registered it is
    destroyed, fake tensors still answered with it (torch 2.13). That is harmless: the rule
    describes what the CPU kernel really does, and titan-plan probes in forked children.
    """
    import torch._meta_registrations as meta

    def rule(
        mat_a: Tensor,
        mat_b: Tensor,
        offs: Tensor | None = None,
        bias: Tensor | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> Tensor:
        if mat_a.dtype == mat_b.dtype == torch.float32 and bias is None:
            return meta._create_grouped_mm_output_tensor(mat_a, mat_b, offs, out_dtype)
        return meta.meta_grouped_mm(mat_a, mat_b, offs=offs, bias=bias, out_dtype=out_dtype)

    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_grouped_mm", rule, "Meta")
    return lib
