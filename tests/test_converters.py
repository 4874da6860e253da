"""Model converters (Float8/MX through torchao): config sections, registry, filters, hardware
rules, TP styles and checkpoint tensors; all in one process, on meta or tiny models."""

from __future__ import annotations

import logging
import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest
import torch
from torch import nn

from helpers import FLOAT8_TOML
from titan_core.checkpoint_files import plain_tensor
from titan_core.config import JobConfig, build_config, help_text, load_toml, to_toml
from titan_core.errors import UserError
from titan_core.quantize import apply_converters, build_converters, converters, torchao_support
from titan_core.quantize.converters import warn_unused_sections
from titan_core.quantize.linear_filter import LinearFilter
from titan_core.train_spec import get_train_spec

CPU = torch.device("cpu")


def toml_config(tmp_path, text: str) -> JobConfig:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return build_config(["--job.config_file", str(path)])


def meta_llama() -> nn.Module:
    spec = get_train_spec("llama3")
    with torch.device("meta"):
        return spec.model_cls(spec.flavors["debugmodel"])


# ---- config ---------------------------------------------------------------------------


def test_torchtitan_float8_toml_and_flags_load(tmp_path):
    c = toml_config(tmp_path, FLOAT8_TOML)
    f8 = c.quantize.linear.float8
    assert c.model.converters == ["quantize.linear.float8"]
    assert f8.enable_fsdp_float8_all_gather and f8.precompute_float8_dynamic_scale_for_fsdp
    assert f8.filter_fqns == ["output"] and c.compile.enable
    flags = build_config(
        [
            '--model.converters="quantize.linear.float8"'.replace('"', ""),
            "--quantize.linear.float8.enable_fsdp_float8_all_gather",
            "--compile.enable",
            "--quantize.grouped_mm.mx.fqns",
            "experts,shared",
        ]
    )
    assert flags.model.converters == ["quantize.linear.float8"]
    assert flags.quantize.linear.float8.enable_fsdp_float8_all_gather
    assert flags.quantize.grouped_mm.mx.fqns == ["experts", "shared"]


def test_nested_sections_round_trip_and_appear_in_help(tmp_path):
    c = toml_config(
        tmp_path, FLOAT8_TOML + '[quantize.linear.mx]\nrecipe_name = "mxfp8_emulated_rceil"\n'
    )
    text = to_toml(c)
    assert "[quantize.linear.float8]" in text and "[quantize.grouped_mm.mx]" in text
    again = JobConfig()
    (tmp_path / "again.toml").write_text(text)
    load_toml(again, str(tmp_path / "again.toml"))
    assert again == c
    for key in (
        "--quantize.linear.float8.recipe_name",
        "--quantize.linear.float8.emulate",
        "--quantize.linear.mx.filter_fqns",
        "--quantize.grouped_mm.float8.fqns",
        "--quantize.grouped_mm.mx.recipe_name",
    ):
        assert key in help_text()


@pytest.mark.parametrize(
    "text, named",
    [
        ("[quantize.linear.float8]\nemulat = true\n", "quantize.linear.float8.emulat"),
        ("[quantize.linear.float9]\nemulate = true\n", "quantize.linear.float9"),
        ('[quantize.linear.float8]\nrecipe_name = "colwise"\n', "recipe_name"),
        ("[quantize]\nlinear = 3\n", "quantize.linear"),
    ],
)
def test_bad_nested_keys_are_named(tmp_path, text, named):
    with pytest.raises(UserError, match=named.replace(".", r"\.")):
        toml_config(tmp_path, text)


def test_bad_nested_flag_is_named():
    with pytest.raises(UserError, match=r"quantize\.linear\.float8\.emulat\b"):
        build_config(["--quantize.linear.float8.emulat"])


# ---- registry -------------------------------------------------------------------------


def test_float8_alias_and_refusals():
    c = build_config(["--model.converters", "float8", "--quantize.linear.float8.emulate"])
    [conv] = build_converters(c, CPU)
    assert conv.name == "quantize.linear.float8"
    for names, match in [
        ("float9", "unknown converter 'float9'; available: .*quantize.linear.float8"),
        ("float8,quantize.linear.float8", "listed twice"),
        ("float8,mx", "both rewrite the Linear layers"),
    ]:
        with pytest.raises(UserError, match=match):
            build_converters(build_config(["--model.converters", names]), CPU)


def test_settings_that_cannot_work_are_refused():
    cases = [
        (["--quantize.linear.float8.recipe_name", "rowwise",
          "--quantize.linear.float8.enable_fsdp_float8_all_gather"], "only the tensorwise"),
        (["--quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp"],
         "needs enable_fsdp_float8_all_gather"),
    ]  # fmt: skip
    for flags, match in cases:
        c = build_config(["--model.converters", "float8", *flags])
        with pytest.raises(UserError, match=match):
            build_converters(c, CPU)
    c = build_config(["--model.converters", "quantize.grouped_mm.mx"])
    with pytest.raises(UserError, match="fqns is empty"):
        build_converters(c, CPU)


def test_entry_point_converter_is_found(tmp_path, monkeypatch):
    (tmp_path / "my_converter.py").write_text(
        textwrap.dedent(
            """
            from titan_core.quantize import ModelConverter

            class Halve(ModelConverter):
                name = "halve"
                def __init__(self, config, device):
                    pass
                def convert(self, model):
                    return "halve: nothing to do"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = EntryPoint("halve", "my_converter:Halve", converters.ENTRY_POINT_GROUP)
    monkeypatch.setattr(converters, "entry_points", lambda group: [ep])
    [conv] = build_converters(build_config(["--model.converters", "halve"]), CPU)
    assert type(conv).__name__ == "Halve"
    sys.modules.pop("my_converter", None)


def test_unused_section_is_a_warning_not_silence(caplog):
    c = build_config(["--quantize.linear.float8.filter_fqns", "output"])
    with caplog.at_level(logging.WARNING, logger="titan"):
        warn_unused_sections(c)
    assert "[quantize.linear.float8] sets filter_fqns" in caplog.text


# ---- what is converted ----------------------------------------------------------------


def test_filter_reasons():
    model = nn.ModuleDict(
        {
            "big": nn.Linear(4096, 2048),
            "small": nn.Linear(64, 64),
            "odd": nn.Linear(64, 24),
            "output": nn.Linear(64, 64),
        }
    )
    keep = LinearFilter(["output", "auto_filter_small_kn"], "tensorwise")
    decisions = {name: keep(m, name) for name, m in model.items()}
    assert decisions == {"big": True, "small": False, "odd": False, "output": False}
    assert keep.selection.skipped == {
        "small": "64x64 small (auto_filter_small_kn)",
        "odd": "24x64 not a multiple of 16",
        "output": "filter_fqns",
    }
    rowwise = LinearFilter(["auto_filter_small_kn"], "rowwise")
    assert not rowwise(nn.Linear(4096, 2048), "big")  # rowwise gains only from N > 2048


def test_float8_converts_the_debug_model_and_logs_it(caplog):
    c = build_config(
        ["--model.converters", "float8", "--quantize.linear.float8.emulate",
         "--quantize.linear.float8.filter_fqns", "output,layers.0.attention"]
    )  # fmt: skip
    model = meta_llama()
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    with caplog.at_level(logging.INFO, logger="titan"):
        apply_converters(model, build_converters(c, CPU))
    from torchao.float8.float8_linear import Float8Linear

    converted = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    assert len(converted) == linears - 5  # output, layers.0.attention.w{q,k,v,o}
    assert "layers.0.attention.wq" not in converted and "layers.1.attention.wq" in converted
    assert f"converted {linears - 5} Linear layers; skipped 5: " in caplog.text
    assert "output (filter_fqns)" in caplog.text


def test_state_dict_keys_do_not_change():
    before = set(meta_llama().state_dict())
    for flags in (
        ["float8", "--quantize.linear.float8.emulate",
         "--quantize.linear.float8.enable_fsdp_float8_all_gather"],
        ["mx", "--quantize.linear.mx.recipe_name", "mxfp8_emulated_rceil"],
    ):  # fmt: skip
        model = meta_llama()
        apply_converters(model, build_converters(build_config(["--model.converters", *flags]), CPU))
        assert set(model.state_dict()) == before


def test_checkpoint_tensors_are_the_plain_weights():
    c = build_config(
        ["--model.converters", "float8", "--quantize.linear.float8.emulate",
         "--quantize.linear.float8.enable_fsdp_float8_all_gather"]
    )  # fmt: skip
    layer = nn.Sequential(nn.Linear(32, 32))
    apply_converters(layer, build_converters(c, CPU))
    weight = layer.state_dict()["0.weight"]
    assert type(weight) is not torch.Tensor  # torchao's float8 all-gather wrapper
    plain = plain_tensor(weight)
    assert type(plain) in (torch.Tensor, nn.Parameter) and plain.dtype == torch.float32
    with torch.no_grad():
        plain.fill_(0.5)  # shares storage: a checkpoint loads into the parameter in place
    assert torch.all(layer[0].weight.detach() == 0.5)


# ---- hardware -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, capability, match",
    [
        (["float8"], (8, 0), r"capability >= 8\.9, but .* has 8\.0; .*emulate = true"),
        (["mx"], (9, 0), r"capability >= 10\.0, but .* has 9\.0; .*mxfp8_emulated_rceil"),
        (["quantize.grouped_mm.float8", "--quantize.grouped_mm.float8.fqns", "experts"],
         (8, 9), r"capability >= 9\.0"),
    ],
)  # fmt: skip
def test_old_gpus_are_refused(monkeypatch, flags, capability, match):
    monkeypatch.setattr(torchao_support, "cuda_capability", lambda device: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "FakeGPU")
    c = build_config(["--model.converters", *flags])
    with pytest.raises(UserError, match=match):
        build_converters(c, torch.device("cuda"))


def test_emulation_needs_no_capability(monkeypatch):
    monkeypatch.setattr(torchao_support, "cuda_capability", lambda device: (7, 0))
    c = build_config(["--model.converters", "float8", "--quantize.linear.float8.emulate"])
    assert build_converters(c, torch.device("cuda"))


def test_cpu_refusals_name_the_cpu_path():
    c = build_config(["--model.converters", "mx"])
    with pytest.raises(UserError, match="on CPU use recipe_name mxfp8_emulated_rceil"):
        build_converters(c, CPU)
    c = build_config(
        ["--model.converters", "quantize.grouped_mm.float8",
         "--quantize.grouped_mm.float8.fqns", "experts"]
    )  # fmt: skip
    with pytest.raises(UserError, match=r"CUDA only .* quantize\.grouped_mm\.mx"):
        build_converters(c, CPU)


def test_tp_styles_are_float8_only_on_cuda_tensorwise():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    from torchao.float8.float8_tensor_parallel import Float8ColwiseParallel, Float8RowwiseParallel

    from titan_core.parallel.decoder import dense_tp_plan

    model = meta_llama()
    c = build_config(
        ["--model.converters", "float8", "--quantize.linear.float8.emulate",
         "--quantize.linear.float8.filter_fqns", "output"]
    )  # fmt: skip
    apply_converters(model, build_converters(c, CPU))
    top, block = dense_tp_plan(True)
    on_gpu = converters.adapt_tp_plan(block, model, c, "cuda")
    assert type(on_gpu["attention.wq"]) is Float8ColwiseParallel
    assert type(on_gpu["attention.wo"]) is Float8RowwiseParallel
    assert converters.adapt_tp_plan(top, model, c, "cuda")["output"] is top["output"]
    on_cpu = converters.adapt_tp_plan(block, model, c, "cpu")
    assert type(on_cpu["attention.wq"]) is ColwiseParallel
    assert type(on_cpu["attention.wo"]) is RowwiseParallel


def test_float8_on_cpu_without_emulate_warns_about_the_reference_kernel(caplog):
    from titan_core.quantize.float8 import Float8LinearConverter

    with caplog.at_level(logging.WARNING, logger="titan"):
        Float8LinearConverter(build_config(["--model.converters", "float8"]), torch.device("cpu"))
    (record,) = caplog.records
    assert "without emulate" in record.getMessage() and "emulate = true" in record.getMessage()
    caplog.clear()
    c = build_config(["--model.converters", "float8", "--quantize.linear.float8.emulate"])
    Float8LinearConverter(c, torch.device("cpu"))
    assert not caplog.records
