"""Qwen3 <-> Hugging Face ``Qwen3ForCausalLM`` (dense) and ``Qwen3MoeForCausalLM`` (MoE): key
map, RoPE row order, config.json."""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import torch

from titan_core.errors import UserError
from titan_core.hf import StateDictAdapter
from titan_core.hf_config import (
    attention_heads,
    config_value,
    refuse_unsupported,
    rope_parameters,
)
from titan_core.hf_keys import DECODER_KEY_MAP, DECODER_ROPE_ROWS, MOE_KEY_MAP
from titan_core.models.moe import MoEArgs
from titan_qwen3.args import Qwen3Args
from titan_qwen3.model import Qwen3Transformer

FAMILY = "Qwen3"
# What transformers' Qwen3Config assumes for a key config.json leaves out.
_HF_DEFAULTS = {
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "head_dim": 128,
    # Qwen3MoeConfig
    "decoder_sparse_step": 1,
    "norm_topk_prob": False,
    "router_aux_loss_coef": 0.001,
}
MOE_MODEL_TYPE = "qwen3_moe"
MOE_ARCHITECTURE = "Qwen3MoeForCausalLM"


# config_value with this family named in its errors.
_get = functools.partial(config_value, family=FAMILY)


def _refuse_what_titan_lacks(config: dict[str, Any]) -> None:
    """Biases, another activation, sliding-window layers: refused, naming the key."""
    refuse_unsupported(config, "hidden_act", "silu", "silu", family=FAMILY)
    refuse_unsupported(config, "attention_bias", False, False, family=FAMILY)
    refuse_unsupported(config, "use_sliding_window", False, False, family=FAMILY)
    layer_types = config.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        raise UserError(
            f"config.json: 'layer_types' is {sorted(set(layer_types))}; titan's {FAMILY} "
            "supports only 'full_attention' layers"
        )


def _moe_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The MoE fields of Qwen3Args from a ``Qwen3MoeConfig``.

    Raises:
        UserError: a key is missing, mistyped or out of range, or top-k exceeds the experts.
    """
    n_experts = _get(config, "num_experts", int, None)
    local = _get(config, "num_local_experts", int, None)  # transformers 5 writes this name
    if n_experts is not None and local is not None and n_experts != local:
        raise UserError(
            f"config.json: 'num_experts' {n_experts} and 'num_local_experts' {local} differ; "
            "they name the same count, fix config.json"
        )
    if n_experts is None and local is None:
        raise UserError(f"config.json: 'num_experts' is missing; a {FAMILY}-MoE config needs it")
    n_experts = n_experts if n_experts is not None else local
    top_k = _get(config, "num_experts_per_tok", int)
    if top_k > n_experts:
        raise UserError(
            f"config.json: 'num_experts_per_tok' {top_k} is larger than 'num_experts' "
            f"{n_experts}; a token cannot pick more experts than there are, fix config.json"
        )
    coef = config.get("router_aux_loss_coef", _HF_DEFAULTS["router_aux_loss_coef"])
    if isinstance(coef, bool) or not isinstance(coef, int | float) or not 0 <= coef < math.inf:
        raise UserError(
            f"config.json: 'router_aux_loss_coef' is {coef!r}, expected a number >= 0; fix "
            "config.json"
        )
    mlp_only = config.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in mlp_only
    ):
        raise UserError(
            f"config.json: 'mlp_only_layers' is {mlp_only!r}, expected a list of layer indices "
            "(integers >= 0); fix config.json"
        )
    moe = MoEArgs(
        num_experts=n_experts,
        top_k=top_k,
        hidden_dim=_get(config, "moe_intermediate_size", int),
        norm_topk_prob=_get(config, "norm_topk_prob", bool, _HF_DEFAULTS["norm_topk_prob"]),
        aux_loss_coef=float(coef),
    )
    return {
        "moe": moe,
        "decoder_sparse_step": _get(
            config, "decoder_sparse_step", int, _HF_DEFAULTS["decoder_sparse_step"]
        ),
        "mlp_only_layers": tuple(sorted(set(mlp_only))),
    }


def _moe_hf_config(args: Qwen3Args, moe: MoEArgs) -> dict[str, Any]:
    """The ``Qwen3MoeConfig`` keys of ``args``, whose ``moe`` is ``moe``.

    Raises:
        UserError: the MoE uses a routing feature Qwen3-MoE lacks (names the field).
    """
    lacking = {
        "score_func": (moe.score_func, "softmax"),
        "num_shared_experts": (moe.num_shared_experts, 0),
        "route_scale": (moe.route_scale, 1.0),
        "n_group": (moe.n_group, 1),
        "topk_group": (moe.topk_group, 1),
    }
    for field, (value, supported) in lacking.items():
        if value != supported:
            raise UserError(
                f"model_args.moe.{field} is {value!r}, but {MOE_ARCHITECTURE} supports only "
                f"{supported!r}; this model cannot be written in the Qwen3-MoE format"
            )
    return {
        "architectures": [MOE_ARCHITECTURE],
        "model_type": MOE_MODEL_TYPE,
        # NOTE: hub configs say num_experts; transformers 5 writes num_local_experts (and maps
        # the one to the other); each version reads its own, so both are written.
        "num_experts": moe.num_experts,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.hidden_dim,
        "norm_topk_prob": moe.norm_topk_prob,
        "decoder_sparse_step": args.decoder_sparse_step,
        "mlp_only_layers": list(args.mlp_only_layers),
        "router_aux_loss_coef": moe.aux_loss_coef,
        "output_router_logits": False,
    }


class Qwen3StateDictAdapter(StateDictAdapter):
    """titan's Qwen3 <-> ``Qwen3ForCausalLM`` (config.json ``model_type: qwen3``) and, for
    args with ``moe``, ``Qwen3MoeForCausalLM`` (``model_type: qwen3_moe``).

    Keys: the shared decoder map, Qwen3's q/k norms, and the shared MoE map: the router
    ``mlp.gate`` and one HF tensor per expert (``mlp.experts.{j}.gate_proj`` ...) stacked into
    titan's ``moe.experts.w1`` (w3 from ``up_proj``, w2 from ``down_proj``).

    NOTE: HF rotates dimension ``j`` of a head with ``j + head_dim/2`` (rotate-half); titan
    rotates interleaved pairs. The rows of ``wq``/``wk`` are permuted within each head so both
    give the same attention scores, and so are the ``head_dim`` entries of ``q_norm``/``k_norm``:
    the norms act on those same per-head dimensions before RoPE, and an RMS statistic does not
    depend on their order, so permuting the scale with the rows keeps the output identical.
    """

    model_types = ("qwen3", MOE_MODEL_TYPE)
    architecture = "Qwen3ForCausalLM"  # MOE_ARCHITECTURE when the args have MoE layers
    model_cls = Qwen3Transformer
    # NOTE: Qwen3-MoE has no tensor for titan's expert bias (aux-loss-free balancing): it is
    # zeros when read from HF and left out when written (a warning says so if it is not zero).
    key_map: ClassVar[dict[str, str | None]] = {
        **DECODER_KEY_MAP,
        "layers.{}.attention.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
        "layers.{}.attention.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
        **MOE_KEY_MAP,
        "layers.{}.moe.expert_bias": None,
    }
    rope_rows: ClassVar[tuple[str, ...]] = (
        *DECODER_ROPE_ROWS,
        ".attention.q_norm.weight",
        ".attention.k_norm.weight",
    )

    # ---- config.json -----------------------------------------------------------------

    def args_from_hf_config(self, config: dict[str, Any]) -> Qwen3Args:
        """Exact args for a ``Qwen3Config``, or a ``Qwen3MoeConfig`` (``model_type:
        qwen3_moe``: ``num_experts``, ``num_experts_per_tok``, ``moe_intermediate_size``,
        ``norm_topk_prob``, ``decoder_sparse_step``, ``mlp_only_layers``,
        ``router_aux_loss_coef`` -> ``MoEArgs.aux_loss_coef``; ``output_router_logits`` is a
        runtime switch and ignored).

        Raises:
            UserError: a required key is missing or mistyped, or the config uses a feature
                titan's Qwen3 lacks (biases, another activation, sliding windows, a RoPE
                variant, more experts per token than experts); names the key.
        """
        _refuse_what_titan_lacks(config)
        dim, n_heads, n_kv_heads, head_dim = attention_heads(
            config, family=FAMILY, default_head_dim=_HF_DEFAULTS["head_dim"]
        )
        theta, kind, _, key = rope_parameters(config, _HF_DEFAULTS["rope_theta"])
        if kind != "default":
            raise UserError(
                f"config.json: {key}.rope_type '{kind}' is not supported (supported: default); "
                f"titan's {FAMILY} has no such RoPE variant"
            )
        return Qwen3Args(
            dim=dim,
            n_layers=_get(config, "num_hidden_layers", int),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            hidden_dim=_get(config, "intermediate_size", int),
            vocab_size=_get(config, "vocab_size", int),
            norm_eps=_get(config, "rms_norm_eps", float, _HF_DEFAULTS["rms_norm_eps"]),
            rope_theta=theta,
            max_seq_len=_get(
                config, "max_position_embeddings", int, _HF_DEFAULTS["max_position_embeddings"]
            ),
            tie_word_embeddings=_get(config, "tie_word_embeddings", bool, False),
            **(_moe_fields(config) if config.get("model_type") == MOE_MODEL_TYPE else {}),
        )

    def hf_config(self, args: Qwen3Args, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """config.json for ``args``, in the spelling transformers 4.x and 5.x both read
        (``Qwen3MoeConfig`` keys when the args have ``moe``).

        Raises:
            UserError: the MoE uses a routing feature Qwen3-MoE lacks (sigmoid scores, shared
                experts, route scaling, group-limited routing); names the field.
        """
        config = {
            **self.decoder_hf_config(args, dtype),
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "rope_scaling": None,
        }
        if args.moe is not None:
            config.update(_moe_hf_config(args, args.moe))
        return config
