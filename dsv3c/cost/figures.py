"""Model-level figures from captured graphs: FLOPs per token per mode (model, main, hardware) and KV cache bytes.

Each mode is captured once at its reference shape with one block of each kind (`dsv3c.cost.facts`), and the
per-block costs are multiplied by the block counts of the config; `tests/test_pipeline.py` checks this equals
the full-depth graph's cost. The same captures give the block facts the pricing module reads.

Conventions: `flops_per_token` are model FLOPs (train = 3 x forward, causal attention, no recomputation;
MTP included), `flops_per_token_main` the same without the MTP module, `hardware_flops_per_token` what the
hardware executes (backward as executed — attention's backward recomputes its scores — plus the forward
of the RMSNorms and up-projections recomputed in backward). They are counted before fp8_quant: the
quantisation kernels are work of the recipe, not of the model.
"""

import dataclasses

from dsv3c.cost.facts import analyse
from dsv3c.cost.nodes import hardware_flops, model_flops
from model_def import ModelConfig

# the shapes the per-token figures refer to: DeepSeek-V3's 4K training/prefill length, decode at 4K context
REFERENCE_SHAPES = {
    "train": {"batch": 1, "seq": 4096, "kv_len": 0},
    "prefill": {"batch": 1, "seq": 4096, "kv_len": 0},
    "decode": {"batch": 1, "seq": 1, "kv_len": 4096},
}


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


def mode_figures(cfg: ModelConfig, mode: str, target, registry: dict, shapes: dict | None = None,
                 options: dict | None = None) -> dict:
    """FLOPs per token (model, main, hardware), the block facts and for decode the KV cache bytes per token."""
    shapes = shapes or REFERENCE_SHAPES[mode]
    facts, found = analyse(cfg, mode, shapes, target, registry, options)
    mult = block_multiplicity(cfg, found["reduced"])
    per_layer = found["costs"]["per_layer"]
    tokens = shapes["batch"] * shapes["seq"]
    train = mode == "train"
    full, main = scaled_totals(per_layer, mult), scaled_totals(per_layer, mult, main_only=True)
    out = {"model": model_flops(full, train) // tokens, "main": model_flops(main, train) // tokens,
           "hardware": hardware_flops(full) // tokens, "facts": facts}
    if mode == "decode":
        per_token = shapes["batch"] * shapes["kv_len"]
        for key in ("naive", "latent"):
            caches = found["caches_" + key]
            out["kv_" + key] = sum(b * mult[layer] for layer, b in caches.items() if layer in mult) // per_token
    return out


def lift_positions(cfg: ModelConfig, shapes: dict) -> ModelConfig:
    """cfg with max_position_embeddings raised to hold shapes (it bounds positions and changes no shape)."""
    return dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings,
                                                                shapes["seq"] + shapes["kv_len"]))


def model_figures(cfg: ModelConfig, target, registry: dict, options: dict | None = None) -> dict:
    """FLOPs per token for train, prefill and decode (model, main, hardware), KV cache bytes per token, block facts."""
    need = {"batch": 1, "seq": max(s["seq"] + s["kv_len"] for s in REFERENCE_SHAPES.values()), "kv_len": 0}
    cfg = lift_positions(cfg, need)  # so that a model with a shorter context (tiny) is measured at the reference too
    figures = {mode: mode_figures(cfg, mode, target, registry, options=options) for mode in REFERENCE_SHAPES}
    return {
        "flops_per_token": {mode: f["model"] for mode, f in figures.items()},
        "flops_per_token_main": {mode: f["main"] for mode, f in figures.items()},
        "hardware_flops_per_token": {mode: f["hardware"] for mode, f in figures.items()},
        "kv_cache_bytes_per_token": {"naive": figures["decode"]["kv_naive"], "latent": figures["decode"]["kv_latent"]},
        "reference_shapes": REFERENCE_SHAPES,
        "facts": {mode: f["facts"] for mode, f in figures.items()},
    }
