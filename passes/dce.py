"""dce: remove nodes whose results nothing uses, and weights nothing reads."""

from dsv3c.ir import Plan
from passes.registry import register


@register("dce", "removes unused nodes and unread weights; the function is unchanged")
def dce(plan: Plan, opts: dict):
    """Dead-code elimination over the graph, then over the weight placeholders."""
    program = plan.program
    before = len(program.graph.nodes)
    program.graph.eliminate_dead_code()
    dropped = program.drop_unused_weights()
    program.recompile()
    return {"nodes_removed": before - len(program.graph.nodes), "weights_removed": len(dropped)}
