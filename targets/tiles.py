"""Per-GPU Triton tile configurations the lowering looks up, with a shared-memory estimate.

Tables are per architecture (Hopper: sm_90/sm_90a). FP8 GEMMs use BLOCK_K = 128 so that one K block is
one promotion interval (N_C = 128: FP32 accumulation on CUDA cores every 128 elements of K) and one
1x128 activation / 128x128 weight scale group. MLA decode reads the paged latent cache in blocks of
64 tokens (PAGE_SIZE 64). Sizes that depend on the model (latent 512 + rope 64 for MLA decode,
192/128 head dims for prefill attention) are DeepSeek-V3's; the lowering may override them.

`shared_bytes` estimates the shared memory a config stages (pipelined input tiles x num_stages plus
resident tiles); `tile_config` drops stages until it fits the GPU's per-block limit (227 KiB on
Hopper) and raises TargetError if even one stage does not.
"""

from __future__ import annotations

from .errors import TargetError
from .gpus import as_gpu_spec, compute_sms

FAMILIES = ("fp8_gemm", "grouped_fp8_gemm", "act_quant", "rmsnorm", "rope", "swiglu", "router",
            "mla_decode", "attention_prefill")
MODES = ("train", "prefill", "decode")

_GEMM_BIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
_GEMM_SMALL = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)

# family -> mode -> config (sm_90a). Keys beyond num_warps/num_stages are Triton constexprs.
HOPPER = {
    "fp8_gemm": {"train": _GEMM_BIG, "prefill": _GEMM_BIG, "decode": _GEMM_SMALL},
    "grouped_fp8_gemm": {"train": _GEMM_BIG, "prefill": _GEMM_BIG, "decode": _GEMM_SMALL},
    "act_quant": dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=1),  # BLOCK_N = 1x128 quant group
    "rmsnorm": dict(BLOCK_M=1, BLOCK_N=8192, num_warps=8, num_stages=1),  # one row; longer rows loop
    "rope": dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=1),  # 16 heads x 64 rope dims
    "swiglu": dict(BLOCK_M=1, BLOCK_N=1024, num_warps=4, num_stages=1),
    "router": dict(BLOCK_M=16, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=2),  # 256 experts
    "mla_decode": dict(BLOCK_H=32, BLOCK_N=64, PAGE_SIZE=64, BLOCK_DV=512, BLOCK_DPE=64,
                       num_warps=4, num_stages=2),
    "attention_prefill": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_DQK=192, BLOCK_DV=128, num_warps=8, num_stages=3),
}
TABLES = {"sm_90a": HOPPER, "sm_90": HOPPER}


def shared_bytes(family: str, c: dict) -> int:
    """Estimated shared memory (bytes) a config of a family stages."""
    s = c["num_stages"]
    if family in ("fp8_gemm", "grouped_fp8_gemm"):  # fp8 A and B tiles, fp32 scales of A rows and the B block
        return s * (c["BLOCK_M"] * c["BLOCK_K"] + c["BLOCK_N"] * c["BLOCK_K"] + 4 * c["BLOCK_M"] + 4)
    if family == "router":  # bf16 tokens and gate rows
        return s * 2 * (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"]
    if family == "mla_decode":  # resident q, pipelined latent+rope KV pages, P tile (bf16)
        d = c["BLOCK_DV"] + c["BLOCK_DPE"]
        return 2 * (c["BLOCK_H"] * d + s * c["BLOCK_N"] * d + c["BLOCK_H"] * c["BLOCK_N"])
    if family == "attention_prefill":  # resident q, pipelined K and V (bf16)
        return 2 * (c["BLOCK_M"] * c["BLOCK_DQK"] + s * c["BLOCK_N"] * (c["BLOCK_DQK"] + c["BLOCK_DV"]))
    return s * 4 * c["BLOCK_M"] * c["BLOCK_N"]  # row kernels: one fp32 tile for reductions


def tile_config(gpu_name, family: str, mode: str = "train") -> dict:
    """The tile config (BLOCK_*, num_warps, num_stages, shared_bytes, arch) of a kernel family on a GPU."""
    gpu = as_gpu_spec(gpu_name)
    if family not in FAMILIES:
        raise TargetError(f"unknown kernel family {family!r} (known: {', '.join(FAMILIES)})")
    if mode not in MODES:
        raise TargetError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    if gpu.arch not in TABLES:
        raise TargetError(f"no tile table for arch {gpu.arch!r} of GPU {gpu.name} (known: {', '.join(TABLES)})")
    entry = TABLES[gpu.arch][family]
    c = dict(entry[mode] if mode in entry else entry)  # per-mode entries, or one for all modes
    while shared_bytes(family, c) > gpu.smem_per_block and c["num_stages"] > 1:
        c["num_stages"] -= 1
    c["shared_bytes"] = shared_bytes(family, c)
    if c["shared_bytes"] > gpu.smem_per_block:
        raise TargetError(f"{family} tiles need {c['shared_bytes']} B of shared memory; "
                          f"{gpu.name} allows {gpu.smem_per_block} B per block")
    c["arch"] = gpu.arch
    return c


def grid_sms(target, mode: str) -> int:
    """SMs a compute kernel's persistent grid may occupy in a mode (see targets.compute_sms)."""
    return compute_sms(target, mode)
