"""GPU benchmark of dsv3c's Triton kernels against torch baselines on the 671B model's shapes.

    python bench/kernels.py                 # every family, one table
    python bench/kernels.py --only gemm,mla_decode

Each row: the Triton kernel's time (triton.testing.do_bench, median ms) and throughput (TFLOPS for
GEMMs and attention, GB/s of compulsory traffic for memory-bound kernels), the baseline's, and
ratio = baseline ms / Triton ms (> 1: Triton faster). For MLA decode the baseline is the device's
measured copy bandwidth (torch copy of a large buffer): the ratio is the fraction of it achieved.
"check" compares the Triton output with the baseline's (or the reference's) on the same inputs.
Needs a CUDA GPU (Hopper for FP8); exits with status 2 when there is none.

Kernels run as lowering runs them: `lowering.call_spec` specialises the op (or kernel variant) once for the
bench's shapes on TARGET's tiles, and the timed call is `lowering.run_call` (the op's runner: its
allocations and torch parts, e.g. the router's FP32 GEMM, included). The router's selection kernel alone is
timed by launching the moe_gate CallSpec's KernelSpec on precomputed logits.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

FAMILIES = ("gemm", "grouped_gemm", "mla_decode", "prefill", "rmsnorm", "rope", "swiglu", "router")
HIDDEN, EXPERT_WIDTH, EXPERTS, HEADS, RANK, ROPE_DIM = 7168, 2048, 256, 128, 512, 64
ROWS: list[tuple] = []
TARGET = "h800x2048"


def _op(op: str, *tensors, mode: str = "prefill", tiles: dict | None = None, **attrs):
    """A no-argument callable running op's lowered kernels on tensors (specialised once, outside the timing)."""
    from dsv3c.codegen import lowering

    call = lowering.call_spec(op, *tensors, target=TARGET, mode=mode, tiles=tiles, **attrs)
    return lambda: lowering.run_call(call, *tensors)


def _bench(fn) -> float:
    """Median milliseconds of fn() by triton.testing.do_bench."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _check(out: torch.Tensor, want: torch.Tensor, tol: float) -> str:
    """'ok' when out ≈ want (max abs error ≤ tol · max |want|), else the relative error."""
    err = (out.float() - want.float()).abs().max().item() / max(want.float().abs().max().item(), 1e-30)
    return "ok" if err <= tol else f"err {err:.2e}"


def _row(kernel, shape, t_ms, perf, unit, base, b_ms, b_perf, check="") -> None:
    """Records and prints one table row."""
    row = (kernel, shape, t_ms, perf, unit, base, b_ms, b_perf, b_ms / t_ms, check)
    ROWS.append(row)
    print(f"{kernel:<22} {shape:<30} {t_ms:9.4f} {perf:9.1f} {unit:<7} {base:<28} {b_ms:9.4f} {b_perf:9.1f} "
          f"{row[8]:7.2f}  {check}", flush=True)


def _header() -> None:
    """Prints the table header."""
    print(f"{'kernel':<22} {'shape':<30} {'triton ms':>9} {'perf':>9} {'unit':<7} {'baseline':<28} "
          f"{'base ms':>9} {'perf':>9} {'ratio':>7}  check")


def _random_fp8_weights(experts: int, n: int, k: int, dev):
    """(wq [experts, n, k] e4m3, scales [experts, n/128, k/128]) of random N(0, 0.02²) bf16 weights."""
    from dsv3c.ops import fp8

    wq = torch.empty(experts, n, k, dtype=torch.float8_e4m3fn, device=dev)
    ws = torch.empty(experts, math.ceil(n / 128), math.ceil(k / 128), device=dev)
    for e in range(experts):  # one expert at a time: the bf16 weights of all 256 would take 15 GB
        wq[e], ws[e] = fp8.weight_quant(torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02)
    return wq, ws


def bench_gemm(dev) -> None:
    """FP8 block-scaled GEMM (Triton) vs torch._scaled_mm and vs cuBLAS BF16 at M=4096, N=7168, K=16384."""
    from dsv3c.ops import fp8

    m, n, k = 4096, HIDDEN, 16384
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    xq, xs = fp8.act_quant(x)
    wq, ws = fp8.weight_quant(w)
    flops = 2 * m * n * k
    gemm = _op("fp8_gemm", xq, xs, wq, ws, out_dtype=torch.bfloat16)
    t = _bench(gemm)
    y = gemm()
    shape = f"M{m} N{n} K{k}"

    xs_mmajor = xs.t().contiguous().t()  # cuBLAS wants the 1x128 scales M-major, the 128x128 ones K-major
    label, fn = "torch._scaled_mm blockwise", lambda: torch._scaled_mm(
        xq, wq.t(), scale_a=xs_mmajor, scale_b=ws.t(), out_dtype=torch.bfloat16)
    try:
        want = fn()
        check = _check(y, want, 2e-2)
    except (RuntimeError, ValueError):  # no blockwise cuBLAS (needs CUDA ≥ 12.9): row-wise scales instead
        one_a = torch.ones(m, 1, device=dev)
        one_b = torch.ones(1, n, device=dev)
        label, fn = "torch._scaled_mm rowwise", lambda: torch._scaled_mm(
            xq, wq.t(), scale_a=one_a, scale_b=one_b, out_dtype=torch.bfloat16)
        fn()
        check = "n/a (other scaling)"
    b = _bench(fn)
    _row("fp8_gemm", shape, t, flops / t / 1e9, "TFLOPS", label, b, flops / b / 1e9, check)
    wt = w.t()
    b = _bench(lambda: x @ wt)
    _row("fp8_gemm", shape, t, flops / t / 1e9, "TFLOPS", "cuBLAS bf16 matmul", b, flops / b / 1e9,
         _check(y, x @ wt, 5e-2))


def bench_grouped_gemm(dev) -> None:
    """Grouped FP8 GEMM over 256 experts (gate+up, 2·2048 x 7168) vs the dense FP8 GEMM of the same work."""
    from dsv3c.ops import fp8

    tokens, top_k = 4096, 8
    t_rows, n, k = tokens * top_k, 2 * EXPERT_WIDTH, HIDDEN
    counts = torch.full((EXPERTS,), t_rows // EXPERTS, dtype=torch.int64)
    offsets = torch.zeros(EXPERTS + 1, dtype=torch.int32, device=dev)
    offsets[1:] = counts.cumsum(0).to(torch.int32).to(dev)
    a = torch.randn(t_rows, k, device=dev, dtype=torch.bfloat16)
    aq, as_ = fp8.act_quant(a)
    wq, ws = _random_fp8_weights(EXPERTS, n, k, dev)
    flops = 2 * t_rows * n * k
    grouped = _op("grouped_fp8_gemm", aq, as_, wq, ws, offsets)
    t = _bench(grouped)
    y = grouped()
    lo, hi = int(offsets[3]), int(offsets[4])
    check = _check(y[lo:hi], _op("fp8_gemm", aq[lo:hi], as_[lo:hi], wq[3], ws[3], out_dtype=torch.bfloat16)(), 1e-2)
    b = _bench(_op("fp8_gemm", aq, as_, wq[0], ws[0], out_dtype=torch.bfloat16))
    _row("grouped_fp8_gemm", f"T{t_rows} E{EXPERTS} N{n} K{k}", t, flops / t / 1e9, "TFLOPS",
         f"dense fp8_gemm M{t_rows}", b, flops / b / 1e9, check)


def _copy_bandwidth(dev) -> float:
    """The device's copy bandwidth in GB/s (read + write) from torch copies of a 1 GiB buffer."""
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def bench_mla_decode(dev, block_h: int, block_n: int, num_warps: int) -> None:
    """Paged MLA decode attention (128 heads, 512 + 64 latent) vs the measured copy bandwidth."""
    from dsv3c.codegen.kernels.mla_decode import PAGE
    from dsv3c.ops import ref

    bw = _copy_bandwidth(dev)
    scale = 192**-0.5 * (0.1 * math.log(40.0) + 1.0) ** 2  # the 671B softmax scale (YaRN mscale), about 0.1352
    tiles = {"mla_decode": {"BLOCK_H": block_h, "BLOCK_N": block_n, "num_warps": num_warps}}
    for bsz, length in ((128, 4096), (8, 32768)):
        pages = bsz * math.ceil(length / PAGE)
        cache = torch.randn(pages, PAGE, RANK + ROPE_DIM, device=dev, dtype=torch.bfloat16)
        table = torch.randperm(pages, device=dev, dtype=torch.int32).view(bsz, -1)
        lens = torch.full((bsz,), length, dtype=torch.int32, device=dev)
        q_lat = torch.randn(bsz, HEADS, RANK, device=dev, dtype=torch.bfloat16)
        q_pe = torch.randn(bsz, HEADS, ROPE_DIM, device=dev, dtype=torch.bfloat16)

        run = _op("mla_decode_paged", q_lat, q_pe, cache, table, lens, scale=scale, mode="decode", tiles=tiles)
        t = _bench(run)
        out = run()
        kv = cache[table[0].long()].reshape(-1, RANK + ROPE_DIM)[None, :length]
        want = ref.latent_attention(q_lat[:1, None], q_pe[:1, None], kv[..., :RANK], kv[..., RANK:], scale)[:, 0]
        nbytes = (cache.numel() * 2 + q_lat.numel() * 2 + q_pe.numel() * 2 + out.numel() * 2 + table.numel() * 4)
        ideal = nbytes / bw / 1e6
        _row("mla_decode", f"B{bsz} L{length} H{HEADS} bh{block_h}", t, nbytes / t / 1e6, "GB/s",
             "copy bandwidth", ideal, bw, _check(out[:1], want, 2e-2))
        del cache


def bench_prefill(dev) -> None:
    """Causal prefill attention (q/k 192, v 128, 128 heads, 4096 tokens) vs torch SDPA."""
    import torch.nn.functional as F

    bsz, s, dqk, dv = 1, 4096, 192, 128
    q = torch.randn(bsz, s, HEADS, dqk, device=dev, dtype=torch.bfloat16)
    k = torch.randn(bsz, s, HEADS, dqk, device=dev, dtype=torch.bfloat16)
    v = torch.randn(bsz, s, HEADS, dv, device=dev, dtype=torch.bfloat16)
    scale = dqk**-0.5
    flops = 2 * bsz * HEADS * (s * (s + 1) // 2) * (dqk + dv)
    attend = _op("mla_attention", q, k, v, scale=scale)
    t = _bench(attend)
    out = attend()
    qt, kt, vt = (z.transpose(1, 2) for z in (q, k, v))  # SDPA takes [B, H, S, d]; no copies

    label = "torch SDPA"

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)

    try:
        want = sdpa()
    except RuntimeError:  # no SDPA backend for v narrower than q/k here: pad v to 192, drop the padding after
        label, vp = "torch SDPA (v padded to 192)", F.pad(vt, (0, dqk - dv))

        def sdpa():
            return F.scaled_dot_product_attention(qt, kt, vp, is_causal=True, scale=scale)[..., :dv]

        want = sdpa()
    b = _bench(sdpa)
    _row("prefill_attention", f"B{bsz} S{s} H{HEADS} d{dqk}/{dv}", t, flops / t / 1e9, "TFLOPS", label, b,
         flops / b / 1e9, _check(out, want.transpose(1, 2), 2e-2))


def _mem_row(kernel, shape, nbytes, triton_fn, base_label, base_fn, check) -> None:
    """Times a memory-bound kernel and its eager baseline; GB/s of nbytes for both."""
    t, b = _bench(triton_fn), _bench(base_fn)
    _row(kernel, shape, t, nbytes / t / 1e6, "GB/s", base_label, b, nbytes / b / 1e6, check)


def bench_rmsnorm(dev) -> None:
    """RMSNorm over 4096 x 7168 bf16 (and fused with 1x128 quantisation) vs torch eager."""
    from dsv3c.ops import fp8, ref

    m, n = 4096, HIDDEN
    x = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, device=dev, dtype=torch.bfloat16)
    norm, norm_quant = _op("rms_norm", x, w, eps=1e-6), _op("rms_norm_quant", x, w, eps=1e-6)
    _mem_row("rmsnorm", f"{m}x{n}", 4 * m * n + 2 * n, norm, "torch eager ref",
             lambda: ref.rms_norm(x, w, 1e-6), _check(norm(), ref.rms_norm(x, w, 1e-6), 1e-2))
    q, _ = norm_quant()
    want, _ = fp8.act_quant(ref.rms_norm(x, w, 1e-6))
    _mem_row("rmsnorm+act_quant", f"{m}x{n}", 3 * m * n + 2 * n + 4 * m * n // 128,
             norm_quant, "torch eager ref + act_quant",
             lambda: fp8.act_quant(ref.rms_norm(x, w, 1e-6)), _check(q.float(), want.float(), 0.07))


def bench_rope(dev) -> None:
    """Interleaved RoPE on q_pe [1, 4096, 128, 64] bf16 vs torch eager."""
    from dsv3c.ops import ref

    s, d = 4096, ROPE_DIM
    x = torch.randn(1, s, HEADS, d, device=dev, dtype=torch.bfloat16)
    angle = torch.randn(1, s, d // 2, device=dev)
    cos, sin = angle.cos(), angle.sin()
    rotate = _op("rope", x, cos, sin)
    _mem_row("rope", f"1x{s}x{HEADS}x{d}", 4 * s * HEADS * d + 8 * s * d // 2, rotate,
             "torch eager ref", lambda: ref.rope(x, cos, sin), _check(rotate(), ref.rope(x, cos, sin), 1e-2))


def bench_swiglu(dev) -> None:
    """SwiGLU over the routed experts' rows [32768, 2048] bf16 (and fused with quantisation) vs torch eager."""
    from dsv3c.ops import fp8, ref

    m, f = 4096 * 8, EXPERT_WIDTH
    gate_up = torch.randn(m, 2 * f, device=dev, dtype=torch.bfloat16)
    g, u = gate_up[:, :f], gate_up[:, f:]
    glu, glu_quant = _op("swiglu", g, u), _op("swiglu_quant", g, u)
    _mem_row("swiglu", f"{m}x{f}", 6 * m * f, glu, "torch eager ref",
             lambda: ref.swiglu(g, u), _check(glu(), ref.swiglu(g, u), 1e-2))
    q, _ = glu_quant()
    want, _ = fp8.act_quant(ref.swiglu(g, u))
    _mem_row("swiglu+act_quant", f"{m}x{f}", 5 * m * f + 4 * m * f // 128, glu_quant,
             "torch eager ref + act_quant", lambda: fp8.act_quant(ref.swiglu(g, u)),
             _check(q.float(), want.float(), 0.07))


def bench_router(dev) -> None:
    """Router (FP32 GEMM in torch + Triton selection) on 4096 tokens x 256 experts vs torch eager ref.moe_gate."""
    from dsv3c.codegen import lowering
    from dsv3c.ops import ref

    t = 4096
    x = torch.randn(t, HIDDEN, device=dev, dtype=torch.bfloat16)
    w = torch.randn(EXPERTS, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.01
    bias = torch.randn(EXPERTS, device=dev) * 0.01
    args = (8, 4, 8, True, 2.5)
    routing = dict(zip(("n_group", "topk_group", "top_k", "norm_topk_prob", "scaling"), args))
    call = lowering.call_spec("moe_gate", x, w, bias, target=TARGET, mode="prefill", **routing)
    gate = lambda: lowering.run_call(call, x, w, bias)  # noqa: E731
    got, want = gate(), ref.moe_gate(x, w, bias, *args)
    same = (got[1] == want[1]).float().mean().item()
    nbytes = 2 * t * HIDDEN + 2 * EXPERTS * HIDDEN + 12 * t * 8
    _mem_row("router (gemm+select)", f"T{t} E{EXPERTS} D{HIDDEN}", nbytes, gate,
             "torch eager ref.moe_gate", lambda: ref.moe_gate(x, w, bias, *args), f"ids equal {same:.4f}")
    logits = x.float() @ w.float().t()
    (select,) = call.kernels  # the selection kernel alone, on the runner's logits
    ws_out = torch.empty(t, 8, device=dev)
    ids_out = torch.empty(t, 8, dtype=torch.int64, device=dev)
    sel_bytes = 4 * t * EXPERTS + 12 * t * 8
    t_ms = _bench(lambda: select.launch(logits_ptr=logits, bias_ptr=bias, w_ptr=ws_out, id_ptr=ids_out, scaling=2.5))
    _row("router (select only)", f"T{t} E{EXPERTS}", t_ms, sel_bytes / t_ms / 1e6, "GB/s", "-", t_ms,
         sel_bytes / t_ms / 1e6)


def main(argv=None) -> int:
    """Parses the options, checks for a GPU, runs the chosen families and prints the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(FAMILIES), help=f"comma-separated families of {FAMILIES}")
    ap.add_argument("--mla-block-h", type=int, default=32, help="heads per MLA decode program (16, 32 or 64)")
    ap.add_argument("--mla-block-n", type=int, default=32, help="tokens per MLA decode tile (divides 64)")
    ap.add_argument("--mla-warps", type=int, default=8, help="warps per MLA decode program")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU (an H800/H100 for the FP8 kernels); none is available.",
              file=sys.stderr)
        return 2
    only = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = set(only) - set(FAMILIES)
    if unknown:
        ap.error(f"unknown families {sorted(unknown)}; choose from {FAMILIES}")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name(dev)}; torch {torch.__version__}")
    _header()
    runners = {
        "gemm": lambda: bench_gemm(dev), "grouped_gemm": lambda: bench_grouped_gemm(dev),
        "mla_decode": lambda: bench_mla_decode(dev, args.mla_block_h, args.mla_block_n, args.mla_warps),
        "prefill": lambda: bench_prefill(dev), "rmsnorm": lambda: bench_rmsnorm(dev),
        "rope": lambda: bench_rope(dev), "swiglu": lambda: bench_swiglu(dev), "router": lambda: bench_router(dev),
    }
    failed = 0
    for fam in only:
        try:
            runners[fam]()
        except Exception as exc:  # one family's failure must not hide the others' rows
            failed += 1
            print(f"{fam:<22} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  flush=True)
        torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
