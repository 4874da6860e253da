"""Qwen3 dense <-> Hugging Face ``Qwen3ForCausalLM``: key map, RoPE row order, config.json."""

from __future__ import annotations

import functools
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
from titan_qwen3.args import Qwen3Args
from titan_qwen3.model import Qwen3Transformer

FAMILY = "Qwen3"
# What transformers' Qwen3Config assumes for a key config.json leaves out.
_HF_DEFAULTS = {
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "head_dim": 128,
}


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


class Qwen3StateDictAdapter(StateDictAdapter):
    """titan's Qwen3 dense <-> ``Qwen3ForCausalLM`` (config.json ``model_type: qwen3``).

    NOTE: HF rotates dimension ``j`` of a head with ``j + head_dim/2`` (rotate-half); titan
    rotates interleaved pairs. The rows of ``wq``/``wk`` are permuted within each head so both
    give the same attention scores, and so are the ``head_dim`` entries of ``q_norm``/``k_norm``:
    the norms act on those same per-head dimensions before RoPE, and an RMS statistic does not
    depend on their order, so permuting the scale with the rows keeps the output identical.
    """

    model_types = ("qwen3",)
    architecture = "Qwen3ForCausalLM"
    model_cls = Qwen3Transformer
    key_map: ClassVar[dict[str, str]] = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
        "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
        "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
        "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
        "layers.{}.attention.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
        "layers.{}.attention.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
        "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
        "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
        "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
        "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
        "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    rope_rows: ClassVar[tuple[str, ...]] = (
        ".attention.wq.weight",
        ".attention.wk.weight",
        ".attention.q_norm.weight",
        ".attention.k_norm.weight",
    )

    # ---- config.json -----------------------------------------------------------------

    def args_from_hf_config(self, config: dict[str, Any]) -> Qwen3Args:
        """Exact args for a ``Qwen3Config`` (equal to a shipped flavor's when the shapes match).

        Raises:
            UserError: a required key is missing or mistyped, or the config uses a feature
                titan's Qwen3 lacks (biases, another activation, sliding windows, a RoPE
                variant); names the key.
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
        )

    def hf_config(self, args: Qwen3Args, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """config.json for ``args``, in the spelling transformers 4.x and 5.x both read."""
        return {
            **self.decoder_hf_config(args, dtype),
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "rope_scaling": None,
        }
