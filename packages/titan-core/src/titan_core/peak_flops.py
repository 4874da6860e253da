"""Peak FLOP/s of a device, the denominator of MFU.

Known GPUs get the vendor's dense bf16 peak. CPUs get the highest of the clock x vector-width
figure and every fp32 matmul rate measured on the machine (cached: a probe timed on a busy
machine reads low and made MFU read high). Other devices get a measured matmul rate.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch

logger = logging.getLogger("titan")

# Dense (no 2:4 structured sparsity) bf16 tensor-core peak per GPU, in FLOP/s, from the NVIDIA
# datasheets. The datasheets headline the *sparse* figure; dense is half of it:
#   H100 SXM5: 1,979 TFLOPS sparse -> 989.4e12 dense  (H100 Tensor Core GPU datasheet)
#   H100 PCIe: 1,513 TFLOPS sparse -> 756e12 dense    (same datasheet, PCIe column)
#   H100 NVL:  1,671 TFLOPS sparse -> 835e12 dense    (same datasheet, NVL column)
#   H200 SXM:  1,979 TFLOPS sparse -> 989.4e12 dense  (H200 Tensor Core GPU datasheet)
#   A100:        624 TFLOPS sparse -> 312e12 dense    (A100 Tensor Core GPU datasheet, SXM/PCIe)
#   B200:        4.5 PFLOPS sparse -> 2.25e15 dense   (HGX B200 datasheet, per GPU)
# Keys are matched as case-insensitive substrings of torch.cuda.get_device_name(), longest key
# first, so "NVIDIA H100 PCIe" hits "H100 PCIe" rather than the SXM "H100" entry.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100": 989.4e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989.4e12,
    "A100": 312e12,
    "B200": 2.25e15,
}


def _synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device``; CPU ops are already synchronous."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _probe_size(
    device: torch.device, dtype: torch.dtype, size: int, limit_s: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Grow the matrix side up to ``size`` while one matmul is predicted to fit in ``limit_s``.

    Sizes double from 256, so the probes together cost about as much as the last one, and a slow
    device never runs a matmul far over the limit. The last probe is the timed loop's warm-up.

    Args:
        device: where to run.
        dtype: matmul dtype.
        size: the largest square side wanted.
        limit_s: the most one matmul should take, so a slow device still finishes in budget.

    Returns:
        ``(a, b, out, seconds_spent)`` with warmed ``n x n`` buffers, ``n <= size``.
    """
    start = time.perf_counter()
    # NOTE: a tiny matmul first pays one-off costs (BLAS handle creation, thread pool start-up)
    # so they do not make the first probe look slow.
    tiny = torch.ones(64, 64, device=device, dtype=dtype)
    torch.mm(tiny, tiny)
    _synchronize(device)
    n = min(size, 256)
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        _synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        _synchronize(device)
        took = time.perf_counter() - t0
        bigger = min(2 * n, size)
        # Matmul time grows as n**3; small sizes run below peak, so this errs on the safe side.
        if bigger == n or took * (bigger / n) ** 3 > limit_s:
            return a, b, out, time.perf_counter() - start
        n = bigger


def measure_matmul_flops(
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    size: int = 2048,
    budget_s: float = 0.8,
) -> float:
    """Measure the square-matmul rate of ``device`` in FLOP/s: the fastest of its timed batches.

    Runs ``torch.mm`` on ``size x size`` matrices (warm-up, then timed batches) within about
    ``budget_s`` seconds in total, using whatever thread count torch currently has. The side is
    capped below ``size`` where one matmul would take more than a quarter of the budget.

    Args:
        device: the device to measure.
        dtype: matmul dtype (fp32 for CPU MFU, bf16 for GPUs missing from the peak table).
        size: side of the square matrices; larger sizes get closer to peak on big GPUs.
        budget_s: wall-clock budget for the whole measurement, warm-up included.

    Returns:
        FLOP/s, counting ``2 * n**3`` FLOPs per ``n x n`` matmul.
    """
    if size < 1 or budget_s <= 0:
        raise ValueError(f"size and budget_s must be positive, got {size=} {budget_s=}")
    device = torch.device(device)
    a, b, out, spent = _probe_size(device, dtype, size, budget_s / 4)
    flops_per_mm = 2.0 * a.shape[0] ** 3
    timed_budget = max(budget_s - spent, budget_s / 4)
    # Run in doubling batches with one sync per batch: per-iteration syncs would add launch
    # latency to every (short) GPU matmul, and the batch is capped so we stop near the budget.
    # The fastest batch is the answer: other work on the machine only ever slows a batch down,
    # and a rate measured low would make MFU read high (above 1 on a busy 2-core CI machine).
    iters, batch, best = 0, 1, 0.0
    t0 = time.perf_counter()
    while True:
        started = time.perf_counter()
        for _ in range(batch):
            torch.mm(a, b, out=out)
        _synchronize(device)
        best = max(best, flops_per_mm * batch / (time.perf_counter() - started))
        iters += batch
        elapsed = time.perf_counter() - t0
        fits = int((timed_budget - elapsed) / (elapsed / iters))
        if fits < 1:
            return best
        batch = min(batch * 2, fits)


@functools.cache
def _measured_rate(device: torch.device, dtype: torch.dtype, size: int, threads: int) -> float:
    """Cached :func:`measure_matmul_flops`; ``threads`` is part of the key, as it sets CPU speed."""
    del threads  # only a cache key
    return measure_matmul_flops(device, dtype=dtype, size=size)


def _lookup_peak(name: str) -> tuple[str, float] | None:
    """Return the (key, peak) of ``PEAK_BF16_FLOPS`` whose key is in ``name``, longest key first."""
    lowered = name.lower()
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key.lower() in lowered:
            return key, PEAK_BF16_FLOPS[key]
    return None


def device_peak_flops(device: torch.device) -> tuple[float, str]:
    """Return the peak FLOP/s to divide by for MFU on ``device``, and where the number came from.

    CUDA GPUs in :data:`PEAK_BF16_FLOPS` get the datasheet dense bf16 peak. Other GPUs get a
    measured bf16 matmul rate (with a warning: a measured rate is below the true peak, so MFU
    reads high). CPUs get the fp32 peak of :func:`cpu_peak_flops` (CPU runs train in fp32).
    Measured rates are taken once per process (per device, dtype and thread count) and cached.

    Args:
        device: the training device.

    Returns:
        ``(flops_per_second, description)``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        hit = _lookup_peak(name)
        if hit is not None:
            key, peak = hit
            return peak, f"{name}: datasheet dense bf16 peak for {key} ({peak / 1e12:.1f} TFLOP/s)"
        rate = _measured_rate(device, torch.bfloat16, 8192, torch.get_num_threads())
        logger.warning(
            "GPU %r is not in titan_core.metrics.PEAK_BF16_FLOPS; MFU uses its measured bf16 "
            "matmul rate (%.1f TFLOP/s), which is below the true peak",
            name,
            rate / 1e12,
        )
        return rate, f"measured bf16 matmul rate on {name}"
    threads = torch.get_num_threads()
    rate = _measured_rate(device, torch.float32, 2048, threads)
    if device.type != "cpu":
        return rate, f"measured fp32 matmul rate on this {device.type} device"
    return cpu_peak_flops(threads, rate)


# fp32 FLOPs per cycle per core for the widest vector instructions the CPU reports: AVX-512 and
# AVX2 (which come with FMA) as two FMA units (2 FLOPs per lane each) of 16 and 8 lanes; AVX and
# SSE2 as one add and one multiply unit of 8 and 4 lanes.
_FP32_FLOPS_PER_CYCLE = (("avx512f", 64), ("avx2", 32), ("avx", 16), ("sse2", 8))
# AMD Zen 4 (family 0x19 with AVX-512) runs each 512-bit FMA as two halves on its two 256-bit FMA
# units: AVX2's rate. Counting it at 64 made MFU read half the matmul rate's share on such a VM.
_HALF_WIDTH_AVX512 = (("AuthenticAMD", 0x19),)


class CpuInfo(NamedTuple):
    """What /proc/cpuinfo says about the first CPU."""

    model: str
    flags: set[str]
    hz: float
    vendor: str = ""
    family: int = 0


def cpu_peak_flops(threads: int, measured: float) -> tuple[float, str]:
    """The CPU's fp32 peak for MFU: the highest of its clock x vector width and every matmul rate
    measured on this machine (``measured`` now, and earlier runs' from the cache).

    A probe timed while other work runs reads low, which made MFU read above 1 on a busy CI
    machine. Taking the highest rate ever seen (cached per CPU model and core count under
    ``$TITAN_CACHE_DIR``) and never less than the clock-derived figure keeps MFU in (0, 1] and
    makes it the same from run to run once one quiet measurement exists.
    """
    cores = min(threads, len(os.sched_getaffinity(0)))
    info = _cpuinfo()
    spec = _spec_flops(info, cores) if info else 0.0
    best = _machine_best(f"{info.model if info else 'cpu'} x{cores}", measured)
    if best >= spec:
        return best, f"highest fp32 matmul rate measured on this CPU with {cores} threads"
    hz = info.hz  # type: ignore[union-attr]
    return spec, f"fp32 peak of this CPU: {cores} cores x {hz / 1e9:.2f} GHz x vector width"


def _spec_flops(info: CpuInfo, cores: int) -> float:
    """Every core at its reported clock retiring its widest vector unit's FLOPs each cycle."""
    flags = set(info.flags)
    if (info.vendor, info.family) in _HALF_WIDTH_AVX512:
        flags.discard("avx512f")
    per_cycle = next((n for flag, n in _FP32_FLOPS_PER_CYCLE if flag in flags), 0)
    return cores * info.hz * per_cycle


def _cpuinfo() -> CpuInfo | None:
    """What /proc/cpuinfo says of the first CPU (see :func:`parse_cpuinfo`); None off Linux.

    The clock is the largest of /proc/cpuinfo's and cpufreq's maximum; a VM often reports its
    host's base clock, below the turbo clock it runs at, so the measured rate can beat it.
    """
    try:
        info = parse_cpuinfo(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None
    max_khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    with contextlib.suppress(OSError, ValueError):
        if info is not None:
            info = info._replace(hz=max(info.hz, float(max_khz.read_text()) * 1e3))
    return info


def parse_cpuinfo(text: str) -> CpuInfo | None:
    """Model name, flags, clock in Hz, vendor and family of the first CPU in /proc/cpuinfo's
    ``text``; None without a clock."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    try:
        hz = float(fields.get("cpu MHz", "")) * 1e6
    except ValueError:
        return None
    family = fields.get("cpu family", "0")
    return CpuInfo(
        model=fields.get("model name", "cpu"),
        flags=set(fields.get("flags", "").split()),
        hz=hz,
        vendor=fields.get("vendor_id", ""),
        family=int(family) if family.isdigit() else 0,
    )


def _machine_best(key: str, measured: float) -> float:
    """The highest rate measured for ``key`` on this machine, ``measured`` included (cached)."""
    from titan_core.data.embedded import cache_root

    path = cache_root() / "cpu_peak.json"
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    best = known.get(key)
    best = float(best) if isinstance(best, (int, float)) and math.isfinite(best) else 0.0
    if measured > best:
        known[key] = measured
        with contextlib.suppress(OSError):  # a read-only cache only costs the stability
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known), encoding="utf-8")
            tmp.replace(path)
    return max(best, measured)
