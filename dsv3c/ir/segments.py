"""Running a program: its graph cut into segments, called in the model's order by a run plan.

A segment is a maximal run of nodes of one block, or of nodes outside every block, made its own GraphModule
whose placeholders are the program values it reads (and, for a block, the constant arguments that differ per
instance) and whose outputs are its values read after it. The run plan (`plan`) calls each segment in
order, a block's once per instance: the instance's weights, cache inputs and arguments bound, the hidden
state it reads being the one the previous instance wrote (the `carry`). Values are named: program inputs
and weights by the model's names, segment outputs `node` or `node@unit`. `run` executes the plan in process;
the artifact writer (dsv3c.runtime.artifact) saves the segments' code and the plan for another process. A
whole graph is one segment run once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from dsv3c.ir.blocks import BlockError
from dsv3c.ir.program import Program, unit_of


@dataclass
class Segment:
    """A run of the program's nodes as a GraphModule called as gm(*params, *reads) (see the module docstring)."""

    gm: fx.GraphModule
    params: list[tuple[str, int]]  # (node name, argument index) of each constant argument that differs per instance
    reads: list[fx.Node]  # the program values it reads, in its placeholders' order
    writes: list[fx.Node]  # the program values its outputs are
    block: str | None  # the block it computes once per instance; None: run once
    carry: tuple | None = None  # (read, write): the hidden state an instance reads and hands the next


@dataclass(frozen=True)
class Step:
    """One call of a segment: its instance's constant arguments, the values it reads and those it writes, by name."""

    segment: int
    params: list
    args: list[str]
    outs: list[str]


def subgraph(nodes: list[fx.Node], params: dict | None = None):
    """nodes as a GraphModule: (module, params, reads, writes) as in Segment.

    Every value the nodes read from outside becomes a placeholder (`reads`); params {node: [argument index]}
    makes those constant arguments placeholders too, before the reads. The outputs are the nodes read outside
    (the graph's output node included), in order.
    """
    inside, params = set(nodes), params or {}
    graph, env, reads = fx.Graph(), {}, []
    slots = {(node, i): graph.placeholder(f"{node.name}_arg{i}") for node in nodes for i in params.get(node, ())}

    def read(n: fx.Node) -> fx.Node:
        if n not in env:
            env[n] = graph.placeholder(n.name)
            env[n].meta["val"] = n.meta.get("val")
            reads.append(n)
        return env[n]

    for node in nodes:
        args = list(fx.node.map_arg(node.args, lambda a: env[a] if a in inside else read(a)))
        for i in params.get(node, ()):
            args[i] = slots[(node, i)]
        kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a] if a in inside else read(a))
        env[node] = graph.create_node(node.op, node.target, tuple(args), kwargs, name=node.name)
        env[node].meta = dict(node.meta)
    writes = [n for n in nodes if any(u not in inside for u in n.users)]
    graph.output(tuple(env[n] for n in writes))
    return fx.GraphModule(torch.nn.Module(), graph), [(n.name, i) for n, i in slots], reads, writes


def _spec(node: fx.Node):
    """(shape, dtype) of a node's value."""
    val = node.meta.get("val")
    return (tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else None


def _carry(block: str, nodes: list[fx.Node], reads: list[fx.Node], writes: list[fx.Node]) -> tuple:
    """(read, write) of the hidden state a block's instances hand on; BlockError unless exactly one of each."""
    inside = set(nodes)
    out = [n for n in writes if any(u.op != "output" and u not in inside for u in n.users)]
    if len(out) != 1:
        raise BlockError(f"block {block}: {len(out)} of its values are read after it; instances can hand on one")
    ins = [n for n in reads if n.op != "placeholder" and _spec(n) == _spec(out[0])]
    if len(ins) != 1:
        raise BlockError(f"block {block}: no single value it reads is shaped like the hidden state it writes")
    return ins[0], out[0]


def segments(program: Program) -> list[Segment]:
    """The program's call_function nodes as segments in graph order (see the module docstring)."""
    blocks = program.blocks
    if blocks is not None:
        blocks.check(program)
    runs: list[tuple[str | None, list]] = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        block = None
        if blocks is not None:
            unit = unit_of(node, program.cfg.num_hidden_layers)
            block = unit if blocks.of(unit) else None
        if not runs or runs[-1][0] != block:
            runs.append((block, []))
        runs[-1][1].append(node)
    out = []
    for block, nodes in runs:
        params = {}
        for node in nodes if block is not None else ():
            varied = {i for _, args in blocks.varied(node) for i, a in enumerate(args) if a != node.args[i]}
            if any(isinstance(node.args[i], fx.Node) for i in varied):
                raise BlockError(f"{node.name}: only constant arguments may differ between instances")
            if varied:
                params[node] = sorted(varied)
        seg = Segment(*subgraph(nodes, params), block)
        if block is not None and len(blocks.of(block)) > 1:
            seg.carry = _carry(block, nodes, seg.reads, seg.writes)
        out.append(seg)
    return out


def plan(program: Program, segs: list[Segment]) -> tuple[list[Step], dict[str, str], dict[str, tuple]]:
    """(steps, the value each model output is, the weights read: value name -> (instance or None, weight name))."""
    blocks = program.blocks
    layers = program.cfg.num_hidden_layers
    by_name = {n.name: n for n in program.graph.nodes}
    current: dict[fx.Node, str] = {}  # the value a program node stands for at this point of the run
    per_instance: dict[tuple[str, fx.Node], str] = {}  # (unit, node) -> that instance's value of node
    weights: dict[str, tuple] = {}

    def value(n: fx.Node, inst) -> str:
        if n.op != "placeholder":
            return current[n]
        own = inst is not None and unit_of(n, layers) == inst.block
        name = blocks.rename(inst, n.name) if own else n.name
        if n.name in program.weights:
            weights[name] = (inst if own else None, n.name)
        return name

    steps = []
    for k, seg in enumerate(segs):
        handed = None  # the hidden state the previous instance wrote
        for inst in blocks.of(seg.block) if seg.block is not None else [None]:
            params = [blocks.node_args(inst, by_name[name])[i] for name, i in seg.params]
            args = [handed if handed and seg.carry and n is seg.carry[0] else value(n, inst) for n in seg.reads]
            outs = [n.name + ("" if inst is None else f"@{inst.unit}") for n in seg.writes]
            steps.append(Step(k, params, args, outs))
            if inst is not None:
                per_instance.update({(inst.unit, n): o for n, o in zip(seg.writes, outs)})
            current.update(zip(seg.writes, outs))  # what follows reads the last instance's values
            handed = current[seg.carry[1]] if seg.carry else None
    out_node = next(n for n in program.graph.nodes if n.op == "output")
    outputs = {}
    for name, node in zip(program.outputs, out_node.args[0], strict=True):
        unit = unit_of(node, layers) if blocks is not None else None
        insts = blocks.of(unit) if unit is not None and node.op != "placeholder" else []
        if not insts:
            outputs[name] = value(node, None)
        for inst in insts:
            outputs[blocks.rename(inst, name)] = per_instance[(inst.unit, node)]
    return steps, outputs, weights


def run(program: Program, given: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's outputs by name for its inputs by name, the program's segments called as its plan says."""
    segs = segments(program)
    steps, outputs, weights = plan(program, segs)
    env, memo = dict(given), {}
    for name, (inst, weight) in weights.items():
        env[name] = program.weights[weight] if inst is None else program.blocks.weight(program, inst, weight, memo)
    for step in steps:
        env.update(zip(step.outs, segs[step.segment].gm(*step.params, *(env[a] for a in step.args))))
    return {name: env[outputs[name]] for name in program.model_outputs}
