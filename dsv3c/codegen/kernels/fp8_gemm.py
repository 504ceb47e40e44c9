"""Block-scaled FP8 GEMM y = x·wᵀ (the `dsv3c.ops.fp8.fp8_gemm` op) as a Triton kernel.

x [M, K] e4m3 with 1x128 scales [M, ceil(K/128)], w [N, K] e4m3 with 128x128 scales
[ceil(N/128), ceil(K/128)], y [M, N] bf16. Tile BLOCK_M x BLOCK_N (64 or 128 x 128), BLOCK_K =
128: every K-iteration's tl.dot (4 WGMMAs of k32 on Hopper, accumulated in the tensor core's limited
precision) is multiplied by x_scale ⊗ w_scale and added to an FP32 register accumulator; that
is the promotion to FP32 every 128 elements of K. Ragged M, N, K are masked (zero-padded).

Under the interpreter (constexpr EXACT) the FP32 result is rounded to nearest-even bf16 in
float32 before the cast, because the interpreter truncates float32 -> bfloat16.

Only the @triton.jit code lives here. Block sizes, grids, launch options and host tensors come from the
code generator: its builder (`dsv3c.codegen.lowering`) makes the KernelSpecs, `KernelSpec.launch` runs
them, `KernelSpec.aot` gives their AOTSpecs; `lowering.run_op` / `lowering.aot_specs` do it for one op.
"""

import triton
import triton.language as tl

from dsv3c.codegen.kernels.common import round_bf16


@triton.jit
def block_scaled_dot(a_ptrs, as_ptrs, b_ptrs, bs_ptrs, mask_m, mask_n, K, k_iters, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """FP32 Σ over k_iters blocks of 128 K: (a_blk·b_blkᵀ) · a_s ⊗ b_s, one fresh tensor-core dot per block."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for kb in range(0, k_iters):
        mask_k = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        a_s = tl.load(as_ptrs + kb, mask=mask_m, other=0.0)
        b_s = tl.load(bs_ptrs + kb, mask=mask_n, other=0.0)
        # A fresh dot per 128 of K, scaled and added in FP32: the promotion out of the tensor core.
        acc += tl.dot(a, tl.trans(b)) * (a_s[:, None] * b_s[None, :])
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit
def store_bf16(c_ptr, acc, offs_m, offs_n, mask_m, mask_n, N, EXACT: tl.constexpr):
    """Store the FP32 tile acc into row-major c [*, N] as bfloat16 (pre-rounded under the interpreter)."""
    if EXACT:
        acc = round_bf16(acc)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(c_ptrs, acc.to(tl.bfloat16), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EXACT: tl.constexpr):
    """One BLOCK_M x BLOCK_N tile of c = (a ⊙ a_s)·(b ⊙ b_s)ᵀ; a scaled 1x128, b scaled in 128x128 blocks."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    nkb = tl.cdiv(K, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    as_ptrs = as_ptr + offs_m.to(tl.int64) * nkb
    bs_ptrs = bs_ptr + (offs_n // BLOCK_K) * nkb
    acc = block_scaled_dot(a_ptrs, as_ptrs, b_ptrs, bs_ptrs, mask_m, mask_n, K, nkb, BLOCK_M, BLOCK_N, BLOCK_K)
    store_bf16(c_ptr, acc, offs_m, offs_n, mask_m, mask_n, N, EXACT)
