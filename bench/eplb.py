"""Expert-load balancing on a skewed load: max/mean GPU load before and after, against plain greedy.

    python bench/eplb.py                       # 58 MoE layers x 256 experts, Zipf s=0.8, seed 0
    python bench/eplb.py --write load.json     # also write the load file ({"layers": [[count, ...], ...]})
    python bench/eplb.py --load load.json      # balance a given load file instead

The load: per layer a seeded random permutation of Zipf weights 1/rank^s scaled to `--tokens` routed
token-slots, rounded to counts. Each row: the deployment, mean over layers of max/mean GPU load for
the contiguous placement without replicas (before), the plain greedy balancer (replicate by
load/replicas, heaviest replica to the lightest non-full GPU) and rebalance_experts (after), the
worst layer of each, and rebalance_experts' time. All figures come from one run.
"""

from __future__ import annotations

import argparse
import heapq
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dsv3c.eplb import (contiguous_loads, gpu_loads, imbalance, load_expert_load, rebalance_experts,  # noqa: E402
                        save_expert_load)

CASES = (  # name, num_replicas, num_groups, num_nodes, num_gpus
    ("train EP64, 8 nodes, no redundancy", 256, 8, 8, 64),
    ("train EP64, 8 nodes, +64 redundant", 320, 8, 8, 64),
    ("prefill EP32, 4 nodes, +32 redundant", 288, 8, 4, 32),
    ("decode EP320, 40 nodes, +64 redundant", 320, 8, 40, 320),
)


def zipf_load(layers: int, experts: int, s: float, tokens: int, seed: int) -> torch.Tensor:
    """Seeded [layers, experts] counts: each layer a random permutation of Zipf(s) shares of `tokens`."""
    g = torch.Generator().manual_seed(seed)
    share = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** s
    share /= share.sum()
    return torch.stack([(share[torch.randperm(experts, generator=g)] * tokens).round() for _ in range(layers)])


def greedy(w: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> torch.Tensor:
    """phy2log of the plain greedy balancer, hierarchical under the same condition as rebalance_experts."""

    def pack(weights, bins):
        per, heap, members = len(weights) // bins, [(0.0, b) for b in range(bins)], [[] for _ in range(bins)]
        for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
            load, b = heapq.heappop(heap)
            members[b].append(i)
            if len(members[b]) < per:
                heapq.heappush(heap, (load + weights[i], b))
        return members

    groups, nodes = (num_groups, num_nodes) if num_groups % num_nodes == 0 else (1, 1)
    gsize, rows = w.shape[1] // groups, []
    for row in w.tolist():
        phy = []
        for node_groups in pack([sum(row[g * gsize:(g + 1) * gsize]) for g in range(groups)], nodes):
            ids = sorted(g * gsize + j for g in node_groups for j in range(gsize))
            cnt = [1] * len(ids)
            heap = [(-row[e], i) for i, e in enumerate(ids)]
            heapq.heapify(heap)
            for _ in range(num_replicas // nodes - len(ids)):
                _, i = heapq.heappop(heap)
                cnt[i] += 1
                heapq.heappush(heap, (-row[ids[i]] / cnt[i], i))
            lab = [e for e, c in zip(ids, cnt) for _ in range(c)]
            for gpu in pack([row[e] / c for e, c in zip(ids, cnt) for _ in range(c)], num_gpus // nodes):
                phy += sorted(lab[i] for i in gpu)
        rows.append(phy)
    return torch.tensor(rows, dtype=torch.int64)


def main(argv=None) -> int:
    """Print the before/greedy/after table for the four deployments."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=58)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--zipf", type=float, default=0.8, help="Zipf exponent s of the load (default 0.8)")
    ap.add_argument("--tokens", type=int, default=4096 * 8 * 64, help="routed token-slots per layer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", help="write the generated load to this JSON file")
    ap.add_argument("--load", help="balance this JSON load file instead of a generated one")
    args = ap.parse_args(argv)
    if args.load:
        w = load_expert_load(args.load)
        src = args.load
    else:
        w = zipf_load(args.layers, args.experts, args.zipf, args.tokens, args.seed)
        src = f"Zipf s={args.zipf}, seed {args.seed}"
    if args.write:
        save_expert_load(w, args.write)
    print(f"load: {w.shape[0]} layers x {w.shape[1]} experts ({src}); max/mean GPU load, mean over layers (worst)")
    print(f"{'deployment':40s} {'before':>15s} {'greedy':>15s} {'after':>15s} {'after/greedy':>12s} {'time':>7s}")
    for name, replicas, groups, nodes, gpus in CASES:
        t0 = time.perf_counter()
        phy2log, _, logcnt = rebalance_experts(w, replicas, groups, nodes, gpus)
        dt = time.perf_counter() - t0
        g = greedy(w, replicas, groups, nodes, gpus)
        gcnt = torch.zeros(w.shape, dtype=torch.int64).scatter_add_(1, g, torch.ones_like(g))
        rows = [imbalance(contiguous_loads(w, gpus)), imbalance(gpu_loads(w, g, gcnt, gpus)),
                imbalance(gpu_loads(w, phy2log, logcnt, gpus))]
        means = [sum(r) / len(r) for r in rows]
        cells = [f"{m:6.3f} ({max(r):6.3f})" for m, r in zip(means, rows)]
        print(f"{name:40s} {cells[0]:>15s} {cells[1]:>15s} {cells[2]:>15s} {means[2] / means[1]:12.4f} {dt:6.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
