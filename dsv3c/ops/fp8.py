"""Reference FP8 math of DeepSeek-V3's training recipe (plain torch, CPU).

These functions are the semantics that the compiler's FP8 ops and Triton kernels keep:

- activations in 1x128 tiles: one float32 scale per row per 128 channels of the last dim;
- weights in 128x128 blocks: one float32 scale per block (DeepSeek's ``weight_scale_inv``);
- E4M3 values (``torch.float8_e4m3fn``, max 448), round to nearest even after clamping;
- GEMMs multiply FP8 values, scale each 128-long K chunk's partial product and accumulate
  in FP32 (the promotion that Hopper's ~14-bit tensor-core accumulator needs).

Tile orientation in a Linear y = x·Wᵀ (x [M, K], W [N, K]); a tile always runs along the
reduction dim of the GEMM that reads it:

- Fprop  y  = x·Wᵀ : x 1x128 along K (act_quant), W 128x128 blocks.
- Dgrad  dx = dy·W : dy 1x128 along N (act_quant), W 128x128 blocks, transposed (W's blocks
  are square, so the forward's blocks and scales are reused as Wᵀ and scaleᵀ).
- Wgrad  dW = dyᵀ·x: dy and x both 128x1 along M, the token dim (act_quant_cols).
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
BLOCK = 128
AMAX_EPS = 1e-4  # floor on a tile's amax, so an all-zero tile gets a finite, nonzero scale
FP8 = torch.float8_e4m3fn
WGMMA_K = 32  # K of one Hopper FP8 WGMMA instruction (m64nNk32)


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints."""
    return -(-a // b)


def _pad_last(x: torch.Tensor, block: int) -> torch.Tensor:
    """x zero-padded on the last dim to a multiple of block."""
    pad = _cdiv(x.shape[-1], block) * block - x.shape[-1]
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= s, for positive normal float32 s (UE8M0 rounding)."""
    # Bit trick instead of exp2(ceil(log2)): exact, and the kernels do the same.
    bits = s.to(torch.float32).view(torch.int32)
    return ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)


def _scale_from_amax(amax: torch.Tensor, pow2_scale: bool) -> torch.Tensor:
    """scale = max(amax, 1e-4) / 448, optionally rounded up to a power of two."""
    s = amax.to(torch.float32).clamp_min(AMAX_EPS) / E4M3_MAX
    return pow2_ceil(s) if pow2_scale else s


def _to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """v clamped to ±448 and cast to E4M3 (round to nearest even)."""
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def act_quant(x: torch.Tensor, block: int = BLOCK, pow2_scale: bool = False):
    """(xq, scale): x quantised to E4M3 in 1 x block tiles along the last dim; scale [..., ceil(K/block)]."""
    k = x.shape[-1]
    nb = _cdiv(k, block)
    xf = _pad_last(x.to(torch.float32), block).reshape(*x.shape[:-1], nb, block)
    scale = _scale_from_amax(xf.abs().amax(dim=-1), pow2_scale)
    xq = _to_e4m3(xf / scale.unsqueeze(-1)).reshape(*x.shape[:-1], nb * block)[..., :k]
    return xq.contiguous(), scale


def act_quant_cols(x: torch.Tensor, block: int = BLOCK, pow2_scale: bool = False):
    """(xq, scale): x quantised in block x 1 tiles along dim -2 (the token dim); scale [..., ceil(M/block), K]."""
    xq, scale = act_quant(x.transpose(-1, -2), block, pow2_scale)
    return xq.transpose(-1, -2).contiguous(), scale.transpose(-1, -2).contiguous()


def act_dequant(xq: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """float32 x = xq · scale, each scale broadcast over its 1 x block tile of the last dim."""
    k = xq.shape[-1]
    return xq.to(torch.float32) * scale.repeat_interleave(block, dim=-1)[..., :k]


def act_dequant_cols(xq: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """float32 x = xq · scale, each scale broadcast over its block x 1 tile of dim -2."""
    return act_dequant(xq.transpose(-1, -2), scale.transpose(-1, -2), block).transpose(-1, -2)


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """w [N, K] zero-padded to whole blocks, viewed as [N/block, block, K/block, block]."""
    n, k = w.shape
    nn_, nk = _cdiv(n, block), _cdiv(k, block)
    wp = torch.nn.functional.pad(w, (0, nk * block - k, 0, nn_ * block - n))
    return wp.reshape(nn_, block, nk, block)


def weight_quant(w: torch.Tensor, block: int = BLOCK, pow2_scale: bool = False):
    """(wq [..., N, K] E4M3, scale_inv [..., ceil(N/block), ceil(K/block)] float32) with w ≈ wq · scale_inv per block.

    Leading dims (the expert axis of stacked expert weights) are quantised matrix by matrix.
    """
    if w.dim() > 2:
        pairs = [weight_quant(m, block, pow2_scale) for m in w]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    n, k = w.shape
    wb = _blocks(w.to(torch.float32), block)
    scale = _scale_from_amax(wb.abs().amax(dim=(1, 3)), pow2_scale)  # padding zeros never raise the amax
    wq = _to_e4m3(wb / scale[:, None, :, None]).reshape(scale.shape[0] * block, -1)[:n, :k]
    return wq.contiguous(), scale


def expand_block_scale(scale: torch.Tensor, n: int, k: int, block: int = BLOCK) -> torch.Tensor:
    """The [n, k] float32 map of a [ceil(n/block), ceil(k/block)] block scale."""
    return scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]


def weight_dequant(wq: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """float32 w = wq · scale_inv, one scale per block x block block (DeepSeek's checkpoint meaning); leading dims too."""
    if wq.dim() > 2:
        return torch.stack([weight_dequant(w, s, block) for w, s in zip(wq, scale_inv)])
    return wq.to(torch.float32) * expand_block_scale(scale_inv, *wq.shape, block)


def _chunk_products(aq: torch.Tensor, bq: torch.Tensor, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """p[c, m, n] = Σ_{k in chunk c} aq[m, k]·bq[n, k], computed in dtype (K zero-padded)."""
    m, n = aq.shape[0], bq.shape[0]
    a = _pad_last(aq.to(dtype), chunk).reshape(m, -1, chunk)
    b = _pad_last(bq.to(dtype), chunk).reshape(n, -1, chunk)
    return torch.einsum("mck,nck->cmn", a, b)


def _rowscaled_gemm(aq, a_scale, bq, b_scale, block: int, promote_every: int) -> torch.Tensor:
    """float32 y = Σ_c (aq_c·bq_cᵀ) · a_scale[m, c]·b_scale[n, c], chunks of promote_every, FP32 throughout."""
    if block % promote_every:
        raise ValueError(f"promote_every={promote_every} must divide the scale block {block}")
    p = _chunk_products(aq, bq, promote_every, torch.float32)
    c_scale = torch.arange(p.shape[0]) * promote_every // block  # the scale column of each chunk
    s = a_scale[:, c_scale].T[:, :, None] * b_scale[:, c_scale].T[:, None, :]
    acc = torch.zeros(p.shape[1:], dtype=torch.float32)
    for c in range(p.shape[0]):  # sequential FP32 accumulation, in K order, like the kernel
        acc += p[c] * s[c]
    return acc


def fp8_gemm(xq, xs, wq, ws, out_dtype=torch.bfloat16, promote_every: int = BLOCK, block: int = BLOCK):
    """y [..., N] = x·wᵀ, x 1x128-tiled (xq, xs [..., ceil(K/128)]), w 128x128-blocked (wq, ws), FP32 accum."""
    lead, k = xq.shape[:-1], xq.shape[-1]
    n = wq.shape[0]
    w_rows = ws.repeat_interleave(block, dim=0)[:n]  # [N, ceil(K/block)]: each row's block scales
    y = _rowscaled_gemm(xq.reshape(-1, k), xs.reshape(-1, xs.shape[-1]), wq, w_rows, block, promote_every)
    return y.to(out_dtype).reshape(*lead, n)


def round_mantissa(v: torch.Tensor, bits: int, mode: str = "nearest") -> torch.Tensor:
    """v (float64) rounded to `bits` explicit mantissa bits (to nearest even, or toward zero)."""
    m, e = torch.frexp(v)  # v = m·2^e, |m| in [0.5, 1)
    scaled = m * 2.0 ** (bits + 1)
    r = torch.round(scaled) if mode == "nearest" else torch.trunc(scaled)
    return torch.ldexp(r / 2.0 ** (bits + 1), e)


def fp8_gemm_emulated(
    xq, xs, wq, ws, acc_mantissa_bits: int = 13, promote_every: int | None = BLOCK,
    block: int = BLOCK, rounding: str = "nearest",
) -> torch.Tensor:
    """float32 y = x·wᵀ (x [M, K] 1x128-tiled, w 128x128-blocked) with Hopper's ~14-bit FP8 accumulator emulated."""
    # Each WGMMA K-step adds the sum of its 32 products (exact, float64) to the tensor core's
    # running sum, which is then rounded to `acc_mantissa_bits` mantissa bits (13: the ~14-bit
    # accumulator, sign + 8 exponent + 13 mantissa bits; `rounding` "nearest" or "toward_zero").
    # promote_every=128 (the kernel's and DeepSeek's scheme): the running sum covers one 128-long
    #   K chunk of unscaled FP8 products (4 WGMMAs); it is then multiplied by xs[m, c]·ws[n//128, c],
    #   added to an FP32 accumulator, and reset.
    # promote_every=None: one running sum covers all of K and is cast to FP32 once at the end. The
    #   per-128 scales cannot be applied after that sum, so each product is multiplied by its scales
    #   xs[m, k//128]·ws[n//128, k//128] before it enters the limited-precision sum. Rounding error
    #   relative to the sum does not depend on the scales, so the two modes differ only in how long
    #   the limited accumulator runs.
    m, k = xq.shape
    n = wq.shape[0]
    x = xq.to(torch.float64)
    w = wq.to(torch.float64)
    if promote_every is None:
        x = x * xs.to(torch.float64).repeat_interleave(block, dim=-1)[:, :k]
        w = w * expand_block_scale(ws.to(torch.float64), n, k, block)
        steps = _chunk_products(x, w, WGMMA_K, torch.float64)
        run = torch.zeros(m, n, dtype=torch.float64)
        for step in steps:
            run = round_mantissa(run + step, acc_mantissa_bits, rounding)
        return run.to(torch.float32)
    if promote_every % WGMMA_K or block % promote_every:
        raise ValueError(f"promote_every={promote_every} must be a multiple of {WGMMA_K} dividing {block}")
    steps = _chunk_products(x, w, WGMMA_K, torch.float64)
    per_chunk = promote_every // WGMMA_K
    w_rows = ws.repeat_interleave(block, dim=0)[:n]
    acc = torch.zeros(m, n, dtype=torch.float32)
    run = torch.zeros(m, n, dtype=torch.float64)
    for i, step in enumerate(steps):
        run = round_mantissa(run + step, acc_mantissa_bits, rounding)
        if (i + 1) % per_chunk == 0 or i == len(steps) - 1:
            c = i * WGMMA_K // block
            acc += run.to(torch.float32) * (xs[:, c, None] * w_rows[None, :, c])
            run = torch.zeros_like(run)
    return acc


def grouped_fp8_gemm(aq, a_scale, wq, ws, offsets, out_dtype=torch.bfloat16, block: int = BLOCK):
    """y [T, N]: rows offsets[e]:offsets[e+1] of the expert-sorted aq times wq[e]ᵀ (fp8_gemm per expert)."""
    t, n = aq.shape[0], wq.shape[1]
    y = torch.zeros(t, n, dtype=out_dtype)
    for e in range(wq.shape[0]):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if hi > lo:
            y[lo:hi] = fp8_gemm(aq[lo:hi], a_scale[lo:hi], wq[e], ws[e], out_dtype, block=block)
    return y


def fp8_linear_forward(x: torch.Tensor, w: torch.Tensor, out_dtype=torch.bfloat16, block: int = BLOCK):
    """Fprop y = x·wᵀ in FP8: x quantised 1x128 along K, w in 128x128 blocks, FP32 accumulation."""
    xq, xs = act_quant(x, block)
    wq, ws = weight_quant(w, block)
    return fp8_gemm(xq, xs, wq, ws, out_dtype, block=block)


def fp8_linear_backward(grad_y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, out_dtype=torch.float32,
                        block: int = BLOCK):
    """(dX, dW) of y = x·wᵀ, both GEMMs in FP8 with FP32 accumulation (tiles along each GEMM's reduction dim)."""
    k, n = x.shape[-1], w.shape[0]
    dy = grad_y.reshape(-1, n)
    x2 = x.reshape(-1, k)
    # Dgrad dX = dY·W: reduce over N. dY in 1x128 tiles along N; W's 128x128 blocks transposed.
    dyq, dys = act_quant(dy, block)
    wq, ws = weight_quant(w, block)
    dx = fp8_gemm(dyq, dys, wq.T.contiguous(), ws.T.contiguous(), out_dtype, block=block)
    # Wgrad dW = dYᵀ·X: reduce over M (tokens). dY and X re-tiled to 128x1 along M, so that
    # in the GEMM's (row, reduction) view dYᵀ [N, M] and Xᵀ [K, M] are both 1x128-tiled.
    dyq_c, dys_c = act_quant_cols(dy, block)
    xq_c, xs_c = act_quant_cols(x2, block)
    dw = _rowscaled_gemm(dyq_c.T, dys_c.T, xq_c.T, xs_c.T, block, block).to(out_dtype)
    return dx.reshape(*x.shape[:-1], k), dw
