"""The constants of the calibrated kernel and link times (`kernels.py`, `links.py`), with source and range.

CONSTANTS[name] = (value, unit, kind, citation, low, high, faster):
- kind: "measured" (someone ran it and published the figure), "datasheet" (a vendor's published figure or
  model constant), "fit" (fitted by `bench/fit_calibration.py` on the tables of `dsv3c.cost.measurements`;
  the value is what that script prints), "assumed" (our estimate, with the range we believe);
- (low, high): the published range; for a fit the value x exp(+-2 standard errors) from the least-squares
  covariance of the fit (what bench/fit_calibration.py prints); None where the figure is exact;
- faster: which end of (low, high) makes kernels and links faster ("high" or "low"), so that
  `bound_values("optimistic")` and `bound_values("pessimistic")` bracket a prediction.

Every function of kernels.py and links.py takes `c`, a plain mapping name -> value (None: `default_values()`),
so these constants can be merged into the project's one Constants table.
"""

from __future__ import annotations

from collections.abc import Mapping

from dsv3c.cost import measurements as M

_FIT = "fit by bench/fit_calibration.py to "
_DG = _FIT + "DeepGEMM's FP8 tables on H800 (README at a9967bc, 2025-04-09: 18 dense, 4 contiguous, 6 masked rows)"
_FA3 = _FIT + "FlashAttention-3's H100 forward (Fig. 5, head dims 128/256, causal and not) and backward (Fig. 6) TFLOPS"
_MLA = _FIT + "FlashMLA's H800 headline (3000 GB/s, 660 TFLOPS) and 5 H100 rows (achatbot #123)"
_LL = " latencies EP8-256 at 128 tokens, pure-RDMA (2025-02) and NVLink (2025-06) tables"
_LLD = _FIT + "DeepEP's low-latency dispatch" + _LL
_LLC = _FIT + "DeepEP's low-latency combine" + _LL
_DEN = "DeepEP normal kernels on H800, 24 SMs (README table of 2025-04-22)"
_NORMAL = {(ep, phase): float(gbps) for ep, phase, gbps, _ in M.DEEPEP_NORMAL}
_NCCL_LAT = M.NCCL_RING_BASE_US, M.NCCL_RING_STEP_US["ib"], M.NCCL_RING_STEP_US["nvlink"]

CONSTANTS: dict[str, tuple] = {
    # --- GEMMs (DeepGEMM) --------------------------------------------------------------------------------------
    "gemm_fixed_us": (2.037, "us", "fit", _DG + "; in-kernel fixed time (launch to first MMA, last store)",
                      1.335, 3.109, "low"),
    "gemm_tensor_efficiency": (0.7503, "fraction of peak", "fit",
                               _DG + "; tensor-core throughput of a full wave (H800 throttles to ~865/990 under "
                               "load: FlashMLA deep-dive)", 0.6777, 0.8306, "high"),
    "gemm_overlap": (0.4005, "fraction", "fit",
                     _DG + "; share of the shorter of compute and HBM time not hidden under the longer",
                     0.2376, 0.6752, "low"),
    "gemm_tile_fill_k": (234.2, "K elements", "fit",
                         _DG + "; per-tile pipeline fill and epilogue, as extra K", 93.04, 589.3, "low"),
    "gemm_hbm_efficiency": (0.90, "fraction of peak", "measured",
                            "HBM fraction of the GEMM's operand stream, held at the speed-of-light figure of "
                            "hbm_efficiency in the fit; low end DeepGEMM's best memory-bound row (M=64 N=7168 "
                            "K=16384: 2668 GB/s of 3350, fixed time included)", 0.7964, 0.90, "high"),
    "hbm_efficiency": (0.90, "fraction of peak", "measured",
                       "achieved/peak HBM of speed-of-light memory-bound kernels: QuACK softmax 3.01 of 3.35 TB/s "
                       "(89.7%, H100) and FlashMLA 3000 GB/s on H800; low end torch.compile's 1.89 TB/s (QuACK post)",
                       round(M.QUACK_TORCH_COMPILE_TBPS / 3.35, 3), 0.90, "high"),
    # --- attention (FlashAttention-3) ------------------------------------------------------------------------
    "attn_fwd_efficiency_hd128": (0.6857, "fraction of BF16 peak", "fit", _FA3 + "; forward, head dim 128",
                                  0.6627, 0.7095, "high"),
    "attn_fwd_efficiency_hd256": (0.7333, "fraction of BF16 peak", "fit", _FA3 + "; forward, head dim 256",
                                  0.7085, 0.759, "high"),
    "attn_bwd_efficiency_hd128": (0.5979, "fraction of BF16 peak", "fit",
                                  _FA3 + "; backward (dQ, dK, dV with score recomputation), head dim 128",
                                  0.5645, 0.6331, "high"),
    "attn_fwd_short_keys": (224.0, "pairs per query", "fit",
                            _FA3 + "; per-query overhead (work-unit fill, epilogue): short sequences are slower",
                            178.3, 281.4, "low"),
    "attn_bwd_short_keys": (427.2, "pairs per query", "fit", _FA3 + "; the same for the backward", 335.2, 544.4,
                            "low"),
    "attn_causal_extra_pairs": (131.9, "pairs per query", "fit",
                                _FA3 + "; causal work beyond the visible pairs (diagonal tiles computed in full: 64 "
                                "by geometry at 128x128 tiles; masking and imbalance the rest)", 90.0, 193.2, "low"),
    # --- MLA decode (FlashMLA) -------------------------------------------------------------------------------
    "mla_fixed_us": (16.58, "us", "fit", _MLA + "; fixed time (launch, split-KV combine)", 15.98, 17.21, "low"),
    "mla_hbm_efficiency": (0.9197, "fraction of peak", "fit", _MLA + "; HBM bandwidth of the latent-cache stream",
                           0.9175, 0.922, "high"),
    "mla_tensor_efficiency": (0.6874, "fraction of BF16 peak", "fit",
                              _MLA + "; tensor-core throughput. The fit's own spread is +-0.3% (4 constants, 7 rows, "
                              "3 distinct times); the range is the published kernel versions instead: 580 TFLOPS "
                              "(2025-02) vs 660 (2025-04)", 0.6041, 0.6874, "high"),
    "mla_overlap": (0.04347, "fraction", "fit", _MLA + "; share of the shorter of compute and HBM time not hidden",
                    0.03827, 0.04937, "low"),
    # --- launch ----------------------------------------------------------------------------------------------
    "kernel_launch_us": (2.0, "us/kernel", "assumed",
                         "gap between dependent kernels: " + M.LAUNCH_SOURCE, 0.5, 6.0, "low"),
    # --- DeepEP normal kernels (training, prefill) -----------------------------------------------------------
    "ep_normal_alpha_us": (50.0, "us", "assumed",
                           "fixed time of a normal dispatch/combine: a count exchange (notify) and the data round, "
                           "each about the low-latency kernels' fitted alpha (23-44 us), plus the CPU wait for counts "
                           "the DeepEP README describes; no published measurement found", 25.0, 150.0, "low"),
    "ep_normal_nvlink_dispatch_GBps": (_NORMAL[8, "dispatch"], "GB/s", "measured",
                                       _DEN + ": intranode EP8 dispatch, NVLink", None, None, "high"),
    "ep_normal_nvlink_combine_GBps": (_NORMAL[8, "combine"], "GB/s", "measured",
                                      _DEN + ": intranode EP8 combine, NVLink", None, None, "high"),
    "ep_normal_rdma_dispatch_ep16_GBps": (_NORMAL[16, "dispatch"], "GB/s", "measured",
                                          _DEN + ": internode EP16 dispatch, RDMA", None, None, "high"),
    "ep_normal_rdma_dispatch_ep32_GBps": (_NORMAL[32, "dispatch"], "GB/s", "measured",
                                          _DEN + ": internode EP32 dispatch, RDMA", None, None, "high"),
    "ep_normal_rdma_dispatch_ep64_GBps": (_NORMAL[64, "dispatch"], "GB/s", "measured",
                                          _DEN + ": internode EP64 dispatch, RDMA (held beyond EP64; low end the "
                                          "low-latency kernels' 39 GB/s at EP128-256)", 39.0, 51.0, "high"),
    "ep_normal_rdma_combine_ep16_GBps": (_NORMAL[16, "combine"], "GB/s", "measured",
                                         _DEN + ": internode EP16 combine, RDMA", None, None, "high"),
    "ep_normal_rdma_combine_ep32_GBps": (_NORMAL[32, "combine"], "GB/s", "measured",
                                         _DEN + ": internode EP32 combine, RDMA", None, None, "high"),
    "ep_normal_rdma_combine_ep64_GBps": (_NORMAL[64, "combine"], "GB/s", "measured",
                                         _DEN + ": internode EP64 combine, RDMA (held beyond EP64; low end the "
                                         "low-latency kernels' 39 GB/s at EP128-256)", 39.0, 50.0, "high"),
    "comm_sms_saturate": (20.0, "SMs", "measured",
                                 M.DEEPSEEK_V3_COMM_SMS_SOURCE + "; DeepEP's tables used 24 SMs; fewer SMs scale "
                                 "bandwidth down proportionally (assumed)", 20.0, 24.0, "low"),
    # --- DeepEP low-latency kernels (decode) -----------------------------------------------------------------
    "ep_ll_dispatch_alpha_us": (43.81, "us", "fit", _LLD + "; fixed latency floor", 29.3, 65.49, "low"),
    "ep_ll_dispatch_ib_GBps": (51.59, "GB/s", "fit", _LLD + "; IB bandwidth of traffic to other nodes",
                               44.87, 59.32, "high"),
    "ep_ll_dispatch_nvlink_GBps": (228.6, "GB/s", "fit", _LLD + "; bandwidth of traffic to node-mates",
                                   131.0, 398.7, "high"),
    "ep_ll_combine_alpha_us": (22.59, "us", "fit", _LLC + "; fixed latency floor", 6.888, 74.1, "low"),
    "ep_ll_combine_ib_GBps": (43.02, "GB/s", "fit", _LLC + "; IB bandwidth of traffic to other nodes",
                              39.18, 47.24, "high"),
    "ep_ll_combine_nvlink_GBps": (160.6, "GB/s", "fit", _LLC + "; bandwidth of traffic to node-mates",
                                  118.4, 217.8, "high"),
    # --- NCCL (pipeline sends, ZeRO-1 collectives) -----------------------------------------------------------
    "nccl_ib_busbw_GBps": (sum(M.NCCL_IB_BUSBW_GBPS) / 2, "GB/s", "measured", M.NCCL_IB_SOURCE,
                           *M.NCCL_IB_BUSBW_GBPS, "high"),
    "nccl_nvlink_busbw_GBps": (160.0, "GB/s", "measured",
                               "H800 NVLink one direction: DeepEP intranode 153-158 GB/s; NCCL's ~82% protocol "
                               "efficiency on H100 (370 of 450 GB/s, " + M.NCCL_NVLINK_SOURCE.split(",")[0] +
                               ") at H800's 200 GB/s gives 164", 153.0,
                               round(200 * M.NCCL_H100_NVLINK_BUSBW_GBPS / 450), "high"),
    "nccl_base_us": (_NCCL_LAT[0]["Simple"], "us", "datasheet", M.NCCL_LATENCY_SOURCE + " (Simple base; LL low)",
                     _NCCL_LAT[0]["LL"], _NCCL_LAT[0]["Simple"], "low"),
    "nccl_ib_step_us": (_NCCL_LAT[1]["Simple"], "us/step", "datasheet", M.NCCL_LATENCY_SOURCE + " (Simple NET step)",
                        _NCCL_LAT[1]["LL"], _NCCL_LAT[1]["Simple"], "low"),
    "nccl_nvlink_step_us": (_NCCL_LAT[2]["Simple"], "us/step", "datasheet",
                            M.NCCL_LATENCY_SOURCE + " (Simple NVLink step)", _NCCL_LAT[2]["LL"], _NCCL_LAT[2]["Simple"],
                            "low"),
}

SOURCE_KINDS = ("measured", "datasheet", "fit", "assumed")
BOUNDS = ("default", "optimistic", "pessimistic")


def default_values() -> dict[str, float]:
    """{name: calibrated value} of every constant."""
    return {name: entry[0] for name, entry in CONSTANTS.items()}


def bound_values(bound: str = "default") -> dict[str, float]:
    """{name: value} at the default, the optimistic (faster) or the pessimistic (slower) end of each range."""
    if bound not in BOUNDS:
        raise ValueError(f"unknown bound {bound!r} (known: {', '.join(BOUNDS)})")
    out = default_values()
    if bound != "default":
        for name, (_, _, _, _, low, high, faster) in CONSTANTS.items():
            if low is not None:
                out[name] = high if (faster == "high") == (bound == "optimistic") else low
    return out


def values(c: Mapping | None) -> Mapping:
    """c itself, or the calibrated defaults when c is None."""
    return _DEFAULTS if c is None else c


def calibration_note(gpu) -> str:
    """How the kernel curves apply to gpu: H800 itself, or H800-calibrated efficiencies at gpu's datasheet peaks."""
    base = ("curves calibrated on H800 (DeepGEMM FP8 GEMMs, FlashMLA, DeepEP) and H100 SXM (FlashAttention-3, "
            "whose SMs, clocks, BF16 peak and HBM equal H800's)")
    if gpu.name == "h800":
        return base + "; target is H800 itself"
    return (f"{base}; scaled to {gpu.name} datasheet peaks: {gpu.sms} SMs, BF16 {gpu.bf16_flops / 1e12:.0f} and "
            f"FP8 {gpu.fp8_flops / 1e12:.0f} TFLOPS, HBM {gpu.hbm_bandwidth / 1e12:.2f} TB/s")


_DEFAULTS = default_values()
