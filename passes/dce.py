"""dce: remove nodes whose results nothing uses, and weights nothing reads."""

from dsv3c.ir import Plan
from passes.registry import register


@register("dce", "removes unused nodes and unread weights; the function is unchanged")
def dce(plan: Plan, opts: dict):
    """Dead-code elimination over the graph, then over the weight placeholders."""
    program = plan.program
    before = program.node_count()
    program.graph.eliminate_dead_code()
    dropped = program.drop_unused_weights()
    program.recompile()
    return {"nodes_removed": before - program.node_count(), "weights_removed": sum(map(program.weight_times, dropped))}
