"""Code generation: kernel specialisations of the dsv3 ops, the Triton kernels and their ahead-of-time compiler."""
