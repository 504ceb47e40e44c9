"""lower_triton: every dsv3 compute op becomes a `dsv3.kernel_call` specialised by shape; kernels compiled AOT.

Each op node (rms_norm, rope, swiglu, moe_gate, act_quant, fp8_gemm, fp8_linear, moe_experts_fp8,
moe_experts_fp8_train, latent_attention, mla_attention) is replaced by one kernel_call node whose
specialisation (dsv3c.codegen.lowering.CallSpec) fixes its shapes and dtypes and lists the Triton kernels it launches,
with tile configs from targets.tile_config(gpu, family, mode) (and the target's compute SMs for MLA decode's
split count). Specialisations are memoised by (op, input shapes/dtypes, attributes), so the 61 identical
layers of the 671B model cost one specialisation each. Ops without a kernel stay (dsv3c.codegen.lowering.NO_KERNEL:
the BF16 `moe_experts`, which fp8_quant removes) and are counted under stats['unlowered'].

With an output directory (options['out'], set by the driver to its staging dir) and options['aot'] not
False, every distinct kernel is compiled for sm_90a into <out>/kernels/ through the on-disk cache
(options['kernel_cache'], $DSV3C_CACHE_DIR or ~/.cache/dsv3c/kernels), and program.meta['kernels'] becomes
plan.json's "kernels" list, sorted by name.
"""

import sys
from collections import Counter, defaultdict
from pathlib import Path

from dsv3c.ir import PassContext, Program
from dsv3c.codegen.lowering import LOWERED_OPS, NO_KERNEL, get_spec, kernel_call_op, kernel_entry, kernel_uses, lower_graph
from passes.registry import register

KERNEL_DIR = "kernels"


def _terminal_progress(done: int, total: int, name: str, seconds: float) -> None:
    """One line per kernel compiled, on a terminal only."""
    sys.stderr.write(f"\r\x1b[K  compiled kernel {done}/{total} {name} ({seconds:.1f}s)\n")
    sys.stderr.flush()


@register(
    "lower_triton",
    "replaces each dsv3 compute op by a dsv3.kernel_call specialised by shape (tiles from targets/, Triton "
    "kernels run by the executor); compiles each distinct kernel for sm_90a into <out>/kernels/",
    adds=["kernel_call"],
    removes=sorted(LOWERED_OPS),
    # the other passes work on the dsv3 ops lowering replaces; only dce (op-agnostic) may follow it
    invalidates=["mla_fuse", "fp8_quant", "cost", "lower_triton"],
)
def lower_triton(program: Program, ctx: PassContext):
    """Lower the graph to kernel calls, then (with an output directory) compile the kernels ahead of time."""
    lowered = lower_graph(program, ctx.target, ctx.mode)
    target_op = kernel_call_op()
    calls = Counter(n.args[0] for n in program.graph.nodes if n.op == "call_function" and n.target is target_op)
    specs = [(get_spec(i), c) for i, c in sorted(calls.items())]
    uses = kernel_uses(specs)
    kernels = sorted(uses, key=lambda k: k.name)
    records = {}
    out = ctx.options.get("out")
    if out and ctx.options.get("aot", True):
        from dsv3c.codegen.kernel_build import compile_kernels  # late: it starts worker processes only when asked

        progress = ctx.options.get("kernel_progress") or (_terminal_progress if sys.stderr.isatty() else None)
        records = compile_kernels(kernels, Path(out) / KERNEL_DIR, ctx.options.get("kernel_cache"),
                                  ctx.options.get("jobs"), progress)
    entries = [kernel_entry(k, uses[k], records.get(k), KERNEL_DIR) for k in kernels]
    program.meta["kernels"] = entries
    torch_parts = defaultdict(set)
    for spec, _ in specs:
        torch_parts[spec.op].update(spec.torch_parts)
    stats = {
        "kernel_calls": sum(calls.values()),
        "specialisations": len(calls),
        "kernels": len(kernels),
        "by_op": dict(sorted(lowered["by_op"].items())),
        "unlowered": {op: {"nodes": n, "why": NO_KERNEL.get(op, "no kernel")}
                      for op, n in sorted(lowered["unlowered"].items())},
        "torch_parts": {op: sorted(p) for op, p in sorted(torch_parts.items()) if p},
    }
    if records:
        stats["compiled_files"] = len({e["files"]["cubin"] for e in entries})
        stats["arch"] = sorted({e["arch"] for e in entries})
    return program, stats
