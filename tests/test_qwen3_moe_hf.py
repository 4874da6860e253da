"""Qwen3-MoE against transformers' Qwen3MoeForCausalLM: logits, the auxiliary loss, conversion
both ways, ``verify``, and the memory bound of the streaming HF drivers.

The reference is ``transformers`` on tiny random ``Qwen3MoeConfig``s (fp32, CPU): its logits and
``aux_loss`` on the same weights, and the per-expert safetensors its ``save_pretrained`` writes
(the hub layout; in memory transformers 5 fuses the experts, so files are compared with files
and ``from_pretrained`` models with ``from_pretrained`` models).
"""

from __future__ import annotations

import json
import sys
import weakref
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file

from titan_convert.cli import main
from titan_core import load_pretrained
from titan_core.errors import UserError
from titan_core.hf import HFReader, flavor_name, read_titan_tensor
from titan_core.hf_keys import DECODER_KEY_MAP, MOE_KEY_MAP, compile_key_map
from titan_core.models.moe import MoE, MoEArgs, load_balancing_loss
from titan_llama3 import Llama3StateDictAdapter
from titan_qwen3 import QWEN3_FLAVORS, Qwen3StateDictAdapter, Qwen3Transformer, train_spec

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 96, 24
CASES = {
    # every layer sparse; renormalised top-2 of 4
    "e4-top2-norm": dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
    # every second layer sparse (1 and 3), top-3 of 8 not renormalised
    "e8-top3-step2": dict(
        num_experts=8, num_experts_per_tok=3, decoder_sparse_step=2, num_hidden_layers=4
    ),
    # mlp_only_layers makes 0 and 2 dense; top-1; tied embeddings
    "e6-top1-mlp-only-tied": dict(
        num_experts=6, num_experts_per_tok=1, mlp_only_layers=[0, 2], tie_word_embeddings=True
    ),
    # both rules at once (step 2: 1 and 3 sparse, 3 dense by mlp_only_layers); every expert
    # picked (top-k = E), renormalised
    "e5-top5-norm-step2-mlp-only": dict(
        num_experts=5,
        num_experts_per_tok=5,
        norm_topk_prob=True,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
        num_hidden_layers=4,
        router_aux_loss_coef=0.0,
    ),
}


def moe_config(**changes):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,
        moe_intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        router_aux_loss_coef=0.02,
        initializer_range=0.1,
    )
    return transformers.Qwen3MoeConfig(**{**base, **changes})


def random_qwen3_moe(config, seed=0):
    """A Qwen3MoeForCausalLM with random weights: norm scales away from 1 (so a misordered
    q/k norm shows), and routers of std 1, so routing is peaked and no two experts' scores are
    near a tie a float32 rounding could flip."""
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 1.0)
    return model


def tokens(seed=1):
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def assert_logits_close(actual, expected):
    """1e-5 relative, elementwise; a logit near zero is held to 1e-5 of the largest logit
    instead (float32 sums in another order differ by a few ulps of the values summed, which
    are of the logits' scale, not of one small logit's)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def convert(*argv):
    return main([str(a) for a in argv])


def is_sparse(config, layer):
    return layer not in config.mlp_only_layers and (layer + 1) % config.decoder_sparse_step == 0


@pytest.fixture(scope="module", params=list(CASES))
def hf_moe(request, tmp_path_factory):
    """(case name, the reference model, its save_pretrained folder)."""
    model = random_qwen3_moe(moe_config(**CASES[request.param]))
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(folder)
    return request.param, model, folder


# ---- parity with transformers ---------------------------------------------------------------


def test_load_pretrained_gives_transformers_logits(hf_moe):
    _, reference, folder = hf_moe
    config = reference.config
    model = load_pretrained(folder)  # found from model_type qwen3_moe
    assert isinstance(model, Qwen3Transformer)
    moe = model.args.moe
    assert (moe.num_experts, moe.top_k, moe.hidden_dim, moe.norm_topk_prob) == (
        config.num_experts,
        config.num_experts_per_tok,
        config.moe_intermediate_size,
        config.norm_topk_prob,
    )
    assert moe.aux_loss_coef == config.router_aux_loss_coef and moe.load_balance_coeff is None
    for i, layer in model.layers.items():
        sparse = is_sparse(config, int(i))
        assert isinstance(layer.ffn, MoE) == sparse, i
        assert sparse == isinstance(
            reference.model.layers[int(i)].mlp,
            transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock,
        )
    with torch.no_grad():
        assert_logits_close(model(tokens()), reference(tokens()).logits)


def test_aux_loss_equals_transformers(hf_moe):
    """transformers returns the unweighted loss as ``aux_loss`` and adds
    ``router_aux_loss_coef * aux_loss`` to ``loss``; titan's ``load_balancing_loss`` is the
    former, and its coefficient the latter's."""
    _, reference, folder = hf_moe
    model = load_pretrained(folder)
    batch = tokens(seed=2)
    with torch.no_grad():
        with_aux = reference(batch, labels=batch, output_router_logits=True)
        without = reference(batch, labels=batch)
        model(batch)
    aux = load_balancing_loss([m for m in model.modules() if isinstance(m, MoE)])
    torch.testing.assert_close(aux, with_aux.aux_loss, rtol=1e-5, atol=0.0)
    coef = model.args.moe.aux_loss_coef
    # the difference of two ~4.5 losses carries their float32 rounding (~5e-7)
    torch.testing.assert_close(with_aux.loss - without.loss, coef * aux, rtol=0.0, atol=2e-6)


def test_hf_to_titan_to_hf_round_trip_is_bit_identical(hf_moe, tmp_path):
    _, reference, hf_dir = hf_moe
    assert convert("hf-to-dcp", hf_dir, tmp_path / "dcp") == 0
    meta = json.loads((tmp_path / "dcp" / "titan.json").read_text())
    assert (meta["model"], meta["flavor"]) == ("qwen3", "custom")
    assert meta["model_args"]["moe"]["num_experts"] == reference.config.num_experts
    dcp_model = load_pretrained(tmp_path / "dcp")
    for name, buffer in dcp_model.state_dict().items():
        if name.endswith("expert_bias"):  # Qwen3-MoE has none: zeros
            assert not buffer.any(), name
    with torch.no_grad():
        assert torch.equal(dcp_model(tokens()), load_pretrained(hf_dir)(tokens()))

    assert convert("dcp-to-hf", tmp_path / "dcp", tmp_path / "out") == 0
    out = tmp_path / "out"
    original = load_file(hf_dir / "model.safetensors")  # per-expert keys, as the hub
    exported = {}
    for shard in sorted(out.glob("*.safetensors")):
        exported.update(load_file(shard))
    assert exported.keys() == original.keys()
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in exported)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key

    written = json.loads((out / "config.json").read_text())
    assert (written["model_type"], written["architectures"]) == (
        "qwen3_moe",
        ["Qwen3MoeForCausalLM"],
    )
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is transformers.Qwen3MoeForCausalLM
    for key in (
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "norm_topk_prob",
        "decoder_sparse_step",
        "mlp_only_layers",
        "router_aux_loss_coef",
        "intermediate_size",
        "tie_word_embeddings",
    ):
        assert getattr(reloaded.config, key) == getattr(reference.config, key), key
    with torch.no_grad():
        assert torch.equal(reloaded(tokens()).logits, reference(tokens()).logits)


def test_verify_passes_and_catches_experts_in_the_wrong_order(hf_moe, capsys, monkeypatch):
    name, _, hf_dir = hf_moe
    assert convert("verify", hf_dir) == 0
    assert "OK" in capsys.readouterr().out
    if name != "e4-top2-norm":
        return
    # Expert j's weights loaded as another expert's: shapes fit, logits do not.
    unchanged = Qwen3StateDictAdapter.from_hf

    def reversed_experts(self, args, titan_name, tensor):
        tensor = unchanged(self, args, titan_name, tensor)
        return tensor.flip(0) if self.is_stacked(titan_name) else tensor

    monkeypatch.setattr(Qwen3StateDictAdapter, "from_hf", reversed_experts)
    assert convert("verify", hf_dir) == 1
    assert "FAILED" in capsys.readouterr().out


def test_stacked_reads_of_expert_and_column_ranges_match_the_full_tensor(hf_moe):
    """What a sharded loader (EP/FSDP rows = experts, TP columns) asks for."""
    _, _, hf_dir = hf_moe
    adapter = train_spec.state_dict_adapter
    args = adapter.args_from_hf_folder(hf_dir)
    reader = HFReader(hf_dir)
    layer = next(i for i in range(args.n_layers) if args.is_moe_layer(i))
    experts = args.moe.num_experts
    for weight, hf in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
        name = f"layers.{layer}.moe.experts.{weight}"
        full = read_titan_tensor(reader, adapter, args, name)
        per_expert = [reader.read(f"model.layers.{layer}.mlp.experts.{j}.{hf}.weight")
                      for j in range(experts)]  # fmt: skip
        assert torch.equal(full, torch.stack(per_expert))
        for rows in (slice(0, 1), slice(1, experts), slice(experts - 2, None)):
            assert torch.equal(read_titan_tensor(reader, adapter, args, name, rows), full[rows])
            part = read_titan_tensor(reader, adapter, args, name, rows, slice(3, 11))
            assert torch.equal(part, full[rows, 3:11])
    bias = f"layers.{layer}.moe.expert_bias"
    assert adapter.hf_names(args, bias) == []
    assert torch.equal(read_titan_tensor(reader, adapter, args, bias), torch.zeros(experts))


# ---- the streaming drivers hold one layer's experts at most ------------------------------------


class LiveTensors:
    """Wraps a function returning tensors; at each call, the bytes of the tensors it returned
    that are still alive (the new one included), and their peak."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []
        self.calls = 0
        self.peak = 0

    def alive(self) -> int:
        alive = {id(t): t.nbytes for ref in self.refs if (t := ref()) is not None}
        return sum(alive.values())

    def note(self, tensor: torch.Tensor) -> None:
        self.calls += 1
        self.refs.append(weakref.ref(tensor))
        self.peak = max(self.peak, self.alive())

    def wrap(self, fn):
        def watched(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.note(out)
            return out

        return watched


@pytest.fixture(scope="module")
def deep_moe(tmp_path_factory):
    """An HF folder of 6 sparse layers whose experts outweigh everything else: one layer's
    experts are under a sixth of the model."""
    config = moe_config(num_hidden_layers=6, num_experts=8, num_experts_per_tok=2,
                        moe_intermediate_size=64)  # fmt: skip
    folder = tmp_path_factory.mktemp("deep") / "hf"
    random_qwen3_moe(config).save_pretrained(folder)  # the reference is not kept alive
    adapter = train_spec.state_dict_adapter
    args = adapter.args_from_hf_folder(folder)
    shapes = adapter.titan_shapes(args)
    nbytes = {n: torch.Size(s).numel() * 4 for n, s in shapes.items()}
    layer = sum(b for n, b in nbytes.items() if n.startswith("layers.0.moe.experts."))
    assert sum(nbytes.values()) > 5 * layer
    return folder, args, layer


def watch_reads(monkeypatch) -> LiveTensors:
    """Every driver reads titan tensors through read_titan_tensor: watch them all."""
    import titan_convert.hf_to_dcp  # noqa: F401 (loaded, so sys.modules has it)
    import titan_core.hf
    import titan_core.hf_load
    import titan_core.pretrained

    watch = LiveTensors()
    watched = watch.wrap(titan_core.hf.read_titan_tensor)
    # NOTE: titan_convert.hf_to_dcp is also the name of a function the package exports.
    drivers = ("titan_core.hf", "titan_core.hf_load", "titan_core.pretrained",
               "titan_convert.hf_to_dcp")  # fmt: skip
    for module in drivers:
        monkeypatch.setattr(sys.modules[module], "read_titan_tensor", watched, raising=False)
    return watch


def test_the_watch_sees_a_driver_that_materialises_the_model(deep_moe, monkeypatch):
    """The check below must fail for a driver that reads the whole model before storing it."""
    folder, args, layer = deep_moe
    watch = watch_reads(monkeypatch)
    import titan_core.hf

    adapter, reader = train_spec.state_dict_adapter, HFReader(folder)
    everything = {n: titan_core.hf.read_titan_tensor(reader, adapter, args, n)
                  for n in adapter.titan_shapes(args)}  # fmt: skip
    assert watch.peak > 5 * layer and len(everything) == watch.calls


def test_streaming_drivers_hold_one_layers_experts_at_most(deep_moe, tmp_path, monkeypatch):
    from titan_core.hf_load import load_hf_weights
    from titan_core.pretrained import build_model

    folder, args, layer = deep_moe
    names = len(train_spec.state_dict_adapter.titan_shapes(args))

    watch = watch_reads(monkeypatch)
    assert convert("hf-to-dcp", folder, tmp_path / "dcp") == 0
    assert watch.calls >= names - 1 and 0 < watch.peak <= layer  # (a tied twin is read once)

    watch = watch_reads(monkeypatch)
    model = load_pretrained(folder)
    assert watch.calls >= names - 1 and 0 < watch.peak <= layer

    watch = watch_reads(monkeypatch)  # the trainer's checkpoint.initial_load_in_hf
    trainer = SimpleNamespace(spec=train_spec, model_args=args,
                              model_parts=[build_model(train_spec, args, "cpu")])  # fmt: skip
    load_hf_weights(trainer, folder)
    assert watch.calls >= names - 1 and 0 < watch.peak <= layer
    for (name, loaded), (_, expected) in zip(
        trainer.model_parts[0].state_dict().items(), model.state_dict().items(), strict=True
    ):
        assert torch.equal(loaded, expected), name

    # Writing: each titan tensor is split into its HF tensors (views of it) as it is written.
    from titan_core.safetensors_io import HFWriter

    writes = LiveTensors()
    write = HFWriter.write

    def watched_write(self, name, tensor):
        writes.note(tensor if tensor._base is None else tensor._base)
        write(self, name, tensor)

    monkeypatch.setattr(HFWriter, "write", watched_write)
    assert convert("dcp-to-hf", tmp_path / "dcp", tmp_path / "out") == 0
    assert writes.calls == len(HFReader(folder).keys()) and 0 < writes.peak <= layer


# ---- config.json ---------------------------------------------------------------------------

# config.json of Qwen/Qwen3-30B-A3B (the keys that matter).
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "attention_bias": False,
    "decoder_sparse_step": 1,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN3_235B_A22B = {
    **QWEN3_30B_A3B,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_attention_heads": 64,
    "num_hidden_layers": 94,
}


@pytest.mark.parametrize(
    ("config", "flavor"), [(QWEN3_30B_A3B, "30B-A3B"), (QWEN3_235B_A22B, "235B-A22B")]
)
def test_real_qwen3_moe_configs_map_to_their_flavors(config, flavor):
    adapter = train_spec.state_dict_adapter
    args = adapter.args_from_hf_config(config)
    assert flavor_name(train_spec, args) == flavor
    # transformers 5 writes num_local_experts for num_experts
    v5 = {k: v for k, v in config.items() if k != "num_experts"}
    assert adapter.args_from_hf_config({**v5, "num_local_experts": 128}) == args
    written = adapter.hf_config(args, torch.bfloat16)
    assert {k: written[k] for k in config} == config
    expected = adapter.expected_hf(args)
    assert expected["model.layers.0.mlp.gate.weight"] == (128, config["hidden_size"])
    assert expected["model.layers.47.mlp.experts.127.down_proj.weight"] == (
        config["hidden_size"],
        config["moe_intermediate_size"],
    )
    assert not any(".mlp.gate_proj." in k or "expert_bias" in k for k in expected)


def test_a_flavor_matches_whatever_its_training_settings():
    """Flavors are shapes: MoE load balancing settings are not part of the match."""
    flavor = QWEN3_FLAVORS["debugmodel_moe"]
    adapter = train_spec.state_dict_adapter
    args = adapter.args_from_hf_config(adapter.hf_config(flavor))
    assert args.moe.load_balance_coeff is None and flavor.moe.load_balance_coeff is not None
    assert flavor_name(train_spec, args) == "debugmodel_moe"
    other = MoEArgs(**{**vars(args.moe), "top_k": 3})
    assert flavor_name(train_spec, type(args)(**{**vars(args), "moe": other})) == "custom"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_experts_per_tok": 129}, "'num_experts_per_tok' 129 is larger than 'num_experts'"),
        ({"num_local_experts": 64}, "'num_experts' 128 and 'num_local_experts' 64 differ"),
        ({"num_experts": None}, "'num_experts' is missing"),
        ({"num_experts": 0}, "'num_experts' is 0, expected a positive int"),
        ({"moe_intermediate_size": None}, "'moe_intermediate_size' is missing"),
        ({"router_aux_loss_coef": -0.1}, "'router_aux_loss_coef' is -0.1, expected a number"),
        ({"mlp_only_layers": [0, "1"]}, "'mlp_only_layers' is"),
        ({"decoder_sparse_step": 0}, "'decoder_sparse_step' is 0"),
        ({"norm_topk_prob": "yes"}, "'norm_topk_prob' is 'yes', expected bool"),
    ],
)
def test_unsupported_moe_configs_are_refused_naming_the_key(change, message):
    with pytest.raises(UserError, match=message):
        train_spec.state_dict_adapter.args_from_hf_config({**QWEN3_30B_A3B, **change})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"score_func": "sigmoid"}, "score_func"),
        ({"num_shared_experts": 1}, "num_shared_experts"),
        ({"route_scale": 2.5}, "route_scale"),
        ({"n_group": 2, "topk_group": 1}, "n_group"),
    ],
)
def test_moe_args_qwen3_moe_cannot_express_are_refused_before_export(change, field):
    args = QWEN3_FLAVORS["debugmodel_moe"]
    moe = MoEArgs(**{**vars(args.moe), **change})
    with pytest.raises(UserError, match=f"model_args.moe.{field} is"):
        train_spec.state_dict_adapter.hf_config(type(args)(**{**vars(args), "moe": moe}))


# ---- the adapter seam ------------------------------------------------------------------------


def test_the_decoder_key_map_is_written_once_and_families_extend_it():
    assert Llama3StateDictAdapter.key_map is DECODER_KEY_MAP
    qwen3 = Qwen3StateDictAdapter.key_map
    assert {k: qwen3[k] for k in DECODER_KEY_MAP} == DECODER_KEY_MAP
    assert {k: qwen3[k] for k in MOE_KEY_MAP} == MOE_KEY_MAP
    assert qwen3["layers.{}.moe.expert_bias"] is None


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"layers.{expert}.w": "x.{expert}"}, "titan side may hold only {}"),
        ({"layers.{}.w": "x.{}.{j}"}, "HF side may hold only"),
        ({"layers.{}.w": "x.{expert}.{expert}.{}"}, "appears twice"),
        ({"layers.{}.w": "x.w"}, "both sides or on neither"),
        ({"w": "layers.{}.w"}, "both sides or on neither"),
    ],
)
def test_bad_key_templates_are_refused_when_the_adapter_is_made(entry, problem):
    with pytest.raises(ValueError, match=problem):
        compile_key_map(entry)


def test_a_family_declares_a_stacked_entry_with_an_expert_placeholder(tmp_path):
    """A stacked entry reads E HF tensors into one titan tensor and writes it back as E."""
    from safetensors.torch import save_file

    class Stack(torch.nn.Module):
        def __init__(self, args):
            super().__init__()
            blocks = {str(i): torch.nn.ParameterDict() for i in range(args.n_layers)}
            for block in blocks.values():
                block["w"] = torch.nn.Parameter(torch.empty(3, 4, 2))  # (E, rows, cols)
            self.layers = torch.nn.ModuleDict(blocks)

    class StackAdapter(Qwen3StateDictAdapter):
        model_cls = Stack
        key_map: ClassVar[dict[str, str]] = {"layers.{}.w": "blocks.{}.experts.{expert}.weight"}

    adapter = StackAdapter()
    args = SimpleNamespace(n_layers=2, head_dim=2)
    tensors = {
        f"blocks.{i}.experts.{j}.weight": torch.randn(4, 2) for i in range(2) for j in range(3)
    }
    save_file(tensors, tmp_path / "model.safetensors")
    assert adapter.expected_hf(args) == {k: (4, 2) for k in tensors}
    reader = HFReader(tmp_path)
    stacked = read_titan_tensor(reader, adapter, args, "layers.1.w")
    assert torch.equal(
        stacked, torch.stack([tensors[f"blocks.1.experts.{j}.weight"] for j in range(3)])
    )
    back = dict(adapter.to_hf(args, "layers.1.w", stacked))
    assert back.keys() == {f"blocks.1.experts.{j}.weight" for j in range(3)}
    for key, tensor in back.items():
        assert torch.equal(tensor, tensors[key]) and tensor.data_ptr() >= stacked.data_ptr()
