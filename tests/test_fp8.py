"""Properties of the reference FP8 math in dsv3c.ops.fp8: quantisation error bounds, GEMM error bounds, promotion."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsv3c.ops import fp8

U32 = 2.0**-24  # float32 unit roundoff


def e4m3_half_step(v: torch.Tensor) -> torch.Tensor:
    """Half the spacing of the e4m3 grid at |v| (in quantised units): 2^(e-4) for |v| in [2^e, 2^(e+1)), e >= -6.

    E4M3 keeps 3 mantissa bits, so at exponent e the grid step is 2^(e-3); below the smallest
    normal 2^-6 the subnormal step is 2^-9 (= the step at e = -6), hence max(e, -6).
    """
    e = torch.floor(torch.log2(v.abs().double().clamp_min(2.0**-7))).clamp_min(-6)
    return torch.pow(2.0, e - 4)


def quant_bound(x: torch.Tensor, scale_full: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |x - dequant(quant(x))|: half an e4m3 step of x/scale, times scale, plus float32 slack."""
    xd, s = x.double(), scale_full.double()
    return e4m3_half_step(xd / s) * s + 4 * U32 * xd.abs()


def check_act_roundtrip(x: torch.Tensor, pow2: bool = False):
    """act_quant's dequantised x lies within quant_bound of x, element by element."""
    xq, s = fp8.act_quant(x, pow2_scale=pow2)
    dq = fp8.act_dequant(xq, s)
    full = s.repeat_interleave(fp8.BLOCK, dim=-1)[..., : x.shape[-1]]
    err = (dq.double() - x.double()).abs()
    bound = quant_bound(x, full)
    assert (err <= bound).all(), f"max err/bound {(err / bound).max().item()}"
    return xq, s


@st.composite
def activations(draw, max_rows=5, max_k=400):
    """A float32 [rows, K] tensor with a drawn magnitude and optional outliers."""
    rows = draw(st.integers(1, max_rows))
    k = draw(st.integers(1, max_k))
    seed = draw(st.integers(0, 2**16))
    log_mag = draw(st.floats(-12, 12))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * 2.0**log_mag
    if draw(st.booleans()):  # heavy tails: some elements 1000x larger
        x = x * torch.where(torch.rand(rows, k, generator=g) < 0.02, 1000.0, 1.0)
    return x


@given(activations(), st.booleans())
def test_act_quant_error_within_half_step(x, pow2):
    xq, s = check_act_roundtrip(x, pow2)
    assert xq.dtype == torch.float8_e4m3fn and xq.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (x.shape[0], math.ceil(x.shape[1] / 128))


@given(st.integers(1, 4), st.integers(1, 300), st.integers(-20, 20), st.integers(0, 2**16), st.booleans())
def test_values_on_the_fp8_grid_roundtrip_exactly(rows, k, exp2, seed, pow2):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (rows, k), generator=g, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x38  # NaN codes -> 1.0
    q = codes.view(torch.float8_e4m3fn).float()
    q[:, ::128] = 448.0  # every tile's amax is 448, so its scale is exactly 2^exp2
    x = q * 2.0**exp2
    xq, s = fp8.act_quant(x, pow2_scale=pow2)
    assert torch.equal(s, torch.full_like(s, 2.0**exp2))
    assert torch.equal(fp8.act_dequant(xq, s), x)


def test_weight_on_the_fp8_grid_roundtrips_exactly():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 126, (300, 200), generator=g, dtype=torch.uint8)  # positive, finite
    q = codes.view(torch.float8_e4m3fn).float()
    q[::128, ::128] = 448.0
    w = q * 2.0**-10
    wq, s = fp8.weight_quant(w)
    assert s.shape == (3, 2) and torch.equal(s, torch.full_like(s, 2.0**-10))
    assert torch.equal(fp8.weight_dequant(wq, s), w)


def test_zero_constant_outlier_tiles():
    x = torch.zeros(3, 384)
    x[1, 128:256] = -3.7  # a constant tile
    x[2, :128] = torch.linspace(-1, 1, 128)
    x[2, 5] = 1e4  # an outlier tile
    x[2, 256:] = torch.linspace(-1, 1, 128)  # same values as tile 0 without the outlier
    xq, s = check_act_roundtrip(x)
    eps_scale = torch.tensor(1e-4, dtype=torch.float32) / 448
    assert torch.equal(s[0], eps_scale.expand(3))  # all-zero: the eps scale
    assert (xq[0].float() == 0).all()
    assert torch.equal(xq[1, 128:256].float(), torch.full((128,), -448.0))  # constant: every element at -448
    assert s[2, 0] == torch.tensor(1e4, dtype=torch.float32) / 448
    assert s[2, 2] == torch.tensor(1.0, dtype=torch.float32) / 448  # tiles are independent


@given(st.integers(1, 3), st.integers(1, 300), st.integers(1, 300), st.integers(0, 2**16))
def test_ragged_scale_shapes_and_amax_over_real_elements(b, m, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, m, k, generator=g) - 5.0  # all negative: zero padding would never be the amax
    _, s = fp8.act_quant(x)
    assert s.shape == (b, m, math.ceil(k / 128))
    assert torch.equal(s[..., -1], x[..., (s.shape[-1] - 1) * 128:].abs().amax(-1) / 448)
    xq_c, s_c = fp8.act_quant_cols(x)
    assert xq_c.shape == x.shape and s_c.shape == (b, math.ceil(m / 128), k)
    dq = fp8.act_dequant_cols(xq_c, s_c)
    assert ((dq.double() - x.double()).abs() <= quant_bound(x, s_c.repeat_interleave(128, -2)[..., :m, :])).all()
    w = x[0]
    wq, ws = fp8.weight_quant(w)
    assert wq.shape == w.shape and ws.shape == (math.ceil(m / 128), math.ceil(k / 128))
    assert ws[-1, -1] == w[(ws.shape[0] - 1) * 128:, (ws.shape[1] - 1) * 128:].abs().amax() / 448
    err = (fp8.weight_dequant(wq, ws).double() - w.double()).abs()
    assert (err <= quant_bound(w, fp8.expand_block_scale(ws, m, k))).all()


@given(activations(max_rows=3, max_k=300))
def test_pow2_scales_are_powers_of_two_covering_amax(x):
    _, s = fp8.act_quant(x, pow2_scale=True)
    mant, _ = torch.frexp(s)
    assert (mant == 0.5).all()
    _, s_exact = fp8.act_quant(x)
    assert (s >= s_exact).all() and (s < 2 * s_exact).all()
    _, ws = fp8.weight_quant(x, pow2_scale=True)
    assert (torch.frexp(ws)[0] == 0.5).all()


def gemm_bound(a, a_scale_full, b, b_scale_full, out_rel: float) -> torch.Tensor:
    """Elementwise bound on |Q(a)·Q(b)ᵀ (FP32-accumulated, output rounded) - a·bᵀ (exact)|.

    With â = a + δa (|δa| ≤ qa, the per-element quantisation bound) and likewise b̂:
    |âb̂ᵀ - abᵀ| ≤ qa·|b|ᵀ + |a|·qbᵀ + qa·qbᵀ; the FP32 accumulation of K products adds at most
    (K + 4)·2^-24·|â|·|b̂|ᵀ (standard recursive-summation bound, scale multiplies included); the
    output rounding adds out_rel·|y| (unit roundoff: 2^-8 for bf16, 2^-24 for float32).
    """
    qa, qb = quant_bound(a, a_scale_full), quant_bound(b, b_scale_full)
    ad, bd = a.double().abs(), b.double().abs()
    k = a.shape[-1]
    quant = qa @ bd.T + ad @ qb.T + qa @ qb.T
    accum = (k + 4) * U32 * ((ad + qa) @ (bd + qb).T)
    y = a.double() @ b.double().T
    return (quant + accum) * (1 + out_rel) + out_rel * y.abs()


def act_scale_full(x):
    """act_quant's scales broadcast to x's shape."""
    return fp8.act_quant(x)[1].repeat_interleave(128, -1)[..., : x.shape[-1]]


@given(st.integers(1, 40), st.integers(1, 300), st.integers(1, 400), st.integers(0, 2**16),
       st.sampled_from([torch.bfloat16, torch.float32]))
def test_fp8_gemm_within_bound_of_float64(m, n, k, seed, out_dtype):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    xq, xs = fp8.act_quant(x)
    wq, ws = fp8.weight_quant(w)
    y = fp8.fp8_gemm(xq, xs, wq, ws, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    out_rel = 2.0**-8 if out_dtype == torch.bfloat16 else U32
    # (1) against the float64 product of the dequantised operands: accumulation and output rounding only
    xd, wd = fp8.act_dequant(xq, xs).double(), fp8.weight_dequant(wq, ws).double()
    ref_dq = xd @ wd.T
    acc_bound = (k + 4) * U32 * (xd.abs() @ wd.abs().T) * (1 + out_rel) + out_rel * ref_dq.abs()
    assert ((y.double() - ref_dq).abs() <= acc_bound).all()
    # (2) against the float64 product of the original operands: plus each operand's quantisation error
    bound = gemm_bound(x, act_scale_full(x), w, fp8.expand_block_scale(ws, n, k), out_rel)
    assert ((y.double() - x.double() @ w.double().T).abs() <= bound).all()


def test_fp8_gemm_leading_dims_and_promote_every():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 3, 260, generator=g), torch.randn(130, 260, generator=g)
    xq, xs = fp8.act_quant(x)
    wq, ws = fp8.weight_quant(w)
    y = fp8.fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32)
    flat = fp8.fp8_gemm(xq.reshape(6, 260), xs.reshape(6, 3), wq, ws, out_dtype=torch.float32)
    assert y.shape == (2, 3, 130) and torch.equal(y.reshape(6, 130), flat)
    y64 = fp8.fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32, promote_every=64)
    torch.testing.assert_close(y64, y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        fp8.fp8_gemm(xq, xs, wq, ws, promote_every=96)


def test_emulation_with_fp32_accumulator_matches_fp8_gemm():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(16, 700, generator=g), torch.randn(40, 700, generator=g)
    xq, xs = fp8.act_quant(x)
    wq, ws = fp8.weight_quant(w)
    ref = fp8.fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32)
    for promote in (128, None):
        emu = fp8.fp8_gemm_emulated(xq, xs, wq, ws, acc_mantissa_bits=23, promote_every=promote)
        torch.testing.assert_close(emu, ref, rtol=1e-5, atol=1e-4)


def test_promotion_every_128_beats_one_limited_accumulator_at_k7168():
    """K = 7168 (the hidden size): promoting the ~14-bit tensor-core sum to FP32 every 128 elements."""
    g = torch.Generator().manual_seed(0)
    m, n, k = 64, 64, 7168
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    xq, xs = fp8.act_quant(x)
    wq, ws = fp8.weight_quant(w)
    ref = fp8.act_dequant(xq, xs).double() @ fp8.weight_dequant(wq, ws).double().T  # exact for the FP8 inputs

    def rel(y):
        """Normwise relative error of y against ref."""
        return ((y.double() - ref).norm() / ref.norm()).item()

    for rounding, margin in (("nearest", 4.0), ("toward_zero", 10.0)):
        promoted = rel(fp8.fp8_gemm_emulated(xq, xs, wq, ws, 13, 128, rounding=rounding))
        single = rel(fp8.fp8_gemm_emulated(xq, xs, wq, ws, 13, None, rounding=rounding))
        print(f"K=7168 rel. error, 13-bit accumulator ({rounding}): promote every 128 {promoted:.3e}, "
              f"never {single:.3e} ({single / promoted:.1f}x)")
        assert promoted * margin < single
    assert rel(fp8.fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32)) < 1e-6


def test_round_mantissa():
    v = torch.tensor([1.0 + 2.0**-13, 1.0 + 3 * 2.0**-14, -(1.0 + 3 * 2.0**-14), 0.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(fp8.round_mantissa(v, 13), torch.tensor(
        [1.0 + 2.0**-13, 1.0 + 2.0**-12, -(1.0 + 2.0**-12), 0.0, 3.0], dtype=torch.float64), rtol=0, atol=0)
    assert fp8.round_mantissa(v, 13, "toward_zero")[1] == 1.0 + 2.0**-13


@given(st.integers(1, 2), st.integers(1, 150), st.integers(1, 300), st.integers(1, 300), st.integers(0, 2**16))
def test_fp8_linear_forward_and_backward_within_bound_of_float64_autograd(b, m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    x, w, gy = torch.randn(b, m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(b, m, n, generator=g)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = x64 @ w64.T
    y64.backward(gy.double())

    y = fp8.fp8_linear_forward(x, w)
    assert y.shape == (b, m, n) and y.dtype == torch.bfloat16
    x2, gy2 = x.reshape(-1, k), gy.reshape(-1, n)
    fb = gemm_bound(x2, act_scale_full(x2), w, fp8.expand_block_scale(fp8.weight_quant(w)[1], n, k), 2.0**-8)
    assert ((y.reshape(-1, n).double() - y64.detach().reshape(-1, n)).abs() <= fb).all()

    dx, dw = fp8.fp8_linear_backward(gy, x, w)
    assert dx.shape == x.shape and dw.shape == w.shape
    # Dgrad: dY 1x128 along N, Wᵀ in 128x128 blocks (the forward's blocks transposed)
    wt_scale = fp8.expand_block_scale(fp8.weight_quant(w)[1].T, k, n)
    db = gemm_bound(gy2, act_scale_full(gy2), w.T, wt_scale, U32)
    assert ((dx.reshape(-1, k).double() - x64.grad.reshape(-1, k)).abs() <= db).all()
    # Wgrad: dYᵀ and Xᵀ both 1x128 along M (= dY, X in 128x1 tiles)
    wb = gemm_bound(gy2.T, act_scale_full(gy2.T), x2.T, act_scale_full(x2.T), U32)
    assert ((dw.double() - w64.grad).abs() <= wb).all()


def test_fp8_linear_backward_error_is_small_normwise():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(256, 512, generator=g), torch.randn(384, 512, generator=g)
    gy = torch.randn(256, 384, generator=g)
    dx, dw = fp8.fp8_linear_backward(gy, x, w)
    ref_dx, ref_dw = gy.double() @ w.double(), gy.double().T @ x.double()
    rel_dx = ((dx.double() - ref_dx).norm() / ref_dx.norm()).item()
    rel_dw = ((dw.double() - ref_dw).norm() / ref_dw.norm()).item()
    print(f"fp8 linear backward normwise rel. error: dX {rel_dx:.3e}, dW {rel_dw:.3e}")
    assert rel_dx < 0.06 and rel_dw < 0.06
