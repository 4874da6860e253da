"""titan-convert and HF interop against transformers: tiny random LlamaConfigs, both directions.

The reference is ``transformers.LlamaForCausalLM``: its logits on the same weights, and its own
``save_pretrained``/``from_pretrained`` files.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from titan_convert.cli import main
from titan_core import load_pretrained
from titan_core.errors import UserError
from titan_core.hf import (
    HFReader,
    HFWriter,
    read_titan_tensor,
    rope_rows_from_hf,
    rope_rows_to_hf,
)
from titan_core.models import Llama3RopeScaling
from titan_llama3 import LLAMA3_FLAVORS, Llama3StateDictAdapter, train_spec

transformers = pytest.importorskip("transformers")

# A small theta and original context make Llama 3.1 scaling change most frequencies at the
# positions of the test batch, so a mistake in it shows in the logits.
LLAMA31 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CASES = {
    "gqa-llama31-tied": dict(
        num_key_value_heads=2,
        rope_theta=100.0,
        rope_scaling=LLAMA31,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        intermediate_size=40,
    ),
    "mha-default-rope-untied": dict(
        num_key_value_heads=4,
        rope_theta=100.0,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        intermediate_size=56,
    ),
    "gqa-wide-heads-untied": dict(
        num_key_value_heads=1,
        head_dim=16,  # not hidden_size // heads
        rope_theta=100.0,
        rope_scaling=LLAMA31,
        tie_word_embeddings=False,
        rms_norm_eps=3e-6,
        intermediate_size=72,
    ),
}
VOCAB, SEQ = 96, 24


def llama_config(**changes):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        initializer_range=0.1,
    )
    return transformers.LlamaConfig(**{**base, **changes})


def random_llama(config, seed=0):
    """A LlamaForCausalLM with random weights, norm scales included (HF starts them at 1)."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def tokens(seed=1):
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def convert(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module", params=list(CASES))
def hf_model(request, tmp_path_factory):
    """(case name, the reference model, its save_pretrained folder with a tokenizer.json)."""
    model = random_llama(llama_config(**CASES[request.param]))
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text('{"stand-in": "copied verbatim"}')
    return request.param, model, folder


def test_hf_to_dcp_then_load_pretrained_gives_transformers_logits(hf_model, tmp_path):
    name, reference, hf_dir = hf_model
    assert convert("hf-to-dcp", hf_dir, tmp_path / "dcp") == 0
    meta = json.loads((tmp_path / "dcp" / "titan.json").read_text())
    assert (meta["model"], meta["flavor"], meta["step"], meta["model_only"]) == (
        "llama3",
        "custom",
        0,
        True,
    )
    model = load_pretrained(tmp_path / "dcp")
    args = model.args
    config = reference.config
    assert args.hidden_dim == config.intermediate_size
    assert args.head_dim == config.head_dim and args.norm_eps == config.rms_norm_eps
    assert args.n_kv_heads == config.num_key_value_heads
    assert args.tie_word_embeddings == config.tie_word_embeddings
    assert (args.rope_scaling is not None) == ("rope_scaling" in CASES[name])
    with torch.no_grad():
        expected = reference(tokens()).logits
        actual = model(tokens())
    assert relative_error(actual, expected) < 1e-5


def test_load_pretrained_reads_an_hf_folder(hf_model):
    _, reference, hf_dir = hf_model
    model = load_pretrained(hf_dir)
    assert not model.training
    with torch.no_grad():
        assert relative_error(model(tokens(2)), reference(tokens(2)).logits) < 1e-5


def test_dcp_to_hf_round_trip_is_bit_identical(hf_model, tmp_path):
    _, reference, hf_dir = hf_model
    assert convert("hf-to-dcp", hf_dir, tmp_path / "dcp") == 0
    # A small shard limit: the export is split over several files joined by the index.
    argv = ["dcp-to-hf", tmp_path / "dcp", tmp_path / "hf", "--max-shard-size", "20KB"]
    assert convert(*argv) == 0
    out = tmp_path / "hf"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert (
        len(shards) > 1
        and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    )
    assert (out / "tokenizer.json").read_text() == (hf_dir / "tokenizer.json").read_text()
    # The files hold exactly transformers' own tensors, no more.
    original = load_file(hf_dir / "model.safetensors")
    exported = {}
    for shard in shards:
        exported.update(load_file(out / shard))
    assert exported.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor) and exported[key].dtype == tensor.dtype, key
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    assert (
        reloaded.config.to_dict()["rope_parameters"]
        == reference.config.to_dict()["rope_parameters"]
    )
    assert reloaded.config.tie_word_embeddings == reference.config.tie_word_embeddings
    for key, tensor in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(tokens()).logits, reference(tokens()).logits)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_weights_round_trip_exactly(tmp_path, dtype):
    half = getattr(torch, dtype)
    reference = random_llama(llama_config(**CASES["gqa-llama31-tied"]), seed=3).to(half)
    reference.save_pretrained(tmp_path / "hf")
    assert convert("hf-to-dcp", tmp_path / "hf", tmp_path / "dcp") == 0  # float32: exact
    argv = ["dcp-to-hf", tmp_path / "dcp", tmp_path / "out", "--export-dtype", dtype]
    assert convert(*argv) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == dtype
    original = load_file(tmp_path / "hf" / "model.safetensors")
    exported = load_file(tmp_path / "out" / "model-00001-of-00001.safetensors")
    assert exported.keys() == original.keys()
    for key, tensor in original.items():
        assert tensor.dtype == half and torch.equal(exported[key], tensor), key


def test_verify_passes_on_good_weights_and_fails_on_a_layout_bug(hf_model, capsys, monkeypatch):
    _, _, hf_dir = hf_model
    assert convert("verify", hf_dir) == 0
    assert "OK" in capsys.readouterr().out
    # Loading without the q/k row permutation is the classic silent conversion bug.
    monkeypatch.setattr(Llama3StateDictAdapter, "from_hf", lambda self, args, name, t: t)
    assert convert("verify", hf_dir) == 1
    assert "FAILED" in capsys.readouterr().out


def test_a_checkpoint_the_trainer_wrote_exports_to_transformers(tmp_path):
    from titan_core.train import run

    dump = tmp_path / "run"
    run(["--checkpoint.create_seed_checkpoint", "--job.dump_folder", str(dump),
         "--training.seq_len", "32", "--metrics.no_enable_tensorboard"])  # fmt: skip
    assert convert("dcp-to-hf", dump, tmp_path / "hf") == 0  # the dump folder: newest step
    assert (tmp_path / "hf" / "tokenizer.json").is_file()  # the embedded tokenizer goes along
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    model = load_pretrained(dump)
    batch = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(model(batch), reference(batch).logits) < 1e-5
    # The architecture's positions (debugmodel: 2048), not the run's seq_len.
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["max_position_embeddings"] == 2048


# ---- the adapter -----------------------------------------------------------------------------

# config.json of meta-llama/Llama-3.2-1B and Llama-3.1-8B (the keys that matter).
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
LLAMA_31_8B = {
    **LLAMA_32_1B,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "head_dim": 128,
    "rope_scaling": {**LLAMA_32_1B["rope_scaling"], "factor": 8.0},
    "tie_word_embeddings": False,
}


@pytest.mark.parametrize(("config", "flavor"), [(LLAMA_32_1B, "1B"), (LLAMA_31_8B, "8B")])
def test_real_llama_configs_map_to_their_flavors(config, flavor):
    adapter = train_spec.state_dict_adapter
    args = adapter.args_from_hf_config(config)
    assert args == dataclasses.replace(LLAMA3_FLAVORS[flavor], max_seq_len=131072)
    # transformers 5 spells RoPE as rope_parameters with rope_theta inside; same args.
    v5 = {k: v for k, v in config.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**config["rope_scaling"], "rope_theta": 500000.0}
    assert adapter.args_from_hf_config(v5) == args
    written = adapter.hf_config(args, torch.bfloat16)
    assert {k: written[k] for k in config} == config | {"rope_scaling": written["rope_scaling"]}
    assert written["rope_scaling"] == config["rope_scaling"]
    assert adapter.args_from_hf_config(written) == args
    expected = adapter.expected_hf(args)
    assert ("lm_head.weight" in expected) == (not config["tie_word_embeddings"])
    assert expected["model.layers.0.mlp.gate_proj.weight"] == (config["intermediate_size"],
                                                               config["hidden_size"])  # fmt: skip


def test_hf_config_round_trips_every_flavor():
    adapter = train_spec.state_dict_adapter
    for args in LLAMA3_FLAVORS.values():
        assert adapter.args_from_hf_config(adapter.hf_config(args)) == args


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attention_bias": True}, "'attention_bias' is True"),
        ({"mlp_bias": True}, "'mlp_bias' is True"),
        ({"hidden_act": "gelu"}, "'hidden_act' is 'gelu'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
        ({"rope_scaling": {**LLAMA31, "beta": 1.0}}, r"keys titan does not support: \['beta'\]"),
        ({"intermediate_size": None}, "'intermediate_size' is missing"),
        ({"num_attention_heads": "32"}, "'num_attention_heads' is '32', expected int"),
    ],
)
def test_unsupported_configs_are_refused_naming_the_key(change, message):
    config = {**LLAMA_32_1B, **change}
    with pytest.raises(UserError, match=message):
        train_spec.state_dict_adapter.args_from_hf_config(config)


def test_rope_row_permutation_pairs_rotate_half_dimensions():
    head_dim, heads = 8, 3
    hf = torch.arange(heads * head_dim).reshape(heads * head_dim, 1)
    titan = rope_rows_from_hf(hf, head_dim)
    # Titan rows (2j, 2j+1) of a head hold HF rows (j, j + head_dim/2) of the same head.
    for h in range(heads):
        for j in range(head_dim // 2):
            base = h * head_dim
            assert titan[base + 2 * j, 0] == base + j
            assert titan[base + 2 * j + 1, 0] == base + j + head_dim // 2
    assert torch.equal(rope_rows_to_hf(titan, head_dim), hf)


def test_row_slices_read_only_whole_heads_and_match_the_full_tensor(hf_model):
    _, _, hf_dir = hf_model
    adapter = train_spec.state_dict_adapter
    args = adapter.args_from_hf_config(json.loads((hf_dir / "config.json").read_text()))
    reader = HFReader(hf_dir)
    for name in ("layers.1.attention.wq.weight", "layers.0.feed_forward.w2.weight"):
        full = read_titan_tensor(reader, adapter, args, name)
        for rows in (slice(0, args.head_dim), slice(3, 2 * args.head_dim + 1), slice(5, None)):
            assert torch.equal(read_titan_tensor(reader, adapter, args, name, rows), full[rows])
            part = read_titan_tensor(reader, adapter, args, name, rows, slice(2, 9))
            assert torch.equal(part, full[rows, 2:9])
    assert adapter.row_block(args, "layers.0.attention.wk.weight") == args.head_dim
    assert adapter.row_block(args, "layers.0.attention.wv.weight") == 1


def test_hf_writer_writes_out_of_order_and_refuses_an_unfinished_folder(tmp_path):
    layout = {"a": ((3, 4), torch.float32), "b": ((5,), torch.bfloat16), "c": ((2, 2), torch.int64)}
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).bfloat16(), "c": torch.ones(2, 2).long()}
    writer = HFWriter(tmp_path, layout, max_shard_bytes=48)
    for key in ("c", "a"):
        writer.write(key, tensors[key])
    with pytest.raises(RuntimeError, match="never written: b"):
        writer.close()
    writer.write("b", tensors["b"])
    writer.close()
    reader = HFReader(tmp_path)
    assert len(set(reader.files.values())) == 2
    for key, tensor in tensors.items():
        assert torch.equal(reader.read(key), tensor)
    assert torch.equal(reader.read("a", rows=slice(1, 3)), tensors["a"][1:3])
    assert torch.equal(reader.read("a", slice(1, None), slice(0, 2)), tensors["a"][1:, :2])
    assert reader.read("a", rows=slice(2, 2)).shape == (0, 4)


def test_tensors_read_from_an_hf_folder_can_be_changed_without_touching_the_files(tmp_path):
    """The reader maps the files' pages: writing to a tensor it returned must stay private."""
    original = torch.arange(12.0).reshape(3, 4)
    writer = HFWriter(tmp_path, {"a": ((3, 4), torch.float32)})
    writer.write("a", original)
    writer.close()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    reader = HFReader(tmp_path)
    reader.read("a").mul_(-1)
    reader.read("a", rows=slice(1, 2)).zero_()
    assert torch.equal(reader.read("a"), original)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_the_adapter_records_llama31_scaling_exactly():
    config = {**LLAMA_32_1B, "rope_scaling": {**LLAMA31, "type": "llama3"}}
    del config["rope_scaling"]["rope_type"]  # the older spelling of the type key
    args = train_spec.state_dict_adapter.args_from_hf_config(config)
    assert args.rope_scaling == Llama3RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
    )


# ---- bad input: exit 2, one line, nothing written ------------------------------------------


@pytest.fixture(scope="module")
def good_hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good") / "hf"
    random_llama(llama_config(**CASES["mha-default-rope-untied"])).save_pretrained(folder)
    return folder


def broken_copy(good_hf, tmp_path, edit):
    folder = tmp_path / "broken"
    shutil.copytree(good_hf, folder)
    weights = folder / "model.safetensors"
    if edit == "no-config":
        (folder / "config.json").unlink()
    elif edit == "unknown-type":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    elif edit == "truncated":
        size = weights.stat().st_size
        with open(weights, "r+b") as f:
            f.truncate(size - 100)
    else:
        state = load_file(weights)
        if edit == "wrong-shape":
            state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(57, 32)
        elif edit == "missing":
            del state["model.layers.0.self_attn.k_proj.weight"]
        elif edit == "extra":
            state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
        save_file(state, weights, metadata={"format": "pt"})
    return folder


BAD_INPUTS = {
    "no-config": r"config\.json not found",
    "unknown-type": r"model_type 'mistral' is not supported .*\(supported: .*llama \(llama3\)",
    "truncated": r"model\.safetensors is truncated: its header describes \d+ bytes, the file has",
    "wrong-shape": r"1 with the wrong shape: model\.layers\.1\.mlp\.up_proj\.weight \(57, 32\) "
    r"\(expected \(56, 32\)\)",
    "missing": r"1 missing: model\.layers\.0\.self_attn\.k_proj\.weight",
    "extra": r"1 unexpected: model\.layers\.0\.self_attn\.rotary_emb\.inv_freq",
}


def assert_refused(err: str, pattern: str, out_dir) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("titan-convert: error: ")
    assert __import__("re").search(pattern, lines[0]), lines[0]
    assert not out_dir.exists()
    if out_dir.parent.exists():  # nor a temporary folder beside it
        assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]


@pytest.mark.parametrize("edit", list(BAD_INPUTS))
def test_bad_hf_input_exits_2_with_one_line_and_writes_nothing(edit, good_hf, tmp_path, capsys):
    folder = broken_copy(good_hf, tmp_path, edit)
    out = tmp_path / "out" / "dcp"
    assert convert("hf-to-dcp", folder, out) == 2
    assert_refused(capsys.readouterr().err, BAD_INPUTS[edit], out)


@pytest.mark.parametrize("edit", ["truncated", "unknown-type"])
def test_the_console_script_exits_2_on_bad_input(edit, good_hf, tmp_path):
    folder = broken_copy(good_hf, tmp_path, edit)
    out = tmp_path / "dcp"
    cmd = [sys.executable, "-m", "titan_convert", "hf-to-dcp", str(folder), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert_refused(proc.stderr, BAD_INPUTS[edit], out)


def test_an_existing_output_is_kept_unless_overwrite(good_hf, tmp_path, capsys):
    out = tmp_path / "dcp"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert convert("hf-to-dcp", good_hf, out) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    assert convert("hf-to-dcp", good_hf, out, "--overwrite") == 0
    assert not (out / "precious.txt").exists() and (out / "titan.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["dcp"]  # no temporary folder left
    capsys.readouterr()
    # Never over its own input, nor a folder holding it.
    assert convert("dcp-to-hf", out, out, "--overwrite") == 2
    assert convert("hf-to-dcp", good_hf, good_hf.parent, "--overwrite") == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("would replace the input" in line for line in err)
    assert (good_hf / "config.json").is_file() and (out / "titan.json").is_file()


def test_dcp_to_hf_refuses_what_is_not_a_checkpoint(good_hf, tmp_path, capsys):
    out = tmp_path / "hf"
    assert convert("dcp-to-hf", good_hf, out) == 2
    assert_refused(capsys.readouterr().err, r"CKPT_DIR: .* is not a titan checkpoint", out)


def test_dcp_to_hf_refuses_weights_that_do_not_match_their_args(good_hf, tmp_path, capsys):
    assert convert("hf-to-dcp", good_hf, tmp_path / "dcp") == 0
    meta_file = tmp_path / "dcp" / "titan.json"
    meta = json.loads(meta_file.read_text())
    meta["model_args"]["ffn_hidden_dim"] = 64
    meta_file.write_text(json.dumps(meta))
    out = tmp_path / "hf"
    assert convert("dcp-to-hf", tmp_path / "dcp", out) == 2
    pattern = r"do not match its titan\.json model_args \(layers\.0\.feed_forward\.w1\.weight: checkpoint \(56, 32\), model \(64, 32\)"
    assert_refused(capsys.readouterr().err, pattern, out)
