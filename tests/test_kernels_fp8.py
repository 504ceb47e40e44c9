"""The FP8 Triton kernels under the interpreter against dsv3c.ops.fp8, and their sm_90a AOT compile.

Kernels run through `dsv3c.codegen.lowering.run_op` (the act_quant and fp8_gemm ops; grouped_fp8_gemm, which
only the MoE ops launch, as a kernel variant), with tile overrides for the drawn block sizes; AOT specs come
from `lowering.aot_specs`, i.e. from the same KernelSpecs lowering compiles.
"""

import re
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsv3c.codegen.lowering import aot_specs, run_op
from dsv3c.codegen.triton_aot import compile_aot
from dsv3c.ops import fp8

FP8, F32, BF16 = torch.float8_e4m3fn, torch.float32, torch.bfloat16


def randn(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """Seeded standard-normal float32 tensor times scale."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def quantised(seed: int, m: int, n: int, k: int):
    """(xq, xs, wq, ws) of random x [m, k], w [n, k]."""
    return (*fp8.act_quant(randn(seed, m, k)), *fp8.weight_quant(randn(seed + 1, n, k)))


def assert_gemm_close(y: torch.Tensor, ref32: torch.Tensor, xq, xs, wq, ws):
    """y (bf16) is ref32 rounded to bf16, up to FP32 summation-order differences (bounded by K·2^-23·Σ|x||w|)."""
    xd = fp8.act_dequant(xq, xs).double().abs()
    wd = fp8.weight_dequant(wq, ws).double().abs()
    order = (xq.shape[-1] + 4) * 2.0**-23 * (xd @ wd.T)
    bound = 2.0**-8 * (ref32.double().abs() + order) + order
    assert ((y.double() - ref32.double()).abs() <= bound).all()


@given(st.integers(1, 70), st.integers(1, 300), st.sampled_from([torch.float32, torch.bfloat16]),
       st.booleans(), st.floats(-10, 10), st.integers(0, 2**16))
def test_act_quant_kernel_matches_reference_bitwise(m, k, dtype, pow2, log_mag, seed):
    x = randn(seed, m, k, scale=2.0**log_mag).to(dtype)
    q, s = run_op("act_quant", x, pow2_scale=pow2)
    rq, rs = fp8.act_quant(x, pow2_scale=pow2)
    assert q.dtype == torch.float8_e4m3fn and s.shape == rs.shape
    assert torch.equal(s, rs)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


def test_act_quant_kernel_leading_dims_and_edge_values():
    x = torch.zeros(2, 3, 200)
    x[0, 0, :128] = -3.7
    x[1, 2, 7] = 1e4
    x[1, 1] = torch.linspace(-1, 1, 200) * 447.99
    q, s = run_op("act_quant", x)
    rq, rs = fp8.act_quant(x)
    assert q.shape == x.shape and s.shape == (2, 3, 2)
    assert torch.equal(s, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


@given(st.integers(1, 80), st.integers(1, 300), st.integers(1, 300),
       st.sampled_from([(16, 32), (32, 64), (None, None)]), st.integers(0, 2**16))
def test_fp8_gemm_kernel_matches_reference(m, n, k, tiles, seed):
    xq, xs, wq, ws = quantised(seed, m, n, k)
    over = None if tiles[0] is None else {"fp8_gemm": {"BLOCK_M": tiles[0], "BLOCK_N": tiles[1]}}
    y = run_op("fp8_gemm", xq, xs, wq, ws, out_dtype=BF16, tiles=over)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert_gemm_close(y, fp8.fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32), xq, xs, wq, ws)


def test_fp8_gemm_kernel_leading_dims():
    x, w = randn(0, 2, 3, 130), randn(1, 70, 130)
    xq, xs = fp8.act_quant(x)
    wq, ws = fp8.weight_quant(w)
    y = run_op("fp8_gemm", xq, xs, wq, ws, out_dtype=BF16)
    assert y.shape == (2, 3, 70)
    ref = fp8.fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32)
    assert_gemm_close(y.reshape(6, 70), ref.reshape(6, 70), xq.reshape(6, 130), xs.reshape(6, 2), wq, ws)


@given(st.lists(st.integers(0, 40), min_size=1, max_size=5), st.integers(1, 200), st.integers(1, 300),
       st.sampled_from([16, 32]), st.integers(0, 2**16))
def test_grouped_fp8_gemm_kernel_matches_reference(counts, n, k, block_m, seed):
    t = sum(counts)
    offsets = torch.tensor([0] + counts).cumsum(0).to(torch.int32)
    xq, xs = fp8.act_quant(randn(seed, t, k))
    per_expert = [fp8.weight_quant(randn(seed + 1 + e, n, k)) for e in range(len(counts))]
    wq = torch.stack([q for q, _ in per_expert])
    ws = torch.stack([s for _, s in per_expert])
    y = run_op("grouped_fp8_gemm", xq, xs, wq, ws, offsets,
               tiles={"grouped_fp8_gemm": {"BLOCK_M": block_m, "BLOCK_N": 64}})
    ref = fp8.grouped_fp8_gemm(xq, xs, wq, ws, offsets, out_dtype=torch.float32)
    assert y.shape == (t, n) and y.dtype == torch.bfloat16
    for e in range(len(counts)):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        assert_gemm_close(y[lo:hi], ref[lo:hi], xq[lo:hi], xs[lo:hi], wq[e], ws[e])


WGMMA_E4M3 = re.compile(r"^\s*wgmma\.mma_async\S*\.e4m3\.e4m3\b.*$", re.M)


def test_aot_fp8_gemm_sm90a_uses_wgmma_e4m3_and_caches(tmp_path):
    (spec,) = aot_specs("fp8_gemm", [((4096, 2048), FP8), ((4096, 16), F32), ((7168, 2048), FP8), ((56, 16), F32)],
                        {"out_dtype": BF16})
    t0 = time.perf_counter()
    rec = compile_aot(spec, tmp_path / "a", tmp_path / "cache")
    t1 = time.perf_counter()
    rec2 = compile_aot(spec, tmp_path / "b", tmp_path / "cache")
    t2 = time.perf_counter()
    print(f"AOT fp8_gemm: first compile {t1 - t0:.2f} s, cached {t2 - t1:.3f} s; shared {rec['shared_bytes']} B")

    assert rec["arch"] == "sm_90a" and rec["name"] == "fp8_gemm_kernel"
    assert set(rec["files"]) == {"ttir", "ttgir", "llir", "ptx", "cubin"}
    assert rec["num_warps"] == spec.num_warps and rec["num_stages"] == spec.num_stages and rec["shared_bytes"] > 0
    ptx = (tmp_path / "a" / rec["files"]["ptx"]).read_text()
    assert re.search(r"^\s*\.target\s+sm_90a\b", ptx, re.M)
    wgmma = WGMMA_E4M3.findall(ptx)
    assert wgmma, "no e4m3 wgmma in the PTX: " + "; ".join(ln.strip() for ln in ptx.splitlines() if "mma" in ln)[:500]
    # The first WGMMA of each 128-K dot starts from a zero accumulator (scale-d = 0): the partial
    # sum is promoted to the FP32 registers after 4 k32 WGMMAs rather than accumulated in place.
    assert any(re.search(r"\}, %rd\d+, %rd\d+, 0, 1, 1;", w) for w in wgmma), wgmma[0][:200]
    assert (tmp_path / "a" / rec["files"]["cubin"]).stat().st_size > 0

    assert rec2 == rec and t2 - t1 < (t1 - t0) / 5
    for rel in rec["files"].values():
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


# the 671B shapes: act_quant of 4096 tokens' hidden states; gate_up of 4096 x 8 routed copies over 256 experts
OTHER_FP8 = {
    "act_quant": [((4096, 7168), BF16)],
    "grouped_fp8_gemm": [((32768, 7168), FP8), ((32768, 56), F32), ((256, 4096, 7168), FP8), ((256, 32, 56), F32),
                         ((257,), torch.int32)],
}


@pytest.mark.parametrize("op", list(OTHER_FP8))
def test_aot_other_fp8_kernels_compile_for_sm90a(tmp_path, op):
    (spec,) = aot_specs(op, OTHER_FP8[op])
    rec = compile_aot(spec, tmp_path, tmp_path / "cache")
    assert rec["arch"] == "sm_90a" and (tmp_path / rec["files"]["cubin"]).stat().st_size > 0
    ptx = (tmp_path / rec["files"]["ptx"]).read_text()
    if op == "grouped_fp8_gemm":
        assert WGMMA_E4M3.search(ptx)
    else:  # hardware round-to-nearest-even FP32 -> E4M3 conversion, correctly rounded division
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and "div.rn.f32" in ptx
