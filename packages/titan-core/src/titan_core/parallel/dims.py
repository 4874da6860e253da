"""The parallel layout: degrees from ``[parallelism]``, validated, and the one device mesh.

All mesh construction lives here. The mesh has named dimensions ``pp, dp_replicate, dp_shard,
cp, tp`` (size-1 dimensions included, so every name always exists), plus flattened views:

- ``dp``: ``dp_replicate x dp_shard``, the ranks that see different data (the loader's group);
- ``dp_shard_cp``: ``dp_shard x cp``, the ranks FSDP shards parameters over;
- ``dp_cp``: ``dp_replicate x dp_shard x cp``, the ranks the loss is averaged over;
- ``dp_cp_tp``: every rank of this rank's pipeline stage (all dimensions but ``pp``); MoE token
  counts are summed over it for the expert-bias update, since each of these ranks routes
  different tokens (tp ranks hold different slices of the sequence).

With expert parallel (``ep > 1``) the routed experts are split over ``ep`` ranks borrowed from
``dp_shard x cp x tp`` (torchtitan's layout with ``expert_tensor_parallel_degree = 1``):
``dp_shard`` is then built from two dimensions, ``dp_shard_mod_ep x dp_shard_in_ep``, with
``ep = dp_shard_in_ep x cp x tp``. The world is ``pp, dp_replicate, dp_shard_mod_ep,
dp_shard_in_ep, cp, tp`` (same rank order as without EP, so the data each rank reads does not
change), ``dp_shard`` is a flattened view, and two more views exist:

- ``ep``: ``dp_shard_in_ep x cp x tp``, the ranks that exchange tokens and hold different experts;
- ``dp_shard_mod_ep`` (a plain dimension): the ranks that hold the same experts, over which FSDP
  shards them (with ``dp_replicate`` for HSDP), see :meth:`ParallelMesh.experts_fsdp_mesh`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from titan_core.config.job_config import JobConfig, Parallelism
from titan_core.errors import UserError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
EP_MESH_DIMS = ("pp", "dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Resolved degrees; their product equals ``world_size``."""

    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    ep: int
    world_size: int
    etp: int = 1

    @classmethod
    def from_config(cls, cfg: Parallelism, world_size: int) -> ParallelDims:
        """Resolve ``data_parallel_shard_degree = -1`` and check the layout against the world."""
        fixed = {
            "data_parallel_replicate_degree": cfg.data_parallel_replicate_degree,
            "context_parallel_degree": cfg.context_parallel_degree,
            "tensor_parallel_degree": cfg.tensor_parallel_degree,
            "pipeline_parallel_degree": cfg.pipeline_parallel_degree,
            "expert_parallel_degree": cfg.expert_parallel_degree,
            "expert_tensor_parallel_degree": cfg.expert_tensor_parallel_degree,
        }
        for key, value in fixed.items():
            if value < 1:
                raise UserError(f"parallelism.{key}={value}: a degree must be >= 1")
        others = (
            cfg.data_parallel_replicate_degree
            * cfg.context_parallel_degree
            * cfg.tensor_parallel_degree
            * cfg.pipeline_parallel_degree
        )
        shard = cfg.data_parallel_shard_degree
        if shard == -1:
            if world_size % others:
                raise UserError(
                    "parallelism: data_parallel_replicate_degree x context_parallel_degree x "
                    "tensor_parallel_degree x pipeline_parallel_degree = "
                    f"{cfg.data_parallel_replicate_degree} x {cfg.context_parallel_degree} x "
                    f"{cfg.tensor_parallel_degree} x {cfg.pipeline_parallel_degree} = {others} "
                    f"does not divide the world size {world_size}; change the degrees or the "
                    "number of processes"
                )
            shard = world_size // others
        elif shard < 1:
            raise UserError(
                f"parallelism.data_parallel_shard_degree={shard}: use -1 (all remaining ranks) "
                "or a degree >= 1"
            )
        if shard * others != world_size:
            raise UserError(
                "parallelism: data_parallel_replicate_degree x data_parallel_shard_degree x "
                "context_parallel_degree x tensor_parallel_degree x pipeline_parallel_degree = "
                f"{cfg.data_parallel_replicate_degree} x {shard} x {cfg.context_parallel_degree}"
                f" x {cfg.tensor_parallel_degree} x {cfg.pipeline_parallel_degree} = "
                f"{shard * others}, but the world size is {world_size}; make the product equal "
                "the number of processes"
            )
        return cls(
            dp_replicate=cfg.data_parallel_replicate_degree,
            dp_shard=shard,
            cp=cfg.context_parallel_degree,
            tp=cfg.tensor_parallel_degree,
            pp=cfg.pipeline_parallel_degree,
            ep=cfg.expert_parallel_degree,
            world_size=world_size,
            etp=cfg.expert_tensor_parallel_degree,
        )

    @property
    def dp(self) -> int:
        """Ranks that see different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def model_parallel(self) -> int:
        """Ranks that share one data-parallel rank's tokens (``pp x cp x tp``): a device's
        share of a step's tokens, for tokens/s per device and MFU, is the local batch over it."""
        return self.pp * self.cp * self.tp

    def dp_rank(self, rank: int) -> int:
        """This rank's index in the ``dp`` view; the mesh is laid out pp, dp, cp, tp."""
        return rank // (self.cp * self.tp) % self.dp

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard * self.cp > 1

    @property
    def dp_shard_in_ep(self) -> int:
        """The part of ``dp_shard`` expert parallel borrows: ``ep / (cp x tp)``."""
        return self.ep // (self.cp * self.tp)

    @property
    def dp_shard_mod_ep(self) -> int:
        """The rest of ``dp_shard``: ranks holding the same experts, which FSDP shards them over."""
        return self.dp_shard // self.dp_shard_in_ep

    @property
    def expert_grad_divide_factor(self) -> int:
        """What FSDP divides the routed experts' summed gradients by: ``dp_replicate x dp_shard
        x cp``, the ranks the loss is averaged over (every other parameter's FSDP mesh has that
        size; the experts' own mesh is ``ep / (cp x tp)`` times smaller, while the expert-parallel
        all-to-all has already summed the gradients of the ranks of their ``ep`` group)."""
        return self.dp_replicate * self.dp_shard * self.cp

    def build_mesh(self, device_type: str) -> ParallelMesh:
        """The world mesh with every named dimension and the flattened views (module doc)."""
        if self.ep > 1:
            return self._build_mesh_with_ep(device_type)
        sizes = (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)
        world = init_device_mesh(device_type, sizes, mesh_dim_names=MESH_DIMS)
        # NOTE: a flattened view is kept here rather than sliced from the world mesh again
        # later; torch deprecates re-slicing flattened dimensions from the root.
        views = {
            "dp": world["dp_replicate", "dp_shard"]._flatten("dp"),
            "dp_shard_cp": world["dp_shard", "cp"]._flatten("dp_shard_cp"),
            "dp_cp": world["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp"),
            "dp_cp_tp": world["dp_replicate", "dp_shard", "cp", "tp"]._flatten("dp_cp_tp"),
        }
        return ParallelMesh(world=world, views=views)

    def _build_mesh_with_ep(self, device_type: str) -> ParallelMesh:
        """``dp_shard`` split in two so that ``ep = dp_shard_in_ep x cp x tp`` (module doc)."""
        sizes = (
            self.pp,
            self.dp_replicate,
            self.dp_shard_mod_ep,
            self.dp_shard_in_ep,
            self.cp,
            self.tp,
        )
        world = init_device_mesh(device_type, sizes, mesh_dim_names=EP_MESH_DIMS)
        shard = ("dp_shard_mod_ep", "dp_shard_in_ep")
        views = {
            "dp_shard": world[shard]._flatten("dp_shard"),
            "dp": world[("dp_replicate", *shard)]._flatten("dp"),
            "dp_shard_cp": world[(*shard, "cp")]._flatten("dp_shard_cp"),
            "dp_cp": world[("dp_replicate", *shard, "cp")]._flatten("dp_cp"),
            "dp_cp_tp": world[("dp_replicate", *shard, "cp", "tp")]._flatten("dp_cp_tp"),
            "ep": world["dp_shard_in_ep", "cp", "tp"]._flatten("ep"),
        }
        return ParallelMesh(world=world, views=views)


@dataclass(frozen=True)
class ParallelMesh:
    """The world mesh and its flattened views; ``get`` returns either by name."""

    world: DeviceMesh
    views: dict[str, DeviceMesh]

    @property
    def device_type(self) -> str:
        return self.world.device_type

    def fsdp_mesh(self, dims: ParallelDims) -> DeviceMesh:
        """FSDP's mesh: ``dp_shard_cp``, or 2-D ``(dp_replicate, dp_shard_cp)`` for HSDP."""
        if dims.dp_replicate == 1:
            return self.views["dp_shard_cp"]
        if dims.cp == 1:
            return self.world["dp_replicate", "dp_shard"]
        # NOTE: HSDP with CP (and HSDP with EP, where dp_shard itself is flattened) slices a
        # flattened dimension from the root, which torch warns it will deprecate; no other
        # public route builds this 2-D mesh yet.
        return self.world["dp_replicate", "dp_shard_cp"]

    def experts_fsdp_mesh(self, dims: ParallelDims) -> DeviceMesh:
        """The routed experts' FSDP mesh under expert parallel: the ranks holding the same
        experts, ``dp_shard_mod_ep``, or 2-D ``(dp_replicate, dp_shard_mod_ep)`` for HSDP."""
        if dims.dp_replicate == 1:
            return self.world["dp_shard_mod_ep"]
        return self.world["dp_replicate", "dp_shard_mod_ep"]

    def get(self, *names: str) -> DeviceMesh:
        """A flattened view (``dp``, ``dp_shard_cp``, ``dp_cp``, ``dp_cp_tp``, and with expert
        parallel ``dp_shard`` and ``ep``) or a slice of named dims."""
        if len(names) == 1 and names[0] in self.views:
            return self.views[names[0]]
        return self.world[names]


def check_supported(dims: ParallelDims) -> None:
    """Refuse the degrees this release does not implement, naming the key."""
    if dims.etp != 1:
        raise UserError(
            f"parallelism.expert_tensor_parallel_degree={dims.etp}: only 1 is supported (each "
            "routed expert is whole on its expert-parallel rank); leave it at 1"
        )


def _check_moe_layout(dims: ParallelDims, config: JobConfig, moe: Any) -> None:
    """Expert count, top-k and degrees of an MoE model (``model_args.moe``)."""
    model = f"{config.model.name} {config.model.flavor}"
    experts, top_k = moe.num_experts, moe.top_k
    if top_k > experts:
        raise UserError(
            f"model.flavor: {model} routes each token to top_k={top_k} experts but has only "
            f"num_experts={experts}; top_k must be <= num_experts"
        )
    cp_tp = dims.cp * dims.tp
    if dims.ep > 1 and (dims.ep % cp_tp or (dims.dp_shard * cp_tp) % dims.ep):
        raise UserError(
            f"parallelism.expert_parallel_degree={dims.ep} must be a multiple of "
            f"context_parallel_degree x tensor_parallel_degree = {dims.cp} x {dims.tp} = "
            f"{cp_tp} and divide data_parallel_shard_degree x context_parallel_degree x "
            f"tensor_parallel_degree = {dims.dp_shard} x {dims.cp} x {dims.tp} = "
            f"{dims.dp_shard * cp_tp} (expert parallel borrows all of cp and tp and part of "
            "dp_shard); change the degrees"
        )
    if experts % dims.ep:
        raise UserError(
            f"parallelism.expert_parallel_degree={dims.ep} does not divide the number of routed "
            f"experts num_experts={experts} ({model}); pick a divisor"
        )
    if dims.tp > 1 and dims.ep == 1:
        # NOTE: under TP the MoE routes this rank's slice of the sequence (sequence parallel),
        # so the routed experts must be expert-parallel over the tp ranks (never TP-sharded).
        raise UserError(
            f"parallelism.tensor_parallel_degree={dims.tp} with an MoE model ({model}) needs "
            "expert_parallel_degree > 1, a multiple of context_parallel_degree x "
            f"tensor_parallel_degree = {cp_tp} (routed experts are expert-parallel "
            "over the tp ranks, not tensor-parallel); set --parallelism.expert_parallel_degree"
        )


def validate_layout(dims: ParallelDims, config: JobConfig, model_args: Any) -> None:
    """Check the degrees against the model and the batch, naming the keys and the numbers."""
    p, t = config.parallelism, config.training
    moe = getattr(model_args, "moe", None)
    if moe is not None:
        _check_moe_layout(dims, config, moe)
    elif dims.ep > 1:
        raise UserError(
            f"parallelism.expert_parallel_degree={dims.ep}: expert parallel needs an MoE model, "
            f"and {config.model.name} {config.model.flavor} has no experts; leave it at 1"
        )
    for attr in ("n_heads", "n_kv_heads"):
        heads = getattr(model_args, attr, None)
        if heads is not None and heads % dims.tp:
            raise UserError(
                f"parallelism.tensor_parallel_degree={dims.tp} does not divide the model's "
                f"{attr}={heads} ({config.model.name} {config.model.flavor}); pick a divisor"
            )
    check_seq_len("training.seq_len", t.seq_len, dims)
    if dims.pp > 1 and t.local_batch_size % p.pipeline_parallel_microbatch_size:
        raise UserError(
            f"parallelism.pipeline_parallel_microbatch_size={p.pipeline_parallel_microbatch_size}"
            f" does not divide training.local_batch_size={t.local_batch_size}; pick a divisor"
        )
    if p.enable_async_tensor_parallel and (dims.tp == 1 or not config.compile.enable):
        raise UserError(
            "parallelism.enable_async_tensor_parallel needs tensor_parallel_degree > 1 and "
            "--compile.enable (its overlap is a compiler pass)"
        )


def check_seq_len(key: str, seq_len: int, dims: ParallelDims) -> None:
    """A sequence length the layout can cut: CP's load-balanced chunks, SP's shards.

    Args:
        key: the config key that holds it (``training.seq_len``, ``validation.seq_len``).
        seq_len: its value.
        dims: the parallel degrees.
    """
    if dims.cp > 1 and seq_len % (2 * dims.cp * dims.tp):
        raise UserError(
            f"{key}={seq_len} must be divisible by 2 x context_parallel_degree x "
            f"tensor_parallel_degree = {2 * dims.cp * dims.tp} (load-balanced chunks); change it"
        )
    if dims.tp > 1 and seq_len % dims.tp:
        raise UserError(
            f"{key}={seq_len} must be divisible by tensor_parallel_degree={dims.tp} "
            "(sequence parallel shards it)"
        )
