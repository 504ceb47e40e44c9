"""GPU specifications: the per-device numbers the cost model, topology and tile tables read.

Units: bytes, bytes/s, FLOP/s (dense, no sparsity). Bandwidth conventions:

- `nvlink_bandwidth` is NVIDIA's quoted per-GPU NVLink figure (aggregate of both directions:
  400 GB/s on H800, 900 GB/s on H100/H200); it labels the NVLink edges of the topology.
- `nvlink_achieved` is the throughput one GPU sustains in one direction in practice (DeepEP measures
  about 160 GB/s on H800); the cost model uses it. For H100/H200/H20 it is an estimate at the same 80 %
  of the one-direction nominal (450 GB/s) as H800's 160 of 200.
- `pcie_bandwidth` is PCIe Gen5 x16, one direction, GPU to NIC.
- `hbm_bytes` is the memory the driver reports (nvidia-smi: 81559 MiB for the 80 GB parts,
  143771 MiB for H200's 141 GB, 97871 MiB for H20's 96 GB).

H20 (Hopper, sm_90a; NVIDIA H20 Tensor Core GPU datasheet): 96 GB HBM3 at 4.0 TB/s, 148 TFLOPS dense BF16,
296 TFLOPS dense FP8, NVLink 900 GB/s, PCIe Gen5 (128 GB/s both directions). The datasheet gives no SM
count; 78 SMs is what the device reports (CUDA deviceQuery / Geekbench 6 listings of the H20).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import TargetError

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class GPUSpec:
    """One GPU model: compute, memory, links and per-SM resources."""

    name: str
    arch: str  # Triton/PTX target, e.g. "sm_90a"
    sms: int
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    bf16_flops: float  # dense FLOP/s
    fp8_flops: float  # dense FLOP/s
    nvlink_bandwidth: float  # quoted per-GPU figure, both directions, bytes/s
    nvlink_achieved: float  # sustained one direction, bytes/s
    pcie_bandwidth: float = 64e9  # Gen5 x16, one direction, bytes/s
    smem_per_sm: int = 228 * KiB
    smem_per_block: int = 227 * KiB  # the most one thread block may opt into
    registers_per_sm: int = 65536  # 32-bit registers
    max_threads_per_sm: int = 2048
    l2_bytes: int = 50 * MiB

    def peak_flops(self, dtype: str) -> float:
        """Dense tensor-core peak in FLOP/s for dtype "bf16" or "fp8"."""
        if dtype == "bf16":
            return self.bf16_flops
        if dtype == "fp8":
            return self.fp8_flops
        raise TargetError(f"unknown matmul dtype {dtype!r} (known: bf16, fp8)")


_HOPPER = dict(arch="sm_90a", sms=132, bf16_flops=989e12, fp8_flops=1979e12)

GPUS: dict[str, GPUSpec] = {
    "h800": GPUSpec(name="h800", hbm_bytes=81559 * MiB, hbm_bandwidth=3.35e12,
                    nvlink_bandwidth=400e9, nvlink_achieved=160e9, **_HOPPER),
    "h100": GPUSpec(name="h100", hbm_bytes=81559 * MiB, hbm_bandwidth=3.35e12,
                    nvlink_bandwidth=900e9, nvlink_achieved=360e9, **_HOPPER),
    "h200": GPUSpec(name="h200", hbm_bytes=143771 * MiB, hbm_bandwidth=4.8e12,
                    nvlink_bandwidth=900e9, nvlink_achieved=360e9, **_HOPPER),
    "h20": GPUSpec(name="h20", arch="sm_90a", sms=78, hbm_bytes=97871 * MiB, hbm_bandwidth=4.0e12,
                   bf16_flops=148e12, fp8_flops=296e12, nvlink_bandwidth=900e9, nvlink_achieved=360e9),
}


def gpu_spec(name: str | GPUSpec) -> GPUSpec:
    """The GPUSpec for a GPU name ("h800", "h100", "h200", "h20"; case-insensitive), or the spec itself."""
    if isinstance(name, GPUSpec):
        return name
    key = str(name).strip().lower()
    if key not in GPUS:
        raise TargetError(f"unknown GPU {name!r} (known GPUs: {', '.join(sorted(GPUS))})")
    return GPUS[key]

def as_gpu_spec(gpu) -> GPUSpec:
    """The GPUSpec of a spec, a GPU name, or a Target."""
    return gpu.gpu if hasattr(gpu, "gpu") and isinstance(gpu.gpu, GPUSpec) else gpu_spec(gpu)


MODES = ("train", "prefill", "decode")

def compute_sms(target, mode: str) -> int:
    """SMs left to compute kernels: all SMs in decode, sms - comm_sms in train and prefill."""
    if mode not in MODES:
        raise TargetError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    return target.gpu.sms if mode == "decode" else target.gpu.sms - target.comm_sms
