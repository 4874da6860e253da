"""A model trained with titan and exported to Hugging Face generates as it was trained to.

Checked against transformers: the exported tokenizer gives titan's prompt ids, config.json and
generation_config.json carry the tokenizer's token ids, greedy ``generate()`` stops at EOS, and
the architecture's real ``max_position_embeddings`` survives training and export.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from titan_core.data import load_tokenizer
from titan_core.errors import UserError
from titan_core.pretrained import load_pretrained_tokenizer

TEXTS = [
    "Return the number of items in the container.",
    "  leading spaces, trailing ones  ",
    "Unicode: naïve café, 日本語, emoji 🚀",
    "",
]


def seed_checkpoint(dump: Path, *extra: str) -> Path:
    """A step-0 checkpoint of debugmodel (no training), in ``dump``."""
    from titan_core.train import run

    run(["--checkpoint.create_seed_checkpoint", "--job.dump_folder", str(dump),
         "--training.seq_len", "32", "--metrics.no_enable_tensorboard", *extra])  # fmt: skip
    return dump / "checkpoint" / "step-0"


# ---- the tokenizer --------------------------------------------------------------------------


def test_embedded_prompt_ids_are_bos_then_the_training_ids():
    tokenizer = load_tokenizer("")
    for text in TEXTS:
        assert tokenizer.encode_prompt(text) == [tokenizer.bos_id, *tokenizer.encode(text)]
    reference = transformers.AutoTokenizer.from_pretrained(tokenizer.folder)
    for text in TEXTS:
        assert reference(text).input_ids == tokenizer.encode_prompt(text), text
    assert (reference.bos_token_id, reference.eos_token_id) == (0, 1)
    assert load_tokenizer("embedded").folder == tokenizer.folder


def test_load_pretrained_tokenizer_of_a_checkpoint_and_refusals(tmp_path):
    step = seed_checkpoint(tmp_path / "run")
    for path in (step, step.parent, tmp_path / "run"):
        tokenizer = load_pretrained_tokenizer(path)
        assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (0, 1, 2048)
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained_tokenizer(tmp_path / "missing")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match=r"load_pretrained_tokenizer: .* has no tokenizer\.json"):
        load_pretrained_tokenizer(hf)
    meta = json.loads((step / "titan.json").read_text())
    meta["tokenizer"] = str(tmp_path / "gone")
    (step / "titan.json").write_text(json.dumps(meta))
    for own in (step / "tokenizer").glob("*"):
        own.unlink()
    with pytest.raises(UserError, match=r"load_pretrained_tokenizer: .*names the tokenizer"):
        load_pretrained_tokenizer(step)
