"""DeepSeek V3 against transformers' DeepseekV3ForCausalLM on tiny random configs (fp32, CPU):
logits with and without q-LoRA, with group-limited routing, first dense layers, default and
YaRN RoPE; HF -> titan -> HF bit-identical; the configs titan cannot express refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_qwen3_moe_hf import assert_logits_close
from titan_convert.cli import main
from titan_core import load_pretrained
from titan_core.errors import UserError
from titan_core.models import MoE, MultiHeadLatentAttention
from titan_deepseek import DEEPSEEK_V3_FLAVORS, DeepSeekV3StateDictAdapter, DeepSeekV3Transformer

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 96, 24
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    # mscale != mscale_all_dim: the cos/sin tables are scaled too, not only the softmax
    "mscale": 0.8,
    "mscale_all_dim": 1.0,
}
CASES = {
    # no q-LoRA, 4 groups of 2 experts (a token picks from 2 groups), one dense layer
    "plain-q-groups": dict(q_lora_rank=None, n_group=4, topk_group=2),
    # q-LoRA, one group, two dense layers, no renormalisation
    "q-lora-dense2": dict(q_lora_rank=24, first_k_dense_replace=2, norm_topk_prob=False),
    # YaRN (factor 4 over a 16-token original context), q-LoRA, two groups
    "yarn": dict(q_lora_rank=20, n_group=2, topk_group=1, rope_parameters=YARN),
}


def deepseek_config(**changes):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        moe_intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        kv_lora_rank=16,
        qk_nope_head_dim=12,
        qk_rope_head_dim=8,
        v_head_dim=10,  # values narrower than keys: the kernels must handle it
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        initializer_range=0.1,
        rope_interleave=True,
    )
    return transformers.DeepseekV3Config(**{**base, **changes})


def random_deepseek(config, seed=0):
    """Random weights: norm scales away from 1, routers of std 1 (peaked routing, no near
    ties), and a nonzero expert bias (it must steer the selection, not weight the experts)."""
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 1.0)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.5)
    return model


def tokens(seed=1):
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(CASES))
def hf_deepseek(request, tmp_path_factory):
    model = random_deepseek(deepseek_config(**CASES[request.param]))
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(folder)
    return request.param, model, folder


def test_load_pretrained_gives_transformers_logits(hf_deepseek):
    name, reference, folder = hf_deepseek
    config = reference.config
    model = load_pretrained(folder)
    assert isinstance(model, DeepSeekV3Transformer)
    args = model.args
    assert args.q_lora_rank == (config.q_lora_rank or 0)
    assert (args.moe.n_group, args.moe.topk_group) == (config.n_group, config.topk_group)
    assert (args.rope_scaling is not None) == (name == "yarn")
    for i, layer in model.layers.items():
        assert isinstance(layer.ffn, MoE) == (int(i) >= config.first_k_dense_replace), i
        assert isinstance(layer.attention, MultiHeadLatentAttention)
    if name == "yarn":
        assert model.layers["0"].attention.sdpa.scale == pytest.approx(
            reference.model.layers[0].self_attn.scaling, rel=1e-12
        )
    with torch.no_grad():
        assert_logits_close(model(tokens()), reference(tokens()).logits)


def test_hf_to_titan_to_hf_round_trip_is_bit_identical(hf_deepseek, tmp_path):
    _, reference, hf_dir = hf_deepseek
    assert main(["hf-to-dcp", str(hf_dir), str(tmp_path / "dcp")]) == 0
    meta = json.loads((tmp_path / "dcp" / "titan.json").read_text())
    assert (meta["model"], meta["flavor"]) == ("deepseek_v3", "custom")
    assert main(["dcp-to-hf", str(tmp_path / "dcp"), str(tmp_path / "out")]) == 0
    original = load_file(hf_dir / "model.safetensors")
    exported = {}
    for shard in sorted((tmp_path / "out").glob("*.safetensors")):
        exported.update(load_file(shard))
    assert exported.keys() == original.keys()
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is transformers.DeepseekV3ForCausalLM
    for key in ("q_lora_rank", "first_k_dense_replace", "n_group", "topk_group", "v_head_dim"):
        assert getattr(reloaded.config, key) == getattr(reference.config, key), key
    assert reloaded.config.rope_parameters == reference.config.rope_parameters
    with torch.no_grad():
        assert torch.equal(reloaded(tokens()).logits, reference(tokens()).logits)


def test_verify_passes(hf_deepseek, capsys):
    _, _, hf_dir = hf_deepseek
    assert main(["verify", str(hf_dir)]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(rope_interleave=False), "rope_interleave"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(num_key_value_heads=2), "num_key_value_heads"),
        (dict(first_k_dense_replace=9), "first_k_dense_replace"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "linear"),
    ],
)
def test_configs_titan_cannot_express_are_refused(change, key):
    config = deepseek_config().to_dict()
    config.update(change)
    with pytest.raises(UserError, match=key):
        DeepSeekV3StateDictAdapter().args_from_hf_config(config)


def test_softmax_routing_cannot_be_written_as_deepseek_v3():
    args = DEEPSEEK_V3_FLAVORS["debugmodel"]  # torchtitan's debug shapes route with softmax
    with pytest.raises(UserError, match=r"moe\.score_func is 'softmax'"):
        DeepSeekV3StateDictAdapter().hf_config(args)


def test_the_671b_flavor_is_the_released_config():
    """The flavor's args equal what the adapter reads from DeepSeek-V3's config.json (its
    fields as published), training-only settings aside."""
    released = {
        "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
        "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
        "norm_topk_prob": True, "first_k_dense_replace": 3, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "vocab_size": 129280, "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "max_position_embeddings": 163840, "topk_method": "noaux_tc", "hidden_act": "silu",
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "tie_word_embeddings": False,
    }  # fmt: skip
    args = DeepSeekV3StateDictAdapter().args_from_hf_config(released)
    assert args == DEEPSEEK_V3_FLAVORS["671B"]


# ---- the official FP8 release format ---------------------------------------------------


def test_fp8_release_imports_dequantized_and_skips_the_mtp_layer(tmp_path, caplog):
    """A random DeepSeek V3 with wide layers (dims 160/200/..., not multiples of 128: partial
    edge blocks) block-quantized as the release is, plus a multi-token-prediction layer
    ``model.layers.{n}``: titan reads it within FP8 rounding of the original, exactly the
    independent dequantization, with transformers' logits on the dequantized weights, and one
    log line about the skipped layer."""
    from test_hf_fp8 import QUANT, dequantize, quantize

    config = deepseek_config(
        hidden_size=160, intermediate_size=200, kv_lora_rank=136, q_lora_rank=144
    )
    reference = random_deepseek(config)
    reference.save_pretrained(tmp_path / "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    n = config.num_hidden_layers
    for name in [k for k in state if k.startswith("model.layers.0.")]:  # the MTP layer's copy
        state[name.replace("model.layers.0.", f"model.layers.{n}.")] = state[name].clone()
    dequantized = {}
    for name in [k for k in state if k.endswith("proj.weight") and state[k].dim() == 2]:
        original = state[name]
        state[name], state[name + "_scale_inv"] = quantize(original)
        dequantized[name] = dequantize(state[name], state[name + "_scale_inv"])
        error = (dequantized[name] - original).norm() / original.norm()
        assert error < 2**-4, (name, error)
    (tmp_path / "fp8").mkdir()
    save_file(state, tmp_path / "fp8" / "model.safetensors", metadata={"format": "pt"})
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "fp8" / "config.json").write_text(
        json.dumps({**hf_config, "quantization_config": QUANT})
    )
    with caplog.at_level("INFO", logger="titan"):
        model = load_pretrained(tmp_path / "fp8")
    assert caplog.text.count(f"skipping model.layers.{n}.*") == 1
    # transformers on the dequantized weights: the original folder with them written in
    plain = {
        k: dequantized.get(k, t)
        for k, t in load_file(tmp_path / "hf" / "model.safetensors").items()
    }
    save_file(plain, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    on_dequantized = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert_logits_close(model(tokens()), on_dequantized(tokens()).logits)


@pytest.mark.parametrize(
    "key, value, tensor",
    [
        ("kv_lora_rank", 12, "kv_a_proj_with_mqa"),
        ("q_lora_rank", 16, "q_a_proj"),
    ],
)
def test_latent_ranks_that_do_not_match_the_tensors_are_refused(
    key, value, tensor, tmp_path, capsys
):
    """config.json's latent ranks against the stored tensors: one line naming a tensor, exit 2,
    nothing written."""
    from test_convert import assert_refused

    folder = tmp_path / "hf"
    random_deepseek(deepseek_config(**CASES["q-lora-dense2"])).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    out = tmp_path / "out" / "dcp"
    capsys.readouterr()  # transformers' progress bar from save_pretrained
    assert main(["hf-to-dcp", str(folder), str(out)]) == 2
    assert_refused(capsys.readouterr().err, rf"wrong shape: .*{tensor}", out)
