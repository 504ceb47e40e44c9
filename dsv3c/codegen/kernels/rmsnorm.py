"""RMSNorm kernels: y = w ⊙ x / sqrt(mean(x²) + ε) over the last dim, plus a variant fused with 1x128 FP8 quant.

One program normalises one row (the whole hidden dim lives in registers, padded to a power of two).
The fused variant quantises the normed row in 1x128 tiles exactly as `dsv3c.ops.fp8.act_quant` does:
scale = max(amax, 1e-4) / 448 per tile (optionally rounded up to a power of two), xq = e4m3(y / scale).
Interpreter rounding (EXACT) is explained in `dsv3c.codegen.kernels.common`.
"""

import torch
import triton
import triton.language as tl

from dsv3c.codegen.kernels.common import QUANT_BLOCK, TL_DTYPE, cast_out, interpreting, quant_tiles

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
    from dsv3c.codegen.triton_aot import AOTSpec

    t = TL_DTYPE[dtype]
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
