"""Kernel times calibrated on published kernel measurements: GEMMs, attention, MLA decode, memory-bound kernels.

Each function is pure and reads its constants from `c` (name -> value; None: the calibrated defaults of
`dsv3c.cost.calibration_constants`). Times are kernel durations as the published benchmarks measure them (GPU time,
no launch gap: add `launch_seconds` per kernel). `gpu` is a `targets.gpus.GPUSpec`; its own datasheet peaks
(SMs, HBM bandwidth, BF16/FP8 tensor peak) are used with the H800-calibrated efficiencies
(`calibration_constants.calibration_note`). `sms` is the number of SMs the kernel may use (train/prefill leave
`comm_sms` of them to dispatch/combine); None means all.
"""

from __future__ import annotations

from functools import lru_cache
from math import ceil

from dsv3c.cost.calibration_constants import values
from dsv3c.ops.record import causal_pairs

DTYPE_BYTES = {"fp8": 1, "bf16": 2}
OUT_BYTES = 2  # BF16 outputs
# DeepGEMM's tile candidates (deep_gemm/jit_kernels/gemm.py at a9967bc; the contiguous layout aligns groups to
# 128 rows). DeepGEMM picks the fewest waves, then the fullest last wave; we take the least work on the busiest
# SM (waves x tile area): within 3% of its choice on the published shapes, and t(m) stays monotone.
BLOCK_M = {"dense": (64, 128, 256), "masked": (64, 128, 256), "contiguous": (128,)}
BLOCK_N = tuple(range(16, 129, 8)) + (144, 160)


def _check_sms(gpu, sms: int | None) -> int:
    """The SM count a kernel runs on (all of gpu's when None)."""
    sms = gpu.sms if sms is None else sms
    if not 0 < sms <= gpu.sms:
        raise ValueError(f"sms {sms} must be in 1..{gpu.sms}")
    return sms


@lru_cache(maxsize=65536)
def tile_area_per_sm(m: int, n: int, groups: int, sms: int, layout: str) -> int:
    """Output elements the busiest SM computes with the best tile: min over tiles of waves x tile area."""
    best = None
    for bm in BLOCK_M[layout]:
        for bn in BLOCK_N:
            if bm > 128 and bn > 128:
                continue
            area = ceil(groups * ceil(m / bm) * ceil(n / bn) / sms) * bm * bn
            best = area if best is None else min(best, area)
    return best


def gemm_seconds(m: int, n: int, k: int, *, groups: int = 1, dtype: str = "fp8", layout: str = "dense", gpu,
                 sms: int | None = None, c=None) -> float:
    """Seconds of `groups` [m,k] x [n,k]^T GEMMs (m rows per group), DeepGEMM-like, on `sms` SMs of gpu.

    compute = waves x tile time on the busiest SM (K stretched by a per-tile fill), memory = bytes at the
    achieved HBM bandwidth; t = fixed + max(compute, memory) + overlap x min(compute, memory).
    layout: "dense", "contiguous" (grouped, training/prefill) or "masked" (grouped decode, every row valid).
    BF16 GEMMs use the same efficiencies at the BF16 datasheet peak (DeepGEMM's tables are FP8 only).
    """
    if dtype not in DTYPE_BYTES or layout not in BLOCK_M:
        raise ValueError(f"unknown GEMM dtype {dtype!r} or layout {layout!r}")
    if min(m, n, k, groups) < 0:
        raise ValueError(f"GEMM sizes must be >= 0, got m={m} n={n} k={k} groups={groups}")
    sms = _check_sms(gpu, sms)
    if not m * n * k * groups:
        return 0.0
    c = values(c)
    per_sm = gpu.peak_flops(dtype) / gpu.sms * c["gemm_tensor_efficiency"]
    compute = 2 * tile_area_per_sm(m, n, groups, sms, layout) * (k + c["gemm_tile_fill_k"]) / per_sm
    nbytes = groups * ((m * k + n * k) * DTYPE_BYTES[dtype] + m * n * OUT_BYTES)
    memory = nbytes / (gpu.hbm_bandwidth * c["gemm_hbm_efficiency"])
    return c["gemm_fixed_us"] * 1e-6 + max(compute, memory) + c["gemm_overlap"] * min(compute, memory)


def _flops_per_pair(dqk: int, dv: int, direction: str) -> int:
    """FLOPs per (query, key) pair: forward QK and PV; backward recomputed QK, dV, dP, dQ, dK."""
    return 2 * (dqk + dv) if direction == "fwd" else 2 * (3 * dqk + 2 * dv)


def attention_seconds(*, b: int, h: int, s: int, t: int, dqk: int, dv: int, causal: bool = True,
                      direction: str = "fwd", gpu, sms: int | None = None, c=None) -> float:
    """Seconds of FlashAttention-3-like attention: b sequences, h heads, s queries at the end of t keys.

    BF16 tensor time of the executed pairs at an efficiency interpolated over the mean head dim (dqk+dv)/2
    between the head-dim-128 and 256 fits (held outside). Executed pairs: the visible ones, plus per query a
    fitted overhead of `short_keys` pairs (work-unit fill and epilogue: short sequences are slower) and, under
    the causal mask, `causal_extra_pairs` (diagonal tiles, masking). The backward uses its own fit at head
    dim 128, scaled to other head dims as the forward is (FA3 publishes no backward at 256). FA3 was measured
    on H100 SXM, whose SMs, clocks, BF16 peak (989 TFLOPS) and HBM equal H800's: the efficiencies carry over.
    """
    if direction not in ("fwd", "bwd"):
        raise ValueError(f"attention direction must be 'fwd' or 'bwd', got {direction!r}")
    if min(b, h, s, dqk, dv) < 0 or t < s:
        raise ValueError(f"attention needs sizes >= 0 and t >= s, got b={b} h={h} s={s} t={t}")
    sms = _check_sms(gpu, sms)
    if not b * h * s * (dqk + dv):
        return 0.0
    c = values(c)
    weight = min(max(((dqk + dv) / 2 - 128) / 128, 0.0), 1.0)
    lo, hi = c["attn_fwd_efficiency_hd128"], c["attn_fwd_efficiency_hd256"]
    eff = lo + (hi - lo) * weight
    if direction == "bwd":
        eff *= c["attn_bwd_efficiency_hd128"] / lo
    pairs = causal_pairs(s, t) + c["attn_causal_extra_pairs"] * s if causal else s * t
    pairs += (c["attn_fwd_short_keys"] if direction == "fwd" else c["attn_bwd_short_keys"]) * s
    return b * h * pairs * _flops_per_pair(dqk, dv, direction) / (gpu.bf16_flops * sms / gpu.sms * eff)


def mla_decode_flops_bytes(*, b: int, s: int, t: int, h: int, r: int, dr: int) -> tuple[int, int]:
    """(FLOPs, HBM bytes) of absorbed MLA decode as FlashMLA counts them (BF16 latent cache of r + dr per key)."""
    d, dv = r + dr, r
    return 2 * b * s * t * h * (d + dv), 2 * (b * t * d + b * s * h * (d + dv))


def mla_decode_seconds(*, b: int, s: int, t: int, h: int, r: int, dr: int, gpu, sms: int | None = None,
                       c=None) -> float:
    """Seconds of absorbed MLA decode (FlashMLA-like): b sequences, s new tokens, t cached keys, h heads.

    fixed + max(bytes / achieved HBM, FLOPs / achieved BF16 peak on `sms` SMs) + overlap x min(...).
    """
    if min(b, s, t, h, r, dr) < 0:
        raise ValueError(f"MLA decode sizes must be >= 0, got b={b} s={s} t={t} h={h} r={r} dr={dr}")
    sms = _check_sms(gpu, sms)
    if not b * s * h:
        return 0.0
    c = values(c)
    flops, nbytes = mla_decode_flops_bytes(b=b, s=s, t=t, h=h, r=r, dr=dr)
    compute = flops / (gpu.bf16_flops * sms / gpu.sms * c["mla_tensor_efficiency"])
    memory = nbytes / (gpu.hbm_bandwidth * c["mla_hbm_efficiency"])
    return c["mla_fixed_us"] * 1e-6 + max(compute, memory) + c["mla_overlap"] * min(compute, memory)


def launch_seconds(n_kernels: int, c=None) -> float:
    """Launch gaps of n_kernels dependent kernels."""
    return n_kernels * values(c)["kernel_launch_us"] * 1e-6


def memory_seconds(nbytes: float, *, gpu, c=None) -> float:
    """Seconds of a memory-bound kernel (quantisation, norm, SwiGLU, RoPE, ...) moving nbytes, launch included."""
    if nbytes < 0:
        raise ValueError(f"bytes must be >= 0, got {nbytes}")
    c = values(c)
    return launch_seconds(1, c) + nbytes / (gpu.hbm_bandwidth * c["hbm_efficiency"])
