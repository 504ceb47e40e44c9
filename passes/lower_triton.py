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


def _normalised(node: fx.Node, args: tuple):
    """(tensor arg nodes, non-tensor attrs as ((name, value), ...)) of a dsv3 op node called with args, defaults filled in."""
    schema = node.target._schema
    tensors, attrs = [], []
    for i, arg in enumerate(schema.arguments):
        if i < len(args):
            value = args[i]
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
    """Replace every lowerable dsv3 op node by a kernel_call node; returns the call specs used and counters.

    In a program of blocks, a node whose constant arguments differ per instance is specialised per instance:
    an instance whose specialisation is not the block's calls its own (`program.blocks.args`)."""
    graph = program.graph
    tiles = Tiles(target, mode)
    memo: dict = {}
    by_op: Counter = Counter()
    unlowered: Counter = Counter()

    def spec_of(name: str, node: fx.Node, args: tuple, outs: tuple):
        """(tensor arguments, the memoised CallSpec or None) of op `name`'s node called with args."""
        tensors, attrs = _normalised(node, args)
        ins = tuple(_spec_of(t.meta["val"]) for t in tensors)
        key = (name, ins, attrs)
        if key not in memo:
            memo[key] = specialise(name, ins, outs, attrs, tiles)
        return tensors, memo[key]

    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        name = op_name(node.target)
        if name is None or name == "kernel_call":
            continue
        if not record_of(name).lowered:
            unlowered[name] += program.times(node)
            continue
        val = node.meta["val"]
        multi = isinstance(val, (tuple, list))
        outs = tuple(_spec_of(v) for v in (val if multi else (val,)))
        tensors, spec = spec_of(name, node, node.args, outs)
        blocks = program.blocks
        varied = [(i, spec_of(name, node, args, outs)[1]) for i, args in blocks.varied(node)] if blocks is not None else []
        if any((s is None) != (spec is None) for _, s in varied):
            raise ValueError(f"{node.name}: lowered in some instances of its block and not in others")
        if spec is None:  # the builder has no kernel for these attributes: the op stays
            unlowered[name] += program.times(node)
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
        for inst, s in varied:
            blocks.set_args(inst, node, node.args)  # the node goes; the kernel call varies instead
            blocks.set_args(inst, kc, (s.id, kc.args[1]))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        by_op[name] += program.times(kc)
    program.recompile()
    calls = kernel_call_counts(program)
    return {"calls": calls, "by_op": by_op, "unlowered": unlowered, "specs": [SPECS[i] for i in calls]}


def kernel_call_counts(program) -> Counter:
    """Kernel calls of the model by specialisation id (in a program of blocks, each instance's own)."""
    calls: Counter = Counter()
    target = kernel_call_op()
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target is target:
            varied = program.blocks.varied(node) if program.blocks is not None else []
            calls[node.args[0]] += program.times(node) - len(varied)
            for _, args in varied:
                calls[args[0]] += 1
    return calls


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
    calls = lowered["calls"]
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
