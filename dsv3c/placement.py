"""Expert placement over GPUs and nodes, node-limited routing bounds, and the parallel mesh (pure logic).

Nothing here opens a process group: the graph pass and the torch.distributed runtime call these
functions to learn which rank holds which expert replicas and which ranks form each collective.

Mesh rule (training and inference alike): `gpus = pp * dp * tp`. A pipeline stage is `dp * tp`
consecutive ranks; inside it tp is innermost (a TP group is consecutive ranks on one node's NVLink)
and the EP group is `ep` consecutive ranks, so it lives inside the stage's data-parallel ranks
(EP64 of a 128-rank stage spans 8 nodes, and the stage holds `edp = dp*tp/ep` copies of its experts,
expert-data-parallel). DeepSeek-V3: training PP16 x DP128 (ZeRO-1) with EP64 on 2048 GPUs; prefill
TP4+SP x DP8 with EP32 on 32 GPUs; decode TP4+SP x DP80 with EP320 on 320 GPUs.
"""

from __future__ import annotations

import collections
import itertools
import math
import random
import re
from dataclasses import dataclass, field

import torch

from dsv3c.eplb import PlacementError, inverse_tables, positive_int, contiguous_phy2log, load_stats, rebalance_experts

__all__ = [
    "PlacementError", "ExpertPlacement", "NodeBound", "ParallelMesh", "contiguous_placement", "max_nodes_per_token_bound",
    "check_node_limit", "node_limited", "keeps_node_limit", "expected_fanout", "nodes_reached", "make_mesh",
    "parse_parallel", "default_mesh",
]


def contiguous_placement(layers: int, experts: int, num_gpus: int):
    """(phy2log, log2phy, logcnt) without replicas: expert e on GPU e // (experts / num_gpus)."""
    for name, val in dict(layers=layers, experts=experts, num_gpus=num_gpus).items():
        positive_int(name, val)
    if experts % num_gpus:
        raise PlacementError(f"{experts} experts do not divide evenly over {num_gpus} GPUs")
    phy2log = contiguous_phy2log(layers, experts)
    return (phy2log, *inverse_tables(phy2log, experts))


@dataclass(frozen=True)
class ExpertPlacement:
    """Which logical expert each physical slot holds, per layer, on num_gpus GPUs in nodes of gpus_per_node."""

    num_gpus: int
    gpus_per_node: int
    phy2log: torch.Tensor  # [layers, slots] int64, GPU-major slots
    log2phy: torch.Tensor  # [layers, experts, max replicas] int64, padded with -1
    logcnt: torch.Tensor  # [layers, experts] int64

    def __post_init__(self):
        """Check the sizes and that the three tables agree."""
        positive_int("num_gpus", self.num_gpus)
        positive_int("gpus_per_node", self.gpus_per_node)
        if self.num_gpus % self.gpus_per_node:
            raise PlacementError(f"{self.num_gpus} GPUs are not whole nodes of {self.gpus_per_node}")
        if self.phy2log.dim() != 2 or self.phy2log.shape[1] % self.num_gpus:
            raise PlacementError(f"phy2log of shape {tuple(self.phy2log.shape)} does not give {self.num_gpus} GPUs "
                                 "equal slots")
        if self.logcnt.shape != (self.layers, self.log2phy.shape[1]) or (self.logcnt < 1).any():
            raise PlacementError("logcnt must give every logical expert at least one replica")

    @classmethod
    def contiguous(cls, layers: int, experts: int, num_gpus: int, gpus_per_node: int) -> "ExpertPlacement":
        """The placement without replicas, experts in contiguous blocks per GPU."""
        return cls(num_gpus, gpus_per_node, *contiguous_placement(layers, experts, num_gpus))

    @classmethod
    def balanced(cls, weight, num_gpus: int, gpus_per_node: int, num_replicas: int,
                 num_groups: int = 1) -> "ExpertPlacement":
        """The rebalance_experts placement of weight [layers, experts] (hierarchical over nodes when it can be)."""
        positive_int("gpus_per_node", gpus_per_node)
        nodes = max(1, num_gpus // gpus_per_node)
        return cls(num_gpus, gpus_per_node, *rebalance_experts(weight, num_replicas, num_groups, nodes, num_gpus))

    @property
    def layers(self) -> int:
        """Number of layers placed."""
        return self.phy2log.shape[0]

    @property
    def experts(self) -> int:
        """Number of logical experts per layer."""
        return self.logcnt.shape[1]

    @property
    def num_slots(self) -> int:
        """Physical slots per layer over all GPUs."""
        return self.phy2log.shape[1]

    @property
    def slots_per_gpu(self) -> int:
        """Physical slots each GPU holds per layer."""
        return self.num_slots // self.num_gpus

    @property
    def num_nodes(self) -> int:
        """Number of nodes the GPUs fill."""
        return self.num_gpus // self.gpus_per_node

    def gpu_of_slot(self, slot):
        """The GPU holding a physical slot (int or tensor)."""
        return slot // self.slots_per_gpu

    def node_of_gpu(self, gpu):
        """The node of a GPU (int or tensor)."""
        return gpu // self.gpus_per_node

    def node_of_slot(self, slot):
        """The node holding a physical slot (int or tensor)."""
        return self.node_of_gpu(self.gpu_of_slot(slot))

    def local_experts(self, layer: int, rank: int) -> list[int]:
        """Logical expert ids of the slots on GPU `rank` in `layer`, in slot order."""
        s = self.slots_per_gpu
        return self.phy2log[layer, rank * s:(rank + 1) * s].tolist()

    def redundant(self, layer: int) -> list[int]:
        """Logical experts of `layer` with more than one replica."""
        return (self.logcnt[layer] > 1).nonzero().flatten().tolist()

    def choose_replica(self, layer: int, expert_ids: torch.Tensor, token_index=None, token_node=None) -> torch.Tensor:
        """Physical slot serving each (token, expert) of expert_ids [T, k]: round-robin by token index.

        Token t uses replica number t mod c of the c candidates (slots ascending), which spreads an
        expert's tokens evenly over its replicas. With token_node [T] the candidates are the replicas
        on the token's own node when it has any (no inter-node hop), all replicas otherwise.
        token_index defaults to 0..T-1.
        """
        ids = torch.as_tensor(expert_ids, dtype=torch.int64)
        if ids.dim() != 2:
            raise PlacementError(f"expert_ids must be [tokens, k], got shape {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.experts):
            raise PlacementError(f"expert ids must lie in 0..{self.experts - 1}")
        t = torch.arange(ids.shape[0]) if token_index is None else torch.as_tensor(token_index, dtype=torch.int64)
        slots = self.log2phy[layer][ids]  # [T, k, R]
        cand = slots >= 0
        if token_node is not None:
            home = torch.as_tensor(token_node, dtype=torch.int64)[:, None, None]
            local = cand & (self.node_of_slot(slots.clamp_min(0)) == home)
            cand = torch.where(local.any(-1, keepdim=True), local, cand)
        count = cand.sum(-1)
        pick = (t[:, None] % count)[..., None]
        nth = cand.cumsum(-1) - 1
        return slots.gather(-1, ((nth == pick) & cand).to(torch.int64).argmax(-1, keepdim=True)).squeeze(-1)

    def stats(self, weight) -> dict:
        """Per-layer max/mean GPU load of weight before (contiguous, no replicas) and after this placement."""
        return load_stats(weight, self.phy2log, self.logcnt, self.num_gpus)

    def to_dict(self, weight=None) -> dict:
        """JSON summary: sizes, per layer the redundant experts (and with weight, max/mean load before/after)."""
        out = {"num_gpus": self.num_gpus, "gpus_per_node": self.gpus_per_node, "slots_per_gpu": self.slots_per_gpu,
               "redundant_slots": self.num_slots - self.experts}
        st = self.stats(weight) if weight is not None else None
        out["layers"] = [{"redundant": self.redundant(l),
                          **({"max_mean_before": round(st["before"][l], 4), "max_mean_after": round(st["after"][l], 4)}
                             if st else {})} for l in range(self.layers)]
        return out


@dataclass(frozen=True)
class NodeBound:
    """Most nodes any token can reach per layer, the group choice attaining it, and whether it is exact."""

    per_layer: list[int]
    groups: list[tuple[int, ...]]
    exact: bool

    @property
    def max(self) -> int:
        """The bound over all layers."""
        return max(self.per_layer)


def group_nodes(placement: ExpertPlacement, n_group: int) -> torch.Tensor:
    """[layers, n_group, nodes] bool: whether the node holds a replica of an expert of the group."""
    positive_int("n_group", n_group)
    if placement.experts % n_group:
        raise PlacementError(f"{placement.experts} experts are not divisible into n_group {n_group}")
    layers, slots = placement.phy2log.shape
    out = torch.zeros(layers, n_group, placement.num_nodes, dtype=torch.bool)
    node = placement.node_of_slot(torch.arange(slots)).expand(layers, slots)
    group = placement.phy2log // (placement.experts // n_group)
    out[torch.arange(layers)[:, None].expand(-1, slots), group, node] = True
    return out


def max_nodes_per_token_bound(placement: ExpertPlacement, n_group: int, topk_group: int,
                              experts_per_token: int | None = None, exact_limit: int = 20000) -> NodeBound:
    """Most nodes a token choosing experts in topk_group groups can reach, from the replicas' nodes.

    Exact (the largest union of topk_group groups' node sets, over all combinations) when there are at
    most exact_limit combinations; otherwise the sum of the topk_group largest node sets (capped at the
    node count), an upper bound. experts_per_token further caps it (one replica serves each expert).
    """
    positive_int("topk_group", topk_group)
    if topk_group > n_group:
        raise PlacementError(f"topk_group {topk_group} exceeds n_group {n_group}")
    masks = [[sum(1 << n for n in row.nonzero().flatten().tolist()) for row in layer]
             for layer in group_nodes(placement, n_group)]
    exact = math.comb(n_group, topk_group) <= exact_limit
    per_layer, worst = [], []
    for sets in masks:
        if exact:
            best, arg = -1, ()
            for combo in itertools.combinations(range(n_group), topk_group):
                u = 0
                for g in combo:
                    u |= sets[g]
                if u.bit_count() > best:
                    best, arg = u.bit_count(), combo
        else:
            arg = tuple(sorted(sorted(range(n_group), key=lambda g: (-sets[g].bit_count(), g))[:topk_group]))
            best = min(placement.num_nodes, sum(sets[g].bit_count() for g in arg))
        if experts_per_token is not None:
            best = min(best, experts_per_token)
        per_layer.append(best)
        worst.append(arg)
    return NodeBound(per_layer, worst, exact)


def node_limited(n_group: int, topk_group: int) -> bool:
    """Whether routing limits a token's groups (n_group > 1, keeping topk_group < n_group), hence its nodes."""
    return n_group > 1 and topk_group < n_group


def keeps_node_limit(placement: ExpertPlacement, n_group: int, topk_group: int) -> bool:
    """Whether no token of any layer can reach more than topk_group nodes (true without node-limited routing)."""
    if not node_limited(n_group, topk_group) or placement.num_nodes <= topk_group:
        return True
    return max_nodes_per_token_bound(placement, n_group, topk_group).max <= topk_group


def expected_fanout(placement: ExpertPlacement, n_group: int, topk_group: int, top_k: int, layer: int = 0,
                    max_choices: int = 2000) -> tuple[float, float]:
    """(E[distinct nodes], E[distinct GPUs]) that one token's top_k experts reach in `layer` of the placement.

    Model (uniform routing): with node-limited routing the token's topk_group groups are a uniform choice of
    the n_group (all choices when at most max_choices, else max_choices drawn with a fixed seed); without it
    its candidates are all experts. Its top_k experts are a uniform choice of the m candidates, each served
    by its first replica. A place (node or GPU) holding a of the m candidates is hit with probability
    1 - C(m - a, k) / C(m, k) (hypergeometric); the expectation sums that over places and averages the choices.
    """
    positive_int("top_k", top_k)
    experts = placement.experts
    gpu = placement.gpu_of_slot(placement.log2phy[layer, :, 0])
    places = (placement.node_of_gpu(gpu).tolist(), gpu.tolist())
    if node_limited(n_group, topk_group):
        size = experts // n_group
        if math.comb(n_group, topk_group) <= max_choices:
            choices = list(itertools.combinations(range(n_group), topk_group))
        else:
            rng = random.Random(0)
            choices = [rng.sample(range(n_group), topk_group) for _ in range(max_choices)]
        candidates = [[e for g in groups for e in range(g * size, (g + 1) * size)] for groups in choices]
    else:
        candidates = [range(experts)]
    totals = [0.0, 0.0]
    for members in candidates:
        m = len(members)
        k = min(top_k, m)
        for i, place in enumerate(places):
            held = collections.Counter(place[e] for e in members)
            totals[i] += sum(1 - math.comb(m - a, k) / math.comb(m, k) for a in held.values())
    return totals[0] / len(candidates), totals[1] / len(candidates)


def check_node_limit(placement: ExpertPlacement, n_group: int, topk_group: int, limit: int,
                     experts_per_token: int | None = None) -> NodeBound:
    """The node bound, after checking every layer keeps every token within `limit` nodes (PlacementError)."""
    bound = max_nodes_per_token_bound(placement, n_group, topk_group, experts_per_token)
    for layer, (b, groups) in enumerate(zip(bound.per_layer, bound.groups)):
        if b > limit:
            raise PlacementError(f"layer {layer}: a token routed to groups {list(groups)} can reach {b} nodes, "
                                 f"above the node limit {limit}{'' if bound.exact else ' (upper bound)'}")
    return bound


def nodes_reached(expert_ids: torch.Tensor, placement: ExpertPlacement, layer: int, token_index=None,
                  token_node=None) -> torch.Tensor:
    """Distinct nodes each token of expert_ids [T, k] reaches with the replicas choose_replica picks."""
    nodes = placement.node_of_slot(placement.choose_replica(layer, expert_ids, token_index, token_node))
    if nodes.shape[-1] == 0:
        return torch.zeros(nodes.shape[0], dtype=torch.int64)
    nodes = nodes.sort(-1).values
    return 1 + (nodes[:, 1:] != nodes[:, :-1]).sum(-1)


# ---------------------------------------------------------------------------------------------- mesh

MESH_KEYS = ("pp", "ep", "dp", "tp", "sp", "redundant")


@dataclass(frozen=True)
class ParallelMesh:
    """Parallel degrees over gpus ranks and the rank layout (see the module docstring for the rule)."""

    gpus: int
    gpus_per_node: int
    pp: int
    dp: int
    tp: int
    ep: int
    sp: bool = False
    experts: int | None = None
    redundant: int = 0
    mode: str | None = field(default=None, compare=False)

    @property
    def nodes(self) -> int:
        """Nodes the ranks fill."""
        return self.gpus // self.gpus_per_node

    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage."""
        return self.dp * self.tp

    @property
    def edp(self) -> int:
        """EP groups per stage (copies of each expert slot, expert data parallelism)."""
        return self.stage_size // self.ep

    @property
    def ep_nodes(self) -> int:
        """Nodes one EP group spans."""
        return max(1, self.ep // self.gpus_per_node)

    @property
    def ep_gpus_per_node(self) -> int:
        """GPUs of one EP group on each of its nodes."""
        return min(self.ep, self.gpus_per_node)

    @property
    def slots_per_ep_rank(self) -> int | None:
        """Expert slots per EP rank per layer (None when the expert count is unknown)."""
        return None if self.experts is None else (self.experts + self.redundant) // self.ep

    def rank(self, r: int) -> dict:
        """Coordinates of rank r: node, local gpu, pp stage, dp/tp rank, ep rank and its EP group index."""
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < self.gpus:
            raise PlacementError(f"rank {r!r} is not in 0..{self.gpus - 1}")
        s = r % self.stage_size
        return {"rank": r, "node": r // self.gpus_per_node, "local_gpu": r % self.gpus_per_node,
                "pp": r // self.stage_size, "dp": s // self.tp, "tp": s % self.tp, "ep": s % self.ep,
                "edp": s // self.ep}

    def groups(self) -> dict[str, list[list[int]]]:
        """Members of every collective group, by kind: tp, dp, ep, edp (same EP rank in a stage), pp."""
        st, out = self.stage_size, {}
        out["tp"] = [list(range(b, b + self.tp)) for b in range(0, self.gpus, self.tp)]
        out["dp"] = [[p * st + d * self.tp + t for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]
        out["ep"] = [list(range(b, b + self.ep)) for b in range(0, self.gpus, self.ep)]
        out["edp"] = [[p * st + j * self.ep + e for j in range(self.edp)] for p in range(self.pp) for e in range(self.ep)]
        out["pp"] = [[p * st + s for p in range(self.pp)] for s in range(st)]
        return out

    def to_dict(self) -> dict:
        """Compact JSON form for plan.json: degrees, layout formulas and the first groups of each kind."""
        groups = self.groups()
        return {
            "gpus": self.gpus, "gpus_per_node": self.gpus_per_node, "nodes": self.nodes, "mode": self.mode,
            "pp": self.pp, "dp": self.dp, "tp": self.tp, "sp": self.sp, "ep": self.ep, "edp": self.edp,
            "stage_size": self.stage_size, "ep_nodes": self.ep_nodes, "experts": self.experts,
            "redundant": self.redundant, "slots_per_ep_rank": self.slots_per_ep_rank,
            "layout": {"node": "r // gpus_per_node", "local_gpu": "r % gpus_per_node", "pp": "r // stage_size",
                       "dp": "(r % stage_size) // tp", "tp": "r % tp", "ep": "(r % stage_size) % ep",
                       "edp": "(r % stage_size) // ep"},
            "groups": {k: {"count": len(v), "size": len(v[0]), "first": [_span(g) for g in v[:2]]}
                       for k, v in groups.items()},
        }


def _span(ranks: list[int]):
    """A rank list as "start:stop:step" when it is an arithmetic run of more than 4, else the list."""
    step = ranks[1] - ranks[0] if len(ranks) > 1 else 1
    if len(ranks) > 4 and all(b - a == step for a, b in zip(ranks, ranks[1:])):
        return f"{ranks[0]}:{ranks[-1] + step}:{step}"
    return ranks


def make_mesh(gpus: int, gpus_per_node: int, pp: int = 1, ep: int = 1, dp: int | None = None, tp: int = 1,
              sp: bool = False, experts: int | None = None, redundant: int = 0, mode: str | None = None) -> ParallelMesh:
    """The ParallelMesh of these degrees, checked (dp defaults to gpus / (pp * tp)); PlacementError otherwise."""
    for name, val in dict(gpus=gpus, gpus_per_node=gpus_per_node, pp=pp, ep=ep, tp=tp).items():
        positive_int(name, val)
    if gpus % gpus_per_node:
        raise PlacementError(f"{gpus} GPUs are not whole nodes of {gpus_per_node}")
    if dp is None:
        if gpus % (pp * tp):
            raise PlacementError(f"pp {pp} x tp {tp} does not divide {gpus} GPUs")
        dp = gpus // (pp * tp)
    positive_int("dp", dp)
    if pp * dp * tp != gpus:
        raise PlacementError(f"pp {pp} x dp {dp} x tp {tp} = {pp * dp * tp}, not the {gpus} GPUs")
    if gpus_per_node % tp:
        raise PlacementError(f"tp {tp} does not divide the {gpus_per_node} GPUs of a node (TP stays on NVLink)")
    if not isinstance(sp, bool):
        raise PlacementError(f"sp must be true or false, got {sp!r}")
    if sp and tp == 1:
        raise PlacementError("sp (sequence parallelism) needs tp > 1")
    if (dp * tp) % ep:
        raise PlacementError(f"ep {ep} does not divide the {dp * tp} ranks of a pipeline stage (dp {dp} x tp {tp})")
    if gpus_per_node % ep and (ep % gpus_per_node or (dp * tp) % gpus_per_node):
        raise PlacementError(f"an EP group of {ep} ranks would straddle nodes of {gpus_per_node} GPUs")
    if isinstance(redundant, bool) or not isinstance(redundant, int) or redundant < 0:
        raise PlacementError(f"redundant must be a non-negative integer, got {redundant!r}")
    if experts is not None:
        positive_int("experts", experts)
        if (experts + redundant) % ep:
            raise PlacementError(f"ep {ep} does not divide {experts} experts + {redundant} redundant slots")
    return ParallelMesh(gpus, gpus_per_node, pp, dp, tp, ep, sp, experts, redundant, mode)


def parse_parallel(text: str) -> dict:
    """The degrees of a `--parallel` spec like "pp=16,ep=64" (keys pp ep dp tp sp redundant); PlacementError otherwise."""
    out: dict = {}
    for item in str(text).split(","):
        key, eq, val = (p.strip() for p in item.partition("="))
        if not eq or not key or not val:
            raise PlacementError(f"--parallel item {item.strip()!r} is not key=value")
        if key not in MESH_KEYS:
            raise PlacementError(f"--parallel key {key!r} is unknown (known: {', '.join(MESH_KEYS)})")
        if key in out:
            raise PlacementError(f"--parallel key {key!r} is given twice")
        if key == "sp":
            if val.lower() not in ("1", "0", "true", "false"):
                raise PlacementError(f"--parallel sp must be true/false/1/0, got {val!r}")
            out[key] = val.lower() in ("1", "true")
            continue
        if not re.fullmatch(r"[0-9]{1,9}", val):  # not str.isdigit: it takes '²', which int() refuses
            raise PlacementError(f"--parallel {key} must be a non-negative integer (digits 0-9, at most 9), got {val!r}")
        out[key] = int(val)
        if out[key] < (0 if key == "redundant" else 1):
            raise PlacementError(f"--parallel {key} must be positive, got {val}")
    return out


def _largest_divisor(n: int, cap: int, also=lambda d: True) -> int:
    """Largest divisor d of n with d <= cap and also(d) (1 at worst)."""
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0 and (also(d) or d == 1))


def default_mesh(gpus: int, gpus_per_node: int, mode: str, experts: int = 256, layers: int = 61,
                 **overrides) -> ParallelMesh:
    """The DeepSeek-V3-style mesh for gpus and mode, with `overrides` (parse_parallel keys) applied.

    train:   tp 1; pp = the largest even divisor of gpus up to min(16, layers) leaving stages of at
             least 128 ranks (pp 1 below 256 GPUs); ep = the largest divisor of the stage up to 64 that
             also divides the experts and keeps EP groups node-aligned; no redundant slots.
    prefill: pp 1; tp = gcd(4, gpus_per_node, gpus) with SP when tp > 1; ep = the largest node-aligned
             divisor of gpus up to 32; redundant = ep plus what makes ep divide the slots (one extra per GPU).
    decode:  as prefill with ep up to 320 and the fewest redundant slots that make ep divide the slots.
    2048 GPUs train gives PP16 DP128 EP64 (8 nodes); 32 prefill TP4 DP8 EP32 + 32; 320 decode TP4 DP80 EP320 + 64.
    """
    if mode not in ("train", "prefill", "decode"):
        raise PlacementError(f"unknown mode {mode!r} (known: train, prefill, decode)")
    positive_int("gpus", gpus)
    positive_int("gpus_per_node", gpus_per_node)
    if gpus % gpus_per_node:
        raise PlacementError(f"{gpus} GPUs are not whole nodes of {gpus_per_node}")
    pp, tp = 1, 1
    if mode == "train":
        for d in range(min(16, layers, gpus), 1, -1):
            if d % 2 == 0 and gpus % d == 0 and gpus // d >= 128:
                pp = d
                break
    else:
        tp = math.gcd(4, gpus_per_node, gpus)
    stage = gpus // pp
    pp, tp = overrides.get("pp", pp), overrides.get("tp", tp)
    if gpus % (pp * tp) == 0:
        stage = gpus // pp

    def aligned(d: int) -> bool:
        return gpus_per_node % d == 0 or (d % gpus_per_node == 0 and stage % gpus_per_node == 0)

    cap = {"train": 64, "prefill": 32, "decode": 320}[mode]
    if mode == "train":
        ep = _largest_divisor(stage, cap, lambda d: aligned(d) and experts % d == 0)
    else:
        ep = _largest_divisor(stage, cap, aligned)
    ep = overrides.get("ep", ep)
    redundant = overrides.get("redundant", (-experts) % ep + (ep if mode == "prefill" else 0))
    sp = overrides.get("sp", tp > 1)
    return make_mesh(gpus, gpus_per_node, pp=pp, ep=ep, dp=overrides.get("dp"), tp=tp, sp=sp, experts=experts,
                     redundant=redundant, mode=mode)
