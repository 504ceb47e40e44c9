"""MLA attention cores: the plain form over per-head K/V and the absorbed form over the latent cache."""

import torch
from torch import Tensor

from dsv3c.ops import ref
from dsv3c.ops.record import Cost, Lowering, causal_pairs, define, io_bytes

_KERNELS = "dsv3c.codegen.kernels"
ATTENTION_BWD_RATIO = 2.5  # backward: dQ, dK, dV, dP and the recomputed scores: five matmuls against two


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


def mla_attention_cost(q, k, v, scale, out) -> Cost:
    """2·B·H·pairs·(dqk + dv) FLOPs under the causal mask; reads q, k, v once and writes the output."""
    b, s, h, dqk = q.shape
    flops = 2 * b * h * causal_pairs(s, k.shape[1]) * (dqk + v.shape[-1])
    return Cost(flops=flops, bwd_flops=int(ATTENTION_BWD_RATIO * flops), bytes=io_bytes((q, k, v), out),
                kernel="attention", shape=(b, h, s, k.shape[1], dqk, v.shape[-1]))


def latent_attention_cost(q_lat, q_pe, ckv, kpe, scale, out) -> Cost:
    """Scores over r + dr dims and the output over r dims, against one latent head shared by all heads."""
    b, s, h, r = q_lat.shape
    flops = 2 * b * h * causal_pairs(s, ckv.shape[1]) * (2 * r + q_pe.shape[-1])
    return Cost(flops=flops, bwd_flops=int(ATTENTION_BWD_RATIO * flops), bytes=io_bytes((q_lat, q_pe, ckv, kpe), out),
                kernel="latent_attention", shape=(b, h, s, ckv.shape[1], r, q_pe.shape[-1]))


define(mla_attention, cost=mla_attention_cost, autograd=3, stage="capture",
       lowering=Lowering.of(f"{_KERNELS}.attention_prefill", "mla_attention"))
define(latent_attention, cost=latent_attention_cost, autograd=4, stage="mla_fuse",
       lowering=Lowering.of(f"{_KERNELS}.mla_decode", "latent_attention"))
