"""Every published measurement row next to what the calibrated kernel and link times predict for it.

A Row holds the published figure, the time it implies (work / throughput, or the time itself) and a
`predict(c)` calling the planner's own functions (kernels.py, links.py) under constants c. The error of a
row is predicted time / published time - 1, for every unit. Rows of role "fit" are fitted jointly with other
rows (bench/fit_calibration.py); rows of role "defines" are the figure a single constant is set to, so they
reproduce it up to the other terms (latency) by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from statistics import median

from dsv3c.cost import measurements as M
from dsv3c.cost.calibration_constants import values
from dsv3c.cost.kernels import attention_seconds, gemm_seconds, mla_decode_flops_bytes, mla_decode_seconds, \
    memory_seconds
from dsv3c.cost.links import ep_low_latency_seconds, ep_normal_seconds, reduce_scatter_seconds
from targets.gpus import GPUS

H800, H100 = GPUS["h800"], GPUS["h100"]
MLA_R, MLA_DR = 512, 64  # FlashMLA's d = 576 = latent 512 + RoPE 64, dv = 512
FA3_TOKENS, FA3_HIDDEN = 16384, 2048
FP8_TOKEN_BYTES, BF16_TOKEN_BYTES = 7168 + 7168 // 128 * 4, 2 * 7168  # DeepEP normal-kernel test, hidden 7168


@dataclass(frozen=True)
class Row:
    """One published measurement and the prediction for it."""

    kernel: str  # kernel class, e.g. "gemm dense"
    group: str  # the fit it belongs to: gemm, attention, mla, ll_dispatch, ll_combine, or "" (defines)
    conditions: str
    unit: str  # "TFLOPS", "GB/s" or "us"
    published: float
    published_seconds: float
    predict: Callable[[Mapping], float]
    source: str  # the measurement's SOURCE citation

    @property
    def role(self) -> str:
        """'fit' for rows fitted jointly, 'defines' for rows a constant is set to."""
        return "fit" if self.group else "defines"

    def evaluate(self, c: Mapping | None = None) -> dict:
        """The row with its prediction (in the published unit) and its error on time."""
        seconds = self.predict(values(c))
        shown = seconds * 1e6 if self.unit == "us" else self.published * self.published_seconds / seconds
        return {"kernel": self.kernel, "conditions": self.conditions, "unit": self.unit, "role": self.role,
                "published": self.published, "predicted": shown, "published_seconds": self.published_seconds,
                "predicted_seconds": seconds, "error": seconds / self.published_seconds - 1, "source": self.source}


def _gemm_rows() -> list[Row]:
    """DeepGEMM's dense, contiguous and masked tables (H800, FP8, 132 SMs)."""
    rows = []
    tables = [("dense", ((1, m, n, k, tf) for m, n, k, tf, _ in M.DEEPGEMM_DENSE)),
              ("contiguous", ((g, m, n, k, tf) for g, m, n, k, tf, _ in M.DEEPGEMM_CONTIGUOUS)),
              ("masked", ((g, m, n, k, tf) for g, m, n, k, tf, _ in M.DEEPGEMM_MASKED))]
    for layout, table in tables:
        for g, m, n, k, tflops in table:
            def predict(c, g=g, m=m, n=n, k=k, layout=layout):
                return gemm_seconds(m, n, k, groups=g, layout=layout, gpu=H800, c=c)
            rows.append(Row(f"gemm {layout}", "gemm", f"G={g} M={m} N={n} K={k}", "TFLOPS", tflops,
                            2 * g * m * n * k / (tflops * 1e12), predict, M.DEEPGEMM_SOURCE))
    return rows


def _attention_rows() -> list[Row]:
    """FlashAttention-3's forward and backward figures (H100 SXM5, 16K tokens, hidden 2048)."""
    rows = []
    for direction, table in (("fwd", M.FA3_FORWARD_TFLOPS), ("bwd", M.FA3_BACKWARD_TFLOPS)):
        for (d, causal), series in table.items():
            for s, tflops in zip(M.FA3_SEQLENS, series):
                if tflops is None:
                    continue
                b, h = FA3_TOKENS // s, FA3_HIDDEN // d
                flops = 4 * b * s * s * h * d / (2 if causal else 1) * (2.5 if direction == "bwd" else 1)

                def predict(c, b=b, h=h, s=s, d=d, causal=causal, direction=direction):
                    return attention_seconds(b=b, h=h, s=s, t=s, dqk=d, dv=d, causal=causal, direction=direction,
                                             gpu=H100, c=c)
                mask = "causal" if causal else "full"
                rows.append(Row(f"attention {direction}", "attention", f"d={d} {mask} s={s} b={b} h={h}", "TFLOPS",
                                tflops, flops / (tflops * 1e12), predict, M.FA3_SOURCE))
    return rows


def _mla_rows() -> list[Row]:
    """FlashMLA's H800 headline figures and the H100 rows of achatbot #123."""
    rows = []
    for b, sq, sk, hq, unit, value in M.FLASHMLA_H800:
        flops, nbytes = mla_decode_flops_bytes(b=b, s=sq, t=sk, h=hq, r=MLA_R, dr=MLA_DR)
        work = flops if unit == "TFLOPS" else nbytes
        rows.append(Row("mla decode", "mla", f"H800 b={b} s_q={sq} s_k={sk} h_q={hq}", unit, value,
                        work / (value * (1e12 if unit == "TFLOPS" else 1e9)),
                        lambda c, b=b, sq=sq, sk=sk, hq=hq: mla_decode_seconds(b=b, s=sq, t=sk, h=hq, r=MLA_R,
                                                                               dr=MLA_DR, gpu=H800, c=c),
                        M.FLASHMLA_SOURCE))
    for b, sq, sk, hq, ms in M.FLASHMLA_H100:
        rows.append(Row("mla decode", "mla", f"H100 b={b} s_q={sq} s_k={sk} h_q={hq}", "us", ms * 1e3, ms * 1e-3,
                        lambda c, b=b, sq=sq, sk=sk, hq=hq: mla_decode_seconds(b=b, s=sq, t=sk, h=hq, r=MLA_R,
                                                                               dr=MLA_DR, gpu=H100, c=c),
                        M.FLASHMLA_H100_SOURCE))
    return rows


def _memory_rows() -> list[Row]:
    """QuACK's speed-of-light softmax (H100): the achieved HBM fraction."""
    rows = []
    for r, cols, elem, tbps in M.QUACK_SOFTMAX:
        nbytes = 2 * r * cols * elem
        rows.append(Row("memory-bound", "", f"H100 softmax {r}x{cols} fp32 ({nbytes / 1e9:.1f} GB)", "GB/s",
                        tbps * 1e3, nbytes / (tbps * 1e12),
                        lambda c, nbytes=nbytes: memory_seconds(nbytes, gpu=H100, c=c), M.QUACK_SOURCE))
    return rows


def _normal_bytes(ep: int, phase: str) -> tuple[float, float]:
    """(RDMA bytes sent, NVLink bytes received) per GPU in DeepEP's normal-kernel test under uniform routing.

    4096 tokens, top-8 of 256 experts in top-4 groups (nodes): intranode a token reaches 8(1 - (7/8)^8) ranks;
    internode it reaches min(nodes, 4) nodes, the GPU's own node with probability min(nodes, 4) / nodes."""
    per_token = FP8_TOKEN_BYTES if phase == "dispatch" else BF16_TOKEN_BYTES
    if ep <= 8:
        return 0.0, 4096 * 8 * (1 - (7 / 8) ** 8) * per_token
    nodes = ep // 8
    groups = min(nodes, 4)
    return 4096 * groups * (1 - 1 / nodes) * per_token, 0.0


def _deepep_rows() -> list[Row]:
    """DeepEP's normal (bottleneck GB/s) and low-latency (us at 128 tokens) tables on H800."""
    rows = []
    for ep, phase, gbps, link in M.DEEPEP_NORMAL:
        rdma, nvl = _normal_bytes(ep, phase)
        nbytes = rdma if link == "rdma" else nvl
        rows.append(Row(f"deepep normal {phase}", "", f"EP{ep} {link} bottleneck, {M.DEEPEP_NORMAL_SMS} SMs",
                        "GB/s", gbps, nbytes / (gbps * 1e9),
                        lambda c, ep=ep, phase=phase, rdma=rdma, nvl=nvl: ep_normal_seconds(
                            rdma, nvl, ep=ep, phase=phase, comm_sms=M.DEEPEP_NORMAL_SMS, c=c),
                        M.DEEPEP_NORMAL_SOURCE))
    for table, nvlink in ((M.DEEPEP_LL_NVLINK, True), (M.DEEPEP_LL_PURE_RDMA, False)):
        for ep, dispatch_us, combine_us in table:
            for phase, us in (("dispatch", dispatch_us), ("combine", combine_us)):
                mode = "nvlink+rdma" if nvlink else "pure rdma"
                rows.append(Row(f"deepep ll {phase}", f"ll_{phase}", f"EP{ep} {mode}, {M.DEEPEP_LL_TOKENS} tokens",
                                "us", us, us * 1e-6,
                                lambda c, ep=ep, phase=phase, nvlink=nvlink: ep_low_latency_seconds(
                                    M.DEEPEP_LL_TOKENS, top_k=M.DEEPEP_LL_TOP_K, hidden=M.DEEPEP_LL_HIDDEN, ep=ep,
                                    phase=phase, nvlink=nvlink, c=c),
                                M.DEEPEP_LL_SOURCE))
    return rows


def _nccl_rows() -> list[Row]:
    """NVIDIA's NDR InfiniBand bus bandwidth per NIC, as a two-node ring of 8 GiB."""
    nbytes, ranks = 8 * 2 ** 30, 16
    busbw = sum(M.NCCL_IB_BUSBW_GBPS) / 2
    return [Row("nccl ring", "", f"{ranks} ranks on 2 nodes, 8 GiB, IB busbw", "GB/s", busbw,
                nbytes * (ranks - 1) / ranks / (busbw * 1e9),
                lambda c: reduce_scatter_seconds(nbytes, ranks=ranks, ranks_per_node=8, c=c), M.NCCL_IB_SOURCE)]


def rows() -> list[Row]:
    """Every published measurement row the calibration uses."""
    return _gemm_rows() + _attention_rows() + _mla_rows() + _memory_rows() + _deepep_rows() + _nccl_rows()


def table(c: Mapping | None = None) -> list[dict]:
    """Every row evaluated under constants c (None: the calibrated defaults)."""
    return [row.evaluate(c) for row in rows()]


def summary(evaluated: list[dict]) -> dict[str, dict]:
    """Per kernel class, for the fitted rows and for all rows: row count, median and worst |error|."""
    classes: dict[str, list[dict]] = {}
    for r in evaluated:
        classes.setdefault(r["kernel"], []).append(r)
    classes["all (fit rows)"] = [r for r in evaluated if r["role"] == "fit"]
    classes["all rows"] = list(evaluated)
    out = {}
    for name, members in classes.items():
        errs = [abs(r["error"]) for r in members]
        out[name] = {"rows": len(errs), "median": median(errs), "worst": max(errs)}
    return out
