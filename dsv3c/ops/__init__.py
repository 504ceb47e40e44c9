"""The dsv3 op vocabulary: every custom op of the IR, its reference semantics, fake shapes and autograd.

Each op is a `torch.library.custom_op` that stays one node through torch.export. The reference
implementation lives in `dsv3c.ops.ref` (or `dsv3c.ops.fp8` for the FP8 ops); the fake implementation gives
shapes and dtypes only, so the 671B model can be captured on meta tensors.
"""

import torch
from torch import Tensor

from dsv3c.ops import fp8, ref

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
    return ref.mla_attention(q, k, v, scale).contiguous()


@mla_attention.register_fake
def _(q, k, v, scale):
    return q.new_empty((*q.shape[:3], v.shape[-1]))


@torch.library.custom_op("dsv3::latent_attention", mutates_args=())
def latent_attention(q_lat: Tensor, q_pe: Tensor, ckv: Tensor, kpe: Tensor, scale: float) -> Tensor:
    """Absorbed MLA attention against the latent cache: → o_lat [B, S, H, r]."""
    return ref.latent_attention(q_lat, q_pe, ckv, kpe, scale).contiguous()


@latent_attention.register_fake
def _(q_lat, q_pe, ckv, kpe, scale):
    return torch.empty_like(q_lat)


# ---- FP8 (1x128 activation tiles, 128x128 weight blocks, E4M3, FP32 accumulation) -----


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


fp8_linear.register_autograd(_fp8_linear_backward, setup_context=_fp8_linear_setup)


@torch.library.custom_op("dsv3::moe_experts_fp8", mutates_args=())
def moe_experts_fp8(
    x: Tensor, ids: Tensor, weights: Tensor, gq: Tensor, gs: Tensor, uq: Tensor, us: Tensor, dq: Tensor, ds: Tensor
) -> Tensor:
    """Routed experts with E4M3 stacked weights (w*q [E, N, K], w*s [E, ceil(N/128), ceil(K/128)])."""

    def gemm(xe, wq, ws):  # one expert GEMM: activation tiles quantised on the fly, E4M3 weight blocks
        xq, xs = fp8.act_quant(xe)
        return fp8.fp8_gemm(xq, xs, wq, ws, x.dtype)

    def ffn(xe, e):
        return gemm(ref.swiglu(gemm(xe, gq[e], gs[e]), gemm(xe, uq[e], us[e])), dq[e], ds[e])

    return ref.moe_experts(x, ids, weights, gq, uq, dq, ffn=ffn)


@moe_experts_fp8.register_fake
def _(x, ids, weights, gq, gs, uq, us, dq, ds):
    return torch.empty_like(x)


def _moe_experts_fp8_train_ref(x, ids, weights, w_gate, w_up, w_down):
    """Routed experts whose GEMMs are FP8 linears (so their backward is FP8 too)."""
    lin = torch.ops.dsv3.fp8_linear
    return ref.moe_experts(
        x, ids, weights, w_gate, w_up, w_down,
        ffn=lambda xe, e: lin(ref.swiglu(lin(xe, w_gate[e]), lin(xe, w_up[e])), w_down[e]),
    )  # fmt: skip


@torch.library.custom_op("dsv3::moe_experts_fp8_train", mutates_args=())
def moe_experts_fp8_train(x: Tensor, ids: Tensor, weights: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Training routed experts: master weights, every expert GEMM an FP8 linear with FP8 Dgrad/Wgrad."""
    return _moe_experts_fp8_train_ref(x, ids, weights, w_gate, w_up, w_down)


@moe_experts_fp8_train.register_fake
def _(x, ids, weights, w_gate, w_up, w_down):
    return torch.empty_like(x)


_with_autograd(rms_norm, ref.rms_norm, 2)
_with_autograd(rope, ref.rope, 3)
_with_autograd(swiglu, ref.swiglu, 2)
_with_autograd(moe_gate, ref.moe_gate, 3)
_with_autograd(moe_experts, ref.moe_experts, 6)
_with_autograd(mla_attention, ref.mla_attention, 3)
_with_autograd(latent_attention, ref.latent_attention, 4)
_with_autograd(moe_experts_fp8_train, _moe_experts_fp8_train_ref, 6)


def op_name(target) -> str | None:
    """The short name of a dsv3 op overload ('rms_norm'), or None for any other call target."""
    name = getattr(target, "name", None)
    if callable(name):
        qualified = target.name()  # e.g. 'dsv3::rms_norm' or 'dsv3::rms_norm.default'
        if qualified.startswith(NAMESPACE + "::"):
            return qualified.split("::", 1)[1].split(".")[0]
    return None
from dsv3c.ops import ep  # noqa: E402,F401  (expert-parallel ops: dispatch, local experts, combine)
