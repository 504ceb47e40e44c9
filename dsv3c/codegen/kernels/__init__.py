"""Kernel families of dsv3c: one module per family, each holding its Triton kernels and everything host-side
about them: its tile table, its KernelSpec builders, and the builder and runner of each dsv3 op lowered to it
(the contract: `dsv3c.codegen.family`). `dsv3c.codegen.lowering` specialises and runs an op through the
builder and runner its record names; `family.load_families()` imports every module here.
"""
