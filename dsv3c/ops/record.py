"""One record per dsv3 op: the custom op (schema, reference, fake), its autograd, its cost, the stage it first
appears at and its lowering.

`define(op, cost=..., stage=..., lowering=...)` is the only way an op joins the vocabulary. Cost, stage and
lowering are required keywords, so an op without them fails at import; `check_complete()` (run when
`dsv3c.ops` is imported and again by the pass manager) fails if a `dsv3::` op exists that has no record.

Stage: "capture" for an op the captured model contains, else the name of the pass that first creates it.
The pass registry derives from it which ops are legal after capture and which each pass adds
(`passes.registry`), and `passes/README.md`'s legal-op table is rendered from the records.

Cost convention (`Cost`): `flops` of the forward (a multiply-add is 2), `bwd_flops` of its backward as
executed (0 for ops with no backward), `bytes` read and written in HBM by the forward, and for
communication ops the bytes they put on each kind of link (`ib_bytes`, `nvlink_bytes`). A cost function
takes the node's arguments in schema order (tensors as their meta values, constants as themselves) and
its output value.

Lowering: `Lowering(builder, runner)` names, as "module:function", the code generator's builder (shapes and
attributes → Triton kernel specialisations) and runner (a specialisation's kernels on real tensors), which
live in the op's kernel family module (`Lowering.of(module, op)`: its build_<op> and run_<op>); names
rather than functions keep this package a leaf that imports no code generator. `NotLowered(reason)` marks
an op that stays a torch op after lowering (collectives, the kernel call itself).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

NAMESPACE = "dsv3"


KERNELS = ("gemm", "experts", "attention", "latent_attention", "memory", "dispatch", "combine", "none")


@dataclass(frozen=True)
class Cost:
    """FLOPs (forward, backward as executed), HBM bytes and link bytes of one op call, and how it is priced.

    `kernel` names the kernel class the pricing module times it as (see KERNELS) and `shape` the
    dimensions that class reads: gemm (groups, m, n, k) for [m, k] x [n, k]^T per group; experts
    (tokens, top_k, experts, f, d) for the routed SwiGLU experts; attention (b, h, s, t, dqk, dv) and
    latent_attention (b, h, s, t, r, dr) for s queries over t keys per sequence. `dtype` is the tensor-core
    dtype of GEMM-like kernels, `weight_bytes` the part of `bytes` that are weights (0: the cost pass
    counts the weight arguments), `wgrad_flops` the part of `bwd_flops` that computes weight gradients.
    """

    flops: int = 0
    bwd_flops: int = 0
    bytes: int = 0
    ib_bytes: int = 0
    nvlink_bytes: int = 0
    kernel: str = "memory"
    dtype: str = "bf16"
    shape: tuple = ()
    weight_bytes: int = 0
    wgrad_flops: int = 0

    def as_dict(self) -> dict:
        """The cost as a plain dict (what `node.meta['cost']` holds)."""
        return {"flops": round(self.flops), "bwd_flops": round(self.bwd_flops), "bytes": round(self.bytes),
                "ib_bytes": round(self.ib_bytes), "nvlink_bytes": round(self.nvlink_bytes), "kernel": self.kernel,
                "dtype": self.dtype, "shape": [int(x) for x in self.shape], "weight_bytes": round(self.weight_bytes),
                "wgrad_flops": round(self.wgrad_flops)}  # fmt: skip


@dataclass(frozen=True)
class Lowering:
    """How the code generator lowers an op: its builder and runner as 'module:function'.

    partial: why the builder declines some attributes (it returns None and the op stays), or "" when it never does.
    """

    builder: str
    runner: str
    partial: str = ""

    @classmethod
    def of(cls, module: str, op: str, partial: str = "") -> "Lowering":
        """The lowering by build_<op> and run_<op> of kernel family module `module`."""
        return cls(f"{module}:build_{op}", f"{module}:run_{op}", partial)

    def resolve(self, which: str) -> Callable:
        """The builder or runner function itself."""
        module, name = getattr(self, which).split(":")
        return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class NotLowered:
    """An op that stays a torch op after lowering, and why."""

    reason: str


@dataclass(frozen=True)
class OpRecord:
    """Everything dsv3c knows about one op."""

    name: str
    op: object  # the torch.library custom op
    cost: Callable[..., Cost]
    lowering: Lowering | NotLowered
    backward: str  # "reference" (re-run under autograd), "custom" or "none"
    stage: str  # "capture", or the pass that first creates the op

    @property
    def doc(self) -> str:
        """The first line of the op's docstring: what it computes."""
        return (self._fn.__doc__ or "").strip().splitlines()[0]

    @property
    def module(self) -> str:
        """The module that defines the op: its family."""
        return self._fn.__module__

    @property
    def _fn(self) -> Callable:
        """The function the custom op was made from."""
        return getattr(self.op, "_init_fn", None) or self.op

    @property
    def lowered(self) -> bool:
        """Whether lower_triton replaces this op by kernels."""
        return isinstance(self.lowering, Lowering)


RECORDS: dict[str, OpRecord] = {}


class OpRecordError(TypeError):
    """An op is registered without its record, or a record is malformed."""


def define(op, *, cost: Callable[..., Cost], stage: str, lowering: Lowering | NotLowered, autograd=None) -> object:
    """Register op's record; stage is "capture" or the pass that first creates op; autograd is None (no
    backward), an int n (backward re-runs the reference w.r.t. the first n inputs) or a (backward,
    setup_context) pair."""
    name = getattr(op, "_name", None) or str(op)
    if not callable(cost) or not isinstance(lowering, (Lowering, NotLowered)):
        raise OpRecordError(f"dsv3 op {name}: a record needs a cost function and a Lowering or NotLowered mark")
    if not isinstance(stage, str) or not stage:
        raise OpRecordError(f"dsv3 op {name}: stage must be 'capture' or the name of the pass that creates it")
    if name in RECORDS:
        raise OpRecordError(f"dsv3 op {name} is defined twice")
    backward = "none"
    if isinstance(autograd, int):
        _reference_autograd(op, autograd)
        backward = "reference"
    elif autograd is not None:
        fn, setup = autograd
        op.register_autograd(fn, setup_context=setup)
        backward = "custom"
    RECORDS[name] = OpRecord(name, op, cost, lowering, backward, stage)
    return op


def _reference_autograd(op, n_tensor_inputs: int) -> None:
    """Autograd for op whose backward re-runs its own implementation under autograd (saves inputs only)."""
    fn = op._init_fn

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_tensor_inputs])
        ctx.rest = inputs[n_tensor_inputs:]

    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_(t.is_floating_point()) for t in ctx.saved_tensors]
        with torch.enable_grad():
            outs = fn(*inputs, *ctx.rest)
        outs = outs if isinstance(outs, tuple) else (outs,)
        # an output that does not depend on the inputs for this data (e.g. ep_experts on a rank that received
        # no route) contributes nothing
        pairs = [(o, g) for o, g in zip(outs, grads) if o.is_floating_point() and g is not None and o.requires_grad]
        wanted = [t for t in inputs if t.requires_grad]
        if not pairs:
            return (*[None] * len(inputs), *[None] * len(ctx.rest))
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        return (*[next(got) if t.requires_grad else None for t in inputs], *[None] * len(ctx.rest))

    op.register_autograd(backward, setup_context=setup_context)


def registered_op_names() -> set[str]:
    """Short names of every op registered in the dsv3 namespace."""
    prefix = NAMESPACE + "::"
    return {n[len(prefix):].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix)}


def check_complete() -> None:
    """Raise OpRecordError if a dsv3 op exists without a record."""
    missing = sorted(registered_op_names() - set(RECORDS))
    if missing:
        raise OpRecordError(f"dsv3 ops without a record (cost and lowering): {', '.join(missing)}")


def record_of(name: str) -> OpRecord:
    """The record of dsv3 op `name`."""
    try:
        return RECORDS[name]
    except KeyError:
        raise OpRecordError(f"no record for dsv3 op {name!r}") from None


def op_name(target) -> str | None:
    """The short name of a dsv3 op overload ('rms_norm'), or None for any other call target."""
    name = getattr(target, "name", None)
    if callable(name):
        qualified = target.name()  # e.g. 'dsv3::rms_norm' or 'dsv3::rms_norm.default'
        if qualified.startswith(NAMESPACE + "::"):
            return qualified.split("::", 1)[1].split(".")[0]
    return None


# ---- helpers the cost functions share -----------------------------------------------------------------


def nbytes(value) -> int:
    """Bytes held by a tensor value or a tuple of them."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


def io_bytes(args, out) -> int:
    """Bytes of every tensor argument and output: what an op reads and writes once."""
    return sum(nbytes(a) for a in args) + nbytes(out)


def causal_pairs(s: int, t: int) -> int:
    """Visible (query, key) pairs for s new tokens at the end of t keys under the causal mask."""
    return s * (t - s) + s * (s + 1) // 2


def elementwise(flops_per_element: int, bwd_ratio: float = 2.0) -> Callable[..., Cost]:
    """Cost function of an op doing flops_per_element per output element; backward bwd_ratio x forward."""

    def cost(*args) -> Cost:
        *ins, out = args
        first = out[0] if isinstance(out, (tuple, list)) else out
        flops = flops_per_element * first.numel()
        return Cost(flops=flops, bwd_flops=int(bwd_ratio * flops), bytes=io_bytes(ins, out))

    return cost


def expected_experts_hit(tokens: int, experts: int, k: int) -> float:
    """Expected distinct experts that tokens each routed to k of experts (uniformly) touch (≤ min(E, T·k))."""
    return experts * (1 - (1 - k / experts) ** tokens) if experts else 0.0


def gemm_flops(m: int, n: int, k: int) -> int:
    """FLOPs of an [m, k] x [k, n] GEMM."""
    return 2 * m * n * k


def rows(shape) -> int:
    """Product of all but the last dimension."""
    return math.prod(shape[:-1])
