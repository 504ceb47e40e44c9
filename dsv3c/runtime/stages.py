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
    """A MoE layer's routed experts partitioned over an EP group by a placement: this EP rank holds the slots
    ep_rank·S … ep_rank·S + S − 1 of phy2log [P] (S = P / ep; a redundant expert's replicas are separate slots)
    and runs dsv3.ep_dispatch → ep_experts → ep_combine, which exchange tokens over the process groups of the
    active EPContext (dsv3c.ops.ep_context; the caller keeps one active over the forward AND the backward, whose
    exchanges mirror the forward's). forward(x [T, D], ids [T, k], weights [T, k]) -> [T, D], as model_def's
    Experts. `slot_experts` lists the logical expert of each local slot."""

    def __init__(self, experts: nn.Module, ep: int, ep_rank: int, layer: int, phy2log=None, gpus_per_node: int = 8):
        super().__init__()
        from dsv3c.eplb import inverse_tables

        e = experts.gate_proj.shape[0]
        phy2log = torch.arange(e) if phy2log is None else torch.as_tensor(phy2log, dtype=torch.int64)
        if phy2log.numel() % ep:
            raise ValueError(f"{phy2log.numel()} expert slots cannot be split over ep={ep}")
        per = phy2log.numel() // ep
        self.ep, self.ep_rank, self.layer, self.num_experts, self.gpus_per_node = ep, ep_rank, layer, e, gpus_per_node
        self.slot_experts = phy2log[ep_rank * per : (ep_rank + 1) * per].tolist()
        self.remote_routes = 0  # (token, expert) routes this rank sent to another EP rank (forward calls)
        for w in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, w, nn.Parameter(getattr(experts, w).detach()[self.slot_experts].clone()))
        log2phy, logcnt = inverse_tables(phy2log[None], e)
        self.register_buffer("phy2log", phy2log, persistent=False)
        self.register_buffer("log2phy", log2phy[0], persistent=False)
        self.register_buffer("logcnt", logcnt[0], persistent=False)

    def forward(self, x, ids, weights):
        import dsv3c.ops.ep  # noqa: F401  (registers torch.ops.dsv3.ep_*)

        ops, gpn = torch.ops.dsv3, self.gpus_per_node
        recv_x, recv_tok, recv_slot, counts, order, _ = ops.ep_dispatch(
            x, ids, self.phy2log, self.log2phy, self.logcnt, self.ep, self.layer, False, gpn, 1.0, 1.0
        )
        self.remote_routes += int(counts[2].sum() - counts[2][self.ep_rank])
        y = ops.ep_experts(recv_x, recv_tok, recv_slot, self.gate_proj, self.up_proj, self.down_proj, False, self.ep)
        return ops.ep_combine(y, weights, counts, order, self.ep, gpn, x.dtype, 1.0, 1.0)


def ep_partition(module: nn.Module, cfg, ep: int, ep_rank: int, placement=None, gpus_per_node: int = 8,
                 global_name=lambda name: name) -> dict:
    """Replace the routed experts of every MoE layer under module (decoder layers `layers.N`, MTP blocks
    `mtp.K.block`; global_name maps a module's name to the model's) by this EP rank's EPExperts; placement:
    phy2log [MoE layers, P] in dsv3c.parallel.moe_layer_names order (None: contiguous). Returns {parameter
    name: the logical expert of each slot} of the partitioned parameters."""
    from dsv3c.parallel import moe_layer_names

    rows = {name: i for i, name in enumerate(moe_layer_names(cfg))}
    shards = {}
    for name, moe in list(module.named_modules()):
        if not isinstance(moe, MoE) or isinstance(moe.experts, EPExperts):
            continue
        unit = unit_name(global_name(name))
        row = rows[unit]
        index = cfg.num_hidden_layers + int(unit.split(".")[1]) if unit.startswith("mtp.") else int(unit.split(".")[1])
        moe.experts = part = EPExperts(moe.experts, ep, ep_rank, index, None if placement is None else placement[row],
                                       gpus_per_node)  # fmt: skip
        for w in ("gate_proj", "up_proj", "down_proj"):
            shards[f"{name}.experts.{w}"] = part.slot_experts
    return shards


def unit_name(module_name: str) -> str:
    """'layers.3.mlp' → 'layers.3', 'mtp.0.block.mlp' → 'mtp.0' (the plan's unit of a MoE module)."""
    parts = module_name.split(".")
    return ".".join(parts[:2])


class StageModule(nn.Module):
    """Layers [start, end) of a DeepseekV3 (deep-copied), with the embedding when first and the norm, head,
    MTP and a tied embedding copy when last.

    With ep > 1 every MoE layer of the stage (decoder layers and the MTP block) keeps only EP rank ep_rank's
    expert slots of the placement (EPExperts); `ep_shards` maps those parameters' local names to the logical
    expert of each slot.

    forward(x, input_ids=None): x is the token ids on the first stage, else the hidden state [B, S, D];
    input_ids (the micro-batch's tokens) is needed by the last stage for the MTP embedding. Returns the
    hidden state, or on the last stage (logits,) or (logits, mtp_logits).
    """

    def __init__(self, model: DeepseekV3, start: int, end: int, first: bool, last: bool, ep: int = 1, ep_rank: int = 0,
                 placement=None, gpus_per_node: int = 8):
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
        # with ep > 1: local parameter name -> the logical expert of each slot it holds (EPExperts)
        self.ep_shards = ep_partition(self, model.cfg, ep, ep_rank, placement, gpus_per_node,
                                      self.global_name) if ep > 1 else {}

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
