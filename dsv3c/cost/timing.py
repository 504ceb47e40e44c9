"""Roofline seconds of graph nodes on a target: forward, backward, recomputation and weight-gradient time.

A node's forward takes max(FLOPs / peak of its GEMM dtype on the SMs the mode leaves to compute, HBM bytes /
bandwidth). Its backward scales that time by bwd_flops / flops (memory-bound nodes: the same time as the
forward); recomputed nodes repeat their forward. The weight-gradient part (what zero-bubble schedules defer)
is half the backward of nodes that hold weights (GEMMs: Wgrad next to Dgrad), nothing for the rest.
"""

from dsv3c.cost.roofline import matmul_seconds
from dsv3c.ops.record import op_name
from targets import compute_sms

FP8_OPS = {"fp8_gemm", "fp8_linear", "moe_experts_fp8", "moe_experts_fp8_train", "ep_experts_fp8"}
WEIGHTED_OPS = {"fp8_linear", "moe_experts", "moe_experts_fp8_train", "ep_experts", "moe_gate"}
WEIGHTED_ATEN = {"linear", "mm", "bmm", "matmul"}


def gemm_dtype(node) -> str:
    """The dtype a node's GEMMs run in: fp8 for the FP8 ops (and FP8 expert GEMMs), else bf16."""
    name = op_name(node.target)
    if name in FP8_OPS or (name == "ep_experts" and node.args[6] is True):
        return "fp8"
    return "bf16"


def holds_weights(node) -> bool:
    """Whether the node's backward has a weight-gradient part."""
    name = op_name(node.target)
    return name in WEIGHTED_OPS or getattr(node.target, "_opname", None) in WEIGHTED_ATEN


def node_seconds(node, target, mode: str) -> dict:
    """{'F', 'B', 'W', 'R'}: forward, backward, weight-gradient (part of B) and recompute seconds of one node."""
    cost = node.meta.get("cost")
    if not cost or (not cost["flops"] and not cost["bytes"]):
        return {"F": 0.0, "B": 0.0, "W": 0.0, "R": 0.0}
    f = matmul_seconds(cost["flops"], cost["bytes"], target.gpu, gemm_dtype(node), compute_sms(target, mode))
    b = f * (cost["bwd_flops"] / cost["flops"]) if cost["flops"] else (f if cost["bwd_flops"] else 0.0)
    return {"F": f, "B": b, "W": b / 2 if holds_weights(node) else 0.0, "R": f if cost.get("recompute_flops") else 0.0}
