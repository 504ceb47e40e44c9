"""Targets: what a model is compiled for — a GPU model, a cluster shape and its fabric.

Spec forms accepted by `get_target`:
- a named target: h800x8 (one node), h800x32 (the prefill unit), h800x320 (the decode unit),
  h800x2048 (the training cluster), h20x16 (two H20 nodes: 1.5 TB of HBM, an inference box for the 671B and 1T
  models in FP8);
- the general form `<gpu>x<N>` with gpu in h800/h100/h200/h20: N a positive multiple of 8 gives N/8
  full nodes of 8 GPUs; 1 <= N < 8 gives one partial node of N GPUs (gpus_per_node = planes = N);
- a path to a TOML file describing a user's cluster:

      name = "my-cluster"        # required
      gpu = "h800"               # required: h800, h100, h200 or h20
      gpus = 64                  # required
      gpus_per_node = 8          # default 8
      planes = 8                 # default min(8, gpus_per_node); NIC of local index i on plane i % planes
      nic_gbps = 400             # default 400 (Gb/s per NIC, one direction)
      comm_sms = 20              # default 20 (SMs left to dispatch/combine in train/prefill)
      switch_radix = 64          # default 64 (ports per fat-tree switch)
      [gpu_overrides]            # optional: any GPUSpec field but name, e.g.
      nvlink_achieved = 150e9
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from functools import cached_property

from .errors import TargetError
from .gpus import GPUS, GPUSpec, gpu_spec
from .topology import Topology, build_topology, fat_tree_shape

NAMED_TARGETS = ("h800x8", "h20x16", "h800x32", "h800x320", "h800x2048")
DESCRIBE_HEADERS = ("name", "gpu", "gpus", "nodes", "NVLink GB/s", "IB GB/s per GPU", "arch")


def _is_int(v) -> bool:
    """Whether v is an int and not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """Whether v is an int or float and not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Target:
    """A cluster to compile for: GPU model, GPU/node counts, fabric, and SMs left to communication."""

    name: str
    gpu: GPUSpec
    gpus: int
    gpus_per_node: int = 8
    nodes: int = 0  # 0: derived as gpus // gpus_per_node
    planes: int = 8
    nic_bandwidth: float = 50e9  # bytes/s per NIC, one direction (400 Gb/s)
    comm_sms: int = 20
    switch_radix: int = 64

    def __post_init__(self):
        """Check the fields and derive `nodes`."""
        if not isinstance(self.name, str) or not self.name:
            raise TargetError(f"target name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.gpu, GPUSpec):
            raise TargetError(f"target {self.name}: gpu must be a GPUSpec, got {type(self.gpu).__name__}")
        for key in ("gpus", "gpus_per_node", "planes", "switch_radix"):
            val = getattr(self, key)
            if not _is_int(val) or val < 1:
                raise TargetError(f"target {self.name}: {key} must be a positive integer, got {val!r}")
        if self.switch_radix < 2:
            raise TargetError(f"target {self.name}: switch_radix must be at least 2 (a fat-tree switch has ports up "
                              f"and down), got {self.switch_radix}")
        if self.gpus % self.gpus_per_node:
            raise TargetError(f"target {self.name}: {self.gpus} GPUs is not divisible by "
                              f"gpus_per_node {self.gpus_per_node}")
        nodes = self.gpus // self.gpus_per_node
        if self.nodes == 0:
            object.__setattr__(self, "nodes", nodes)
        elif self.nodes != nodes:
            raise TargetError(f"target {self.name}: nodes {self.nodes!r} != gpus / gpus_per_node = {nodes}")
        if self.planes > self.gpus_per_node:
            raise TargetError(f"target {self.name}: planes {self.planes} exceeds gpus_per_node {self.gpus_per_node}")
        if not _is_number(self.nic_bandwidth) or self.nic_bandwidth <= 0:
            raise TargetError(f"target {self.name}: nic bandwidth must be positive, got {self.nic_bandwidth!r}")
        if not _is_int(self.comm_sms) or not 0 <= self.comm_sms < self.gpu.sms:
            raise TargetError(f"target {self.name}: comm_sms must be an integer in 0..{self.gpu.sms - 1}, "
                              f"got {self.comm_sms!r}")
        try:
            fat_tree_shape(self.nodes * math.ceil(self.gpus_per_node / self.planes), self.switch_radix)
        except TargetError as e:
            raise TargetError(f"target {self.name}: {e}") from None

    @cached_property
    def topology(self) -> Topology:
        """The cluster graph, built on first use and shared by targets with equal parameters."""
        g = self.gpu
        return build_topology(self.gpus, self.gpus_per_node, self.planes, float(g.nvlink_bandwidth),
                              float(g.nvlink_achieved), float(g.pcie_bandwidth), float(self.nic_bandwidth),
                              self.switch_radix)

    def bandwidth(self, a: int, b: int, achieved: bool = False) -> float:
        """Bottleneck bandwidth (bytes/s) between GPUs a and b: nominal, or sustained if `achieved`."""
        return self.topology.bandwidth(a, b, achieved)

    def link_kind(self, a: int, b: int) -> str:
        """"nvlink" or "ib": the slowest kind of link the route between GPUs a and b crosses."""
        return self.topology.link_kind(a, b)

    def node_of(self, gpu: int) -> int:
        """The node a GPU belongs to."""
        return self.topology.node_of(gpu)

    def nodes_of(self, gpus) -> frozenset[int]:
        """The set of nodes a set of GPUs touches."""
        return self.topology.nodes_of(gpus)

    def to_dict(self) -> dict:
        """JSON-ready description (ints, floats, strings; fixed key order) for plan.json's "target"."""
        g = self.gpu
        planes_nics = self.nodes * math.ceil(self.gpus_per_node / self.planes)
        leaves, spines = fat_tree_shape(planes_nics, self.switch_radix)
        return {
            "name": self.name, "gpu": g.name, "gpus": self.gpus, "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node, "planes": self.planes, "arch": g.arch, "sms": g.sms,
            "comm_sms": self.comm_sms, "hbm_bytes": int(g.hbm_bytes), "hbm_bandwidth": float(g.hbm_bandwidth),
            "bf16_flops": float(g.bf16_flops), "fp8_flops": float(g.fp8_flops),
            "smem_per_block": int(g.smem_per_block), "nvlink_bandwidth": float(g.nvlink_bandwidth),
            "nvlink_achieved": float(g.nvlink_achieved), "pcie_bandwidth": float(g.pcie_bandwidth),
            "nic_bandwidth": float(self.nic_bandwidth), "switch_radix": self.switch_radix,
            "leaves_per_plane": leaves, "spines_per_plane": spines,
        }


def _general(spec: str) -> Target:
    """The target of a `<gpu>x<N>` spec."""
    key = spec.strip().lower()
    m = re.fullmatch(r"([a-z][a-z0-9]*)x([+-]?\d+)", key)
    if m is None:
        raise TargetError(f"unknown target {spec!r} (named: {', '.join(NAMED_TARGETS)}; "
                          f"or <gpu>x<N> with gpu in {', '.join(sorted(GPUS))}; or a .toml file)")
    gpu, n = m.group(1), int(m.group(2))
    if gpu not in GPUS:
        raise TargetError(f"unknown target {spec!r}: GPU {gpu!r} is not one of {', '.join(sorted(GPUS))}")
    if n < 1:
        raise TargetError(f"target {spec!r}: GPU count {n} must be positive")
    if n >= 8 and n % 8:
        raise TargetError(f"target {spec!r}: {n} GPUs is not a multiple of 8 GPUs per node "
                          f"(fewer than 8 means one partial node)")
    per_node = min(n, 8)
    return Target(name=f"{gpu}x{n}", gpu=gpu_spec(gpu), gpus=n, gpus_per_node=per_node, planes=per_node)


_TOML_KEYS = {"name": str, "gpu": str, "gpus": int, "gpus_per_node": int, "planes": int,
              "nic_gbps": float, "comm_sms": int, "switch_radix": int, "gpu_overrides": dict}
_REQUIRED = ("name", "gpu", "gpus")


def _check_type(where: str, key: str, val, kind) -> None:
    """Raise TargetError unless val has the TOML type `kind` (int, float meaning any number, str, dict)."""
    ok = {int: _is_int, float: lambda v: _is_number(v) and math.isfinite(v), str: lambda v: isinstance(v, str),
          dict: lambda v: isinstance(v, dict)}[kind](val)
    if not ok:
        name = {int: "an integer", float: "a finite number", str: "a string", dict: "a table"}[kind]
        raise TargetError(f"{where}: key {key!r} must be {name}, got {type(val).__name__} {val!r}")


def _overridden(where: str, spec: GPUSpec, overrides: dict) -> GPUSpec:
    """The GPU spec with the TOML file's [gpu_overrides] applied, each checked for name and type."""
    kinds = {f.name: {"int": int, "float": float, "str": str}[f.type] for f in dataclasses.fields(GPUSpec)}
    del kinds["name"]
    for key, val in overrides.items():
        if key not in kinds:
            raise TargetError(f"{where}: unknown gpu_overrides key {key!r} (known: {', '.join(kinds)})")
        _check_type(where, f"gpu_overrides.{key}", val, kinds[key])
        if kinds[key] is not str and val <= 0:
            raise TargetError(f"{where}: gpu_overrides.{key} must be positive, got {val!r}")
    return dataclasses.replace(spec, **{k: float(v) if kinds[k] is float else v for k, v in overrides.items()})


def load_target_file(path: str | os.PathLike) -> Target:
    """The target described by a TOML file (see the module docstring for the keys)."""
    from dsv3c.inputs import MAX_TARGET_BYTES, load_toml

    where = f"target file {os.fspath(path)}"
    data = load_toml(path, "target file", MAX_TARGET_BYTES, TargetError)
    for key in data:
        if key not in _TOML_KEYS:
            raise TargetError(f"{where}: unknown key {key!r} (known: {', '.join(_TOML_KEYS)})")
    for key in _REQUIRED:
        if key not in data:
            raise TargetError(f"{where}: missing key {key!r}")
    for key, val in data.items():
        _check_type(where, key, val, _TOML_KEYS[key])
    if data.get("nic_gbps", 400) <= 0:
        raise TargetError(f"{where}: nic_gbps must be positive, got {data['nic_gbps']!r}")
    try:
        gpu = _overridden(where, gpu_spec(data["gpu"]), data.get("gpu_overrides", {}))
        per_node = data.get("gpus_per_node", 8)
        return Target(name=data["name"], gpu=gpu, gpus=data["gpus"], gpus_per_node=per_node,
                      planes=data.get("planes", min(8, per_node)),
                      nic_bandwidth=float(data.get("nic_gbps", 400)) * 1e9 / 8,
                      comm_sms=data.get("comm_sms", 20), switch_radix=data.get("switch_radix", 64))
    except TargetError as e:
        if str(e).startswith(where):
            raise
        raise TargetError(f"{where}: {e}") from None


def get_target(spec: str | os.PathLike | Target) -> Target:
    """The Target for a named target, a `<gpu>x<N>` spec, a TOML file path, or a Target itself."""
    if isinstance(spec, Target):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TargetError(f"target spec must be a string or path, got {type(spec).__name__}")
    text = os.fspath(spec)
    if text.endswith(".toml") or os.path.isfile(text):
        return load_target_file(text)
    return _general(text)


def list_targets() -> list[str]:
    """The names of the named targets, smallest first."""
    return list(NAMED_TARGETS)


def describe_targets(specs=None) -> list[tuple]:
    """Rows (see DESCRIBE_HEADERS) describing the named targets, or the given specs, for `dsv3c targets`."""
    rows = []
    for spec in NAMED_TARGETS if specs is None else specs:
        t = get_target(spec)
        rows.append((t.name, t.gpu.name, t.gpus, t.nodes, t.gpu.nvlink_bandwidth / 1e9,
                     t.nic_bandwidth / 1e9, t.gpu.arch))
    return rows
