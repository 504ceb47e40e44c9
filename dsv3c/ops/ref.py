"""Reference semantics of the dsv3 ops in plain torch: the meaning every pass and kernel must keep.

Shapes use B batch, S new tokens, T = P + S keys (P cached), H heads, D hidden, E experts,
F expert width, k experts per token, r the KV LoRA rank, dr the RoPE head dim.
"""

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: w ⊙ x / sqrt(mean(x²) + eps), computed in float32, returned in x's dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE: each pair (x[2i], x[2i+1]) of x [B, S, ..., d] rotates by the angle of cos/sin [B, S, d/2]."""
    shape = x.shape
    pairs = x.float().reshape(*shape[:-1], shape[-1] // 2, 2)
    extra = pairs.dim() - cos.dim() - 1  # head axes between S and the pair axis
    c = cos.reshape(*cos.shape[:2], *([1] * extra), cos.shape[-1]).float()
    s = sin.reshape(*sin.shape[:2], *([1] * extra), sin.shape[-1]).float()
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.reshape(shape).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(gate) ⊙ up."""
    return F.silu(gate) * up


def topk_lowest_index(v: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest of v along the last dim, descending; among exact ties the lowest index first."""
    # torch.topk leaves the order of ties unspecified; a stable descending sort keeps index order
    return v.sort(dim=-1, descending=True, stable=True).indices[..., :k].contiguous()


def normalised_sigmoid(logits: torch.Tensor) -> torch.Tensor:
    """s_j / Σ s over the last dim for s = sigmoid(logits), in log space so underflowing scores keep their ratios."""
    # s_j / Σ s = exp(ls_j - max ls) / Σ exp(ls - max ls), ls = log sigmoid: the largest term is 1, so the
    # sum never vanishes even where sigmoid itself underflows (logits below about -88 in float32)
    ls = F.logsigmoid(logits)
    r = torch.exp(ls - ls.amax(-1, keepdim=True))
    return r / r.sum(-1, keepdim=True)


def moe_gate(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    n_group: int,
    topk_group: int,
    top_k: int,
    norm_topk_prob: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid group-limited routing: (weights g [T, k] float32, expert ids [T, k] int64) for tokens x [T, D].

    Tie rule (kept by the router kernel too): among exact ties of group scores or of s + b, the lowest
    group / expert index wins, and ids are in descending (s + b) order, lower index first on ties.
    """
    logits = x.float() @ weight.float().t()
    scores = torch.sigmoid(logits)  # s_i,t in float32
    biased = scores + bias.float()  # b_i steers selection only
    tokens, experts = biased.shape
    grouped = biased.view(tokens, n_group, experts // n_group)
    group_scores = grouped.topk(min(2, experts // n_group), dim=-1).values.sum(-1)
    keep = topk_lowest_index(group_scores, topk_group)
    group_mask = torch.zeros_like(group_scores).scatter(1, keep, 1.0).bool()
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(tokens, experts)
    choice = biased.masked_fill(~expert_mask, float("-inf"))
    ids = topk_lowest_index(choice, top_k)
    weights = normalised_sigmoid(logits.gather(1, ids)) if norm_topk_prob else scores.gather(1, ids)
    return weights * scaling, ids


def moe_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    ffn=None,
) -> torch.Tensor:
    """Routed experts: Σ_j g[t,j] · down_e(silu(gate_e(x_t)) ⊙ up_e(x_t)) with e = ids[t,j]; x [T, D], w_* [E, ...].

    ffn(xe, e) overrides how expert e's SwiGLU FFN is computed (the FP8 variants pass their own).
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    flat_ids = ids.reshape(-1)
    token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(ids.shape[1])
    for e in torch.unique(flat_ids).tolist():
        rows = (flat_ids == e).nonzero().squeeze(-1)
        tokens = token_of[rows]
        xe = x[tokens]
        he = ffn(xe, e) if ffn else swiglu(xe @ w_gate[e].t(), xe @ w_up[e].t()) @ w_down[e].t()
        out.index_add_(0, tokens, he.float() * weights.reshape(-1)[rows, None].float())
    return out.to(x.dtype)


def causal_mask(s: int, t: int, device) -> torch.Tensor:
    """Boolean [S, T] mask: new token i (absolute position T - S + i) sees keys at positions ≤ its own."""
    q_pos = torch.arange(t - s, t, device=device)[:, None]
    return torch.arange(t, device=device)[None, :] <= q_pos


def mla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain MLA attention core: softmax(q·kᵀ·scale, causal, float32)·v for q [B,S,H,dqk], k [B,T,H,dqk], v [B,T,H,dv]."""
    scores = torch.einsum("bshd,bthd->bhst", q.float(), k.float()) * scale
    scores = scores.masked_fill(~causal_mask(q.shape[1], k.shape[1], q.device), float("-inf"))
    probs = scores.softmax(-1)
    return torch.einsum("bhst,bthd->bshd", probs, v.float()).to(q.dtype)


def latent_attention(
    q_lat: torch.Tensor, q_pe: torch.Tensor, ckv: torch.Tensor, kpe: torch.Tensor, scale: float
) -> torch.Tensor:
    """Absorbed MLA: o_lat = softmax((q_lat·c_kvᵀ + q_pe·k_peᵀ)·scale, causal)·c_kv; q_lat [B,S,H,r], ckv [B,T,r], kpe [B,T,dr]."""
    scores = torch.einsum("bshr,btr->bhst", q_lat.float(), ckv.float())
    scores = scores + torch.einsum("bshd,btd->bhst", q_pe.float(), kpe.float())
    scores = (scores * scale).masked_fill(~causal_mask(q_lat.shape[1], ckv.shape[1], q_lat.device), float("-inf"))
    return torch.einsum("bhst,btr->bshr", scores.softmax(-1), ckv.float()).to(q_lat.dtype)
