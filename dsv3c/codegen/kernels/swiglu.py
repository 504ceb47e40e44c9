"""SwiGLU kernels: h = silu(gate) ⊙ up over [M, F], plus a variant fused with 1x128 FP8 quantisation of h.

gate and up are [..., F] tensors with unit stride along F (they may be the two halves of one fused
gate_up GEMM output). One program covers BLOCK_M rows x BLOCK_F columns; BLOCK_F is a multiple of 128
in the fused variant so that each 1x128 tile's amax is a register reduction. Rounding follows torch:
silu(gate) is rounded to the input dtype before the product.

After the @triton.jit code: the family's tile table, its KernelSpec builders (`k_*`), and the builder and
runner of each op lowered to it (`dsv3c.codegen.family` says what each is), with their imports, so that
editing the host side moves no kernel (Triton's cache key holds a kernel's first line number).
"""

import triton
import triton.language as tl

from dsv3c.codegen.kernels.common import cast_out, quant_tiles


@triton.jit
def _swiglu_tile(g_ptr, u_ptr, M, F, sg, su, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, EXACT: tl.constexpr):
    """This program's (rows, cols, mask, h) with h = silu(g) ⊙ u rounded like torch, as float32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < M) & (cols[None, :] < F)
    r64 = rows[:, None].to(tl.int64)
    g = tl.load(g_ptr + r64 * sg + cols[None, :], mask=mask, other=0.0)
    u = tl.load(u_ptr + r64 * su + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g32 = g.to(tl.float32)
    silu = cast_out(g32 / (1.0 + tl.exp(-g32)), g.dtype, EXACT).to(tl.float32)
    h = cast_out(silu * u, g.dtype, EXACT).to(tl.float32)
    return rows, cols, mask, h


@triton.jit
def swiglu_kernel(
    g_ptr, u_ptr, h_ptr, M, F, sg, su, sh,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, EXACT: tl.constexpr,
):
    """h[m, f] = silu(gate[m, f]) · up[m, f] for one BLOCK_M x BLOCK_F tile."""
    rows, cols, mask, h = _swiglu_tile(g_ptr, u_ptr, M, F, sg, su, BLOCK_M, BLOCK_F, EXACT)
    tl.store(h_ptr + rows[:, None].to(tl.int64) * sh + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_quant_kernel(
    g_ptr, u_ptr, q_ptr, s_ptr, M, F, sg, su, sq, ss,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, POW2: tl.constexpr, EXACT: tl.constexpr,
):
    """act_quant(silu(gate) · up) for one tile: e4m3 values and a float32 scale per 1x128 tile."""
    rows, cols, mask, h = _swiglu_tile(g_ptr, u_ptr, M, F, sg, su, BLOCK_M, BLOCK_F, EXACT)
    q, scale = quant_tiles(h, BLOCK_M, BLOCK_F, POW2, EXACT)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * sq + cols[None, :], q, mask=mask)
    t = tl.program_id(1) * (BLOCK_F // 128) + tl.arange(0, BLOCK_F // 128)
    smask = (rows[:, None] < M) & (t[None, :] < tl.cdiv(F, 128))
    tl.store(s_ptr + rows[:, None].to(tl.int64) * ss + t[None, :], scale, mask=smask)


# ---- host side ------------------------------------------------------------------------------------------

import torch
from torch import Tensor

from dsv3c.codegen.family import QUANT_BLOCK, KernelSpec, cdiv, kspec, p2, row_count, variant
from dsv3c.codegen.tiles import TileTable, Tiles, hopper
from dsv3c.ops import fp8

TILES = TileTable("swiglu", hopper(dict(BLOCK_M=1, BLOCK_N=1024, num_warps=4, num_stages=1)))


def _swiglu_blocks(m: int, f: int, quant: bool, cfg: dict) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_F): at most BLOCK_N columns (whole 1x128 groups when quantising), 4096 elements a tile."""
    block_f = max(min(p2(f), cfg["BLOCK_N"]), 128 if quant else 16)
    return max(1, min(p2(m), 4096 // block_f)), block_f


def k_swiglu(m: int, f: int, dt, tiles: Tiles) -> KernelSpec:
    """silu(gate) ⊙ up over [m, f]."""
    cfg = tiles(TILES)
    bm, bf = _swiglu_blocks(m, f, False, cfg)
    return kspec(f"{__name__}:swiglu_kernel", ptrs={"g_ptr": dt, "u_ptr": dt, "h_ptr": dt},
                 ints={"M": m, "F": f, "sg": f, "su": f, "sh": f},
                 consts={"BLOCK_M": bm, "BLOCK_F": bf, "EXACT": False}, cfg=cfg, grid=(cdiv(m, bm), cdiv(f, bf)),
                 shapes={"M": m, "F": f}, tag=f"swiglu_{m}x{f}")


def k_swiglu_quant(m: int, f: int, dt, tiles: Tiles, pow2: bool = False) -> KernelSpec:
    """SwiGLU fused with 1x128 E4M3 quantisation of the [m, f] result."""
    cfg = tiles(TILES)
    bm, bf = _swiglu_blocks(m, f, True, cfg)
    ptrs = {"g_ptr": dt, "u_ptr": dt, "q_ptr": fp8.FP8, "s_ptr": torch.float32}
    return kspec(f"{__name__}:swiglu_quant_kernel", ptrs=ptrs,
                 ints={"M": m, "F": f, "sg": f, "su": f, "sq": f, "ss": cdiv(f, QUANT_BLOCK)},
                 consts={"BLOCK_M": bm, "BLOCK_F": bf, "POW2": bool(pow2), "EXACT": False}, cfg=cfg,
                 grid=(cdiv(m, bm), cdiv(f, bf)), shapes={"M": m, "F": f},
                 tag=f"swiglu_quant_{m}x{f}" + ("_pow2" if pow2 else ""))


def run_swiglu_quant_rows(k: KernelSpec, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """(E4M3 codes, scales) of swiglu(gate, up) for [m, f] rows by the swiglu_quant kernel k."""
    m, f = gate.shape
    hq = torch.empty(m, f, dtype=fp8.FP8, device=gate.device)
    hs = torch.empty(m, cdiv(f, QUANT_BLOCK), dtype=torch.float32, device=gate.device)
    if hq.numel():
        k.launch(g_ptr=gate.contiguous(), u_ptr=up.contiguous(), q_ptr=hq, s_ptr=hs)
    return hq, hs


def build_swiglu(ins, outs, attrs, tiles):
    """swiglu(gate, up): one SwiGLU kernel."""
    (gs, gd), _ = ins
    return (k_swiglu(row_count(gs), gs[-1], gd, tiles),), ()


def run_swiglu(call, gate, up):
    (k,) = call.kernels
    f = gate.shape[-1]
    h = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if h.numel():
        k.launch(g_ptr=gate.reshape(-1, f).contiguous(), u_ptr=up.reshape(-1, f).contiguous(), h_ptr=h)
    return [h]


def build_swiglu_quant(ins, outs, attrs, tiles):
    """act_quant(swiglu(gate, up)) in one kernel (the MoE runner's middle step); attr pow2_scale."""
    (gs, gd), _ = ins
    return (k_swiglu_quant(row_count(gs), gs[-1], gd, tiles, attrs.get("pow2_scale", False)),), ()


def run_swiglu_quant(call, gate, up):
    (k,) = call.kernels
    f = gate.shape[-1]
    q, s = run_swiglu_quant_rows(k, gate.reshape(-1, f), up.reshape(-1, f))
    return [q.reshape(gate.shape), s.reshape(*gate.shape[:-1], s.shape[-1])]


variant(__name__, "swiglu_quant", pow2_scale=False)
