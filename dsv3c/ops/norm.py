"""Normalisation, rotary embedding and the SwiGLU activation: row-wise and elementwise ops."""

import torch
from torch import Tensor

from dsv3c.ops import ref
from dsv3c.ops.record import Lowering, define, elementwise

_KERNELS = "dsv3c.codegen.kernels"


@torch.library.custom_op("dsv3::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of x over its last dim, scaled by weight."""
    return ref.rms_norm(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op("dsv3::rope", mutates_args=())
def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Interleaved rotary embedding of x [B, S, ..., d] by the angles cos/sin [B, S, d/2]."""
    return ref.rope(x, cos, sin)


@rope.register_fake
def _(x, cos, sin):
    return torch.empty_like(x)


@torch.library.custom_op("dsv3::swiglu", mutates_args=())
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) ⊙ up."""
    return ref.swiglu(gate, up)


@swiglu.register_fake
def _(gate, up):
    return torch.empty_like(gate)


# per output element: RMSNorm squares, sums, scales by rsqrt and by weight (4); RoPE two products and a
# sum (3); SwiGLU the sigmoid (exp, add, divide), and two products (5). Backward: twice the forward for
# RMSNorm and SwiGLU (both inputs' gradients), once for RoPE (the inverse rotation).
define(rms_norm, cost=elementwise(4, 2.0), stage="capture", lowering=Lowering.of(f"{_KERNELS}.rmsnorm", "rms_norm"),
       autograd=2)
define(rope, cost=elementwise(3, 1.0), stage="capture", lowering=Lowering.of(f"{_KERNELS}.rope", "rope"), autograd=3)
define(swiglu, cost=elementwise(5, 2.0), stage="capture", lowering=Lowering.of(f"{_KERNELS}.swiglu", "swiglu"),
       autograd=2)
