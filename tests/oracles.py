"""Per-block facts of a training micro-batch: FLOPs by dtype and chunk, parameters, stored activations.

The block kinds are `dense` (an MLA + dense-MLP layer), `moe` (an MLA + MoE layer), `head` (final norm +
output head; the embedding is a gather and is counted with it for bytes only) and `mtp` (the MTP module:
eh_proj, its MoE block and the shared head). FLOP totals come from the cost pass over a reduced capture
(`dsv3c.cost.figures`, one dense + one MoE block + MTP, at the training micro-batch shape) when given,
else from the closed forms below (used by tests and as a fallback); the split of those totals by dtype
and into I/W uses the closed-form GEMM counts of the config and the precision policy:

- forward: the FP8 GEMMs of the policy at FP8 peak; the rest (BF16 GEMMs: router, head, eh_proj; the
  attention core; elementwise) at BF16 peak;
- backward as executed = Dgrad + Wgrad (2x each GEMM) + attention backward; W (weight gradients) = one
  forward's worth of each GEMM, I = the rest;
- recompute in backward (DeepSeek-V3): all RMSNorms and the MLA up-projections (q_b, kv_b), FP8 GEMMs.

Stored activations per token (what backward needs with those recompute marks; norm outputs and the
up-projected q/k/v are not stored): BF16 layer inputs, the compressed c_q and c_kv+k_pe (to recompute
q/k/v), the attention output in FP8 (o_proj's input, 1x128 scales), softmax statistics (FP32), the
router scores (FP32), per routed/shared expert route the FP8 dispatched input and the SwiGLU inputs in
FP8 (its output is recomputed: DeepSeek-V3 report 3.3.3). FP8 caches are reported apart from BF16 activations.
"""

from __future__ import annotations

import math

from dsv3c.ir.precision import DEFAULT_POLICY

KINDS = ("dense", "moe", "head", "mtp")


def _dims(cfg) -> dict:
    ql = cfg.q_lora_rank or 0
    return dict(D=cfg.hidden_size, H=cfg.num_attention_heads, ql=ql, kvl=cfg.kv_lora_rank, dn=cfg.qk_nope_head_dim,
                dr=cfg.qk_rope_head_dim, dv=cfg.v_head_dim, I=cfg.intermediate_size, F=cfg.moe_intermediate_size,
                E=cfg.n_routed_experts, k=cfg.num_experts_per_tok, ns=cfg.n_shared_experts, V=cfg.vocab_size)


def gemm_flops_per_token(cfg, kind: str) -> dict[str, int]:
    """Forward GEMM FLOPs per token of one block by policy component."""
    d = _dims(cfg)
    D, H = d["D"], d["H"]
    q = (D * d["ql"] + d["ql"] * H * (d["dn"] + d["dr"])) if d["ql"] else D * H * (d["dn"] + d["dr"])
    attn = 2 * (q + D * (d["kvl"] + d["dr"]) + d["kvl"] * H * (d["dn"] + d["dv"]) + H * d["dv"] * D)
    up = 2 * ((d["ql"] * H * (d["dn"] + d["dr"]) if d["ql"] else 0) + d["kvl"] * H * (d["dn"] + d["dv"]))
    out: dict[str, int] = {}
    if kind in ("dense", "moe", "mtp"):
        out["attention_proj"] = attn
        out["_up_projection"] = up  # part of attention_proj: what backward recomputes
    if kind == "dense":
        out["dense_mlp"] = 6 * D * d["I"]
    if kind in ("moe", "mtp"):
        out["shared_experts"] = 6 * D * d["F"] * d["ns"]
        out["routed_experts"] = 6 * D * d["F"] * d["k"]
        out["router"] = 2 * D * d["E"]
    if kind in ("head", "mtp"):
        out["lm_head"] = 2 * D * d["V"]
    if kind == "mtp":
        out["mtp_eh_proj"] = 2 * 2 * D * D
    return out


def attention_core_flops_per_token(cfg, seq: int) -> float:
    """Causal attention core forward FLOPs per token (QK^T over dn+dr and PV over dv, half the square)."""
    d = _dims(cfg)
    return 2 * d["H"] * (seq + 1) / 2 * (d["dn"] + d["dr"] + d["dv"])


def params(cfg, kind: str) -> dict[str, int]:
    """Parameters of one block: {"dense": non-expert, "expert": all routed experts, "expert_each": one expert}."""
    d = _dims(cfg)
    D, H = d["D"], d["H"]
    attn = (D * d["ql"] + d["ql"] + d["ql"] * H * (d["dn"] + d["dr"]) if d["ql"] else D * H * (d["dn"] + d["dr"]))
    attn += D * (d["kvl"] + d["dr"]) + d["kvl"] + d["kvl"] * H * (d["dn"] + d["dv"]) + H * d["dv"] * D
    block_norms = 2 * D
    expert_each = 3 * D * d["F"]
    if kind == "dense":
        return {"dense": attn + block_norms + 3 * D * d["I"], "expert": 0, "expert_each": 0}
    moe = attn + block_norms + d["E"] * D + d["E"] + expert_each * d["ns"]
    if kind == "moe":
        return {"dense": moe, "expert": expert_each * d["E"], "expert_each": expert_each}
    if kind == "head":  # embedding + final norm + output head (the first stage holds the embedding)
        return {"dense": D * d["V"] + D, "expert": 0, "expert_each": 0, "embedding": D * d["V"]}
    # mtp: enorm, hnorm, eh_proj, its MoE block, shared_head.norm (embedding and head are shared)
    return {"dense": 2 * D + 2 * D * D + moe + D, "expert": expert_each * d["E"], "expert_each": expert_each}


def activation_bytes_per_token(cfg, kind: str) -> dict[str, float]:
    """Stored activation bytes per token of one block: {"bf16": ..., "fp8": ...} (recompute marks applied)."""
    d = _dims(cfg)
    D, H = d["D"], d["H"]
    scales = lambda n: 4 * math.ceil(n / 128)  # noqa: E731  (1x128 FP32 scales of an FP8 tile row)
    bf16 = fp8 = 0.0
    if kind in ("dense", "moe", "mtp"):
        bf16 += 2 * D + 2 * d["ql"] + 2 * (d["kvl"] + d["dr"]) + 4 * H  # x, c_q, c_kv + k_pe, softmax lse
        fp8 += H * d["dv"] + scales(H * d["dv"])  # attention output, o_proj's FP8 input
        bf16 += 2 * D  # residual after attention (post-attention norm is recomputed, so is the MLP's FP8 input)
        if kind == "dense":  # SwiGLU inputs (gate/up outputs) in FP8; its output is recomputed (report 3.3.3)
            fp8 += 2 * d["I"] + scales(2 * d["I"])
        else:
            routes = d["k"] + d["ns"]
            bf16 += 4 * d["E"]  # router scores (FP32)
            fp8 += routes * (2 * d["F"] + scales(2 * d["F"])) + d["k"] * (D + scales(D))  # SwiGLU in; dispatched x
    if kind in ("head", "mtp"):
        bf16 += 2 * D + 4  # head input and the loss statistics (logits are produced and consumed in chunks)
    if kind == "mtp":
        bf16 += 2 * 2 * 2 * D  # eh_proj input [emb; h]
    return {"bf16": bf16, "fp8": fp8}


def analytic_block_costs(cfg, tokens: int, seq: int) -> dict[str, dict]:
    """Closed-form {flops, bwd_flops, recompute_flops, bytes} per block kind for a micro-batch of tokens."""
    d = _dims(cfg)
    out = {}
    core = attention_core_flops_per_token(cfg, seq)
    for kind in KINDS:
        g = gemm_flops_per_token(cfg, kind)
        gemm = sum(v for c, v in g.items() if not c.startswith("_"))
        attn_core = core if kind != "head" else 0
        elementwise = 40 * d["D"] if kind != "head" else 4 * d["V"]
        fwd = gemm + attn_core + elementwise
        bwd = 2 * gemm + 2.5 * attn_core + elementwise
        rec = g.get("_up_projection", 0) + (10 * d["D"] if kind != "head" else 0)
        p = params(cfg, kind)
        weight_bytes = 2 * (p["dense"] + p["expert"])
        out[kind] = {"flops": fwd * tokens, "bwd_flops": bwd * tokens, "recompute_flops": rec * tokens,
                     "bytes": weight_bytes + 60 * d["D"] * tokens}
    return out


def blocks_from_per_layer(cfg, per_layer: dict) -> dict[str, dict]:
    """Block kinds from the cost pass's per-layer costs of a reduced capture (layers.0 dense, layers.1 MoE, mtp.0)."""
    dense_n = min(cfg.first_k_dense_replace, cfg.num_hidden_layers, 1)
    out = {}
    if dense_n:
        out["dense"] = dict(per_layer["layers.0"])
    moe_key = f"layers.{dense_n}"
    if moe_key in per_layer:
        out["moe"] = dict(per_layer[moe_key])
    if "other" in per_layer:
        out["head"] = dict(per_layer["other"])
    mtp = [v for k, v in per_layer.items() if k.startswith("mtp.")]
    if mtp:
        out["mtp"] = dict(mtp[0])
    return out


def capture_blocks(cfg, target, registry, seq: int = 4096) -> dict:
    """One reduced train capture at (1, seq) run through the figure passes: {"tokens", "seq", "blocks"}."""
    import dataclasses

    from dsv3c.cost.figures import FIGURE_PASSES, reduced_config
    from dsv3c.frontend.exporter import capture
    from dsv3c.ir import Plan

    cfg = dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, seq))
    plan = Plan(capture(reduced_config(cfg), "train", batch=1, seq=seq, kv_len=0), target)
    for name in FIGURE_PASSES:
        registry[name].fn(plan, {})
    return {"tokens": seq, "seq": seq, "blocks": blocks_from_per_layer(cfg, plan.analyses.costs["per_layer"])}


def policy_split(cfg, kind: str, policy: dict | None) -> dict[str, float]:
    """Per token: FP8 GEMM FLOPs, BF16 GEMM FLOPs and the FP8 share of the recomputed up-projections."""
    policy = {**DEFAULT_POLICY, **(policy or {})}
    g = gemm_flops_per_token(cfg, kind)
    fp8 = sum(v for c, v in g.items() if not c.startswith("_") and policy.get(c) == "fp8")
    bf16 = sum(v for c, v in g.items() if not c.startswith("_") and policy.get(c) != "fp8")
    up = g.get("_up_projection", 0)
    return {"fp8": fp8, "bf16": bf16, "up": up, "up_fp8": policy.get("attention_proj") == "fp8"}
