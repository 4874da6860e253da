"""FSDP2 under torchrun (gloo, CPU): per-step losses equal the single-process run.

Same seed, same data, same global batch of 8 sequences; only the layout changes. Every layout
must reproduce the single-process loss curve to 1e-5 relative in fp32.
"""

from __future__ import annotations

import pytest

from helpers import FAST, losses, run_cli, validation_flags, validation_records

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

GLOBAL = ["--training.global_batch_size", "8"]


@pytest.mark.parametrize(
    "nproc, extra",
    [
        (2, ["--training.local_batch_size", "4"]),
        (4, ["--training.local_batch_size", "2"]),
        # gradient accumulation: 2 microbatches of 2 per rank
        (2, ["--training.local_batch_size", "2"]),
        # HSDP: 2 replicas x 2 shards
        (
            4,
            [
                "--training.local_batch_size",
                "2",
                "--parallelism.data_parallel_replicate_degree",
                "2",
            ],
        ),
    ],
    ids=["fsdp2", "fsdp4", "fsdp2-accum2", "hsdp2x2"],
)
def test_fsdp_matches_single_process(
    tmp_path, reference_run, reference_losses, validation_set, nproc, extra
):
    # validated with a local batch of 3: a whole-set validation does not depend on it
    val = validation_flags(validation_set, local_batch_size=3)
    proc = run_cli([*FAST, *GLOBAL, *extra, *val, "--job.dump_folder", str(tmp_path)], nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path) == pytest.approx(reference_losses, rel=1e-5, abs=0)
    got, want = validation_records(tmp_path), validation_records(reference_run)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want, strict=True):
        assert g["validation_tokens"] == w["validation_tokens"]
        assert g["validation_loss"] == pytest.approx(w["validation_loss"], rel=1e-5, abs=0)
    assert proc.stderr.count("step 1/8 ") == 1  # only rank 0 prints


def test_fsdp_bf16_mixed_precision_tracks_fp32(tmp_path, reference_losses):
    """CPU twin of the GPU default: bf16 params and compute, fp32 gradient reduction."""
    args = [*FAST, *GLOBAL, "--training.local_batch_size", "4", "--training.steps", "2"]
    args += ["--training.mixed_precision_param", "bfloat16", "--job.dump_folder", str(tmp_path)]
    proc = run_cli(args, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = losses(tmp_path)
    assert curve[0] != reference_losses[0]  # bf16 really ran
    assert curve == pytest.approx(reference_losses[:2], rel=1e-2)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--parallelism.data_parallel_shard_degree", "3"], "the world size is 2"),
        (
            [
                "--parallelism.pipeline_parallel_degree",
                "2",
                "--parallelism.pipeline_parallel_schedule",
                "Zigzag",
            ],
            "parallelism.pipeline_parallel_schedule: 'Zigzag'",
        ),
        (
            ["--parallelism.tensor_parallel_degree", "2", "--training.seq_len", "63"],
            "training.seq_len=63",
        ),
    ],
    ids=["world-size", "unknown-schedule", "seq-len"],
)
def test_impossible_layout_is_refused_before_work(tmp_path, extra, needle):
    proc = run_cli([*FAST, *extra, "--job.dump_folder", str(tmp_path / "o")], nproc=2)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "titan-train: error:" in proc.stderr
    assert "]: Traceback" not in proc.stderr  # no worker traceback, only the launcher's summary
    assert not (tmp_path / "o").exists()  # refused before the dump folder was touched
