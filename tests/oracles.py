"""Closed-form FLOPs and parameters of DeepSeek-V3 blocks: independent oracles for the op records' facts.

The planner never uses these: its facts come from the op records through the cost pass. The tests hold those
facts to these formulas, written from the architecture (DeepSeek-V3 report, the config's dimensions).
"""

from __future__ import annotations

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
    """Parameters of one block: {"dense": non-expert, "expert": all routed experts, "expert_each": one expert}.

    head: the final norm and the output head (plus the embedding its first stage holds, "embedding");
    mtp: enorm, hnorm, eh_proj, its MoE block and shared_head.norm (the embedding and the head are shared)."""
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
