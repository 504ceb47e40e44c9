"""IR verification after every pass: lint, fake-tensor re-propagation, op legality."""

import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from dsv3c.ir import Program
from dsv3c.ir.blocks import BlockError
from dsv3c.ops import op_name


class VerificationError(Exception):
    """The graph breaks an IR invariant; the message names the node."""


@dataclass(frozen=True)
class TensorSpec:
    """What verification compares of a tensor: its shape and dtype."""

    shape: tuple
    dtype: torch.dtype


def _spec(value):
    """A hashable description of a value: TensorSpec for tensors, tuples of them, or the value itself."""
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return tuple(_spec(v) for v in value)
    return value


class Propagator:
    """Re-derives every node's output shapes and dtypes from its inputs, memoised by input signature.

    Identical layers share signatures, so the 671B graph costs about as much as one layer.
    """

    def __init__(self):
        self.cache: dict = {}
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)

    def _fake(self, spec):
        """A fresh fake tensor for a TensorSpec; other values pass through."""
        if isinstance(spec, TensorSpec):
            with self.mode:
                return torch.empty(spec.shape, dtype=spec.dtype, device="meta")
        return spec

    def output(self, node: fx.Node, env: dict):
        """The (shape, dtype) spec node computes given the specs of its inputs in env."""
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.target is operator.getitem:
            return args[0][args[1]]
        key = (node.target, repr(args), repr(sorted(kwargs.items())))
        if key not in self.cache:
            fargs = fx.node.map_aggregate(args, self._fake)
            fkwargs = fx.node.map_aggregate(kwargs, self._fake)
            with self.mode:
                out = node.target(*fargs, **fkwargs)
            self.cache[key] = _spec(out)
        return self.cache[key]


def verify(program: Program, legal_ops: set[str] | None = None, propagator: Propagator | None = None) -> None:
    """Raise VerificationError unless the graph lints, re-propagates to its stored meta and uses only legal ops,
    and (a program of blocks) its instances fit it."""
    graph = program.graph
    try:
        graph.lint()
    except Exception as e:  # fx raises RuntimeError / AssertionError with its own message
        raise VerificationError(f"graph.lint failed: {str(e).splitlines()[0]}") from None
    if program.blocks is not None:
        try:
            program.blocks.check(program)
        except BlockError as e:
            raise VerificationError(str(e)) from None
    prop = propagator or Propagator()
    env = {}
    for node in graph.nodes:
        if node.op == "output":
            continue
        if "val" not in node.meta:
            raise VerificationError(f"node '{node.name}' has no meta['val']")
        stored = _spec(node.meta["val"])
        if node.op == "placeholder":
            if node.name in program.weights and _spec(program.weights[node.name]) != stored:
                raise VerificationError(f"weight '{node.name}' does not match its placeholder's meta['val']")
            env[node] = stored
            continue
        if node.op != "call_function":
            raise VerificationError(f"node '{node.name}' has op '{node.op}'; only call_function is allowed")
        name = op_name(node.target)
        if legal_ops is not None and name is not None and name not in legal_ops:
            raise VerificationError(f"node '{node.name}' uses dsv3.{name}, not legal at this stage")
        try:
            derived = prop.output(node, env)
        except Exception as e:
            raise VerificationError(f"node '{node.name}' ({node.target}) fails to re-propagate: {e}") from None
        if derived != stored:
            raise VerificationError(f"node '{node.name}' meta['val'] is {stored}, re-propagation gives {derived}")
        env[node] = derived
