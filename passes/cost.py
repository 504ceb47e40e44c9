"""cost: annotate every node with FLOPs and bytes (meta['cost']) and sum them per layer kind."""

from collections import defaultdict

from dsv3c.cost.nodes import node_cost
from dsv3c.ir import PassContext, Program, layer_of
from passes.registry import register


@register("cost", "annotates each node with meta['cost'] = FLOPs and bytes; the graph is unchanged")
def cost(program: Program, ctx: PassContext):
    """Per-node cost, and totals per layer and for the graph (forward, backward, bytes)."""
    per_layer = defaultdict(lambda: {"flops": 0, "bwd_flops": 0, "bytes": 0})
    for node in program.graph.nodes:
        c = node_cost(node)
        node.meta["cost"] = c
        bucket = per_layer[layer_of(node) or "other"]
        for key in c:
            bucket[key] += c[key]
    totals = {key: sum(b[key] for b in per_layer.values()) for key in ("flops", "bwd_flops", "bytes")}
    program.meta["cost"] = {"total": totals, "per_layer": dict(per_layer)}
    return program, {"flops": totals["flops"], "bwd_flops": totals["bwd_flops"], "bytes": totals["bytes"]}
