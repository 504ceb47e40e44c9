"""dce: remove nodes whose results nothing uses, and weights nothing reads."""

from dsv3c.ir import PassContext, Program
from passes.registry import register


@register("dce", "removes unused nodes and unread weights; the function is unchanged")
def dce(program: Program, ctx: PassContext):
    """Dead-code elimination over the graph, then over the weight placeholders."""
    before = len(program.graph.nodes)
    program.graph.eliminate_dead_code()
    dropped = program.drop_unused_weights()
    program.recompile()
    return program, {"nodes_removed": before - len(program.graph.nodes), "weights_removed": len(dropped)}
