"""Training from Hugging Face weights and exporting to them, checked against transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from helpers import FAST, losses, run_cli
from titan_core import load_pretrained
from titan_core.config import build_config
from titan_core.trainer import Trainer

# The tiny HF folders carry no tokenizer: their vocabulary is the embedded tokenizer's.
HF = ["--checkpoint.initial_load_in_hf", "--training.global_batch_size", "8",
      "--model.hf_assets_path", "embedded"]  # fmt: skip


def from_hf(hf: Path, dump: Path, *extra: str) -> list[str]:
    """Flags of a fast run in ``dump`` starting from the HF weights in ``hf``."""
    return [
        *FAST,
        *HF,
        "--checkpoint.initial_load_path",
        str(hf),
        *extra,
        "--job.dump_folder",
        str(dump),
    ]


def tiny_llama(folder: Path, tie: bool = False) -> Path:
    """A random Llama (GQA, its own FFN size and norm eps, non-trivial norms) saved as HF."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("hf"))


def first_batch_hf_loss(hf: Path, tmp_path: Path) -> float:
    """transformers' loss on the batch titan's step 1 trains on."""
    config = build_config(from_hf(hf, tmp_path / "ref", "--training.local_batch_size", "8"))
    [(inputs, labels)] = Trainer(config).loader.next_batch()
    model = transformers.LlamaForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(inputs).logits
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()


@pytest.mark.distributed
@pytest.mark.parametrize(
    "nproc, extra",
    [
        (2, ["--training.local_batch_size", "4"]),  # FSDP 2: each rank reads its rows
        (2, ["--training.local_batch_size", "8", "--parallelism.tensor_parallel_degree", "2"]),
        # FSDP over TP shards strided rows: read whole tensors, one at a time
        (4, ["--training.local_batch_size", "4", "--parallelism.tensor_parallel_degree", "2"]),
    ],
    ids=["fsdp2", "tp2", "tp2-fsdp2"],
)
def test_step_1_from_hf_weights_has_transformers_loss(hf_folder, tmp_path, nproc, extra):
    expected = first_batch_hf_loss(hf_folder, tmp_path)
    dump = tmp_path / "run"
    proc = run_cli(
        from_hf(hf_folder, dump, *extra, "--training.steps", "5"),
        nproc=nproc,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = losses(dump)
    assert len(got) == 5
    assert got[0] == pytest.approx(expected, rel=1e-5, abs=0)
    assert got[-1] < got[0]  # and it trains


def test_hf_weights_load_in_one_process(hf_folder, tmp_path):
    expected = first_batch_hf_loss(hf_folder, tmp_path)
    dump = tmp_path / "run"
    proc = run_cli(
        from_hf(hf_folder, dump, "--training.local_batch_size", "8", "--training.steps", "2")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(dump)[0] == pytest.approx(expected, rel=1e-5, abs=0)


def test_an_hf_folder_of_another_shape_is_refused_before_work(hf_folder, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((hf_folder / "config.json").read_text())
    state = transformers.LlamaForCausalLM.from_pretrained(hf_folder).state_dict()
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 64)
    del state["model.norm.weight"]
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, broken / "model.safetensors")
    proc = run_cli(from_hf(broken, tmp_path / "x"))
    assert proc.returncode == 2
    assert "model.norm.weight" in proc.stderr and "up_proj" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.distributed
def test_last_save_in_hf_writes_the_final_weights_for_transformers(hf_folder, tmp_path):
    """Under PP 2 (each rank holds half the model) the HF export holds all of it, exactly."""
    dump = tmp_path / "run"
    pp = ["--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "8"]
    pp += ["--parallelism.pipeline_parallel_microbatch_size", "4", "--training.steps", "3"]
    export = ["--checkpoint.enable", "--checkpoint.last_save_in_hf"]
    proc = run_cli(from_hf(hf_folder, dump, *pp, *export), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = load_pretrained(dump / "checkpoint" / "step-3")
    exported = load_pretrained(dump / "hf")  # read back through the HF adapter
    for (name, a), (_, b) in zip(
        trained.state_dict().items(), exported.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert not torch.equal(  # it is the trained model, not the one it started from
        exported.state_dict()["layers.0.attention.wq.weight"],
        load_pretrained(hf_folder).state_dict()["layers.0.attention.wq.weight"],
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(dump / "hf").eval()
    tokens = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens).logits
        got = trained(tokens)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
