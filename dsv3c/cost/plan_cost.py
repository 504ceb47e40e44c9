"""The priced plan for plan.json and report.txt: the figures of the ParallelPlan the compile chose, each with its
low–high range, from the same evaluation that chose it.

Training: `cost` (step and its parts, tokens/s, MFU, HFU, GPU-hours per trillion tokens, chunk and stage
seconds, the bubble per rank and what explains the largest), `memory_per_gpu`, `communication`, `layouts`
(the best candidates of the search), the pipeline timing added to `schedule`. Prefill/decode: `inference`
(TTFT or TPOT and its parts, tokens/s per GPU, KV capacity, communication, MTP speculation). Both:
`cost_constants` (every constant with its value, unit, source and range). A range re-prices the same plan
with every constant at the fast and at the slow end of its published range.
"""

from __future__ import annotations

from pathlib import Path

from dsv3c.cost import calibration
from dsv3c.cost import inference as inf
from dsv3c.cost.pictures import memory_time_svg
from dsv3c.cost.price import Time
from dsv3c.cost.train import STEP_PARTS, Evaluation, TrainPricer
from dsv3c.schedules.published import PUBLISHED, published_bubble

GB = 1e9
BOUNDS = ("fast", "slow")


def _ranged(value: float, low: float, high: float) -> dict:
    """A figure with its range, low <= high."""
    return {"value": value, "range": [min(low, high), max(low, high)]}


def _layout_row(ev: Evaluation) -> dict:
    return {"label": ev.cand.label(), "pp": ev.cand.pp, "ep": ev.cand.ep, "dp": ev.cand.dp, "schedule": ev.cand.kind,
            "micro_batches": ev.cand.micro_batches, "step_seconds": ev.step_seconds,
            "mfu": _mfu(ev), "gpu_hours_per_trillion_tokens": _gpu_hours(ev),
            "peak_memory_bytes": ev.memory["peak_total"], "peak_gb": ev.memory["peak_total"] / GB}


def _flops_main(ev: Evaluation) -> float:
    """Model FLOPs per token of the main model (training convention) from the graph's cost."""
    return ev.pricer.flops_per_token_main


def _mfu(ev: Evaluation) -> float:
    peak = ev.pricer.target.gpus * ev.pricer.target.gpu.bf16_flops
    return _flops_main(ev) * ev.tokens_per_second / peak


def _gpu_hours(ev: Evaluation) -> float:
    return ev.pricer.target.gpus * (1e12 / ev.tokens_per_second) / 3600


def _rebound(ev: Evaluation, constants) -> Evaluation:
    """The same layout and stages priced with other constants."""
    p = ev.pricer
    other = TrainPricer(p.cfg, p.target, p.facts, constants, p.global_batch, p._fanout_of, p.imbalance, p.redundant,
                        (p.flops_per_token_main, p.hardware_flops_per_token))
    return other.evaluate(ev.cand, cut=ev.cut)


def train_keys(planned, constants, out: Path | None = None) -> dict:
    """plan.json keys cost, memory_per_gpu, communication, layouts, cost_constants and the schedule's timing."""
    ev = planned.evaluation
    bounds = {b: _rebound(ev, constants.at(b)) for b in BOUNDS}
    tps = ev.tokens_per_second
    gpus = ev.pricer.target.gpus
    peak = gpus * ev.pricer.target.gpu.bf16_flops
    hw = ev.pricer.hardware_flops_per_token
    rng = lambda f: _ranged(f(ev), f(bounds["fast"]), f(bounds["slow"]))  # noqa: E731
    busiest = max(range(len(ev.busy)), key=lambda r: ev.busy[r])
    cost = {
        "step_seconds": ev.step_seconds,
        "pipeline_seconds": ev.pipeline_seconds,
        "dp_seconds": ev.dp["seconds"],
        "optimizer_seconds": ev.optimizer_seconds,
        "tokens_per_step": ev.pricer.global_batch * ev.pricer.tokens,
        "tokens_per_second": tps,
        "tokens_per_gpu_per_second": tps / gpus,
        "flops_per_token_main": _flops_main(ev),
        "hardware_flops_per_token": hw,
        "mfu": _mfu(ev),
        "hfu": hw * tps / peak,
        "gpu_hours_per_trillion_tokens": _gpu_hours(ev),
        "ranges": {"step_seconds": rng(lambda e: e.step_seconds)["range"], "mfu": rng(_mfu)["range"],
                   "gpu_hours_per_trillion_tokens": rng(_gpu_hours)["range"],
                   "tokens_per_gpu_per_second": rng(lambda e: e.tokens_per_second / gpus)["range"]},
        "step_split_seconds": {k: _ranged(ev.parts[k], bounds["fast"].parts[k], bounds["slow"].parts[k])
                               for k in STEP_PARTS},
        "step_split_rank": busiest,
        "chunk_seconds": _chunks(ev),
        "stage_seconds": [{**{k: t.total for k, t in _stage_chunks(st).items()}, "units": list(units)}
                          for st, units in zip(ev.stages, planned.plan.stages)],
        "bubble_seconds": [ev.pipeline_seconds - b for b in ev.busy],
        "bubble": _bubble_explained(ev),
        "micro_batch_tokens": ev.pricer.tokens,
        "layout": {**_layout_row(ev), "zero": 1},
        "parallel": planned.plan.chosen_by,
        "calibration": calibration.calibration_note(ev.pricer.target.gpu),
    }
    out_keys = {
        "cost": cost,
        "memory_per_gpu": ev.memory,
        "communication": _train_communication(ev),
        "layouts": {"candidates": sum(len(planned.search[k]) for k in ("fitting", "rejected", "pruned")),
                    "fitting": len(planned.search["fitting"]), "rejected": len(planned.search["rejected"]),
                    "pruned": len(planned.search["pruned"]),
                    "best": [_layout_row(e) for e in planned.search["fitting"][:8]]},
        "cost_constants": constants.to_dict(),
    }
    if out is not None:
        from dsv3c.schedules.render import write_trace

        rows = [_layout_row(e) for e in planned.search["fitting"]]
        title = f"{ev.pricer.cfg.name} on {ev.pricer.target.name}: {ev.cand.label()}"
        (out / "memory_time.svg").write_text(memory_time_svg(ev.memory, rows, ev.cand.label(), title))
        write_trace(ev.timeline, out / "schedule.trace.json")
        cost["files"] = ["memory_time.svg", "schedule.trace.json"]
    return out_keys


def schedule_timing(ev: Evaluation) -> dict:
    """The pipeline's simulated timing for plan.json's `schedule`: the cost model's one simulation."""
    return {"step_seconds": ev.pipeline_seconds, "busy_seconds": list(ev.busy),
            "bubble_seconds": [ev.pipeline_seconds - b for b in ev.busy],
            "durations": "per-stage chunk seconds priced by the cost model (dsv3c.cost.price), communication and "
                         "overlap included; the same simulation as cost.pipeline_seconds"}


def _stage_chunks(t) -> dict[str, Time]:
    return {"F": t.F + t.f_comm, "B": t.B + t.b_comm, "I": t.I + t.R + t.b_comm, "W": t.W}


def _chunks(ev: Evaluation) -> dict:
    """Per unit kind, its chunk seconds F, B, I, W and an overlapped F&B pair of two such chunks."""
    from dsv3c.cost.price import overlap

    out = {}
    for kind in dict.fromkeys(ev.pricer.units):
        t = ev.pricer.unit_time(kind, ev.cand.ep)
        out[kind] = {**{k: v.total for k, v in _stage_chunks(t).items()},
                     "FB": overlap(t.F + t.B, t.f_comm + t.b_comm).total}
    return out


def _bubble_explained(ev: Evaluation) -> dict:
    """The largest per-rank bubble against the schedule's published formula at the stages' mean chunk times."""
    kind = ev.cand.kind
    n = len(ev.stages)
    mean = {k: sum(_stage_chunks(st)[k].total for st in ev.stages) / n for k in ("F", "B", "W")}
    mean["F&B"] = sum(t.total for t in ev.durations["F&B"]) / len(ev.durations["F&B"])
    formula = published_bubble(kind, ev.cand.pp, mean)
    bubbles = [ev.pipeline_seconds - b for b in ev.busy]
    worst = max(range(len(bubbles)), key=lambda r: bubbles[r])
    busiest = max(ev.busy)
    return {"largest_seconds": bubbles[worst], "rank": worst, "formula": PUBLISHED[kind]["bubble"],
            "formula_seconds": formula, "busiest_rank_seconds": min(bubbles),
            "load_gap_seconds": busiest - ev.busy[worst],
            "explanation": (f"rank {worst} idles {bubbles[worst]:.3f} s: the schedule's own bubble "
                            f"({PUBLISHED[kind]['bubble']} = {formula:.3f} s at the stages' mean chunk times; the "
                            f"busiest rank's is {min(bubbles):.3f} s) plus {busiest - ev.busy[worst]:.3f} s less work "
                            "than the busiest rank (stages hold whole layers)")}


def _train_communication(ev: Evaluation) -> dict:
    """EP per MoE layer and step, PP sends, DP collectives (bytes and seconds)."""
    moe = ev.pricer.unit_time("moe", ev.cand.ep) if "moe" in ev.pricer.facts.blocks else None
    per_layer = moe.comm if moe is not None else {}
    m = ev.cand.micro_batches
    held = ev.pricer.rank_stages(ev.sched, ev.cand)
    moe_names = {i for i, u in enumerate(ev.pricer.units) if u in ("moe", "mtp")}
    moe_per_rank = max(sum(1 for s in h for i in range(*ev.cut[s]) if i in moe_names) for h in held)
    ep_ib = sum(v["ib_bytes"] for v in per_layer.values())
    ep_nv = sum(v["nvlink_bytes"] for v in per_layer.values())
    ep_s = sum(v["seconds"] for v in per_layer.values())
    hop = ev.hop
    sends = 2 * m * max(len(h) for h in held) if ev.cand.pp > 1 else 0
    return {
        "ep": {"per_layer_per_micro_batch": per_layer,
               "per_step_per_gpu": {"moe_layers": moe_per_rank, "micro_batches": m, "ib_bytes": ep_ib * moe_per_rank * m,
                                    "nvlink_bytes": ep_nv * moe_per_rank * m, "seconds": ep_s * moe_per_rank * m}},
        "pp": {"per_micro_batch": {"bytes": hop["bytes"], "seconds": hop["seconds"], "link": hop["link"]},
               "per_step_per_gpu": {"bytes": hop["bytes"] * sends, "seconds": hop["seconds"] * sends}},
        "dp": {"per_step_per_gpu": ev.dp},
    }


# ---- inference --------------------------------------------------------------------------------------------


def inference_keys(planned, cfg, target, facts, constants, kv_per_token: dict) -> dict:
    """plan.json keys inference and cost_constants for a prefill or decode unit (UnitError when it cannot work)."""
    plan = planned.plan
    fanout = _fanout(cfg, plan)
    out = {"unit": {**plan.to_dict()["unit"], "gpus": plan.mesh.gpus, "nodes": plan.mesh.nodes, "tp": plan.mesh.tp,
                    "dp": plan.mesh.dp, "ep": plan.mesh.ep, "sp": plan.mesh.sp, "redundant": plan.mesh.redundant,
                    "mode": plan.mode, "gpus_per_node": plan.mesh.gpus_per_node}}

    def figures(c):
        if plan.mode == "prefill":
            return inf.prefill(plan, cfg, facts, target, c, fanout)
        return inf.decode(plan, cfg, facts, target, c, fanout, mtp=False)

    main = figures(constants)
    bounds = {b: figures(constants.at(b)) for b in BOUNDS}
    out.update(main)
    head = "ttft_seconds" if plan.mode == "prefill" else "tpot_seconds"
    out["ranges"] = {k: _ranged(main[k], bounds["fast"][k], bounds["slow"][k])["range"]
                     for k in (head, "tokens_per_gpu_per_second")}
    out["split_seconds"] = {k: _ranged(v, bounds["fast"]["split_seconds"][k], bounds["slow"]["split_seconds"][k])
                            for k, v in main["split_seconds"].items()}
    out["tokens_per_node_per_second"] = main["tokens_per_gpu_per_second"] * plan.mesh.gpus_per_node
    if plan.mode == "prefill":
        out["kv_capacity"] = inf.kv_capacity(plan, facts, target, constants, kv_per_token["main"],
                                             facts.shapes["seq"], None)
    else:
        mtp = "mtp" in facts.blocks
        per_token = kv_per_token["main"] + (kv_per_token["mtp"] if mtp else 0)
        out["kv_capacity"] = inf.kv_capacity(plan, facts, target, constants, per_token, facts.shapes["kv_len"],
                                             facts.shapes["batch"])
        if mtp:
            spec = {b: inf.decode(plan, cfg, facts, target, c, fanout, mtp=True)
                    for b, c in (("value", constants), *((b, constants.at(b)) for b in BOUNDS))}
            out["mtp"] = {"acceptance": constants["mtp_acceptance"],
                          "acceptance_source": constants.entry("mtp_acceptance").note,
                          "tokens_per_step": spec["value"]["tokens_per_sequence_per_step"],
                          "step_cost_ratio": spec["value"]["step_seconds"] / main["step_seconds"],
                          "speedup": spec["value"]["tokens_per_gpu_per_second"] / main["tokens_per_gpu_per_second"],
                          "tpot_seconds": spec["value"]["tpot_seconds"],
                          "tokens_per_gpu_per_second": spec["value"]["tokens_per_gpu_per_second"],
                          "ranges": {k: _ranged(spec["value"][k], spec["fast"][k], spec["slow"][k])["range"]
                                     for k in ("tpot_seconds", "tokens_per_gpu_per_second")}}
    out["calibration"] = calibration.calibration_note(target.gpu)
    return {"inference": out, "cost_constants": constants.to_dict()}


def _fanout(cfg, plan) -> tuple[float, float]:
    from dsv3c.parallel.build import fanout

    return fanout(cfg, plan.placement)
