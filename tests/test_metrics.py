"""Unit tests for titan_core.metrics: FLOP accounting, peak rates, memory and the metrics sinks."""

from __future__ import annotations

import json
import logging
import sys
import time

import pytest
import torch

from titan_core import metrics, peak_flops
from titan_core.errors import UserError
from titan_core.metrics import (
    MetricsLogger,
    device_peak_flops,
    format_console_line,
    llama_flops_per_token,
    measure_matmul_flops,
    memory_gib,
)

RECORD_KEYS = (
    "step",
    "loss",
    "grad_norm",
    "lr",
    "tps",
    "tflops",
    "mfu",
    "memory_gib",
    "tokens_seen",
    "time",
)


def make_record(step: int = 10, loss: float = 6.123456789012345) -> dict:
    return {
        "step": step,
        "loss": loss,
        "grad_norm": 1.234,
        "lr": 8e-4,
        "tps": 4210.4,
        "tflops": 0.0512,
        "mfu": 0.1234,
        "memory_gib": 0.4213,
        "tokens_seen": 40960,
        "time": 12.5,
    }


def test_llama_flops_per_token_matches_hand_count():
    # Dense: 6 * (1000 - 200) = 4800. Attention: 12 * 2 layers * 4 heads * 8 dim * 16 seq = 12288.
    flops = llama_flops_per_token(
        num_params=1000, num_embedding_params=200, n_layers=2, n_heads=4, head_dim=8, seq_len=16
    )
    assert flops == 4800 + 12288


def test_llama_flops_per_token_rejects_embedding_larger_than_model():
    with pytest.raises(ValueError, match="num_embedding_params"):
        llama_flops_per_token(10, 20, n_layers=1, n_heads=1, head_dim=1, seq_len=1)


def test_measure_matmul_flops_is_positive_and_fast():
    start = time.perf_counter()
    rate = measure_matmul_flops(torch.device("cpu"))
    elapsed = time.perf_counter() - start
    # Any real CPU does more than 100 MFLOP/s fp32; the bound catches unit slips (e.g. GFLOP/s).
    assert rate > 1e8
    assert elapsed < 2.0, f"measurement took {elapsed:.2f}s"


def test_a_stall_during_the_measurement_does_not_lower_the_rate(monkeypatch):
    """Every matmul takes 10 ms but one stalls for 0.4 s (another process took the CPU): the
    rate must still be about that of 10 ms matmuls, or MFU would read high."""
    calls = []

    def fake_mm(a, b, out=None):
        calls.append(1)
        time.sleep(0.4 if len(calls) == 12 else 0.01)
        return out

    monkeypatch.setattr(torch, "mm", fake_mm)
    rate = measure_matmul_flops(torch.device("cpu"), size=256, budget_s=1.0)
    assert len(calls) > 12, "the stall must fall inside the timed loop"
    assert rate > 0.8 * 2 * 256**3 / 0.01


def test_device_peak_flops_cpu_is_fp32_and_cached():
    rate, description = device_peak_flops(torch.device("cpu"))
    assert rate > 1e8
    assert "fp32" in description
    start = time.perf_counter()
    assert device_peak_flops(torch.device("cpu"))[0] == rate
    assert time.perf_counter() - start < 0.05, "second call should hit the cache"


def test_cpu_peak_does_not_move_when_the_probe_reads_low(monkeypatch, tmp_path):
    """A matmul probe slowed by other work (CI under load) must not lower the peak: MFU read
    1.34 that way. The clock x vector width is a floor, and the highest rate ever measured on
    the machine (cached) holds the peak from run to run."""
    from titan_core import peak_flops as metrics
    from titan_core.peak_flops import CpuInfo

    monkeypatch.setenv("TITAN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(
        metrics, "_cpuinfo", lambda: CpuInfo("Some CPU", {"sse2", "avx", "avx2"}, 2e9)
    )
    monkeypatch.setattr(metrics.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    floor = 2 * 2e9 * 32
    assert metrics.cpu_peak_flops(2, floor / 50)[0] == floor  # a stalled probe, first run
    assert metrics.cpu_peak_flops(2, floor * 1.4)[0] == floor * 1.4  # a quiet run: turbo clock
    rate, description = metrics.cpu_peak_flops(2, floor / 50)  # stalled again: remembered
    assert rate == floor * 1.4 and "highest" in description
    assert metrics.cpu_peak_flops(8, floor)[0] == 2 * floor  # at most the 4 cores it may use
    monkeypatch.setattr(metrics, "_cpuinfo", lambda: CpuInfo("Wide CPU", {"avx2", "avx512f"}, 1e9))
    assert metrics.cpu_peak_flops(1, 1.0)[0] == 1e9 * 64
    monkeypatch.setattr(metrics, "_cpuinfo", lambda: None)  # no /proc/cpuinfo: measured only
    assert metrics.cpu_peak_flops(3, 5e9)[0] == 5e9


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA B200", 2.25e15),
    ],
)
def test_device_peak_flops_cuda_uses_datasheet_table(monkeypatch, name, peak):
    # Patch the name lookup so the table matching is checked without a GPU.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    rate, description = device_peak_flops(torch.device("cuda", 0))
    assert rate == peak
    assert name in description


def test_memory_gib_cpu_is_plausible():
    gib = memory_gib(torch.device("cpu"))
    # The test process holds torch, so its peak RSS is well above 10 MiB and below a TiB.
    assert 0.01 < gib < 1024


def test_logger_writes_exact_keys_and_full_precision_loss(tmp_path):
    with MetricsLogger(
        tmp_path / "run", enabled=True, enable_tensorboard=False, enable_wandb=False
    ) as sink:
        sink.log(make_record())
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert tuple(row) == RECORD_KEYS
    assert row["loss"] == 6.123456789012345
    assert not (tmp_path / "run" / "tb").exists()


def test_logger_turns_scalar_tensors_into_exact_floats(tmp_path):
    loss = torch.tensor(6.123456789012345, dtype=torch.float64)
    with MetricsLogger(
        tmp_path, enabled=True, enable_tensorboard=False, enable_wandb=False
    ) as sink:
        sink.log({**make_record(), "loss": loss})
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["loss"] == loss.item()


def test_logger_appends_across_instances(tmp_path):
    for step in (1, 2):
        with MetricsLogger(
            tmp_path, enabled=True, enable_tensorboard=False, enable_wandb=False
        ) as sink:
            sink.log(make_record(step=step))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]


def test_logger_writes_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, enabled=True, enable_tensorboard=True, enable_wandb=False) as sink:
        sink.log(make_record(step=7))
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "grad_norm", "lr", "tps", "tflops", "mfu", "memory_gib"} <= tags
    (point,) = acc.Scalars("loss")
    assert point.step == 7
    assert point.value == pytest.approx(6.123456789012345, rel=1e-6)  # TB stores float32


def test_disabled_logger_writes_nothing(tmp_path, caplog):
    folder = tmp_path / "rank1"
    with caplog.at_level(logging.INFO, logger="titan"):
        sink = MetricsLogger(folder, enabled=False, enable_tensorboard=True, enable_wandb=True)
        sink.log(make_record())
        sink.close()
    assert not folder.exists()
    assert caplog.records == []


def test_enable_wandb_without_wandb_is_a_user_error(tmp_path, monkeypatch):
    # A None entry in sys.modules makes `import wandb` fail even where wandb is installed.
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match=r"metrics\.enable_wandb"):
        MetricsLogger(tmp_path / "run", enabled=True, enable_tensorboard=False, enable_wandb=True)
    assert not (tmp_path / "run").exists()


def test_log_prints_console_line(tmp_path, caplog):
    with (
        caplog.at_level(logging.INFO, logger="titan"),
        MetricsLogger(tmp_path, enabled=True, enable_tensorboard=False, enable_wandb=False) as sink,
    ):
        sink.log(make_record())
    assert [r.getMessage() for r in caplog.records] == [format_console_line(make_record())]


def test_format_console_line_shows_step_loss_and_mfu_percent():
    line = format_console_line({**make_record(), "checkpoint_s": 1.5})
    assert line.startswith("step   10  loss  6.1235")
    assert "mfu 12.3%" in line
    assert "tps 4,210" in line and "lr 8.0e-04" in line and "mem 0.42GiB" in line
    assert "checkpoint_s 1.5" in line
    assert "tokens_seen" not in line


def test_console_line_shows_progress_eta_and_validation():
    record = {**make_record(), "total_steps": 250, "eta_s": 3725.0, "validation_loss": 5.25}
    line = format_console_line({**record, "validation_perplexity": 190.57, "validation_time": 2})
    assert line.startswith("step  10/250  loss  6.1235")
    assert "eta 1h02m" in line and "val_loss  5.2500" in line and "val_ppl 190.57" in line
    assert "total_steps" not in line and "validation_time" not in line


def test_console_line_shows_the_data_wait_in_milliseconds():
    line = format_console_line({**make_record(), "data_wait_s": 0.00412})
    assert "data_wait 4.1ms" in line and "data_wait_s" not in line


@pytest.mark.parametrize(
    "seconds, text",
    [(0.4, "0s"), (59.4, "59s"), (65, "1m05s"), (3599, "59m59s"), (7380, "2h03m"),
     (2 * 86400 + 3 * 3600, "2d03h"), (float("nan"), "?")],
)  # fmt: skip
def test_format_duration(seconds, text):
    assert metrics.format_duration(seconds) == text


def test_peak_table_keys_match_the_contract():
    assert {"H100", "H200", "A100", "B200"} <= set(metrics.PEAK_BF16_FLOPS)
    assert metrics.PEAK_BF16_FLOPS["H100"] == 989.4e12


ZEN4_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
cpu MHz\t\t: 2596.146
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16

processor\t: 1
vendor_id\t: AuthenticAMD
"""


def test_the_cpu_peak_counts_amd_zen4_avx512_at_half_width(monkeypatch, tmp_path):
    """Zen 4 runs a 512-bit FMA as two 256-bit halves: AVX2's 32 FLOPs/cycle, not 64. Counted at
    64, MFU read 30% on a Zen 4 VM where the matmuls ran at 56% of that figure (and ~95% of 32)."""
    from titan_core.peak_flops import CpuInfo, cpu_peak_flops, parse_cpuinfo

    info = parse_cpuinfo(ZEN4_CPUINFO)
    assert (info.vendor, info.family, info.hz) == ("AuthenticAMD", 25, 2596.146e6)
    assert {"avx2", "avx512f"} <= info.flags
    monkeypatch.setenv("TITAN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(peak_flops.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(peak_flops, "_cpuinfo", lambda: info)
    assert cpu_peak_flops(2, 1.0)[0] == 2 * 2596.146e6 * 32
    zen5 = info._replace(family=26)  # full-width AVX-512
    monkeypatch.setattr(peak_flops, "_cpuinfo", lambda: zen5)
    assert cpu_peak_flops(2, 1.0)[0] == 2 * 2596.146e6 * 64
    intel = CpuInfo("Xeon", {"avx2", "avx512f"}, 2e9, "GenuineIntel", 6)
    monkeypatch.setattr(peak_flops, "_cpuinfo", lambda: intel)
    assert cpu_peak_flops(1, 1.0)[0] == 2e9 * 64
    assert parse_cpuinfo("processor\t: 0\nmodel name\t: no clock\n") is None


def test_device_peak_flops_unknown_gpu_warns_and_measures_bf16(monkeypatch, caplog):
    calls = []

    def fake_rate(device, dtype, size, threads):
        calls.append(dtype)
        return 123e12

    monkeypatch.setattr(
        torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090"
    )
    monkeypatch.setattr(peak_flops, "_measured_rate", fake_rate)
    with caplog.at_level(logging.WARNING, logger="titan"):
        rate, description = device_peak_flops(torch.device("cuda", 0))
    assert (rate, calls) == (123e12, [torch.bfloat16])
    assert "measured bf16" in description and "RTX 4090" in description
    assert "PEAK_BF16_FLOPS" in caplog.text


def test_tied_and_untied_models_of_one_shape_cost_the_same_flops():
    """Tying shares the table's storage, not its work: the output matmul is counted either way."""
    import dataclasses

    from titan_llama3 import LLAMA3_FLAVORS, train_spec

    def count(args) -> int:
        with torch.device("meta"):
            model = train_spec.model_cls(args)
        return sum(p.numel() for p in model.parameters())  # a tied table once

    tied = LLAMA3_FLAVORS["1B"]
    untied = dataclasses.replace(tied, tie_word_embeddings=False)
    assert count(untied) - count(tied) == tied.vocab_size * tied.dim
    flops = train_spec.flops_per_token_fn
    assert flops(tied, count(tied), 2048) == flops(untied, count(untied), 2048)
    # and the output matmul is in it: 6 FLOPs per weight of the lm head
    no_head = flops(untied, count(untied) - tied.vocab_size * tied.dim, 2048)
    assert flops(untied, count(untied), 2048) - no_head == 6 * tied.vocab_size * tied.dim


def test_moe_flops_count_only_the_active_experts():
    from titan_core.metrics import decoder_flops_per_token, inactive_expert_params
    from titan_qwen3 import QWEN3_FLAVORS, Qwen3Transformer

    args = QWEN3_FLAVORS["30B-A3B"]
    with torch.device("meta"):
        total = sum(p.numel() for p in Qwen3Transformer(args).parameters())
    active = total - inactive_expert_params(args)
    assert 30.0e9 < total < 31.0e9 and 3.2e9 < active < 3.4e9  # Qwen3-30B-A3B: 30.5B, 3.3B
    dense = QWEN3_FLAVORS["8B"]
    assert inactive_expert_params(dense) == 0
    flops = decoder_flops_per_token(args, total, 4096)
    assert flops == pytest.approx(
        6 * (active - args.vocab_size * args.dim) + 12 * 48 * 32 * 128 * 4096
    )


@pytest.mark.parametrize(
    "tp, pp, cp, dp_shard, per_device",
    [(1, 1, 1, 1, 2048), (2, 1, 1, 1, 1024), (1, 2, 1, 2, 1024), (2, 2, 2, 1, 256)],
)
def test_tokens_per_device_divide_a_batch_over_the_ranks_that_process_it(
    tp, pp, cp, dp_shard, per_device
):
    """tokens/s (hence MFU) per device: a data-parallel rank's tokens (8 x 128 x 2 microsteps)
    are shared by its TP, PP and CP ranks; counting them on each would inflate MFU by tp x pp x cp.
    """
    from types import SimpleNamespace

    from titan_core.parallel.dims import ParallelDims
    from titan_core.trainer import Trainer

    dims = ParallelDims(dp_replicate=1, dp_shard=dp_shard, cp=cp, tp=tp, pp=pp, ep=1,
                        world_size=dp_shard * cp * tp * pp)  # fmt: skip
    trainer = SimpleNamespace(
        config=SimpleNamespace(training=SimpleNamespace(local_batch_size=8, seq_len=128)),
        loader=SimpleNamespace(grad_accum_steps=2),
        dims=dims,
    )
    assert Trainer.tokens_per_device_step(trainer) == per_device
