"""The cluster as a networkx graph: GPUs, one NVSwitch fabric per node, one NIC per GPU, and a
multi-plane two-layer InfiniBand fat tree.

Vertices (tuples, deterministic):
    ("gpu", g)            g = global GPU id; GPU g is local index g % gpus_per_node of node g // gpus_per_node
    ("nvswitch", n)       the NVSwitch fabric of node n (one vertex stands for the node's switch chips)
    ("nic", g)            the NIC (CX7, 400 Gb/s) attached to GPU g over PCIe
    ("leaf", p, r)        leaf switch r of plane p
    ("spine", p, s)       spine switch s of plane p (only when a plane outgrows one switch)

Edges carry `kind` ("nvlink", "pcie", "ib"), `bandwidth` (nominal bytes/s), `achieved` (sustained
bytes/s, one direction) and `cost` = 1 / bandwidth (seconds per byte, the routing weight).
Leaf-spine edges stand for `links` parallel cables and carry links x the NIC bandwidth.

Planes: the NIC of local index i sits on plane i % planes (plane i when planes == gpus_per_node, the
DeepSeek layout). Planes are disjoint, so a path between GPUs on different nodes and different
planes enters NVLink on one node to reach the GPU whose NIC is on the other plane (DeepEP's two-hop
route) — the graph alone dictates this; routes are networkx least-cost paths (sum of 1/bandwidth).

Fat tree per plane: with radix-R switches, a plane of at most R NICs is one leaf; a larger plane
has ceil(nics / (R/2)) leaves with R/2 NICs each and ceil(leaves * R/2 / R) spines (non-blocking);
at most R leaves, i.e. R*R/2 NICs per plane (2048 for R = 64: 16384 GPUs with 8 planes).

Caching (what is cached and why it is exact):
- `build_topology` is memoised on its arguments, so targets with equal parameters share a graph.
- `route(a, b)` is memoised per pair *class* (same node?, same plane?, same leaf switch?), read from
  the graph's adjacency (NVSwitch, NIC and leaf neighbours). All pairs of a class have paths with
  the same edge kinds and the same bottleneck, because every link of one kind has one bandwidth
  except leaf-spine trunks, which are at least as wide as a NIC link. So a 2048-GPU target answers
  any number of pair queries with at most five path searches. `compute_route` is the uncached
  search (the tests check the classes against it); `path(a, b)` is cached per pair (LRU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import networkx as nx

from .errors import TargetError

LINK_KINDS = ("nvlink", "pcie", "ib")


@dataclass(frozen=True)
class Route:
    """What the path between two GPUs offers: bottleneck bandwidths and the kinds of links crossed."""

    bandwidth: float  # nominal bottleneck, bytes/s (inf for a GPU to itself)
    achieved: float  # sustained bottleneck, bytes/s
    kind: str  # "ib" if the path crosses InfiniBand, "nvlink" if only NVLink, "local" for a == b
    per_kind: tuple[tuple[str, float], ...]  # (kind, sustained bottleneck of that kind), sorted


def fat_tree_shape(nics: int, radix: int) -> tuple[int, int]:
    """Leaf and spine switch counts of one plane of a two-layer fat tree holding `nics` NICs."""
    if nics <= radix:
        return 1, 0
    down = radix // 2
    leaves = math.ceil(nics / down)
    if leaves > radix:
        raise TargetError(f"a plane of {nics} NICs exceeds a two-layer fat tree of radix {radix} "
                          f"(at most {radix * down} NICs per plane)")
    return leaves, math.ceil(leaves * down / radix)


def _edge(kind: str, bandwidth: float, achieved: float, **extra) -> dict:
    """Attribute dict of one edge."""
    return dict(kind=kind, bandwidth=bandwidth, achieved=achieved, cost=1.0 / bandwidth, **extra)


def _build_graph(gpus, gpus_per_node, planes, nvlink, nvlink_achieved, pcie, nic, radix) -> nx.Graph:
    """The cluster graph for the given sizes and link bandwidths (see the module docstring)."""
    g = nx.Graph()
    nodes = gpus // gpus_per_node
    g.add_nodes_from((("nvswitch", n), {"role": "nvswitch", "node": n}) for n in range(nodes))
    g.add_nodes_from((("gpu", i), {"role": "gpu"}) for i in range(gpus))
    g.add_nodes_from((("nic", i), {"role": "nic"}) for i in range(gpus))
    nv, pc = _edge("nvlink", nvlink, nvlink_achieved), _edge("pcie", pcie, pcie)
    g.add_edges_from((("gpu", i), ("nvswitch", i // gpus_per_node), nv) for i in range(gpus))
    g.add_edges_from((("gpu", i), ("nic", i), pc) for i in range(gpus))
    ib = _edge("ib", nic, nic)
    for p in range(planes):
        members = [i for i in range(gpus) if (i % gpus_per_node) % planes == p]
        leaves, spines = fat_tree_shape(len(members), radix)
        per_leaf = len(members) if leaves == 1 else radix // 2
        g.add_nodes_from((("leaf", p, r), {"role": "leaf", "plane": p}) for r in range(leaves))
        g.add_edges_from((("nic", i), ("leaf", p, k // per_leaf), ib) for k, i in enumerate(members))
        g.add_nodes_from((("spine", p, s), {"role": "spine", "plane": p}) for s in range(spines))
        for s in range(spines):
            links = per_leaf // spines + (1 if s < per_leaf % spines else 0)
            trunk = _edge("ib", links * nic, links * nic, links=links)
            g.add_edges_from((("leaf", p, r), ("spine", p, s), trunk) for r in range(leaves))
    return g


class Topology:
    """A built cluster graph with cached GPU-to-GPU route, node and plane queries."""

    def __init__(self, graph: nx.Graph):
        self.graph = graph
        adj, attrs = graph.adj, graph.nodes
        gpu_ids = sorted(v[1] for v, role in attrs(data="role") if role == "gpu")
        if gpu_ids != list(range(len(gpu_ids))):
            raise TargetError("topology GPU ids must be 0..N-1")
        self.num_gpus = len(gpu_ids)
        self._node, self._leaf = [], []
        for i in gpu_ids:
            fabric = [u for u in adj[("gpu", i)] if attrs[u]["role"] == "nvswitch"]
            leaf = [w for u in adj[("gpu", i)] if attrs[u]["role"] == "nic"
                    for w in adj[u] if attrs[w]["role"] == "leaf"]
            self._node.append(attrs[fabric[0]]["node"])
            self._leaf.append(leaf[0] if leaf else None)
        self._routes: dict[tuple, Route] = {}
        self.path = lru_cache(maxsize=4096)(self._path)

    def _check(self, gpu: int) -> int:
        """The GPU id itself, after checking it names a GPU of this topology."""
        if isinstance(gpu, bool) or not isinstance(gpu, int) or not 0 <= gpu < self.num_gpus:
            raise TargetError(f"GPU id {gpu!r} is not in 0..{self.num_gpus - 1}")
        return gpu

    def node_of(self, gpu: int) -> int:
        """The node (NVSwitch fabric) a GPU is attached to."""
        return self._node[self._check(gpu)]

    def nodes_of(self, gpus) -> frozenset[int]:
        """The set of nodes a set of GPUs touches."""
        return frozenset(self._node[self._check(g)] for g in gpus)

    def plane_of(self, gpu: int) -> int | None:
        """The fat-tree plane of a GPU's NIC (None when the GPU has no NIC)."""
        leaf = self._leaf[self._check(gpu)]
        return None if leaf is None else self.graph.nodes[leaf]["plane"]

    def pair_class(self, a: int, b: int) -> tuple[bool, bool, bool]:
        """The route cache key of a GPU pair: (same node, same plane, same leaf switch)."""
        a, b = self._check(a), self._check(b)
        return (self._node[a] == self._node[b], self.plane_of(a) == self.plane_of(b),
                self._leaf[a] == self._leaf[b])

    def _path(self, a: int, b: int) -> tuple:
        """The least-cost vertex path from GPU min(a, b) to GPU max(a, b)."""
        lo, hi = sorted((self._check(a), self._check(b)))
        return tuple(nx.bidirectional_dijkstra(self.graph, ("gpu", lo), ("gpu", hi), weight="cost")[1])

    def compute_route(self, a: int, b: int) -> Route:
        """The route between two GPUs, searched in the graph without the class cache."""
        if self._check(a) == self._check(b):
            return Route(math.inf, math.inf, "local", ())
        path = self._path(a, b)
        edges = [self.graph.edges[u, v] for u, v in zip(path, path[1:])]
        per_kind = {}
        for e in edges:
            per_kind[e["kind"]] = min(per_kind.get(e["kind"], math.inf), e["achieved"])
        return Route(bandwidth=min(e["bandwidth"] for e in edges), achieved=min(e["achieved"] for e in edges),
                     kind="ib" if "ib" in per_kind else "nvlink", per_kind=tuple(sorted(per_kind.items())))

    def route(self, a: int, b: int) -> Route:
        """The route between two GPUs, memoised per pair class."""
        if self._check(a) == self._check(b):
            return Route(math.inf, math.inf, "local", ())
        key = self.pair_class(a, b)
        if key not in self._routes:
            self._routes[key] = self.compute_route(a, b)
        return self._routes[key]

    def bandwidth(self, a: int, b: int, achieved: bool = False) -> float:
        """Bottleneck bandwidth (bytes/s) between two GPUs: nominal, or sustained if `achieved`."""
        r = self.route(a, b)
        return r.achieved if achieved else r.bandwidth

    def link_kind(self, a: int, b: int) -> str:
        """"nvlink" if the route stays on NVLink, "ib" if it crosses InfiniBand ("local" if a == b)."""
        return self.route(a, b).kind


@lru_cache(maxsize=16)
def build_topology(gpus: int, gpus_per_node: int, planes: int, nvlink: float, nvlink_achieved: float,
                   pcie: float, nic: float, radix: int = 64) -> Topology:
    """The Topology of a cluster of `gpus` GPUs in nodes of `gpus_per_node` (memoised on arguments)."""
    for key, val in dict(gpus=gpus, gpus_per_node=gpus_per_node, planes=planes, radix=radix).items():
        if val < 1:
            raise TargetError(f"topology {key} must be positive, got {val}")
    if gpus % gpus_per_node:
        raise TargetError(f"{gpus} GPUs is not a multiple of {gpus_per_node} GPUs per node")
    if planes > gpus_per_node:
        raise TargetError(f"{planes} planes exceeds {gpus_per_node} NICs per node")
    return Topology(_build_graph(gpus, gpus_per_node, planes, nvlink, nvlink_achieved, pcie, nic, radix))
