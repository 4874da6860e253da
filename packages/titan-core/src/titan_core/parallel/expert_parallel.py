"""Expert parallel: the routed experts of each MoE layer split over the ``ep`` ranks.

Applied from outside to each ``moe.experts`` module (a ``GroupedExperts``: stacked weights
``w1``/``w2``/``w3`` of shape (E, ...), called as ``experts(routed_input, num_tokens_per_expert)``
with the tokens sorted by expert). :class:`ExpertParallel` shards the weights on dim 0, so ep rank
``r`` holds experts ``r * E/ep`` to ``(r + 1) * E/ep - 1``, and wraps the call:

1. dispatch (before): the ranks first exchange how many of their tokens go to each expert, then
   send each rank the tokens of its experts with one ``all_to_all_single`` with split sizes
   (list-based ``all_to_all`` fails on gloo with uneven sizes), and the received tokens, grouped
   by source rank, are re-sorted by local expert;
2. the experts run on their own tokens only, as in one process;
3. combine (after): the outputs are put back in the received order and returned to the ranks
   they came from by the reverse all-to-all.

Both all-to-alls are differentiable (``all_to_all_single_autograd``): backward sends each
token's gradient the opposite way, so an expert's weight gradient sums the contributions of
every rank of its ``ep`` group; FSDP then reduces it over the ranks that hold the same experts
(see :func:`titan_core.parallel.fsdp.apply_fsdp`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

# Set on every module ExpertParallel wraps: FSDP gives it its own mesh (see apply_fsdp).
EXPERT_PARALLEL_ATTR = "_titan_expert_parallel"


@dataclass
class _Dispatch:
    """What the combine of one call needs from its dispatch."""

    send_splits: list[int] = field(default_factory=list)
    recv_splits: list[int] = field(default_factory=list)
    order: Tensor | None = None  # received row -> expert-major row


def exchange_sizes(send: Tensor, receive: Tensor, rows: int) -> tuple[list[int], list[int]]:
    """The token all-to-all's split sizes as host integers.

    NOTE: one device-to-host sync per layer. ``rows`` (the rows this rank routes, ``send``'s
    sum, known without a sync) is not read here: it is what a stand-in without the counts'
    values needs. titan-plan's probe runs on fake tensors, which have no values, and replaces
    this function with an even split (``titan_core.plan.probe_moe``).

    Args:
        send: (ep,) rows this rank sends to each rank.
        receive: (ep,) rows this rank receives from each rank.
        rows: ``send.sum()``.

    Returns:
        (rows to each rank, rows from each rank).
    """
    send_sizes, receive_sizes = torch.stack([send, receive]).tolist()
    return send_sizes, receive_sizes


def expert_major_order(counts: Tensor, total: int) -> Tensor:
    """The permutation that re-sorts received tokens from source-rank-major to expert-major.

    Args:
        counts: (ep, local_experts) tokens received from each source rank for each local expert,
            in the order they arrived (rank 0's tokens for expert 0, 1, ..., then rank 1's...).
        total: ``counts.sum()``, known on the host already (no device sync here).

    Returns:
        (N,) int64 ``order`` such that ``received[order]`` lists expert 0's tokens (from rank 0,
        then rank 1, ...), then expert 1's, and so on.
    """
    flat = counts.reshape(-1)
    starts = torch.cumsum(flat, 0) - flat  # where each (rank, expert) segment begins
    # Segments in the target order: (expert, rank).
    seg_counts = counts.t().reshape(-1)
    seg_starts = starts.view_as(counts).t().reshape(-1)
    seg_of_row = torch.repeat_interleave(
        torch.arange(seg_counts.numel(), device=counts.device), seg_counts, output_size=total
    )
    seg_first_row = torch.cumsum(seg_counts, 0) - seg_counts
    within = torch.arange(total, device=counts.device) - seg_first_row[seg_of_row]
    return seg_starts[seg_of_row] + within


class ExpertParallel(ParallelStyle):
    """Shard a grouped-experts module's weights on dim 0 over the ``ep`` mesh and dispatch /
    combine its tokens with all-to-alls (module doc). Apply with
    ``parallelize_module(experts, ep_mesh, ExpertParallel())``."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        state = _Dispatch()

        def shard(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            for pname, param in list(mod.named_parameters(recurse=False)):
                if param.shape[0] % mesh.size():
                    raise ValueError(
                        f"{name}.{pname}: {param.shape[0]} experts do not split over "
                        f"{mesh.size()} expert-parallel ranks"
                    )
                sharded = nn.Parameter(distribute_tensor(param, mesh, [Shard(0)]))
                mod.register_parameter(pname, sharded)

        def dispatch(mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple[Tensor, Tensor]:
            routed_input, counts = inputs
            return dispatch_tokens(routed_input, counts, mesh, state)

        def combine(mod: nn.Module, output: Tensor, mesh: DeviceMesh) -> Tensor:
            return combine_tokens(output, mesh, state)

        distribute_module(module, device_mesh, shard, dispatch, combine)
        setattr(module, EXPERT_PARALLEL_ATTR, True)
        return module


def dispatch_tokens(
    routed_input: Tensor, counts: Tensor, mesh: DeviceMesh, state: _Dispatch
) -> tuple[Tensor, Tensor]:
    """Send each expert its tokens; return (this rank's tokens, expert-major; per local expert
    token counts). Records in ``state`` what :func:`combine_tokens` needs.

    Args:
        routed_input: (N, dim) this rank's token copies sorted by (global) expert.
        counts: (E,) integer copies per expert, summing to N.
        mesh: the 1-D ``ep`` mesh.
        state: filled here, read by the matching combine.
    """
    ep, group = mesh.size(), mesh.get_group()
    local_experts = counts.numel() // ep
    with torch.no_grad():
        # received[r * local + e]: tokens rank r sends to my local expert e.
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts.contiguous(), group=group)
        received = received.view(ep, local_experts)
        send = counts.view(ep, local_experts).sum(1)
        sizes = exchange_sizes(send, received.sum(1), routed_input.shape[0])
        state.send_splits, state.recv_splits = sizes
        state.order = expert_major_order(received, sum(state.recv_splits))
    tokens = all_to_all_single_autograd(
        routed_input.contiguous(), state.recv_splits, state.send_splits, group
    )
    # NOTE: a functional collective returns a tensor that waits on first use; index_select on
    # it is that use.
    tokens = tokens.index_select(0, state.order)  # (received, dim), expert-major
    return tokens, received.sum(0)


def combine_tokens(output: Tensor, mesh: DeviceMesh, state: _Dispatch) -> Tensor:
    """Undo :func:`dispatch_tokens`: rows back in the order received, then back to their ranks.

    Returns:
        (N, dim) the expert outputs of this rank's token copies, in the order it sent them.
    """
    order = state.order
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    output = output.index_select(0, inverse)
    return all_to_all_single_autograd(
        output.contiguous(), state.send_splits, state.recv_splits, mesh.get_group()
    )


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Apply :class:`ExpertParallel` to the routed experts (``moe.experts``) of every block of
    ``model.layers`` (a whole model or a pipeline stage); dense blocks are left as they are.

    Args:
        model: a decoder following the module-name contract (``layers.{i}.moe.experts``).
        ep_mesh: the 1-D ``ep`` mesh (``ParallelMesh.get("ep")``).
    """
    for block in model.layers.values():
        moe = getattr(block, "moe", None)
        if moe is not None:
            parallelize_module(moe.experts, ep_mesh, ExpertParallel())


def is_expert_parallel(module: nn.Module) -> bool:
    """Whether :class:`ExpertParallel` wraps ``module``."""
    return getattr(module, EXPERT_PARALLEL_ATTR, False)
