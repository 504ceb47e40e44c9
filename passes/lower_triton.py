"""lower_triton: every dsv3 compute op becomes a `dsv3.kernel_call` specialised by shape; kernels compiled AOT.

Each op node (rms_norm, rope, swiglu, moe_gate, act_quant, fp8_gemm, fp8_linear, moe_experts_fp8,
moe_experts_fp8_train, latent_attention, mla_attention) is replaced by one kernel_call node whose
specialisation (dsv3c.codegen.lowering.CallSpec) fixes its shapes and dtypes and lists the Triton kernels it launches,
with tile configs from the kernel families' tables for the target's GPU and mode (dsv3c.codegen.tiles; and the
target's compute SMs for MLA decode's split count). Specialisations are memoised by (op, input shapes/dtypes, attributes), so the 61 identical
layers of the 671B model cost one specialisation each. Ops without a kernel stay (their records say why:
the BF16 `moe_experts`, which fp8_quant removes) and are counted under stats['unlowered'].

With an output directory (options['out'], set by the driver to its staging dir) and options['aot'] not
False, every distinct kernel is compiled for sm_90a into <out>/kernels/ through the on-disk cache
(options['kernel_cache'], $DSV3C_CACHE_DIR or ~/.cache/dsv3c/kernels), and plan.analyses.kernels becomes
plan.json's "kernels" list, sorted by name.
"""

import operator
import sys
from collections import Counter, defaultdict
from pathlib import Path

from torch import fx

from dsv3c.codegen.lowering import (SPECS, Tiles, get_spec, kernel_call_op, kernel_entry, kernel_uses, lowered_ops,
                                    specialise, unlowered_reasons)
from dsv3c.ir import Plan
from dsv3c.ops import op_name, record_of
from passes.registry import register

KERNEL_DIR = "kernels"


def _normalised(node: fx.Node):
    """(tensor arg nodes, non-tensor attrs as ((name, value), ...)) of a dsv3 op node, defaults filled in."""
    schema = node.target._schema
    tensors, attrs = [], []
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            value = node.args[i]
        elif arg.name in node.kwargs:
            value = node.kwargs[arg.name]
        else:
            value = arg.default_value
        if isinstance(value, fx.Node):
            tensors.append(value)
        else:
            attrs.append((arg.name, value))
    return tensors, tuple(attrs)


def _spec_of(val) -> tuple:
    return tuple(val.shape), val.dtype


_META_SKIP = ("val", "cost", "tensor_meta", "example_value")


def lower_graph(program, target, mode: str) -> dict:
    """Replace every lowerable dsv3 op node by a kernel_call node; returns the call specs used and counters."""
    graph = program.graph
    tiles = Tiles(target, mode)
    memo: dict = {}
    calls: Counter = Counter()
    by_op: Counter = Counter()
    unlowered: Counter = Counter()
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        name = op_name(node.target)
        if name is None or name == "kernel_call":
            continue
        if not record_of(name).lowered:
            unlowered[name] += 1
            continue
        tensors, attrs = _normalised(node)
        val = node.meta["val"]
        multi = isinstance(val, (tuple, list))
        outs = tuple(_spec_of(v) for v in (val if multi else (val,)))
        ins = tuple(_spec_of(t.meta["val"]) for t in tensors)
        key = (name, ins, attrs)
        if key not in memo:
            memo[key] = specialise(name, ins, outs, attrs, tiles)
        spec = memo[key]
        if spec is None:  # the builder has no kernel for these attributes: the op stays
            unlowered[name] += 1
            continue
        with graph.inserting_before(node):
            kc = graph.call_function(kernel_call_op(), (spec.id, list(tensors)))
            kc.meta.update({k: v for k, v in node.meta.items() if k not in _META_SKIP})
            kc.meta["val"] = list(val) if multi else [val]
            if multi:
                new = kc
            else:
                new = graph.call_function(operator.getitem, (kc, 0))
                new.meta.update({k: v for k, v in node.meta.items() if k not in _META_SKIP})
                new.meta["val"] = val
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        calls[spec.id] += 1
        by_op[name] += 1
    program.recompile()
    return {"calls": calls, "by_op": by_op, "unlowered": unlowered, "specs": [SPECS[i] for i in calls]}


def _terminal_progress(done: int, total: int, name: str, seconds: float) -> None:
    """One line per kernel compiled, on a terminal only."""
    sys.stderr.write(f"\r\x1b[K  compiled kernel {done}/{total} {name} ({seconds:.1f}s)\n")
    sys.stderr.flush()


@register(
    "lower_triton",
    "replaces each dsv3 compute op by a dsv3.kernel_call specialised by shape (tiles from the kernel families, Triton "
    "kernels run by the executor); compiles each distinct kernel for sm_90a into <out>/kernels/",
    removes=sorted(lowered_ops(always=True)),
    writes=["kernels", "call_specs"],
    # the other passes work on the dsv3 ops lowering replaces; only dce (op-agnostic) may follow it
    invalidates=["mla_fuse", "fp8_quant", "expert_partition", "cost", "pipeline_partition", "lower_triton"],
)
def lower_triton(plan: Plan, opts: dict):
    """Lower the graph to kernel calls, then (with an output directory) compile the kernels ahead of time."""
    program = plan.program
    lowered = lower_graph(program, plan.target, plan.mode)
    target_op = kernel_call_op()
    calls = Counter(n.args[0] for n in program.graph.nodes if n.op == "call_function" and n.target is target_op)
    specs = [(get_spec(i), c) for i, c in sorted(calls.items())]
    uses = kernel_uses(specs)
    kernels = sorted(uses, key=lambda k: k.name)
    records = {}
    out = plan.options.get("out")
    if out and plan.options.get("aot", True):
        from dsv3c.codegen.kernel_build import compile_kernels  # late: it starts worker processes only when asked

        progress = plan.options.get("kernel_progress") or (_terminal_progress if sys.stderr.isatty() else None)
        records = compile_kernels(kernels, Path(out) / KERNEL_DIR, plan.options.get("kernel_cache"),
                                  plan.options.get("jobs"), progress)
    entries = [kernel_entry(k, uses[k], records.get(k), KERNEL_DIR) for k in kernels]
    plan.analyses.kernels = entries
    plan.analyses.call_specs = [spec for spec, _ in specs]
    torch_parts = defaultdict(set)
    for spec, _ in specs:
        torch_parts[spec.op].update(spec.torch_parts)
    stats = {
        "kernel_calls": sum(calls.values()),
        "specialisations": len(calls),
        "kernels": len(kernels),
        "by_op": dict(sorted(lowered["by_op"].items())),
        "unlowered": {op: {"nodes": n, "why": unlowered_reasons().get(op, "no kernel")}
                      for op, n in sorted(lowered["unlowered"].items())},
        "torch_parts": {op: sorted(p) for op, p in sorted(torch_parts.items()) if p},
    }
    if records:
        stats["compiled_files"] = len({e["files"]["cubin"] for e in entries})
        stats["arch"] = sorted({e["arch"] for e in entries})
    return stats
