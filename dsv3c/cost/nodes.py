"""FLOPs and bytes of one graph node: dsv3 ops by their op record, ATen ops by the table below.

Forward FLOPs count a multiply-add as 2. ATen GEMMs' backward is Dgrad + Wgrad (2x forward); other ATen
compute is elementwise (one FLOP per output element, backward as much); views cost nothing; copies
(cat, clone, dtype casts) move bytes without FLOPs.
"""

import math
import operator

import torch
from torch import fx

from dsv3c.ops.record import Cost, io_bytes, nbytes, op_name, record_of

ZERO = Cost(kernel="none")

# no FLOPs and no bytes: metadata only
_VIEWS = {
    "view", "reshape", "_unsafe_view", "expand", "unsqueeze", "squeeze", "split_with_sizes", "split", "slice",
    "select", "permute", "transpose", "t", "alias", "detach", "lift_fresh_copy",
}  # fmt: skip
# no FLOPs, but the data is read and written
_MOVES = {"cat", "stack", "contiguous", "clone", "_to_copy", "to", "copy", "index_select", "gather"}
_GEMMS = {"linear", "mm", "matmul", "bmm"}


def _val(arg):
    """The meta value of a node argument (or the argument itself, lists mapped)."""
    if isinstance(arg, fx.Node):
        return arg.meta.get("val")
    if isinstance(arg, (list, tuple)):
        return type(arg)(_val(a) for a in arg)
    return arg


def _schema_args(node: fx.Node, args: tuple) -> list:
    """The node's arguments (args for its positional ones) in schema order with defaults filled in, as meta values."""
    schema = node.target._schema
    out = []
    for i, arg in enumerate(schema.arguments):
        if i < len(args):
            out.append(_val(args[i]))
        elif arg.name in node.kwargs:
            out.append(_val(node.kwargs[arg.name]))
        else:
            out.append(arg.default_value)
    return out


def node_cost(node: fx.Node, args: tuple | None = None) -> Cost:
    """The Cost of one call_function node, called with args (default its own; zero for views, glue and non-calls)."""
    if node.op != "call_function" or node.target is operator.getitem:
        return ZERO
    args = node.args if args is None else args
    out = node.meta.get("val")
    name = op_name(node.target)
    if name is not None:
        return record_of(name).cost(*_schema_args(node, args), out)
    aten = getattr(node.target, "_opname", None)
    args = [_val(a) for a in args]
    flat = [a for x in args for a in (x if isinstance(x, (list, tuple)) else (x,))]
    if aten in _VIEWS:
        return ZERO
    if aten in _MOVES:
        return Cost(bytes=io_bytes(flat, out))
    if aten in _GEMMS:
        k = args[0].shape[-1]
        flops = 2 * math.prod(out.shape) * k
        groups = math.prod(out.shape[:-2]) if aten == "bmm" else 1
        m = math.prod(out.shape[:-1]) // groups
        return Cost(flops=flops, bwd_flops=2 * flops, bytes=io_bytes(flat, out), kernel="gemm",
                    shape=(groups, m, out.shape[-1], k))
    if aten == "embedding":  # a gather: read and write one row per token; backward scatters as much
        return Cost(bytes=2 * nbytes(out), weight_bytes=nbytes(out))
    elements = math.prod(out.shape) if isinstance(out, torch.Tensor) else 0
    return Cost(flops=elements, bwd_flops=elements, bytes=io_bytes(flat, out))


def model_flops(totals: dict, train: bool) -> int:
    """Model FLOPs by the MFU convention: 3 x forward in training, the forward in inference."""
    return 3 * totals["flops"] if train else totals["flops"]


def hardware_flops(totals: dict) -> int:
    """FLOPs the hardware executes: forward, backward as executed, and recomputed forwards."""
    return totals["flops"] + totals["bwd_flops"] + totals.get("recompute_flops", 0)
