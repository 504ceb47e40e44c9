"""Block-scaled FP8 GEMM y = x·wᵀ (the `dsv3c.ops.fp8.fp8_gemm` op) as a Triton kernel.

x [M, K] e4m3 with 1x128 scales [M, ceil(K/128)], w [N, K] e4m3 with 128x128 scales
[ceil(N/128), ceil(K/128)], y [M, N] bf16. Tile BLOCK_M x BLOCK_N (64 or 128 x 128), BLOCK_K =
128: every K-iteration's tl.dot (4 WGMMAs of k32 on Hopper, accumulated in the tensor core's limited
precision) is multiplied by x_scale ⊗ w_scale and added to an FP32 register accumulator; that
is the promotion to FP32 every 128 elements of K. Ragged M, N, K are masked (zero-padded).

Under the interpreter (constexpr EXACT) the FP32 result is rounded to nearest-even bf16 in
float32 before the cast, because the interpreter truncates float32 -> bfloat16.

After the @triton.jit code: the family's tile table, its KernelSpec builders (`k_*`), and the builder and
runner of each op lowered to it (`dsv3c.codegen.family` says what each is), with their imports, so that
editing the host side moves no kernel (Triton's cache key holds a kernel's first line number).
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


# ---- host side ------------------------------------------------------------------------------------------

import torch
from torch import Tensor

from dsv3c.codegen.family import GEMM_MIN_M, KernelSpec, cdiv, clamp_block, kspec, row_count
from dsv3c.codegen.kernels.act_quant import k_act_quant, run_act_quant_rows
from dsv3c.codegen.tiles import TileTable, Tiles, hopper
from dsv3c.ops import fp8

# BLOCK_K = 128: one K block is one promotion interval (FP32 accumulation on CUDA cores every 128 elements
# of K) and one 1x128 activation / 128x128 weight scale group. Decode's few rows take 64-row tiles.
GEMM_BIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
GEMM_SMALL = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
GEMM_BY_MODE = {"train": GEMM_BIG, "prefill": GEMM_BIG, "decode": GEMM_SMALL}


def gemm_shared_bytes(c: dict) -> int:
    """Pipelined fp8 A and B tiles, fp32 scales of the A rows and the B block."""
    return c["num_stages"] * (c["BLOCK_M"] * c["BLOCK_K"] + c["BLOCK_N"] * c["BLOCK_K"] + 4 * c["BLOCK_M"] + 4)


TILES = TileTable("fp8_gemm", hopper(GEMM_BY_MODE), gemm_shared_bytes)


def k_fp8_gemm(m: int, n: int, k: int, tiles: Tiles) -> KernelSpec:
    """Block-scaled FP8 GEMM [m, k] x [n, k]ᵀ with BF16 output."""
    cfg = tiles(TILES)
    bm, bn = clamp_block(cfg["BLOCK_M"], m, GEMM_MIN_M), clamp_block(cfg["BLOCK_N"], n)
    ptrs = {"a_ptr": fp8.FP8, "as_ptr": torch.float32, "b_ptr": fp8.FP8, "bs_ptr": torch.float32,
            "c_ptr": torch.bfloat16}
    return kspec(f"{__name__}:fp8_gemm_kernel", ptrs=ptrs, ints={"M": m, "N": n, "K": k},
                 consts={"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": cfg["BLOCK_K"], "EXACT": False}, cfg=cfg,
                 grid=(cdiv(m, bm), cdiv(n, bn)), shapes={"M": m, "N": n, "K": k}, tag=f"fp8_gemm_{m}x{n}x{k}")


def _run_gemm_rows(kg: KernelSpec, a: Tensor, a_s: Tensor, wq: Tensor, ws: Tensor) -> Tensor:
    """BF16 a·wqᵀ of E4M3 rows a [m, k] (scales a_s) and weight wq [n, k] (block scales ws) by kernel kg."""
    m, n = a.shape[0], wq.shape[0]
    c = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    if m and n:
        kg.launch(a_ptr=a.contiguous(), as_ptr=a_s.contiguous(), b_ptr=wq.contiguous(), bs_ptr=ws.contiguous(),
                  c_ptr=c)
    return c


def build_fp8_gemm(ins, outs, attrs, tiles):
    """fp8_gemm(xq, xs, wq, ws, out_dtype): one FP8 GEMM kernel."""
    (xs, _), _, (ws, _), _ = ins
    return (k_fp8_gemm(row_count(xs), ws[0], xs[-1], tiles),), ()


def run_fp8_gemm(call, xq, xs, wq, ws):
    (k,) = call.kernels
    y = _run_gemm_rows(k, xq.reshape(-1, xq.shape[-1]), xs.reshape(-1, xs.shape[-1]), wq, ws)
    return [y.to(call.attr("out_dtype")).reshape(*xq.shape[:-1], wq.shape[0])]


def build_fp8_linear(ins, outs, attrs, tiles):
    """fp8_linear(x, w): activation quantisation, then the FP8 GEMM; the weight is quantised in torch."""
    (xs, xd), (ws, _) = ins
    m, k = row_count(xs), xs[-1]
    return (k_act_quant(m, k, xd, False, tiles), k_fp8_gemm(m, ws[0], k, tiles)), ("weight_quant",)


def run_fp8_linear(call, x, w):
    kq, kg = call.kernels
    xq, xs = run_act_quant_rows(kq, x.reshape(-1, x.shape[-1]))
    wq, ws = fp8.weight_quant(w)  # torch part: 128x128 block quantisation of the master weight
    y = _run_gemm_rows(kg, xq, xs, wq, ws)
    return [y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])]
