"""The building blocks of DeepSeek-V3: RMSNorm, YaRN RoPE, MLA, the router gate, DeepSeekMoE, the dense MLP.

Symbols follow the DeepSeek-V3 report: c^KV the compressed KV latent, k^R the decoupled RoPE key,
W^UK / W^UV the key / value up-projections, s_{i,t} the router affinities, b_i the correction bias.
"""

import math

import torch
from torch import nn

from dsv3c import ops
from model_def.config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm(x) = w ⊙ x / RMS(x)."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)


def yarn_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies θ_i for the RoPE dims and the cos/sin amplitude factor."""
    d, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    y = cfg.yarn
    if y is None:
        return inv_freq.float(), 1.0
    factor, orig = y["factor"], y["original_max_position_embeddings"]

    def correction_dim(beta):  # the dim whose wavelength fits beta times in the original context
        return d * math.log(orig / (beta * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(y["beta_fast"]), correction_dim(y["beta_slow"])
    if y["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    # transformers' ramp: an empty range (beta_fast == beta_slow, as in Kimi-K2) widens to 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / ((high - low) or 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)  # interpolate low frequencies only

    def mscale(m):
        return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0

    # cos/sin amplitude as transformers computes it (1.0 for V3, whose mscale == mscale_all_dim)
    amplitude = mscale(y["mscale"]) / mscale(y["mscale_all_dim"]) if y["mscale"] and y["mscale_all_dim"] else mscale(1)
    if y["attention_factor"] is not None:
        amplitude = y["attention_factor"]
    return inv_freq.float(), amplitude


class RotaryEmbedding(nn.Module):
    """cos/sin of the YaRN RoPE angles m·θ_i for positions m."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        inv_freq, self.amplitude = yarn_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def forward(self, batch: int, start: int, length: int):
        pos = torch.arange(start, start + length, device=self.inv_freq.device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq).unsqueeze(0).expand(batch, length, -1)
        return angles.cos() * self.amplitude, angles.sin() * self.amplitude


def linear(i: int, o: int, device) -> nn.Linear:
    """A bias-free linear layer i → o."""
    return nn.Linear(i, o, bias=False, device=device)


class MLA(nn.Module):
    """Multi-head latent attention in its plain form: K and V are up-projected from c^KV for every token."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.num_attention_heads, cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.q_proj = linear(d, h * cfg.qk_head_dim, device)
        else:
            self.q_a_proj = linear(d, cfg.q_lora_rank, device)  # W^DQ
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6, device)
            self.q_b_proj = linear(cfg.q_lora_rank, h * cfg.qk_head_dim, device)  # W^UQ and W^QR
        self.kv_a_proj_with_mqa = linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, device)  # W^DKV, W^KR
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6, device)
        self.kv_b_proj = linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), device)  # W^UK, W^UV
        self.o_proj = linear(h * cfg.v_head_dim, d, device)

    def forward(self, x, cos, sin, past=None):
        """Attention output for x [B, S, D], and this step's cache entries (k, v) per token."""
        cfg = self.cfg
        b, s, _ = x.shape
        h, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        if cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(b, s, h, dn + dr).split([dn, dr], dim=-1)
        q_pe = ops.rope(q_pe, cos, sin)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, dr], dim=-1)
        k_pe = ops.rope(k_pe, cos, sin)  # k^R: one RoPE key shared by all heads
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(b, s, h, dn + dv)
        k_nope, v = kv.split([dn, dv], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(b, s, h, dr)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        entries = (k, v)
        if past is not None:
            k = torch.cat([past[0], k], dim=1)
            v = torch.cat([past[1], v], dim=1)
        o = ops.mla_attention(q, k, v, cfg.softmax_scale)
        return self.o_proj(o.reshape(b, s, h * dv)), entries


class MLP(nn.Module):
    """SwiGLU feed-forward: W_down(silu(W_gate x) ⊙ W_up x)."""

    def __init__(self, dim: int, inter: int, device=None):
        super().__init__()
        self.gate_proj = linear(dim, inter, device)
        self.up_proj = linear(dim, inter, device)
        self.down_proj = linear(inter, dim, device)

    def forward(self, x):
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class Gate(nn.Module):
    """Router: g_{i,t} from sigmoid affinities s_{i,t}, selection by s + b within the top groups."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, device=device))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, device=device))

    def forward(self, x):
        c = self.cfg
        return ops.moe_gate(
            x, self.weight, self.e_score_correction_bias, c.n_group, c.topk_group, c.num_experts_per_tok,
            c.norm_topk_prob, c.routed_scaling_factor,
        )  # fmt: skip


class Experts(nn.Module):
    """The routed experts' weights stacked along a leading expert axis E."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        e, f, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_proj = nn.Parameter(torch.empty(e, f, d, device=device))
        self.up_proj = nn.Parameter(torch.empty(e, f, d, device=device))
        self.down_proj = nn.Parameter(torch.empty(e, d, f, device=device))

    def forward(self, x, ids, weights):
        return ops.moe_experts(x, ids, weights, self.gate_proj, self.up_proj, self.down_proj)


class MoE(nn.Module):
    """DeepSeekMoE: h = Σ shared FFN(u) + Σ_i g_i · routed FFN_i(u)."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.gate = Gate(cfg, device)
        self.experts = Experts(cfg, device)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, device)

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        weights, ids = self.gate(tokens)
        out = self.experts(tokens, ids, weights).view(x.shape)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out


class Block(nn.Module):
    """A transformer block: h = x + MLA(norm(x)); out = h + FFN(norm(h)), FFN dense or MoE by layer index."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, device=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.self_attn = MLA(cfg, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.mlp = MoE(cfg, device) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size, device)

    def forward(self, x, cos, sin, past=None):
        a, entries = self.self_attn(self.input_layernorm(x), cos, sin, past)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), entries
