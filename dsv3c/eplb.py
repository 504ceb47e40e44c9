"""Expert-load balancing: replicate heavy experts and pack the replicas onto GPUs.

`rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)` follows the interface
expert-load balancers share: `weight[l, e]` is the token count of logical expert e in layer l, and
the result is `(phy2log, log2phy, logcnt)`:

    phy2log[l, p]     logical expert held by physical slot p; slots are GPU-major (GPU g holds
                      slots g*S .. g*S+S-1, S = num_replicas / num_gpus), ascending logical id
                      inside a GPU
    log2phy[l, e, k]  the physical slots of expert e, ascending, padded with -1
    logcnt[l, e]      the replica count of expert e

Hierarchical mode (groups divide evenly over nodes): expert groups are packed onto nodes balancing
their load (so every replica of a group stays on its node, which keeps node-limited routing), each
node's slots are handed out by replication inside the node, and the node's replicas are packed onto
its GPUs. Global mode (otherwise): replication over all experts, then packing onto all GPUs.

Replication gives one more replica to the expert with the largest load per replica, which is optimal
for the largest per-replica load. Packing is greedy (heaviest item to the lightest bin that still has
room, avoiding a second replica of one expert on a GPU when another bin can take it) followed by
pairwise swaps between the heaviest bin and any other bin while the pair's maximum drops. Per layer
the result is the best (smallest max GPU load) of that refined placement, the plain greedy placement
and, when representable, the contiguous one; so it is never worse than any of them.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import math

import torch


class PlacementError(ValueError):
    """An expert placement, load file or parallel mesh that cannot be honoured; the message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@contextlib.contextmanager
def one_thread():
    """Run the body with one torch thread: these tensors are small, and spinning threads only cost time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


MAX_LOAD = 1e15  # a token count per expert: sums over 4096 layers x experts stay far inside float64


def positive_int(name: str, value) -> int:
    """value itself, after checking it is a positive int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlacementError(f"{name} must be a positive integer, got {value!r}")
    return value


def as_load(weight) -> torch.Tensor:
    """weight as a float64 [layers, experts] tensor of finite non-negative loads (PlacementError otherwise)."""
    if not isinstance(weight, torch.Tensor):
        try:
            weight = torch.as_tensor(weight)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise PlacementError(f"expert load is not numeric: {exc}") from None
    if weight.dtype == torch.bool or weight.is_complex():
        raise PlacementError(f"expert load must be real numbers, got dtype {weight.dtype}")
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] < 1:
        raise PlacementError(f"expert load must be a non-empty [layers, experts] matrix, got shape {tuple(weight.shape)}")
    w = weight.detach().to("cpu", torch.float64)
    if not torch.isfinite(w).all() or (w < 0).any():
        raise PlacementError("expert load must be finite and non-negative")
    return w


def _replicate(w: torch.Tensor, slots: int) -> torch.Tensor:
    """Replica counts [B, n] summing to `slots` per row: one more each time to the largest load per replica."""
    cnt = torch.ones_like(w, dtype=torch.int64)
    rows = torch.arange(w.shape[0])
    for _ in range(slots - w.shape[1]):
        cnt[rows, (w / cnt).argmax(-1)] += 1  # argmax takes the first maximum: ties go to the lowest id
    return cnt


def _greedy(weights: list[float], labels: list[int], bins: int, spread: bool) -> list[list[int]]:
    """Item positions per bin: heaviest first to the lightest bin with room (spread: avoid repeated labels)."""
    per_bin = len(weights) // bins
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    heap = [(0.0, b) for b in range(bins)]
    members: list[list[int]] = [[] for _ in range(bins)]
    held: list[set[int]] = [set() for _ in range(bins)]
    for i in order:
        skipped = []
        load, b = heapq.heappop(heap)
        while spread and labels[i] in held[b] and heap:
            skipped.append((load, b))
            load, b = heapq.heappop(heap)
        if spread and labels[i] in held[b]:  # every open bin holds the label already: take the lightest
            skipped.append((load, b))
            skipped.sort()
            load, b = skipped.pop(0)
        members[b].append(i)
        held[b].add(labels[i])
        if len(members[b]) < per_bin:
            heapq.heappush(heap, (load + weights[i], b))
        for entry in skipped:
            heapq.heappush(heap, entry)
    return members


def _refine(w: torch.Tensor, lab: torch.Tensor, pos: torch.Tensor, max_iter: int) -> torch.Tensor:
    """pos [B, bins, k] after swaps between each problem's heaviest bin and another bin that lower the pair's max."""
    bsz, bins, k = pos.shape
    if bins < 2:
        return pos
    rows = torch.arange(bsz)
    pos = pos.clone()
    for _ in range(max_iter):
        wb, lb = w.gather(1, pos.view(bsz, -1)).view_as(pos), lab.gather(1, pos.view(bsz, -1)).view_as(pos)
        load = wb.sum(-1)
        h = load.argmax(-1)
        top = load[rows, h]
        wh, lh = wb[rows, h], lb[rows, h]
        d = wh[:, None, :, None] - wb[:, :, None, :]  # [B, bin, i in heaviest, j in bin]
        new_max = torch.maximum(top[:, None, None, None] - d, load[:, :, None, None] + d)
        eq = lb[:, :, :, None] == lh[:, None, None, :]  # [B, bin, j, i]
        ok = (d > 0) & (new_max < top[:, None, None, None] * (1 - 1e-12))
        ok &= ~eq.any(2)[:, :, :, None] & ~eq.any(3)[:, :, None, :]  # no second replica of one expert on a bin
        ok &= torch.arange(bins)[None, :, None, None] != h[:, None, None, None]
        score = torch.where(ok, new_max, torch.full_like(new_max, math.inf)).view(bsz, -1)
        best, idx = score.min(-1)
        act = torch.isfinite(best).nonzero().flatten()
        if act.numel() == 0:
            break
        idx = idx[act]
        b, i, j = idx // (k * k), (idx // k) % k, idx % k
        hi = h[act]
        pi, pj = pos[act, hi, i].clone(), pos[act, b, j].clone()
        pos[act, hi, i], pos[act, b, j] = pj, pi
    return pos


def _pack(w: torch.Tensor, lab: torch.Tensor, bins: int, refine: bool) -> torch.Tensor:
    """Item positions [B, bins, n/bins] packing each row of w [B, n] into bins with equal counts."""
    wl, ll = w.tolist(), lab.tolist()
    pos = torch.tensor([_greedy(wl[r], ll[r], bins, refine) for r in range(w.shape[0])], dtype=torch.int64)
    pos = pos.view(w.shape[0], bins, w.shape[1] // bins)
    return _refine(w, lab, pos, 4 * w.shape[1]) if refine else pos


def _place(w: torch.Tensor, num_replicas: int, groups: int, nodes: int, gpus: int, refine: bool) -> torch.Tensor:
    """phy2log [L, num_replicas] of the hierarchical placement (global when groups = nodes = 1)."""
    layers, experts = w.shape
    gsize, per_node = experts // groups, experts // nodes
    gw = w.view(layers, groups, gsize).sum(-1)
    gpos = _pack(gw, torch.arange(groups).expand(layers, groups), nodes, refine)  # [L, nodes, groups/nodes]
    ids = (gpos[..., None] * gsize + torch.arange(gsize)).view(layers, nodes, per_node).sort(-1).values
    nw = w.gather(1, ids.view(layers, -1)).view(layers * nodes, per_node)
    node_slots = num_replicas // nodes
    cnt = _replicate(nw, node_slots)
    ids = ids.view(layers * nodes, per_node)
    rep_lab = ids.flatten().repeat_interleave(cnt.flatten()).view(-1, node_slots)
    rep_w = (nw / cnt).flatten().repeat_interleave(cnt.flatten()).view(-1, node_slots)
    pos = _pack(rep_w, rep_lab, gpus // nodes, refine)  # [L*nodes, gpus/node, S]
    slots = rep_lab.gather(1, pos.view(pos.shape[0], -1)).view_as(pos).sort(-1).values
    return slots.reshape(layers, num_replicas)


def inverse_tables(phy2log: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log2phy, logcnt) of phy2log: each expert's slots ascending, padded with -1."""
    layers, slots = phy2log.shape
    logcnt = torch.zeros(layers, experts, dtype=torch.int64).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    order = (phy2log * slots + torch.arange(slots)).argsort(-1)
    logical = phy2log.gather(1, order)
    start = logcnt.cumsum(-1) - logcnt
    k = torch.arange(slots) - start.gather(1, logical)
    log2phy = torch.full((layers, experts, int(logcnt.max())), -1, dtype=torch.int64)
    log2phy[torch.arange(layers)[:, None].expand(-1, slots), logical, k] = order
    return log2phy, logcnt


def check_sizes(experts: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> bool:
    """Whether the placement is hierarchical, after checking the sizes (PlacementError when impossible)."""
    for name, val in dict(num_replicas=num_replicas, num_groups=num_groups, num_nodes=num_nodes,
                          num_gpus=num_gpus).items():
        positive_int(name, val)
    if num_replicas < experts:
        raise PlacementError(f"num_replicas {num_replicas} is below the {experts} logical experts")
    if num_replicas % num_gpus:
        raise PlacementError(f"num_replicas {num_replicas} is not divisible by num_gpus {num_gpus}")
    if experts % num_groups:
        raise PlacementError(f"{experts} experts are not divisible into num_groups {num_groups}")
    if num_gpus % num_nodes:
        raise PlacementError(f"num_gpus {num_gpus} is not divisible by num_nodes {num_nodes}")
    return num_groups % num_nodes == 0


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
    """(phy2log, log2phy, logcnt) placing num_replicas replicas of the experts on num_gpus GPUs (see module doc)."""
    w = as_load(weight)
    layers, experts = w.shape
    if check_sizes(experts, num_replicas, num_groups, num_nodes, num_gpus):
        shape = (num_groups, num_nodes)
    else:
        shape = (1, 1)
    with one_thread():
        cands = [_place(w, num_replicas, *shape, num_gpus, refine) for refine in (True, False)]
        if num_replicas == experts and experts % num_gpus == 0:
            cands.append(contiguous_phy2log(layers, experts))
        peaks = torch.stack([_peak(w, c, num_gpus) for c in cands])  # [candidates, L]
        choice = peaks.argmin(0)  # first minimum: the refined placement wins ties
        best = torch.stack(cands)[choice, torch.arange(layers)]
        log2phy, logcnt = inverse_tables(best, experts)
    return best, log2phy, logcnt


def contiguous_phy2log(layers: int, experts: int) -> torch.Tensor:
    """phy2log of the contiguous placement without replicas: slot e holds expert e."""
    return torch.arange(experts).expand(layers, experts).clone()


def _peak(w: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Per-layer max GPU load of phy2log, its replica counts derived from it."""
    cnt = torch.zeros_like(w, dtype=torch.int64).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    return gpu_loads(w, phy2log, cnt, num_gpus).max(-1).values


def gpu_loads(weight, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Per-layer per-GPU load [L, num_gpus]: each slot carries its expert's load / replica count."""
    w = as_load(weight)
    per_slot = w.gather(1, phy2log) / logcnt.gather(1, phy2log).to(torch.float64)
    return per_slot.view(w.shape[0], num_gpus, -1).sum(-1)


def contiguous_loads(weight, num_gpus: int) -> torch.Tensor:
    """Per-layer per-GPU load [L, num_gpus] without replicas, expert e on GPU e // ceil(experts / num_gpus)."""
    w = as_load(weight)
    gpu = torch.arange(w.shape[1]) // -(-w.shape[1] // num_gpus)
    return torch.zeros(w.shape[0], num_gpus, dtype=torch.float64).index_add_(1, gpu, w)


def imbalance(loads: torch.Tensor) -> list[float]:
    """max/mean of each row of loads (1.0 for a row without load)."""
    mean = loads.mean(-1)
    ratio = torch.where(mean > 0, loads.max(-1).values / mean.clamp_min(1e-300), torch.ones_like(mean))
    return [float(x) for x in ratio]


def load_stats(weight, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> dict:
    """Per-layer max/mean GPU load: `before` = contiguous without replicas, `after` = this placement."""
    return {"before": imbalance(contiguous_loads(weight, num_gpus)),
            "after": imbalance(gpu_loads(weight, phy2log, logcnt, num_gpus))}


def load_expert_load(path, layers: int | None = None, experts: int | None = None) -> torch.Tensor:
    """The float64 [layers, experts] load of a JSON file `{"layers": [[count, ...], ...]}`, validated."""
    from dsv3c.inputs import MAX_EXPERT_LOAD_BYTES, load_json

    raw = load_json(path, "expert load", MAX_EXPERT_LOAD_BYTES, PlacementError)
    rows = raw.get("layers") if isinstance(raw, dict) else None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise PlacementError(f'expert load {path} must be {{"layers": [[count, ...], ...]}} with non-empty rows')
    for li, row in enumerate(rows):
        for v in row:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= MAX_LOAD:
                raise PlacementError(f"expert load {path}: layer {li} has an invalid count {v!r} (counts are numbers "
                                     f"in 0..{MAX_LOAD:.0e})")
        if len(row) != len(rows[0]):
            raise PlacementError(f"expert load {path}: layer {li} has {len(row)} counts, layer 0 has {len(rows[0])}")
    if layers is not None and len(rows) != layers:
        raise PlacementError(f"expert load {path} has {len(rows)} layers, the model has {layers} MoE layers")
    if experts is not None and len(rows[0]) != experts:
        raise PlacementError(f"expert load {path} has {len(rows[0])} experts per layer, the model has {experts}")
    return torch.tensor(rows, dtype=torch.float64)


def save_expert_load(weight, path) -> None:
    """Write weight [layers, experts] as the JSON load file `{"layers": [[count, ...], ...]}`."""
    w = as_load(weight)
    rows = [[int(v) if float(v).is_integer() else float(v) for v in row] for row in w.tolist()]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"layers": rows}, f)
