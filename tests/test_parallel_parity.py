"""The parity matrix: every parallel layout trains like one process.

llama3 debugmodel, fp32, gloo on CPU, 4 processes, the same seed, data and global batch (8) as
the single-process reference; every per-step loss must match it to 1e-5 relative.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import FAST, losses, read_metrics, run_cli, validation_flags, validation_records

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

P = "--parallelism."
LAYOUTS = {
    "tp4": [f"{P}tensor_parallel_degree", "4", "--training.local_batch_size", "8"],
    "tp2-fsdp2": [f"{P}tensor_parallel_degree", "2", "--training.local_batch_size", "4"],
    "tp2-fsdp2-no-loss-parallel": [
        f"{P}tensor_parallel_degree", "2", "--training.local_batch_size", "4",
        f"{P}disable_loss_parallel",
    ],
    "pp2-tp2": [
        f"{P}pipeline_parallel_degree", "2", f"{P}tensor_parallel_degree", "2",
        "--training.local_batch_size", "8", f"{P}pipeline_parallel_microbatch_size", "2",
    ],
    "cp2-fsdp2": [f"{P}context_parallel_degree", "2", "--training.local_batch_size", "4"],
    "cp2-fsdp2-alltoall": [
        f"{P}context_parallel_degree", "2", "--training.local_batch_size", "4",
        f"{P}context_parallel_rotate_method", "alltoall",
    ],
    "cp2-tp2": [
        f"{P}context_parallel_degree", "2", f"{P}tensor_parallel_degree", "2",
        "--training.local_batch_size", "8",
    ],
    "ddp4": [
        f"{P}data_parallel_replicate_degree", "4", f"{P}data_parallel_shard_degree", "1",
        "--training.local_batch_size", "2",
    ],
    "pp2-fsdp2-1F1B-accum2": [
        f"{P}pipeline_parallel_degree", "2", f"{P}pipeline_parallel_schedule", "1F1B",
        "--training.local_batch_size", "2", f"{P}pipeline_parallel_microbatch_size", "1",
    ],
    "ac-full-fsdp4": ["--activation_checkpoint.mode", "full", "--training.local_batch_size", "2"],
    "ac-op-fsdp4": [
        "--activation_checkpoint.mode", "selective",
        "--activation_checkpoint.selective_ac_option", "op", "--training.local_batch_size", "2",
    ],
    # compile (model blocks; the loss stays eager under loss parallel) with the async TP flag,
    # which on CPU is plain TP + compile: the CPU twin of async TP on CUDA.
    "compile-async-tp2-fsdp2": [
        f"{P}tensor_parallel_degree", "2", "--training.local_batch_size", "4",
        "--compile.enable", f"{P}enable_async_tensor_parallel",
    ],
}  # fmt: skip
# Every schedule's step equals one process in test_pipeline.py (with and without FSDP stages);
# here, the trainer's full path runs under one multi-stage schedule of each placement (loop
# style, V style) and the V schedule that overlaps forward and backward. 1F1B runs above.
for name in ("Interleaved1F1B", "ZBVZeroBubble", "DualPipeV"):
    LAYOUTS[f"pp2-fsdp2-{name}"] = [
        f"{P}pipeline_parallel_degree", "2", f"{P}pipeline_parallel_schedule", name,
        "--training.local_batch_size", "4", f"{P}pipeline_parallel_microbatch_size", "1",
    ]  # fmt: skip


def run_layout(tmp_path, extra: list[str], validate: Path, nproc: int = 4):
    """Train under a layout and validate on ``validate`` (with the layout's own local batch
    size, which a whole-set validation does not depend on)."""
    args = [*FAST, "--training.global_batch_size", "8", *extra, "--job.dump_folder", str(tmp_path)]
    lbs = int(extra[extra.index("--training.local_batch_size") + 1])
    args += validation_flags(validate, local_batch_size=lbs)
    proc = run_cli(args, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return losses(tmp_path)


def grad_norms(dump) -> list[float]:
    return [m["grad_norm"] for m in read_metrics(dump)]


@pytest.mark.parametrize("extra", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_layout_matches_single_process(
    tmp_path, reference_run, reference_losses, validation_set, extra
):
    assert run_layout(tmp_path, extra, validate=validation_set) == pytest.approx(
        reference_losses, rel=1e-5, abs=0
    )
    # The gradient norm (what clipping scales by) is the same under every layout too.
    assert grad_norms(tmp_path) == pytest.approx(grad_norms(reference_run), rel=1e-5, abs=0)
    # validation: the same loss, perplexity and token count
    got, want = validation_records(tmp_path), validation_records(reference_run)
    assert [r["validation_tokens"] for r in got] == [r["validation_tokens"] for r in want]
    assert len(want) == 2 and want[1]["validation_loss"] < want[0]["validation_loss"]
    for g, w in zip(got, want, strict=True):
        assert g["validation_loss"] == pytest.approx(w["validation_loss"], rel=1e-5, abs=0)
        assert g["validation_perplexity"] == pytest.approx(
            w["validation_perplexity"], rel=1e-5, abs=0
        )
