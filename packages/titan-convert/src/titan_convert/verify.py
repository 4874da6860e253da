"""``verify``: the same weights through transformers and through titan give the same logits."""

from __future__ import annotations

from pathlib import Path

import torch

from titan_core.errors import UserError
from titan_core.hf import read_hf_config, spec_for_hf_folder
from titan_core.hf_quant import FP8Reader, open_hf_reader


def logit_difference(hf_dir: Path, batch: int = 2, seq_len: int = 32) -> tuple[float, float]:
    """(max abs, max abs relative to the largest logit) of titan vs transformers, in float32,
    on a fixed batch of random token ids.

    Args:
        hf_dir: an HF folder of a family whose titan package is installed.
        batch: sequences in the batch.
        seq_len: tokens per sequence (capped at the model's max_position_embeddings).
    """
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UserError("verify needs transformers: pip install 'titan-convert[verify]'") from None
    from titan_core import load_pretrained

    config = read_hf_config(hf_dir)  # bad input fails here, before any model is loaded
    spec_for_hf_folder(hf_dir)
    if isinstance(open_hf_reader(hf_dir), FP8Reader):
        # NOTE: transformers reads FP8 through its own quantizer (needs accelerate; on a CPU it
        # falls back to dequantizing in its own dtype), so its logits are no fp32 reference.
        raise UserError(
            f"verify: {hf_dir} holds FP8 weights, which transformers cannot load as a float32 "
            "reference; verify a bf16 copy instead (load_pretrained and hf-to-dcp read FP8)"
        )
    titan = load_pretrained(hf_dir)
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    reference = AutoModelForCausalLM.from_pretrained(
        hf_dir, trust_remote_code=False, **{dtype_key: torch.float32}
    ).eval()
    seq_len = min(seq_len, config.get("max_position_embeddings") or seq_len)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config["vocab_size"], (batch, seq_len), generator=generator)
    with torch.no_grad():
        expected = reference(tokens).logits.float()
        actual = titan(tokens).float()
    diff = (actual - expected).abs().max().item()
    return diff, diff / expected.abs().max().item()
