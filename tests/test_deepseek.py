"""titan-deepseek: the flavors have their published sizes, the shipped configs load and the
debug config trains; MLA's pieces behave as the TP plan and CP kernels assume."""

from __future__ import annotations

from importlib.resources import files

import pytest
import torch

from helpers import FAST, losses, run_cli
from titan_core.config import JobConfig, load_toml
from titan_core.models import MultiHeadLatentAttention, RoPE
from titan_core.preflight import resolve_model_args
from titan_deepseek import DEEPSEEK_V3_FLAVORS, train_spec

CONFIGS = sorted(
    p for p in files("titan_deepseek").joinpath("configs").iterdir() if p.name.endswith(".toml")
)


@pytest.mark.parametrize("flavor, billions", [("16B", 15.7), ("236B", 235.7), ("671B", 671.0)])
def test_flavors_have_the_published_parameter_counts(flavor, billions):
    with torch.device("meta"):
        model = train_spec.model_cls(DEEPSEEK_V3_FLAVORS[flavor])
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.05)


def test_a_config_ships_for_every_flavor():
    flavors = set()
    for path in CONFIGS:
        config = JobConfig()
        load_toml(config, str(path))
        assert config.model.name == "deepseek_v3"
        resolve_model_args(train_spec, config)
        flavors.add(config.model.flavor)
    assert flavors == set(DEEPSEEK_V3_FLAVORS)


def test_the_debug_config_trains(tmp_path):
    [debug] = [p for p in CONFIGS if "debugmodel" in p.name]
    args = ["--job.config_file", str(debug), *FAST, "--training.steps", "3"]
    proc = run_cli([*args, "--job.dump_folder", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = losses(tmp_path)
    assert len(curve) == 3 and curve[-1] < curve[0]


# The key set of torchtitan v0.2.2's DeepSeek V3 debug_model.toml (profiling on, PP 2 with
# DualPipeV, EP 2, the Float8 sections present but not listed in model.converters).
TORCHTITAN_DEBUG_TOML = """
[job]
dump_folder = "./outputs"
description = "DeepSeek-V3 debug training"
print_config = false

[profiling]
enable_profiling = true
save_traces_folder = "profile_trace"
profile_freq = 1
profiler_warmup = 0
enable_memory_snapshot = false
save_memory_snapshot_folder = "memory_snapshot"

[metrics]
log_freq = 1
disable_color_printing = false
enable_tensorboard = false
save_tb_folder = "tb"
enable_wandb = false

[model]
name = "deepseek_v3"
flavor = "debugmodel"
hf_assets_path = "./tests/assets/tokenizer"

[optimizer]
name = "AdamW"
lr = 8e-4
eps = 1e-8

[lr_scheduler]
warmup_steps = 0
decay_ratio = 0.8
decay_type = "linear"
min_lr_factor = 0.0

[training]
local_batch_size = 4
seq_len = 4
max_norm = 1.0
steps = 6
dataset = "c4_test"

[parallelism]
data_parallel_replicate_degree = 1
data_parallel_shard_degree = -1
fsdp_reshard_after_forward = "default"
tensor_parallel_degree = 1
enable_async_tensor_parallel = false
pipeline_parallel_degree = 2
expert_parallel_degree = 2
context_parallel_degree = 1
pipeline_parallel_schedule = "DualPipeV"
expert_tensor_parallel_degree = 1

[checkpoint]
enable = false
folder = "checkpoint"
interval = 10
last_save_model_only = false
export_dtype = "float32"
async_mode = "disabled"

[activation_checkpoint]
mode = "selective"
selective_ac_option = "op"

[compile]
enable = false
components = ["model", "loss"]

[quantize.linear.float8]
enable_fsdp_float8_all_gather = false
precompute_float8_dynamic_scale_for_fsdp = false
filter_fqns = ["output", "router.gate"]

[quantize.grouped_mm.float8]
fqns = ["experts"]
"""


def test_torchtitan_deepseek_debug_toml_trains_with_tiny_overrides(tmp_path):
    (tmp_path / "debug_model.toml").write_text(TORCHTITAN_DEBUG_TOML)
    overrides = [
        "--job.config_file", str(tmp_path / "debug_model.toml"), "--model.hf_assets_path", "",
        "--parallelism.pipeline_parallel_degree", "1", "--parallelism.expert_parallel_degree",
        "1", "--training.steps", "2", "--job.dump_folder", str(tmp_path / "run"),
    ]  # fmt: skip
    proc = run_cli(overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(losses(tmp_path / "run")) == 2
    assert list((tmp_path / "run" / "profile_trace").glob("iteration_*/rank0_trace.json"))
    assert (
        "[quantize.grouped_mm.float8] sets fqns but model.converters does not list" in proc.stderr
    )


def test_mla_values_may_be_narrower_than_keys_and_heads_follow_the_weights():
    """A column shard of the per-head projections (what TP leaves a rank) is a model with fewer
    heads: the module reads its head count from the weights."""
    torch.manual_seed(0)
    kw = dict(q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8,
              v_head_dim=6, softmax_scale=0.3)  # fmt: skip
    mla = MultiHeadLatentAttention(32, 4, **kw)
    mla.init_weights(0.02)
    rope = RoPE(8, 16)
    x = torch.randn(2, 16, 32)
    full = mla(x, rope(16))
    half = MultiHeadLatentAttention(32, 2, **kw)
    with torch.no_grad():
        for name in ("wkv_a", "kv_norm"):
            getattr(half, name).load_state_dict(getattr(mla, name).state_dict())
        half.wq.weight.copy_(mla.wq.weight[: 2 * 20])
        half.wkv_b.weight.copy_(mla.wkv_b.weight[: 2 * 18])
        half.wo.weight.copy_(mla.wo.weight[:, : 2 * 6])
    other = MultiHeadLatentAttention(32, 2, **kw)
    with torch.no_grad():
        for name in ("wkv_a", "kv_norm"):
            getattr(other, name).load_state_dict(getattr(mla, name).state_dict())
        other.wq.weight.copy_(mla.wq.weight[2 * 20 :])
        other.wkv_b.weight.copy_(mla.wkv_b.weight[2 * 18 :])
        other.wo.weight.copy_(mla.wo.weight[:, 2 * 6 :])
    torch.testing.assert_close(half(x, rope(16)) + other(x, rope(16)), full)
