"""cost: annotate every node with its Cost (meta['cost']) and sum forward, backward and recompute per block.

Training graphs execute a backward: `bwd_flops` as each op's record states, and `recompute_flops` the
forward FLOPs again of the nodes marked for recomputation. Inference graphs have no backward: both are 0.
"""

from collections import defaultdict

from dsv3c.cost.nodes import hardware_flops, model_flops, node_cost
from dsv3c.ir import Plan, layer_of
from passes.registry import register

KEYS = ("flops", "bwd_flops", "recompute_flops", "bytes", "ib_bytes", "nvlink_bytes")


@register("cost", "annotates each node with meta['cost'] (FLOPs forward/backward, bytes, link bytes); the graph is "
          "unchanged", writes=["costs"])
def cost(plan: Plan, opts: dict):
    """Per-node cost, and totals per block and for the graph."""
    program = plan.program
    train = program.mode == "train"
    per_layer = defaultdict(lambda: dict.fromkeys(KEYS, 0))
    for node in program.graph.nodes:
        c = node_cost(node).as_dict()
        c["recompute_flops"] = c["flops"] if train and node.meta.get("recompute") is not None else 0
        if not train:
            c["bwd_flops"] = 0
        node.meta["cost"] = c
        bucket = per_layer[layer_of(node) or "other"]
        for key in KEYS:
            bucket[key] += c[key]
    totals = {key: sum(b[key] for b in per_layer.values()) for key in KEYS}
    tokens = program.shapes["batch"] * program.shapes["seq"]
    plan.analyses.costs = {"total": totals, "per_layer": dict(per_layer), "tokens": tokens}
    return {"flops": totals["flops"], "bwd_flops": totals["bwd_flops"], "recompute_flops": totals["recompute_flops"],
            "bytes": totals["bytes"], "model_flops_per_token": model_flops(totals, train) // tokens,
            "hardware_flops_per_token": hardware_flops(totals) // tokens}

