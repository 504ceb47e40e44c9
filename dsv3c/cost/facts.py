"""A model's block facts: each distinct block's kernel facts and weights, from its program of blocks through the passes.

Every dense block of a config has the same shapes, and so has every MoE block; so a mode is captured as a
program of blocks (`dsv3c.frontend.exporter.capture_blocks`: each distinct block once, plus the MTP module),
run through `dce, mla_fuse, fp8_quant, cost`, and each block's facts (`passes/cost.py`) stand for all the
blocks of its kind. The model is the ordered list of units the planner places: the embedding, the dense
layers, the MoE layers, the head (final norm and output head), the MTP modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv3c.frontend.exporter import capture_blocks
from dsv3c.ir import Plan
from dsv3c.ir.program import name_unit

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


def block_counts(cfg) -> dict:
    """How many blocks of each kind the full config has."""
    dense = min(cfg.first_k_dense_replace, cfg.num_hidden_layers) if cfg.n_routed_experts else cfg.num_hidden_layers
    return {"embed": 1, "dense": dense, "moe": cfg.num_hidden_layers - dense, "head": 1,
            "mtp": cfg.num_nextn_predict_layers}


def kind_of_block(name: str, cfg) -> str:
    """The block kind of a unit name of cfg's model ('layers.N' is dense or MoE by its index)."""
    if name.startswith("layers."):
        return "moe" if cfg.is_moe_layer(int(name.split(".")[1])) else "dense"
    return "mtp" if name.startswith("mtp.") else name


def from_costs(costs: dict, cfg, mode: str, shapes: dict) -> BlockFacts:
    """BlockFacts from the cost pass's analysis of the model (each kind's facts are its first block's)."""
    blocks, params = {}, {}
    for name, facts in costs["facts"].items():
        kind = kind_of_block(name, cfg)
        blocks.setdefault(kind, facts)
        params.setdefault(kind, costs["params"].get(name, {}))
    counts = {k: n for k, n in block_counts(cfg).items() if k in blocks}
    return BlockFacts(mode, dict(shapes), blocks, params, counts)


def analyse(cfg, mode: str, shapes: dict, target, registry: dict, options: dict | None = None, program=None):
    """Capture cfg's program of blocks at shapes and run FACT_PASSES: (BlockFacts, model-level findings).

    program: that capture when the caller has it (it is rewritten). The findings are the cost analysis before
    fp8_quant (the model's own FLOPs, without quantisation work) and, for decode, the bytes of the main
    layers' KV cache inputs before and after mla_fuse (naive and latent cache).
    """
    program = program if program is not None else capture_blocks(cfg, mode, **shapes)
    plan = Plan(program, target, options=dict(options or {}))
    found = {}
    for name in FACT_PASSES:
        if name == "mla_fuse":
            found["cache_naive"] = cache_bytes(plan.program)
        if name == "fp8_quant":
            registry["cost"].fn(plan, {})
            found["costs"] = plan.analyses.costs
            found["cache_latent"] = cache_bytes(plan.program)
        registry[name].fn(plan, {})
    return from_costs(plan.analyses.costs, cfg, mode, shapes), found


def cache_bytes(program) -> int:
    """Bytes of the KV cache inputs (`past_*`) of the model's main layers (the MTP module's apart)."""
    layers = program.cfg.num_hidden_layers
    out = 0
    for node in program.placeholders():
        if node.name.startswith("past_") and name_unit(node.name, layers).startswith("layers."):
            val = node.meta["val"]
            out += val.numel() * val.element_size() * program.weight_times(node.name)
    return out
