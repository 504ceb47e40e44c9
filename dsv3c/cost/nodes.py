"""FLOPs and bytes of one graph node from its op and the shapes in meta['val'].

Forward FLOPs count a multiply-add as 2. Backward FLOPs use the usual ratios: GEMMs 2x forward
(Dgrad + Wgrad), attention 2.5x (five matmuls against two), elementwise 1x.
"""

import math
import operator

import torch
from torch import fx

from dsv3c.ops import op_name

# no FLOPs and no bytes: metadata only
_VIEWS = {
    "view", "reshape", "_unsafe_view", "expand", "unsqueeze", "squeeze", "split_with_sizes", "split", "slice",
    "select", "permute", "transpose", "t", "alias", "detach",
}  # fmt: skip
# no FLOPs, but the data is read and written
_MOVES = {"cat", "stack", "contiguous", "clone", "_to_copy", "to", "copy", "index_select", "gather"}


def nbytes(value) -> int:
    """Bytes held by a tensor value or a tuple of them."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


def _val(arg):
    """The meta value of a node argument (or the argument itself)."""
    return arg.meta.get("val") if isinstance(arg, fx.Node) else arg


def _causal_pairs(s: int, t: int) -> int:
    """Visible (query, key) pairs for s new tokens at the end of t keys under the causal mask."""
    return s * (t - s) + s * (s + 1) // 2


def node_cost(node: fx.Node) -> dict:
    """{'flops', 'bwd_flops', 'bytes'} of one call_function node (zeros for views and glue)."""
    zero = {"flops": 0, "bwd_flops": 0, "bytes": 0}
    if node.op != "call_function" or node.target is operator.getitem:
        return zero
    args = [_val(a) for a in node.args]
    out = node.meta.get("val")
    io_bytes = sum(nbytes(a) for a in args) + nbytes(out)
    name = op_name(node.target)
    aten = getattr(node.target, "_opname", None) if name is None else None
    if aten in _VIEWS:
        return zero
    if aten in _MOVES:
        return {"flops": 0, "bwd_flops": 0, "bytes": io_bytes}
    if aten == "linear" or aten in ("mm", "matmul", "bmm"):
        flops = 2 * math.prod(out.shape) * args[0].shape[-1]
        return {"flops": flops, "bwd_flops": 2 * flops, "bytes": io_bytes}
    if aten == "embedding":
        return {"flops": 0, "bwd_flops": 0, "bytes": 2 * nbytes(out)}
    formula = _DSV3.get(name)
    if formula is not None:
        return formula(args, out, node)
    elements = math.prod(out.shape) if isinstance(out, torch.Tensor) else 0
    return {"flops": elements, "bwd_flops": elements, "bytes": io_bytes}


def _attention(args, out, node):
    """Plain MLA core: 2·B·H·pairs·(dqk + dv) FLOPs under the causal mask."""
    q, k, v = args[:3]
    b, s, h, dqk = q.shape
    flops = 2 * b * h * _causal_pairs(s, k.shape[1]) * (dqk + v.shape[-1])
    return {"flops": flops, "bwd_flops": int(2.5 * flops), "bytes": sum(nbytes(a) for a in (q, k, v, out))}


def _latent_attention(args, out, node):
    """Absorbed MLA core: scores over r + dr dims, output over r dims, against one latent head."""
    q_lat, q_pe, ckv, kpe = args[:4]
    b, s, h, r = q_lat.shape
    flops = 2 * b * h * _causal_pairs(s, ckv.shape[1]) * (2 * r + q_pe.shape[-1])
    return {"flops": flops, "bwd_flops": int(2.5 * flops), "bytes": sum(nbytes(a) for a in (q_lat, q_pe, ckv, kpe, out))}


def expected_experts_hit(tokens: int, experts: int, k: int) -> float:
    """Expected distinct experts that tokens each routed to k of experts (uniformly) touch."""
    return experts * (1 - (1 - k / experts) ** tokens)


def _moe_experts(args, out, node):
    """Routed experts: each token runs k SwiGLU experts (3 GEMMs); weight bytes for the experts expected hit."""
    x, ids, _, w_gate = args[:4]
    tokens, d = x.shape
    experts, f, _ = w_gate.shape
    k = ids.shape[1]
    flops = tokens * k * 3 * 2 * d * f
    weight_bytes = expected_experts_hit(tokens, experts, k) * 3 * f * d * w_gate.element_size()
    act_bytes = 2 * nbytes(x) * k + nbytes(out)
    return {"flops": flops, "bwd_flops": 2 * flops, "bytes": int(weight_bytes + act_bytes)}


def _moe_gate(args, out, node):
    """Router: the [T, D] x [D, E] affinity GEMM dominates."""
    x, w = args[:2]
    flops = 2 * x.shape[0] * x.shape[1] * w.shape[0]
    return {"flops": flops, "bwd_flops": 2 * flops, "bytes": nbytes(x) + nbytes(w) + nbytes(out)}


_DSV3 = {
    "mla_attention": _attention,
    "latent_attention": _latent_attention,
    "moe_experts": _moe_experts,
    "moe_gate": _moe_gate,
}

