"""ParallelPlan: one frozen description of how a compile lays the model out, for every mode.

Degrees and the rank map (`ParallelMesh`: pp, dp, tp, sp, ep, redundant expert slots), the pipeline
schedule (kind, micro-batches) and the units each model stage holds (training), the expert placement
over an EP group (per MoE layer, MTP last) and the load it balances, the inference unit (where the shared
experts run, routed slots per GPU). `to_dict` is plan.json's `parallel`; `from_dict` reads it back for
`dsv3c run --plan`. Nothing else computes a layout: passes read it from the Plan's analyses (`parallel`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsv3c.eplb import PlacementError, inverse_tables
from dsv3c.placement import ExpertPlacement, ParallelMesh, make_mesh


@dataclass(frozen=True)
class InferenceUnit:
    """An inference unit's experts: routed slots per GPU (the shared experts run on every GPU on its own tokens)."""

    routed_slots_per_gpu: int
    micro_batches: int


@dataclass(frozen=True)
class ParallelPlan:
    """The layout of one compile (see the module docstring)."""

    mode: str
    mesh: ParallelMesh
    request: str = "auto"  # the --parallel text ("auto": searched or DeepSeek's default unit)
    chosen_by: str = "default"  # auto (searched), given (--parallel) or default (DeepSeek's unit)
    kind: str | None = None  # pipeline schedule (training)
    micro_batches: int | None = None  # per step per pipeline (training)
    stages: tuple = ()  # per model stage, the unit names it holds: 'embed', 'layers.N', 'head', 'mtp.K'
    placement: ExpertPlacement | None = None  # over one EP group, per MoE layer (MTP last)
    moe_layers: tuple = ()  # names of the MoE layers the placement's rows stand for
    load: torch.Tensor | None = field(default=None, compare=False)  # [MoE layers, experts] from --expert-load
    imbalance: float = 1.0  # routes at the busiest GPU over the mean (from the load, else the assumed constant)
    unit: InferenceUnit | None = None

    @property
    def ep(self) -> int:
        """The expert-parallel degree."""
        return self.mesh.ep

    def stage_of_unit(self) -> dict[str, int]:
        """The model stage of every unit name."""
        return {u: s for s, units in enumerate(self.stages) for u in units}

    def layer_ranges(self) -> list[tuple[int, int]]:
        """Per model stage, the half-open range of decoder layers it holds."""
        out, pos = [], 0
        for units in self.stages:
            n = sum(1 for u in units if u.startswith("layers."))
            out.append((pos, pos + n))
            pos += n
        return out

    def tables(self):
        """(phy2log [L, P], log2phy, logcnt) of the placement, or None without MoE layers."""
        p = self.placement
        return None if p is None else (p.phy2log, p.log2phy, p.logcnt)

    def experts_dict(self) -> dict:
        """plan.json 'experts': slots per GPU, redundant experts per MoE layer, max/mean GPU load before and after."""
        p = self.placement
        if p is None:
            return {"moe_layers": 0}
        out = {"moe_layers": len(self.moe_layers), "experts": p.experts, "ep": self.mesh.ep,
               "slots_per_gpu": p.slots_per_gpu, "redundant_slots": p.num_slots - p.experts,
               "source": "expert-load file" if self.load is not None else "contiguous",
               "imbalance": round(self.imbalance, 4)}
        stats = p.stats(self.load) if self.load is not None else None
        rows = []
        for i, name in enumerate(self.moe_layers):
            row = {"layer": name, "redundant": p.redundant(i)}
            if stats:
                row["max_mean_before"] = round(stats["before"][i], 4)
                row["max_mean_after"] = round(stats["after"][i], 4)
            rows.append(row)
        out["layers"] = rows
        if stats:
            out["max_mean_before"] = round(max(stats["before"]), 4)
            out["max_mean_after"] = round(max(stats["after"]), 4)
        return out

    def to_dict(self) -> dict:
        """plan.json's `parallel`: the mesh's keys, then the schedule, stages, placement and inference unit."""
        out = {**self.mesh.to_dict(), "request": self.request, "chosen_by": self.chosen_by}
        if self.kind is not None:
            out["schedule"] = {"kind": self.kind, "micro_batches": self.micro_batches}
            out["stages"] = [list(units) for units in self.stages]
        if self.placement is not None:
            out["placement"] = {"moe_layers": list(self.moe_layers), "slots_per_gpu": self.placement.slots_per_gpu,
                                "phy2log": self.placement.phy2log.tolist()}
        out["imbalance"] = round(self.imbalance, 6)
        if self.unit is not None:
            out["unit"] = {**self.unit.__dict__, "shared": "local", "shared_replicas": self.mesh.gpus,
                           "layout": self.describe_unit()}
        return out

    def describe_unit(self) -> str:
        """The inference unit in words (attention TP x DP, MoE EP, where the experts sit)."""
        m, u = self.mesh, self.unit
        return (f"attention TP{m.tp}{'+SP' if m.sp else ''} x DP{m.dp}; MoE EP{m.ep}: {u.routed_slots_per_gpu} routed "
                f"slot(s)/GPU ({m.redundant} redundant in all), shared experts on every GPU")


def unit_names(cfg) -> list[str]:
    """The model's pipeline units in order: 'embed', 'layers.0' .. 'layers.N-1', 'head', 'mtp.0' .. ."""
    return (["embed"] + [f"layers.{i}" for i in range(cfg.num_hidden_layers)] + ["head"] +
            [f"mtp.{k}" for k in range(cfg.num_nextn_predict_layers)])


def single_gpu(cfg, mode: str) -> ParallelPlan:
    """The layout of one GPU: no parallelism, every unit in one stage (a training step of one micro-batch); cfg may
    be None for a graph that is not a model of the family."""
    mesh = make_mesh(1, 1, experts=getattr(cfg, "n_routed_experts", None) or None, mode=mode)
    train = mode == "train" and cfg is not None
    return ParallelPlan(mode, mesh, "single GPU", "default", "1f1b" if train else None, 1 if train else None,
                        (tuple(unit_names(cfg)),) if train else ())


def expert_parallel(cfg, mode: str, ep: int, gpus_per_node: int, tables=None) -> ParallelPlan:
    """A layout of ep ranks that partitions only the routed experts, over nodes of gpus_per_node ranks; tables:
    the stacked placement (phy2log [L, P], log2phy, logcnt) over them, None: contiguous (PlacementError if impossible)."""
    experts = cfg.n_routed_experts
    slots = experts if tables is None else tables[0].shape[1]
    gpn = min(gpus_per_node, ep)
    mesh = make_mesh(ep, gpn, ep=ep, dp=ep, experts=experts, redundant=slots - experts, mode=mode)
    placement = None if tables is None else ExpertPlacement(ep, gpn, *tables)
    return ParallelPlan(mode, mesh, f"ep={ep}", "given", placement=placement)


def from_dict(d: dict, mode: str) -> ParallelPlan:
    """The ParallelPlan of a plan.json `parallel` (PlacementError when it is inconsistent)."""
    try:
        mesh = make_mesh(d["gpus"], d["gpus_per_node"], pp=d["pp"], ep=d["ep"], dp=d["dp"], tp=d["tp"], sp=d["sp"],
                         experts=d.get("experts"), redundant=d.get("redundant", 0), mode=mode)
        placement, layers = None, ()
        if "placement" in d:
            phy2log = torch.tensor(d["placement"]["phy2log"], dtype=torch.int64)
            experts = d["experts"]
            placement = ExpertPlacement(mesh.ep, min(mesh.ep, mesh.gpus_per_node), phy2log,
                                        *inverse_tables(phy2log, experts))
            layers = tuple(d["placement"]["moe_layers"])
        sched = d.get("schedule") or {}
        return ParallelPlan(mode, mesh, d.get("request", "auto"), d.get("chosen_by", "given"), sched.get("kind"),
                            sched.get("micro_batches"), tuple(tuple(s) for s in d.get("stages", ())), placement,
                            layers, None, float(d.get("imbalance", 1.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise PlacementError(f"plan.json 'parallel' is not a layout dsv3c wrote: {e}") from None
