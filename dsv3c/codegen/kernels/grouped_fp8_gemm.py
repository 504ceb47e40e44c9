"""Grouped block-scaled FP8 GEMM of the routed experts (the `dsv3c.ops.fp8.grouped_fp8_gemm` op) as a Triton kernel.

Tokens are sorted by expert: rows offsets[e]:offsets[e+1] of x [T, K] (e4m3, 1x128 scales
[T, ceil(K/128)]) go through expert e's weight w[e] [N, K] (e4m3, 128x128 scales [E, ceil(N/128),
ceil(K/128)]); y [T, N] bf16. Each expert's rows are cut into BLOCK_M-row tiles; program
(t, j) finds the expert of its M tile t from the offsets (a prefix sum of per-expert tile counts,
computed in-kernel, so the launch needs no host sync of the counts) and computes one
BLOCK_M x BLOCK_N tile with BLOCK_K = 128, promoting each 128-K dot to FP32 like `fp8_gemm`.
The grid's M extent, cdiv(T, BLOCK_M) + min(E, T), bounds the tile count; spare programs do no work.

Only the @triton.jit code lives here. Block sizes, grids, launch options and host tensors come from the
code generator: its builder (`dsv3c.codegen.lowering`) makes the KernelSpecs, `KernelSpec.launch` runs
them, `KernelSpec.aot` gives their AOTSpecs; `lowering.run_op` / `lowering.aot_specs` do it for one op.
"""

import triton
import triton.language as tl

from dsv3c.codegen.kernels.fp8_gemm import block_scaled_dot, store_bf16


@triton.jit
def grouped_fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, offsets_ptr, N, K, E, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr,
                            EXACT: tl.constexpr):
    """One BLOCK_M x BLOCK_N tile of c[rows of e] = (a ⊙ a_s)[rows of e]·(b[e] ⊙ b_s[e])ᵀ; e from offsets."""
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.arange(0, E_POW2)
    lo = tl.load(offsets_ptr + e, mask=e < E, other=0)
    hi = tl.load(offsets_ptr + e + 1, mask=e < E, other=0)
    ntiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(ntiles, 0)
    expert = tl.sum((tiles_end <= tile).to(tl.int32), 0)  # the first expert whose tiles reach past `tile`
    mine = e == expert
    row0 = tl.sum(tl.where(mine, lo + (tile - (tiles_end - ntiles)) * BLOCK_M, 0), 0)
    row_end = tl.sum(tl.where(mine, hi, 0), 0)
    nkb = tl.cdiv(K, BLOCK_K)
    k_iters = tl.where(expert < E, nkb, 0)  # spare programs (tile past the last expert's) skip the loop

    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < row_end  # row_end is 0 for a spare program
    mask_n = offs_n < N
    ex = tl.minimum(expert, E - 1).to(tl.int64)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    b_ptrs = b_ptr + ex * N * K + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    as_ptrs = as_ptr + offs_m.to(tl.int64) * nkb
    bs_ptrs = bs_ptr + (ex * tl.cdiv(N, BLOCK_K) + offs_n // BLOCK_K) * nkb
    acc = block_scaled_dot(a_ptrs, as_ptrs, b_ptrs, bs_ptrs, mask_m, mask_n, K, k_iters, BLOCK_M, BLOCK_N, BLOCK_K)
    store_bf16(c_ptr, acc, offs_m, offs_n, mask_m, mask_n, N, EXACT)
