"""Qwen3 dense: flavors, HF parity against transformers' Qwen3ForCausalLM (both directions),
training on the embedded data, and the parity matrix of parallel layouts.

The references are things we did not write: ``transformers.Qwen3ForCausalLM`` on tiny random
configs (fp32, CPU) for numerics, the published model sizes for the flavors, and a one-process
run for every parallel layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import FAST, REPO, losses, read_metrics, run_cli
from titan_core import get_train_spec, load_pretrained
from titan_core.errors import UserError
from titan_core.models import QKNormAttention, RMSNorm, RoPE, apply_rope
from titan_qwen3 import QWEN3_FLAVORS, Qwen3StateDictAdapter, Qwen3Transformer, train_spec

transformers = pytest.importorskip("transformers")

# ---- the model --------------------------------------------------------------------------------


def test_registered_with_its_flavors_and_module_names():
    assert get_train_spec("qwen3") is train_spec
    dense = {"debugmodel", "0.6B", "1.7B", "4B", "8B", "14B", "32B"}
    assert set(QWEN3_FLAVORS) == dense | {"debugmodel_moe", "30B-A3B", "235B-A22B"}
    debug = QWEN3_FLAVORS["debugmodel"]
    assert debug.vocab_size >= 2048 and debug.head_dim != debug.dim // debug.n_heads
    with torch.device("meta"):
        model = Qwen3Transformer(debug)
    names = {n for n, _ in model.named_parameters()}
    for expected in (
        "layers.0.attention.wq.weight",
        "layers.0.attention.q_norm.weight",
        "layers.0.attention.k_norm.weight",
        "layers.0.feed_forward.w2.weight",
        "layers.0.attention_norm.weight",
        "norm.weight",
        "output.weight",
    ):
        assert expected in names
    assert model.layers["0"].attention.q_norm.weight.shape == (debug.head_dim,)


def test_model_code_imports_no_distributed():
    import inspect

    import titan_core.models.transformer as decoder_mod
    import titan_qwen3.model as model_mod

    for mod in (model_mod, decoder_mod):
        assert "torch.distributed" not in inspect.getsource(mod)


# Published sizes (Qwen3 technical report, model cards): total, and without the embedding table
# and output projection ("non-embedding").
SIZES = {
    "0.6B": (0.6e9, 0.44e9, True),
    "1.7B": (1.7e9, 1.4e9, True),
    "4B": (4.0e9, 3.6e9, True),
    "8B": (8.2e9, 6.95e9, False),
    "14B": (14.8e9, 13.2e9, False),
    "32B": (32.8e9, 31.2e9, False),
}


@pytest.mark.parametrize("flavor", list(SIZES))
def test_flavor_parameter_counts_match_the_released_models(flavor):
    total, non_embedding, tied = SIZES[flavor]
    args = dataclasses.replace(QWEN3_FLAVORS[flavor], max_seq_len=16)
    with torch.device("meta"):
        model = Qwen3Transformer(args)
    count = sum(p.numel() for p in model.parameters())  # a tied table counts once
    assert count == pytest.approx(total, rel=0.015)
    tables = 1 if tied else 2
    assert count - tables * args.vocab_size * args.dim == pytest.approx(non_embedding, rel=0.015)
    assert args.tie_word_embeddings == tied == (model.output.weight is model.tok_embeddings.weight)
    assert (args.head_dim, args.vocab_size, args.rope_theta) == (128, 151936, 1e6)


def test_qk_norm_attention_normalises_each_head_before_rope():
    torch.manual_seed(0)
    attn = QKNormAttention(dim=24, n_heads=4, n_kv_heads=2, head_dim=8, eps=1e-6)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    rope = RoPE(8, 6, 10000.0)
    x = torch.randn(2, 6, 24)

    def rms(t, weight):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    q = apply_rope(rms(attn.wq(x).view(2, 6, 4, 8), attn.q_norm.weight), *rope(6))
    k = apply_rope(rms(attn.wk(x).view(2, 6, 2, 8), attn.k_norm.weight), *rope(6))
    v = attn.wv(x).view(2, 6, 2, 8)
    k, v = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)  # GQA: 2 q per kv
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
    want = attn.wo(out.transpose(1, 2).flatten(2))
    torch.testing.assert_close(attn(x, rope(6)), want, rtol=1e-5, atol=1e-6)
    assert isinstance(attn.q_norm, RMSNorm)


def test_an_example_config_ships_for_every_flavor_with_a_valid_8_gpu_layout():
    from importlib.resources import files

    from titan_core.config import JobConfig, load_toml
    from titan_core.parallel import ParallelDims, validate_layout
    from titan_core.preflight import resolve_model_args

    flavors = set()
    for path in files("titan_qwen3").joinpath("configs").iterdir():
        if not path.name.endswith(".toml"):
            continue
        config = JobConfig()
        load_toml(config, str(path))
        assert config.model.name == "qwen3"
        args = resolve_model_args(train_spec, config)  # the flavor exists
        validate_layout(ParallelDims.from_config(config.parallelism, 8), config, args)
        debug = config.model.flavor.startswith("debugmodel")  # the embedded tokenizer
        assert (config.model.hf_assets_path == "") == debug
        flavors.add(config.model.flavor)
    assert flavors == set(QWEN3_FLAVORS)


# ---- HF parity -------------------------------------------------------------------------------

CASES = {
    "gqa-tied-wide-heads": dict(  # head_dim 16 > hidden / heads = 8, as in the real models
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        rms_norm_eps=1e-6, intermediate_size=40, rope_theta=1e6,
    ),
    "mha-untied": dict(
        num_attention_heads=4, num_key_value_heads=4, head_dim=8, tie_word_embeddings=False,
        rms_norm_eps=1e-5, intermediate_size=56, rope_theta=100.0,
    ),
    "gqa1-untied-narrow-heads": dict(  # head_dim 4 < hidden / heads = 8
        num_attention_heads=4, num_key_value_heads=1, head_dim=4, tie_word_embeddings=False,
        rms_norm_eps=3e-6, intermediate_size=72, rope_theta=1e6,
    ),
}  # fmt: skip
VOCAB, SEQ = 96, 24


def qwen3_config(**changes):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        max_position_embeddings=64,
        initializer_range=0.1,
    )
    return transformers.Qwen3Config(**{**base, **changes})


def random_qwen3(config, seed=0):
    """A Qwen3ForCausalLM with random weights, every norm scale included (HF starts them at 1),
    so a q_norm/k_norm loaded in the wrong order shows in the logits."""
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def tokens(seed=1, vocab=VOCAB, seq=SEQ):
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(seed))


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module", params=list(CASES))
def hf_model(request, tmp_path_factory):
    """(case name, the reference model, its save_pretrained folder)."""
    model = random_qwen3(qwen3_config(**CASES[request.param]))
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(folder)
    return request.param, model, folder


def test_load_pretrained_hf_folder_gives_transformers_logits(hf_model):
    _, reference, hf_dir = hf_model
    model = load_pretrained(hf_dir)  # the family is found from config.json's model_type
    assert isinstance(model, Qwen3Transformer) and not model.training
    config = reference.config
    assert model.args.head_dim == config.head_dim
    assert model.args.hidden_dim == config.intermediate_size
    assert model.args.tie_word_embeddings == config.tie_word_embeddings
    with torch.no_grad():
        assert relative_error(model(tokens()), reference(tokens()).logits) < 1e-5


def test_q_k_norm_scales_are_permuted_with_the_rope_rows(hf_model, monkeypatch):
    """Loading the norms in HF's order (permuting only wq/wk) gives wrong logits."""
    _, reference, hf_dir = hf_model
    rows_only = (".attention.wq.weight", ".attention.wk.weight")
    monkeypatch.setattr(Qwen3StateDictAdapter, "rope_rows", rows_only)
    with torch.no_grad():
        assert relative_error(load_pretrained(hf_dir)(tokens()), reference(tokens()).logits) > 1e-3


def test_hf_to_titan_to_hf_round_trip_is_bit_identical(hf_model, tmp_path):
    convert = pytest.importorskip("titan_convert.cli").main
    from safetensors.torch import load_file

    _, reference, hf_dir = hf_model
    assert convert(["hf-to-dcp", str(hf_dir), str(tmp_path / "dcp")]) == 0
    meta = json.loads((tmp_path / "dcp" / "titan.json").read_text())
    assert (meta["model"], meta["flavor"]) == ("qwen3", "custom")
    with torch.no_grad():  # the DCP checkpoint holds the same model
        logits = load_pretrained(tmp_path / "dcp")(tokens())
        assert relative_error(logits, reference(tokens()).logits) < 1e-5
    assert convert(["dcp-to-hf", str(tmp_path / "dcp"), str(tmp_path / "hf")]) == 0
    out = tmp_path / "hf"
    original = load_file(hf_dir / "model.safetensors")
    exported = {}
    for shard in sorted(out.glob("*.safetensors")):
        exported.update(load_file(shard))
    assert exported.keys() == original.keys()  # tied: no lm_head.weight, as transformers writes
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor) and exported[key].dtype == tensor.dtype, key
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is transformers.Qwen3ForCausalLM
    for key in ("head_dim", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(reloaded.config, key) == getattr(reference.config, key), key
    assert (
        reloaded.config.rope_parameters["rope_theta"]
        == reference.config.rope_parameters["rope_theta"]
    )
    with torch.no_grad():
        assert torch.equal(reloaded(tokens()).logits, reference(tokens()).logits)


def test_a_tied_folder_with_a_redundant_lm_head_loads(tmp_path):
    """Qwen/Qwen3-0.6B and -1.7B store lm_head.weight although it is tied to the embedding."""
    from safetensors.torch import load_file, save_file

    reference = random_qwen3(qwen3_config(**CASES["gqa-tied-wide-heads"]))
    reference.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with torch.no_grad():
        assert (
            relative_error(load_pretrained(tmp_path)(tokens()), reference(tokens()).logits) < 1e-5
        )


# config.json of Qwen/Qwen3-0.6B and Qwen/Qwen3-8B (the keys that matter).
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "attention_bias": False,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN3_8B = {
    **QWEN3_06B,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "tie_word_embeddings": False,
}


@pytest.mark.parametrize(("config", "flavor"), [(QWEN3_06B, "0.6B"), (QWEN3_8B, "8B")])
def test_real_qwen3_configs_map_to_their_flavors(config, flavor):
    adapter = train_spec.state_dict_adapter
    args = adapter.args_from_hf_config(config)
    assert args == QWEN3_FLAVORS[flavor]
    # transformers 5 spells RoPE as rope_parameters with rope_theta inside; same args.
    v5 = {k: v for k, v in config.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    assert adapter.args_from_hf_config(v5) == args
    written = adapter.hf_config(args, torch.bfloat16)
    assert {k: written[k] for k in config} == config
    expected = adapter.expected_hf(args)
    assert ("lm_head.weight" in expected) == (not config["tie_word_embeddings"])
    assert expected["model.layers.0.self_attn.q_norm.weight"] == (128,)
    assert expected["model.layers.0.self_attn.q_proj.weight"] == (
        config["num_attention_heads"] * 128,
        config["hidden_size"],
    )


def test_hf_config_round_trips_every_flavor():
    """Exactly for dense flavors; an MoE flavor's expert-bias rate (a training setting
    config.json has no key for) comes back None, the same flavor."""
    from titan_core.hf import flavor_name

    adapter = train_spec.state_dict_adapter
    for name, args in QWEN3_FLAVORS.items():
        back = adapter.args_from_hf_config(adapter.hf_config(args))
        assert flavor_name(train_spec, back) == name
        if args.moe is None:
            assert back == args
        else:
            assert back.moe.load_balance_coeff is None
            assert (
                dataclasses.replace(back.moe, load_balance_coeff=args.moe.load_balance_coeff)
                == args.moe
            )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attention_bias": True}, "'attention_bias' is True"),
        ({"use_sliding_window": True}, "'use_sliding_window' is True"),
        ({"layer_types": ["sliding_attention"] * 28}, "'layer_types'"),
        ({"hidden_act": "gelu"}, "'hidden_act' is 'gelu'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
        ({"intermediate_size": None}, "'intermediate_size' is missing; a Qwen3 config"),
        ({"num_attention_heads": "16"}, "'num_attention_heads' is '16', expected int"),
    ],
)
def test_unsupported_configs_are_refused_naming_the_key(change, message):
    with pytest.raises(UserError, match=message):
        train_spec.state_dict_adapter.args_from_hf_config({**QWEN3_06B, **change})


# ---- training --------------------------------------------------------------------------------

Q = ["--model.name", "qwen3"]


def tiny_hf_folder(folder, tie: bool):
    """A random Qwen3 with the embedded tokenizer's vocabulary, saved as an HF folder."""
    shape = {**CASES["gqa-tied-wide-heads"], "tie_word_embeddings": tie, "intermediate_size": 96}
    config = qwen3_config(**shape, vocab_size=2048, max_position_embeddings=256)
    random_qwen3(config, seed=2).save_pretrained(folder)
    return folder


def hf_run_args(hf_dir, dump):
    return [
        *FAST, *Q, "--checkpoint.initial_load_path", str(hf_dir),
        "--checkpoint.initial_load_in_hf", "--training.global_batch_size", "8",
        "--model.hf_assets_path", "embedded", "--job.dump_folder", str(dump),
    ]  # fmt: skip


def first_batch_hf_loss(hf_dir, tmp_path) -> float:
    """transformers' loss on the batch titan's step 1 trains on."""
    from titan_core.config import build_config
    from titan_core.trainer import Trainer

    args = [*hf_run_args(hf_dir, tmp_path / "ref"), "--training.local_batch_size", "8"]
    [(inputs, labels)] = Trainer(build_config(args)).loader.next_batch()
    model = transformers.Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(inputs).logits
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_trainer_loads_hf_weights_with_transformers_loss(tmp_path, tie):
    """--checkpoint.initial_load_in_hf: the model comes from config.json, the weights through
    the adapter; the trainer's first loss is transformers' on the same batch."""
    from titan_core.train import run

    hf_dir = tiny_hf_folder(tmp_path / "hf", tie)
    expected = first_batch_hf_loss(hf_dir, tmp_path)
    dump = tmp_path / "run"
    run([*hf_run_args(hf_dir, dump), "--training.local_batch_size", "8", "--training.steps", "2"])
    assert losses(dump)[0] == pytest.approx(expected, rel=1e-5, abs=0)


@pytest.mark.slow
def test_debugmodel_learns_on_embedded_data(tmp_path):
    from titan_core.train import run

    dump = tmp_path / "run"
    args = ["--training.steps", "20", "--training.seq_len", "64", "--metrics.log_freq", "1"]
    run([*Q, *args, "--metrics.no_enable_tensorboard", "--job.dump_folder", str(dump)])
    records = read_metrics(dump)
    assert [r["step"] for r in records] == list(range(1, 21))
    assert records[0]["loss"] - records[-1]["loss"] > 0.5


# ---- parallel layouts (torchrun, gloo on CPU) ------------------------------------------------

P = "--parallelism."
LAYOUTS = {
    "fsdp4": ["--training.local_batch_size", "2"],
    "tp2-fsdp2": [f"{P}tensor_parallel_degree", "2", "--training.local_batch_size", "4"],
    "pp2-fsdp2": [
        f"{P}pipeline_parallel_degree", "2", "--training.local_batch_size", "4",
        f"{P}pipeline_parallel_microbatch_size", "2",
    ],
    "cp2-fsdp2": [f"{P}context_parallel_degree", "2", "--training.local_batch_size", "4"],
}  # fmt: skip


@pytest.fixture(scope="module")
def qwen3_reference_losses(tmp_path_factory):
    """One-process loss curve of qwen3 debugmodel (FAST settings, global batch 8)."""
    dump = tmp_path_factory.mktemp("qwen3-reference")
    args = [*FAST, *Q, "--training.global_batch_size", "8", "--training.local_batch_size", "8"]
    proc = run_cli([*args, "--job.dump_folder", str(dump)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = losses(dump)
    assert len(curve) == 8 and curve[0] - curve[-1] > 0.2  # it learns, so a frozen model fails
    return curve


@pytest.mark.distributed
@pytest.mark.parametrize("extra", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_layout_matches_single_process(tmp_path, qwen3_reference_losses, extra):
    args = [*FAST, *Q, "--training.global_batch_size", "8", *extra]
    proc = run_cli([*args, "--job.dump_folder", str(tmp_path)], nproc=4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert losses(tmp_path) == pytest.approx(qwen3_reference_losses, rel=1e-5, abs=0)


@pytest.mark.distributed
def test_qk_norm_gradients_under_tensor_parallel_match_one_device():
    """The loss curve barely moves when the q/k norms train a different scale per TP rank, so
    their gradients are checked directly (with a negative control)."""
    worker = REPO / "tests" / "dist_scripts" / "qk_norm_tp_check.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [*cmd, str(worker)], capture_output=True, text=True, timeout=120, env=env, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.strip().splitlines()[-1] == "OK"


@pytest.mark.distributed
def test_hf_weights_load_under_tp2_fsdp2(tmp_path):
    """Each rank reads its shards of q/k (whole heads, permuted) and the replicated norms."""
    hf_dir = tiny_hf_folder(tmp_path / "hf", tie=False)
    expected = first_batch_hf_loss(hf_dir, tmp_path)
    extra = [f"{P}tensor_parallel_degree", "2", "--training.local_batch_size", "4"]
    dump = tmp_path / "run"
    proc = run_cli([*hf_run_args(hf_dir, dump), *extra, "--training.steps", "2"], nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(dump)[0] == pytest.approx(expected, rel=1e-5, abs=0)
