"""Roofline and communication estimates the passes call.

- A GEMM takes max(compute time, HBM time): flops / (dense peak of its dtype, scaled to the SMs it
  may use) against bytes moved / HBM bandwidth. No efficiency factor: these are lower bounds.
- A transfer takes bytes / bandwidth.
- A uniform all-to-all (each GPU of a group sends bytes_per_gpu split evenly over the other members)
  loads, on each GPU, every kind of link its routes cross; NVLink, PCIe and IB run concurrently,
  so a GPU's time is the largest (bytes on a kind) / (sustained bandwidth of that kind), and the
  collective's time is the slowest GPU's. Routes come from the target's topology; a route to another
  node counts on IB and PCIe, and on NVLink too when it changes plane through a node-mate (two-hop).
- SM budget: in train/prefill `comm_sms` SMs run dispatch/combine; decode uses all SMs.
"""

from __future__ import annotations

import math
from collections import Counter

from targets import TargetError
from targets.gpus import as_gpu_spec

DTYPE_BYTES = {"fp8": 1, "bf16": 2, "fp32": 4}


def gemm_cost(m: int, n: int, k: int, dtype: str = "bf16", out_dtype: str = "bf16") -> tuple[int, int]:
    """(FLOPs, HBM bytes) of an [m,k] x [k,n] GEMM reading both inputs and writing the output once."""
    return 2 * m * n * k, (m * k + k * n) * DTYPE_BYTES[dtype] + m * n * DTYPE_BYTES[out_dtype]


def matmul_seconds(flops: float, bytes: float, gpu, dtype: str = "bf16", sms: int | None = None) -> float:
    """Roofline time of a GEMM: max(flops / peak(dtype) scaled to `sms` SMs, bytes / HBM bandwidth)."""
    spec = as_gpu_spec(gpu)
    frac = 1.0 if sms is None else sms / spec.sms
    if not 0 < frac <= 1:
        raise TargetError(f"sms {sms} must be in 1..{spec.sms}")
    return max(flops / (spec.peak_flops(dtype) * frac), bytes / spec.hbm_bandwidth)


def transfer_seconds(bytes: float, bandwidth: float) -> float:
    """Time to move `bytes` over a link of `bandwidth` bytes/s (0 over an infinite one)."""
    if bandwidth <= 0:
        raise TargetError(f"bandwidth must be positive, got {bandwidth}")
    return 0.0 if math.isinf(bandwidth) else bytes / bandwidth


def all_to_all_seconds(bytes_per_gpu: float, target, gpus=None) -> float:
    """Time of a uniform all-to-all in which each GPU of `gpus` (default: all) sends bytes_per_gpu."""
    topo = target.topology
    group = sorted(set(range(target.gpus) if gpus is None else gpus))
    if len(group) < 2:
        return 0.0
    share = bytes_per_gpu / (len(group) - 1)
    node, plane = {g: topo.node_of(g) for g in group}, {g: topo.plane_of(g) for g in group}
    per_node, per_plane = Counter(node.values()), Counter(plane.values())
    per_both = Counter((node[g], plane[g]) for g in group)
    by_plane: dict = {}
    for g in group:
        by_plane.setdefault(plane[g], []).append(g)
    worst, memo = 0.0, {}
    for g in group:
        n, p, both = node[g], plane[g], per_both[node[g], plane[g]]
        counts = {(True, True): both - 1, (True, False): per_node[n] - both,
                  (False, True): per_plane[p] - both,
                  (False, False): len(group) - per_node[n] - per_plane[p] + both}
        key = tuple(sorted(counts.items()))  # routes of one relation have the same per-kind bottlenecks
        if key not in memo:
            load, bw = Counter(), {}
            for (same_node, same_plane), count in counts.items():
                if count:
                    peer = _peer(g, same_node, same_plane, node, plane, by_plane)
                    for kind, achieved in topo.route(g, peer).per_kind:
                        load[kind] += count * share
                        bw[kind] = min(bw.get(kind, math.inf), achieved)
            memo[key] = max((load[k] / bw[k] for k in load), default=0.0)
        worst = max(worst, memo[key])
    return worst


def _peer(g: int, same_node: bool, same_plane: bool, node: dict, plane: dict, by_plane: dict) -> int:
    """A group member other than g with the given (same node, same plane) relation to g."""
    for p, members in by_plane.items():
        if (p == plane[g]) == same_plane:
            for h in members:
                if h != g and (node[h] == node[g]) == same_node:
                    return h
    raise AssertionError("no peer with a relation whose count is positive")
