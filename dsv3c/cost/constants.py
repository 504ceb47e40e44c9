"""Every constant of the training cost model, named, with its value, unit and source.

`Constants.for_target(target)` takes the link figures from the target (so an H100 or a user's TOML
cluster prices its own links); `with_overrides({"name": value})` is what `--set name=value` calls.
Sources: "measured" (someone ran it and published the figure), "datasheet" (vendor peak), "assumed"
(our estimate; the first thing to revisit with a profile).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


class ConstantError(ValueError):
    """An unknown cost-model constant or a value that is not a positive number."""


@dataclass(frozen=True)
class Constant:
    """One constant: value, unit, source kind and a short citation."""

    name: str
    value: float
    unit: str
    source: str  # measured | datasheet | assumed | target
    note: str

    def to_dict(self) -> dict:
        """JSON form for plan.json."""
        return {"value": self.value, "unit": self.unit, "source": self.source, "note": self.note}


# name: (value, unit, source, citation). Link bandwidths are per GPU, one direction.
DEFAULTS: dict[str, tuple[float, str, str, str]] = {
    "nvlink_GBps": (160.0, "GB/s", "measured",
                    "DeepEP on H800: ~153-158 GB/s intranode dispatch/combine (target's nvlink_achieved)"),
    "ib_GBps": (50.0, "GB/s", "measured",
                "DeepEP on H800: 43-58 GB/s internode per GPU, CX7 400 Gb/s (target's NIC)"),
    "comm_sms": (20, "SMs", "measured",
                 "DeepSeek-V3 report sec. 3.2.2: 20 of 132 SMs run dispatch/combine (target's comm_sms)"),
    "comm_sms_saturate": (20, "SMs", "measured",
                          "DeepSeek-V3 report: 20 SMs suffice to saturate IB and NVLink; fewer scale bandwidth down"),
    "gemm_efficiency": (0.60, "fraction of peak", "assumed",
                        "achieved/peak of large FP8/BF16 GEMMs on the compute SMs (DeepGEMM reports 0.6-0.75 FP8)"),
    "attention_efficiency": (0.45, "fraction of peak", "assumed",
                             "achieved/peak of the BF16 attention core and other non-GEMM FLOPs (FlashAttention-3 fwd+bwd)"),
    "hbm_efficiency": (0.80, "fraction of peak", "assumed", "achieved/peak HBM bandwidth of streaming kernels"),
    "dp_exposed_fraction": (1.0, "fraction", "assumed",
                            "share of the ZeRO-1 reduce-scatter/all-gather not hidden under the step's tail"),
    "pp_exposed_fraction": (1.0, "fraction", "assumed",
                            "share of a pipeline send on the critical path (the simulator charges it per hop)"),
    "grad_reduce_bytes": (4, "bytes/param", "assumed",
                          "gradient reduce-scatter dtype: FP32 (DeepSeek-V3 accumulates gradients in FP32)"),
    "param_gather_bytes": (2, "bytes/param", "assumed", "parameter all-gather dtype after the optimizer step: BF16"),
    "comm_buffer_factor": (2.0, "x", "assumed",
                           "dispatch/combine buffers held at once (two micro-batches in flight in an F&B pair)"),
    "workspace_GB": (2.0, "GB", "assumed", "CUDA context, allocator slack and kernel workspaces per GPU"),
    "kernel_overhead_us": (30.0, "us/layer/chunk", "assumed",
                           "launch gaps and small kernels (norms, routing, permutes) per layer per chunk"),
}


class Constants:
    """The constant set in use: defaults, then target values, then user overrides (`--set`)."""

    def __init__(self, entries: dict[str, Constant] | None = None):
        self._c = dict(entries) if entries is not None else {
            k: Constant(k, float(v), u, s, n) for k, (v, u, s, n) in DEFAULTS.items()}

    @classmethod
    def for_target(cls, target) -> "Constants":
        """Defaults with the link figures and comm SMs of the target."""
        c = cls()
        g = target.gpu
        upd = {"nvlink_GBps": g.nvlink_achieved / 1e9, "ib_GBps": target.nic_bandwidth / 1e9,
               "comm_sms": float(target.comm_sms)}
        for k, v in upd.items():
            if not math.isclose(v, c[k]):
                c._c[k] = dataclasses.replace(c._c[k], value=float(v), source="target",
                                              note=f"from target {target.name}; " + c._c[k].note)
        return c

    def __getitem__(self, name: str) -> float:
        return self._c[name].value

    def __contains__(self, name: str) -> bool:
        return name in self._c

    def names(self) -> list[str]:
        """Constant names, in definition order."""
        return list(self._c)

    def entry(self, name: str) -> Constant:
        """The Constant record of name."""
        return self._c[name]

    def with_overrides(self, overrides: dict | None) -> "Constants":
        """A copy with {name: value} applied (values: numbers or numeric strings); ConstantError otherwise."""
        out = dict(self._c)
        for name, raw in (overrides or {}).items():
            if name not in out:
                raise ConstantError(f"unknown cost constant '{name}' (known: {', '.join(out)})")
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise ConstantError(f"cost constant '{name}' needs a number, got {raw!r}") from None
            lo, hi = RANGES[name]
            if not lo <= value <= hi:  # NaN fails too
                raise ConstantError(f"cost constant '{name}' must be in [{lo:g}, {hi:g}] {out[name].unit}, got {raw!r}")
            out[name] = dataclasses.replace(out[name], value=value, source="override", note="--set " + name)
        return Constants(out)

    def to_dict(self) -> dict:
        """JSON form: name -> {value, unit, source, note}."""
        return {k: c.to_dict() for k, c in self._c.items()}

    def key(self) -> tuple:
        """A hashable identity (for caches)."""
        return tuple((k, c.value) for k, c in self._c.items())


# What --set may give each constant: a range wide enough for any real cluster, narrow enough that every time,
# rate and byte count the cost model derives stays finite and non-zero (1e-320 GB/s would divide by zero).
RANGES: dict[str, tuple[float, float]] = {
    "nvlink_GBps": (0.01, 1e5), "ib_GBps": (0.01, 1e5), "comm_sms": (1, 1024), "comm_sms_saturate": (1, 1024),
    "gemm_efficiency": (0.001, 1), "attention_efficiency": (0.001, 1), "hbm_efficiency": (0.001, 1),
    "dp_exposed_fraction": (0, 1), "pp_exposed_fraction": (0, 1), "grad_reduce_bytes": (0.125, 16),
    "param_gather_bytes": (0.125, 16), "comm_buffer_factor": (0, 64), "workspace_GB": (0, 1e4),
    "kernel_overhead_us": (0, 1e6),
}


def parse_sets(items) -> dict:
    """The {name: value} of `--set name=value` items (ConstantError for a malformed item)."""
    out = {}
    for item in items or ():
        name, eq, value = (p.strip() for p in str(item).partition("="))
        if not eq or not name or not value:
            raise ConstantError(f"--set item {item!r} is not name=value")
        out[name] = value
    return out
