"""The IR: a torch.export graph with its weights lifted to placeholders, as one callable Program.

The graph's placeholders are weights (named in `weights`) and user inputs (named in `inputs`);
outputs are flat and named in `outputs`. Passes edit `gm.graph` and may add or drop weights. The program
knows what it was captured from (config, mode, shapes); everything passes compute about it lives in the
Plan's typed analyses (dsv3c.ir.plan), not on the program.
"""

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

    @property
    def graph(self) -> fx.Graph:
        """The program's graph."""
        return self.gm.graph

    def placeholders(self) -> list[fx.Node]:
        """The graph's placeholder nodes in call order."""
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def __call__(self, *args: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the graph on user inputs (in `inputs` order); returns outputs by name."""
        given = dict(zip(self.inputs, args, strict=True))
        call = [self.weights[n.name] if n.name in self.weights else given[n.name] for n in self.placeholders()]
        return dict(zip(self.outputs, self.gm(*call), strict=True))

    def fake_mode(self):
        """The fake-tensor mode the graph's meta['val'] values live in."""
        if "_fake_mode" not in self.__dict__:
            self._fake_mode = detect_fake_mode([n.meta["val"] for n in self.placeholders() if "val" in n.meta])
        return self._fake_mode

    def add_weight(self, name: str, value: torch.Tensor) -> fx.Node:
        """Add a weight placeholder (before the first placeholder) holding value; returns its node."""
        value = value.detach()  # derived weights (concatenations, slices) must not keep autograd history
        first = next(iter(self.graph.nodes))
        with self.graph.inserting_before(first):
            node = self.graph.placeholder(name)  # fx makes the name unique if it is taken
        node.meta["val"] = self.fake_mode().from_tensor(value, static_shapes=True)
        self.weights[node.name] = value
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
        """Bytes of the weights grouped by dtype name (FP8 block scales count as float32)."""
        counts: dict[str, int] = {}
        for value in self.weights.values():
            key = str(value.dtype).replace("torch.", "")
            counts[key] = counts.get(key, 0) + value.numel() * value.element_size()
        return dict(sorted(counts.items()))

    def recompile(self) -> None:
        """Regenerate the graph module's code after graph edits."""
        self.gm.recompile()


def module_path(node: fx.Node) -> str:
    """The innermost module path a node came from ('layers.5.self_attn'), '' for the root."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def layer_of(node: fx.Node) -> str | None:
    """The block a node belongs to: 'layers.N' or 'mtp.K', the outermost such module on its stack (None outside)."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        parts = path.split(".")
        if len(parts) >= 2 and parts[0] in ("layers", "mtp") and parts[1].isdigit():
            return f"{parts[0]}.{parts[1]}"
    return None
