"""The IR: a torch.export graph with its weights lifted to placeholders, as one callable Program.

The graph's placeholders are weights (named in `weights`) and user inputs (named in `inputs`);
outputs are flat and named in `outputs`. Passes edit `gm.graph` and may add or drop weights. The program
knows what it was captured from (config, mode, shapes); everything passes compute about it lives in the
Plan's typed analyses (dsv3c.ir.plan), not on the program.

A program of blocks (`blocks` set, see dsv3c.ir.blocks) holds each distinct block of the model once; its
`model_inputs`, `model_outputs` and `model_weights` are the whole model's, and counting a node counts it
once per instance of its block (`times`). A whole graph has no `blocks`: every node counts once.
"""

import re
from dataclasses import dataclass, field

import torch
from torch import fx
from torch._guards import detect_fake_mode


@dataclass
class Program:
    """A captured model: graph module, weights by placeholder name, user input and output names."""

    gm: fx.GraphModule
    weights: dict[str, torch.Tensor]
    inputs: list[str]
    outputs: list[str]
    mode: str
    cfg: object  # model_def.ModelConfig it was captured from
    shapes: dict  # batch, seq, kv_len of the capture
    ep: dict | None = None  # after expert_partition: how each EP rank binds its local expert weights
    weight_fqns: dict = field(default_factory=dict)  # weight placeholder -> the model parameter it holds
    weight_segments: dict = field(default_factory=dict)  # fused weight -> [(source fqn, rows), ...] it stacks
    fp8_checkpoint: dict = field(default_factory=dict)  # fqn -> (E4M3 codes, scales) as stored in the checkpoint
    blocks: object = None  # dsv3c.ir.blocks.Blocks of a program of blocks; None: the whole model's graph

    @property
    def graph(self) -> fx.Graph:
        """The program's graph."""
        return self.gm.graph

    def placeholders(self) -> list[fx.Node]:
        """The graph's placeholder nodes in call order."""
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def __call__(self, *args: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the model on its user inputs (in `model_inputs` order); returns its outputs by name."""
        if self.blocks is not None:
            from dsv3c.ir.segments import run  # late: segments imports this module

            return run(self, dict(zip(self.model_inputs, args, strict=True)))
        given = dict(zip(self.inputs, args, strict=True))
        call = [self.weights[n.name] if n.name in self.weights else given[n.name] for n in self.placeholders()]
        return dict(zip(self.outputs, self.gm(*call), strict=True))

    # ---- the whole model, of a program of blocks ------------------------------------------------------

    @property
    def model_inputs(self) -> list[str]:
        """The model's user inputs: `inputs`, with each block's once per instance."""
        return self.inputs if self.blocks is None else self.blocks.expand(self.inputs)

    @property
    def model_outputs(self) -> list[str]:
        """The model's outputs: `outputs`, with each block's once per instance."""
        return self.outputs if self.blocks is None else self.blocks.expand(self.outputs)

    def model_weights(self) -> dict[str, tuple]:
        """The model's weights: name -> (instance or None, the program's weight name it is an instance of)."""
        if self.blocks is None:
            return {name: (None, name) for name in self.weights}
        out = {}
        for name in self.weights:
            for inst in self.blocks.of(name_unit(name, self.cfg.num_hidden_layers)) or [None]:
                out[name if inst is None else self.blocks.rename(inst, name)] = (inst, name)
        return out

    def times(self, node: fx.Node) -> int:
        """How many nodes of the whole model's graph node stands for: its block's instances (1 in a whole graph)."""
        return 1 if self.blocks is None else self.blocks.times(unit_of(node, self.cfg.num_hidden_layers))

    def weight_times(self, name: str) -> int:
        """How many weights of the whole model the program's weight `name` stands for."""
        return 1 if self.blocks is None else self.blocks.times(name_unit(name, self.cfg.num_hidden_layers))

    def node_count(self) -> int:
        """Nodes of the whole model's graph."""
        return len(self.graph.nodes) if self.blocks is None else sum(self.times(n) for n in self.graph.nodes)

    def weight_count(self) -> int:
        """Weights of the whole model."""
        return sum(self.weight_times(name) for name in self.weights)

    def fake_mode(self):
        """The fake-tensor mode the graph's meta['val'] values live in."""
        if "_fake_mode" not in self.__dict__:
            self._fake_mode = detect_fake_mode([n.meta["val"] for n in self.placeholders() if "val" in n.meta])
        return self._fake_mode

    def add_weight(self, name: str, value: torch.Tensor, derive=None) -> fx.Node:
        """Add a weight placeholder (before the first placeholder) holding value; returns its node.

        derive: (fn, source weight nodes) with value == fn(fqn_of, *their values), where fqn_of maps a
        checkpoint name of the block to the instance's: how each instance of a block derives its own value.
        """
        value = value.detach()  # derived weights (concatenations, slices) must not keep autograd history
        first = next(iter(self.graph.nodes))
        with self.graph.inserting_before(first):
            node = self.graph.placeholder(name)  # fx makes the name unique if it is taken
        node.meta["val"] = self.fake_mode().from_tensor(value, static_shapes=True)
        self.weights[node.name] = value
        if self.blocks is not None and derive is not None:
            fn, sources = derive
            self.blocks.derived[node.name] = (fn, [s.name for s in sources])
        return node

    def call(self, target, args: tuple, like: fx.Node, kwargs: dict | None = None) -> fx.Node:
        """Insert target(*args) at the graph's insert point, with meta['val'] derived and like's module stack."""
        node = self.graph.call_function(target, tuple(args), kwargs or {})
        vals = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
        with self.fake_mode():
            node.meta["val"] = target(*vals[0], **vals[1])
        node.meta["nn_module_stack"] = dict(like.meta.get("nn_module_stack") or {})
        return node

    def add_input(self, name: str, example: torch.Tensor, before: str) -> fx.Node:
        """Add a user-input placeholder shaped like example, placed (and listed) just before input `before`."""
        anchor = next(n for n in self.placeholders() if n.name == before)
        with self.graph.inserting_before(anchor):
            node = self.graph.placeholder(name)
        node.meta["val"] = self.fake_mode().from_tensor(example, static_shapes=True)
        self.inputs.insert(self.inputs.index(before), name)
        return node

    def remove_input(self, name: str) -> None:
        """Remove user-input placeholder `name`, which nothing may read any more."""
        node = next(n for n in self.placeholders() if n.name == name)
        self.graph.erase_node(node)
        self.inputs.remove(name)

    def set_output(self, old: str, new: str, value: fx.Node) -> None:
        """Make output `old` return value instead, under the name new."""
        out = next(n for n in self.graph.nodes if n.op == "output")
        values = list(out.args[0])
        values[self.outputs.index(old)] = value
        out.args = (tuple(values),)
        self.outputs[self.outputs.index(old)] = new

    def drop_unused_weights(self) -> list[str]:
        """Remove weight placeholders nothing reads; returns their names."""
        dropped = []
        for n in self.placeholders():
            if n.name in self.weights and not n.users:
                self.graph.erase_node(n)
                del self.weights[n.name]
                dropped.append(n.name)
        return dropped

    def weight_bytes_by_dtype(self) -> dict[str, int]:
        """Bytes of the model's weights grouped by dtype name (FP8 block scales count as float32)."""
        counts: dict[str, int] = {}
        for name, value in self.weights.items():
            key = str(value.dtype).replace("torch.", "")
            counts[key] = counts.get(key, 0) + value.numel() * value.element_size() * self.weight_times(name)
        return dict(sorted(counts.items()))

    def recompile(self) -> None:
        """Regenerate the graph module's code after graph edits."""
        self.gm.recompile()


def module_path(node: fx.Node) -> str:
    """The innermost module path a node came from ('layers.5.self_attn'), '' for the root."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


_UNIT_IN_NAME = re.compile(r"(?:^|_)(layers|mtp)_(\d+)(?=_|$)")
SLOT_NAME = re.compile(r"^(past|cache)_(\d+)_")  # a KV-cache input or output of the attention block in slot N


def name_unit(name: str, layers: int) -> str | None:
    """The unit a placeholder or output name belongs to ('p_layers_3_x' → 'layers.3'; with 61 layers
    'past_61_k' → 'mtp.0'); None for names of no layer or MTP module."""
    m = SLOT_NAME.match(name)
    if m:
        slot = int(m[2])
        return f"layers.{slot}" if slot < layers else f"mtp.{slot - layers}"
    m = _UNIT_IN_NAME.search(name)
    return f"{m[1]}.{m[2]}" if m else None


def unit_of(node: fx.Node, layers: int) -> str | None:
    """The unit of a node: its layer or MTP module ('layers.5', 'mtp.0'), by name for placeholders; else None."""
    if node.op == "placeholder":
        return name_unit(node.name, layers)
    return layer_of(node) if node.op != "output" else None


def layer_of(node: fx.Node) -> str | None:
    """The block a node belongs to: 'layers.N' or 'mtp.K', the outermost such module on its stack (None outside)."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        parts = path.split(".")
        if len(parts) >= 2 and parts[0] in ("layers", "mtp") and parts[1].isdigit():
            return f"{parts[0]}.{parts[1]}"
    return None
