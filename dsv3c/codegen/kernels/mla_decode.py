"""MLA latent decode attention over a paged latent cache (absorbed MLA, one new token per sequence).

o_lat[b, h] = softmax_t((q_lat[b, h]·c_kv[t] + q_pe[b, h]·k_pe[t]) · scale) · c_kv[t] over t < seq_lens[b].

Cache layout: kv_cache [pages, PAGE=64, R + DR] (R = 512 c_kv values then DR = 64 k_pe values per token,
576 in all); block_table [B, max_blocks] int32 holds each sequence's page ids in order.

A program owns BLOCK_H query heads of one sequence and one split of its tokens: each BLOCK_N-token tile
of the one latent head is loaded once and used by all BLOCK_H heads, both as keys (q_lat·c_kvᵀ +
q_pe·k_peᵀ on tensor cores) and as values (p·c_kv). Softmax is online in FP32 (base 2). With more than
one split (flash-decoding, for few sequences x long contexts) each split writes its normalised partial
output and log-sum-exp, and a second kernel combines them.
"""

import math

import torch
import triton
import triton.language as tl

from dsv3c.codegen.kernels.common import TL_DTYPE, cast_out, interpreting, mma_operand

PAGE = 64
LOG2E = 1.4426950408889634


@triton.jit
def mla_decode_kernel(
    ql_ptr, qp_ptr, kv_ptr, bt_ptr, len_ptr, o_ptr, part_ptr, lse_ptr,
    H, sm_scale, sql_b, sql_h, sqp_b, sqp_h, s_page, s_tok, sbt_b, so_b, so_h,
    R: tl.constexpr, DR: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, EXACT: tl.constexpr,
):
    """One (sequence, head block, token split): online-softmax latent attention over the split's pages."""
    b = tl.program_id(0)
    pid_h = tl.program_id(1)
    split = tl.program_id(2)
    heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    r = tl.arange(0, R)
    dr = tl.arange(0, DR)
    b64 = b.to(tl.int64)
    q_lat = tl.load(ql_ptr + b64 * sql_b + heads[:, None] * sql_h + r[None, :], mask=hmask[:, None], other=0.0)
    q_pe = tl.load(qp_ptr + b64 * sqp_b + heads[:, None] * sqp_h + dr[None, :], mask=hmask[:, None], other=0.0)
    dt: tl.constexpr = kv_ptr.dtype.element_ty
    q_lat = mma_operand(q_lat, dt, EXACT)
    q_pe = mma_operand(q_pe, dt, EXACT)

    seq_len = tl.load(len_ptr + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), NUM_SPLITS) * BLOCK_N
    start = split * per_split
    end = tl.minimum(seq_len, start + per_split)
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x·log2 e)

    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, R), tl.float32)
    n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        page = tl.load(bt_ptr + b64 * sbt_b + n0 // PAGE_SIZE).to(tl.int64)
        rows = page * s_page + ((n0 % PAGE_SIZE) + n).to(tl.int64) * s_tok
        valid = (n0 + n) < end
        ckv = mma_operand(tl.load(kv_ptr + rows[:, None] + r[None, :], mask=valid[:, None], other=0.0), dt, EXACT)
        kpe = mma_operand(tl.load(kv_ptr + rows[:, None] + R + dr[None, :], mask=valid[:, None], other=0.0), dt,
                          EXACT)
        s = tl.dot(q_lat, tl.trans(ckv))
        s = tl.dot(q_pe, tl.trans(kpe), s)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(mma_operand(p, dt, EXACT), ckv, acc * alpha[:, None])
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        o = o_ptr + b64 * so_b + heads[:, None] * so_h + r[None, :]
        tl.store(o, cast_out(out, o_ptr.dtype.element_ty, EXACT), mask=hmask[:, None])
    else:
        row = (b64 * H + heads) * NUM_SPLITS + split  # partials [B, H, NUM_SPLITS, R], lse [B, H, NUM_SPLITS]
        tl.store(part_ptr + row[:, None] * R + r[None, :], out, mask=hmask[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row, lse, mask=hmask)


@triton.jit
def mla_combine_kernel(
    part_ptr, lse_ptr, o_ptr, H, so_b, so_h,
    R: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, EXACT: tl.constexpr,
):
    """o[b, h] = Σ_s 2^(lse_s − lse) · partial_s: merges the splits of one (sequence, head)."""
    bh = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    r = tl.arange(0, R)
    lse = tl.load(lse_ptr + bh * NUM_SPLITS + sp, mask=sp < NUM_SPLITS, other=float("-inf"))
    top = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # empty splits (lse = -inf) weigh 0
    total = tl.sum(w, axis=0)
    w = w / tl.where(total > 0, total, 1.0)
    part = tl.load(part_ptr + (bh * NUM_SPLITS + sp[:, None]) * R + r[None, :], mask=(sp < NUM_SPLITS)[:, None],
                   other=0.0)
    out = tl.sum(part * w[:, None], axis=0)
    tl.store(o_ptr + (bh // H) * so_b + (bh % H) * so_h + r, cast_out(out, o_ptr.dtype.element_ty, EXACT))


def default_splits(batch: int, heads: int, max_len: int, block_h: int, sms: int = 132) -> int:
    """Token splits per sequence: enough programs to fill about two waves of `sms`, ≥ 256 tokens a split."""
    programs = batch * triton.cdiv(heads, block_h)
    want = triton.cdiv(2 * sms, programs)
    return max(1, min(want, triton.cdiv(max_len, 256), 32))


def launch(
    q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, num_splits: int | None = None, block_h: int = 32, block_n: int = 32,
    num_warps: int = 8, num_stages: int = 2,
) -> torch.Tensor:
    """o_lat [B, H, R] for q_lat [B, H, R], q_pe [B, H, DR] against kv_cache [pages, 64, R + DR] (paged)."""
    bsz, h, rank = q_lat.shape
    dr = q_pe.shape[-1]
    pages, page_size, width = kv_cache.shape
    assert width == rank + dr and page_size % block_n == 0 and block_h >= 16 and block_n >= 16
    assert rank == triton.next_power_of_2(rank) and dr == triton.next_power_of_2(dr) and min(rank, dr) >= 16
    assert q_lat.stride(-1) == 1 and q_pe.stride(-1) == 1 and kv_cache.stride(-1) == 1
    if num_splits is None:
        num_splits = default_splits(bsz, h, block_table.shape[1] * page_size, block_h)
    o = torch.empty((bsz, h, rank), dtype=q_lat.dtype, device=q_lat.device)
    if num_splits > 1:
        part = torch.empty((bsz, h, num_splits, rank), dtype=torch.float32, device=q_lat.device)
        lse = torch.empty((bsz, h, num_splits), dtype=torch.float32, device=q_lat.device)
    else:
        part = lse = o  # unused
    bt = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    grid = (bsz, triton.cdiv(h, block_h), num_splits)
    mla_decode_kernel[grid](
        q_lat, q_pe, kv_cache, bt, seq_lens, o, part, lse, h, float(scale),
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), kv_cache.stride(0), kv_cache.stride(1),
        bt.stride(0), o.stride(0), o.stride(1),
        R=rank, DR=dr, PAGE_SIZE=page_size, BLOCK_H=block_h, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        EXACT=interpreting(), num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        mla_combine_kernel[(bsz * h,)](
            part, lse, o, h, o.stride(0), o.stride(1), R=rank, NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), EXACT=interpreting(), num_warps=4,
        )
    return o


def gather_pages(kv_cache: torch.Tensor, block_table: torch.Tensor, length: int, b: int) -> torch.Tensor:
    """Sequence b's first `length` cache rows [length, R + DR], gathered from its pages (for checks)."""
    page_size = kv_cache.shape[1]
    pages = block_table[b, : triton.cdiv(length, page_size)].long()
    return kv_cache[pages].reshape(-1, kv_cache.shape[-1])[:length]


def aot_spec(batch: int = 128, heads: int = 128, max_len: int = 4096, dtype: torch.dtype = torch.bfloat16,
             num_splits: int = 1, block_h: int = 32, block_n: int = 32, num_warps: int = 8, num_stages: int = 2,
             rank: int = 512, rope_dim: int = 64):
    """AOTSpec of the paged MLA decode kernel (the 671B latent shapes: 128 heads, 512 + 64) for one batch size."""
    from dsv3c.codegen.triton_aot import AOTSpec

    t = TL_DTYPE[dtype]
    sig = {"ql_ptr": f"*{t}", "qp_ptr": f"*{t}", "kv_ptr": f"*{t}", "bt_ptr": "*i32", "len_ptr": "*i32",
           "o_ptr": f"*{t}", "part_ptr": "*fp32", "lse_ptr": "*fp32", "H": "i32", "sm_scale": "fp32"}
    sig.update({k: "i32" for k in ("sql_b", "sql_h", "sqp_b", "sqp_h", "s_page", "s_tok", "sbt_b", "so_b", "so_h")})
    consts = dict(R=rank, DR=rope_dim, PAGE_SIZE=PAGE, BLOCK_H=block_h, BLOCK_N=block_n, NUM_SPLITS=num_splits,
                  EXACT=False)
    div16 = tuple(a for a in sig if a.endswith("_ptr") or (a.startswith("s") and a not in ("sm_scale", "sbt_b")))
    return AOTSpec(fn=mla_decode_kernel, signature=sig, constexprs=consts, num_warps=num_warps,
                   num_stages=num_stages, grid=(batch, triton.cdiv(heads, block_h), num_splits), divisible_by_16=div16)


def softmax_scale(qk_head_dim: int = 192, mscale: float = 1.0, factor: float = 40.0) -> float:
    """The 671B softmax scale: qk_head_dim^-0.5 · (0.1·mscale·ln(factor) + 1)² (about 0.1352)."""
    m = 0.1 * mscale * math.log(factor) + 1.0
    return qk_head_dim ** -0.5 * m * m
