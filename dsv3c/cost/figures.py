"""Model-level figures computed from captured graphs: FLOPs per token per mode, KV cache bytes per token.

Every dense block has the same shapes, and so has every MoE block; so each mode is captured with one
block of each kind (plus MTP) and the per-block costs are multiplied by the block counts of the config.
`tests/test_summary.py` checks this equals the cost of the full-depth graph.
"""

import dataclasses

from dsv3c.frontend.exporter import capture
from dsv3c.cost.nodes import nbytes
from dsv3c.ir import PassContext
from model_def import ModelConfig

# the shapes the per-token figures refer to: DeepSeek-V3's 4K training/prefill length, decode at 4K context
REFERENCE_SHAPES = {
    "train": {"batch": 1, "seq": 4096, "kv_len": 0},
    "prefill": {"batch": 1, "seq": 4096, "kv_len": 0},
    "decode": {"batch": 1, "seq": 1, "kv_len": 4096},
}


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


def scaled_total(per_layer: dict, mult: dict, key: str) -> int:
    """A cost summed over blocks, each reduced block counted as many times as it stands for."""
    return sum(c[key] * mult.get(layer, 1) for layer, c in per_layer.items())


def mode_figures(cfg: ModelConfig, mode: str, registry: dict, shapes: dict | None = None) -> dict:
    """FLOPs per token (and for decode the KV cache bytes per token, naive and latent) for one mode."""
    shapes = shapes or REFERENCE_SHAPES[mode]
    reduced = reduced_config(cfg)
    mult = block_multiplicity(cfg, reduced)
    program = capture(reduced, mode, **shapes)
    ctx = PassContext(target=None, mode=mode)
    registry["dce"].fn(program, ctx)
    out = {}
    if mode == "decode":
        out["kv_naive"] = cache_bytes_per_token(program, mult, shapes)
        if "mla_fuse" in registry:
            registry["mla_fuse"].fn(program, ctx)
            out["kv_latent"] = cache_bytes_per_token(program, mult, shapes)
    registry["cost"].fn(program, ctx)
    per_layer = program.meta["cost"]["per_layer"]
    tokens = shapes["batch"] * shapes["seq"]
    flops = scaled_total(per_layer, mult, "flops")
    if mode == "train":
        flops += scaled_total(per_layer, mult, "bwd_flops")
    out["flops_per_token"] = flops // tokens
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


def model_figures(cfg: ModelConfig, registry: dict) -> dict:
    """FLOPs per token for train (forward + backward), prefill and decode, and KV cache bytes per token."""
    # max_position_embeddings only bounds positions and changes no shape: lift it so that a model with
    # a shorter context (the tiny preset) can be measured at the reference shapes too
    need = max(s["seq"] + s["kv_len"] for s in REFERENCE_SHAPES.values())
    cfg = dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, need))
    figures = {mode: mode_figures(cfg, mode, registry) for mode in ("train", "prefill", "decode")}
    kv = {"naive": figures["decode"]["kv_naive"]}
    if "kv_latent" in figures["decode"]:
        kv["latent"] = figures["decode"]["kv_latent"]
    return {
        "flops_per_token": {mode: figures[mode]["flops_per_token"] for mode in figures},
        "kv_cache_bytes_per_token": kv,
        "reference_shapes": REFERENCE_SHAPES,
    }
