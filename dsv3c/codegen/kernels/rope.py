"""Interleaved (YaRN) RoPE kernel: pairs (x[2i], x[2i+1]) of x [B, S, H, d] rotate by cos/sin [B, S, d/2].

One program handles one token (b, s) and a block of heads; the token's cos/sin row is read once and
broadcast over the heads. x is loaded as contiguous rows and split into (even, odd) pairs in registers.
Arithmetic in float32, output in x's dtype (like ref.rope). The YaRN frequencies and mscale live in cos/sin.

After the @triton.jit code: the family's tile table, its KernelSpec builders (`k_*`), and the builder and
runner of each op lowered to it (`dsv3c.codegen.family` says what each is), with their imports, so that
editing the host side moves no kernel (Triton's cache key holds a kernel's first line number).
"""

import triton
import triton.language as tl

from dsv3c.codegen.kernels.common import cast_out


@triton.jit
def rope_kernel(
    x_ptr, cos_ptr, sin_ptr, y_ptr, S, H, HALF,
    sxb, sxs, sxh, scb, scs, ssb, sss, syb, sys, syh,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, EXACT: tl.constexpr,
):
    """One token, BLOCK_H heads: y[2i] = x[2i]·cos_i − x[2i+1]·sin_i, y[2i+1] = x[2i]·sin_i + x[2i+1]·cos_i."""
    tok = tl.program_id(0)
    b = (tok // S).to(tl.int64)
    s = (tok % S).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    c = tl.load(cos_ptr + b * scb + s * scs + i, mask=i < HALF, other=0.0).to(tl.float32)
    sn = tl.load(sin_ptr + b * ssb + s * sss + i, mask=i < HALF, other=0.0).to(tl.float32)
    d = tl.arange(0, 2 * BLOCK_HALF)
    mask = (heads[:, None] < H) & (d[None, :] < 2 * HALF)
    x = tl.load(x_ptr + b * sxb + s * sxs + heads[:, None].to(tl.int64) * sxh + d[None, :], mask=mask, other=0.0)
    x0, x1 = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_H, BLOCK_HALF, 2)))
    y0 = x0 * c[None, :] - x1 * sn[None, :]
    y1 = x0 * sn[None, :] + x1 * c[None, :]
    y = tl.reshape(tl.join(y0, y1), (BLOCK_H, 2 * BLOCK_HALF))
    out = y_ptr + b * syb + s * sys + heads[:, None].to(tl.int64) * syh + d[None, :]
    tl.store(out, cast_out(y, y_ptr.dtype.element_ty, EXACT), mask=mask)


# ---- host side ------------------------------------------------------------------------------------------

import torch

from dsv3c.codegen.family import cdiv, kspec, p2
from dsv3c.codegen.tiles import TileTable, hopper

TILES = TileTable("rope", hopper(dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=1)))  # 16 heads x 64 rope dims


def build_rope(ins, outs, attrs, tiles):
    """rope(x [B, S, (H,) d], cos, sin [B, S, d/2]): one kernel, a token and a block of heads per program."""
    (xs, xd), (cs, cd), (_, sd) = ins
    b, s = xs[:2]
    h = xs[2] if len(xs) == 4 else 1
    d = xs[-1]
    half = d // 2
    cfg = tiles(TILES)
    bh = max(1, min(cfg["BLOCK_M"], p2(h)))
    ints = {"S": s, "H": h, "HALF": half, "sxb": s * h * d, "sxs": h * d, "sxh": d, "scb": s * half, "scs": half,
            "ssb": s * half, "sss": half, "syb": s * h * d, "sys": h * d, "syh": d}
    k = kspec(f"{__name__}:rope_kernel", ptrs={"x_ptr": xd, "cos_ptr": cd, "sin_ptr": sd, "y_ptr": xd},
              ints=ints, consts={"BLOCK_H": bh, "BLOCK_HALF": p2(half), "EXACT": False}, cfg=cfg,
              grid=(b * s, cdiv(h, bh)), shapes={"B": b, "S": s, "H": h, "D": d}, tag=f"rope_{b}x{s}x{h}x{d}")
    return (k,), ()


def run_rope(call, x, cos, sin):
    (k,) = call.kernels
    b, s, d = x.shape[0], x.shape[1], x.shape[-1]
    half = d // 2
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel():
        k.launch(x_ptr=x.contiguous(), cos_ptr=cos.expand(b, s, half).contiguous(),
                 sin_ptr=sin.expand(b, s, half).contiguous(), y_ptr=y)
    return [y]
