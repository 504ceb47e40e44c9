"""Capture: torch.export of the model (MTP included) for a mode and shapes, as a Program.

`capture` exports the whole model as one graph; `capture_blocks` exports each distinct block once (the model
elided to the first layer of each run of identical blocks, `model_def.layer_runs`) and returns a program of
blocks: the same Program, whose `blocks` list every layer of the model as an instance of its block.
"""

import torch
from torch.export.graph_signature import InputKind

from dsv3c.ir import Program
from dsv3c.ir.blocks import Blocks, Instance
from model_def import DeepseekV3, ModelConfig
from model_def.model import layer_runs

MODES = ("train", "prefill", "decode")


class CaptureError(ValueError):
    """Capture arguments that describe no valid graph."""


def cache_slots(cfg: ModelConfig, model: DeepseekV3 | None = None) -> list[int]:
    """The KV-cache slot of each attention block the model runs, in order: its layers', then the MTP block's."""
    layers = [int(k.split(".")[1]) for k in model.layer_repeats()] if model is not None else range(cfg.num_hidden_layers)
    return [*layers, *([cfg.num_hidden_layers] if cfg.num_nextn_predict_layers > 0 else [])]


def example_inputs(cfg: ModelConfig, mode: str, batch: int, seq: int, kv_len: int, device="meta", dtype=None,
                   slots: list[int] | None = None):
    """(args, kwargs, input names) of the model call that `mode` captures; slots: `cache_slots` of the model."""
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    mtp = cfg.num_nextn_predict_layers > 0
    if mode == "train":
        return (ids,), {"mtp": mtp}, ["input_ids"]
    if mode == "prefill":
        return (ids,), {"mtp": mtp, "return_cache": True}, ["input_ids"]
    h, dqk, dv = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    slots = cache_slots(cfg) if slots is None else slots
    dtype = dtype or torch.get_default_dtype()
    past = [
        (
            torch.zeros(batch, kv_len, h, dqk, dtype=dtype, device=device),
            torch.zeros(batch, kv_len, h, dv, dtype=dtype, device=device),
        )
        for _ in slots
    ]
    names = ["input_ids"] + [f"past_{i}_{kv}" for i in slots for kv in "kv"]
    return (ids,), {"mtp": mtp, "past": past, "return_cache": True}, names


def output_names(cfg: ModelConfig, mode: str, slots: list[int] | None = None) -> list[str]:
    """Names of the flat outputs of the captured graph; slots: `cache_slots` of the model."""
    mtp = cfg.num_nextn_predict_layers > 0
    names = ["logits"] + (["mtp_logits"] if mtp else [])
    if mode != "train":
        names += [f"cache_{i}_{kv}" for i in (cache_slots(cfg) if slots is None else slots) for kv in "kv"]
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
    """Export the whole model for mode at the given shapes; a BF16 model on 'meta' unless a model is given."""
    check_shapes(cfg, mode, batch, seq, kv_len)
    if model is None:
        model = DeepseekV3(cfg, device="meta", dtype=torch.bfloat16)
    return _export(model, cfg, mode, dict(batch=batch, seq=seq, kv_len=kv_len))


def capture_blocks(
    cfg: ModelConfig,
    mode: str = "train",
    batch: int = 1,
    seq: int = 4096,
    kv_len: int = 0,
    model: DeepseekV3 | None = None,
) -> Program:
    """Export each distinct block of the model once, as a program of blocks (see the module docstring).

    model: the whole model, whose layers' weights the instances read; or an elided model (`elided=True`),
    whose blocks' weights every instance shares; None: an elided BF16 model on 'meta'.
    """
    check_shapes(cfg, mode, batch, seq, kv_len)
    if model is None:
        model = DeepseekV3(cfg, device="meta", dtype=torch.bfloat16, elided=True)
    whole = not isinstance(model.layers, torch.nn.ModuleDict)
    source = {**dict(model.named_parameters()), **dict(model.named_buffers())} if whole else None
    program = _export(model.elide() if whole else model, cfg, mode, dict(batch=batch, seq=seq, kv_len=kv_len))
    program.blocks = Blocks(cfg, tuple(instances(cfg)), source)
    return program


def instances(cfg: ModelConfig) -> list[Instance]:
    """The model's layers and MTP module in order, each computed by the first layer of its run (the MTP by itself)."""
    out = [Instance(f"layers.{i}", f"layers.{r.start}", i) for r in layer_runs(cfg) for i in r]
    if cfg.num_nextn_predict_layers > 0:
        out.append(Instance("mtp.0", "mtp.0", cfg.num_hidden_layers))
    return out


def _export(model: DeepseekV3, cfg: ModelConfig, mode: str, shapes: dict) -> Program:
    """torch.export of model (whole or elided) for mode at shapes, as a Program."""
    weight = model.embed_tokens.weight
    slots = cache_slots(cfg, model)
    args, kwargs, inputs = example_inputs(cfg, mode, **shapes, device=weight.device, dtype=weight.dtype, slots=slots)
    with torch.no_grad() if mode != "train" else torch.enable_grad():
        ep = torch.export.export(model, args, kwargs=kwargs, strict=False)
    program = _to_program(ep, cfg, mode, inputs, output_names(cfg, mode, slots), shapes)
    program.fp8_checkpoint = dict(getattr(model, "fp8_checkpoint", {}))  # load_checkpoint's stored codes
    return program


def _to_program(ep, cfg: ModelConfig, mode: str, inputs: list[str], outputs: list[str], shapes: dict) -> Program:
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
    return Program(gm, weights, inputs, outputs, mode, cfg, shapes, weight_fqns=fqns)
