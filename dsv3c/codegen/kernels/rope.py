"""Interleaved (YaRN) RoPE kernel: pairs (x[2i], x[2i+1]) of x [B, S, H, d] rotate by cos/sin [B, S, d/2].

One program handles one token (b, s) and a block of heads; the token's cos/sin row is read once and
broadcast over the heads. x is loaded as contiguous rows and split into (even, odd) pairs in registers.
Arithmetic in float32, output in x's dtype (like ref.rope). The YaRN frequencies and mscale live in cos/sin.

Only the @triton.jit code lives here. Block sizes, grids, launch options and host tensors come from the
code generator: its builder (`dsv3c.codegen.lowering`) makes the KernelSpecs, `KernelSpec.launch` runs
them, `KernelSpec.aot` gives their AOTSpecs; `lowering.run_op` / `lowering.aot_specs` do it for one op.
"""

import triton
import triton.language as tl

from dsv3c.codegen.kernels.common import cast_out


@triton.jit
def rope_kernel(
    x_ptr, cos_ptr, sin_ptr, y_ptr, S, H, HALF,
    sxb, sxs, sxh, scb, scs, ssb, sss, syb, sys, syh,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, EXACT: tl.constexpr,
):
    """One token, BLOCK_H heads: y[2i] = x[2i]·cos_i − x[2i+1]·sin_i, y[2i+1] = x[2i]·sin_i + x[2i+1]·cos_i."""
    tok = tl.program_id(0)
    b = (tok // S).to(tl.int64)
    s = (tok % S).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    c = tl.load(cos_ptr + b * scb + s * scs + i, mask=i < HALF, other=0.0).to(tl.float32)
    sn = tl.load(sin_ptr + b * ssb + s * sss + i, mask=i < HALF, other=0.0).to(tl.float32)
    d = tl.arange(0, 2 * BLOCK_HALF)
    mask = (heads[:, None] < H) & (d[None, :] < 2 * HALF)
    x = tl.load(x_ptr + b * sxb + s * sxs + heads[:, None].to(tl.int64) * sxh + d[None, :], mask=mask, other=0.0)
    x0, x1 = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_H, BLOCK_HALF, 2)))
    y0 = x0 * c[None, :] - x1 * sn[None, :]
    y1 = x0 * sn[None, :] + x1 * c[None, :]
    y = tl.reshape(tl.join(y0, y1), (BLOCK_H, 2 * BLOCK_HALF))
    out = y_ptr + b * syb + s * sys + heads[:, None].to(tl.int64) * syh + d[None, :]
    tl.store(out, cast_out(y, y_ptr.dtype.element_ty, EXACT), mask=mask)
