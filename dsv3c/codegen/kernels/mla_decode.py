"""MLA latent decode attention over a paged latent cache (absorbed MLA, one new token per sequence).

o_lat[b, h] = softmax_t((q_lat[b, h]·c_kv[t] + q_pe[b, h]·k_pe[t]) · scale) · c_kv[t] over t < seq_lens[b].

Cache layout: kv_cache [pages, PAGE=64, R + DR] (R = 512 c_kv values then DR = 64 k_pe values per token,
576 in all); block_table [B, max_blocks] int32 holds each sequence's page ids in order.

A program owns BLOCK_H query heads of one sequence and one split of its tokens: each BLOCK_N-token tile
of the one latent head is loaded once and used by all BLOCK_H heads, both as keys (q_lat·c_kvᵀ +
q_pe·k_peᵀ on tensor cores) and as values (p·c_kv). Softmax is online in FP32 (base 2). With more than
one split (flash-decoding, for few sequences x long contexts) each split writes its normalised partial
output and log-sum-exp, and a second kernel combines them.

After the @triton.jit code: the family's tile table, its KernelSpec builders (`k_*`), and the builder and
runner of each op lowered to it (`dsv3c.codegen.family` says what each is), with their imports, so that
editing the host side moves no kernel (Triton's cache key holds a kernel's first line number).
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


# ---- host side ------------------------------------------------------------------------------------------

import torch
from torch import Tensor

from dsv3c.codegen.family import REQUIRED, cdiv, kspec, p2, variant
from dsv3c.codegen.tiles import TileTable, Tiles, hopper

PAGE = 64  # tokens per page of the latent cache


def mla_shared_bytes(c: dict) -> int:
    """Resident q, pipelined latent+rope KV pages, the P tile (bf16)."""
    d = c["BLOCK_DV"] + c["BLOCK_DPE"]
    return 2 * (c["BLOCK_H"] * d + c["num_stages"] * c["BLOCK_N"] * d + c["BLOCK_H"] * c["BLOCK_N"])


# BLOCK_DV/BLOCK_DPE: DeepSeek-V3's latent 512 + rope 64, for the shared-memory estimate (the builder pads the real widths)
TILES = TileTable("mla_decode", hopper(dict(BLOCK_H=32, BLOCK_N=64, PAGE_SIZE=PAGE, BLOCK_DV=512, BLOCK_DPE=64,
                                            num_warps=4, num_stages=2)), mla_shared_bytes)


def _latent_dims(r: int, dr: int) -> tuple[int, int]:
    """Latent and rope widths padded to powers of two >= 16 (tensor-core K; zero padding leaves dots unchanged)."""
    return max(16, p2(r)), max(16, p2(dr))


def _mla_kernels(rows: int, h: int, rp: int, drp: int, pps: int, max_len: int, qd, cd, shapes: dict, tag: str,
                 tiles: Tiles) -> tuple:
    """MLA decode over a paged cache: `rows` query rows of h heads, pps pages of PAGE tokens per row's table,
    at most max_len keys a row, widths rp + drp (powers of two); plus the split combine when the context is
    split (flash-decoding, to fill the target's compute SMs)."""
    cfg = tiles(TILES)
    bh = max(16, min(cfg["BLOCK_H"], p2(h)))
    bn = max(16, min(cfg["BLOCK_N"], p2(max_len), PAGE))
    splits = int(cfg.get("NUM_SPLITS") or default_splits(rows, h, pps * PAGE, bh, tiles.sms))
    ptrs = {"ql_ptr": qd, "qp_ptr": qd, "kv_ptr": cd, "bt_ptr": torch.int32, "len_ptr": torch.int32, "o_ptr": qd,
            "part_ptr": torch.float32, "lse_ptr": torch.float32}
    ints = {"H": h, "sql_b": h * rp, "sql_h": rp, "sqp_b": h * drp, "sqp_h": drp, "s_page": PAGE * (rp + drp),
            "s_tok": rp + drp, "sbt_b": pps, "so_b": h * rp, "so_h": rp}
    main = kspec(f"{__name__}:mla_decode_kernel", ptrs=ptrs, floats=("sm_scale",), ints=ints,
                 consts=dict(R=rp, DR=drp, PAGE_SIZE=PAGE, BLOCK_H=bh, BLOCK_N=bn, NUM_SPLITS=splits, EXACT=False),
                 cfg=cfg, grid=(rows, cdiv(h, bh), splits), shapes=shapes, tag=f"mla_decode_{tag}")
    if splits == 1:
        return (main,)
    return (main, kspec(f"{__name__}:mla_combine_kernel",
                        ptrs={"part_ptr": torch.float32, "lse_ptr": torch.float32, "o_ptr": qd},
                        ints={"H": h, "so_b": h * rp, "so_h": rp},
                        consts=dict(R=rp, NUM_SPLITS=splits, BLOCK_S=p2(splits), EXACT=False), cfg=cfg,
                        grid=(rows * h,), num_warps=4, num_stages=1, shapes=shapes, tag=f"mla_combine_{tag}"))


def _launch_mla(call, ql, qp, cache, table, lens) -> Tensor:
    """o [rows, H, R] of MLA decode: query rows ql/qp against their pages of cache (table, lens per row)."""
    kernels = call.kernels
    rows, h, rp = ql.shape
    o = torch.empty(rows, h, rp, dtype=ql.dtype, device=ql.device)
    splits = dict(kernels[0].constexprs)["NUM_SPLITS"]
    part = torch.empty(rows, h, splits, rp, dtype=torch.float32, device=ql.device)
    lse = torch.empty(rows, h, splits, dtype=torch.float32, device=ql.device)
    if o.numel():
        kernels[0].launch(ql_ptr=ql.contiguous(), qp_ptr=qp.contiguous(), kv_ptr=cache.contiguous(),
                          bt_ptr=table.contiguous(), len_ptr=lens.contiguous(), o_ptr=o, part_ptr=part,
                          lse_ptr=lse, sm_scale=float(call.attr("scale")))
        if splits > 1:
            kernels[1].launch(part_ptr=part, lse_ptr=lse, o_ptr=o)
    return o


def build_latent_attention(ins, outs, attrs, tiles):
    """latent_attention: MLA decode with each query token its own "sequence" ending at its causal position."""
    (qs, qd), _, (cs, cd), _ = ins
    b, s, h, r = qs
    t, dr = cs[1], ins[3][0][-1]
    rp, drp = _latent_dims(r, dr)
    kernels = _mla_kernels(b * s, h, rp, drp, cdiv(t, PAGE), t, qd, cd,
                           {"B": b, "S": s, "T": t, "H": h, "R": r, "Dr": dr}, f"{b}x{s}x{t}x{h}", tiles)
    return kernels, ("paged_cache_copy",)


def run_latent_attention(call, q_lat, q_pe, ckv, kpe):
    b, s, h, r = q_lat.shape
    t, dr = ckv.shape[1], kpe.shape[-1]
    rp, drp = _latent_dims(r, dr)
    pps = cdiv(t, PAGE)
    dev, dt = q_lat.device, q_lat.dtype
    # torch part: the latent cache copied into 64-token pages [B * pps, 64, rp + drp] (zero-padded widths)
    cache = torch.zeros(b, pps * PAGE, rp + drp, dtype=ckv.dtype, device=dev)
    cache[:, :t, :r] = ckv
    cache[:, :t, rp:rp + dr] = kpe
    cache = cache.reshape(b * pps, PAGE, rp + drp)
    ql = torch.zeros(b * s, h, rp, dtype=dt, device=dev)
    ql[..., :r] = q_lat.reshape(b * s, h, r)
    qp = torch.zeros(b * s, h, drp, dtype=dt, device=dev)
    qp[..., :dr] = q_pe.reshape(b * s, h, dr)
    table = (torch.arange(b, device=dev)[:, None] * pps + torch.arange(pps, device=dev)[None, :]).to(torch.int32)
    table = table.repeat_interleave(s, dim=0).contiguous()  # query (b, i) reads sequence b's pages
    lens = (t - s + 1 + torch.arange(s, device=dev)).repeat(b).to(torch.int32)  # causal: keys <= its position
    o = _launch_mla(call, ql, qp, cache, table, lens)
    return [o[..., :r].reshape(b, s, h, r)]


def build_mla_decode_paged(ins, outs, attrs, tiles):
    """MLA decode against a caller's paged cache: q_lat [B, H, R], q_pe [B, H, DR], kv_cache [P, 64, R + DR],
    block_table [B, nb] int32, seq_lens [B] int32 (R, DR powers of two ≥ 16); attr scale."""
    (qs, qd), (ps, _), (cs, cd), (bts, _), _ = ins
    b, h, r = qs
    dr, nb = ps[-1], bts[1]
    if (r, dr) != _latent_dims(r, dr) or cs[1:] != (PAGE, r + dr):
        raise ValueError(f"mla_decode_paged: widths {r} + {dr} must be powers of two >= 16 and the cache "
                         f"[pages, {PAGE}, {r + dr}], got {cs}")
    return _mla_kernels(b, h, r, dr, nb, nb * PAGE, qd, cd, {"B": b, "H": h, "pages": cs[0], "R": r, "Dr": dr},
                        f"paged_{b}x{nb}x{h}", tiles), ()


def run_mla_decode_paged(call, q_lat, q_pe, kv_cache, block_table, seq_lens):
    return [_launch_mla(call, q_lat, q_pe, kv_cache, block_table, seq_lens)]


variant(__name__, "mla_decode_paged", scale=REQUIRED)
