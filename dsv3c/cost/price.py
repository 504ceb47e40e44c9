"""The one pricing module: a block's kernel facts (from the cost pass) → seconds on one GPU under a parallel plan.

A block's facts are the distinct kernel calls of one captured block (`passes/cost.py`), each with its kernel
class, shape, FLOPs and bytes. `Shard` says how one GPU of a parallel plan sees that block: how many of the
captured sequences one micro-batch holds (`scale`), attention tensor parallelism (heads split over `tp`,
the rest split over tokens with SP), expert parallelism (`ep` ranks, `slots` experts each, routes per
token, load imbalance, the expected nodes/GPUs a token's routes reach). The kernel classes are timed by
`dsv3c.cost.calibration` (curves calibrated on published kernel and link measurements):

- gemm: forward [m,k]x[n,k]^T; backward Dgrad (m, k, n) for the input and Wgrad (n, k, m) for the weight;
- experts: the routed SwiGLU experts as grouped GEMMs over the rank's slots (gate and up fused: 2F wide),
  rows per slot = routes arriving at the rank / slots; contiguous layout, masked in decode;
- attention / latent_attention: flash attention forward and backward; absorbed MLA decode;
- memory: bytes at the achieved HBM bandwidth (backward reads and writes twice the forward's bytes).

Each kernel's time is attributed to `compute` or `memory` by the roofline side that bounds it; launch gaps
between kernels are `overhead`. Communication (EP dispatch/combine, attention TP all-gather/reduce-scatter)
is priced per block as latency α plus bytes/β. Times combine as DeepSeek overlaps them: `overlap(compute,
comm)` takes the longer side, and what the communication adds beyond the compute is exposed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from dsv3c.cost import calibration as cal
from dsv3c.ops.ep import two_hop_bytes

HEAD_SPLIT_N = ("q_b_proj", "kv_b_proj", "q_proj")  # head-parallel GEMMs split along n
HEAD_SPLIT_K = ("o_proj",)  # ... and along k


class Time(NamedTuple):
    """Seconds of one piece of work, by what bounds it."""

    compute: float = 0.0
    memory: float = 0.0
    overhead: float = 0.0
    comm: float = 0.0
    latency: float = 0.0

    def __add__(self, o: "Time") -> "Time":
        return Time(self.compute + o.compute, self.memory + o.memory, self.overhead + o.overhead, self.comm + o.comm,
                    self.latency + o.latency)

    def __mul__(self, k: float) -> "Time":
        return Time(self.compute * k, self.memory * k, self.overhead * k, self.comm * k, self.latency * k)

    __rmul__ = __mul__

    @property
    def total(self) -> float:
        """All parts together."""
        return self.compute + self.memory + self.overhead + self.comm + self.latency

    def as_dict(self) -> dict:
        """{part: seconds} and the total."""
        return {**self._asdict(), "total": self.total}


ZERO = Time()


def overlap(compute: Time, comm: Time) -> Time:
    """Compute and communication running side by side: the compute, plus what the communication adds beyond it."""
    if comm.total <= compute.total or comm.total == 0:
        return compute
    return compute + comm * ((comm.total - compute.total) / comm.total)


def parts_sum(times) -> Time:
    """The sum of Times."""
    out = ZERO
    for t in times:
        out = out + t
    return out


@dataclass(frozen=True)
class Shard:
    """How one GPU of a parallel plan sees a block (see the module docstring)."""

    mode: str
    scale: float = 1.0  # sequences of one micro-batch in the TP group / sequences captured
    tp: int = 1
    sp: bool = False
    ep: int = 1
    slots: int = 0  # expert slots per EP rank (0: all experts on every GPU)
    routes_per_token: float = 0.0  # expert routes a token sends (0: the experts' top_k)
    imbalance: float = 1.0  # routes arriving at the busiest GPU / the mean
    fanout: tuple = (1.0, 1.0)  # expected distinct (nodes, GPUs) a token's routes reach
    gpus_per_node: int = 8
    comm_sms: int = 20


@dataclass(frozen=True)
class BlockTime:
    """One block for one micro-batch on one GPU: compute-side F/I/W/R and communication-side forward/backward."""

    F: Time = ZERO
    I: Time = ZERO  # noqa: E741  (backward for the input)
    W: Time = ZERO  # backward for the weights
    R: Time = ZERO  # recomputed forward of the nodes marked for recomputation
    f_comm: Time = ZERO
    b_comm: Time = ZERO
    comm: dict = field(default_factory=dict)  # per transfer: bytes and seconds
    flops: float = 0.0  # forward FLOPs on this GPU
    kernels: int = 0

    @property
    def B(self) -> Time:  # noqa: N802
        """The whole backward on the compute side: I + W + R."""
        return self.I + self.W + self.R


def compute_sms(gpu, mode: str, c) -> int:
    """SMs left to compute kernels: all of them in decode (its RDMA takes none), sms - comm_sms in train/prefill."""
    return gpu.sms if mode == "decode" else gpu.sms - int(c["comm_sms"])


def _head_parallel(f: dict) -> bool:
    """Whether TP splits this kernel by attention heads (else by tokens, with SP)."""
    if f["kernel"] in ("attention", "latent_attention"):
        return True
    leaf = f["role"].rsplit(".", 1)[-1]
    return f["kernel"] == "gemm" and (leaf in HEAD_SPLIT_N + HEAD_SPLIT_K or
                                      ("self_attn" in f["role"] and f["shape"][0] > 1))


def _token_factor(f: dict, sh: Shard) -> float:
    """This GPU's share of the captured tokens for a kernel."""
    k = sh.scale
    if sh.tp > 1 and sh.sp and not _head_parallel(f):
        k /= sh.tp
    return k


def _bound(flops: float, nbytes: float, dtype: str, gpu, sms: int) -> str:
    """Which roofline side bounds a kernel: 'compute' or 'memory'."""
    peak = gpu.peak_flops("fp8" if dtype == "fp8" else "bf16") * sms / gpu.sms
    return "compute" if flops / peak >= nbytes / gpu.hbm_bandwidth else "memory"


def _t(seconds: float, bound: str) -> Time:
    return Time(compute=seconds) if bound == "compute" else Time(memory=seconds)


def _gemm(g, m, n, k, dtype, layout, gpu, sms, c) -> Time:
    """One (grouped) GEMM's time, attributed to its roofline side."""
    m = max(1, math.ceil(m))
    s = cal.gemm_seconds(m, n, k, groups=g, dtype=dtype, layout=layout, gpu=gpu, sms=sms, c=c)
    b = 1 if dtype == "fp8" else 2
    return _t(s, _bound(2 * g * m * n * k, g * (m * k + n * k) * b + g * m * n * 2, dtype, gpu, sms))


def _memory(nbytes: float, gpu, c) -> Time:
    return Time(memory=cal.memory_seconds(nbytes, gpu=gpu, c=c)) if nbytes > 0 else ZERO


class Pricer:
    """Prices block facts on one GPU of a target for a mode, with one set of constants."""

    def __init__(self, gpu, sms: int, constants, mode: str):
        self.gpu, self.sms, self.c, self.mode = gpu, sms, constants, mode
        self.layout = "masked" if mode == "decode" else "contiguous"

    def kernel(self, f: dict, sh: Shard) -> tuple[Time, Time, Time, float]:
        """(F, I, W, forward FLOPs on this GPU) of one fact's calls."""
        kind, n_calls = f["kernel"], f["count"]
        train = self.mode == "train"
        if kind == "gemm":
            out = self._gemm_fact(f, sh, train)
        elif kind == "experts":
            out = self._experts(f, sh, train)
        elif kind in ("attention", "latent_attention"):
            out = self._attention(f, sh, train)
        elif kind == "memory":
            k = _token_factor(f, sh)
            act = (f["bytes"] - f["weight_bytes"]) * k
            fwd = _memory(f["weight_bytes"] + act, self.gpu, self.c)
            bwd = _memory(2 * (f["weight_bytes"] + act), self.gpu, self.c) if train and f["bwd_flops"] else ZERO
            out = (fwd, bwd, ZERO, f["flops"] * k)
        else:  # dispatch/combine facts of a partitioned graph: EP communication is priced per block instead
            out = (ZERO, ZERO, ZERO, 0.0)
        return tuple(x * n_calls for x in out)

    def _gemm_fact(self, f, sh, train):
        g, m, n, k = f["shape"]
        m = m * _token_factor(f, sh)
        if sh.tp > 1 and _head_parallel(f):
            leaf = f["role"].rsplit(".", 1)[-1]
            if g > 1:
                g = max(1, g // sh.tp)
            elif leaf in HEAD_SPLIT_K:
                k = max(1, k // sh.tp)
            else:
                n = max(1, n // sh.tp)
        layout = "dense" if g == 1 else self.layout
        fwd = _gemm(g, m, n, k, f["dtype"], layout, self.gpu, self.sms, self.c)
        flops = 2 * g * m * n * k
        if not train:
            return fwd, ZERO, ZERO, flops
        wgrad = f["wgrad_flops"] > 0
        dgrad = _gemm(g, m, k, n, f["dtype"], layout, self.gpu, self.sms, self.c)
        if not wgrad:  # both operands are activations: two input gradients
            dgrad = dgrad * 2
        w = _gemm(g, n, k, m, f["dtype"], layout, self.gpu, self.sms, self.c) if wgrad else ZERO
        return fwd, dgrad, w, flops

    def _experts(self, f, sh, train):
        tokens, top_k, experts, ff, d = f["shape"]
        t = tokens * _token_factor(f, sh)
        per_token = sh.routes_per_token or top_k
        routes = t * per_token * sh.imbalance
        slots = sh.slots if sh.ep > 1 and sh.slots else experts
        m = routes / slots
        dt = f["dtype"]
        gemm = lambda m_, n_, k_: _gemm(slots, m_, n_, k_, dt, self.layout, self.gpu, self.sms, self.c)  # noqa: E731
        act = (f["bytes"] - f["weight_bytes"]) * routes / (tokens * top_k)
        fwd = gemm(m, 2 * ff, d) + gemm(m, d, ff) + _memory(act, self.gpu, self.c)
        flops = 6 * routes * ff * d
        if not train:
            return fwd, ZERO, ZERO, flops
        dgrad = gemm(m, d, 2 * ff) + gemm(m, ff, d) + _memory(2 * act, self.gpu, self.c)
        wgrad = gemm(2 * ff, d, m) + gemm(d, ff, m)
        return fwd, dgrad, wgrad, flops

    def _attention(self, f, sh, train):
        b, h, s, t, d1, d2 = f["shape"]
        b = b * _token_factor(f, sh)
        h = max(1, h // sh.tp)
        gpu, sms, c = self.gpu, self.sms, self.c
        if f["kernel"] == "latent_attention" and self.mode == "decode":
            fwd = cal.mla_decode_seconds(b=b, s=s, t=t, h=h, r=d1, dr=d2, gpu=gpu, sms=sms, c=c)
            flops = 2 * b * h * s * t * (2 * d1 + d2)
            nbytes = b * t * (d1 + d2) * 2
            return _t(fwd, _bound(flops, nbytes, "bf16", gpu, sms)), ZERO, ZERO, flops
        dqk, dv = (d1 + d2, d1) if f["kernel"] == "latent_attention" else (d1, d2)
        args = dict(b=b, h=h, s=s, t=t, dqk=dqk, dv=dv, causal=True, gpu=gpu, sms=sms, c=c)
        share = b / f["shape"][0] * h / f["shape"][1]
        streamed = cal.memory_seconds(f["bytes"] * share, gpu=gpu, c=c)  # q, k, v read once: the floor
        fwd = max(cal.attention_seconds(direction="fwd", **args), streamed)
        fwd = _t(fwd, "compute" if fwd > streamed else "memory")
        bwd = ZERO
        if train:
            bwd = max(cal.attention_seconds(direction="bwd", **args), 2 * streamed)
            bwd = _t(bwd, "compute" if bwd > 2 * streamed else "memory")
        return fwd, bwd, ZERO, f["flops"] * share

    def block(self, facts: list[dict], sh: Shard) -> BlockTime:
        """F/I/W/R and communication of one block's facts for one micro-batch on one GPU."""
        F = I = W = R = ZERO  # noqa: E741
        flops, kernels = 0.0, 0
        experts = None
        for f in facts:
            fwd, inp, wgt, fl = self.kernel(f, sh)
            F, I, W = F + fwd, I + inp, W + wgt  # noqa: E741
            if f["recompute"] and self.mode == "train":
                R = R + fwd
            flops += fl
            kernels += f["count"] if f["kernel"] != "none" else 0
            if f["kernel"] == "experts":
                experts = f
        gap = Time(overhead=cal.launch_seconds(kernels, self.c)) if self.mode != "decode" else ZERO
        F = F + gap
        if self.mode == "train":
            I, W, R = I + gap, W + gap * 0.5, R  # noqa: E741  (W launches about half the kernels of I)
        comm, f_comm, b_comm = self.communication(facts, experts, sh)
        return BlockTime(F, I, W, R, f_comm, b_comm, comm, flops, kernels)

    def communication(self, facts, experts, sh: Shard) -> tuple[dict, Time, Time]:
        """EP dispatch/combine and attention-TP collectives of one block: ({transfer: figures}, forward, backward)."""
        out, f_comm, b_comm = {}, ZERO, ZERO
        c = self.c
        if experts is not None and sh.ep > 1:
            tokens, top_k, _, _, d = experts["shape"]
            t = tokens * _token_factor(experts, sh)
            per_token = sh.routes_per_token or top_k
            fp8 = experts["dtype"] == "fp8"
            payloads = {"dispatch": d + 4 * math.ceil(d / 128) if fp8 else 2 * d, "combine": 2 * d}
            phases = ("dispatch", "combine") if self.mode != "train" else ("dispatch", "combine", "dispatch_bwd",
                                                                            "combine_bwd")
            for name in phases:
                phase = name.split("_")[0]
                pay = payloads[phase] if not name.endswith("_bwd") else 2 * d
                if self.mode == "decode":  # low-latency kernels: every route straight over RDMA
                    ib, nv = t * per_token * (1 - 1 / sh.ep) * pay * sh.imbalance, 0.0
                    cal_phase = "dispatch" if name in ("dispatch", "combine_bwd") else "combine"
                    total = cal.ep_low_latency_seconds(t * sh.imbalance, top_k=per_token, hidden=d, ep=sh.ep,
                                                       phase=cal_phase, c=c)
                    alpha = cal.ep_low_latency_seconds(0, top_k=per_token, hidden=d, ep=sh.ep, phase=cal_phase, c=c)
                else:
                    ib, nv = two_hop_bytes(t * sh.imbalance, pay, sh.ep, sh.gpus_per_node, *sh.fanout)
                    cal_phase = "dispatch" if name in ("dispatch", "combine_bwd") else "combine"
                    kw = dict(ep=sh.ep, gpus_per_node=sh.gpus_per_node, phase=cal_phase, comm_sms=sh.comm_sms, c=c)
                    total = cal.ep_normal_seconds(ib, nv, **kw)
                    alpha = cal.ep_normal_seconds(0.0, 0.0, **kw)
                piece = Time(comm=max(0.0, total - alpha), latency=alpha)
                out[name] = {"ib_bytes": ib, "nvlink_bytes": nv, "seconds": total, "latency_seconds": alpha}
                if name.endswith("_bwd"):
                    b_comm = b_comm + piece
                else:
                    f_comm = f_comm + piece
        if sh.tp > 1 and any(f["kernel"] in ("attention", "latent_attention") for f in facts):
            piece, figures = self._tp_collectives(facts, sh)
            out["tp"] = figures
            f_comm = f_comm + piece
        return out, f_comm, b_comm

    def _tp_collectives(self, facts, sh: Shard) -> tuple[Time, dict]:
        """Attention TP+SP: all-gather of the compressed q/kv latents before the heads, reduce-scatter after o_proj."""
        gather = scatter = 0.0
        for f in facts:
            if f["kernel"] == "gemm" and f["role"].endswith(HEAD_SPLIT_N) and f["shape"][0] == 1:
                gather += f["shape"][1] * sh.scale * f["shape"][3] * 2 * f["count"]  # the head GEMMs' inputs
            if f["kernel"] == "gemm" and f["role"].endswith(HEAD_SPLIT_K):
                scatter += f["shape"][1] * sh.scale * f["shape"][2] * 2 * f["count"]
        kw = dict(ranks=sh.tp, ranks_per_node=min(sh.tp, sh.gpus_per_node), c=self.c)
        ag, rs = cal.all_gather_seconds(gather, **kw), cal.reduce_scatter_seconds(scatter, **kw)
        alpha = cal.all_gather_seconds(0.0, **kw) + cal.reduce_scatter_seconds(0.0, **kw)
        total = ag + rs
        return Time(comm=max(0.0, total - alpha), latency=alpha), {
            "all_gather_bytes": gather, "reduce_scatter_bytes": scatter, "seconds": total, "latency_seconds": alpha}

