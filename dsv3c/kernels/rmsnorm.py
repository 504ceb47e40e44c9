"""RMSNorm kernels: y = w ⊙ x / sqrt(mean(x²) + ε) over the last dim, plus a variant fused with 1x128 FP8 quant.

One program normalises one row (the whole hidden dim lives in registers, padded to a power of two).
The fused variant quantises the normed row in 1x128 tiles exactly as `dsv3c.fp8.act_quant` does:
scale = max(amax, 1e-4) / 448 per tile (optionally rounded up to a power of two), xq = e4m3(y / scale).

Interpreter helpers shared by the kernel modules live here too. Triton's CPU interpreter truncates
float32 → bfloat16, mis-rounds float32 → e4m3 just below a power of two (no carry into the exponent) and
multiplies bf16 dot operands as raw bits. Under the interpreter (constexpr EXACT, set by `launch`) the values
are first rounded to nearest-even on the target grid in float32, so the cast itself is exact; compiled
kernels use the hardware's round-to-nearest-even conversions and skip that step.
"""

import os

import torch
import triton
import triton.language as tl

QUANT_BLOCK = 128

_TL_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def interpreting() -> bool:
    """Whether Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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


@triton.jit
def rmsnorm_kernel(x_ptr, w_ptr, y_ptr, N, stride_x, stride_y, eps, BLOCK_N: tl.constexpr, EXACT: tl.constexpr):
    """One row of y = w ⊙ (x · rsqrt(mean(x²) + ε)), the normed value rounded to x's dtype before the weight."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.sum(x32 * x32, axis=0) / N + eps))
    normed = cast_out(x32 * rstd, x.dtype, EXACT).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, cast_out(w * normed, y_ptr.dtype.element_ty, EXACT), mask=mask)


@triton.jit
def rmsnorm_quant_kernel(
    x_ptr, w_ptr, q_ptr, s_ptr, N, stride_x, stride_q, stride_s, eps,
    BLOCK_N: tl.constexpr, POW2: tl.constexpr, EXACT: tl.constexpr,
):
    """One row of act_quant(rms_norm(x, w)): e4m3 values and one float32 scale per 1x128 tile."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.sum(x32 * x32, axis=0) / N + eps))
    normed = cast_out(x32 * rstd, x.dtype, EXACT).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = w * normed
    if w_ptr.dtype.element_ty == x_ptr.dtype.element_ty:  # else torch promotes the product to float32
        y = cast_out(y, x.dtype, EXACT).to(tl.float32)
    q, scale = quant_tiles(tl.reshape(y, (1, BLOCK_N)), 1, BLOCK_N, POW2, EXACT)
    tl.store(q_ptr + row * stride_q + offs, tl.reshape(q, (BLOCK_N,)), mask=mask)
    t = tl.arange(0, BLOCK_N // 128)
    tl.store(s_ptr + row * stride_s + t, tl.reshape(scale, (BLOCK_N // 128,)), mask=t < tl.cdiv(N, 128))


def _block_n(n: int, quant: bool) -> int:
    """The power-of-two row block that holds n values (at least one 128 tile when quantising)."""
    return max(triton.next_power_of_2(n), QUANT_BLOCK if quant else 16)


def _warps(block_n: int) -> int:
    """Warps per row program: enough threads for about 8 values each."""
    return max(1, min(16, block_n // 256))


def launch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., N] with weight [N], like ref.rms_norm."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    if x2.shape[0]:
        block = _block_n(n, False)
        rmsnorm_kernel[(x2.shape[0],)](
            x2, weight.contiguous(), y, n, x2.stride(0), y.stride(0), eps, BLOCK_N=block, EXACT=interpreting(),
            num_warps=_warps(block),
        )
    return y.reshape(x.shape)


def launch_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, pow2_scale: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """act_quant(rms_norm(x, weight, eps)): (xq e4m3 [..., N], scale float32 [..., ceil(N/128)])."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty(x2.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((x2.shape[0], triton.cdiv(n, QUANT_BLOCK)), dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        block = _block_n(n, True)
        rmsnorm_quant_kernel[(x2.shape[0],)](
            x2, weight.contiguous(), q, s, n, x2.stride(0), q.stride(0), s.stride(0), eps,
            BLOCK_N=block, POW2=pow2_scale, EXACT=interpreting(), num_warps=_warps(block),
        )
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], s.shape[-1])


def aot_spec(rows: int = 4096, n: int = 7168, dtype: torch.dtype = torch.bfloat16, quant: bool = False,
             pow2_scale: bool = False):
    """AOTSpec of the (quant-fused) RMSNorm of `rows` rows of n `dtype` values (the 671B hidden size by default)."""
    from dsv3c.triton_aot import AOTSpec

    t = _TL_DTYPE[dtype]
    block = _block_n(n, quant)
    if quant:
        sig = {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "N": "i32",
               "stride_x": "i32", "stride_q": "i32", "stride_s": "i32", "eps": "fp32"}
        consts = {"BLOCK_N": block, "POW2": pow2_scale, "EXACT": False}
        fn = rmsnorm_quant_kernel
    else:
        sig = {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "y_ptr": f"*{t}", "N": "i32", "stride_x": "i32",
               "stride_y": "i32", "eps": "fp32"}
        consts = {"BLOCK_N": block, "EXACT": False}
        fn = rmsnorm_kernel
    div16 = tuple(a for a in sig if a.endswith("_ptr") or (a.startswith("stride") and n % 16 == 0))
    return AOTSpec(fn=fn, signature=sig, constexprs=consts, num_warps=_warps(block), num_stages=1, grid=(rows, 1, 1),
                   divisible_by_16=div16)
