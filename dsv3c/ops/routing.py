"""Routing and the routed experts: the sigmoid group-limited gate and the expert FFNs (BF16 and FP8)."""

import torch
from torch import Tensor

from dsv3c.ops import fp8, ref
from dsv3c.ops.record import Cost, Lowering, NotLowered, define, expected_experts_hit, gemm_flops, nbytes

_KERNELS = "dsv3c.codegen.kernels"


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


def moe_gate_cost(x, weight, bias, n_group, topk_group, top_k, norm_topk_prob, scaling, out) -> Cost:
    """The [T, D] x [D, E] affinity GEMM (the sigmoid and top-k are negligible); backward twice that."""
    flops = gemm_flops(x.shape[0], weight.shape[0], x.shape[1])
    return Cost(flops=flops, bwd_flops=2 * flops, bytes=nbytes(x) + nbytes(weight) + nbytes(bias) + nbytes(out),
                kernel="gemm", shape=(1, x.shape[0], weight.shape[0], x.shape[1]),
                weight_bytes=nbytes(weight) + nbytes(bias), wgrad_flops=flops)


def experts_cost(x, ids, expert_weights: tuple, out, backward: bool, dtype: str) -> Cost:
    """Each token runs k SwiGLU experts (3 GEMMs of D x F); weight bytes only of the experts the step can touch.

    expert_weights are the stacked tensors ([E, ...] each: weights and, for FP8, their block scales); the
    bytes charged are the expected distinct experts hit by T tokens routed k-of-E, at most min(E, T·k).
    """
    tokens, d = x.shape
    k = ids.shape[1]
    experts, f = expert_weights[0].shape[:2]
    flops = tokens * k * 3 * gemm_flops(1, f, d)
    per_expert = sum(nbytes(w) for w in expert_weights) / experts
    weight_bytes = expected_experts_hit(tokens, experts, k) * per_expert
    act_bytes = 2 * nbytes(x) * k + nbytes(out)  # each (token, expert) pair reads x; the FFN output is summed
    return Cost(flops=flops, bwd_flops=2 * flops if backward else 0, bytes=int(weight_bytes + act_bytes),
                kernel="experts", dtype=dtype, shape=(tokens, k, experts, f, d), weight_bytes=int(weight_bytes),
                wgrad_flops=flops if backward else 0)


def moe_experts_cost(x, ids, weights, w_gate, w_up, w_down, out) -> Cost:
    """BF16 routed experts (see experts_cost)."""
    return experts_cost(x, ids, (w_gate, w_up, w_down), out, backward=True, dtype="bf16")


def moe_experts_fp8_cost(x, ids, weights, gq, gs, uq, us, dq, ds, out) -> Cost:
    """Inference FP8 routed experts: E4M3 weights and their scales; no backward."""
    return experts_cost(x, ids, (gq, gs, uq, us, dq, ds), out, backward=False, dtype="fp8")


def moe_experts_fp8_train_cost(x, ids, weights, w_gate, w_up, w_down, out) -> Cost:
    """Training FP8 routed experts: master weights read to quantise, FP8 Fprop/Dgrad/Wgrad."""
    return experts_cost(x, ids, (w_gate, w_up, w_down), out, backward=True, dtype="fp8")


define(moe_gate, cost=moe_gate_cost, autograd=3, stage="capture", lowering=Lowering.of(f"{_KERNELS}.router", "moe_gate"))
define(moe_experts, cost=moe_experts_cost, autograd=6, stage="capture",
       lowering=NotLowered("no BF16 grouped-GEMM kernel; fp8_quant turns it into moe_experts_fp8"))
define(moe_experts_fp8, cost=moe_experts_fp8_cost, stage="fp8_quant",
       lowering=Lowering.of(f"{_KERNELS}.grouped_fp8_gemm", "moe_experts_fp8"))
define(moe_experts_fp8_train, cost=moe_experts_fp8_train_cost, autograd=6, stage="fp8_quant",
       lowering=Lowering.of(f"{_KERNELS}.grouped_fp8_gemm", "moe_experts_fp8_train"))
