"""The MLA attention forms of one block as kernel facts, priced by the one pricing module (`dsv3c.cost.price`).

Forms (b sequences, s new tokens each, t keys in all, h heads; dims dn, dr, dv, latent r):
- `plain`: the latent cache is up-projected to K and V for every key at every step (what mla_fuse builds
  when it keeps the plain form with a latent cache), then attention over dn + dr and dv;
- `plain_kv_cache`: plain attention over a naive K/V cache: only the new tokens are up-projected, and the
  cache of K (dn + dr) and V (dv) per head per key is read — the compared baseline, never built;
- `absorbed`: q·W_UK to the latent space (a per-head batched GEMM), attention against the latent cache (one
  shared head of r + dr), o_lat·W_UV back.
The up-projection GEMM runs in the attention projections' precision, the absorbed W_UK/W_UV products and the
attention core in BF16. The attention kernels' facts come from their op records.
"""

import torch

from dsv3c.cost.price import Pricer, Shard, compute_sms
from dsv3c.ops.record import record_of

ACT_BYTES = 2  # BF16 activations and cache


def _gemm(role: str, g: int, m: int, n: int, k: int, dtype: str) -> dict:
    """The fact of one (batched) GEMM [m, k] x [n, k]^T per group whose second operand is a weight."""
    w = 1 if dtype == "fp8" else 2
    return {"role": role, "kernel": "gemm", "dtype": dtype, "shape": [g, m, n, k], "count": 1, "recompute": False,
            "flops": 2 * g * m * n * k, "bwd_flops": 0, "wgrad_flops": 0, "ib_bytes": 0, "nvlink_bytes": 0,
            "bytes": g * (n * k * w + m * k * ACT_BYTES + m * n * ACT_BYTES), "weight_bytes": g * n * k * w}


def _op_fact(role: str, op: str, *args) -> dict:
    """The fact of a dsv3 op from its record's cost on meta tensors."""
    out = getattr(torch.ops.dsv3, op)(*args)
    c = record_of(op).cost(*args, out).as_dict()
    keep = ("kernel", "dtype", "shape", "flops", "bytes", "weight_bytes", "ib_bytes", "nvlink_bytes")
    return {"role": role, "count": 1, "recompute": False, "bwd_flops": 0, "wgrad_flops": 0, **{k: c[k] for k in keep}}


def form_facts(shape: dict, proj_dtype: str) -> dict[str, list[dict]]:
    """The kernel facts of each attention form at the block's shapes."""
    b, s, t, h = shape["b"], shape["s"], shape["t"], shape["h"]
    dn, dr, dv, r = shape["dn"], shape["dr"], shape["dv"], shape["r"]
    meta = dict(device="meta", dtype=torch.bfloat16)
    q = torch.empty(b, s, h, dn + dr, **meta)
    k, v = torch.empty(b, t, h, dn + dr, **meta), torch.empty(b, t, h, dv, **meta)
    plain = _op_fact("self_attn", "mla_attention", q, k, v, 1.0)
    latent = _op_fact("self_attn", "latent_attention", torch.empty(b, s, h, r, **meta), torch.empty(b, s, h, dr, **meta),
                      torch.empty(b, t, r, **meta), torch.empty(b, t, dr, **meta), 1.0)
    return {
        "plain": [_gemm("self_attn.kv_b_proj", 1, b * t, h * (dn + dv), r, proj_dtype), plain],
        "plain_kv_cache": [_gemm("self_attn.kv_b_proj", 1, b * s, h * (dn + dv), r, proj_dtype), plain],
        "absorbed": [_gemm("self_attn.absorb_uk", h, b * s, r, dn, "bf16"), latent,
                     _gemm("self_attn.absorb_uv", h, b * s, dv, r, "bf16")],
    }


def attention_form_costs(shape: dict, target, mode: str, proj_dtype: str, constants) -> dict:
    """FLOPs, bytes and priced microseconds of each form for one block, on the SMs the mode leaves to compute."""
    sms = compute_sms(target.gpu, mode, constants)
    pricer = Pricer(target.gpu, sms, constants, "decode" if mode == "decode" else "prefill")
    out = {"compute_sms": sms, "proj_dtype": proj_dtype}
    for form, facts in form_facts(shape, proj_dtype).items():
        seconds = pricer.block(facts, Shard(pricer.mode)).F.total
        out[form] = {"flops": sum(f["flops"] for f in facts), "bytes": sum(f["bytes"] for f in facts),
                     "us": round(1e6 * seconds, 3)}
    return out


def cheapest_buildable(costs: dict) -> str:
    """The faster of the two forms mla_fuse can build over a latent cache: plain or absorbed."""
    return "absorbed" if costs["absorbed"]["us"] < costs["plain"]["us"] else "plain"
