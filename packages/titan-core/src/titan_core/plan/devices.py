"""The devices titan-plan plans for: every constant named, with where it comes from.

Bandwidths are per device and per direction. The time model (:mod:`titan_core.plan.cost`)
multiplies them by stated efficiencies; nothing here is fitted.
"""

from __future__ import annotations

import dataclasses
import os

from titan_core.errors import UserError
from titan_core.metrics import PEAK_BF16_FLOPS

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Device:
    """One accelerator as the plan sees it.

    Args:
        name: the name ``--gpu`` takes.
        bf16_flops: dense bf16 tensor-core peak, FLOP/s.
        fp8_flops: dense fp8 peak, FLOP/s (None: no fp8 tensor cores).
        memory_gib: device memory, GiB.
        hbm_bytes_per_s: device memory bandwidth.
        intra_node_bytes_per_s: to another device of the node (NVLink), one direction.
        inter_node_bytes_per_s: to a device of another node (the NIC of this device).
        reserved_gib: memory the job cannot use for tensors (CUDA context, NCCL buffers).
        allocator_factor: reserved over allocated bytes of the caching allocator at the peak.
        source: where the numbers come from.
    """

    name: str
    bf16_flops: float
    fp8_flops: float | None
    memory_gib: float
    hbm_bytes_per_s: float
    intra_node_bytes_per_s: float
    inter_node_bytes_per_s: float
    reserved_gib: float
    allocator_factor: float
    source: str

    @property
    def usable_gib(self) -> float:
        """What the step's tensors may take: memory less the runtime, over the allocator's
        overhead."""
        return (self.memory_gib - self.reserved_gib) / self.allocator_factor


# NOTE: CUDA context + NCCL communicators + cuBLAS workspaces: 1.5-3 GiB on H100-class devices
# in PyTorch's own reports (torch.cuda.mem_get_info before and after init); 2.5 GiB is assumed.
CUDA_RESERVED_GIB = 2.5
# NOTE: PyTorch's caching allocator rounds blocks and keeps freed ones; reserved exceeds
# allocated by 5-15% in long runs (torchtitan logs both). 1.10 is assumed, not measured here.
CUDA_ALLOCATOR_FACTOR = 1.10
NVLINK4 = 450e9  # NVLink 4: 900 GB/s per GPU, both directions (H100/H200 datasheets)
NVLINK3 = 300e9  # NVLink 3: 600 GB/s per GPU, both directions (A100 datasheet)
NVLINK5 = 900e9  # NVLink 5: 1.8 TB/s per GPU, both directions (B200 datasheet)
NIC_400G = 50e9  # one 400 Gb/s ConnectX-7 per GPU (DGX H100/H200/B200 user guides)
NIC_200G = 25e9  # one 200 Gb/s ConnectX-6 per GPU (DGX A100 user guide)

_CUDA = {"reserved_gib": CUDA_RESERVED_GIB, "allocator_factor": CUDA_ALLOCATOR_FACTOR}

DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        Device(
            "h100", PEAK_BF16_FLOPS["H100"], 2 * PEAK_BF16_FLOPS["H100"], 79.6, 3.35e12,
            NVLINK4, NIC_400G, **_CUDA,
            source="H100 SXM5 80 GB datasheet (3.35 TB/s HBM3, fp8 = 2x bf16 dense)",
        ),
        Device(
            "h100-hbm2e", PEAK_BF16_FLOPS["H100"], 2 * PEAK_BF16_FLOPS["H100"], 94.5, 2.4e12,
            NVLINK4, NIC_400G, **_CUDA,
            source="H100 96 GB HBM2e at 500 W, torchtitan's Grand Teton benchmark hosts "
            "(benchmarks/llama3_h100_202412_torchtitan.md: 2.4 TB/s, 400 Gb/s RDMA per GPU)",
        ),
        Device(
            "h200", PEAK_BF16_FLOPS["H200"], 2 * PEAK_BF16_FLOPS["H200"], 140.0, 4.8e12,
            NVLINK4, NIC_400G, **_CUDA,
            source="H200 SXM 141 GB datasheet (4.8 TB/s HBM3e)",
        ),
        Device(
            "a100", PEAK_BF16_FLOPS["A100"], None, 79.2, 2.039e12, NVLINK3, NIC_200G, **_CUDA,
            source="A100 SXM 80 GB datasheet (2,039 GB/s HBM2e; no fp8 tensor cores)",
        ),
        Device(
            "b200", PEAK_BF16_FLOPS["B200"], 2 * PEAK_BF16_FLOPS["B200"], 178.0, 8.0e12,
            NVLINK5, NIC_400G, **_CUDA,
            source="HGX B200 datasheet per GPU (180 GB HBM3e, 8 TB/s)",
        ),
    )
}  # fmt: skip

ALIASES = {
    "h100 sxm": "h100",
    "h100-sxm": "h100",
    "h100sxm": "h100",
    "h200 sxm": "h200",
    "a100-80gb": "a100",
}


def cpu_device(processes_per_host: int) -> Device:
    """This machine as the target: the fp32 peak titan-train's MFU uses, and RAM and memory
    bandwidth shared by ``processes_per_host`` processes; gloo over loopback between them."""
    import torch

    from titan_core.metrics import device_peak_flops

    peak, what = device_peak_flops(torch.device("cpu"))
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    share = 1 / processes_per_host
    return Device(
        "cpu",
        bf16_flops=peak * share,  # CPU runs train in fp32: this is the fp32 peak
        fp8_flops=None,
        memory_gib=ram_gib * share,
        hbm_bytes_per_s=CPU_MEMORY_BYTES_PER_S * share,
        intra_node_bytes_per_s=GLOO_LOOPBACK_BYTES_PER_S,
        inter_node_bytes_per_s=GLOO_LOOPBACK_BYTES_PER_S,
        reserved_gib=CPU_PROCESS_GIB,
        allocator_factor=1.0,
        source=f"this machine: {what}, {ram_gib:.0f} GiB RAM, {processes_per_host} process(es)",
    )


# NOTE: measured on the 2-core CI VM (docs/planning.md), not fitted:
CPU_MEMORY_BYTES_PER_S = 30e9  # copy_ of a 256 MiB fp32 tensor, bytes read + written: 33.8 GB/s
GLOO_LOOPBACK_BYTES_PER_S = 1e9  # gloo all_reduce of 64 MiB between two local processes
CPU_PROCESS_GIB = 0.3  # resident set after importing torch and the trainer: 0.27 GiB


def find_device(name: str, processes_per_host: int) -> Device:
    """The device ``--gpu`` names (case and spacing ignored), or a UserError listing them."""
    key = " ".join(name.lower().replace("_", " ").split())
    if key == "cpu":
        return cpu_device(processes_per_host)
    key = ALIASES.get(key, key.replace(" ", "-"))
    if key not in DEVICES:
        choices = ", ".join([*DEVICES, "cpu"])
        raise UserError(f"--gpu: unknown device '{name}'; choose from {choices}")
    return DEVICES[key]
