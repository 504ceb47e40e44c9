"""1x128 activation quantisation to E4M3 (the `dsv3c.ops.fp8.act_quant` op) as a Triton kernel.

Tile: BLOCK_M rows x 128 channels per program; one float32 scale per row per 128 channels,
scale = max(amax, 1e-4) / 448 (POW2: rounded up to a power of two), xq = e4m3(clamp(x / scale, ±448)).
Divisions are correctly rounded (div_rn) so that the kernel matches the reference bit for bit.

Triton's CPU interpreter mis-rounds float32 -> e4m3 (no carry into the exponent just below a
power of two; triton-lang/triton#8322). Under the interpreter (constexpr EXACT, set by `KernelSpec.launch`)
the values are first rounded to nearest-even on the e4m3 grid in float32, so the cast is exact;
compiled kernels use the hardware's round-to-nearest-even conversion instead.

Only the @triton.jit code lives here. Block sizes, grids, launch options and host tensors come from the
code generator: its builder (`dsv3c.codegen.lowering`) makes the KernelSpecs, `KernelSpec.launch` runs
them, `KernelSpec.aot` gives their AOTSpecs; `lowering.run_op` / `lowering.aot_specs` do it for one op.
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
