"""SwiGLU kernels: h = silu(gate) ⊙ up over [M, F], plus a variant fused with 1x128 FP8 quantisation of h.

gate and up are [..., F] tensors with unit stride along F (they may be the two halves of one fused
gate_up GEMM output). One program covers BLOCK_M rows x BLOCK_F columns; BLOCK_F is a multiple of 128
in the fused variant so that each 1x128 tile's amax is a register reduction. Rounding follows torch:
silu(gate) is rounded to the input dtype before the product.

Only the @triton.jit code lives here. Block sizes, grids, launch options and host tensors come from the
code generator: its builder (`dsv3c.codegen.lowering`) makes the KernelSpecs, `KernelSpec.launch` runs
them, `KernelSpec.aot` gives their AOTSpecs; `lowering.run_op` / `lowering.aot_specs` do it for one op.
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
