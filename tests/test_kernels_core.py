"""Core Triton kernels (norm, rope, swiglu, router, MLA decode, prefill attention) against dsv3c.ops.ref.

Every kernel runs the way lowering runs it: `dsv3c.codegen.lowering.run_op` specialises the op (or a kernel
variant no op lowers to alone: rms_norm_quant, swiglu_quant, mla_decode_paged) for the tensors' shapes with
the target's tiles (overridden per test where block sizes are drawn) and runs its runner, on the CPU under
TRITON_INTERPRET=1 (tests/conftest.py), on drawn small shapes, ragged ones included. Tolerances:
- rmsnorm, rope, swiglu: float32 within 1e-5 (reduction order); bfloat16 within one bf16 ulp (2^-7 rel.).
- fused quantisation vs fp8.act_quant of the reference: scales within 1e-5 rel.; e4m3 values within one
  e4m3 step, at least 99 % bit-equal.
- router: ids equal; weights within 1e-5 rel.
- attention (decode, prefill): float32 within 1e-4; bfloat16 within 3e-2 abs./rel. (p is rounded to bf16
  before the p·V product, as on tensor cores).
Plus one test compiling a specialisation of each kernel (`lowering.aot_specs`) for sm_90a without a GPU
and reading its PTX.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from dsv3c.codegen.kernels.mla_decode import PAGE
from dsv3c.codegen.lowering import aot_specs, run_op
from dsv3c.ops import fp8, ref

DTYPES = st.sampled_from([torch.float32, torch.bfloat16])


def _close(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """out ≈ want: 1e-5 for float32, one bf16 ulp for bfloat16."""
    assert out.dtype == want.dtype and out.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 else 2.0**-7
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=1e-5)


def _fp8_close(q: torch.Tensor, s: torch.Tensor, want_q: torch.Tensor, want_s: torch.Tensor) -> None:
    """(q, s) ≈ (want_q, want_s): scales to 1e-5 rel., e4m3 values within one step and ≥ 99 % identical."""
    assert q.dtype == torch.float8_e4m3fn and q.shape == want_q.shape and s.shape == want_s.shape
    torch.testing.assert_close(s, want_s, rtol=1e-5, atol=0)
    a, b = q.float(), want_q.float()
    step = torch.exp2(torch.floor(torch.log2(b.abs().clamp_min(2.0**-6))) - 3)
    assert ((a - b).abs() <= step).all()
    assert (a == b).float().mean() >= 0.99


def _gen(seed: int) -> torch.Generator:
    """A seeded CPU generator."""
    return torch.Generator().manual_seed(seed)


@given(rows=st.integers(1, 5), n=st.integers(1, 600), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_rmsnorm(rows, n, dtype, seed):
    g = _gen(seed)
    x = (torch.randn(rows, 2, n, generator=g) * 3).to(dtype)
    w = torch.randn(n, generator=g).to(dtype)
    _close(run_op("rms_norm", x, w, eps=1e-6), ref.rms_norm(x, w, 1e-6), dtype)


@given(rows=st.integers(1, 5), n=st.integers(1, 600), dtype=DTYPES, pow2=st.booleans(), seed=st.integers(0, 2**16))
def test_rmsnorm_quant(rows, n, dtype, pow2, seed):
    g = _gen(seed)
    x = (torch.randn(rows, n, generator=g) * 3).to(dtype)
    w = torch.randn(n, generator=g).to(dtype)
    q, s = run_op("rms_norm_quant", x, w, eps=1e-6, pow2_scale=pow2)
    _fp8_close(q, s, *fp8.act_quant(ref.rms_norm(x, w, 1e-6), pow2_scale=pow2))


@given(b=st.integers(1, 2), s=st.integers(1, 5), h=st.one_of(st.none(), st.integers(1, 21)), half=st.integers(1, 40),
       dtype=DTYPES, strided=st.booleans(), seed=st.integers(0, 2**16))
def test_rope(b, s, h, half, dtype, strided, seed):
    g = _gen(seed)
    heads = () if h is None else (h,)
    full = torch.randn(b, s, *heads, 2 * half + (8 if strided else 0), generator=g).to(dtype)
    x = full[..., 8:] if strided else full  # q_pe is the tail of each head's q: a strided view
    angle = torch.randn(b, s, half, generator=g) * 4
    _close(run_op("rope", x, angle.cos(), angle.sin()), ref.rope(x, angle.cos(), angle.sin()), dtype)


@given(m=st.integers(1, 9), f=st.integers(1, 700), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_swiglu(m, f, dtype, seed):
    gate_up = (torch.randn(m, 2 * f, generator=_gen(seed)) * 3).to(dtype)  # the fused GEMM output: two views
    gate, up = gate_up[:, :f], gate_up[:, f:]
    _close(run_op("swiglu", gate, up), ref.swiglu(gate, up), dtype)


@given(m=st.integers(1, 9), f=st.integers(1, 700), dtype=DTYPES, pow2=st.booleans(), seed=st.integers(0, 2**16))
def test_swiglu_quant(m, f, dtype, pow2, seed):
    g = _gen(seed)
    gate, up = (torch.randn(2, m, f, generator=g) * 3).to(dtype)
    q, s = run_op("swiglu_quant", gate, up, pow2_scale=pow2)
    _fp8_close(q, s, *fp8.act_quant(ref.swiglu(gate, up), pow2_scale=pow2))


def _moe_gate(x, w, bias, n_group, topk_group, top_k, norm, scaling):
    """The moe_gate op's lowering: the FP32 router GEMM in torch, then the Triton selection kernel."""
    return run_op("moe_gate", x, w, bias, n_group=n_group, topk_group=topk_group, top_k=top_k,
                  norm_topk_prob=norm, scaling=scaling)


@st.composite
def _routing(draw):
    """(n_group, group_size, topk_group, top_k) of a valid group-limited routing."""
    n_group = draw(st.sampled_from([1, 2, 3, 4, 8]))
    group_size = draw(st.integers(1, 9))
    topk_group = draw(st.integers(1, n_group))
    top_k = draw(st.integers(1, min(8, topk_group * group_size)))
    return n_group, group_size, topk_group, top_k


@given(t=st.integers(1, 40), cfg=_routing(), norm=st.booleans(), seed=st.integers(0, 2**16))
def test_router(t, cfg, norm, seed):
    n_group, group_size, topk_group, top_k = cfg
    e, g = n_group * group_size, _gen(seed)
    x, w = torch.randn(t, 16, generator=g), torch.randn(e, 16, generator=g) * 0.3
    bias = torch.randn(e, generator=g) * 0.1
    biased = torch.sigmoid(x @ w.t()) + bias
    assume(all(row.unique().numel() == e for row in biased))  # distinct values: selection is well defined
    want_w, want_ids = ref.moe_gate(x, w, bias, n_group, topk_group, top_k, norm, 2.5)
    got_w, got_ids = _moe_gate(x, w, bias, n_group, topk_group, top_k, norm, 2.5)
    assert got_ids.dtype == torch.int64 and torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-7)


def test_router_671b_shape():
    x, w = torch.randn(33, 64), torch.randn(256, 64) * 0.2
    bias = torch.randn(256) * 0.05
    want = ref.moe_gate(x, w, bias, 8, 4, 8, True, 2.5)
    got = _moe_gate(x, w, bias, 8, 4, 8, True, 2.5)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-7)


def _paged(lens: list[int], width: int, dtype: torch.dtype, g: torch.Generator):
    """(kv_cache [pages, 64, width], block_table [B, max_blocks] int32) with pages scattered at random."""
    per_seq = [math.ceil(n / PAGE) for n in lens]
    total = sum(per_seq) + 2
    cache = torch.randn(total, PAGE, width, generator=g).to(dtype)
    order = torch.randperm(total, generator=g).to(torch.int32)
    table = torch.full((len(lens), max(per_seq)), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(per_seq):
        table[b, :n] = order[used: used + n]
        used += n
    return cache, table


def _gather_pages(kv_cache: torch.Tensor, block_table: torch.Tensor, length: int, b: int) -> torch.Tensor:
    """Sequence b's first `length` cache rows [length, R + DR], gathered from its pages."""
    pages = block_table[b, : math.ceil(length / PAGE)].long()
    return kv_cache[pages].reshape(-1, kv_cache.shape[-1])[:length]


def _check_decode(bsz, heads, rank, dr, lens, dtype, splits, block_h, seed):
    """MLA decode over a scattered paged cache (the mla_decode_paged variant, NUM_SPLITS and BLOCK_H forced)
    against ref.latent_attention (S = 1) on each sequence's gathered pages."""
    g = _gen(seed)
    cache, table = _paged(lens, rank + dr, dtype, g)
    q_lat = torch.randn(bsz, heads, rank, generator=g).to(dtype)
    q_pe = torch.randn(bsz, heads, dr, generator=g).to(dtype)
    scale = (rank + dr) ** -0.5
    out = run_op("mla_decode_paged", q_lat, q_pe, cache, table, torch.tensor(lens, dtype=torch.int32),
                 scale=scale, mode="decode", tiles={"mla_decode": {"NUM_SPLITS": splits, "BLOCK_H": block_h,
                                                                   "BLOCK_N": 32}})
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for b, n in enumerate(lens):
        kv = _gather_pages(cache, table, n, b)[None]
        want = ref.latent_attention(q_lat[b, None, None], q_pe[b, None, None], kv[..., :rank], kv[..., rank:], scale)
        torch.testing.assert_close(out[b].float(), want[0, 0].float(), rtol=tol, atol=tol)


@given(bsz=st.integers(1, 3), heads=st.integers(1, 40), rank=st.sampled_from([32, 64]),
       lens=st.lists(st.integers(1, 200), min_size=3, max_size=3), dtype=DTYPES, splits=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_mla_decode(bsz, heads, rank, lens, dtype, splits, seed):
    _check_decode(bsz, heads, rank, 16, lens[:bsz], dtype, splits, 16, seed)


def test_mla_decode_671b_dims():
    _check_decode(2, 20, 512, 64, [130, 64], torch.bfloat16, 2, 16, 0)


def _check_prefill(b, s, p, h, dqk, dv, dtype, block_m, block_n, seed):
    """The mla_attention op (prefill kernel, BLOCK_M x BLOCK_N forced) against ref.mla_attention with a cached
    prefix of p keys."""
    g = _gen(seed)
    q = torch.randn(b, s, h, dqk, generator=g).to(dtype)
    k = torch.randn(b, p + s, h, dqk, generator=g).to(dtype)
    v = torch.randn(b, p + s, h, dv, generator=g).to(dtype)
    scale = dqk**-0.5
    out = run_op("mla_attention", q, k, v, scale=scale,
                 tiles={"attention_prefill": {"BLOCK_M": block_m, "BLOCK_N": block_n}})
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref.mla_attention(q, k, v, scale).float(), rtol=tol, atol=tol)


@given(b=st.integers(1, 2), s=st.integers(1, 40), p=st.integers(0, 40), h=st.integers(1, 3),
       dims=st.sampled_from([(48, 32), (40, 24), (32, 16), (24, 40)]), dtype=DTYPES,
       blocks=st.sampled_from([(16, 16), (32, 16), (16, 32)]), seed=st.integers(0, 2**16))
def test_prefill_attention(b, s, p, h, dims, dtype, blocks, seed):
    _check_prefill(b, s, p, h, *dims, dtype, *blocks, seed)


def test_prefill_attention_671b_dims():
    _check_prefill(1, 33, 19, 2, 192, 128, torch.bfloat16, 16, 32, 0)


@pytest.mark.parametrize("dqk, dv", [(12, 8), (12, 16), (8, 8)])
def test_prefill_attention_heads_narrower_than_a_dot(dqk, dv):
    """dqk < 16, the smallest tl.dot: the first chunk must stop at the head (it read the next head's values)."""
    _check_prefill(1, 5, 3, 3, dqk, dv, torch.float32, 16, 16, 0)


def _specs():
    """(label, AOTSpec, PTX must contain) for one small specialisation of every kernel here (671B widths)."""
    bf, f32 = torch.bfloat16, torch.float32
    norm = [((64, 7168), bf), ((7168,), bf)]
    glu = [((64, 2048), bf)] * 2
    gate = [((64, 7168), bf), ((256, 7168), bf), ((256,), f32)]
    routing = dict(n_group=8, topk_group=4, top_k=8, norm_topk_prob=True, scaling=2.5)
    latent = [((4, 1, 128, 512), bf), ((4, 1, 128, 64), bf), ((4, 4096, 512), bf), ((4, 4096, 64), bf)]
    plain = [((1, 256, 128, 192), bf)] * 2 + [((1, 256, 128, 128), bf)]
    return [
        ("rmsnorm", *aot_specs("rms_norm", norm, {"eps": 1e-6}), None),
        ("rmsnorm_quant", *aot_specs("rms_norm_quant", norm, {"eps": 1e-6}), "cvt.rn.satfinite.e4m3x2"),
        ("rope", *aot_specs("rope", [((1, 64, 128, 64), bf), ((1, 64, 32), f32), ((1, 64, 32), f32)]), None),
        ("swiglu", *aot_specs("swiglu", glu), None),
        ("swiglu_quant", *aot_specs("swiglu_quant", glu), "cvt.rn.satfinite.e4m3x2"),
        ("router", *aot_specs("moe_gate", gate, routing), None),
        ("mla_decode", aot_specs("latent_attention", latent, {"scale": 0.1352}, mode="decode")[0], "mma"),
        ("prefill_attention", *aot_specs("mla_attention", plain, {"scale": 192**-0.5}), "wgmma"),
    ]


_AOT_CHILD = """
import json, sys
from pathlib import Path
from dsv3c.codegen.triton_aot import compile_aot
from tests.test_kernels_core import _specs
out = Path(sys.argv[1])
records = {label: compile_aot(spec, out / label, out / "cache") for label, spec, _ in _specs()}
(out / "records.json").write_text(json.dumps(records))
"""


def test_aot_sm90a(tmp_path):
    # One child process without TRITON_INTERPRET compiles every spec in-process (jit kernels, no GPU):
    # much cheaper than the adapter's one child per interpreted kernel.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _AOT_CHILD, str(tmp_path)], cwd=root, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = json.loads((tmp_path / "records.json").read_text())
    for label, _, needle in _specs():
        rec = records[label]
        assert rec["arch"] == "sm_90a", label
        ptx = (tmp_path / label / rec["files"]["ptx"]).read_text()
        assert ".target sm_90a" in ptx, label
        if needle == "mma":  # tensor cores: Hopper wgmma, or mma.sync for tiles too small for a warpgroup
            assert "mma.sync.aligned" in ptx or "wgmma.mma_async" in ptx, label
        elif needle:
            assert needle in ptx, (label, needle)


@pytest.mark.parametrize("splits", [1, 4])
def test_mla_decode_empty_splits(splits):
    # more splits than token blocks: some splits own no tokens and must drop out of the combine
    _check_decode(2, 17, 32, 16, [1, 33], torch.float32, splits, 16, 1)
