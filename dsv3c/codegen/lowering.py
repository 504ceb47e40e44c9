"""Lowering to Triton: the `dsv3.kernel_call` op, shape specialisation of the dsv3 ops, and the entry points.

Each lowered dsv3 op's record names a builder and a runner in its kernel family module
(`Lowering.of("dsv3c.codegen.kernels.rmsnorm", "rms_norm")`: `build_rms_norm`, `run_rms_norm`; what a family
module holds: `dsv3c.codegen.family`):
- builder(ins, outs, attrs, tiles) -> (KernelSpecs, torch parts): shapes, dtypes, attributes and the target's
  tile configs (`dsv3c.codegen.tiles.Tiles`) fixed into kernel specialisations;
- runner(call, *tensors) -> outputs: allocates, runs the torch parts and launches exactly the CallSpec's
  kernels through `KernelSpec.launch`;
- `KernelSpec.aot()` is the AOTSpec `kernel_build` compiles for sm_90a.
Entry points for tests and benches, the same path as a lowered graph's kernel_call:
- `run_op(op, *tensors, target="h800x2048", mode="prefill", tiles=None, **attrs)`: specialise for the
  tensors (`call_spec`: attributes normalised and output specs taken from the op's fake impl, as lower_triton
  does) and run the runner (`run_call`); `tiles={"fp8_gemm": {"BLOCK_M": 64}}` overrides the target's tile
  table per family (`Tiles`);
- `aot_specs(op, [(shape, dtype), ...], attrs, target, mode, tiles)`: the AOTSpecs of the op's KernelSpecs.
Kernel variants no dsv3 op lowers to on its own (rms_norm_quant, swiglu_quant, grouped_fp8_gemm,
mla_decode_paged: `family.VARIANTS`, registered by their family modules) are reached the same way.

The kernel-call op
    dsv3::kernel_call(str spec, Tensor[] args) -> Tensor[]
replaces one dsv3 compute op node. `spec` names a `CallSpec` in this module's registry: the original op,
its non-tensor arguments, the shapes and dtypes of its tensor inputs and outputs (it is specialised by
shape), and the `KernelSpec`s it launches (one per Triton kernel specialisation: jit function, argument
types, shape-derived integer arguments, constexprs, num_warps/num_stages from the family's tile table,
grid). Spec ids are content hashes, so equal shapes give equal ids in every run and every process.

- fake impl: checks the inputs against the spec and returns empties of the original op's output shapes;
- real impl (CPU and CUDA): runs the op's runner, which launches exactly the spec's kernels with the spec's
  constexprs, options and grid (`KernelSpec.launch`): on CPU under Triton's interpreter (TRITON_INTERPRET=1,
  constexpr EXACT on), on CUDA through the normal Triton launch. The compiled artifacts of the same
  KernelSpecs are what `dsv3c.codegen.kernel_build` writes under <out>/kernels/.

Some steps of an op have no kernel in the library and run as torch inside the runner; each CallSpec lists
them in `torch_parts` and the pass reports them: the router's FP32 logits GEMM (the router kernel takes
logits), sorting tokens by expert and the weighted combine of the MoE experts, the 128x128 weight
quantisation of training's master weights, and copying the latent cache into 64-token pages for MLA decode.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

import targets
from dsv3c.codegen.family import REQUIRED, VARIANTS, KernelSpec, Variant, load_families
from dsv3c.codegen.tiles import Tiles
from dsv3c.ops import RECORDS, Cost, NotLowered, record_of
from dsv3c.ops.record import Lowering, define

__all__ = ["SPECS", "CallSpec", "KernelSpec", "Tiles", "aot_specs", "call_spec", "get_spec", "kernel_call",
           "kernel_call_op", "kernel_entry", "kernel_uses", "lowered_ops", "lowering_of", "register_specs", "run_call",
           "run_op", "specialise", "unlowered_reasons"]


# ---- call specialisations and the kernel-call op -----------------------------------------------------


@dataclass(frozen=True)
class CallSpec:
    """One shape specialisation of a dsv3 op: what a kernel_call node with this id computes and launches."""

    id: str
    op: str
    attrs: tuple  # ((name, value), ...) the op's non-tensor arguments
    inputs: tuple  # ((shape, dtype), ...) of the tensor arguments, in order
    outputs: tuple  # ((shape, dtype), ...) of the results
    kernels: tuple  # KernelSpecs the runner launches (in launch order, each once)
    torch_parts: tuple = ()  # steps of the op run as torch, not Triton

    def attr(self, name: str):
        return dict(self.attrs)[name]

    def to_json(self) -> dict:
        """A JSON form that `from_json` rebuilds (lowered-program artifacts)."""
        spec = lambda specs: [[list(shape), str(dtype).replace("torch.", "")] for shape, dtype in specs]  # noqa: E731
        return {"id": self.id, "op": self.op, "attrs": [[n, _attr_json(v)] for n, v in self.attrs],
                "inputs": spec(self.inputs), "outputs": spec(self.outputs),
                "kernels": [k.to_json() for k in self.kernels], "torch_parts": list(self.torch_parts)}

    @classmethod
    def from_json(cls, d: dict) -> "CallSpec":
        spec = lambda specs: tuple((tuple(s), getattr(torch, dt)) for s, dt in specs)  # noqa: E731
        return cls(d["id"], d["op"], tuple((n, _attr_from_json(v)) for n, v in d["attrs"]), spec(d["inputs"]),
                   spec(d["outputs"]), tuple(KernelSpec.from_json(k) for k in d["kernels"]), tuple(d["torch_parts"]))

    def check(self, args) -> None:
        """Raise ValueError unless args have the shapes and dtypes this specialisation was made for."""
        got = tuple((tuple(a.shape), a.dtype) for a in args)
        if got != self.inputs:
            raise ValueError(f"kernel_call {self.id}: specialised for {self.inputs}, called with {got}")


SPECS: dict[str, CallSpec] = {}


def _attr_json(value):
    """A call attribute as JSON (dtypes as {'dtype': name})."""
    return {"dtype": str(value).replace("torch.", "")} if isinstance(value, torch.dtype) else value


def _attr_from_json(value):
    """The call attribute of its JSON form."""
    return getattr(torch, value["dtype"]) if isinstance(value, dict) else value


def register_specs(specs) -> None:
    """Make specialisations loaded from an artifact callable by kernel_call in this process."""
    for spec in specs:
        SPECS.setdefault(spec.id, spec)


def get_spec(spec_id: str) -> CallSpec:
    """The registered CallSpec of an id (made by lowering in this process)."""
    try:
        return SPECS[spec_id]
    except KeyError:
        raise KeyError(f"unknown kernel specialisation {spec_id!r}; lower the graph in this process") from None


@torch.library.custom_op("dsv3::kernel_call", mutates_args=())
def kernel_call(spec: str, args: list[Tensor]) -> list[Tensor]:
    """Run specialisation `spec` (a lowered dsv3 op) on args with its Triton kernels."""
    call = get_spec(spec)
    call.check(args)
    with torch.no_grad():
        outs = lowering_of(call.op).resolve("runner")(call, *args)
    for o, (shape, dtype) in zip(outs, call.outputs, strict=True):
        assert tuple(o.shape) == shape and o.dtype == dtype, (call.id, o.shape, o.dtype, shape, dtype)
    return [o.contiguous() for o in outs]


@kernel_call.register_fake
def _(spec, args):
    call = get_spec(spec)
    call.check(args)
    device = args[0].device if args else "meta"
    return [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in call.outputs]


def kernel_call_cost(spec, args, out) -> Cost:
    """The cost of the op the specialisation lowers, at the specialisation's shapes."""
    call = get_spec(spec)
    values = iter(args)
    attrs = dict(call.attrs)
    schema = getattr(torch.ops.dsv3, call.op).default._schema
    full = [attrs[a.name] if a.name in attrs else next(values) for a in schema.arguments]
    return record_of(call.op).cost(*full, out if len(out) > 1 else out[0])


define(kernel_call, cost=kernel_call_cost, stage="lower_triton",
       lowering=NotLowered("is the lowered form: a Triton kernel launch"))


def lowered_ops(always: bool = False) -> frozenset:
    """The dsv3 ops lower_triton replaces by kernel calls (with always, only those it replaces whatever their attributes)."""
    return frozenset(name for name, r in RECORDS.items() if r.lowered and not (always and r.lowering.partial))


def unlowered_reasons() -> dict:
    """The dsv3 ops that stay torch ops after lowering, with the reason (the kernel call itself excluded)."""
    out = {n: r.lowering.reason for n, r in RECORDS.items() if not r.lowered and n != "kernel_call"}
    out.update({n: r.lowering.partial for n, r in RECORDS.items() if r.lowered and r.lowering.partial})
    return out


def _variant(op: str) -> Variant | None:
    """The kernel variant named op, or None for a dsv3 op (or an unknown name)."""
    if op in RECORDS:
        return None
    load_families()
    return VARIANTS.get(op)


def lowering_of(op: str) -> Lowering:
    """The builder/runner pair of a dsv3 op (its record) or of a kernel variant (`family.VARIANTS`)."""
    variant = _variant(op)
    if variant is not None:
        return variant.lowering
    lowering = record_of(op).lowering
    if not isinstance(lowering, Lowering):
        raise ValueError(f"dsv3 op {op!r} has no kernels: {lowering.reason}")
    return lowering


def specialise(op: str, ins: tuple, outs: tuple, attrs: tuple, tiles: Tiles) -> CallSpec | None:
    """The CallSpec of op at these input/output specs and attrs, registered under its content-hash id (None when
    the builder has no kernel for these attributes)."""
    built = lowering_of(op).resolve("builder")(ins, outs, dict(attrs), tiles)
    if built is None:
        return None
    kernels, torch_parts = built
    material = repr((op, ins, outs, attrs, tiles.key(), kernels))
    spec_id = f"{op}_{hashlib.sha1(material.encode()).hexdigest()[:12]}"
    if spec_id not in SPECS:
        SPECS[spec_id] = CallSpec(spec_id, op, attrs, ins, outs, tuple(kernels), tuple(torch_parts))
    return SPECS[spec_id]


# ---- entry points: an op (or kernel variant) on tensors, or its AOT specs, the way lowering does it ----------

DEFAULT_TARGET = "h800x2048"


def _normalised_attrs(op: str, n_tensors: int, attrs: dict) -> tuple:
    """((name, value), ...) of op's non-tensor arguments in schema order, defaults filled in (as lower_triton)."""
    variant = _variant(op)
    if variant is not None:
        names, arity = variant.attrs, None
    else:
        schema = getattr(torch.ops.dsv3, op).default._schema
        names = {a.name: (a.default_value if a.has_default_value() else REQUIRED)
                 for a in schema.arguments if str(a.type) != "Tensor"}
        arity = sum(str(a.type) == "Tensor" for a in schema.arguments)
    if arity is not None and n_tensors != arity:
        raise TypeError(f"{op}: takes {arity} tensors, got {n_tensors}")
    unknown = set(attrs) - set(names)
    missing = [n for n, d in names.items() if d is REQUIRED and n not in attrs]
    if unknown or missing:
        raise TypeError(f"{op}: unknown attributes {sorted(unknown)}, missing {missing} (takes {list(names)})")
    return tuple((n, attrs.get(n, d)) for n, d in names.items())


def _output_specs(op: str, ins: tuple, attrs: tuple) -> tuple:
    """((shape, dtype), ...) of op's results at these inputs, from its fake impl on meta tensors (() for variants)."""
    if _variant(op) is not None:
        return ()
    schema = getattr(torch.ops.dsv3, op).default._schema
    metas = iter(torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in ins)
    named = dict(attrs)
    args = [named[a.name] if a.name in named else next(metas) for a in schema.arguments]
    out = getattr(torch.ops.dsv3, op).default(*args)
    return tuple((tuple(o.shape), o.dtype) for o in (out if isinstance(out, (tuple, list)) else (out,)))


def call_spec(op: str, *inputs, target=DEFAULT_TARGET, mode: str = "prefill", tiles: dict | None = None,
              **attrs) -> CallSpec:
    """The CallSpec lowering makes for op (a dsv3 op or a kernel variant) at these inputs: tensors or
    (shape, dtype) pairs, then the op's non-tensor arguments by name. `target` is a target name (or Target,
    or None for a bare H800), `tiles` overrides the target's tile table per family (see `Tiles`)."""
    ins = tuple((tuple(x.shape), x.dtype) if isinstance(x, Tensor) else (tuple(x[0]), x[1]) for x in inputs)
    full = _normalised_attrs(op, len(ins), attrs)
    tgt = targets.get_target(target) if target is not None else None
    return specialise(op, ins, _output_specs(op, ins, full), full, Tiles(tgt, mode, tiles))


def run_call(call: CallSpec, *tensors: Tensor):
    """Run a CallSpec's kernels on tensors through its runner: one tensor, or a tuple for several results."""
    call.check(tensors)
    with torch.no_grad():
        outs = lowering_of(call.op).resolve("runner")(call, *tensors)
    for o, (shape, dtype) in zip(outs, call.outputs):
        assert tuple(o.shape) == shape and o.dtype == dtype, (call.id, o.shape, o.dtype, shape, dtype)
    return outs[0] if len(outs) == 1 else tuple(outs)


def run_op(op: str, *tensors: Tensor, target=DEFAULT_TARGET, mode: str = "prefill", tiles: dict | None = None,
           **attrs):
    """op on tensors as its lowered kernel_call runs it: specialised for the tensors' shapes and dtypes on
    target/mode (tile overrides `tiles`), then its runner's Triton kernels (interpreted on CPU).

        run_op("rms_norm", x, w, eps=1e-6)
        run_op("fp8_gemm", xq, xs, wq, ws, out_dtype=torch.bfloat16, tiles={"fp8_gemm": {"BLOCK_M": 64}})
    """
    return run_call(call_spec(op, *tensors, target=target, mode=mode, tiles=tiles, **attrs), *tensors)


def aot_specs(op: str, inputs, attrs: dict | None = None, target=DEFAULT_TARGET, mode: str = "prefill",
              tiles: dict | None = None) -> list:
    """The AOTSpecs (`KernelSpec.aot`, what kernel_build compiles) of op's kernels at inputs [(shape, dtype), ...]."""
    call = call_spec(op, *inputs, target=target, mode=mode, tiles=tiles, **(attrs or {}))
    return [k.aot() for k in call.kernels]


def kernel_call_op():
    """The kernel_call overload nodes call."""
    return torch.ops.dsv3.kernel_call.default


def kernel_uses(specs_with_counts) -> dict[KernelSpec, dict]:
    """Distinct KernelSpecs over (CallSpec, node count) pairs: the dsv3 ops each serves and its launch count."""
    uses: dict[KernelSpec, dict] = {}
    for spec, count in specs_with_counts:
        for k in spec.kernels:
            u = uses.setdefault(k, {"ops": set(), "calls": 0})
            u["ops"].add(spec.op)
            u["calls"] += count
    return uses


def kernel_entry(k: KernelSpec, use: dict, record: dict | None, rel_dir: str) -> dict:
    """The plan.json entry of one kernel specialisation (its compiled record, when compiled)."""
    entry = {
        "name": k.name, "kernel": k.kernel.split(":")[1], "op": ",".join(sorted(use["ops"])),
        "shapes": dict(k.shapes), "calls": use["calls"], "grid": list(k.grid),
        "constexprs": {n: v for n, v in k.constexprs if n != "EXACT"},
    }  # fmt: skip
    if record is not None:
        entry.update(arch=record["arch"], num_warps=record["num_warps"], num_stages=record["num_stages"],
                     shared_bytes=record["shared_bytes"],
                     files={ext: f"{rel_dir}/{f}" for ext, f in sorted(record["files"].items())})
    else:
        entry.update(arch=None, num_warps=k.num_warps, num_stages=k.num_stages, shared_bytes=None, files={})
    return entry
