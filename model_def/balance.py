"""DeepSeek-V3 load balancing: the auxiliary-loss-free bias update and the sequence-wise balance loss."""

import torch


def expert_load(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: c_i = Σ_t 1[i ∈ ids_t], int64 [n_experts], for chosen ids of any shape."""
    return torch.bincount(ids.reshape(-1).long(), minlength=n_experts)[:n_experts]


def update_bias(bias: torch.Tensor, expert_load: torch.Tensor, gamma: float = 0.001) -> torch.Tensor:
    """New bias b_i + γ·sign(mean(c) − c_i): raised if expert i is under-loaded, lowered if over-loaded."""
    load = expert_load.to(torch.float64)
    step = torch.sign(load.mean() - load).to(bias.dtype)
    return bias + gamma * step


def sequence_balance_loss(scores: torch.Tensor, ids: torch.Tensor, top_k: int, alpha: float = 1e-4) -> torch.Tensor:
    """L_Bal = α Σ_i f_i P_i, f_i = N_r/(K_r·T)·Σ_t 1[i ∈ topk_t], P_i = mean_t s_{i,t}/Σ_j s_{j,t}."""
    t, n_experts = scores.shape
    if ids.shape != (t, top_k):
        raise ValueError(f"ids must have shape [{t}, {top_k}], got {list(ids.shape)}")
    f = expert_load(ids, n_experts).to(scores.dtype) * (n_experts / (top_k * t))
    p = (scores / scores.sum(-1, keepdim=True)).mean(0)
    return alpha * (f * p).sum()
