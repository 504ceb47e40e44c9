"""fp8_quant: DeepSeek-V3's FP8 recipe — block-scaled E4M3 GEMMs where the precision policy says so.

Prefill/decode: before each FP8 GEMM a `dsv3.act_quant` (1x128 tiles), the weight stored as E4M3 with
one float32 scale per 128x128 block, and `dsv3.fp8_gemm`
(FP32 accumulation promoted every 128 of K). Training keeps master weights: `dsv3.fp8_linear`
quantises in the op and runs Fprop, Dgrad and Wgrad in FP8.

Weights loaded from an FP8 checkpoint keep the file's E4M3 codes and `weight_scale_inv` bit for bit:
capture carries them in program.fp8_checkpoint (by fqn, with program.weight_fqns
naming each placeholder's fqn); they are used while they still encode the weight exactly, otherwise
(the weight was changed, or no checkpoint) the weight is quantised. Fused weights (mla_fuse's
program.weight_segments) are assembled segment by segment.
"""

import operator
from collections import Counter

import torch
from torch import fx

import dsv3c.ops  # noqa: F401  (registers torch.ops.dsv3)
from dsv3c.ops import fp8
from dsv3c.ir import Plan, Program, module_path
from dsv3c.ir.precision import resolve_policy
from passes.registry import register

aten, dsv3 = torch.ops.aten, torch.ops.dsv3

def component_of(node: fx.Node) -> str | None:
    """The precision-policy component of a linear node, from its module path."""
    path = module_path(node)
    if ".self_attn" in path:
        return "attention_proj"
    if ".mlp.shared_experts" in path:
        return "shared_experts"
    if ".mlp." in path and path.startswith("layers."):
        return "dense_mlp"
    if path.startswith("mtp.") and ".block.mlp." in path:
        return "dense_mlp"
    if path.endswith("eh_proj"):
        return "mtp_eh_proj"
    if path == "lm_head":
        return "lm_head"
    return None


def _quantised_weight(program: Program, cache: dict, node: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(E4M3 weight, block-scale) placeholders for a weight placeholder, made once per weight."""
    if node not in cache:
        w = program.weights[node.name]
        if w.is_meta:
            lead, (n, k) = w.shape[:-2], w.shape[-2:]
            wq = torch.empty(w.shape, dtype=fp8.FP8, device="meta")
            ws = torch.empty(*lead, -(-n // 128), -(-k // 128), dtype=torch.float32, device="meta")
        else:
            wq, ws = _codes(program, node.name, w)
        derived = [(lambda fqn_of, v, part=part: _codes(program, node.name, v, fqn_of)[part], [node]) for part in (0, 1)]
        cache[node] = (program.add_weight(f"{node.name}_e4m3", wq, derived[0]),
                       program.add_weight(f"{node.name}_scale_inv", ws, derived[1]))
    return cache[node]


def _codes(program: Program, name: str, w: torch.Tensor, fqn_of=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3, scale_inv) of weight placeholder `name`: the checkpoint's own, by segment when fused, else quantised.

    fqn_of: the checkpoint name of a block instance's tensor for the block's (None: the block's own)."""
    fqn_of = fqn_of or (lambda fqn: fqn)
    segments = program.weight_segments.get(name)
    if segments:
        return _segment_codes(program, w, [(fqn_of(fqn), rows) for fqn, rows in segments])
    return _stored_or_quantised(program, fqn_of(program.weight_fqns.get(name)), w)


def _stored_or_quantised(program: Program, fqn: str | None, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored (E4M3, scale_inv) of fqn when they still encode w exactly, else w quantised in 128x128 blocks."""
    stored = program.fp8_checkpoint.get(fqn)
    # a loaded weight equals its stored dequantisation cast to the model dtype, unless it was changed since
    if stored is not None and torch.equal(fp8.weight_dequant(*stored).to(w.dtype), w):
        return stored
    return fp8.weight_quant(w)  # stacked experts [E, N, K] are quantised expert by expert


def _segment_codes(program: Program, w: torch.Tensor, segments: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3, scale_inv) of a fused weight, segment by segment (mla_fuse pads segments to whole blocks)."""
    codes, scales, row = [], [], 0
    for fqn, rows in segments:
        part = w[row : row + rows]
        row += rows
        if fqn is None:  # zero padding: its rows lie in the previous segment's last block
            codes.append(torch.zeros(part.shape, dtype=fp8.FP8))
            continue
        wq, ws = _stored_or_quantised(program, fqn, part)
        codes.append(wq)
        scales.append(ws)
    return torch.cat(codes), torch.cat(scales)


def _lower_linear(program: Program, node: fx.Node, cache: dict) -> None:
    """One linear → FP8: fp8_linear (train) or act_quant + fp8_gemm (inference)."""
    x, w = node.args[:2]
    with program.graph.inserting_before(node):
        if program.mode == "train":
            y = program.call(dsv3.fp8_linear.default, (x, w), like=node)
            if "recompute" in node.meta:  # mla_fuse's recompute mark stays with the GEMM it marked
                y.meta["recompute"] = node.meta["recompute"]
        else:
            wq, ws = _quantised_weight(program, cache, w)
            q = program.call(dsv3.act_quant.default, (x,), like=node)
            xq = program.call(operator.getitem, (q, 0), like=node)
            xs = program.call(operator.getitem, (q, 1), like=node)
            y = program.call(dsv3.fp8_gemm.default, (xq, xs, wq, ws, node.meta["val"].dtype), like=node)
    node.replace_all_uses_with(y)
    program.graph.erase_node(node)


def _lower_experts(program: Program, node: fx.Node, cache: dict) -> None:
    """Routed experts → FP8: moe_experts_fp8_train (master weights) or moe_experts_fp8 (E4M3 weights)."""
    x, ids, weights, wg, wu, wd = node.args
    with program.graph.inserting_before(node):
        if program.mode == "train":
            y = program.call(dsv3.moe_experts_fp8_train.default, node.args, like=node)
        else:
            packed = [n for w in (wg, wu, wd) for n in _quantised_weight(program, cache, w)]
            y = program.call(dsv3.moe_experts_fp8.default, (x, ids, weights, *packed), like=node)
    node.replace_all_uses_with(y)
    program.graph.erase_node(node)


@register(
    "fp8_quant",
    "puts the GEMMs the precision policy names in FP8: 1x128 activation tiles, 128x128 E4M3 weight blocks, "
    "FP32 accumulation; the function changes within FP8 rounding",
    writes=["precision_policy"],
    after=["mla_fuse"],  # mla_fuse matches the BF16 down/up-projections that fp8_quant rewrites
    invalidates=["mla_fuse"],
)
def fp8_quant(plan: Plan, opts: dict):
    """Rewrite every GEMM of an FP8 component; report the policy, counts and weight bytes before/after."""
    program = plan.program
    policy = resolve_policy(plan.options.get("precision"))
    before = program.weight_bytes_by_dtype()
    converted, cache = Counter(), {}
    for node in list(program.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.linear.default and len(node.args) == 2:
            component = component_of(node)
            if component and policy[component] == "fp8":
                converted[component] += program.times(node)
                _lower_linear(program, node, cache)
        elif node.target is dsv3.moe_experts.default and policy["routed_experts"] == "fp8":
            converted["routed_experts"] += program.times(node)
            _lower_experts(program, node, cache)
    program.drop_unused_weights()
    program.recompile()
    plan.analyses.precision_policy = policy
    after = program.weight_bytes_by_dtype()
    return {
        "fp8_gemms": sum(converted.values()),
        "weight_bytes_before": sum(before.values()),
        "weight_bytes_after": sum(after.values()),
        "converted": dict(sorted(converted.items())),
        "weight_bytes_by_dtype_before": before,
        "weight_bytes_by_dtype_after": after,
    }

