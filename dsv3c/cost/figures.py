"""Model-level figures computed from captured graphs: FLOPs per token per mode (model, main, hardware), KV bytes.

Every dense block has the same shapes, and so has every MoE block; so each mode is captured with one
block of each kind (plus MTP), run through dce, mla_fuse and cost, and the per-block costs are multiplied
by the block counts of the config. `tests/test_pipeline.py` checks this equals the full-depth graph's cost.

Conventions: `flops_per_token` are model FLOPs (train = 3 x forward, causal attention, no recomputation;
MTP included), `flops_per_token_main` the same without the MTP module, `hardware_flops_per_token` what the
hardware executes (backward as executed — attention's backward recomputes its scores — plus the forward
of the RMSNorms and up-projections recomputed in backward).
"""

import dataclasses

from dsv3c.cost.nodes import hardware_flops, model_flops
from dsv3c.frontend.exporter import capture
from dsv3c.ir import Plan
from dsv3c.ops.record import nbytes
from model_def import ModelConfig

# the shapes the per-token figures refer to: DeepSeek-V3's 4K training/prefill length, decode at 4K context
REFERENCE_SHAPES = {
    "train": {"batch": 1, "seq": 4096, "kv_len": 0},
    "prefill": {"batch": 1, "seq": 4096, "kv_len": 0},
    "decode": {"batch": 1, "seq": 1, "kv_len": 4096},
}
FIGURE_PASSES = ("dce", "mla_fuse", "cost")


def reduced_config(cfg: ModelConfig) -> ModelConfig:
    """The config with at most one dense and one MoE block (MTP kept)."""
    dense = min(cfg.first_k_dense_replace, cfg.num_hidden_layers, 1)
    moe = 1 if cfg.num_hidden_layers > cfg.first_k_dense_replace and cfg.n_routed_experts else 0
    return dataclasses.replace(cfg, num_hidden_layers=dense + moe, first_k_dense_replace=dense)


def block_multiplicity(cfg: ModelConfig, reduced: ModelConfig) -> dict[str, int]:
    """How many blocks of the full config each block of the reduced config stands for."""
    dense = min(cfg.first_k_dense_replace, cfg.num_hidden_layers)
    mult = {}
    for i in range(reduced.num_hidden_layers):
        mult[f"layers.{i}"] = dense if i < reduced.first_k_dense_replace else cfg.num_hidden_layers - dense
    return mult


def scaled_totals(per_layer: dict, mult: dict, main_only: bool = False) -> dict:
    """Costs summed over blocks, each reduced block counted as many times as it stands for."""
    out: dict = {}
    for layer, c in per_layer.items():
        if main_only and layer.startswith("mtp."):
            continue
        for key, value in c.items():
            out[key] = out.get(key, 0) + value * mult.get(layer, 1)
    return out


def mode_figures(cfg: ModelConfig, mode: str, target, registry: dict, shapes: dict | None = None) -> dict:
    """FLOPs per token (model, main, hardware) and for decode the KV cache bytes per token, naive and latent."""
    shapes = shapes or REFERENCE_SHAPES[mode]
    reduced = reduced_config(cfg)
    mult = block_multiplicity(cfg, reduced)
    plan = Plan(capture(reduced, mode, **shapes), target)
    out = {}
    for name in FIGURE_PASSES:
        if name == "mla_fuse" and mode == "decode":
            out["kv_naive"] = cache_bytes_per_token(plan.program, mult, shapes)
        registry[name].fn(plan, {})
    if mode == "decode":
        out["kv_latent"] = cache_bytes_per_token(plan.program, mult, shapes)
    per_layer = plan.analyses.costs["per_layer"]
    tokens = shapes["batch"] * shapes["seq"]
    train = mode == "train"
    full, main = scaled_totals(per_layer, mult), scaled_totals(per_layer, mult, main_only=True)
    out["model"] = model_flops(full, train) // tokens
    out["main"] = model_flops(main, train) // tokens
    out["hardware"] = hardware_flops(full) // tokens
    if train:  # per-block costs for the training cost model (dsv3c.cost.train), at this micro-batch shape
        from dsv3c.cost.blocks import blocks_from_per_layer

        out["blocks"] = {"tokens": tokens, "seq": shapes["seq"], "blocks": blocks_from_per_layer(cfg, per_layer)}
    return out


def cache_bytes_per_token(program, mult: dict, shapes: dict) -> int:
    """KV cache bytes per token of context over the main model's blocks (MTP's own cache excluded)."""
    total = 0
    for node in program.placeholders():
        if node.name.startswith("past_"):
            layer = f"layers.{node.name.split('_')[1]}"
            if layer in mult:
                total += nbytes(node.meta["val"]) * mult[layer]
    return total // (shapes["batch"] * shapes["kv_len"])


def model_figures(cfg: ModelConfig, target, registry: dict) -> dict:
    """FLOPs per token for train, prefill and decode (model, main, hardware) and KV cache bytes per token."""
    # max_position_embeddings only bounds positions and changes no shape: lift it so that a model with
    # a shorter context (the tiny preset) can be measured at the reference shapes too
    need = max(s["seq"] + s["kv_len"] for s in REFERENCE_SHAPES.values())
    cfg = dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, need))
    figures = {mode: mode_figures(cfg, mode, target, registry) for mode in ("train", "prefill", "decode")}
    return {
        "flops_per_token": {mode: f["model"] for mode, f in figures.items()},
        "flops_per_token_main": {mode: f["main"] for mode, f in figures.items()},
        "hardware_flops_per_token": {mode: f["hardware"] for mode, f in figures.items()},
        "kv_cache_bytes_per_token": {"naive": figures["decode"]["kv_naive"], "latent": figures["decode"]["kv_latent"]},
        "reference_shapes": REFERENCE_SHAPES,
        "train_blocks": figures["train"].get("blocks"),
    }
