"""Interleaved (YaRN) RoPE kernel: pairs (x[2i], x[2i+1]) of x [B, S, H, d] rotate by cos/sin [B, S, d/2].

One program handles one token (b, s) and a block of heads; the token's cos/sin row is read once and
broadcast over the heads. x is loaded as contiguous rows and split into (even, odd) pairs in registers.
Arithmetic in float32, output in x's dtype (like ref.rope). The YaRN frequencies and mscale live in cos/sin.
"""

import torch
import triton
import triton.language as tl

from dsv3c.codegen.kernels.common import TL_DTYPE, cast_out, interpreting



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


def _blocks(h: int, half: int) -> tuple[int, int]:
    """(heads per program, padded half width): about 4K values per program."""
    block_half = max(1, triton.next_power_of_2(half))
    block_h = max(1, min(triton.next_power_of_2(h), max(1, 2048 // block_half)))
    return block_h, block_half


def launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """ref.rope: x [B, S, H, d] or [B, S, d] rotated by cos/sin [B, S, d/2]; returns a new contiguous tensor."""
    squeeze = x.dim() == 3
    x4 = x.unsqueeze(2) if squeeze else x
    if x4.stride(-1) != 1:
        x4 = x4.contiguous()
    b, s, h, d = x4.shape
    half = d // 2
    assert d % 2 == 0 and cos.shape[-1] == half and sin.shape[-1] == half
    cos = cos.expand(b, s, half) if cos.stride(-1) == 1 else cos.expand(b, s, half).contiguous()
    sin = sin.expand(b, s, half) if sin.stride(-1) == 1 else sin.expand(b, s, half).contiguous()
    y = torch.empty(x4.shape, dtype=x.dtype, device=x.device)
    block_h, block_half = _blocks(h, half)
    if y.numel():
        grid = (b * s, triton.cdiv(h, block_h))
        rope_kernel[grid](
            x4, cos, sin, y, s, h, half, *x4.stride()[:3], *cos.stride()[:2], *sin.stride()[:2], *y.stride()[:3],
            BLOCK_H=block_h, BLOCK_HALF=block_half, EXACT=interpreting(), num_warps=4,
        )
    return y.squeeze(2) if squeeze else y


def aot_spec(tokens: int = 4096, heads: int = 128, d: int = 64, dtype: torch.dtype = torch.bfloat16):
    """AOTSpec of RoPE on q_pe [1, tokens, heads, d] (the 671B query's rope part by default), contiguous."""
    from dsv3c.codegen.triton_aot import AOTSpec

    t = TL_DTYPE[dtype]
    block_h, block_half = _blocks(heads, d // 2)
    sig = {"x_ptr": f"*{t}", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "y_ptr": f"*{t}", "S": "i32", "H": "i32",
           "HALF": "i32"}
    sig.update({k: "i32" for k in ("sxb", "sxs", "sxh", "scb", "scs", "ssb", "sss", "syb", "sys", "syh")})
    consts = {"BLOCK_H": block_h, "BLOCK_HALF": block_half, "EXACT": False}
    strides = ("sxb", "sxs", "sxh", "syb", "sys", "syh") if d % 16 == 0 else ()
    div16 = ("x_ptr", "y_ptr", "cos_ptr", "sin_ptr") + strides
    return AOTSpec(fn=rope_kernel, signature=sig, constexprs=consts, num_warps=4, num_stages=1,
                   grid=(tokens, triton.cdiv(heads, block_h), 1), divisible_by_16=div16)
