"""MLA latent decode attention over a paged latent cache (absorbed MLA, one new token per sequence).

o_lat[b, h] = softmax_t((q_lat[b, h]·c_kv[t] + q_pe[b, h]·k_pe[t]) · scale) · c_kv[t] over t < seq_lens[b].

Cache layout: kv_cache [pages, PAGE=64, R + DR] (R = 512 c_kv values then DR = 64 k_pe values per token,
576 in all); block_table [B, max_blocks] int32 holds each sequence's page ids in order.

A program owns BLOCK_H query heads of one sequence and one split of its tokens: each BLOCK_N-token tile
of the one latent head is loaded once and used by all BLOCK_H heads, both as keys (q_lat·c_kvᵀ +
q_pe·k_peᵀ on tensor cores) and as values (p·c_kv). Softmax is online in FP32 (base 2). With more than
one split (flash-decoding, for few sequences x long contexts) each split writes its normalised partial
output and log-sum-exp, and a second kernel combines them.

Only the @triton.jit code lives here. Block sizes, grids, launch options and host tensors come from the
code generator: its builder (`dsv3c.codegen.lowering`) makes the KernelSpecs, `KernelSpec.launch` runs
them, `KernelSpec.aot` gives their AOTSpecs; `lowering.run_op` / `lowering.aot_specs` do it for one op.
"""

import triton
import triton.language as tl

from dsv3c.codegen.kernels.common import cast_out, mma_operand


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
