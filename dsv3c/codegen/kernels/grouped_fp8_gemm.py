"""Grouped block-scaled FP8 GEMM of the routed experts (the `dsv3c.ops.fp8.grouped_fp8_gemm` op) as a Triton kernel.

Tokens are sorted by expert: rows offsets[e]:offsets[e+1] of x [T, K] (e4m3, 1x128 scales
[T, ceil(K/128)]) go through expert e's weight w[e] [N, K] (e4m3, 128x128 scales [E, ceil(N/128),
ceil(K/128)]); y [T, N] bf16. Each expert's rows are cut into BLOCK_M-row tiles; program
(t, j) finds the expert of its M tile t from the offsets (a prefix sum of per-expert tile counts,
computed in-kernel, so the launch needs no host sync of the counts) and computes one
BLOCK_M x BLOCK_N tile with BLOCK_K = 128, promoting each 128-K dot to FP32 like `fp8_gemm`.
The grid's M extent, cdiv(T, BLOCK_M) + min(E, T), bounds the tile count; spare programs do no work.

After the @triton.jit code: the family's tile table, its KernelSpec builders (`k_*`), and the builder and
runner of each op lowered to it (`dsv3c.codegen.family` says what each is), with their imports, so that
editing the host side moves no kernel (Triton's cache key holds a kernel's first line number).
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


# ---- host side: the routed experts (MoE and EP) on grouped FP8 GEMMs ---------------------------------------

import torch
from torch import Tensor

from dsv3c.codegen.family import GEMM_MIN_M, KernelSpec, cdiv, clamp_block, kspec, p2, variant
from dsv3c.codegen.kernels.act_quant import k_act_quant, run_act_quant_rows
from dsv3c.codegen.kernels.fp8_gemm import GEMM_BY_MODE, gemm_shared_bytes
from dsv3c.codegen.kernels.swiglu import k_swiglu_quant, run_swiglu_quant_rows
from dsv3c.codegen.tiles import TileTable, Tiles, hopper
from dsv3c.ops import fp8

TILES = TileTable("grouped_fp8_gemm", hopper(GEMM_BY_MODE), gemm_shared_bytes)


def k_grouped(t: int, e: int, n: int, k: int, tiles: Tiles) -> KernelSpec:
    """Grouped FP8 GEMM of t expert-sorted rows [t, k] over e experts' [n, k] weights."""
    cfg = tiles(TILES)
    bm = clamp_block(cfg["BLOCK_M"], max(1, t // max(e, 1)), GEMM_MIN_M)  # rows per expert on average
    bn = clamp_block(cfg["BLOCK_N"], n)
    ptrs = {"a_ptr": fp8.FP8, "as_ptr": torch.float32, "b_ptr": fp8.FP8, "bs_ptr": torch.float32,
            "c_ptr": torch.bfloat16, "offsets_ptr": torch.int32}
    return kspec(f"{__name__}:grouped_fp8_gemm_kernel", ptrs=ptrs, ints={"N": n, "K": k, "E": e},
                 consts={"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": cfg["BLOCK_K"], "E_POW2": p2(e), "EXACT": False},
                 cfg=cfg, grid=(cdiv(t, bm) + min(e, t), cdiv(n, bn)), shapes={"T": t, "E": e, "N": n, "K": k},
                 tag=f"grouped_fp8_gemm_{t}x{e}x{n}x{k}")


def _grouped(k: KernelSpec, aq, a_s, wq, ws, offsets) -> Tensor:
    """BF16 rows of the grouped GEMM k: aq rows offsets[e]:offsets[e+1] times expert e's weight."""
    c = torch.zeros(aq.shape[0], wq.shape[1], dtype=torch.bfloat16, device=aq.device)
    if c.numel() and aq.shape[1]:
        k.launch(a_ptr=aq, as_ptr=a_s, b_ptr=wq.contiguous(), bs_ptr=ws.contiguous(), c_ptr=c, offsets_ptr=offsets)
    return c


def _moe_kernels(t: int, k: int, e: int, f: int, d: int, dt, tiles):
    """Quantise the t·k routed rows, grouped gate/up GEMM, SwiGLU + quantise, grouped down GEMM."""
    tk = t * k
    return (k_act_quant(tk, d, dt, False, tiles), k_grouped(tk, e, f, d, tiles), k_swiglu_quant(tk, f, dt, tiles),
            k_grouped(tk, e, d, f, tiles))


def _expert_ffn(kernels, x_rows, offsets, packed, dtype) -> Tensor:
    """Per-row expert FFN outputs (BF16) of expert-sorted rows x_rows on the grouped FP8 GEMMs."""
    kq, kgu, ksw, kd = kernels
    aq, a_s = run_act_quant_rows(kq, x_rows)
    (gq, gs), (uq, us), (dq, ds) = packed
    gate = _grouped(kgu, aq, a_s, gq, gs, offsets)
    up = _grouped(kgu, aq, a_s, uq, us, offsets)
    hq, hs = run_swiglu_quant_rows(ksw, gate.to(dtype), up.to(dtype))
    return _grouped(kd, hq, hs, dq, ds, offsets)


def _run_moe(call, x, ids, weights, packed):
    """Routed experts on grouped FP8 GEMMs: sort token copies by expert, gate/up, SwiGLU+quant, down, combine."""
    t, top_k = ids.shape
    e = packed[0][0].shape[0]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # torch part: token_sort
    offsets = torch.zeros(e + 1, dtype=torch.int32, device=x.device)
    offsets[1:] = torch.bincount(flat, minlength=e).cumsum(0).to(torch.int32)
    tokens = order // top_k
    y = _expert_ffn(call.kernels, x[tokens], offsets, packed, x.dtype)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # torch part: weighted_combine
    out.index_add_(0, tokens, y.float() * weights.reshape(-1)[order, None].float())
    return [out.to(x.dtype)]


def _run_routes(call, x, tok, slot, packed):
    """Per-route expert outputs: routes sorted by slot (padding, slot -1, last and left zero), grouped FP8 GEMMs."""
    s = packed[0][0].shape[0]
    key = torch.where(slot >= 0, slot, s)
    order = torch.argsort(key, stable=True)  # torch part: route_sort
    offsets = torch.zeros(s + 1, dtype=torch.int32, device=x.device)
    offsets[1:] = torch.bincount(key, minlength=s + 1)[:s].cumsum(0).to(torch.int32)
    src = torch.where(slot[order] >= 0, tok[order], 0)  # torch part: route_gather
    y = _expert_ffn(call.kernels, x[src], offsets, packed, x.dtype)
    out = torch.zeros(y.shape, dtype=torch.bfloat16, device=x.device)
    out[order] = y
    return [out]


def build_moe_experts_fp8(ins, outs, attrs, tiles):
    """moe_experts_fp8 over E4M3 stacked weights: the four routed-expert kernels."""
    (xs, xd), (ids, _), _, (gq, _), *_ = ins
    e, f, d = gq
    return _moe_kernels(xs[0], ids[1], e, f, d, xd, tiles), ("token_sort", "weighted_combine")


def run_moe_experts_fp8(call, x, ids, weights, gq, gs, uq, us, dq, ds):
    return _run_moe(call, x, ids, weights, ((gq, gs), (uq, us), (dq, ds)))


def build_moe_experts_fp8_train(ins, outs, attrs, tiles):
    """moe_experts_fp8_train: as moe_experts_fp8, the master weights quantised in torch first."""
    (xs, xd), (ids, _), _, (wg, _), *_ = ins
    e, f, d = wg
    return _moe_kernels(xs[0], ids[1], e, f, d, xd, tiles), ("weight_quant", "token_sort", "weighted_combine")


def run_moe_experts_fp8_train(call, x, ids, weights, w_gate, w_up, w_down):
    packed = tuple(fp8.weight_quant(w) for w in (w_gate, w_up, w_down))  # torch part: weight_quant
    return _run_moe(call, x, ids, weights, packed)


def build_ep_experts(ins, outs, attrs, tiles):
    """The received routes' experts on the grouped FP8 GEMMs (one route per row); None unless the GEMMs are FP8."""
    if not attrs["fp8_gemms"]:
        return None  # BF16 expert GEMMs: no kernel (as moe_experts), the op stays
    (xs, xd), (tok, _), _, (wg, _), *_ = ins
    s, f, d = wg
    return _moe_kernels(tok[0], 1, s, f, d, xd, tiles), ("weight_quant", "route_sort", "route_gather")


def run_ep_experts(call, recv_x, recv_tok, recv_slot, w_gate, w_up, w_down):
    packed = tuple(fp8.weight_quant(w) for w in (w_gate, w_up, w_down))  # torch part: weight_quant
    return _run_routes(call, recv_x, recv_tok, recv_slot, packed)


def build_ep_experts_fp8(ins, outs, attrs, tiles):
    """As build_ep_experts over E4M3 local weights."""
    (xs, xd), (tok, _), _, (gq, _), *_ = ins
    s, f, d = gq
    return _moe_kernels(tok[0], 1, s, f, d, xd, tiles), ("route_sort", "route_gather")


def run_ep_experts_fp8(call, recv_x, recv_tok, recv_slot, gq, gs, uq, us, dq, ds):
    return _run_routes(call, recv_x, recv_tok, recv_slot, ((gq, gs), (uq, us), (dq, ds)))


def build_grouped_fp8_gemm(ins, outs, attrs, tiles):
    """Grouped FP8 GEMM of expert-sorted rows: a [T, K] e4m3, scales, w [E, N, K] e4m3, scales, offsets [E+1]."""
    (as_, _), _, (ws, _), _, _ = ins
    return (k_grouped(as_[0], ws[0], ws[1], as_[1], tiles),), ()


def run_grouped_fp8_gemm(call, aq, a_s, wq, ws, offsets):
    (k,) = call.kernels
    return [_grouped(k, aq.contiguous(), a_s.contiguous(), wq, ws, offsets.to(torch.int32).contiguous())]


variant(__name__, "grouped_fp8_gemm")
