"""Model-level figures from captured graphs: FLOPs per token per mode (model, main, hardware) and KV cache bytes.

Each mode is captured once at its reference shape as a program of blocks (`dsv3c.cost.facts`), whose cost
analysis counts each block once per layer it computes; `tests/test_pipeline.py` checks this equals the
full-depth graph's cost. The same captures give the block facts the pricing module reads.

Conventions: `flops_per_token` are model FLOPs (train = 3 x forward, causal attention, no recomputation;
MTP included), `flops_per_token_main` the same without the MTP module, `hardware_flops_per_token` what the
hardware executes (backward as executed — attention's backward recomputes its scores — plus the forward
of the RMSNorms and up-projections recomputed in backward). They are counted before fp8_quant: the
quantisation kernels are work of the recipe, not of the model.
"""

import copy
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


def mode_figures(cfg: ModelConfig, mode: str, target, registry: dict, shapes: dict | None = None,
                 options: dict | None = None, program=None) -> dict:
    """FLOPs per token (model, main, hardware), the block facts and for decode the KV cache bytes per token.

    program: cfg's program of blocks captured for mode at shapes, when the caller has it (it is rewritten)."""
    shapes = shapes or REFERENCE_SHAPES[mode]
    facts, found = analyse(cfg, mode, shapes, target, registry, options, program)
    costs = found["costs"]
    main = {key: sum(c[key] for unit, c in costs["per_layer"].items() if not unit.startswith("mtp."))
            for key in costs["total"]}
    tokens = shapes["batch"] * shapes["seq"]
    train = mode == "train"
    out = {"model": model_flops(costs["total"], train) // tokens, "main": model_flops(main, train) // tokens,
           "hardware": hardware_flops(costs["total"]) // tokens, "facts": facts}
    if mode == "decode":
        per_token = shapes["batch"] * shapes["kv_len"]
        for key in ("naive", "latent"):
            out["kv_" + key] = found["cache_" + key] // per_token
    return out


def lift_positions(cfg: ModelConfig, shapes: dict) -> ModelConfig:
    """cfg with max_position_embeddings raised to hold shapes (it bounds positions and changes no shape)."""
    return dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings,
                                                                shapes["seq"] + shapes["kv_len"]))


def model_figures(cfg: ModelConfig, target, registry: dict, options: dict | None = None, captured=None) -> dict:
    """FLOPs per token for train, prefill and decode (model, main, hardware), KV cache bytes per token, block facts.

    captured: a program of blocks of cfg the caller captured; a copy of it serves its mode when it is that
    mode's reference capture."""
    need = {"batch": 1, "seq": max(s["seq"] + s["kv_len"] for s in REFERENCE_SHAPES.values()), "kv_len": 0}
    cfg = lift_positions(cfg, need)  # so that a model with a shorter context (tiny) is measured at the reference too
    reuse = captured is not None and captured.cfg == cfg and captured.shapes == REFERENCE_SHAPES[captured.mode]
    figures = {mode: mode_figures(cfg, mode, target, registry, options=options,
                                  program=copy.deepcopy(captured) if reuse and captured.mode == mode else None)
               for mode in REFERENCE_SHAPES}
    return {
        "flops_per_token": {mode: f["model"] for mode, f in figures.items()},
        "flops_per_token_main": {mode: f["main"] for mode, f in figures.items()},
        "hardware_flops_per_token": {mode: f["hardware"] for mode, f in figures.items()},
        "kv_cache_bytes_per_token": {"naive": figures["decode"]["kv_naive"], "latent": figures["decode"]["kv_latent"]},
        "reference_shapes": REFERENCE_SHAPES,
        "facts": {mode: f["facts"] for mode, f in figures.items()},
    }
