"""Device helpers shared by the kernel modules: exact rounding for Triton's interpreter, FP8 tile quantisation.

Triton's CPU interpreter truncates float32 → bfloat16, mis-rounds float32 → e4m3 just below a power of
two (no carry into the exponent) and multiplies bf16 dot operands as raw bits. Under the interpreter
(constexpr EXACT, set by `family.KernelSpec.launch`) values are first rounded to nearest-even on the target grid in
float32, so the cast itself is exact; compiled kernels use the hardware conversions and skip that step.
"""

import triton
import triton.language as tl


@triton.jit
def round_bf16(y):
    """float32 y rounded to nearest-even bfloat16, still held as float32."""
    bits = y.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_e4m3(q):
    """float32 q (|q| ≤ 448) rounded to nearest-even e4m3, still held as float32 (subnormals step 2^-9)."""
    bits = q.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    a = tl.abs(q)
    sub = (a + 16384.0) - 16384.0  # float32 spacing at 2^14 is 2^-9: round-half-even to the subnormal grid
    sub = tl.where(q < 0, -sub, sub)
    return tl.where(a < 0.015625, sub, normal)


@triton.jit
def cast_out(y, dtype: tl.constexpr, EXACT: tl.constexpr):
    """float32 y converted to dtype with round-to-nearest-even (pre-rounded when EXACT, for the interpreter)."""
    if EXACT:
        if dtype == tl.bfloat16:
            y = round_bf16(y)
    return y.to(dtype)


@triton.jit
def mma_operand(x, dtype: tl.constexpr, EXACT: tl.constexpr):
    """x as a tensor-core operand of dtype (interpreted bf16 stays float32 on the bf16 grid: exact products)."""
    if EXACT:
        if dtype == tl.bfloat16:
            return round_bf16(x.to(tl.float32))
    return x.to(dtype)


@triton.jit
def quant_tiles(y, ROWS: tl.constexpr, BLOCK: tl.constexpr, POW2: tl.constexpr, EXACT: tl.constexpr):
    """Quantises float32 y [ROWS, BLOCK] in 1x128 tiles: (e4m3 values [ROWS, BLOCK], scales [ROWS, BLOCK // 128])."""
    tiles = tl.reshape(y, (ROWS, BLOCK // 128, 128))
    amax = tl.max(tl.abs(tiles), axis=2)
    scale = tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0)  # correctly rounded, like torch
    if POW2:
        scale = ((scale.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    q = tl.math.div_rn(tiles, scale[:, :, None])
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    if EXACT:
        q = round_e4m3(q)
    return tl.reshape(q, (ROWS, BLOCK)).to(tl.float8e4nv), scale
