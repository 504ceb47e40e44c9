"""FP8 ops: 1x128 activation quantisation, the block-scaled FP8 GEMM, and training's FP8 linear."""

import torch
from torch import Tensor

from dsv3c.ops import fp8
from dsv3c.ops.record import Cost, Lowering, define, elementwise, gemm_flops, io_bytes, nbytes, rows

_KERNELS = "dsv3c.codegen.kernels"


@torch.library.custom_op("dsv3::act_quant", mutates_args=())
def act_quant(x: Tensor, pow2_scale: bool = False) -> tuple[Tensor, Tensor]:
    """x quantised to E4M3 per token per 128 channels: (xq, scale [..., ceil(K/128)] float32)."""
    return fp8.act_quant(x, fp8.BLOCK, pow2_scale)


@act_quant.register_fake
def _(x, pow2_scale=False):
    return torch.empty_like(x, dtype=fp8.FP8), x.new_empty((*x.shape[:-1], -(-x.shape[-1] // 128)), dtype=torch.float32)


@torch.library.custom_op("dsv3::fp8_gemm", mutates_args=())
def fp8_gemm(xq: Tensor, xs: Tensor, wq: Tensor, ws: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Block-scaled FP8 GEMM y = x·wᵀ, FP32 accumulation promoted every 128 of K, output in out_dtype."""
    return fp8.fp8_gemm(xq, xs, wq, ws, out_dtype)


@fp8_gemm.register_fake
def _(xq, xs, wq, ws, out_dtype):
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=out_dtype)


@torch.library.custom_op("dsv3::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, w: Tensor) -> Tensor:
    """Training FP8 linear y = x·wᵀ: quantises x (1x128) and w (128x128) itself; Dgrad and Wgrad in FP8 too."""
    return fp8.fp8_linear_forward(x, w, out_dtype=x.dtype)


@fp8_linear.register_fake
def _(x, w):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _fp8_linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _fp8_linear_backward(ctx, grad):
    x, w = ctx.saved_tensors
    dx, dw = fp8.fp8_linear_backward(grad, x, w)
    return dx.to(x.dtype), dw.to(w.dtype)


def fp8_gemm_cost(xq, xs, wq, ws, out_dtype, out) -> Cost:
    """2·M·N·K on the FP8 tensor cores; reads the E4M3 operands and their scales, writes the output."""
    m, n, k = rows(xq.shape), wq.shape[0], xq.shape[-1]
    return Cost(flops=gemm_flops(m, n, k), bytes=io_bytes((xq, xs, wq, ws), out), kernel="gemm", dtype="fp8",
                shape=(1, m, n, k), weight_bytes=nbytes(wq) + nbytes(ws))


def fp8_linear_cost(x, w, out) -> Cost:
    """Fprop 2·M·N·K; backward Dgrad + Wgrad, each as large; reads x and the master weight once."""
    m, n, k = rows(x.shape), w.shape[0], x.shape[-1]
    flops = gemm_flops(m, n, k)
    return Cost(flops=flops, bwd_flops=2 * flops, bytes=io_bytes((x, w), out), kernel="gemm", dtype="fp8",
                shape=(1, m, n, k), weight_bytes=nbytes(w), wgrad_flops=flops)


# act_quant per element: |x| into the tile's max, the scaled value, the cast (3); it has no backward
define(act_quant, cost=elementwise(3, 0.0), stage="fp8_quant", lowering=Lowering.of(f"{_KERNELS}.act_quant", "act_quant"))
define(fp8_gemm, cost=fp8_gemm_cost, stage="fp8_quant", lowering=Lowering.of(f"{_KERNELS}.fp8_gemm", "fp8_gemm"))
define(fp8_linear, cost=fp8_linear_cost, autograd=(_fp8_linear_backward, _fp8_linear_setup), stage="fp8_quant",
       lowering=Lowering.of(f"{_KERNELS}.fp8_gemm", "fp8_linear"))
