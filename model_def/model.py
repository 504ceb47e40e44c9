"""DeepseekV3: embedding, blocks, final norm and head, plus the multi-token-prediction module."""

import copy

import torch
from torch import nn

from model_def.config import ModelConfig
from model_def.modules import Block, RMSNorm, RotaryEmbedding, linear


class MTPModule(nn.Module):
    """MTP depth k: h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i)] → own block → shared head after own norm.

    h_i is the main model's output after its final norm (what the released weights were trained with).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, device=None):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.eh_proj = linear(2 * cfg.hidden_size, cfg.hidden_size, device)  # M_k, embedding half first
        self.block = Block(cfg, layer_idx, device)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)  # shared_head.norm

    def forward(self, h, next_emb, cos, sin, past, head):
        """Logits for token i+k+1 from the main model's normed hidden state h_i and the embedding of token i+k."""
        x = self.eh_proj(torch.cat([self.enorm(next_emb), self.hnorm(h)], dim=-1))
        x, entries = self.block(x, cos, sin, past)
        return head(self.norm(x)), entries


def layer_runs(cfg: ModelConfig) -> list[range]:
    """The decoder layers as runs of identical blocks, in order: the dense layers, then the MoE layers."""
    runs: list[range] = []
    for i in range(cfg.num_hidden_layers):
        if runs and cfg.is_moe_layer(i) == cfg.is_moe_layer(runs[-1].start):
            runs[-1] = range(runs[-1].start, i + 1)
        else:
            runs.append(range(i, i + 1))
    return runs


class DeepseekV3(nn.Module):
    """The DeepSeek-V3 causal LM; on device 'meta' no weight is materialised.

    `elided=True` builds only the first layer of each run of identical blocks (`layer_runs`), under its own
    name ('layers.0', 'layers.3'): what dsv3c captures to compile each distinct block once. An elided model
    computes fewer layers than the config has; `layer_repeats` says how many each built layer stands for.
    """

    def __init__(self, cfg: ModelConfig, device=None, dtype: torch.dtype | None = None, elided: bool = False):
        super().__init__()
        # no device: the default device, so `with torch.device("meta"): DeepseekV3(cfg)` builds on meta
        device = torch.device(device) if device is not None else torch.get_default_device()
        self.cfg = cfg
        n = cfg.num_hidden_layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device)
        self.rotary = RotaryEmbedding(cfg, device)
        if elided:
            self.layers = nn.ModuleDict({str(r.start): Block(cfg, r.start, device) for r in layer_runs(cfg)})
        else:
            self.layers = nn.ModuleList(Block(cfg, i, device) for i in range(n))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, device)
        self.mtp = nn.ModuleList(MTPModule(cfg, n + k, device) for k in range(cfg.num_nextn_predict_layers))
        if device.type != "meta":
            self.reset_parameters()
        if dtype is not None:
            self.to(dtype)
            for name, buf in self.named_buffers():  # the router bias and RoPE frequencies stay in float32
                buf.data = buf.data.float()

    def elide(self) -> "DeepseekV3":
        """This model elided (see the class docstring), sharing its modules and weights."""
        out = copy.copy(self)
        out._modules = dict(self._modules)  # its own module table; the modules themselves are shared
        out.layers = nn.ModuleDict({str(r.start): self.layers[r.start] for r in layer_runs(self.cfg)})
        return out

    def decoder_layers(self) -> list[nn.Module]:
        """The built decoder layers in order."""
        return list(self.layers.values()) if isinstance(self.layers, nn.ModuleDict) else list(self.layers)

    def layer_repeats(self) -> dict[str, int]:
        """How many layers of the config each built layer stands for ('layers.3' -> 58 when elided, else 1)."""
        if isinstance(self.layers, nn.ModuleDict):
            return {f"layers.{r.start}": len(r) for r in layer_runs(self.cfg)}
        return {f"layers.{i}": 1 for i in range(len(self.layers))}

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, seed: int | None = None) -> None:
        """Random weights (normal std for matrices, ones for norms, zero router bias) for tests and demos."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device="cpu") * std)  # CPU even in a device context
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()

    def forward(self, input_ids, mtp: bool = False, past=None, return_cache: bool = False):
        """Logits [B, S, V]; with mtp also the MTP logits; with return_cache also this step's cache entries.

        past: per-layer (k, v) of earlier tokens (the MTP block's last when mtp). Training-style MTP
        (no cache) predicts from the S-1 positions whose next token is in input_ids; inference-style
        MTP (with a cache) drafts for all S positions, taking the main head's greedy token for the last.
        """
        b, s = input_ids.shape
        start = 0 if past is None else past[0][0].shape[1]
        cos, sin = self.rotary(b, start, s)
        h = self.embed_tokens(input_ids)
        entries = []
        for i, layer in enumerate(self.decoder_layers()):
            h, e = layer(h, cos, sin, None if past is None else past[i])
            entries.append(e)
        h = self.norm(h)  # MTP reads the final norm's output, as transformers' and vLLM's DeepSeek MTP do
        logits = self.lm_head(h)
        outs = [logits]
        if mtp and self.mtp:
            if past is None and not return_cache:
                mtp_logits, _ = self.mtp[0](
                    h[:, :-1], self.embed_tokens(input_ids[:, 1:]), cos[:, :-1], sin[:, :-1], None, self.lm_head
                )
            else:
                draft = torch.cat([input_ids[:, 1:], logits[:, -1:].argmax(-1)], dim=1)
                mtp_past = None if past is None else past[len(self.layers)]
                mtp_logits, e = self.mtp[0](h, self.embed_tokens(draft), cos, sin, mtp_past, self.lm_head)
                entries.append(e)
            outs.append(mtp_logits)
        if return_cache:
            outs.append(entries)
        return outs[0] if len(outs) == 1 else tuple(outs)
