"""Pipeline stages of a DeepseekV3 and the training loss, with a single-process reference.

A stage is a contiguous block of decoder layers. The first stage also holds the token embedding, the last
the final norm, the head, the MTP module and the loss. Every stage recomputes the RoPE tables (they are a
parameter-free buffer, cheaper to recompute than to send). The MTP module needs the embedding of the
shifted input tokens, so the last stage holds a tied copy of the embedding (as Megatron does for tied
embeddings): the two copies' gradients are summed, which is the embedding group's all-reduce.

Each stage module is a deep copy of the model's modules, so two stages on one rank (DualPipeV's V, DualPipe's
two directions) never share a Parameter; `global_name` maps a stage's parameter back to the model's name,
and summing the gradients of all copies by name gives the model's gradient.

The loss of one micro-batch mirrors the model's training-mode MTP (`model(ids, mtp=True)`):

    L = CE(logits[:, :-1], ids[:, 1:]) + λ · CE(mtp_logits[:, :-1], ids[:, 2:])      (λ = MTP_LAMBDA = 0.3)

(MTP position i predicts token i+2 from h_i and the embedding of token i+1; its last position has no
target.) The step's loss is the MEAN over micro-batches of L, and every gradient is that of the mean: the
pipelined runs accumulate each micro-batch's unscaled gradient and divide by the micro-batch count at the
end (torch.distributed.pipelining's scale_grads=True), and so does `reference_loss_and_grads`.
"""

from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F
from torch import nn

from model_def.model import DeepseekV3
from model_def.modules import MoE

MTP_LAMBDA = 0.3


def split_layers(num_layers: int, num_stages: int, ranges=None) -> list[tuple[int, int]]:
    """Half-open layer ranges [start, end) per stage: `ranges` checked, or balanced by count (earlier stages
    take the remainder)."""
    if ranges is not None:
        ranges = [tuple(r) for r in ranges]
        if len(ranges) != num_stages:
            raise ValueError(f"{len(ranges)} layer ranges for {num_stages} stages")
        pos = 0
        for a, b in ranges:
            if a != pos or b < a:
                raise ValueError(f"layer ranges {ranges} are not contiguous from 0")
            pos = b
        if pos != num_layers:
            raise ValueError(f"layer ranges {ranges} do not cover {num_layers} layers")
        return ranges
    base, extra = divmod(num_layers, num_stages)
    out, pos = [], 0
    for s in range(num_stages):
        n = base + (1 if s < extra else 0)
        out.append((pos, pos + n))
        pos += n
    return out


class EPExperts(nn.Module):
    """A MoE layer's routed experts partitioned over an EP group: this EP rank holds the contiguous experts
    ep_rank·E/ep … (ep_rank+1)·E/ep − 1 and runs dsv3.ep_dispatch → ep_experts → ep_combine, which exchange
    tokens with all_to_all_single over the process group of the active EPContext (dsv3c.runtime.ep_context;
    the caller keeps it active over the forward AND the backward, whose exchanges mirror the forward's).
    forward(x [T, D], ids [T, k], weights [T, k]) -> [T, D], as model_def's Experts."""

    def __init__(self, experts: nn.Module, ep: int, ep_rank: int, layer: int):
        super().__init__()
        e = experts.gate_proj.shape[0]
        if e % ep:
            raise ValueError(f"{e} routed experts cannot be split over ep={ep}")
        per = e // ep
        self.ep, self.ep_rank, self.layer, self.num_experts, self.first_expert = ep, ep_rank, layer, e, ep_rank * per
        self.remote_routes = 0  # (token, expert) routes this rank sent to another EP rank (forward calls)
        sl = slice(self.first_expert, self.first_expert + per)
        for w in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, w, nn.Parameter(getattr(experts, w).detach()[sl].clone()))
        # the identity placement (one slot per logical expert, slots GPU-major): rank r holds slots r·S … r·S+S−1
        self.register_buffer("phy2log", torch.arange(e), persistent=False)
        self.register_buffer("log2phy", torch.arange(e)[:, None], persistent=False)
        self.register_buffer("logcnt", torch.ones(e, dtype=torch.int64), persistent=False)

    def forward(self, x, ids, weights):
        import dsv3c.ops.ep  # noqa: F401  (registers torch.ops.dsv3.ep_*)

        ops = torch.ops.dsv3
        recv_x, recv_tok, recv_slot, counts, order, _ = ops.ep_dispatch(
            x, ids, self.phy2log, self.log2phy, self.logcnt, self.ep, self.layer, False, 8, 1.0, 1.0
        )
        if counts.device.type != "meta":  # (not during the pipeline runtime's shape inference)
            self.remote_routes += int(counts[2].sum() - counts[2][self.ep_rank])
        y = ops.ep_experts(recv_x, recv_tok, recv_slot, self.gate_proj, self.up_proj, self.down_proj, False, self.ep)
        return ops.ep_combine(y, weights, counts, order, self.ep, 8, x.dtype)


class StageModule(nn.Module):
    """Layers [start, end) of a DeepseekV3 (deep-copied), with the embedding when first and the norm, head,
    MTP and a tied embedding copy when last.

    With ep > 1 every MoE layer of the stage (decoder layers and the MTP block) keeps only EP rank ep_rank's
    routed experts (EPExperts); `ep_shards` maps those parameters' local names to (first expert, experts).

    forward(x, input_ids=None): x is the token ids on the first stage, else the hidden state [B, S, D];
    input_ids (the micro-batch's tokens) is needed by the last stage for the MTP embedding. Returns the
    hidden state, or on the last stage (logits,) or (logits, mtp_logits).
    """

    def __init__(self, model: DeepseekV3, start: int, end: int, first: bool, last: bool, ep: int = 1, ep_rank: int = 0):
        super().__init__()
        self.start, self.end, self.first, self.last = start, end, first, last
        self.hidden_size = model.cfg.hidden_size
        self.rotary = copy.deepcopy(model.rotary)
        if first or (last and len(model.mtp)):
            self.embed_tokens = copy.deepcopy(model.embed_tokens)
        self.layers = nn.ModuleList(copy.deepcopy(model.layers[i]) for i in range(start, end))
        if last:
            self.norm = copy.deepcopy(model.norm)
            self.lm_head = copy.deepcopy(model.lm_head)
            self.mtp = copy.deepcopy(model.mtp)
        self.ep_shards = {}  # local parameter name -> (first expert held, experts in the model) when ep > 1
        if ep > 1:  # every MoE layer of the stage (the decoder layers' and the MTP block's)
            n_layers = model.cfg.num_hidden_layers
            moes = [(f"layers.{i}.mlp", start + i, layer.mlp) for i, layer in enumerate(self.layers)]
            moes += [(f"mtp.{j}.block.mlp", n_layers + j, m.block.mlp) for j, m in enumerate(getattr(self, "mtp", []))]
            for prefix, index, moe in moes:
                if isinstance(moe, MoE):
                    moe.experts = part = EPExperts(moe.experts, ep, ep_rank, index)
                    for w in ("gate_proj", "up_proj", "down_proj"):
                        self.ep_shards[f"{prefix}.experts.{w}"] = (part.first_expert, part.num_experts)

    def global_name(self, local: str) -> str:
        """The model's name of this stage's parameter `local` (layer indices shifted by start)."""
        m = re.match(r"layers\.(\d+)\.(.*)", local)
        return f"layers.{int(m.group(1)) + self.start}.{m.group(2)}" if m else local

    def forward(self, x, input_ids=None):
        h = self.embed_tokens(x) if self.first else x
        b, s = h.shape[:2]
        cos, sin = self.rotary(b, 0, s)
        for layer in self.layers:
            h, _ = layer(h, cos, sin)
        if not self.last:
            return h
        h = self.norm(h)  # the MTP module reads the final norm's output, as the model does
        logits = self.lm_head(h)
        if not len(self.mtp):
            return (logits,)
        if input_ids is None:
            raise ValueError("the last stage needs input_ids for the MTP module")
        next_emb = self.embed_tokens(input_ids[:, 1:])
        mtp_logits, _ = self.mtp[0](h[:, :-1], next_emb, cos[:, :-1], sin[:, :-1], None, self.lm_head)
        return logits, mtp_logits


def build_stages(model: DeepseekV3, num_stages: int, ranges=None) -> list[StageModule]:
    """All stage modules of a plain (one-direction) pipeline of num_stages stages."""
    spans = split_layers(model.cfg.num_hidden_layers, num_stages, ranges)
    return [StageModule(model, a, b, s == 0, s == num_stages - 1) for s, (a, b) in enumerate(spans)]


def lm_loss(outputs, input_ids, mtp_lambda: float = MTP_LAMBDA):
    """One micro-batch's loss from the last stage's outputs: next-token CE plus λ · the MTP CE."""
    logits = outputs[0]
    v = logits.shape[-1]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, v), input_ids[:, 1:].reshape(-1))
    if len(outputs) > 1:
        loss = loss + mtp_lambda * F.cross_entropy(outputs[1][:, :-1].reshape(-1, v), input_ids[:, 2:].reshape(-1))
    return loss


def reference_loss_and_grads(
    model: DeepseekV3, batch: torch.Tensor, micro_batches: int, mtp_lambda: float = MTP_LAMBDA
) -> tuple[float, dict]:
    """The single-process step: (mean micro-batch loss as a float, {parameter name: gradient of that mean}).

    batch [B, S] of token ids is cut into `micro_batches` equal chunks along B, as the pipeline does.
    """
    model.zero_grad(set_to_none=True)
    losses = []
    for ids in batch.chunk(micro_batches, dim=0):
        out = model(ids, mtp=bool(len(model.mtp)))
        loss = lm_loss(out if isinstance(out, tuple) else (out,), ids, mtp_lambda)
        loss.backward()
        losses.append(loss.detach())
    grads = {}
    for name, p in model.named_parameters():
        g = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        grads[name] = g / micro_batches
    model.zero_grad(set_to_none=True)
    return float(torch.stack(losses).double().mean()), grads


def make_batch(cfg, micro_batches: int, mb_size: int, seq: int, seed: int) -> torch.Tensor:
    """Deterministic random token ids [micro_batches·mb_size, seq]."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, cfg.vocab_size, (micro_batches * mb_size, seq), generator=gen)


def build_model(cfg, seed: int) -> DeepseekV3:
    """The float32 model with seeded random weights (every rank builds the same)."""
    model = DeepseekV3(cfg, device="cpu", dtype=torch.float32)
    model.reset_parameters(seed=seed)
    return model
