"""The cost of one MLA attention block in each form, priced by the roofline on the target's compute SMs.

Forms (b sequences, s new tokens each, t keys in all, h heads; dims dn, dr, dv, latent r):
- `plain`: the latent cache is up-projected to K and V for every key at every step (what mla_fuse builds
  when it keeps the plain form with a latent cache), then attention over dn + dr and dv;
- `plain_kv_cache`: plain attention over a naive K/V cache: only the new tokens are up-projected, and the
  cache of K (dn + dr) and V (dv) per head per key is read — the compared baseline, never built;
- `absorbed`: q·W_UK to the latent space, attention against the latent cache (one shared head of r + dr),
  o_lat·W_UV back.
The up-projection GEMM runs in the attention projections' precision (FP8 in DeepSeek-V3's recipe), the
absorbed W_UK/W_UV products and the attention core in BF16. Each step is max(compute, HBM) on its own;
their sum is the block's time.
"""

from dsv3c.cost.roofline import matmul_seconds
from dsv3c.ops.record import causal_pairs
from targets import compute_sms

ACT_BYTES = 2  # BF16 activations and cache
WEIGHT_BYTES = {"fp8": 1, "bf16": 2}


def _step(flops: int, bytes_: int, dtype: str) -> dict:
    """One step's FLOPs, bytes and dtype."""
    return {"flops": flops, "bytes": bytes_, "dtype": dtype}


def form_steps(shape: dict, proj_dtype: str) -> dict[str, list[dict]]:
    """The GEMM-like steps of each attention form at the block's shapes."""
    b, s, t, h = shape["b"], shape["s"], shape["t"], shape["h"]
    dn, dr, dv, r = shape["dn"], shape["dr"], shape["dv"], shape["r"]
    e, w = ACT_BYTES, WEIGHT_BYTES[proj_dtype]
    pairs = causal_pairs(s, t)
    up_weight = r * h * (dn + dv) * w

    def up(tokens):  # [tokens, r] x [r, h(dn+dv)]
        return _step(2 * tokens * r * h * (dn + dv), up_weight + tokens * r * e + tokens * h * (dn + dv) * e, proj_dtype)

    core_flops = 2 * b * h * pairs * (dn + dr + dv)
    q_out = b * s * h * (dn + dr + dv) * e
    kv_bytes = b * t * h * (dn + dr + dv) * e
    latent = b * t * (r + dr) * e
    return {
        "plain": [up(b * t), _step(core_flops, q_out + kv_bytes + latent, "bf16")],
        "plain_kv_cache": [up(b * s), _step(core_flops, q_out + kv_bytes, "bf16")],
        "absorbed": [
            _step(2 * b * s * h * dn * r, h * dn * r * 2 + b * s * h * (dn + r) * e, "bf16"),
            _step(2 * b * h * pairs * (2 * r + dr), latent + b * s * h * (2 * r + dr) * e, "bf16"),
            _step(2 * b * s * h * r * dv, h * r * dv * 2 + b * s * h * (r + dv) * e, "bf16"),
        ],
    }


def attention_form_costs(shape: dict, target, mode: str, proj_dtype: str) -> dict:
    """FLOPs, bytes and roofline microseconds of each form for one block, on the SMs the mode leaves to compute."""
    sms = compute_sms(target, mode)
    out = {"compute_sms": sms, "proj_dtype": proj_dtype}
    for form, steps in form_steps(shape, proj_dtype).items():
        seconds = sum(matmul_seconds(st["flops"], st["bytes"], target.gpu, st["dtype"], sms) for st in steps)
        out[form] = {"flops": sum(st["flops"] for st in steps), "bytes": sum(st["bytes"] for st in steps),
                     "us": round(1e6 * seconds, 3)}
    return out


def cheapest_buildable(costs: dict) -> str:
    """The faster of the two forms mla_fuse can build over a latent cache: plain or absorbed."""
    return "absorbed" if costs["absorbed"]["us"] < costs["plain"]["us"] else "plain"
