"""DeepSeek V3 <-> Hugging Face ``DeepseekV3ForCausalLM``: key map and config.json."""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection
from typing import Any, ClassVar

import torch

from titan_core.errors import UserError
from titan_core.hf import StateDictAdapter
from titan_core.hf_config import config_value, refuse_unsupported, rope_parameters
from titan_core.hf_keys import DECODER_KEY_MAP, MOE_KEY_MAP
from titan_core.models import MoEArgs, YarnScaling
from titan_deepseek.args import DeepSeekV3Args
from titan_deepseek.model import DeepSeekV3Transformer

logger = logging.getLogger("titan")

FAMILY = "DeepSeek V3"
_get = functools.partial(config_value, family=FAMILY)
# What transformers' DeepseekV3Config assumes for a key config.json leaves out.
_HF_DEFAULTS = {
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "n_shared_experts": 1,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "first_k_dense_replace": 3,
}
# The expert-bias step titan trains imported models with (the HF config has no such key).
LOAD_BALANCE_COEFF = 1e-3

MLA_KEY_MAP = {
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wq_a.weight": "model.layers.{}.self_attn.q_a_proj.weight",
    "layers.{}.attention.q_norm.weight": "model.layers.{}.self_attn.q_a_layernorm.weight",
    "layers.{}.attention.wq_b.weight": "model.layers.{}.self_attn.q_b_proj.weight",
    "layers.{}.attention.wkv_a.weight": "model.layers.{}.self_attn.kv_a_proj_with_mqa.weight",
    "layers.{}.attention.kv_norm.weight": "model.layers.{}.self_attn.kv_a_layernorm.weight",
    "layers.{}.attention.wkv_b.weight": "model.layers.{}.self_attn.kv_b_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
}


def _yarn(config: dict[str, Any]) -> YarnScaling | None:
    """YaRN from config.json's RoPE object, None for plain RoPE; other types refused."""
    _, kind, params, key = rope_parameters(config, _HF_DEFAULTS["rope_theta"])
    if kind == "default":
        return None
    if kind != "yarn":
        raise UserError(
            f"config.json: {key}.rope_type '{kind}' is not supported (supported: default, yarn)"
        )
    where = f"{key}."
    return YarnScaling(
        factor=_get(params, "factor", float, where=where),
        original_max_position_embeddings=_get(
            params, "original_max_position_embeddings", int, where=where
        ),
        beta_fast=_get(params, "beta_fast", float, 32.0, where=where),
        beta_slow=_get(params, "beta_slow", float, 1.0, where=where),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        truncate=bool(params.get("truncate", True)),
    )


def _moe(config: dict[str, Any]) -> MoEArgs:
    """The routed and shared experts of a ``DeepseekV3Config`` (sigmoid scores, the expert bias
    for selection only, group-limited top-k)."""
    refuse_unsupported(config, "topk_method", "noaux_tc", "noaux_tc", family=FAMILY)
    return MoEArgs(
        num_experts=_get(config, "n_routed_experts", int),
        top_k=_get(config, "num_experts_per_tok", int),
        hidden_dim=_get(config, "moe_intermediate_size", int),
        num_shared_experts=_get(config, "n_shared_experts", int, _HF_DEFAULTS["n_shared_experts"]),
        score_func="sigmoid",
        norm_topk_prob=_get(config, "norm_topk_prob", bool, _HF_DEFAULTS["norm_topk_prob"]),
        route_scale=_get(
            config, "routed_scaling_factor", float, _HF_DEFAULTS["routed_scaling_factor"]
        ),
        n_group=_get(config, "n_group", int, _HF_DEFAULTS["n_group"]),
        topk_group=_get(config, "topk_group", int, _HF_DEFAULTS["topk_group"]),
        load_balance_coeff=LOAD_BALANCE_COEFF,
    )


class DeepSeekV3StateDictAdapter(StateDictAdapter):
    """titan's DeepSeek V3 <-> ``DeepseekV3ForCausalLM`` (config.json ``model_type:
    deepseek_v3``).

    Keys: the shared decoder map for embeddings, norms and dense layers, MLA's projections in
    HF's names, and the shared MoE map with the expert bias as the router's
    ``e_score_correction_bias``. No row is permuted: HF's DeepSeek V3 turns interleaved pairs
    (``rope_interleave``), as titan does.
    """

    model_types = ("deepseek_v3",)
    architecture = "DeepseekV3ForCausalLM"
    model_cls = DeepSeekV3Transformer
    key_map: ClassVar[dict[str, str | None]] = {
        **{k: v for k, v in DECODER_KEY_MAP.items() if ".attention." not in k},
        **MLA_KEY_MAP,
        **MOE_KEY_MAP,
        "layers.{}.moe.expert_bias": "model.layers.{}.mlp.gate.e_score_correction_bias",
    }
    rope_rows: ClassVar[tuple[str, ...]] = ()

    def skipped_hf(self, args: DeepSeekV3Args, present: Collection[str]) -> set[str]:
        """The released checkpoint's multi-token-prediction module, stored as one more layer
        (``model.layers.{n_layers}.*``): titan trains next-token prediction only and reads
        past it, saying so once."""
        prefix = f"model.layers.{args.n_layers}."
        skipped = {name for name in present if name.startswith(prefix)}
        if skipped:
            logger.info(
                "skipping %s* (%d tensors): the multi-token-prediction layer, which titan does "
                "not train",
                prefix,
                len(skipped),
            )
        return skipped

    def args_from_hf_config(self, config: dict[str, Any]) -> DeepSeekV3Args:
        """Exact args for a ``DeepseekV3Config``.

        Raises:
            UserError: a key is missing or mistyped, or the config uses what titan's DeepSeek V3
                lacks (biases, another activation, rotate-half RoPE, another RoPE type or
                routing method, separate key/value heads); names the key.
        """
        refuse_unsupported(config, "hidden_act", "silu", "silu", family=FAMILY)
        refuse_unsupported(config, "attention_bias", False, False, family=FAMILY)
        refuse_unsupported(config, "rope_interleave", True, True, family=FAMILY)
        n_heads = _get(config, "num_attention_heads", int)
        kv_heads = _get(config, "num_key_value_heads", int, n_heads)
        if kv_heads != n_heads:
            raise UserError(
                f"config.json: 'num_key_value_heads' {kv_heads} differs from "
                f"'num_attention_heads' {n_heads}; MLA gives every head its own key and value"
            )
        theta, _, _, _ = rope_parameters(config, _HF_DEFAULTS["rope_theta"])
        return DeepSeekV3Args(
            dim=_get(config, "hidden_size", int),
            n_layers=_get(config, "num_hidden_layers", int),
            n_heads=n_heads,
            hidden_dim=_get(config, "intermediate_size", int),
            vocab_size=_get(config, "vocab_size", int),
            moe=_moe(config),
            n_dense_layers=_dense_layers(config),
            q_lora_rank=_get(config, "q_lora_rank", int, 0),
            kv_lora_rank=_get(config, "kv_lora_rank", int),
            qk_nope_head_dim=_get(config, "qk_nope_head_dim", int),
            qk_rope_head_dim=_get(config, "qk_rope_head_dim", int),
            v_head_dim=_get(config, "v_head_dim", int),
            norm_eps=_get(config, "rms_norm_eps", float, _HF_DEFAULTS["rms_norm_eps"]),
            rope_theta=theta,
            rope_scaling=_yarn(config),
            max_seq_len=_get(
                config, "max_position_embeddings", int, _HF_DEFAULTS["max_position_embeddings"]
            ),
            tie_word_embeddings=_get(config, "tie_word_embeddings", bool, False),
        )

    def hf_config(self, args: DeepSeekV3Args, dtype: torch.dtype = torch.float32) -> dict:
        """config.json for ``args``.

        Raises:
            UserError: the MoE routes in a way ``DeepseekV3ForCausalLM`` cannot (softmax scores,
                an auxiliary loss, no shared expert); names the field.
        """
        moe = args.moe
        lacking = {
            "score_func": (moe.score_func, "sigmoid"),
            "aux_loss_coef": (moe.aux_loss_coef, 0.0),
        }
        for field, (value, supported) in lacking.items():
            if value != supported:
                raise UserError(
                    f"model_args.moe.{field} is {value!r}, but {self.architecture} supports only "
                    f"{supported!r}; this model cannot be written in the DeepSeek V3 format"
                )
        if moe.num_shared_experts < 1:
            raise UserError(
                f"model_args.moe.num_shared_experts is 0, but {self.architecture} always has "
                "shared experts; this model cannot be written in the DeepSeek V3 format"
            )
        config = self.decoder_hf_config(args, dtype)
        del config["head_dim"]  # HF derives it (the rope width) from qk_rope_head_dim
        config.update(
            {
                "q_lora_rank": args.q_lora_rank or None,
                "kv_lora_rank": args.kv_lora_rank,
                "qk_nope_head_dim": args.qk_nope_head_dim,
                "qk_rope_head_dim": args.qk_rope_head_dim,
                "v_head_dim": args.v_head_dim,
                "rope_interleave": True,
                "first_k_dense_replace": args.n_dense_layers,
                "n_routed_experts": moe.num_experts,
                "n_shared_experts": moe.num_shared_experts,
                "num_experts_per_tok": moe.top_k,
                "moe_intermediate_size": moe.hidden_dim,
                "n_group": moe.n_group,
                "topk_group": moe.topk_group,
                "routed_scaling_factor": moe.route_scale,
                "norm_topk_prob": moe.norm_topk_prob,
                "topk_method": "noaux_tc",
                "rope_scaling": _yarn_json(args.rope_scaling),
            }
        )
        return config


def _dense_layers(config: dict[str, Any]) -> int:
    dense = _get(config, "first_k_dense_replace", int, _HF_DEFAULTS["first_k_dense_replace"])
    layers = _get(config, "num_hidden_layers", int)
    if dense > layers:
        raise UserError(
            f"config.json: 'first_k_dense_replace' {dense} is more than 'num_hidden_layers' "
            f"{layers}; fix config.json"
        )
    return dense


def _yarn_json(scaling: YarnScaling | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    params = {
        "rope_type": "yarn",
        "factor": scaling.factor,
        "original_max_position_embeddings": scaling.original_max_position_embeddings,
        "beta_fast": scaling.beta_fast,
        "beta_slow": scaling.beta_slow,
        "mscale": scaling.mscale,
        "mscale_all_dim": scaling.mscale_all_dim,
    }
    return params if scaling.truncate else {**params, "truncate": False}
