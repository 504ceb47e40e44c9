"""1x128 activation quantisation to E4M3 (the `dsv3c.ops.fp8.act_quant` op) as a Triton kernel.

Tile: BLOCK_M rows x 128 channels per program; one float32 scale per row per 128 channels,
scale = max(amax, 1e-4) / 448 (POW2: rounded up to a power of two), xq = e4m3(clamp(x / scale, ±448)).
Divisions are correctly rounded (div_rn) so that the kernel matches the reference bit for bit.

Triton's CPU interpreter mis-rounds float32 -> e4m3 (no carry into the exponent just below a
power of two; triton-lang/triton#8322). Under the interpreter (constexpr EXACT, set by `KernelSpec.launch`)
the values are first rounded to nearest-even on the e4m3 grid in float32, so the cast is exact;
compiled kernels use the hardware's round-to-nearest-even conversion instead.

After the @triton.jit code: the family's tile table, its KernelSpec builders (`k_*`), and the builder and
runner of each op lowered to it (`dsv3c.codegen.family` says what each is), with their imports, so that
editing the host side moves no kernel (Triton's cache key holds a kernel's first line number).
"""

import triton
import triton.language as tl

from dsv3c.codegen.kernels.common import round_e4m3


@triton.jit
def act_quant_kernel(x_ptr, y_ptr, s_ptr, M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     POW2: tl.constexpr, EXACT: tl.constexpr):
    """1xBLOCK_K quantisation of a BLOCK_M x BLOCK_K tile of x [M, K] into y (e4m3) and s [M, ceil(K/BLOCK_K)]."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0)
    if POW2:  # round up to a power of two (UE8M0): carry any mantissa bit into the exponent
        scale = ((scale.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    q = tl.math.div_rn(x, scale[:, None])
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    if EXACT:
        q = round_e4m3(q)
    tl.store(y_ptr + offs, q.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + rows.to(tl.int64) * tl.cdiv(K, BLOCK_K) + pid_k, scale, mask=rows < M)


# ---- host side ------------------------------------------------------------------------------------------

import torch
from torch import Tensor

from dsv3c.codegen.family import QUANT_BLOCK, KernelSpec, cdiv, kspec, p2, row_count
from dsv3c.codegen.tiles import TileTable, Tiles, hopper
from dsv3c.ops import fp8

TILES = TileTable("act_quant", hopper(dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=1)))  # BLOCK_N: one quant group


def k_act_quant(m: int, k: int, xd, pow2: bool, tiles: Tiles) -> KernelSpec:
    """1x128 quantisation of an [m, k] activation."""
    cfg = tiles(TILES)
    bm = max(1, min(cfg["BLOCK_M"], p2(m)))
    return kspec(f"{__name__}:act_quant_kernel",
                 ptrs={"x_ptr": xd, "y_ptr": fp8.FP8, "s_ptr": torch.float32}, ints={"M": m, "K": k},
                 consts={"BLOCK_M": bm, "BLOCK_K": QUANT_BLOCK, "POW2": bool(pow2), "EXACT": False}, cfg=cfg,
                 grid=(cdiv(m, bm), cdiv(k, QUANT_BLOCK)), shapes={"M": m, "K": k},
                 tag=f"act_quant_{m}x{k}" + ("_pow2" if pow2 else ""))


def run_act_quant_rows(kq: KernelSpec, x2: Tensor) -> tuple[Tensor, Tensor]:
    """(E4M3 codes, scales) of x2 [m, k] by the act_quant kernel kq."""
    m, k = x2.shape
    q = torch.empty(m, k, dtype=fp8.FP8, device=x2.device)
    s = torch.empty(m, cdiv(k, QUANT_BLOCK), dtype=torch.float32, device=x2.device)
    if m and k:
        kq.launch(x_ptr=x2.contiguous(), y_ptr=q, s_ptr=s)
    return q, s


def build_act_quant(ins, outs, attrs, tiles):
    """act_quant(x [..., K], pow2_scale): one quantisation kernel."""
    (xs, xd), = ins
    return (k_act_quant(row_count(xs), xs[-1], xd, attrs["pow2_scale"], tiles),), ()


def run_act_quant(call, x):
    (k,) = call.kernels
    q, s = run_act_quant_rows(k, x.reshape(-1, x.shape[-1]))
    return [q.reshape(x.shape), s.reshape(*x.shape[:-1], s.shape[-1])]
