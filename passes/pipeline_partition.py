"""pipeline_partition: cut the model into pipeline stages balanced by the cost package, and schedule them.

Blocks in graph order — the embedding (the nodes before the first layer), each layer, and the head with
the MTP module — are split into contiguous stages minimising the slowest stage's training time (forward +
backward + recomputation, roofline seconds on the target's compute SMs); the embedding lands on the first
stage, the head and MTP on the last. `dualpipe`, `1f1b` and `zb1p` cut pp stages (DualPipe's second
direction runs the same stages again on the mirrored ranks, so rank 0 holds the first and the last
stage); `dualpipev` cuts 2·pp stages, rank r holding stages r and 2·pp−1−r. Every node is tagged with its
stage (`meta['pp_stage']`); the graph is otherwise unchanged: one SPMD program, each stage rank-parametric.

The schedule of the chosen kind is built as action lists per rank (dsv3c.schedules), checked (order,
no deadlock, peak in-flight activations) and simulated with per-stage F, B, I, W durations from the
stages' costs (an overlapped F&B pair takes F + B: compute only, the communication it hides is not in
these durations); the timeline goes to `<out>/schedule.trace.json` when the compile has an output.
"""

from pathlib import Path

from dsv3c.cost.timing import node_seconds
from dsv3c.ir import Plan, layer_of
from dsv3c.schedules import build
from dsv3c.schedules.checks import check
from dsv3c.schedules.render import write_trace
from dsv3c.schedules.simulate import simulate
from passes.registry import Option, register

KINDS = ("dualpipe", "dualpipev", "1f1b", "zb1p")
TRACE = "schedule.trace.json"


class StageError(ValueError):
    """A pipeline the model cannot be cut into (more stages than blocks, an odd pp for DualPipe, ...)."""


def blocks_in_order(graph) -> list[tuple[str, list]]:
    """(block name, nodes) in graph order: 'embed', 'layers.N'..., then 'head' (final norm, head, MTP)."""
    order, nodes = [], {}
    seen_layer = False
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        block = layer_of(node)
        if block is None or block.startswith("mtp."):
            block = "head" if seen_layer or block else "embed"
        else:
            seen_layer = True
        if block not in nodes:
            nodes[block] = []
            order.append(block)
        nodes[block].append(node)
    head = [n for b in order if b == "head" or b.startswith("mtp.") for n in nodes[b]]
    out = [(b, nodes[b]) for b in order if b not in ("head",)]
    return out + ([("head", head)] if head else [])


def balanced_cuts(times: list[float], stages: int) -> list[int]:
    """Start indices of `stages` contiguous groups of times minimising the largest group sum (linear partition)."""
    n = len(times)
    if stages > n:
        raise StageError(f"{stages} pipeline stages for {n} blocks: at most one stage per block")
    prefix = [0.0]
    for t in times:
        prefix.append(prefix[-1] + t)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n - (stages - k) + 1):
            for i in range(k - 1, j):
                v = max(best[k - 1][i], prefix[j] - prefix[i])
                if v < best[k][j]:
                    best[k][j], cut[k][j] = v, i
    starts, j = [], n
    for k in range(stages, 0, -1):
        starts.append(cut[k][j])
        j = cut[k][j]
    return starts[::-1]


def _default_micro_batches(kind: str, pp: int) -> int:
    """2·pp micro-batches (DualPipe's minimum; enough to fill the other schedules)."""
    return 2 * pp


@register(
    "pipeline_partition",
    "cuts the blocks into pipeline stages balanced by the cost package (embedding first, head and MTP last), tags "
    "each node with its stage, and builds, checks and simulates the pipeline schedule; the graph is unchanged",
    reads=["costs"],
    writes=["schedule"],
    options={"kind": Option("schedule kind", KINDS),
             "pp": Option("pipeline-parallel degree (default: the mesh's)", parse=int),
             "micro_batches": Option("micro-batches per step (default 2·pp)", parse=int)},
)
def pipeline_partition(plan: Plan, opts: dict):
    """Stages, their costs and the simulated schedule of the plan's training graph."""
    if plan.mode != "train":
        return {"skipped": "inference graphs are not pipelined"}
    mesh = plan.analyses.mesh
    pp = opts.get("pp", mesh.pp if mesh is not None else 1)
    kind = opts.get("kind", "dualpipe" if pp > 1 and pp % 2 == 0 else "1f1b")
    m = opts.get("micro_batches", _default_micro_batches(kind, pp))
    n_stages = 2 * pp if kind == "dualpipev" else pp
    blocks = blocks_in_order(plan.program.graph)
    secs = [_block_seconds(nodes, plan) for _, nodes in blocks]
    starts = balanced_cuts([s["F"] + s["B"] + s["R"] for s in secs], n_stages)
    bounds = list(zip(starts, starts[1:] + [len(blocks)]))
    stages = []
    for s, (a, b) in enumerate(bounds):
        for _, nodes in blocks[a:b]:
            for node in nodes:
                node.meta["pp_stage"] = s
        total = {k: sum(x[k] for x in secs[a:b]) for k in ("F", "B", "W", "R")}
        stages.append({"stage": s, "blocks": [name for name, _ in blocks[a:b]],
                       "seconds": {k: round(v, 9) for k, v in total.items()}})
    schedule = build(kind, pp, m)
    checked = check(schedule)
    per_stage = [st["seconds"] for st in stages]
    if kind == "dualpipe":  # stage pp+s runs stage s's layers in the other direction
        per_stage = per_stage + per_stage
    durations = {"F": [d["F"] for d in per_stage], "B": [d["B"] + d["R"] for d in per_stage],
                 "W": [d["W"] for d in per_stage]}
    durations["F&B"] = [f + b for f, b in zip(durations["F"], durations["B"])]
    timeline = simulate(schedule, durations)
    out = plan.options.get("out")
    trace = None
    if out:
        write_trace(timeline, Path(out) / TRACE)
        trace = TRACE
    plan.analyses.schedule = {
        "kind": kind, "pp": pp, "micro_batches": m, "stages": stages,
        "rank_of_stage": [r for r in _stage_ranks(schedule, n_stages)],
        "actions": [list(rank) for rank in schedule],
        "step_seconds": round(timeline.step, 9),
        "busy_seconds": [round(x, 9) for x in timeline.busy],
        "bubble_seconds": [round(x, 9) for x in timeline.bubble],
        "peak_activations": checked["peak_activations"],
        "trace": trace,
        "durations": "per-stage roofline compute seconds (cost package); F&B = F + B, communication not included",
    }  # fmt: skip
    return {"kind": kind, "pp": pp, "micro_batches": m, "stages": n_stages,
            "step_seconds": round(timeline.step, 6), "max_bubble_seconds": round(max(timeline.bubble), 6),
            "max_stage_seconds": round(max(st["seconds"]["F"] + st["seconds"]["B"] + st["seconds"]["R"]
                                           for st in stages), 6)}


def _block_seconds(nodes, plan) -> dict:
    """Summed node seconds (F, B, W, R) of a block's nodes for a micro-batch of the captured shape."""
    total = {"F": 0.0, "B": 0.0, "W": 0.0, "R": 0.0}
    for node in nodes:
        for k, v in node_seconds(node, plan.target, plan.mode).items():
            total[k] += v
    return total


def _stage_ranks(schedule, n_stages: int) -> list[int]:
    """The pipeline rank of each stage of the first direction."""
    owner = schedule.layout.stage_rank() if hasattr(schedule, "layout") else None
    if owner is None:
        from dsv3c.schedules.actions import layout_of

        owner = layout_of(schedule).stage_rank()
    return [owner[s] for s in range(n_stages)]
