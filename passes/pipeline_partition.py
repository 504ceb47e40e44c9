"""pipeline_partition: tag every node with its pipeline stage from the parallel plan, and check its schedule.

The parallel plan (the Plan's `parallel` analysis) says which units each model stage holds — 'embed' (the
nodes before the first layer), 'layers.N', 'head' (the final norm and the output head) and 'mtp.K' — as
the cost model cut them, and which schedule runs them. This pass tags each node with its stage
(`meta['pp_stage']`; in a program of blocks, whose blocks serve layers of several stages, each instance:
`program.blocks.stages`); the graph is otherwise unchanged: one SPMD program, each stage rank-parametric.
DualPipe's second direction runs the same stages again on the mirrored ranks (rank 0 holds the first and
the last stage); DualPipeV has 2·pp stages, rank r holding stages r and 2·pp−1−r.

The schedule of the plan's kind is built as action lists per rank (dsv3c.schedules) and checked (order,
no deadlock, peak in-flight activations). Its timing is the cost model's single simulation of it, which
the compile adds to plan.json's `schedule` (step, busy and bubble per rank) with its trace.
"""

from dsv3c.ir import Plan, layer_of
from dsv3c.schedules import build
from dsv3c.schedules.checks import check
from passes.registry import register

TRACE = "schedule.trace.json"


class StageError(ValueError):
    """A graph whose blocks the parallel plan's stages do not cover."""


def blocks_in_order(graph) -> list[tuple[str, list]]:
    """(block name, nodes) in graph order: 'embed', 'layers.N'..., 'head', 'mtp.K'."""
    order, nodes = [], {}
    seen_layer = False
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        block = layer_of(node)
        seen_layer = seen_layer or block is not None
        block = block or ("head" if seen_layer else "embed")
        if block not in nodes:
            nodes[block] = []
            order.append(block)
        nodes[block].append(node)
    return [(b, nodes[b]) for b in order]


@register(
    "pipeline_partition",
    "tags each node with the pipeline stage the parallel plan gives its block (embedding first, head and MTP "
    "last) and builds and checks the plan's pipeline schedule; the graph is unchanged",
    reads=["parallel"],
    writes=["schedule"],
)
def pipeline_partition(plan: Plan, opts: dict):
    """Stage tags and the checked schedule of the plan's training graph."""
    if plan.mode != "train":
        return {"skipped": "inference graphs are not pipelined"}
    layout = plan.analyses.parallel
    stage_of = layout.stage_of_unit()
    program = plan.program
    blocks = blocks_in_order(program.graph)
    names = [name for name, _ in blocks]
    units = names if program.blocks is None else program.blocks.units(names)
    missing = [name for name in units if name not in stage_of]
    if missing:
        raise StageError(f"the parallel plan's stages do not hold block(s) {', '.join(missing)}")
    if program.blocks is not None:
        program.blocks.stages = {unit: stage_of[unit] for unit in units}
    else:
        for name, nodes in blocks:
            for node in nodes:
                node.meta["pp_stage"] = stage_of[name]
    pp, kind, m = layout.mesh.pp, layout.kind, layout.micro_batches
    schedule = build(kind, pp, m)
    checked = check(schedule)
    owner = schedule.layout.stage_rank()
    plan.analyses.schedule = {
        "kind": kind, "pp": pp, "micro_batches": m,
        "stages": [{"stage": s, "blocks": list(units)} for s, units in enumerate(layout.stages)],
        "rank_of_stage": [owner[s] for s in range(len(layout.stages))],
        "actions": [list(rank) for rank in schedule],
        "peak_activations": checked["peak_activations"],
        "trace": TRACE if plan.options.get("out") else None,
    }  # fmt: skip
    return {"kind": kind, "pp": pp, "micro_batches": m, "stages": len(layout.stages),
            "blocks_per_stage": [len(u) for u in layout.stages]}
