"""Causal prefill attention (flash-style) for MLA's plain form: q/k 192 wide (128 nope + 64 rope), v 128 wide.

o[b, i, h] = softmax_j(q[b, i, h]·k[b, j, h] · scale, j ≤ P + i) · v[b, j, h], with T = P + S keys of which
the first P are a cached prefix (query i sits at absolute position P + i), as ref.mla_attention.

A program owns BLOCK_M queries of one (sequence, head) and walks the key blocks in order with an online
softmax in FP32 (base 2): first the blocks every query of the tile sees whole (no masking), then the
diagonal blocks with the causal mask. The q/k head dim is split into two power-of-two chunks
(192 = 128 + 64) so no tensor-core work is spent on padding; v's width is padded to a power of two.

After the @triton.jit code: the family's tile table, its KernelSpec builders (`k_*`), and the builder and
runner of each op lowered to it (`dsv3c.codegen.family` says what each is), with their imports, so that
editing the host side moves no kernel (Triton's cache key holds a kernel's first line number).
"""

import triton
import triton.language as tl

from dsv3c.codegen.kernels.common import cast_out, mma_operand


@triton.jit
def _attend(
    acc, m_i, l_i, qa, qb, k_ptr, v_ptr, skt, svt, lo, hi, T, q_pos, qk_scale,
    DQK: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EXACT: tl.constexpr,
):
    """Folds key blocks [lo, hi) into the running (acc, m, l); masks causally and past T when MASKED."""
    dt: tl.constexpr = k_ptr.dtype.element_ty
    da = tl.arange(0, DA)
    dv = tl.arange(0, BLOCK_DV)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < T
        krow = k_ptr + n[:, None].to(tl.int64) * skt
        ka = mma_operand(tl.load(krow + da[None, :], mask=nmask[:, None] & (da < DQK)[None, :], other=0.0), dt, EXACT)
        s = tl.dot(qa, tl.trans(ka))
        if DB > 0:
            db = DA + tl.arange(0, DB)
            kb = tl.load(krow + db[None, :], mask=nmask[:, None] & (db < DQK)[None, :], other=0.0)
            s = tl.dot(qb, tl.trans(mma_operand(kb, dt, EXACT)), s)
        s = s * qk_scale
        if MASKED:
            s = tl.where((n[None, :] <= q_pos[:, None]) & nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + n[:, None].to(tl.int64) * svt + dv[None, :], mask=nmask[:, None] & (dv < DV)[None, :],
                    other=0.0)
        acc = tl.dot(mma_operand(p, dt, EXACT), mma_operand(v, dt, EXACT), acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, S, T, H, sm_scale,
    sqb, sqs, sqh, skb, skt, skh, svb, svt, svh, sob, sos, soh,
    DQK: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EXACT: tl.constexpr,
):
    """BLOCK_M queries of one (sequence, head): causal flash attention against the P cached + S new keys."""
    pid_m = tl.program_id(0)
    b = (tl.program_id(1) // H).to(tl.int64)
    h = (tl.program_id(1) % H).to(tl.int64)
    prefix = T - S
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < S
    q_pos = prefix + offs_m
    dt: tl.constexpr = k_ptr.dtype.element_ty
    qrow = q_ptr + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqs
    da = tl.arange(0, DA)
    # DA is at least 16 (the smallest tl.dot), so for dqk < 16 it runs past the head: mask it by DQK
    qa = mma_operand(tl.load(qrow + da[None, :], mask=mmask[:, None] & (da < DQK)[None, :], other=0.0), dt, EXACT)
    qb = qa  # unused when DB == 0
    if DB > 0:
        db = DA + tl.arange(0, DB)
        qb = mma_operand(tl.load(qrow + db[None, :], mask=mmask[:, None] & (db < DQK)[None, :], other=0.0), dt,
                         EXACT)
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x·log2 e)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    kb_ptr = k_ptr + b * skb + h * skh
    vb_ptr = v_ptr + b * svb + h * svh
    m_first = prefix + pid_m * BLOCK_M  # the tile's first query position: keys ≤ it are seen by every row
    full_end = (tl.minimum(m_first + 1, T) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(T, m_first + BLOCK_M)
    acc, m_i, l_i = _attend(acc, m_i, l_i, qa, qb, kb_ptr, vb_ptr, skt, svt, 0, full_end, T, q_pos, qk_scale,
                            DQK, DV, DA, DB, BLOCK_DV, BLOCK_N, False, EXACT)
    acc, m_i, l_i = _attend(acc, m_i, l_i, qa, qb, kb_ptr, vb_ptr, skt, svt, full_end, hi, T, q_pos, qk_scale,
                            DQK, DV, DA, DB, BLOCK_DV, BLOCK_N, True, EXACT)

    out = acc / l_i[:, None]
    dv = tl.arange(0, BLOCK_DV)
    o = o_ptr + b * sob + h * soh + offs_m[:, None].to(tl.int64) * sos + dv[None, :]
    tl.store(o, cast_out(out, o_ptr.dtype.element_ty, EXACT), mask=mmask[:, None] & (dv < DV)[None, :])


def head_split(dqk: int) -> tuple[int, int]:
    """(DA, DB): dqk as a power-of-two chunk DA ≤ dqk plus a padded power-of-two rest DB (0 if none), both ≥ 16."""
    da = max(16, 1 << (dqk.bit_length() - 1))
    rest = dqk - da
    return da, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


# ---- host side ------------------------------------------------------------------------------------------

from dsv3c.codegen.family import cdiv, clamp_block, kspec, p2
from dsv3c.codegen.tiles import TileTable, hopper


def attention_shared_bytes(c: dict) -> int:
    """Resident q, pipelined K and V (bf16)."""
    return 2 * (c["BLOCK_M"] * c["BLOCK_DQK"] + c["num_stages"] * c["BLOCK_N"] * (c["BLOCK_DQK"] + c["BLOCK_DV"]))


# BLOCK_DQK/BLOCK_DV: DeepSeek-V3's 192/128 head dims, for the shared-memory estimate (the builder sizes the kernel's)
TILES = TileTable("attention_prefill", hopper(dict(BLOCK_M=128, BLOCK_N=64, BLOCK_DQK=192, BLOCK_DV=128, num_warps=8,
                                                   num_stages=3)), attention_shared_bytes)


def build_mla_attention(ins, outs, attrs, tiles):
    """mla_attention(q, k, v, scale): one flash-style causal attention kernel."""
    (qs, qd), (ks, _), (vs, _) = ins
    b, s, h, dqk = qs
    t, dv = ks[1], vs[-1]
    cfg = tiles(TILES)
    bm, bn = clamp_block(cfg["BLOCK_M"], s), clamp_block(cfg["BLOCK_N"], t)
    da, db = head_split(dqk)
    ints = {"S": s, "T": t, "H": h, "sqb": s * h * dqk, "sqs": h * dqk, "sqh": dqk, "skb": t * h * dqk,
            "skt": h * dqk, "skh": dqk, "svb": t * h * dv, "svt": h * dv, "svh": dv, "sob": s * h * dv, "sos": h * dv,
            "soh": dv}
    consts = dict(DQK=dqk, DV=dv, DA=da, DB=db, BLOCK_DV=max(16, p2(dv)), BLOCK_M=bm, BLOCK_N=bn, EXACT=False)
    k = kspec(f"{__name__}:prefill_attention_kernel",
              ptrs={"q_ptr": qd, "k_ptr": qd, "v_ptr": qd, "o_ptr": qd}, floats=("sm_scale",), ints=ints,
              consts=consts, cfg=cfg, grid=(cdiv(s, bm), b * h), shapes={"B": b, "S": s, "T": t, "H": h, "Dqk": dqk,
                                                                          "Dv": dv},
              tag=f"attention_prefill_{b}x{s}x{t}x{h}")
    return (k,), ()


def run_mla_attention(call, q, k, v):
    (kern,) = call.kernels
    b, s, h, _ = q.shape
    o = q.new_empty((b, s, h, v.shape[-1]))
    if o.numel():
        kern.launch(q_ptr=q.contiguous(), k_ptr=k.contiguous(), v_ptr=v.contiguous(), o_ptr=o,
                    sm_scale=float(call.attr("scale")))
    return [o]
