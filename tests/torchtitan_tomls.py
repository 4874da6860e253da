"""TOMLs with the key sets of torchtitan's train configs, written here (not copied), for
test_torchtitan_configs.py. ``Case.source`` names the torchtitan file and commit each mirrors."""

from __future__ import annotations

from dataclasses import dataclass

TT = "pytorch/torchtitan"


@dataclass(frozen=True)
class Case:
    name: str  # the torchtitan file's name
    source: str  # repository, path and commit of the version mirrored
    debug_flavor: str
    toml: str


LLAMA3_DEBUG = """
[job]
description = "Llama 3 debug training"
dump_folder = "./outputs"
print_config = false

[model]
name = "llama3"
flavor = "debugmodel"
hf_assets_path = "./tests/assets/tokenizer"

[training]
dataset = "c4_test"
seq_len = 2048
local_batch_size = 8
steps = 10
max_norm = 1.0

[parallelism]
data_parallel_replicate_degree = 1
data_parallel_shard_degree = -1
fsdp_reshard_after_forward = "default"
tensor_parallel_degree = 1
enable_async_tensor_parallel = false
context_parallel_degree = 1
pipeline_parallel_degree = 1
pipeline_parallel_schedule = "Interleaved1F1B"

[optimizer]
name = "AdamW"
eps = 1e-8
lr = 8e-4

[lr_scheduler]
decay_type = "linear"
decay_ratio = 0.8
warmup_steps = 2
min_lr_factor = 0.0

[activation_checkpoint]
selective_ac_option = "2"
mode = "selective"

[compile]
components = ["model", "loss"]
enable = false

[quantize.linear.float8]
filter_fqns = ["output"]
precompute_float8_dynamic_scale_for_fsdp = false
enable_fsdp_float8_all_gather = false

[checkpoint]
enable = false
interval = 10
folder = "checkpoint"
async_mode = "disabled"
export_dtype = "float32"
last_save_model_only = false

[metrics]
enable_wandb = false
enable_tensorboard = false
save_tb_folder = "tb"
disable_color_printing = false
log_freq = 1

[profiling]
enable_memory_snapshot = false
save_memory_snapshot_folder = "memory_snapshot"
enable_profiling = false
profile_freq = 10
save_traces_folder = "profile_trace"

[validation]
dataset = "c4_validation"
enable = false
steps = 10
freq = 5
"""

INTEGRATION_BASE = """
[job]
description = "model debug training for integration tests"
print_config = false
dump_folder = "./outputs"

[model]
flavor = "debugmodel"
name = "llama3"
hf_assets_path = "./tests/assets/tokenizer"

[training]
steps = 10
dataset = "c4_test"
local_batch_size = 8
seq_len = 2048
max_norm = 1.0

[parallelism]
data_parallel_shard_degree = -1
data_parallel_replicate_degree = 1
fsdp_reshard_after_forward = "default"
tensor_parallel_degree = 1
enable_async_tensor_parallel = false
pipeline_parallel_degree = 1
context_parallel_degree = 1
expert_parallel_degree = 1
expert_tensor_parallel_degree = 1

[optimizer]
lr = 8e-4
name = "AdamW"
eps = 1e-8

[lr_scheduler]
warmup_steps = 2
decay_ratio = 0.8
min_lr_factor = 0.0
decay_type = "linear"

[activation_checkpoint]
mode = "selective"
selective_ac_option = "2"

[compile]
enable = false
components = ["model", "loss"]

[quantize.linear.float8]
enable_fsdp_float8_all_gather = false
filter_fqns = ["output"]
precompute_float8_dynamic_scale_for_fsdp = false

[checkpoint]
folder = "checkpoint"
enable = false
interval = 10
last_save_model_only = false
async_mode = "disabled"
export_dtype = "float32"

[metrics]
log_freq = 1
save_tb_folder = "tb"
enable_tensorboard = false
enable_wandb = false
disable_color_printing = false

[profiling]
enable_profiling = false
profile_freq = 10
save_traces_folder = "profile_trace"
save_memory_snapshot_folder = "memory_snapshot"
enable_memory_snapshot = false

[validation]
enable = false
freq = 5
steps = 10
dataset = "c4_validation"
"""


def _llama3(
    flavor: str,
    *,
    steps: int,
    local_batch: int,
    lr: str,
    warmup: int,
    ac: str,
    tp: int = 1,
    big: bool = False,
) -> str:
    """torchtitan's llama3 8B/70B/405B key set; ``big`` is the 405B's Float8 + async TP +
    compile variant."""
    ac_keys = 'mode = "selective"\nselective_ac_option = "op"' if ac == "op" else 'mode = "full"'
    on = "true" if big else "false"
    return f"""
[job]
description = "Llama 3 {flavor} training"
dump_folder = "./outputs"

[model]
name = "llama3"
flavor = "{flavor}"
hf_assets_path = "./assets/hf/Llama-3.1-{flavor}"
{'converters = ["float8"]' if big else ""}

[training]
dataset = "c4"
steps = {steps}
seq_len = 8192
local_batch_size = {local_batch}
max_norm = 1.0

[parallelism]
data_parallel_replicate_degree = 1
data_parallel_shard_degree = -1
tensor_parallel_degree = {tp}
{"enable_async_tensor_parallel = true" if big else ""}
context_parallel_degree = 1
pipeline_parallel_degree = 1

[optimizer]
name = "AdamW"
lr = {lr}
eps = 1e-8

[lr_scheduler]
warmup_steps = {warmup}

[activation_checkpoint]
{ac_keys}

[compile]
enable = {on}
components = ["model", "loss"]

[quantize.linear.float8]
filter_fqns = ["output"]
enable_fsdp_float8_all_gather = {on}
precompute_float8_dynamic_scale_for_fsdp = {on}

[checkpoint]
enable = false
folder = "checkpoint"
interval = 500
last_save_model_only = true
export_dtype = "float32"
async_mode = "disabled"

[metrics]
log_freq = 10
enable_tensorboard = true
save_tb_folder = "tb"

[profiling]
enable_profiling = true
profile_freq = 100
save_traces_folder = "profile_trace"

[validation]
enable = false
dataset = "c4_validation"
freq = 500
steps = 1200
"""


LLAMA3_8B = _llama3("8B", steps=1000, local_batch=1, lr="3e-4", warmup=200, ac="op")
LLAMA3_70B = _llama3("70B", steps=1000, local_batch=8, lr="1.5e-4", warmup=200, ac="full", tp=8)
LLAMA3_405B = _llama3(
    "405B", steps=3000, local_batch=2, lr="8e-5", warmup=600, ac="full", tp=8, big=True
)


def _qwen3_dense(
    size: str,
    log_freq: int,
    lr: float,
    warmup: int,
    steps: int,
    interval: int,
    batch: int,
    ac_mode: str,
) -> str:
    """The qwen3 dense configs share one key set (the values differ by size)."""
    return f"""
[job]
description = "Qwen 3 {size} training"
dump_folder = "./outputs"

[model]
name = "qwen3"
flavor = "{size}"
hf_assets_path = "./assets/hf/Qwen3-{size}"

[training]
dataset = "c4"
steps = {steps}
seq_len = 4096
local_batch_size = {batch}
max_norm = 1.0

[parallelism]
data_parallel_replicate_degree = 1
data_parallel_shard_degree = -1
fsdp_reshard_after_forward = "default"
tensor_parallel_degree = 1
context_parallel_degree = 1

[optimizer]
name = "AdamW"
lr = {lr}
eps = 1e-8

[lr_scheduler]
warmup_steps = {warmup}

[activation_checkpoint]
mode = "{ac_mode}"
selective_ac_option = "op"

[compile]
enable = false
components = ["model", "loss"]

[quantize.linear.float8]
filter_fqns = ["output"]
enable_fsdp_float8_all_gather = false
precompute_float8_dynamic_scale_for_fsdp = false

[checkpoint]
enable = false
folder = "checkpoint"
interval = {interval}
last_save_model_only = false
export_dtype = "float16"
async_mode = "disabled"

[metrics]
log_freq = {log_freq}
enable_tensorboard = false
save_tb_folder = "tb"

[profiling]
enable_profiling = false
profile_freq = 100
save_traces_folder = "profile_trace"
"""


QWEN3_06B = _qwen3_dense("0.6B", 1, 3e-4, 2, 10, 500, 4, "selective")
QWEN3_17B = _qwen3_dense("1.7B", 10, 8e-4, 20, 100, 50, 4, "selective")
QWEN3_32B = _qwen3_dense("32B", 10, 8e-4, 600, 3000, 500, 2, "full").replace(
    'description = "Qwen 3 32B training"', 'description = "Qwen3 32B training"'
)

QWEN3_MOE_DEBUG = """
[job]
description = "Qwen 3 MoE debug model training"
dump_folder = "./outputs"

[model]
name = "qwen3"
flavor = "debugmodel_moe"
hf_assets_path = "./tests/assets/tokenizer"

[training]
dataset = "c4"
steps = 10
seq_len = 4096
local_batch_size = 4
max_norm = 1.0

[parallelism]
data_parallel_replicate_degree = 1
data_parallel_shard_degree = -1
fsdp_reshard_after_forward = "default"
tensor_parallel_degree = 1
enable_async_tensor_parallel = false
expert_parallel_degree = 1
expert_tensor_parallel_degree = 1

[optimizer]
name = "AdamW"
lr = 3e-4
eps = 1e-8

[lr_scheduler]
warmup_steps = 2

[activation_checkpoint]
mode = "selective"
selective_ac_option = "op"

[compile]
enable = false
components = ["model", "loss"]

[quantize.linear.float8]
filter_fqns = ["output"]
enable_fsdp_float8_all_gather = false
precompute_float8_dynamic_scale_for_fsdp = false

[checkpoint]
enable = false
folder = "checkpoint"
interval = 10
last_save_model_only = false
export_dtype = "float16"
async_mode = "disabled"

[metrics]
log_freq = 1
enable_tensorboard = false
save_tb_folder = "tb"

[profiling]
enable_profiling = false
profile_freq = 100
save_traces_folder = "profile_trace"
"""

DEEPSEEK_DEBUG = """
[job]
description = "DeepSeek-V3 debug training"
dump_folder = "./outputs"
print_config = false

[model]
name = "deepseek_v3"
flavor = "debugmodel"
hf_assets_path = "./tests/assets/tokenizer"

[training]
dataset = "c4_test"
steps = 10
seq_len = 2048
local_batch_size = 8
max_norm = 1.0

[parallelism]
data_parallel_replicate_degree = 1
data_parallel_shard_degree = -1
fsdp_reshard_after_forward = "default"
tensor_parallel_degree = 1
enable_async_tensor_parallel = false
pipeline_parallel_degree = 1
pipeline_parallel_schedule = "1F1B"
context_parallel_degree = 1
expert_parallel_degree = 1
expert_tensor_parallel_degree = 1

[optimizer]
name = "AdamW"
lr = 8e-4
eps = 1e-8

[lr_scheduler]
warmup_steps = 2
decay_ratio = 0.8
decay_type = "linear"
min_lr_factor = 0.0

[activation_checkpoint]
mode = "selective"
selective_ac_option = "op"

[compile]
enable = false
components = ["model", "loss"]

[quantize.linear.float8]
filter_fqns = ["output", "router.gate"]
enable_fsdp_float8_all_gather = false
precompute_float8_dynamic_scale_for_fsdp = false

[quantize.grouped_mm.float8]
fqns = ["experts"]

[checkpoint]
enable = false
folder = "checkpoint"
interval = 10
last_save_model_only = false
export_dtype = "float32"
async_mode = "disabled"

[metrics]
log_freq = 1
enable_tensorboard = false
save_tb_folder = "tb"
enable_wandb = false
disable_color_printing = false

[profiling]
enable_profiling = false
profile_freq = 10
save_traces_folder = "profile_trace"
enable_memory_snapshot = false
save_memory_snapshot_folder = "memory_snapshot"
"""


def _deepseek_big(flavor: str, assets: str, warmup: str, steps: str, interval: int, ep: int) -> str:
    """deepseek_v3_16b.toml and deepseek_v3_671b.toml share one key set."""
    return f"""
[job]
description = "DeepSeek-V3 {flavor} model training"
dump_folder = "./outputs"
print_config = false

[model]
name = "deepseek_v3"
flavor = "{flavor}"
hf_assets_path = "./assets/hf/{assets}"

[training]
dataset = "c4"
steps = {steps}
seq_len = 4096
local_batch_size = 4
max_norm = 1.0

[parallelism]
data_parallel_replicate_degree = 1
data_parallel_shard_degree = -1
fsdp_reshard_after_forward = "default"
tensor_parallel_degree = 1
enable_async_tensor_parallel = false
pipeline_parallel_degree = 1
pipeline_parallel_schedule = "Interleaved1F1B"
expert_parallel_degree = {ep}
expert_tensor_parallel_degree = 1

[optimizer]
name = "AdamW"
lr = 2.2e-4
eps = 1e-8

[lr_scheduler]
warmup_steps = {warmup}
decay_ratio = 0.8
decay_type = "cosine"
min_lr_factor = 0.1

[activation_checkpoint]
mode = "selective"
selective_ac_option = "op"

[compile]
enable = true
components = ["loss"]

[quantize.linear.float8]
filter_fqns = ["output", "router.gate"]
enable_fsdp_float8_all_gather = false
precompute_float8_dynamic_scale_for_fsdp = false

[quantize.grouped_mm.float8]
fqns = ["experts"]

[checkpoint]
enable = false
folder = "checkpoint"
interval = {interval}
last_save_model_only = true
export_dtype = "float32"
async_mode = "disabled"

[metrics]
log_freq = 10
enable_tensorboard = false
save_tb_folder = "tb"
enable_wandb = false
disable_color_printing = false

[profiling]
enable_profiling = false
profile_freq = 10
save_traces_folder = "profile_trace"
enable_memory_snapshot = false
save_memory_snapshot_folder = "memory_snapshot"
"""


DEEPSEEK_16B = _deepseek_big("16B", "deepseek-moe-16b-base", "200", "1000", 10, 8)
DEEPSEEK_671B = _deepseek_big("671B", "DeepSeek-V3.1-Base", "2_000", "10_000", 500, 1)

LLAMA3 = "torchtitan/models/llama3/train_configs"
QWEN3 = "torchtitan/models/qwen3/train_configs"
DSV3 = "torchtitan/models/deepseek_v3/train_configs"
A48 = "a48b651c112ebd82eacf2c9178ff3f9c4e72bcf7"  # names the data in [training.data]

CASES = [
    Case("llama3/debug_model.toml", f"{TT} {LLAMA3}/debug_model.toml@{A48}", "debugmodel",
         LLAMA3_DEBUG),
    Case("llama3/llama3_8b.toml", f"{TT} {LLAMA3}/llama3_8b.toml@{A48}", "debugmodel", LLAMA3_8B),
    Case("llama3/llama3_70b.toml",
         f"{TT} torchtitan/experiments/autopartition/train_configs/llama3_70b.toml"
         "@e87414750a4184915a5cfe224fdbcc48623fe26f (a v0.2 copy of the llama3 file)",
         "debugmodel", LLAMA3_70B),
    Case("llama3/llama3_405b.toml",
         f"{TT} torchtitan/experiments/autopartition/train_configs/llama3_405b.toml"
         "@9cfd889f893b62c69750b422fb5a0c5ad4f4e9d8 (a v0.2 copy of the llama3 file)",
         "debugmodel", LLAMA3_405B),
    Case("qwen3/qwen3_0.6b.toml",
         f"{TT} {QWEN3}/qwen3_0.6b.toml@51e84eda3d4387fd133cf9e739eddefc167d2c4d",
         "debugmodel", QWEN3_06B),
    Case("qwen3/qwen3_1.7b.toml",
         f"{TT} {QWEN3}/qwen3_1.7b.toml@00c7d452f89df917be0c4cf740fc5c67cc3646e9",
         "debugmodel", QWEN3_17B),
    Case("qwen3/qwen3_32b.toml", f"{TT} {QWEN3}/qwen3_32b.toml@{A48}", "debugmodel", QWEN3_32B),
    Case("qwen3/qwen3_moe_debug.toml", f"{TT} {QWEN3}/qwen3_moe_debug.toml@{A48}",
         "debugmodel_moe", QWEN3_MOE_DEBUG),
    Case("deepseek_v3/debug_model.toml", f"{TT} {DSV3}/debug_model.toml@{A48}", "debugmodel",
         DEEPSEEK_DEBUG),
    Case("deepseek_v3/deepseek_v3_16b.toml", f"{TT} {DSV3}/deepseek_v3_16b.toml@{A48}",
         "debugmodel", DEEPSEEK_16B),
    Case("deepseek_v3/deepseek_v3_671b.toml", f"{TT} {DSV3}/deepseek_v3_671b.toml@{A48}",
         "debugmodel", DEEPSEEK_671B),
    Case("integration_tests/base_config.toml",
         f"{TT} tests/integration_tests/base_config.toml@402027f27e1b32c5dea910e7708cd6e05968717d",
         "debugmodel", INTEGRATION_BASE),
]  # fmt: skip
