"""A model's block facts: each distinct block's kernel facts and weights, from one reduced capture through the passes.

Every dense block of a config has the same shapes, and so has every MoE block; so a mode is captured with
one block of each kind (plus the MTP module), run through `dce, mla_fuse, fp8_quant, cost`, and each block's
facts (`passes/cost.py`) stand for all the blocks of its kind. The model is the ordered list of units the
planner places: the embedding, the dense layers, the MoE layers, the head (final norm and output head), the
MTP modules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dsv3c.frontend.exporter import capture
from dsv3c.ir import Plan

FACT_PASSES = ("dce", "mla_fuse", "fp8_quant", "cost")
KINDS = ("embed", "dense", "moe", "head", "mtp")


@dataclass(frozen=True)
class BlockFacts:
    """Per block kind its kernel facts and weights, the captured shapes and how many blocks of each kind."""

    mode: str
    shapes: dict  # batch, seq, kv_len of the capture
    blocks: dict  # kind -> [fact, ...]
    params: dict  # kind -> {dense, expert, dense_bytes, expert_bytes}
    counts: dict  # kind -> number of blocks in the model

    def units(self) -> list[str]:
        """The model's units in pipeline order: embedding, dense layers, MoE layers, head, MTP modules."""
        return [k for k in KINDS for _ in range(self.counts.get(k, 0))]

    def flops_per_token(self, main_only: bool = False) -> float:
        """Model FLOPs per new token (training: 3 x forward) over every block, or the main model's alone."""
        total = sum(f["flops"] * f["count"] * self.counts[k] for k, fs in self.blocks.items()
                    if not (main_only and k == "mtp") for f in fs)
        return total * (3 if self.mode == "train" else 1) / self.tokens

    def hardware_flops_per_token(self) -> float:
        """FLOPs the hardware executes per new token: forward, backward as executed and recomputed forwards."""
        total = sum((f["flops"] * (2 if f["recompute"] else 1) + f["bwd_flops"]) * f["count"] * self.counts[k]
                    for k, fs in self.blocks.items() for f in fs)
        return total / self.tokens

    @property
    def sequences(self) -> int:
        """Sequences in the captured batch."""
        return self.shapes["batch"]

    @property
    def tokens(self) -> int:
        """New tokens in the captured batch."""
        return self.shapes["batch"] * self.shapes["seq"]


def reduced_config(cfg):
    """The config with at most one dense and one MoE block (MTP kept)."""
    dense = min(cfg.first_k_dense_replace, cfg.num_hidden_layers, 1)
    moe = 1 if cfg.num_hidden_layers > cfg.first_k_dense_replace and cfg.n_routed_experts else 0
    return dataclasses.replace(cfg, num_hidden_layers=dense + moe, first_k_dense_replace=dense)


def block_counts(cfg) -> dict:
    """How many blocks of each kind the full config has."""
    dense = min(cfg.first_k_dense_replace, cfg.num_hidden_layers) if cfg.n_routed_experts else cfg.num_hidden_layers
    return {"embed": 1, "dense": dense, "moe": cfg.num_hidden_layers - dense, "head": 1,
            "mtp": cfg.num_nextn_predict_layers}


def kind_of_block(name: str, reduced) -> str:
    """The block kind of a reduced capture's block name ('layers.0' is dense when the config has dense layers)."""
    if name.startswith("layers."):
        return "dense" if int(name.split(".")[1]) < reduced.first_k_dense_replace else "moe"
    return "mtp" if name.startswith("mtp.") else name


def from_costs(costs: dict, cfg, reduced, mode: str, shapes: dict) -> BlockFacts:
    """BlockFacts from the cost pass's analysis of a reduced capture."""
    blocks, params = {}, {}
    for name, facts in costs["facts"].items():
        kind = kind_of_block(name, reduced)
        blocks.setdefault(kind, facts)
        params.setdefault(kind, costs["params"].get(name, {}))
    counts = {k: n for k, n in block_counts(cfg).items() if k in blocks}
    return BlockFacts(mode, dict(shapes), blocks, params, counts)


def analyse(cfg, mode: str, shapes: dict, target, registry: dict, options: dict | None = None):
    """Capture the reduced config at shapes and run FACT_PASSES: (BlockFacts, model-level findings).

    The findings are the cost analysis before fp8_quant (the model's own FLOPs, without quantisation work)
    and, for decode, the KV cache inputs before and after mla_fuse (naive and latent cache).
    """
    reduced = reduced_config(cfg)
    plan = Plan(capture(reduced, mode, **shapes), target, options=dict(options or {}))
    found = {"reduced": reduced}
    for name in FACT_PASSES:
        if name == "mla_fuse":
            found["caches_naive"] = cache_inputs(plan.program)
        if name == "fp8_quant":
            registry["cost"].fn(plan, {})
            found["costs"] = plan.analyses.costs
            found["caches_latent"] = cache_inputs(plan.program)
        registry[name].fn(plan, {})
    return from_costs(plan.analyses.costs, cfg, reduced, mode, shapes), found


def cache_inputs(program) -> dict:
    """{block: bytes} of the KV cache inputs (`past_*`) of a captured program, by the block they belong to."""
    out: dict = {}
    for node in program.placeholders():
        if node.name.startswith("past_"):
            layer = f"layers.{node.name.split('_')[1]}"
            val = node.meta["val"]
            out[layer] = out.get(layer, 0) + val.numel() * val.element_size()
    return out
