"""Key maps between titan state-dict names and Hugging Face tensor names.

A key map is a dict of titan name template -> HF name template. Two placeholders:

- ``{}`` is the layer index. It appears on both sides or on neither.
- ``{expert}`` is an expert index. It appears on the HF side only and makes the entry
  *stacked*: the titan tensor is the stack, along a new leading dimension, of one HF tensor per
  expert ``j = 0 .. E-1`` (E is the titan tensor's first dimension). Hub MoE checkpoints store
  ``model.layers.{}.mlp.experts.{expert}.gate_proj.weight`` per expert; titan holds the layer's
  experts as one (E, hidden, dim) weight.

An HF template of ``None`` marks titan-only state with no HF tensor (e.g. the MoE expert bias of
a family whose HF format has none): it is zeros when read from HF and is not written to HF.

The maps every decoder family shares are written once here; a family's adapter extends them
(``{**DECODER_KEY_MAP, **MOE_KEY_MAP, "...": "..."}``), overriding any entry by repeating its key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

LAYER = "{}"
EXPERT = "{expert}"

# The pre-norm decoder of titan_core.models.Transformer, in the names of HF's Llama-style models
# (LlamaForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM, DeepseekV3ForCausalLM, ...).
DECODER_KEY_MAP: Mapping[str, str | None] = MappingProxyType(
    {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
        "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
        "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
        "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
        "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
        "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
        "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
        "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
        "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
)  # read-only: families copy it into their own map

# Tensors whose rows follow the RoPE layout, per head (permuted both ways, see
# titan_core.hf.rope_rows_from_hf): the query and key projections.
DECODER_ROPE_ROWS: tuple[str, ...] = (".attention.wq.weight", ".attention.wk.weight")

# titan_core.models.moe.MoE (``layers.{i}.moe``) in the hub's per-expert layout, as
# Qwen3MoeForCausalLM and DeepseekV3ForCausalLM checkpoints store it. w1 (gate) and w3 (up) are
# (E, hidden, dim), w2 (down) is (E, dim, hidden): expert j's slice is its HF weight as is.
# ``expert_bias`` is left to the family: an HF name (DeepSeek V3's
# ``mlp.gate.e_score_correction_bias``) or None (Qwen3-MoE has none).
MOE_KEY_MAP: Mapping[str, str | None] = MappingProxyType(
    {
        "layers.{}.moe.router.gate.weight": "model.layers.{}.mlp.gate.weight",
        "layers.{}.moe.experts.w1": "model.layers.{}.mlp.experts.{expert}.gate_proj.weight",
        "layers.{}.moe.experts.w2": "model.layers.{}.mlp.experts.{expert}.down_proj.weight",
        "layers.{}.moe.experts.w3": "model.layers.{}.mlp.experts.{expert}.up_proj.weight",
        "layers.{}.moe.shared_experts.w1.weight": "model.layers.{}.mlp.shared_experts.gate_proj.weight",
        "layers.{}.moe.shared_experts.w2.weight": "model.layers.{}.mlp.shared_experts.down_proj.weight",
        "layers.{}.moe.shared_experts.w3.weight": "model.layers.{}.mlp.shared_experts.up_proj.weight",
    }
)

_PLACEHOLDER = re.compile(r"\{[^}]*\}")


@dataclass(frozen=True)
class KeyRule:
    """One key-map entry, compiled.

    Attributes:
        titan: the titan name template (``{}`` for the layer).
        hf: the HF name template, or None for titan-only state.
        pattern: matches titan names; group 1 is the layer index when the template has one.
    """

    titan: str
    hf: str | None
    pattern: re.Pattern[str]

    @property
    def stacked(self) -> bool:
        """Whether the titan tensor stacks one HF tensor per expert along dimension 0."""
        return self.hf is not None and EXPERT in self.hf

    def hf_names(self, match: re.Match[str], n_experts: int) -> list[str]:
        """The HF names of the titan name ``match`` matched: none, one, or one per expert."""
        if self.hf is None:
            return []
        name = self.hf.replace(LAYER, match.group(1)) if match.groups() else self.hf
        if self.stacked:
            return [name.replace(EXPERT, str(j)) for j in range(n_experts)]
        return [name]


def compile_key_map(key_map: Mapping[str, str | None], owner: str = "key_map") -> list[KeyRule]:
    """The rules of ``key_map``, each template checked.

    Raises:
        ValueError: a template uses a placeholder other than ``{}`` and ``{expert}``, puts
            ``{expert}`` on the titan side, repeats one, or has ``{}`` on one side only.
    """
    rules = []
    for titan, hf in key_map.items():
        titan_slots = _PLACEHOLDER.findall(titan)
        hf_slots = (
            _PLACEHOLDER.findall(hf) if hf is not None else [LAYER] * titan_slots.count(LAYER)
        )
        problem = None
        if any(s != LAYER for s in titan_slots):
            problem = "the titan side may hold only {} (the layer index)"
        elif any(s not in (LAYER, EXPERT) for s in hf_slots):
            problem = "the HF side may hold only {} (layer) and {expert} (expert index)"
        elif (
            titan_slots.count(LAYER) > 1 or hf_slots.count(LAYER) > 1 or hf_slots.count(EXPERT) > 1
        ):
            problem = "a placeholder appears twice"
        elif titan_slots.count(LAYER) != hf_slots.count(LAYER):
            problem = "{} must appear on both sides or on neither"
        if problem:
            raise ValueError(f"{owner}: entry {titan!r}: {hf!r}: {problem}")
        pattern = re.compile("^" + re.escape(titan).replace(r"\{\}", r"(\d+)") + "$")
        rules.append(KeyRule(titan, hf, pattern))
    return rules
