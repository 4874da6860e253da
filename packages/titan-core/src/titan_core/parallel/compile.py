"""torch.compile applied per transformer block (and to the loss), from outside the model."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

logger = logging.getLogger("titan")


def compile_blocks(model: nn.Module, clone_inputs: bool = False) -> None:
    """Compile the forward of each block of ``model.layers`` in place (names are unchanged).

    Per-block compile gives one small graph that every block reuses (same shapes), so the first
    step compiles once, not once per layer, and FSDP still wraps each block: its hooks run
    around the compiled forward.

    Args:
        model: a model with a ``layers`` ModuleDict.
        clone_inputs: copy each block's input before the compiled region. Needed under tensor
            parallel: the input is then a view made by ``DTensor.to_local()``, which the
            compiled graph fails on ("'Tensor' object has no attribute '_local_tensor'").
    """
    for block in model.layers.values():
        moe = getattr(block, "moe", None)
        if moe is not None:
            # NOTE: an MoE block is compiled with graph breaks allowed, and its routed experts
            # run eagerly: the tokens per expert are data-dependent (so are the loop experts'
            # and expert parallel's split sizes, read on the host), the experts may be an FSDP
            # group of their own (whose hooks dynamo does not trace), and under expert parallel
            # their weights are DTensors whose local shards dynamo did not unwrap ("mixed
            # torch.Tensor and DTensor"). Attention, norms, router, shared experts and the
            # routing arithmetic are compiled.
            moe.experts.forward = torch.compiler.disable(moe.experts.forward)
        compiled = torch.compile(block.forward, fullgraph=moe is None)
        if clone_inputs:

            def forward(x, *args, _compiled=compiled, **kwargs):
                return _compiled(x.clone(), *args, **kwargs)

            block.forward = forward
        else:
            block.forward = compiled


def isolate_compile_cache(rank: int) -> None:
    """Give each rank its own inductor cache folder (unless the user chose one).

    NOTE: ranks of different TP/CP groups compile graphs that differ only in the process
    group they name; a shared on-disk cache served one rank's graph to another, which then
    failed with "Could not resolve the process group registered under the name ...".
    """
    import getpass
    import os
    import tempfile

    default = os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(default, f"rank{rank}"))


def compile_loss(loss_fn: Callable) -> Callable:
    return torch.compile(loss_fn)


def enable_async_tp(tp_mesh: DeviceMesh) -> None:
    """Async TP: the compiler overlaps TP's all-gathers/reduce-scatters with the matmuls.

    On CUDA this turns on inductor's micro-pipeline TP pass over symmetric memory. On CPU
    the pass has nothing to fuse (it needs NCCL and symmetric memory): training runs as plain
    TP with compile, which is the CPU twin the tests compare against one process.
    """
    if tp_mesh.device_type != "cuda":
        logger.warning("async tensor parallel fuses nothing on CPU; running plain TP + compile")
        return
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    torch._inductor.config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)
