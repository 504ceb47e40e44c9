"""Published kernel- and link-level measurements the calibration is fitted on, as their authors published them.

Plain data: each table has a SOURCE (where, when, which version) and CONDITIONS (GPU, software, dtype,
shapes, what the number measures). Nothing here is an end-to-end figure (step time, MFU, GPU-hours,
tokens/s of a deployment): those judge the cost model and are never fitted. `bench/fidelity.py` prints
every row next to what `dsv3c.cost.kernels` / `dsv3c.cost.links` predict for it.
"""

# --- FP8 GEMMs: DeepGEMM on H800 ------------------------------------------------------------------------

DEEPGEMM_SOURCE = ("deepseek-ai/DeepGEMM README.md 'Performance' section at commit a9967bc27cdc "
                   "(2025-04-09; the tables were removed on 2025-04-14 by 37aa127), measured with tests/test_core.py "
                   "of that commit")
DEEPGEMM_CONDITIONS = (
    "H800 SXM5, NVCC 12.8, all 132 SMs; FP8 E4M3 inputs with 1x128 (activations) / 128x128 (weights) scaling, "
    "BF16 output; D = A[M,K] x B[N,K]^T per group. Time is the kernel's GPU time (kineto); TFLOPS = 2*G*M*N*K / "
    "time; GB/s = G*(M*K + K*N + 2*M*N) / time (scales not counted). Masked layout benchmarked with every row valid.")
# (M, N, K, TFLOPS, GB/s)
DEEPGEMM_DENSE = (
    (64, 2112, 7168, 206, 1688), (64, 24576, 1536, 289, 2455), (64, 32768, 512, 219, 2143),
    (64, 7168, 16384, 336, 2668), (64, 4096, 7168, 287, 2320), (64, 7168, 2048, 295, 2470),
    (128, 2112, 7168, 352, 1509), (128, 24576, 1536, 535, 2448), (128, 32768, 512, 358, 2103),
    (128, 7168, 16384, 645, 2604), (128, 4096, 7168, 533, 2221), (128, 7168, 2048, 510, 2277),
    (4096, 2112, 7168, 1127, 562), (4096, 24576, 1536, 1212, 962), (4096, 32768, 512, 775, 1620),
    (4096, 7168, 16384, 1520, 384), (4096, 4096, 7168, 1410, 541), (4096, 7168, 2048, 1168, 794),
)
# (groups, M per group, N, K, TFLOPS, GB/s)
DEEPGEMM_CONTIGUOUS = (
    (4, 8192, 4096, 7168, 1346, 434), (4, 8192, 7168, 2048, 1214, 752),
    (8, 4096, 4096, 7168, 1346, 516), (8, 4096, 7168, 2048, 1214, 826),
)
DEEPGEMM_MASKED = (
    (1, 1024, 4096, 7168, 1233, 924), (1, 1024, 7168, 2048, 925, 968),
    (2, 512, 4096, 7168, 1040, 1288), (2, 512, 7168, 2048, 916, 1405),
    (4, 256, 4096, 7168, 932, 2064), (4, 256, 7168, 2048, 815, 2047),
)

# --- Attention: FlashAttention-3 on H100 --------------------------------------------------------------------

FA3_SOURCE = ("Shah et al., 'FlashAttention-3: Fast and Accurate Attention with Asynchrony and Low-precision' "
              "(arXiv 2407.08608, July 2024), Fig. 5 (forward, BF16/FP16) and Fig. 6 (backward); the forward panels "
              "are the image Dao-AILab/flash-attention assets/flash3_fp16_fwd.png (commit 7ef24848, 2024-07-11)")
FA3_CONDITIONS = (
    "H100 80GB SXM5, FP16, batch x seqlen = 16K tokens, hidden 2048 (16 heads at head dim 128, 8 at 256), "
    "queries = keys = seqlen. TFLOPS = 4*b*s^2*h*d / time, halved with the causal mask; backward FLOPs = 2.5x "
    "forward (the convention of the repo's benchmarks/benchmark_flash_attention.py). Fig. 6 shows the backward "
    "without causal mask only. Head dim 256 non-causal at 1K is hidden by the legend and not used.")
FA3_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
# (head dim, causal) -> TFLOPS by FA3_SEQLENS (None: not legible)
FA3_FORWARD_TFLOPS = {
    (128, False): (467, 565, 625, 638, 646, 648),
    (128, True): (292, 423, 521, 579, 602, 616),
    (256, False): (482, None, 707, 736, 746, 756),
    (256, True): (286, 427, 537, 612, 628, 642),
}
FA3_BACKWARD_TFLOPS = {
    (128, False): (316, 424, 501, 542, 559, 561),
}

# --- MLA decoding: FlashMLA ---------------------------------------------------------------------------------

FLASHMLA_SOURCE = ("deepseek-ai/FlashMLA README.md 'Performance' (dense decoding, 660 TFLOPS since c2067be "
                   "2025-04-22; 3000 GB/s since the initial commit 414a2f3, 2025-02-21) and "
                   "docs/20250422-new-kernel-deep-dive.md (H800 throttles to ~1600 MHz under this load: ~865 of "
                   "990 TFLOPS)")
FLASHMLA_CONDITIONS = (
    "H800 SXM5, CUDA 12.8, BF16, absorbed MLA (MQA: one latent head of d=576 = 512 + 64 rope, dv=512), "
    "tests/test_flash_mla.py grid b=128, s_k in 4K..16K, h_q in 16..128, s_q in 1..2. Headline 'up to' figures: "
    "FLOPs = 2*b*s_q*s_k*h_q*(d+dv), bytes = 2*(b*s_k*d + b*s_q*h_q*(d+dv)). We compare them at the grid's "
    "most memory-bound (s_k=16K, h_q=16, s_q=1) and most compute-bound (s_k=16K, h_q=128, s_q=2) points.")
# (b, s_q, s_k, h_q, what, value): what is 'GB/s' or 'TFLOPS'
FLASHMLA_H800 = (
    (128, 1, 16384, 16, "GB/s", 3000),
    (128, 2, 16384, 128, "TFLOPS", 660),
)
FLASHMLA_H100_SOURCE = ("ai-bot-pro/achatbot pull request #123 (2025-02-24): FlashMLA tests/test_flash_mla.py "
                        "on an H100 (Modal), the February 2025 kernel")
FLASHMLA_H100_CONDITIONS = "H100 SXM 80GB, CUDA 12.6, BF16, d=576, dv=512, causal, fixed lengths (varlen=False)"
# (b, s_q, s_k, h_q, milliseconds)
FLASHMLA_H100 = (
    (128, 1, 4096, 16, 0.215), (128, 2, 4096, 16, 0.218), (128, 1, 4096, 32, 0.218),
    (128, 2, 4096, 32, 0.223), (128, 1, 4096, 64, 0.223),
)

# --- Memory-bound kernels ------------------------------------------------------------------------------------

QUACK_SOURCE = ("Dao-AILab/quack media/2025-07-10-membound-sol.md ('Getting memory-bound kernels to "
                "speed-of-light', 2025-07-10), section on softmax profiling")
QUACK_CONDITIONS = (
    "H100 SXM HBM3 (3.35 TB/s peak), FP32 softmax, batch 16K x reduction 131K, one load and one store per "
    "element; DRAM throughput from Nsight Compute. The same post measures torch.compile at 1.89 TB/s on FP32 "
    "softmax with reduction dim 262K (an extra load), the slow end of what compiled memory-bound kernels reach.")
# (rows, columns, bytes per element, TB/s)
QUACK_SOFTMAX = ((16384, 131072, 4, 3.01),)
QUACK_TORCH_COMPILE_TBPS = 1.89

# --- Expert-parallel all-to-all: DeepEP on H800 ---------------------------------------------------------------

DEEPEP_NORMAL_SOURCE = ("deepseek-ai/DeepEP README.md 'Normal kernels with NVLink and RDMA forwarding' as updated "
                        "by 3b1045d (2025-04-22, after Tencent's #130), now docs/legacy.md (V1)")
DEEPEP_NORMAL_CONDITIONS = (
    "H800 (~160 GB/s NVLink), one CX7 400 Gb/s IB NIC per GPU (~50 GB/s); 4096 tokens per rank, hidden 7168, "
    "top-4 groups, top-8 experts, FP8 dispatch, BF16 combine; 24 SMs (tests/test_intranode.py and "
    "test_internode.py run `for i in (24, )`; the README does not state it). Bottleneck bandwidth = bytes on the "
    "bottleneck link / kernel time: NVLink bytes received intranode, RDMA bytes sent internode (each token "
    "counted once per destination node).")
# (ep, phase, GB/s, link)
DEEPEP_NORMAL = (
    (8, "dispatch", 153, "nvlink"), (8, "combine", 158, "nvlink"),
    (16, "dispatch", 43, "rdma"), (16, "combine", 43, "rdma"),
    (32, "dispatch", 58, "rdma"), (32, "combine", 57, "rdma"),
    (64, "dispatch", 51, "rdma"), (64, "combine", 50, "rdma"),
)
DEEPEP_NORMAL_SMS = 24

DEEPEP_LL_SOURCE = ("deepseek-ai/DeepEP README.md 'Low-latency kernels': the pure-RDMA table of the initial commit "
                    "ebfe47e (2025-02-24) and the table of de8cfca (2025-06-05, after #173: intranode peers over "
                    "NVLink), now docs/legacy.md")
DEEPEP_LL_CONDITIONS = (
    "H800, CX7 400 Gb/s IB per GPU, 8 GPUs per node; 128 tokens per rank, hidden 7168, top-8 of 288 experts "
    "(tests/test_low_latency.py), FP8 dispatch (7168 + 224 scale + 16 header bytes per token-expert), BF16 "
    "combine (2 x 7168 bytes); latency = kineto kernel time; bandwidth = those bytes x selections / latency.")
DEEPEP_LL_TOKENS, DEEPEP_LL_HIDDEN, DEEPEP_LL_TOP_K = 128, 7168, 8
# (ep, dispatch us, combine us)
DEEPEP_LL_NVLINK = ((8, 77, 114), (16, 118, 195), (32, 155, 273), (64, 173, 314), (128, 192, 369), (256, 194, 360))
DEEPEP_LL_PURE_RDMA = ((8, 163, 318), (16, 173, 329), (32, 182, 350), (64, 186, 353), (128, 192, 369),
                       (256, 194, 360))

DEEPSEEK_V3_COMM_SMS_SOURCE = ("DeepSeek-V3 Technical Report (arXiv 2412.19437), sec. 3.2.2: 20 of 132 SMs run "
                               "dispatch/combine and suffice to fully use IB and NVLink bandwidth")

# --- NCCL on H100 / InfiniBand NDR ---------------------------------------------------------------------------

NCCL_IB_SOURCE = ("NVIDIA/nccl-tests issue #290 (2025-03-03), AddyLaddy (NVIDIA): 'For NDR @ 400Gbps you should "
                  "see 46-48GB/s per NIC' (two-node all_reduce_perf with NCCL_ALGO=RING, H100)")
NCCL_IB_BUSBW_GBPS = (46, 48)
NCCL_NVLINK_SOURCE = ("NVIDIA/nccl-tests issue #212 (2024-05-06), sjeaugey (NVIDIA): on H100 NVLink '450GB/s is the "
                      "line rate. With the protocol overhead (~20%) NCCL can get an effective NVLink bandwidth of "
                      "370GB/s' as busbw of ring collectives")
NCCL_H100_NVLINK_BUSBW_GBPS = 370
NCCL_LATENCY_SOURCE = ("NVIDIA/nccl src/graph/tuning.cc at 5067397 (2026-06-11), ncclTunerConstantsDefaults: NCCL's "
                       "own latency model. Ring: baseLatencies LL 6.6 / Simple 8.4 us; hwLatencies per ring step "
                       "NVLink LL 0.6 / Simple 3.4 us, NET LL 2.7 / Simple 14 us; an all-gather/reduce-scatter ring "
                       "of n ranks on N nodes takes (n-1) steps, N-1 of them over the network")
NCCL_RING_BASE_US = {"LL": 6.6, "Simple": 8.4}
NCCL_RING_STEP_US = {"nvlink": {"LL": 0.6, "Simple": 3.4}, "ib": {"LL": 2.7, "Simple": 14.0}}

# --- Kernel launch --------------------------------------------------------------------------------------------

LAUNCH_SOURCE = ("no launch-gap measurement on H100/H800 found; 'about 4-6 us' per host launch through the "
                 "driver (susun-blog.com/blog/pegainfer-3-cuda-graph, RTX 5070 Ti, CUDA 13.0); CUDA graphs and "
                 "back-to-back launches overlap most of it")
