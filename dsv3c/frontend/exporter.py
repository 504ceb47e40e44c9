"""Capture: torch.export of the whole model (MTP included) for a mode and shapes, as a Program."""

import torch
from torch.export.graph_signature import InputKind

from dsv3c.ir import Program
from model_def import DeepseekV3, ModelConfig

MODES = ("train", "prefill", "decode")


class CaptureError(ValueError):
    """Capture arguments that describe no valid graph."""


def example_inputs(cfg: ModelConfig, mode: str, batch: int, seq: int, kv_len: int, device="meta", dtype=None):
    """(args, kwargs, input names) of the model call that `mode` captures."""
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    mtp = cfg.num_nextn_predict_layers > 0
    if mode == "train":
        return (ids,), {"mtp": mtp}, ["input_ids"]
    if mode == "prefill":
        return (ids,), {"mtp": mtp, "return_cache": True}, ["input_ids"]
    h, dqk, dv = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    layers = cfg.num_hidden_layers + int(mtp)
    dtype = dtype or torch.get_default_dtype()
    past = [
        (
            torch.zeros(batch, kv_len, h, dqk, dtype=dtype, device=device),
            torch.zeros(batch, kv_len, h, dv, dtype=dtype, device=device),
        )
        for _ in range(layers)
    ]
    names = ["input_ids"] + [f"past_{i}_{kv}" for i in range(layers) for kv in "kv"]
    return (ids,), {"mtp": mtp, "past": past, "return_cache": True}, names


def output_names(cfg: ModelConfig, mode: str) -> list[str]:
    """Names of the flat outputs of the captured graph."""
    mtp = cfg.num_nextn_predict_layers > 0
    names = ["logits"] + (["mtp_logits"] if mtp else [])
    if mode != "train":
        layers = cfg.num_hidden_layers + int(mtp)
        names += [f"cache_{i}_{kv}" for i in range(layers) for kv in "kv"]
    return names


def check_shapes(cfg: ModelConfig, mode: str, batch: int, seq: int, kv_len: int) -> None:
    """Raise CaptureError naming the first shape argument the mode cannot take."""
    if mode not in MODES:
        raise CaptureError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
    if batch < 1 or seq < 1:
        raise CaptureError(f"batch and seq must be positive, got batch={batch} seq={seq}")
    if mode == "train" and cfg.num_nextn_predict_layers and seq < 2:
        raise CaptureError("train mode with MTP needs seq >= 2")
    if mode == "decode" and kv_len < 1:
        raise CaptureError(f"decode needs a KV cache: kv_len must be positive, got {kv_len}")
    total = seq + (kv_len if mode == "decode" else 0)
    if total > cfg.max_position_embeddings:
        raise CaptureError(f"{total} positions exceed max_position_embeddings ({cfg.max_position_embeddings})")


def capture(
    cfg: ModelConfig,
    mode: str = "train",
    batch: int = 1,
    seq: int = 4096,
    kv_len: int = 0,
    model: DeepseekV3 | None = None,
) -> Program:
    """Export the model for mode at the given shapes; a BF16 model on 'meta' unless a model is given."""
    check_shapes(cfg, mode, batch, seq, kv_len)
    if model is None:
        model = DeepseekV3(cfg, device="meta", dtype=torch.bfloat16)
    weight = model.embed_tokens.weight
    args, kwargs, inputs = example_inputs(cfg, mode, batch, seq, kv_len, weight.device, weight.dtype)
    with torch.no_grad() if mode != "train" else torch.enable_grad():
        ep = torch.export.export(model, args, kwargs=kwargs, strict=False)
    program = _to_program(ep, cfg, mode, inputs, dict(batch=batch, seq=seq, kv_len=kv_len))
    program.fp8_checkpoint = dict(getattr(model, "fp8_checkpoint", {}))  # load_checkpoint's stored codes
    return program


def _to_program(ep, cfg: ModelConfig, mode: str, inputs: list[str], shapes: dict) -> Program:
    """Lift an ExportedProgram into a Program: weights by placeholder name, named user inputs/outputs."""
    gm = ep.graph_module
    weights, user, constants, fqns = {}, [], [], {}
    for spec in ep.graph_signature.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.USER_INPUT:
            if hasattr(spec.arg, "value"):  # a constant argument (mtp=True) is baked into the graph
                constants.append(name)
            else:
                user.append(name)
        else:  # parameters, buffers (non-persistent ones live in ep.constants) and lifted constants
            store = ep.state_dict if spec.target in ep.state_dict else ep.constants
            weights[name] = store[spec.target]
            fqns[name] = spec.target
    renames = dict(zip(user, inputs, strict=True))
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" and node.name in constants and not node.users:
            gm.graph.erase_node(node)
        elif node.op == "placeholder" and node.name in renames:
            node.name = node.target = renames[node.name]
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return Program(gm, weights, inputs, output_names(cfg, mode), mode, cfg, shapes, weight_fqns=fqns)
