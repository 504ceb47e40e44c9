"""PROVISIONAL kernel and link times (flat efficiencies) with the calibrated layer's interface; replaced on merge."""

import math

CONSTANTS = {
    "gemm_eta": (0.7, "fraction", "assumed", "provisional", 0.6, 0.8, "high"),
    "hbm_eta": (0.8, "fraction", "assumed", "provisional", 0.7, 0.9, "high"),
    "attn_eta": (0.55, "fraction", "assumed", "provisional", 0.45, 0.65, "high"),
    "launch_us": (4.0, "us", "assumed", "provisional", 2.0, 6.0, "low"),
    "ib_GBps": (50.0, "GB/s", "measured", "provisional", 43.0, 58.0, "high"),
    "nvlink_GBps": (160.0, "GB/s", "measured", "provisional", 153.0, 158.0, "high"),
    "ep_alpha_us": (10.0, "us", "assumed", "provisional", 5.0, 20.0, "low"),
    "ll_dispatch_us_128": (194.0, "us", "measured", "provisional", 77.0, 194.0, "low"),
    "ll_combine_us_128": (369.0, "us", "measured", "provisional", 114.0, 369.0, "low"),
    "p2p_alpha_us": (10.0, "us", "assumed", "provisional", 5.0, 20.0, "low"),
    "coll_alpha_us": (10.0, "us", "assumed", "provisional", 5.0, 20.0, "low"),
}


def _roof(flops, nbytes, gpu, sms, c, peak):
    return c["launch_us"] * 1e-6 + max(flops / (peak * sms / gpu.sms * c["gemm_eta"]),
                                       nbytes / (gpu.hbm_bandwidth * c["hbm_eta"]))


def gemm_seconds(m, n, k, *, groups=1, dtype="fp8", layout="dense", gpu, sms, c):
    """[m,k]x[n,k]^T per group."""
    b = 1 if dtype == "fp8" else 2
    return _roof(2 * groups * m * n * k, groups * (m * k * b + n * k * b + m * n * 2), gpu, sms, c,
                 gpu.peak_flops("fp8" if dtype == "fp8" else "bf16"))


def attention_seconds(*, b, h, s, t, dqk, dv, causal=True, direction="fwd", gpu, sms, c):
    """Flash attention of b sequences."""
    pairs = s * (t - s) + s * (s + 1) // 2 if causal else s * t
    flops = 2 * b * h * pairs * (dqk + dv) * (2.5 if direction == "bwd" else 1)
    return c["launch_us"] * 1e-6 + flops / (gpu.bf16_flops * sms / gpu.sms * c["attn_eta"])


def mla_decode_seconds(*, b, s, t, h, r, dr, gpu, sms, c):
    """Absorbed MLA decode."""
    flops = 2 * b * h * s * t * (2 * r + dr)
    return c["launch_us"] * 1e-6 + max(flops / (gpu.bf16_flops * sms / gpu.sms * c["attn_eta"]),
                                       b * t * (r + dr) * 2 / (gpu.hbm_bandwidth * c["hbm_eta"]))


def memory_seconds(nbytes, *, gpu, c):
    """Memory-bound kernel."""
    return c["launch_us"] * 1e-6 + nbytes / (gpu.hbm_bandwidth * c["hbm_eta"])


def launch_seconds(n_kernels, c):
    """Launch gaps."""
    return 0.0 * n_kernels


def ep_normal_seconds(rdma_bytes, nvlink_bytes, *, ep, gpus_per_node, phase, comm_sms, c):
    """DeepEP normal kernels."""
    if ep <= 1:
        return 0.0
    return c["ep_alpha_us"] * 1e-6 + max(rdma_bytes / (c["ib_GBps"] * 1e9), nvlink_bytes / (c["nvlink_GBps"] * 1e9))


def ep_low_latency_seconds(tokens, *, top_k, hidden, ep, phase, c):
    """DeepEP low-latency kernels."""
    if ep <= 1:
        return 0.0
    full = c["ll_dispatch_us_128"] if phase == "dispatch" else c["ll_combine_us_128"]
    return 1e-6 * (c["ep_alpha_us"] + (full - c["ep_alpha_us"]) * tokens * top_k / (128 * 8))


def p2p_seconds(nbytes, *, link="ib", c):
    """NCCL send/recv."""
    return c["p2p_alpha_us"] * 1e-6 + nbytes / ((c["ib_GBps"] if link == "ib" else c["nvlink_GBps"]) * 1e9)


def reduce_scatter_seconds(nbytes, *, ranks, ranks_per_node, c):
    """Ring reduce-scatter of nbytes (the whole buffer) over ranks."""
    if ranks <= 1:
        return 0.0
    bw = c["nvlink_GBps"] if ranks <= ranks_per_node else c["ib_GBps"]
    return 2 * (ranks - 1) * c["coll_alpha_us"] * 1e-6 / 2 + nbytes * (ranks - 1) / ranks / (bw * 1e9)


def all_gather_seconds(nbytes, *, ranks, ranks_per_node, c):
    """Ring all-gather of nbytes (the whole buffer) over ranks."""
    return reduce_scatter_seconds(nbytes, ranks=ranks, ranks_per_node=ranks_per_node, c=c)


def calibration_note(gpu) -> str:
    """Provisional."""
    return "provisional flat efficiencies"


assert math
