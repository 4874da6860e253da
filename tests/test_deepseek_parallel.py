"""The DeepSeek V3 parity matrix: ``deepseek_v3 debugmodel`` (MLA, shared experts, a dense first
layer, the expert-bias update), fp32, 6 steps, global batch 8, 4 gloo processes per layout,
against one process: loss and gradient norm within 1e-5 relative at every step. Tensor parallel
on an MoE model spans the experts with expert parallel (the routed experts are not TP-sharded),
so its layout is TP 2 x EP 2 x FSDP 2. An EP 2 x FSDP 2 checkpoint resumes in one process."""

from __future__ import annotations

import shutil

import pytest

from helpers import FAST, read_metrics, run_cli

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

P = "--parallelism."
DEEPSEEK = ["--model.name", "deepseek_v3", "--model.flavor", "debugmodel"]
LAYOUTS = {
    "fsdp4": ["--training.local_batch_size", "2"],
    "tp2-ep2-fsdp2": [
        f"{P}tensor_parallel_degree", "2", f"{P}expert_parallel_degree", "2",
        "--training.local_batch_size", "4",
    ],
    "pp2-fsdp2": [
        f"{P}pipeline_parallel_degree", "2", "--training.local_batch_size", "4",
        f"{P}pipeline_parallel_microbatch_size", "2",
    ],
    "cp2-fsdp2": [f"{P}context_parallel_degree", "2", "--training.local_batch_size", "4"],
}  # fmt: skip


def train(dump, extra: list[str], nproc: int) -> list[dict]:
    args = [*FAST, "--training.steps", "6", *DEEPSEEK, "--training.global_batch_size", "8"]
    proc = run_cli([*args, *extra, "--job.dump_folder", str(dump)], nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return read_metrics(dump)


def assert_matches(metrics: list[dict], reference: list[dict]) -> None:
    for key in ("loss", "grad_norm", "moe_load_max_over_mean"):
        got, want = [m[key] for m in metrics], [m[key] for m in reference]
        assert got == pytest.approx(want, rel=1e-5, abs=0), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    metrics = train(
        tmp_path_factory.mktemp("deepseek-one"), ["--training.local_batch_size", "8"], 1
    )
    assert len(metrics) == 6 and metrics[-1]["loss"] < metrics[0]["loss"]
    return metrics


@pytest.mark.parametrize("extra", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_deepseek_layout_matches_one_process(tmp_path, reference, extra):
    assert_matches(train(tmp_path, extra, 4), reference)


def test_ep2_fsdp2_matches_one_process_and_its_checkpoint_resumes_in_one(tmp_path, reference):
    ep, one = tmp_path / "ep", tmp_path / "one"
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "3"]
    layout = [f"{P}expert_parallel_degree", "2", "--training.local_batch_size", "2", *ckpt]
    assert_matches(train(ep, layout, 4), reference)
    shutil.copytree(ep / "checkpoint" / "step-3", one / "checkpoint" / "step-3")
    resumed = train(one, ["--training.local_batch_size", "8", *ckpt], 1)
    assert [m["step"] for m in resumed] == [4, 5, 6]
    assert_matches(resumed, reference[3:])
