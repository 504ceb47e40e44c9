"""A program of blocks: each distinct block of the model captured once, and the model as the list of its instances.

DeepSeek-V3's 61 layers are two distinct blocks (3 dense, 58 MoE) besides the MTP module, the embedding and
the head. `dsv3c.frontend.exporter.capture_blocks` exports the model elided to the first layer of each run of
identical blocks (`model_def.layer_runs`: 'layers.0' and 'layers.3'); the Program's `blocks` (a `Blocks`)
lists every layer and MTP module of the model, in order, as an `Instance` of the block that computes it,
with its KV-cache slot. Passes rewrite each block once; what differs per layer belongs to the instance:

- names: an instance's weights, cache inputs and outputs are its block's with the block's unit replaced by its
  own (`p_layers_3_mlp_...` → `p_layers_5_mlp_...`, `past_3_k` → `past_5_k`);
- weights: a captured weight is the whole model's tensor of that name (when capture was given the whole
  model; else every instance shares its block's); a weight a pass derived (fused, quantised, sliced) is
  derived again from the instance's own weights by the function the pass recorded (`derived`); a table the
  pass sets per layer (expert placement) is the instance's own value (`values`);
- arguments: node arguments that differ per layer, such as an MoE layer's index and expected fan-out (`args`);
- the pipeline stage (`stages`).

Counting over a program of blocks counts each node of a block once per instance (`Program.times`): node
counts, weight bytes and pass statistics are those of the whole model's graph. `dsv3c.ir.segments` runs it
(each block once per instance, the hidden state carried from one instance to the next).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import fx

from dsv3c.ir.program import SLOT_NAME, layer_of, name_unit


class BlockError(ValueError):
    """A program of blocks whose instances do not fit its graph."""


def _renamed(name: str, block: str, unit: str) -> str:
    """name with its first mention of unit `block` ('layers_3', 'layers.3') made `unit`'s."""
    kind, old = block.split(".")
    new = unit.split(".")[1]
    return re.sub(rf"(^|[._]){kind}([._]){old}(?=[._]|$)", rf"\g<1>{kind}\g<2>{new}", name, count=1)


def _current(node: fx.Node, args: tuple) -> tuple:
    """An instance's arguments of node with the graph's current node where the block has one: a pass that
    replaces a node's input replaces it for every instance (only constants differ between instances)."""
    if len(args) != len(node.args):
        return args  # Blocks.check reports it
    return tuple(n if isinstance(n, fx.Node) else a for n, a in zip(node.args, args))


@dataclass(frozen=True)
class Instance:
    """One unit of the model ('layers.5') computed by a block of the program ('layers.3'), with its cache slot."""

    unit: str
    block: str
    slot: int


@dataclass
class Blocks:
    """The instances of a program of blocks and what is attached to each (see the module docstring)."""

    cfg: object  # the whole model's config
    instances: tuple  # every layer and MTP module of the model, in order
    source: dict | None = None  # the whole model's tensors by fqn; None: instances share their block's weights
    stages: dict = field(default_factory=dict)  # unit -> pipeline stage (pipeline_partition)
    args: dict = field(default_factory=dict)  # (unit, node name) -> the node's args for that instance
    values: dict = field(default_factory=dict)  # (unit, weight name) -> that weight's value for that instance
    derived: dict = field(default_factory=dict)  # weight name -> (fn(fqn_of, *sources), [source weight names])

    def __post_init__(self):
        self._of: dict[str, list[Instance]] = {}
        for inst in self.instances:
            self._of.setdefault(inst.block, []).append(inst)

    # ---- the instances ----------------------------------------------------------------------------------

    def of(self, block: str | None) -> list[Instance]:
        """The instances block computes, in model order (none for a unit that is no block)."""
        return self._of.get(block, [])

    def times(self, unit: str | None) -> int:
        """How many units of the model unit `unit` of the program stands for (1 outside the blocks)."""
        return len(self._of.get(unit, ())) or 1

    def units(self, names) -> list[str]:
        """Unit names of the program in order ('embed', 'layers.3', ...) as the model's: each block's instances."""
        return [u for name in names for u in ([i.unit for i in self.of(name)] or [name])]

    def rename(self, inst: Instance, name: str) -> str:
        """A name of the block's (weight placeholder, fqn, cache input or output) as the instance's."""
        if inst.unit == inst.block:
            return name
        m = SLOT_NAME.match(name)
        if m:
            return f"{m[1]}_{inst.slot}_{name[m.end():]}"
        return _renamed(name, inst.block, inst.unit)

    def expand(self, names: list[str]) -> list[str]:
        """Input or output names of the program as the whole model's: each block's run of names once per instance."""
        layers = self.cfg.num_hidden_layers
        out, i = [], 0
        while i < len(names):
            unit = name_unit(names[i], layers)
            j = i + 1
            while j < len(names) and name_unit(names[j], layers) == unit:
                j += 1
            for inst in self.of(unit) or [None]:
                out += names[i:j] if inst is None else [self.rename(inst, n) for n in names[i:j]]
            i = j
        return out

    # ---- what differs per instance ----------------------------------------------------------------------

    def node_args(self, inst: Instance, node: fx.Node) -> tuple:
        """The arguments node of the block takes in this instance."""
        args = self.args.get((inst.unit, node.name))
        return node.args if args is None else _current(node, args)

    def set_args(self, inst: Instance, node: fx.Node, args: tuple) -> None:
        """Give node of the block other (constant) arguments in this instance than the block's own."""
        if args == node.args:
            self.args.pop((inst.unit, node.name), None)
        else:
            self.args[(inst.unit, node.name)] = tuple(args)

    def varied(self, node: fx.Node) -> list[tuple[Instance, tuple]]:
        """(instance, args) of each instance of node's block that gives node arguments of its own."""
        return [(i, _current(node, self.args[(i.unit, node.name)])) for i in self.of(layer_of(node))
                if (i.unit, node.name) in self.args]

    def weight(self, program, inst: Instance | None, name: str, memo: dict | None = None):
        """The value of the program's weight `name` in an instance (its block's own for None or the block's unit)."""
        layers = self.cfg.num_hidden_layers
        if inst is None or inst.unit == inst.block or name_unit(name, layers) != inst.block:
            return program.weights[name]
        memo = {} if memo is None else memo
        key = (inst.unit, name)
        if key in self.values:
            return self.values[key]
        if key not in memo:
            fqn = program.weight_fqns.get(name)
            if name in self.derived:
                fn, sources = self.derived[name]
                memo[key] = fn(lambda f: f and self.rename(inst, f), *(self.weight(program, inst, s, memo) for s in sources))
            elif self.source is not None and fqn is not None:
                memo[key] = self.source[self.rename(inst, fqn)].detach()
            else:
                memo[key] = program.weights[name]
        return memo[key]

    def check(self, program) -> None:
        """Raise BlockError unless each block's nodes are contiguous in the graph and every per-instance argument
        list belongs to a node of that instance's block."""
        done, current = set(), None
        for node in program.graph.nodes:
            block = layer_of(node) if node.op == "call_function" else None
            block = block if self.of(block) else None
            if block is not None and block != current and block in done:
                raise BlockError(f"block {block}'s nodes are not contiguous in the graph")
            done.add(current)
            current = block
        nodes = {n.name: n for n in program.graph.nodes}
        units = {i.unit: i for i in self.instances}
        for (unit, name), args in self.args.items():
            node, inst = nodes.get(name), units.get(unit)
            if node is None or inst is None or layer_of(node) != inst.block or len(args) != len(node.args):
                raise BlockError(f"{unit}: arguments given for node '{name}', which its block has not (or not so many)")
