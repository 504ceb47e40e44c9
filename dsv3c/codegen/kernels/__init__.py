"""Triton kernels of dsv3c: one module per kernel family, @triton.jit code only.

How a kernel is specialised, launched and compiled is the code generator's business, once for all kernels:
`dsv3c.codegen.lowering` builds each op's KernelSpecs from shapes, attributes and the target's tiles
(`KernelSpec.launch` runs one on tensors, `KernelSpec.aot` gives its AOTSpec), and its entry points
`run_op(op, *tensors, target=..., mode=..., tiles=..., **attrs)` and `aot_specs(op, inputs, attrs, ...)`
serve tests and benches. There are no per-module launch()/aot_spec() functions.
"""
