"""RMSNorm kernels: y = w ⊙ x / sqrt(mean(x²) + ε) over the last dim, plus a variant fused with 1x128 FP8 quant.

One program normalises one row (the whole hidden dim lives in registers, padded to a power of two).
The fused variant quantises the normed row in 1x128 tiles exactly as `dsv3c.ops.fp8.act_quant` does:
scale = max(amax, 1e-4) / 448 per tile (optionally rounded up to a power of two), xq = e4m3(y / scale).
Interpreter rounding (EXACT) is explained in `dsv3c.codegen.kernels.common`.

Only the @triton.jit code lives here. Block sizes, grids, launch options and host tensors come from the
code generator: its builder (`dsv3c.codegen.lowering`) makes the KernelSpecs, `KernelSpec.launch` runs
them, `KernelSpec.aot` gives their AOTSpecs; `lowering.run_op` / `lowering.aot_specs` do it for one op.
"""

import triton
import triton.language as tl

from dsv3c.codegen.kernels.common import cast_out, quant_tiles

@triton.jit
def weighted_norm_row(x_ptr, w_ptr, row, offs, mask, N, stride_x, eps, EXACT: tl.constexpr):
    """float32 w ⊙ (x · rsqrt(mean(x²) + ε)) of one row, the normed value rounded to x's dtype first."""
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.sum(x32 * x32, axis=0) / N + eps))
    normed = cast_out(x32 * rstd, x.dtype, EXACT).to(tl.float32)
    return tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32) * normed


@triton.jit
def rmsnorm_kernel(x_ptr, w_ptr, y_ptr, N, stride_x, stride_y, eps, BLOCK_N: tl.constexpr, EXACT: tl.constexpr):
    """One row of y = w ⊙ (x · rsqrt(mean(x²) + ε)), the normed value rounded to x's dtype before the weight."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    y = weighted_norm_row(x_ptr, w_ptr, row, offs, mask, N, stride_x, eps, EXACT)
    tl.store(y_ptr + row * stride_y + offs, cast_out(y, y_ptr.dtype.element_ty, EXACT), mask=mask)


@triton.jit
def rmsnorm_quant_kernel(
    x_ptr, w_ptr, q_ptr, s_ptr, N, stride_x, stride_q, stride_s, eps,
    BLOCK_N: tl.constexpr, POW2: tl.constexpr, EXACT: tl.constexpr,
):
    """One row of act_quant(rms_norm(x, w)): e4m3 values and one float32 scale per 1x128 tile."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    y = weighted_norm_row(x_ptr, w_ptr, row, offs, mask, N, stride_x, eps, EXACT)
    if w_ptr.dtype.element_ty == x_ptr.dtype.element_ty:  # else torch promotes the product to float32
        y = cast_out(y, x_ptr.dtype.element_ty, EXACT).to(tl.float32)
    q, scale = quant_tiles(tl.reshape(y, (1, BLOCK_N)), 1, BLOCK_N, POW2, EXACT)
    tl.store(q_ptr + row * stride_q + offs, tl.reshape(q, (BLOCK_N,)), mask=mask)
    t = tl.arange(0, BLOCK_N // 128)
    tl.store(s_ptr + row * stride_s + t, tl.reshape(scale, (BLOCK_N // 128,)), mask=t < tl.cdiv(N, 128))
