"""RMSNorm kernels: y = w ⊙ x / sqrt(mean(x²) + ε) over the last dim, plus a variant fused with 1x128 FP8 quant.

One program normalises one row (the whole hidden dim lives in registers, padded to a power of two).
The fused variant quantises the normed row in 1x128 tiles exactly as `dsv3c.ops.fp8.act_quant` does:
scale = max(amax, 1e-4) / 448 per tile (optionally rounded up to a power of two), xq = e4m3(y / scale).
Interpreter rounding (EXACT) is explained in `dsv3c.codegen.kernels.common`.

After the @triton.jit code: the family's tile table, its KernelSpec builders (`k_*`), and the builder and
runner of each op lowered to it (`dsv3c.codegen.family` says what each is), with their imports, so that
editing the host side moves no kernel (Triton's cache key holds a kernel's first line number).
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


# ---- host side ------------------------------------------------------------------------------------------

import torch

from dsv3c.codegen.family import QUANT_BLOCK, REQUIRED, KernelSpec, cdiv, kspec, p2, row_count, variant
from dsv3c.codegen.tiles import TileTable, Tiles, hopper
from dsv3c.ops import fp8

TILES = TileTable("rmsnorm", hopper(dict(BLOCK_M=1, BLOCK_N=8192, num_warps=8, num_stages=1)))  # one row per program


def k_rmsnorm(m: int, n: int, xd, wd, yd, tiles: Tiles) -> KernelSpec:
    """RMSNorm of m rows of n: the whole row in one block, no more warps than the row fills."""
    cfg = tiles(TILES)
    block = max(16, p2(n))
    return kspec(f"{__name__}:rmsnorm_kernel", ptrs={"x_ptr": xd, "w_ptr": wd, "y_ptr": yd},
                 floats=("eps",), ints={"N": n, "stride_x": n, "stride_y": n},
                 consts={"BLOCK_N": block, "EXACT": False}, cfg=cfg, grid=(m,),
                 num_warps=max(1, min(cfg["num_warps"], block // 256)), shapes={"rows": m, "N": n},
                 tag=f"rmsnorm_{m}x{n}")


def k_rmsnorm_quant(m: int, n: int, xd, wd, pow2: bool, tiles: Tiles) -> KernelSpec:
    """RMSNorm fused with 1x128 E4M3 quantisation of m rows of n."""
    cfg = tiles(TILES)
    block = max(QUANT_BLOCK, p2(n))
    return kspec(f"{__name__}:rmsnorm_quant_kernel",
                 ptrs={"x_ptr": xd, "w_ptr": wd, "q_ptr": fp8.FP8, "s_ptr": torch.float32}, floats=("eps",),
                 ints={"N": n, "stride_x": n, "stride_q": n, "stride_s": cdiv(n, QUANT_BLOCK)},
                 consts={"BLOCK_N": block, "POW2": bool(pow2), "EXACT": False}, cfg=cfg, grid=(m,),
                 num_warps=max(1, min(cfg["num_warps"], block // 256)), shapes={"rows": m, "N": n},
                 tag=f"rmsnorm_quant_{m}x{n}" + ("_pow2" if pow2 else ""))


def build_rms_norm(ins, outs, attrs, tiles):
    """rms_norm(x [..., N], w [N], eps): one RMSNorm kernel."""
    (xs, xd), (_, wd) = ins
    (_, yd), = outs
    return (k_rmsnorm(row_count(xs), xs[-1], xd, wd, yd, tiles),), ()


def run_rms_norm(call, x, w):
    (k,) = call.kernels
    n = x.shape[-1]
    y = torch.empty(row_count(x.shape), n, dtype=call.outputs[0][1], device=x.device)
    if y.numel():
        k.launch(x_ptr=x.reshape(-1, n).contiguous(), w_ptr=w.contiguous(), y_ptr=y, eps=float(call.attr("eps")))
    return [y.reshape(x.shape)]


def build_rms_norm_quant(ins, outs, attrs, tiles):
    """act_quant(rms_norm(x, w, eps)) in one kernel: x [..., N], w [N]; attrs eps, pow2_scale."""
    (xs, xd), (_, wd) = ins
    return (k_rmsnorm_quant(row_count(xs), xs[-1], xd, wd, attrs.get("pow2_scale", False), tiles),), ()


def run_rms_norm_quant(call, x, w):
    (k,) = call.kernels
    n = x.shape[-1]
    m = row_count(x.shape)
    q = torch.empty(m, n, dtype=fp8.FP8, device=x.device)
    s = torch.empty(m, cdiv(n, QUANT_BLOCK), dtype=torch.float32, device=x.device)
    if q.numel():
        k.launch(x_ptr=x.reshape(-1, n).contiguous(), w_ptr=w.contiguous(), q_ptr=q, s_ptr=s,
                 eps=float(call.attr("eps")))
    return [q.reshape(x.shape), s.reshape(*x.shape[:-1], s.shape[-1])]


variant(__name__, "rms_norm_quant", eps=REQUIRED, pow2_scale=False)
