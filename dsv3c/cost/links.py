"""Link times with latency (alpha + bytes / beta), calibrated on published DeepEP and NCCL measurements.

Each function is pure and reads its constants from `c` (name -> value; None: the calibrated defaults of
`dsv3c.cost.calibration_constants`). Bandwidths are per GPU, one direction, in the units the sources publish (GB/s =
1e9 bytes/s). The constants are H800's with one 400 Gb/s NIC per GPU; another cluster overrides the
bandwidth constants (e.g. nccl_nvlink_busbw_GBps=370 on H100, NVIDIA's figure).
"""

from __future__ import annotations

from math import ceil, log2

from dsv3c.cost.calibration_constants import values

PHASES = ("dispatch", "combine")
LINKS = ("nvlink", "ib")
NORMAL_EPS = (16, 32, 64)  # the internode EP sizes DeepEP's normal-kernel table measures


def _check_phase(phase: str) -> None:
    """ValueError unless phase is dispatch or combine."""
    if phase not in PHASES:
        raise ValueError(f"phase must be 'dispatch' or 'combine', got {phase!r}")


def ep_normal_rdma_GBps(ep: int, phase: str, c=None) -> float:
    """DeepEP normal kernels' RDMA bandwidth at EP size ep: the published EP16/32/64 values, linear in log2(EP)
    between them, EP16's below EP16 and EP64's above EP64."""
    _check_phase(phase)
    c = values(c)
    points = [(log2(e), c[f"ep_normal_rdma_{phase}_ep{e}_GBps"]) for e in NORMAL_EPS]
    x = min(max(log2(ep), points[0][0]), points[-1][0])
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def ep_normal_seconds(rdma_bytes: float, nvlink_bytes: float, *, ep: int, gpus_per_node: int = 8,
                      phase: str = "dispatch", comm_sms: int, c=None) -> float:
    """Seconds of one DeepEP normal dispatch/combine (training, prefill) moving these bytes per GPU.

    alpha + max(rdma_bytes / RDMA bandwidth at this EP, nvlink_bytes / NVLink bandwidth): IB and NVLink run
    concurrently and the slower one binds. rdma_bytes are the bytes this GPU sends to other nodes (a token
    once per destination node), nvlink_bytes what it receives over NVLink. Both bandwidths scale with
    comm_sms / saturating SMs, capped at 1. 0 at ep=1.
    """
    _check_phase(phase)
    if rdma_bytes < 0 or nvlink_bytes < 0 or ep < 1 or gpus_per_node < 1:
        raise ValueError(f"bad normal-kernel arguments: rdma_bytes={rdma_bytes} nvlink_bytes={nvlink_bytes} "
                         f"ep={ep} gpus_per_node={gpus_per_node}")
    if rdma_bytes and ep <= gpus_per_node:
        raise ValueError(f"EP{ep} fits in a node of {gpus_per_node} GPUs: it sends nothing over RDMA")
    if comm_sms <= 0:
        raise ValueError(f"comm_sms must be positive, got {comm_sms}")
    if ep == 1:
        return 0.0  # no expert parallelism: nothing to exchange
    c = values(c)
    share = min(1.0, comm_sms / c["comm_sms_saturate"])
    rdma = rdma_bytes / (ep_normal_rdma_GBps(ep, phase, c) * 1e9) if rdma_bytes else 0.0
    nvlink = nvlink_bytes / (c[f"ep_normal_nvlink_{phase}_GBps"] * 1e9)
    return c["ep_normal_alpha_us"] * 1e-6 + max(rdma, nvlink) / share


def ep_low_latency_bytes(tokens: int, *, top_k: int, hidden: int, phase: str) -> int:
    """Bytes one rank sends in a low-latency dispatch (FP8 + scales + header) or combine (BF16), as DeepEP counts."""
    _check_phase(phase)
    per_copy = hidden + hidden // 128 * 4 + 16 if phase == "dispatch" else 2 * hidden
    return tokens * top_k * per_copy


def ep_low_latency_seconds(tokens: int, *, top_k: int, hidden: int, ep: int, phase: str, gpus_per_node: int = 8,
                           nvlink: bool = True, c=None) -> float:
    """Seconds of one DeepEP low-latency dispatch/combine (decode) of `tokens` tokens per rank.

    alpha + max(bytes to other nodes / IB bandwidth, bytes to node-mates / NVLink bandwidth) with uniform
    routing: a share min(1, gpus_per_node / ep) of the copies stays in the node (1 / ep, the rank itself,
    with nvlink=False: DeepEP's pure-RDMA mode). Never below alpha (0 at ep=1). Non-decreasing in ep at fixed tokens over
    whole-node EP sizes (ep <= gpus_per_node or a multiple of it) while the NVLink bandwidth is at least twice
    the IB bandwidth, as fitted; between those sizes the concurrent NVLink share can make it dip.
    """
    if min(tokens, top_k, hidden) < 0 or ep < 1 or gpus_per_node < 1:
        raise ValueError(f"bad low-latency arguments: tokens={tokens} top_k={top_k} hidden={hidden} ep={ep} "
                         f"gpus_per_node={gpus_per_node}")
    if ep == 1:
        return 0.0  # no expert parallelism: nothing to exchange
    c = values(c)
    nbytes = ep_low_latency_bytes(tokens, top_k=top_k, hidden=hidden, phase=phase)
    local = min(1.0, gpus_per_node / ep) if nvlink else 1 / ep
    ib = nbytes * (1 - local) / (c[f"ep_ll_{phase}_ib_GBps"] * 1e9)
    node = nbytes * local / (c[f"ep_ll_{phase}_nvlink_GBps"] * 1e9)
    return c[f"ep_ll_{phase}_alpha_us"] * 1e-6 + max(ib, node)


def _busbw(link: str, c) -> float:
    """NCCL bus bandwidth of a link kind in bytes/s."""
    if link not in LINKS:
        raise ValueError(f"link must be 'nvlink' or 'ib', got {link!r}")
    return c[f"nccl_{link}_busbw_GBps"] * 1e9


def p2p_seconds(nbytes: float, *, link: str, c=None) -> float:
    """Seconds of one NCCL send/recv of nbytes (pipeline activations): base + one step of latency + bytes / busbw."""
    if nbytes < 0:
        raise ValueError(f"bytes must be >= 0, got {nbytes}")
    c = values(c)
    bw = _busbw(link, c)
    return (c["nccl_base_us"] + c[f"nccl_{link}_step_us"]) * 1e-6 + nbytes / bw


def ring_seconds(nbytes: float, *, ranks: int, ranks_per_node: int, c=None) -> float:
    """Seconds of an NCCL ring all-gather or reduce-scatter whose nccl-tests size is nbytes.

    NCCL's latency model (base + (ranks - 1) steps, nodes - 1 of them over IB) plus nbytes (ranks-1)/ranks at
    the bus bandwidth of the slowest link (IB when the ring spans nodes, NVLink inside one).
    """
    if nbytes < 0 or ranks < 1 or ranks_per_node < 1:
        raise ValueError(f"bad ring arguments: nbytes={nbytes} ranks={ranks} ranks_per_node={ranks_per_node}")
    if ranks == 1:
        return 0.0
    c = values(c)
    nodes = ceil(ranks / ranks_per_node)
    ib_steps = nodes - 1
    latency = c["nccl_base_us"] + (ranks - 1 - ib_steps) * c["nccl_nvlink_step_us"] + ib_steps * c["nccl_ib_step_us"]
    bw = _busbw("ib" if nodes > 1 else "nvlink", c)
    return latency * 1e-6 + nbytes * (ranks - 1) / ranks / bw


def reduce_scatter_seconds(nbytes: float, *, ranks: int, ranks_per_node: int, c=None) -> float:
    """Seconds of a ring reduce-scatter of an nbytes input per rank (ZeRO-1 gradients)."""
    return ring_seconds(nbytes, ranks=ranks, ranks_per_node=ranks_per_node, c=c)


def all_gather_seconds(nbytes: float, *, ranks: int, ranks_per_node: int, c=None) -> float:
    """Seconds of a ring all-gather into an nbytes output per rank (ZeRO-1 parameters)."""
    return ring_seconds(nbytes, ranks=ranks, ranks_per_node=ranks_per_node, c=c)
