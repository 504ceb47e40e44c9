"""Stored activations per token of a training block (what backward needs under DeepSeek-V3's recompute policy).

What is kept per token (norm outputs and the up-projected q/k/v are recomputed in backward, so they are not
stored): BF16 layer inputs, the compressed c_q and c_kv + k_pe (to recompute q/k/v), the attention output in
FP8 (o_proj's input, 1x128 scales), softmax statistics (FP32), the router scores (FP32), per routed/shared
expert route the FP8 dispatched input and the SwiGLU inputs in FP8 (its output is recomputed: DeepSeek-V3
report 3.3.3). FP8 caches are reported apart from BF16 activations. This is a model of what autograd keeps,
stated in one place; the FLOPs and bytes of the ops come from their records.
"""

from __future__ import annotations

import math


def _dims(cfg) -> dict:
    return dict(D=cfg.hidden_size, H=cfg.num_attention_heads, ql=cfg.q_lora_rank or 0, kvl=cfg.kv_lora_rank,
                dr=cfg.qk_rope_head_dim, dv=cfg.v_head_dim, I=cfg.intermediate_size, F=cfg.moe_intermediate_size,
                E=cfg.n_routed_experts, k=cfg.num_experts_per_tok, ns=cfg.n_shared_experts)


def activation_bytes_per_token(cfg, kind: str) -> dict[str, float]:
    """Stored activation bytes per token of one block: {"bf16": ..., "fp8": ...} (recompute marks applied)."""
    d = _dims(cfg)
    D, H = d["D"], d["H"]
    scales = lambda n: 4 * math.ceil(n / 128)  # noqa: E731  (1x128 FP32 scales of an FP8 tile row)
    bf16 = fp8 = 0.0
    if kind == "embed":
        return {"bf16": 0.0, "fp8": 0.0}
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
