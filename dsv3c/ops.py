"""The dsv3 op vocabulary: every custom op of the IR, its reference semantics, fake shapes and autograd.

Each op is a `torch.library.custom_op` that stays one node through torch.export. The reference
implementation lives in `dsv3c.ref` (or `dsv3c.fp8` for the FP8 ops); the fake implementation gives
shapes and dtypes only, so the 671B model can be captured on meta tensors.
"""

import torch
from torch import Tensor

from dsv3c import ref

NAMESPACE = "dsv3"


def _with_autograd(op, fn, n_tensor_inputs: int):
    """Register autograd for op whose backward re-runs its reference fn under autograd (saves inputs only)."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_tensor_inputs])
        ctx.rest = inputs[n_tensor_inputs:]

    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_(t.is_floating_point()) for t in ctx.saved_tensors]
        with torch.enable_grad():
            outs = fn(*inputs, *ctx.rest)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if o.is_floating_point() and g is not None]
        wanted = [t for t in inputs if t.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        return (*[next(got) if t.requires_grad else None for t in inputs], *[None] * len(ctx.rest))

    op.register_autograd(backward, setup_context=setup_context)
    return op


# ---- normalisation, rotary, activation -----------------------------------------------


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


# ---- routing and experts --------------------------------------------------------------


@torch.library.custom_op("dsv3::moe_gate", mutates_args=())
def moe_gate(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    n_group: int,
    topk_group: int,
    top_k: int,
    norm_topk_prob: bool,
    scaling: float,
) -> tuple[Tensor, Tensor]:
    """Sigmoid group-limited top-k routing of tokens x [T, D]: (weights [T, k] fp32, expert ids [T, k])."""
    return ref.moe_gate(x, weight, bias, n_group, topk_group, top_k, norm_topk_prob, scaling)


@moe_gate.register_fake
def _(x, weight, bias, n_group, topk_group, top_k, norm_topk_prob, scaling):
    shape = (x.shape[0], top_k)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("dsv3::moe_experts", mutates_args=())
def moe_experts(x: Tensor, ids: Tensor, weights: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Routed experts over stacked weights: Σ_j g[t,j] · FFN_{ids[t,j]}(x_t) for x [T, D]."""
    return ref.moe_experts(x, ids, weights, w_gate, w_up, w_down)


@moe_experts.register_fake
def _(x, ids, weights, w_gate, w_up, w_down):
    return torch.empty_like(x)


# ---- attention ------------------------------------------------------------------------


@torch.library.custom_op("dsv3::mla_attention", mutates_args=())
def mla_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Plain causal MLA attention core: q [B,S,H,dqk], k [B,T,H,dqk], v [B,T,H,dv] → [B,S,H,dv]."""
    return ref.mla_attention(q, k, v, scale)


@mla_attention.register_fake
def _(q, k, v, scale):
    return q.new_empty((*q.shape[:3], v.shape[-1]))


@torch.library.custom_op("dsv3::latent_attention", mutates_args=())
def latent_attention(q_lat: Tensor, q_pe: Tensor, ckv: Tensor, kpe: Tensor, scale: float) -> Tensor:
    """Absorbed MLA attention against the latent cache: → o_lat [B, S, H, r]."""
    return ref.latent_attention(q_lat, q_pe, ckv, kpe, scale)


@latent_attention.register_fake
def _(q_lat, q_pe, ckv, kpe, scale):
    return torch.empty_like(q_lat)


_with_autograd(rms_norm, ref.rms_norm, 2)
_with_autograd(rope, ref.rope, 3)
_with_autograd(swiglu, ref.swiglu, 2)
_with_autograd(moe_gate, ref.moe_gate, 3)
_with_autograd(moe_experts, ref.moe_experts, 6)
_with_autograd(mla_attention, ref.mla_attention, 3)
_with_autograd(latent_attention, ref.latent_attention, 4)


def op_name(target) -> str | None:
    """The short name of a dsv3 op overload ('rms_norm'), or None for any other call target."""
    name = getattr(target, "name", None)
    if callable(name):
        qualified = target.name()  # e.g. 'dsv3::rms_norm' or 'dsv3::rms_norm.default'
        if qualified.startswith(NAMESPACE + "::"):
            return qualified.split("::", 1)[1].split(".")[0]
    return None
