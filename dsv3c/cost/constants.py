"""Every constant of the cost model, named, with its value, unit, source and published range: one table.

The kernel and link constants come from `dsv3c.cost.calibration` (calibrated on published kernel- and
link-level measurements); the planner's own constants (memory, optimizer, overlap, inference) are below.
`Constants.for_target(target)` takes the target's values where it has them (comm SMs, links);
`with_overrides({"name": value})` is what `--set name=value` calls, in every mode; `at("fast")` /
`at("slow")` put every constant at the end of its range that makes the step faster / slower, which gives
each reported figure its low–high range. Sources: "measured" (someone ran it and published the figure),
"datasheet" (vendor peak), "fit" (fitted to published measurements), "assumed" (our estimate, with the
range we believe), "target" (from the target description), "override" (`--set`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from dsv3c.cost import calibration


LINK_SCALES = {"ib_GBps": ("ib", "rdma"), "nvlink_GBps": ("nvlink",)}  # knob -> the link constants it scales


def _base(name: str) -> float:
    """The default of a link knob (what the measurements were taken at)."""
    return PLANNER[name][0]


class ConstantError(ValueError):
    """An unknown cost-model constant or a value that is not a positive number."""


@dataclass(frozen=True)
class Constant:
    """One constant: value, unit, source kind, citation, and its range with the end that makes things faster."""

    name: str
    value: float
    unit: str
    source: str
    note: str
    low: float | None = None
    high: float | None = None
    faster: str = "high"  # which end of [low, high] makes the modelled step faster

    def to_dict(self) -> dict:
        """JSON form for plan.json."""
        out = {"value": self.value, "unit": self.unit, "source": self.source, "note": self.note}
        if self.low is not None:
            out["range"] = [self.low, self.high]
        return out

    def bound(self, which: str) -> float:
        """The value at the 'fast' or 'slow' end of the range (the value itself when it has none)."""
        if self.low is None:
            return self.value
        fast = self.high if self.faster == "high" else self.low
        slow = self.low if self.faster == "high" else self.high
        return fast if which == "fast" else slow


# name: (value, unit, source, citation, low, high, faster)
PLANNER: dict[str, tuple] = {
    "ib_GBps": (50.0, "GB/s", "measured", "InfiniBand per GPU the link constants were measured at: one 400 Gb/s CX7 "
                "NIC per H800 (DeepEP, NCCL); a target's NIC, or --set, scales every IB/RDMA link constant",
                None, None, "high"),
    "nvlink_GBps": (160.0, "GB/s", "measured", "achieved NVLink per H800 the link constants were measured at "
                    "(DeepEP: ~153-158 GB/s); a target's nvlink_achieved, or --set, scales every NVLink constant",
                    None, None, "high"),
    "comm_sms": (20, "SMs", "measured", "DeepSeek-V3 report 3.2.2: 20 of 132 SMs run dispatch/combine in training "
                 "and prefill (the target's comm_sms)", None, None, "low"),
    "grad_reduce_bytes": (4, "bytes/param", "assumed", "gradient reduce-scatter in FP32 (DeepSeek-V3 accumulates "
                          "gradients in FP32)", 2, 4, "low"),
    "param_gather_bytes": (2, "bytes/param", "assumed", "parameter all-gather in BF16 after the optimizer step",
                           None, None, "low"),
    "grad_accum_bytes": (8, "bytes/param", "assumed", "FP32 gradient accumulation per micro-batch: read and write "
                         "the FP32 gradient (fused into the Wgrad epilogue it costs these bytes)", 0, 8, "low"),
    "optimizer_bytes_per_param": (22, "bytes/param", "assumed", "AdamW on the ZeRO-1 shard: read FP32 grad and "
                                  "master, BF16 moments; write master, moments and the BF16 weight", 18, 26, "low"),
    "dp_exposed_fraction": (1.0, "fraction", "assumed", "share of the ZeRO-1 reduce-scatter/all-gather on the step's "
                            "critical path (it starts after the last backward)", 0.5, 1.0, "low"),
    "comm_buffer_factor": (2.0, "x", "assumed", "dispatch/combine buffers held at once (two micro-batches in "
                           "flight in an F&B pair)", None, None, "low"),
    "workspace_GB": (2.0, "GB", "assumed", "training: CUDA context, allocator slack and kernel workspaces per GPU",
                     None, None, "low"),
    "expert_imbalance": (1.0, "max/mean", "assumed", "routes arriving at the busiest GPU over the mean without a "
                         "load file (balanced, as in DeepSeek's profiles; --expert-load measures it)", None, None,
                         "low"),
    "mtp_acceptance": (0.85, "fraction", "measured", "DeepSeek-V3 report 5.4.3: the second token is accepted 85-90 %",
                       0.85, 0.90, "high"),
    "hbm_reserved_fraction": (0.05, "fraction", "assumed", "inference: CUDA context and allocator fragmentation",
                              None, None, "low"),
    "inference_buffers_GB": (6.0, "GB", "assumed", "inference: DeepEP buffers (~2 GB) and activation/GEMM "
                             "workspaces of one step (~4 GB) per GPU", None, None, "low"),
    "inference_micro_batches": (2, "", "measured", "DeepSeek-V3 report 3.4: two micro-batches overlapped in prefill "
                                "and decode", None, None, "low"),
}
_MAY_BE_ZERO = {"dp_exposed_fraction", "workspace_GB", "comm_buffer_factor", "grad_accum_bytes", "inference_buffers_GB",
                "hbm_reserved_fraction", "mtp_acceptance", "comm_sms"}
_FRACTIONS = {"dp_exposed_fraction", "mtp_acceptance", "hbm_reserved_fraction"}
_INTEGERS = {"comm_sms", "inference_micro_batches"}


def _entry(name: str, spec: tuple) -> Constant:
    value, unit, source, note, low, high, faster = spec
    return Constant(name, float(value), unit, source, note, None if low is None else float(low),
                    None if high is None else float(high), faster)


class Constants:
    """The constant set in use: defaults, then target values, then user overrides (`--set`)."""

    def __init__(self, entries: dict[str, Constant] | None = None):
        if entries is None:
            entries = {k: _entry(k, v) for table in (calibration.CONSTANTS, PLANNER) for k, v in table.items()}
        self._c = dict(entries)

    @classmethod
    def for_target(cls, target) -> "Constants":
        """Defaults with the target's own values: its comm SMs, its NIC (ib_GBps) and achieved NVLink (nvlink_GBps)
        bandwidth, to which the link constants measured on H800 scale."""
        c = cls()
        given = {"comm_sms": float(target.comm_sms), "ib_GBps": target.nic_bandwidth / 1e9,
                 "nvlink_GBps": target.gpu.nvlink_achieved / 1e9}
        for name, value in given.items():
            if not math.isclose(value, c[name]):
                c = c._set(name, value, "target", f"from target {target.name}")
        return c

    def _set(self, name: str, value: float, source: str, note: str) -> "Constants":
        """A copy with one constant set; ib_GBps and nvlink_GBps rescale the link constants measured on H800."""
        out = dict(self._c)
        old = out[name].value
        out[name] = dataclasses.replace(out[name], value=value, source=source, note=note, low=None, high=None)
        link = LINK_SCALES.get(name)
        if link and old > 0 and not math.isclose(value, old):
            k = value / old
            for other, entry in self._c.items():
                if other.endswith("GBps") and any(f"_{word}_" in other for word in link):
                    out[other] = dataclasses.replace(
                        entry, value=entry.value * k, low=None if entry.low is None else entry.low * k,
                        high=None if entry.high is None else entry.high * k,
                        note=f"{entry.note}; scaled x{value / _base(name):.3g} with {name}")
        return Constants(out)

    def __getitem__(self, name: str) -> float:
        return self._c[name].value

    def __contains__(self, name: str) -> bool:
        return name in self._c

    def keys(self):
        """Constant names, in definition order (a Constants is a mapping name -> value)."""
        return self._c.keys()

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
            except (TypeError, ValueError, OverflowError):
                raise ConstantError(f"cost constant '{name}' needs a number, got {raw!r}") from None
            if not math.isfinite(value) or value < 0 or (value == 0 and name not in _MAY_BE_ZERO):
                raise ConstantError(f"cost constant '{name}' must be a positive number, got {raw!r}")
            if value != 0 and abs(value) < 1e-12:
                raise ConstantError(f"cost constant '{name}' = {raw} is too small to be meaningful")
            if (name in _FRACTIONS or name.endswith("eta") or name.endswith("efficiency")) and value > 1:
                raise ConstantError(f"cost constant '{name}' is a fraction and must be <= 1, got {raw!r}")
            if name in _INTEGERS and value != int(value):
                raise ConstantError(f"cost constant '{name}' must be a whole number, got {raw!r}")
            out = Constants(out)._set(name, value, "override", "--set " + name)._c
        return Constants(out)

    def at(self, which: str) -> "Constants":
        """Every constant at the end of its range that makes the step 'fast' or 'slow'."""
        return Constants({k: dataclasses.replace(c, value=c.bound(which)) for k, c in self._c.items()})

    def to_dict(self) -> dict:
        """JSON form: name -> {value, unit, source, note[, range]}."""
        return {k: c.to_dict() for k, c in self._c.items()}

    def key(self) -> tuple:
        """A hashable identity (for caches)."""
        return tuple((k, c.value) for k, c in self._c.items())


def parse_sets(items) -> dict:
    """The {name: value} of `--set name=value` items (ConstantError for a malformed item)."""
    out = {}
    for item in items or ():
        name, eq, value = (p.strip() for p in str(item).partition("="))
        if not eq or not name or not value:
            raise ConstantError(f"--set item {item!r} is not name=value")
        out[name] = value
    return out
