"""The one function that lays a compile out: (config, target, mode, request) → ParallelPlan, priced.

`--parallel auto` (the default): training searches every legal (pp, ep, dp, schedule, micro-batches) with
the training cost model and keeps the fastest layout that fits in memory; prefill and decode take
DeepSeek-V3's unit for the target (prefill TP4+SP x DP8 with EP32 and one redundant slot per GPU, decode
TP4+SP x DP80 with EP320, the shared expert on GPUs of its own). `--parallel key=value,...` (keys pp ep dp
tp sp redundant) sets degrees in every mode; a request the model or the target cannot run is a
ParallelError with the reason. The expert placement over an EP group is contiguous, or balanced by EPLB
from an expert-load file (redundant slots on the heaviest experts), and its expected fan-out (nodes and
GPUs a token's routes reach) and load imbalance feed the cost model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from dsv3c.cost.constants import Constants
from dsv3c.cost.facts import BlockFacts
from dsv3c.cost.train import Candidate, Evaluation, LayoutError, TrainPricer
from dsv3c.eplb import PlacementError, inverse_tables, load_expert_load, load_stats, rebalance_experts
from dsv3c.parallel.plan import InferenceUnit, ParallelPlan, unit_names
from dsv3c.placement import (ExpertPlacement, default_mesh, expected_fanout, keeps_node_limit, make_mesh,
                             parse_parallel)
from dsv3c.schedules import KINDS, ScheduleError, validate

SEARCH_KEEP = 8  # the search ranks at least this many fitting layouts exactly (plan.json layouts.best)
DEFAULT_GLOBAL_BATCH = 15360  # DeepSeek-V3's final batch (sequences of 4096 tokens)
SCHEDULE_PREFERENCE = {"dualpipe": 0, "dualpipev": 1, "zb1p": 2, "1f1b": 3}  # given degrees: DeepSeek's first


class ParallelError(ValueError):
    """A parallel request, schedule or placement the model and target cannot run; one line."""


@dataclass
class Planned:
    """A ParallelPlan with what deciding it priced: the training evaluation and search, or nothing (inference)."""

    plan: ParallelPlan
    evaluation: Evaluation | None = None
    search: dict | None = None
    pricer: TrainPricer | None = None


def moe_layer_names(cfg) -> list[str]:
    """The MoE layers in graph order (MTP last): the rows of a placement and of an expert-load file."""
    if not cfg.n_routed_experts:
        return []
    dense = min(cfg.first_k_dense_replace, cfg.num_hidden_layers)
    names = [f"layers.{i}" for i in range(dense, cfg.num_hidden_layers)]
    return names + [f"mtp.{k}" for k in range(cfg.num_nextn_predict_layers) if cfg.is_moe_layer(cfg.num_hidden_layers)]


def place_experts(cfg, ep: int, gpus_per_node: int, slots: int, load: torch.Tensor | None) -> ExpertPlacement | None:
    """The placement of `slots` expert slots over an EP group of ep ranks (EPLB by load, else contiguous)."""
    layers = len(moe_layer_names(cfg))
    if not layers:
        return None
    experts = cfg.n_routed_experts
    gpn = min(ep, gpus_per_node)
    nodes = max(1, ep // gpn)
    if load is None and slots == experts:
        phy2log = torch.arange(experts).expand(layers, experts).clone()
        return ExpertPlacement(ep, gpn, phy2log, *inverse_tables(phy2log, experts))
    weight = load if load is not None else torch.ones(layers, experts, dtype=torch.float64)
    return ExpertPlacement(ep, gpn, *rebalance_experts(weight, slots, cfg.n_group, nodes, ep))


def fanout(cfg, placement: ExpertPlacement | None) -> tuple[float, float]:
    """(E[distinct nodes], E[distinct GPUs]) a token's routed experts reach under the placement (its first layer)."""
    if placement is None or placement.num_gpus <= 1:
        return 1.0, 1.0
    return expected_fanout(placement, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok)


def check_node_limit(cfg, placement: ExpertPlacement | None, mode: str) -> None:
    """Two-hop dispatch (train, prefill) needs the node limit of the config's groups: ParallelError if a token of
    the placement can reach more than topk_group nodes (decode's direct dispatch has no such limit)."""
    if placement is None or mode == "decode" or keeps_node_limit(placement, cfg.n_group, cfg.topk_group):
        return
    raise ParallelError(f"EP {placement.num_gpus} over {placement.num_nodes} nodes lets a token reach more than "
                        f"topk_group={cfg.topk_group} nodes (its groups span nodes); choose an EP degree that maps "
                        "expert groups to nodes")


def imbalance(placement: ExpertPlacement | None, load, c: Constants) -> float:
    """Routes at the busiest GPU over the mean: measured on the load under the placement, else the constant."""
    if placement is None or load is None:
        return c["expert_imbalance"]
    after = load_stats(load, placement.phy2log, placement.logcnt, placement.num_gpus)["after"]
    return sum(after) / len(after)


def plan_parallel(cfg, target, mode: str, request: str | None, *, facts: BlockFacts, constants: Constants,
                  expert_load=None, kind: str | None = None, micro_batches: int | None = None,
                  global_batch: int | None = None, flops_per_token: tuple = (0, 0)) -> Planned:
    """The ParallelPlan of a compile and what deciding it priced (see the module docstring)."""
    request = request or "auto"
    try:
        given = parse_parallel(request) if request != "auto" else {}
        load = None
        if expert_load is not None:
            load = load_expert_load(expert_load, len(moe_layer_names(cfg)), cfg.n_routed_experts)
        if mode == "train":
            return _train(cfg, target, request, given, facts, constants, load, kind, micro_batches,
                          global_batch or DEFAULT_GLOBAL_BATCH, flops_per_token)
        if kind is not None or micro_batches is not None:
            raise ParallelError("--schedule and --micro-batches apply to training (--mode train) only")
        return _inference(cfg, target, mode, request, given, constants, load)
    except (PlacementError, ScheduleError, LayoutError) as e:
        raise ParallelError(str(e).splitlines()[0]) from None


# ---- training ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _keeps_node_limit(experts: int, n_group: int, topk_group: int, ep: int, gpus_per_node: int) -> bool:
    """Whether EP over ep ranks (the contiguous placement) keeps the config's node limit."""
    placement = ExpertPlacement.contiguous(1, experts, ep, min(ep, gpus_per_node))
    return keeps_node_limit(placement, n_group, topk_group)


def candidates(cfg, target, global_batch: int, given: dict, kind: str | None, micro_batches: int | None):
    """Every legal training layout of the target, restricted to the requested degrees, schedule and micro-batches."""
    gpus, gpn = target.gpus, target.gpus_per_node
    units = cfg.num_hidden_layers + 2 + cfg.num_nextn_predict_layers  # embedding, layers, head, MTP
    experts = cfg.n_routed_experts or None
    out = []
    pps = [given["pp"]] if "pp" in given else [d for d in range(1, gpus + 1) if gpus % d == 0]
    for pp in pps:
        if gpus % pp:
            continue
        dp = gpus // pp
        if given.get("dp", dp) != dp:
            continue
        for ep in ([given["ep"]] if "ep" in given else [d for d in range(1, dp + 1) if dp % d == 0]):
            try:
                make_mesh(gpus, gpn, pp=pp, ep=ep, dp=dp, experts=experts, redundant=given.get("redundant", 0))
            except PlacementError:
                continue
            if ep > 1 and not experts:
                continue
            if ep > 1 and not _keeps_node_limit(cfg.n_routed_experts, cfg.n_group, cfg.topk_group, ep, gpn):
                continue
            for k in ([kind] if kind else KINDS):
                stages = 2 * pp if k == "dualpipev" else pp
                if stages > units or (pp == 1 and k != "1f1b") or global_batch % dp:
                    continue
                m = global_batch // dp
                if micro_batches and m != micro_batches:
                    continue
                try:
                    validate(k, pp, m)
                except ScheduleError:
                    continue
                out.append(Candidate(pp, ep, dp, k, m))
    return out


def _train(cfg, target, request, given, facts, c, load, kind, micro_batches, global_batch, flops) -> Planned:
    for key, bad in (("tp", lambda v: v != 1), ("sp", lambda v: v)):
        if key in given and bad(given[key]):
            raise ParallelError(f"--parallel {key}={given[key]}: training layouts have no tensor or sequence "
                                "parallelism (DeepSeek-V3 trains with PP, EP and ZeRO-1 DP only)")
    redundant = given.get("redundant", 0)
    placements: dict[int, ExpertPlacement | None] = {}

    def placement_of(ep: int):
        if ep not in placements:
            placements[ep] = place_experts(cfg, ep, target.gpus_per_node, (cfg.n_routed_experts or 0) + redundant,
                                           load)
        return placements[ep]

    pricer = TrainPricer(cfg, target, facts, c, global_batch, lambda ep: fanout(cfg, placement_of(ep)),
                         redundant=redundant, imbalance=lambda ep: imbalance(placement_of(ep), load, c),
                         flops_per_token=flops)
    search = search_layouts(pricer, candidates(cfg, target, global_batch, {}, kind, micro_batches))
    if given:
        wanted = candidates(cfg, target, global_batch, given, kind, micro_batches)
        if not wanted:
            raise ParallelError(f"no legal training layout for --parallel {request} (schedule {kind or 'any'}, "
                                f"micro-batches {micro_batches or global_batch}, global batch {global_batch}) on "
                                f"{target.name}")
        wanted.sort(key=lambda cand: SCHEDULE_PREFERENCE[cand.kind])
        chosen, chosen_by = pricer.evaluate(wanted[0], timeline=True), "given"
    else:
        if not search["fitting"]:
            rejected = search["rejected"]
            example = f"{rejected[0][0].label()}: {rejected[0][1]}" if rejected else "none is legal"
            raise ParallelError(f"no training layout fits {target.name} ({len(rejected)} candidates rejected, "
                                f"e.g. {example})")
        chosen, chosen_by = pricer.evaluate(search["fitting"][0].cand, timeline=True), "auto"
    cand = chosen.cand
    check_node_limit(cfg, placement_of(cand.ep), "train")
    mesh = make_mesh(target.gpus, target.gpus_per_node, pp=cand.pp, ep=cand.ep, dp=cand.dp,
                     experts=cfg.n_routed_experts or None, redundant=redundant, mode="train")
    names = stage_names(cfg, chosen.cut)
    plan = ParallelPlan("train", mesh, request, chosen_by, cand.kind, cand.micro_batches, names,
                        placement_of(cand.ep), tuple(moe_layer_names(cfg)), load, pricer.imbalance(cand.ep))
    return Planned(plan, chosen, search, pricer)


def search_layouts(pricer: TrainPricer, cands: list[Candidate], keep: int = SEARCH_KEEP) -> dict:
    """{"fitting": [Evaluation, fastest first], "rejected": [(candidate, reason)], "pruned": [candidate]}.

    Candidates are evaluated in the order of a lower bound of their step (`TrainPricer.step_lower_bound`);
    once `keep` fitting layouts are faster than the next candidate's bound, the rest cannot enter the best
    `keep` and are pruned without building their schedules.
    """
    fitting, rejected, pruned = [], [], []
    cap = pricer.target.gpu.hbm_bytes
    bounds = []
    for cand in cands:
        try:
            memory = pricer.memory_lower_bound(cand)
            if memory > cap:
                rejected.append((cand, f"needs at least {memory / 1e9:.1f} GB of {cap / 1e9:.1f}"))
                continue
            bounds.append((pricer.step_lower_bound(cand), cand))
        except LayoutError as e:
            rejected.append((cand, str(e)))
    bounds.sort(key=lambda bc: bc[0])
    for i, (bound, cand) in enumerate(bounds):
        if len(fitting) >= keep and bound > sorted(ev.step_seconds for ev in fitting)[keep - 1]:
            pruned = [c for _, c in bounds[i:]]
            break
        ev = pricer.evaluate(cand)
        if not ev.fits:
            worst = max(ev.memory["ranks"], key=lambda r: r["total"])
            rejected.append((cand, f"needs {worst['total'] / 1e9:.1f} GB of {cap / 1e9:.1f}"))
            continue
        fitting.append(ev)
    fitting.sort(key=lambda ev: (ev.step_seconds, ev.memory["peak_total"]))
    return {"fitting": fitting, "rejected": rejected, "pruned": pruned}


def stage_names(cfg, cut) -> tuple:
    """Per model stage, the names of the units it holds ('embed', 'layers.N', 'head', 'mtp.K')."""
    names = unit_names(cfg)
    return tuple(tuple(names[a:b]) for a, b in cut)


# ---- inference ----------------------------------------------------------------------------------------------


def _inference(cfg, target, mode, request, given, c, load) -> Planned:
    experts = cfg.n_routed_experts
    if given.get("pp", 1) != 1:
        raise ParallelError(f"--parallel pp={given['pp']}: an inference unit has no pipeline parallelism")
    mesh = default_mesh(target.gpus, target.gpus_per_node, mode, experts=experts or 1, layers=cfg.num_hidden_layers,
                        **given)
    if load is None and "redundant" not in given and mesh.redundant and experts and experts % mesh.ep == 0:
        # no load statistics: nothing to replicate for, unless EP needs slots beyond the experts
        mesh = default_mesh(target.gpus, target.gpus_per_node, mode, experts=experts, layers=cfg.num_hidden_layers,
                            **{**given, "redundant": 0})
    if cfg.num_attention_heads % mesh.tp:
        raise ParallelError(f"{mode} unit: tp {mesh.tp} does not divide the {cfg.num_attention_heads} attention heads")
    slots = (experts or 0) + mesh.redundant
    unit = InferenceUnit(slots // mesh.ep, int(c["inference_micro_batches"]))
    placement = place_experts(cfg, mesh.ep, mesh.gpus_per_node, slots, load) if experts else None
    check_node_limit(cfg, placement, mode)
    plan = ParallelPlan(mode, mesh, request, "given" if given else "default", placement=placement,
                        moe_layers=tuple(moe_layer_names(cfg)), load=load, imbalance=imbalance(placement, load, c),
                        unit=unit)
    return Planned(plan)
