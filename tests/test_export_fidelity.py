"""A model trained with titan and exported to Hugging Face generates as it was trained to.

Checked against transformers: the exported tokenizer gives titan's prompt ids, config.json and
generation_config.json carry the tokenizer's token ids, greedy ``generate()`` stops at EOS, and
the architecture's real ``max_position_embeddings`` survives training and export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from helpers import run_cli
from titan_convert.cli import main as convert_main
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


# ---- train, export, generate ----------------------------------------------------------------

FAST = [
    "--training.seq_len", "64", "--training.local_batch_size", "4",
    "--lr_scheduler.warmup_steps", "2", "--metrics.no_enable_tensorboard",
    "--training.mixed_precision_param", "float32",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """debugmodel trained 20 steps from scratch, its final weights exported as ``hf/``."""
    from titan_core.train import run

    dump = tmp_path_factory.mktemp("scratch") / "run"
    run([*FAST, "--training.steps", "20", "--checkpoint.enable", "--checkpoint.interval", "20",
         "--checkpoint.last_save_in_hf", "--job.dump_folder", str(dump)])  # fmt: skip
    return dump


def greedy(model, prompt: list[int], tokenizer) -> list[int]:
    """The new tokens of a greedy ``generate()`` (30 at most), as transformers runs it."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            pad_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def test_an_exported_run_tokenizes_and_generates_as_it_trained(trained):
    hf = trained / "hf"
    titan = load_pretrained_tokenizer(trained)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    for text in TEXTS:
        assert tokenizer(text).input_ids == [0, *titan.encode(text)] == titan.encode_prompt(text)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    assert (model.config.bos_token_id, model.config.eos_token_id) == (0, 1)
    generation = model.generation_config
    assert (generation.bos_token_id, generation.eos_token_id) == (0, 1)
    assert model.config.max_position_embeddings == 2048  # debugmodel's, not training.seq_len
    assert tokenizer.model_max_length == 2048
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|bos|>", "<|eos|>")

    prompt = tokenizer(TEXTS[0]).input_ids
    new = greedy(model, prompt, tokenizer)
    assert 1 <= len(new) <= 30
    assert 1 not in new[:-1]  # generation stops at the first EOS, if the model emits one
    assert len(new) == 30 or new[-1] == 1
    # Make the model emit EOS next: swap the output rows of EOS and of its greedy choice.
    first = new[0]
    if first != 1:
        weight = model.lm_head.weight.detach().clone()
        weight[[1, first]] = weight[[first, 1]]
        model.lm_head.weight = torch.nn.Parameter(weight)  # untied from the embedding
    assert greedy(model, prompt, tokenizer) == [1]


def test_dcp_to_hf_writes_what_last_save_in_hf_wrote(trained, tmp_path):
    step = trained / "checkpoint" / "step-20"
    assert (step / "tokenizer" / "tokenizer.json").is_file()
    meta = json.loads((step / "titan.json").read_text())
    assert meta["tokenizer_ids"] == {"bos_token_id": 0, "eos_token_id": 1, "vocab_size": 2048}
    assert meta["model_args"]["max_seq_len"] == 2048
    assert convert_main(["dcp-to-hf", str(step), str(tmp_path / "hf")]) == 0
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (tmp_path / "hf" / name).read_text() == (trained / "hf" / name).read_text(), name
    # Without its tokenizer/ copy the checkpoint falls back to the tokenizer titan.json names.
    shutil.rmtree(step / "tokenizer")
    assert convert_main(["dcp-to-hf", str(step), str(tmp_path / "again")]) == 0
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (tmp_path / "again" / name).read_text() == (trained / "hf" / name).read_text()


# ---- from an HF folder and back ---------------------------------------------------------------

GENERATION = {"bos_token_id": 0, "eos_token_id": [1, 5], "do_sample": True, "temperature": 0.6}


def tiny_hf_llama(folder: Path, tokenizer: bool = True) -> Path:
    """A random 2-layer Llama of 512 positions, with the embedded tokenizer's files (ids 0/1)
    and a generation_config.json of its own."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps(GENERATION))
    if tokenizer:
        source = load_tokenizer("").folder
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(source / name, folder / name)
    return folder


def from_hf(hf: Path, dump: Path, *extra: str) -> list[str]:
    return [
        *FAST, "--training.seq_len", "128", "--training.steps", "2",
        "--checkpoint.initial_load_in_hf", "--checkpoint.initial_load_path", str(hf),
        "--job.dump_folder", str(dump), *extra,
    ]  # fmt: skip


def test_training_from_hf_keeps_its_positions_token_ids_and_generation_config(tmp_path):
    from titan_core import load_pretrained
    from titan_core.train import run

    hf = tiny_hf_llama(tmp_path / "source")
    dump = tmp_path / "run"
    run(from_hf(hf, dump, "--checkpoint.enable", "--checkpoint.last_save_in_hf"))
    meta = json.loads((dump / "checkpoint" / "step-2" / "titan.json").read_text())
    assert meta["model_args"]["max_seq_len"] == 512
    assert meta["tokenizer"] == str(hf)  # the HF folder's own tokenizer, not the embedded one
    assert load_pretrained(dump).args.max_seq_len == 512
    config = json.loads((dump / "hf" / "config.json").read_text())
    assert config["max_position_embeddings"] == 512
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    assert json.loads((dump / "hf" / "generation_config.json").read_text()) == GENERATION
    assert (
        json.loads((dump / "hf" / "tokenizer_config.json").read_text())["model_max_length"] == 512
    )
    assert convert_main(["dcp-to-hf", str(dump), str(tmp_path / "out")]) == 0
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_text() == (dump / "hf" / name).read_text(), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(dump / "hf")
    assert reloaded.generation_config.eos_token_id == [1, 5]


def test_hf_to_dcp_and_back_keeps_the_source_files(tmp_path):
    hf = tiny_hf_llama(tmp_path / "source")
    assert convert_main(["hf-to-dcp", str(hf), str(tmp_path / "dcp")]) == 0
    assert (tmp_path / "dcp" / "tokenizer" / "tokenizer.json").is_file()
    assert convert_main(["dcp-to-hf", str(tmp_path / "dcp"), str(tmp_path / "back")]) == 0
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["max_position_embeddings"], config["bos_token_id"]) == (512, 0)
    assert json.loads((tmp_path / "back" / "generation_config.json").read_text()) == GENERATION


def test_export_ids_follow_the_tokenizer_where_the_source_disagrees():
    from titan_core.hf_export import _export_ids, _generation_config

    meta = {
        "tokenizer_ids": {"bos_token_id": 0, "eos_token_id": 1, "vocab_size": 2048},
        "hf_config": {"bos_token_id": 1, "eos_token_id": [1, 2], "pad_token_id": 3},
        "hf_generation_config": {"bos_token_id": 1, "eos_token_id": 2, "top_p": 0.9},
    }
    ids = _export_ids(meta, None)
    assert ids == {"bos_token_id": 0, "eos_token_id": [1, 2], "pad_token_id": 3}
    generation = _generation_config(meta, {}, ids, Path("step-1"))
    assert generation == {"bos_token_id": 0, "eos_token_id": [1, 2], "pad_token_id": 3,
                          "top_p": 0.9}  # fmt: skip


# ---- your own tokenizer -----------------------------------------------------------------------


def own_tokenizer(folder: Path, extra: int = 52) -> Path:
    """The embedded tokenizer with ``extra`` more tokens: 2048 + extra, more than debugmodel's."""
    import tokenizers

    source = load_tokenizer("").folder
    tok = tokenizers.Tokenizer.from_file(str(source / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(extra)])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    shutil.copyfile(source / "tokenizer_config.json", folder / "tokenizer_config.json")
    return folder


def test_the_vocabulary_follows_a_larger_tokenizer(tmp_path, caplog):
    from titan_core.config import build_config
    from titan_core.trainer import Trainer

    folder = own_tokenizer(tmp_path / "tok")
    dump = tmp_path / "run"
    flags = [*FAST, "--model.hf_assets_path", str(folder), "--job.dump_folder", str(dump)]
    with caplog.at_level("INFO", logger="titan"):
        trainer = Trainer(build_config([*flags, "--checkpoint.create_seed_checkpoint"]))
    assert trainer.model_args.vocab_size == 2100
    assert "vocab_size 2048 -> 2100" in caplog.text
    trainer.train()
    meta = json.loads((dump / "checkpoint" / "step-0" / "titan.json").read_text())
    assert meta["model_args"]["vocab_size"] == meta["tokenizer_ids"]["vocab_size"] == 2100
    assert load_pretrained_tokenizer(dump).vocab_size == 2100
    # Resuming with the embedded tokenizer (2048 tokens): refused in one line, exit 2.
    proc = run_cli([*FAST, "--checkpoint.enable", "--job.dump_folder", str(dump)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert "vocabulary of 2100 tokens but the model has 2048" in line
    assert f"--model.hf_assets_path {dump / 'checkpoint' / 'step-0' / 'tokenizer'}" in line


def test_hf_weights_train_with_their_own_tokenizer_or_are_refused(tmp_path, caplog):
    from titan_core.config import build_config
    from titan_core.trainer import Trainer

    hf = tiny_hf_llama(tmp_path / "with", tokenizer=True)
    with caplog.at_level("INFO", logger="titan"):
        trainer = Trainer(build_config(from_hf(hf, tmp_path / "a")))
    assert trainer.tokenizer.folder == hf.resolve()
    assert f"using the tokenizer of {hf}" in caplog.text
    bare = tiny_hf_llama(tmp_path / "bare", tokenizer=False)
    with pytest.raises(UserError, match=r"has no tokenizer\.json; pass --model\.hf_assets_path"):
        Trainer(build_config(from_hf(bare, tmp_path / "b")))
    assert not (tmp_path / "b").exists()
    big = own_tokenizer(tmp_path / "big")
    flags = from_hf(hf, tmp_path / "c", "--model.hf_assets_path", str(big))
    with pytest.raises(UserError, match="has 2100 tokens but the Hugging Face weights"):
        Trainer(build_config(flags))
    # The embedded tokenizer, asked for by name, trains HF weights of its vocabulary.
    flags = from_hf(bare, tmp_path / "d", "--model.hf_assets_path", "embedded")
    assert Trainer(build_config(flags)).tokenizer.vocab_size == 2048
