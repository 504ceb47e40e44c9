"""Triton kernels of dsv3c: one module per kernel family, each with launch() and aot_spec()."""
