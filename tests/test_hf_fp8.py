"""Block-quantized FP8 HF folders (the DeepSeek V3 release format), read dequantized.

A tiny random Llama is saved by transformers, then its decoder Linear weights are quantized here
the way the release is (float8_e4m3fn, one float32 scale per 128x128 block, amax / 448), with
sizes that are not multiples of 128 (partial edge blocks) and larger than 128 (several blocks).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_convert import assert_refused, convert, llama_config, random_llama, relative_error
from titan_core import load_pretrained
from titan_core.errors import UserError
from titan_core.hf import read_titan_tensor
from titan_core.hf_quant import FP8Reader, open_hf_reader
from titan_llama3 import Llama3StateDictAdapter

BLOCK = 128
E4M3_MAX = 448.0
QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
         "weight_block_size": [BLOCK, BLOCK]}  # fmt: skip
# hidden 160 and intermediate 200: 2x2 blocks, both partial, in gate/up (200, 160).
CONFIG = dict(hidden_size=160, intermediate_size=200, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=False, rope_theta=100.0)  # fmt: skip
GATE = "model.layers.1.mlp.gate_proj.weight"


def expand(scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """One scale per block -> one per weight element, cropped to the weight's shape."""
    full = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    return full[: shape[0], : shape[1]]


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 scale_inv) with each block's largest magnitude mapped to 448."""
    rows, cols = weight.shape
    padded = torch.nn.functional.pad(weight.float(), (0, -cols % BLOCK, 0, -rows % BLOCK))
    blocks = padded.reshape(padded.shape[0] // BLOCK, BLOCK, padded.shape[1] // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX  # (R/128, C/128)
    quantized = (weight.float() / expand(scale, weight.shape)).to(torch.float8_e4m3fn)
    return quantized, scale


def dequantize(quantized: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return quantized.float() * expand(scale, quantized.shape)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(transformers model, its folder, the FP8 copy, HF name -> dequantized weight)."""
    root = tmp_path_factory.mktemp("fp8")
    reference = random_llama(llama_config(**CONFIG))
    reference.save_pretrained(root / "hf")
    state = load_file(root / "hf" / "model.safetensors")
    dequantized = {}
    for name in [k for k in state if k.startswith("model.layers.") and state[k].dim() == 2]:
        state[name], state[name + "_scale_inv"] = quantize(state[name])
        dequantized[name] = dequantize(state[name], state[name + "_scale_inv"])
    fp8 = root / "fp8"
    fp8.mkdir()
    save_file(state, fp8 / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((root / "hf" / "config.json").read_text())
    (fp8 / "config.json").write_text(json.dumps({**config, "quantization_config": QUANT}))
    return reference, root / "hf", fp8, dequantized


def test_weights_read_dequantized_exactly_and_within_fp8_rounding(folders):
    reference, _, fp8, dequantized = folders
    reader = open_hf_reader(fp8)
    assert isinstance(reader, FP8Reader)
    original = dict(reference.named_parameters())
    assert sorted(reader.keys()) == sorted(original)  # the scales are no model tensors
    assert len(dequantized) == 2 * 7  # every Linear of both layers
    for name, expected in dequantized.items():
        assert reader.dtypes[name] == torch.float32 and reader.shapes[name] == expected.shape
        assert torch.equal(reader.read(name), expected), name
        error = (expected - original[name]).norm() / original[name].norm()
        assert error < 2**-4, (name, error)
    for name in set(original) - set(dequantized):  # norms, embeddings, head: as stored
        assert torch.equal(reader.read(name), original[name].detach()), name
    reader.validate({k: tuple(v.shape) for k, v in original.items()})


def test_load_pretrained_gives_transformers_logits_on_the_dequantized_weights(folders):
    reference, hf_dir, fp8, dequantized = folders
    dequantized_reference = type(reference).from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, weight in dequantized.items():
            dequantized_reference.get_parameter(name).copy_(weight)
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = dequantized_reference(tokens).logits
        actual = load_pretrained(fp8)(tokens)
    assert relative_error(actual, expected) < 1e-5


def test_hf_to_dcp_stores_the_dequantized_weights(folders, tmp_path):
    _, _, fp8, dequantized = folders
    assert convert("hf-to-dcp", fp8, tmp_path / "dcp") == 0
    converted = load_pretrained(tmp_path / "dcp").state_dict()
    for name, tensor in load_pretrained(fp8).state_dict().items():
        assert torch.equal(converted[name], tensor), name
    # the MLP has no RoPE row permutation: titan's weights are HF's as they are
    for titan, hf in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
        expected = dequantized[f"model.layers.0.mlp.{hf}.weight"]
        assert torch.equal(converted[f"layers.0.feed_forward.{titan}.weight"], expected)


@pytest.mark.parametrize(
    "rows, cols, scale_rows, scale_cols",
    [
        (slice(0, 100), None, (0, 1), (0, 2)),
        (slice(100, 200), slice(0, 80), (0, 2), (0, 1)),
        (slice(127, 129), slice(120, 150), (0, 2), (0, 2)),
        (slice(130, 131), slice(128, 160), (1, 2), (1, 2)),
        (None, slice(5, 6), (0, 2), (0, 1)),
    ],
)
def test_a_slice_reads_only_its_scale_blocks_and_equals_the_full_read(
    folders, rows, cols, scale_rows, scale_cols, monkeypatch
):
    reader = open_hf_reader(folders[2])
    full = reader.read(GATE)
    seen = []
    raw_read = reader.raw.read
    monkeypatch.setattr(
        reader.raw, "read", lambda name, rows=None, cols=None: seen.append((name, rows, cols))
        or raw_read(name, rows, cols),
    )  # fmt: skip
    part = reader.read(GATE, rows=rows, cols=cols)
    assert torch.equal(part, full[rows or slice(None), cols or slice(None)])
    assert seen[-1] == (GATE + "_scale_inv", slice(*scale_rows), slice(*scale_cols))


def test_a_sharded_load_of_a_rope_permuted_weight_equals_its_full_read(folders):
    reader = open_hf_reader(folders[2])
    adapter = Llama3StateDictAdapter()
    args = adapter.args_from_hf_folder(folders[2])
    name = "layers.1.attention.wq.weight"
    full = read_titan_tensor(reader, adapter, args, name)
    shard = read_titan_tensor(reader, adapter, args, name, rows=slice(60, 130), cols=slice(7, 150))
    assert torch.equal(shard, full[60:130, 7:150])


def test_verify_refuses_an_fp8_folder_in_one_line(folders, capsys):
    assert convert("verify", folders[2]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds FP8 weights" in err and len(err.splitlines()) == 1


# ---- bad input: one line naming the tensor or key; the CLI exits 2 and writes nothing ---------

SCALE = "model.layers.0.self_attn.q_proj.weight_scale_inv"


def _edit_tensors(folder, edit):
    state = load_file(folder / "model.safetensors")
    if edit == "no-scale":
        del state[SCALE]
    elif edit == "scale-shape":
        state[GATE + "_scale_inv"] = state[GATE + "_scale_inv"][:, :1].contiguous()
    elif edit == "orphan-scale":
        state["model.norm.weight_scale_inv"] = torch.ones(1, 1)
    elif edit == "e5m2-weight":
        state[GATE] = state[GATE].float().to(torch.float8_e5m2)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


CONFIG_EDITS = {
    "method": {"quant_method": "gptq"},
    "fmt": {"fmt": "e5m2"},
    "static-activations": {"activation_scheme": "static"},
    "block-one-int": {"weight_block_size": [128]},
    "block-zero": {"weight_block_size": [128, 0]},
    "block-missing": {"weight_block_size": None},
    "no-quantization-config": None,
}
BAD_FP8 = {
    "no-scale": r"'model\.layers\.0\.self_attn\.q_proj\.weight' is float8 but its scale "
    r"'model\.layers\.0\.self_attn\.q_proj\.weight_scale_inv' is missing",
    "scale-shape": r"scale 'model\.layers\.1\.mlp\.gate_proj\.weight_scale_inv' has shape "
    r"\(2, 1\), expected \(2, 2\)",
    "orphan-scale": r"scale 'model\.norm\.weight_scale_inv' has no float8 weight",
    "e5m2-weight": r"'model\.layers\.1\.mlp\.gate_proj\.weight' is torch\.float8_e5m2 but "
    r"quantization_config\.fmt is 'e4m3'",
    "method": r"quantization_config\.quant_method is 'gptq'; titan imports only",
    "fmt": r"quantization_config\.fmt is 'e5m2'",
    "static-activations": r"quantization_config\.activation_scheme is 'static'",
    "block-one-int": r"quantization_config\.weight_block_size is \[128\]; expected two positive",
    "block-zero": r"quantization_config\.weight_block_size is \[128, 0\]",
    "block-missing": r"quantization_config\.weight_block_size is None",
    "no-quantization-config": r"tensors model\.layers\.0\.mlp\.down_proj\.weight, .* and 9 "
    r"more are float8 but config\.json has no quantization_config; add",
}


@pytest.mark.parametrize("edit", list(BAD_FP8))
def test_bad_fp8_input_is_refused_in_one_line_before_anything_is_written(
    edit, folders, tmp_path, capsys
):
    folder = tmp_path / "broken"
    shutil.copytree(folders[2], folder)
    if edit in CONFIG_EDITS:
        config = json.loads((folder / "config.json").read_text())
        if CONFIG_EDITS[edit] is None:
            del config["quantization_config"]
        else:
            config["quantization_config"] = {**QUANT, **CONFIG_EDITS[edit]}
        (folder / "config.json").write_text(json.dumps(config))
    else:
        _edit_tensors(folder, edit)
    with pytest.raises(UserError, match=BAD_FP8[edit]):
        open_hf_reader(folder)
    out = tmp_path / "out" / "dcp"
    assert convert("hf-to-dcp", folder, out) == 2
    assert_refused(capsys.readouterr().err, BAD_FP8[edit], out)
