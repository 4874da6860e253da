"""GPU tier: the same training on CUDA (bf16 by default, NCCL under torchrun). Skipped on CPU;
their CPU twins are the bf16 tests in test_train.py / test_fsdp.py."""

from __future__ import annotations

import pytest
import torch

from helpers import losses, read_metrics, run_cli

pytestmark = pytest.mark.gpu


def test_debugmodel_trains_on_one_gpu_in_bf16(tmp_path):
    proc = run_cli(
        ["--job.dump_folder", str(tmp_path), "--training.steps", "30", "--metrics.log_freq", "1"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = losses(tmp_path)
    assert curve[0] - curve[-1] > 1.0
    last = read_metrics(tmp_path)[-1]
    assert 0 < last["mfu"] < 1 and last["memory_gib"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_nccl_matches_one_gpu_fp32(tmp_path):
    common = [
        "--training.steps", "6", "--training.seq_len", "128", "--metrics.log_freq", "1",
        "--training.mixed_precision_param", "float32", "--training.global_batch_size", "8",
        "--training.deterministic",
    ]  # fmt: skip
    one = run_cli(
        [*common, "--training.local_batch_size", "8", "--job.dump_folder", str(tmp_path / "a")]
    )
    two = run_cli(
        [*common, "--training.local_batch_size", "4", "--job.dump_folder", str(tmp_path / "b")],
        nproc=2,
    )
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), rel=1e-4)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_with_compile_trains_on_one_gpu(tmp_path, recipe):
    """torchao's real float8 kernels (compute capability >= 8.9), compiled blocks and loss; the
    CPU twin is test_float8_training.py (emulated)."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability >= 8.9")
    args = [
        "--job.dump_folder", str(tmp_path), "--training.steps", "20", "--metrics.log_freq", "1",
        "--model.converters", "quantize.linear.float8", "--compile.enable",
        "--quantize.linear.float8.recipe_name", recipe,
        "--quantize.linear.float8.filter_fqns", "output",
    ]  # fmt: skip
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"float8 {recipe}: converted" in proc.stderr
    curve = losses(tmp_path)
    assert curve[0] - curve[-1] > 0.5


def test_greedy_generation_on_gpu_equals_cpu(tmp_path):
    from test_convert import llama_config, random_llama
    from titan_core import load_pretrained
    from titan_core.generate import generate

    random_llama(llama_config(num_key_value_heads=2)).save_pretrained(tmp_path)
    prompts = [[5, 17, 3, 44, 9], [12, 8]]
    on_cpu = generate(load_pretrained(tmp_path), prompts, max_new_tokens=12)
    torch.backends.cuda.matmul.allow_tf32 = False
    on_gpu = generate(load_pretrained(tmp_path, "cuda"), prompts, max_new_tokens=12)
    assert on_gpu == on_cpu
