"""Llama 3 <-> Hugging Face ``LlamaForCausalLM``: key map, RoPE row order, config.json."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from titan_core.errors import UserError
from titan_core.hf import StateDictAdapter
from titan_core.hf_config import (
    attention_heads,
    config_value,
    refuse_unsupported,
    rope_parameters,
)
from titan_core.models import Llama3RopeScaling
from titan_llama3.args import LLAMA3_FLAVORS, Llama3Args
from titan_llama3.model import Transformer

# What transformers' LlamaConfig assumes for a key config.json leaves out.
_HF_DEFAULTS = {
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
}
_LLAMA3_ROPE_KEYS = {f.name for f in dataclasses.fields(Llama3RopeScaling)}


_get = functools.partial(config_value, family="Llama")


def _refuse(config: dict[str, Any], key: str, supported: Any) -> None:
    refuse_unsupported(config, key, supported, _HF_DEFAULTS[key], family="Llama")


def _rope(config: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    """(theta, scaling) from either spelling: transformers 5's ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` (whose type key is ``rope_type`` or ``type``)."""
    theta, kind, values, key = rope_parameters(config, _HF_DEFAULTS["rope_theta"])
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise UserError(
            f"config.json: {key}.rope_type '{kind}' is not supported (supported: default, "
            "llama3); titan's Llama has no such RoPE variant"
        )
    unknown = sorted(set(values) - _LLAMA3_ROPE_KEYS)
    if unknown:
        raise UserError(f"config.json: {key} has keys titan does not support: {unknown}")
    fields = {"original_max_position_embeddings": int}
    scaling = {
        k: config_value(values, k, fields.get(k, float), where=f"{key}.") for k in _LLAMA3_ROPE_KEYS
    }
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise UserError(
            f"config.json: {key}.high_freq_factor {scaling['high_freq_factor']} must be above "
            f"{key}.low_freq_factor {scaling['low_freq_factor']}; fix config.json"
        )
    return theta, Llama3RopeScaling(**scaling)


def _same_shapes(a: Llama3Args, b: Llama3Args) -> bool:
    """Whether two args build the same model, however their sizes are spelled."""

    def explicit(args: Llama3Args) -> Llama3Args:
        return dataclasses.replace(
            args,
            multiple_of=1,
            ffn_dim_multiplier=None,
            ffn_hidden_dim=args.hidden_dim,
            head_dim_override=args.head_dim,
        )

    return explicit(a) == explicit(b)


class Llama3StateDictAdapter(StateDictAdapter):
    """titan's Llama 3 <-> ``LlamaForCausalLM`` (config.json ``model_type: llama``).

    NOTE: HF's Llama rotates dimension ``j`` of a head with ``j + head_dim/2`` (rotate-half);
    titan's RoPE rotates interleaved pairs ``(2j, 2j+1)``, like Meta's original code. The rows
    of ``wq`` and ``wk`` are reordered within each head so both give the same attention scores.
    Keys: the shared decoder map (``titan_core.hf_keys.DECODER_KEY_MAP``) as is.
    """

    model_types = ("llama",)
    architecture = "LlamaForCausalLM"
    model_cls = Transformer

    # ---- config.json -----------------------------------------------------------------

    def args_from_hf_config(self, config: dict[str, Any]) -> Llama3Args:
        """Exact args for a ``LlamaConfig``; a shipped flavor's args when the shapes match one.

        Raises:
            UserError: a required key is missing or mistyped, or the config uses a feature
                titan's Llama lacks (biases, another activation or RoPE variant); names the key.
        """
        _refuse(config, "hidden_act", "silu")
        _refuse(config, "attention_bias", False)
        _refuse(config, "mlp_bias", False)
        dim, n_heads, n_kv_heads, head_dim = attention_heads(config, family="Llama")
        theta, scaling = _rope(config)
        args = Llama3Args(
            dim=dim,
            n_layers=_get(config, "num_hidden_layers", int),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            vocab_size=_get(config, "vocab_size", int),
            ffn_hidden_dim=_get(config, "intermediate_size", int),
            head_dim_override=None if head_dim == dim // n_heads else head_dim,
            norm_eps=_get(config, "rms_norm_eps", float, _HF_DEFAULTS["rms_norm_eps"]),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=_get(
                config, "max_position_embeddings", int, _HF_DEFAULTS["max_position_embeddings"]
            ),
            tie_word_embeddings=_get(config, "tie_word_embeddings", bool, False),
        )
        for flavor in LLAMA3_FLAVORS.values():
            flavor = dataclasses.replace(flavor, max_seq_len=args.max_seq_len)
            if _same_shapes(flavor, args):
                return flavor
        return args

    def hf_config(self, args: Llama3Args, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """config.json for ``args``, in the spelling transformers 4.x and 5.x both read."""
        scaling = args.rope_scaling
        return {
            **self.decoder_hf_config(args, dtype),
            "mlp_bias": False,
            "rope_scaling": None
            if scaling is None
            else {"rope_type": "llama3", **dataclasses.asdict(scaling)},
        }
