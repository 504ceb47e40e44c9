"""The training plan's cost for plan.json and report.txt: `cost_plan` (layout search or one layout, then cost,
memory_per_gpu, communication, layouts, cost_constants; writes memory_time.svg and the schedule trace) and
`report_tables` (the report's sections, with units)."""

from __future__ import annotations

from pathlib import Path

from dsv3c.cost.constants import Constants
from dsv3c.cost.pictures import memory_time_svg
from dsv3c.cost.search import candidate_layouts, search_layouts
from dsv3c.cost.train import TrainCostModel

GB = 1e9
DEFAULT_GLOBAL_BATCH = 15360  # DeepSeek-V3's final batch (sequences of 4096 tokens)


class CostOptionError(ValueError):
    """A --parallel/--schedule/--micro-batches/--global-batch combination the cost model cannot lay out."""


def _ms(s):
    return f"{1e3 * s:.2f}"


def _layout_row(ev: dict) -> dict:
    c, m = ev["cost"], ev["memory_per_gpu"]
    return {**ev["layout"].to_dict(), "label": ev["layout"].label(), "step_seconds": c["step_seconds"],
            "mfu": c["mfu"], "gpu_hours_per_trillion_tokens": c["gpu_hours_per_trillion_tokens"],
            "peak_memory_bytes": m["peak_total"], "peak_gb": m["peak_total"] / GB}


def micro_batches_per_step(options: dict, dp: int) -> int:
    """Micro-batches of one sequence each per pipeline and step: the global batch over the data-parallel ranks."""
    return max(1, (options.get("global_batch") or DEFAULT_GLOBAL_BATCH) // dp)


def fastest_layout(cfg, target, figures: dict | None, options: dict):
    """(the fastest training layout that fits, the search) for `--parallel auto`; CostOptionError when none fits."""
    seq = options.get("seq") or 4096
    gb = options.get("global_batch") or DEFAULT_GLOBAL_BATCH
    constants = Constants.for_target(target).with_overrides(options.get("sets"))
    model = TrainCostModel(cfg, target, constants, (figures or {}).get("train_blocks"), seq, gb, options.get("policy"))
    restrict = {}
    if options.get("schedule"):
        restrict["kinds"] = (options["schedule"],)
    if options.get("micro_batches"):
        restrict["micro_batches"] = options["micro_batches"]
    search = search_layouts(cfg, target, seq, gb, model=model, **restrict)
    if not search["fitting"]:
        rejected = search["rejected"]
        example = rejected[0][0].label() + ": " + rejected[0][1] if rejected else "none legal"
        raise CostOptionError(f"no training layout fits {target.name} ({len(rejected)} candidates rejected, "
                              f"e.g. {example})")
    return search["fitting"][0]["layout"], search


def cost_plan(cfg, target, figures: dict | None, options: dict) -> dict:
    """plan.json keys cost, memory_per_gpu, communication, layouts, cost_constants (training mode).

    options: parallel ("auto" or a dict of pp/ep/dp), schedule, micro_batches, seq, global_batch, sets
    ({constant: value}), policy, out (directory for memory_time.svg and step.trace.json; optional).
    """
    seq = options.get("seq") or 4096
    gb = options.get("global_batch") or DEFAULT_GLOBAL_BATCH
    constants = Constants.for_target(target).with_overrides(options.get("sets"))
    blocks = (figures or {}).get("train_blocks")
    model = TrainCostModel(cfg, target, constants, blocks, seq, gb, options.get("policy"))
    parallel = options.get("parallel") or "auto"
    restrict = {}
    if parallel != "auto":
        restrict.update({k: parallel[k] for k in ("pp", "ep") if k in parallel})
        if parallel.get("tp", 1) != 1:
            raise CostOptionError("the training cost model lays out no tensor parallelism (tp must be 1)")
    if options.get("schedule"):
        restrict["kinds"] = (options["schedule"],)
    if options.get("micro_batches"):
        restrict["micro_batches"] = options["micro_batches"]
    if parallel != "auto":
        cands = candidate_layouts(cfg, target, gb, **restrict)
        if "kinds" not in restrict:  # one layout: DeepSeek's schedule first
            order = {"dualpipe": 0, "dualpipev": 1, "zb1p": 2, "1f1b": 3}
            cands.sort(key=lambda lay: order[lay.kind])
        if not cands:
            raise CostOptionError(f"no legal training layout for --parallel {parallel} "
                                  f"(schedule {options.get('schedule')}, global batch {gb}) on {target.name}")
        chosen_layout = cands[0]
        search = options.get("search") or search_layouts(cfg, target, seq, gb, model=model)
        layouts = search["fitting"]
    else:
        search = search_layouts(cfg, target, seq, gb, model=model, **restrict)
        layouts = search["fitting"]
        if not layouts:
            raise CostOptionError(f"no training layout fits {target.name} "
                                  f"({len(search['rejected'])} candidates rejected, e.g. "
                                  f"{search['rejected'][0][0].label() + ': ' + search['rejected'][0][1] if search['rejected'] else 'none legal'})")
        chosen_layout = layouts[0]["layout"]
    chosen = model.evaluate(chosen_layout, keep_timeline=True)
    tl = chosen.pop("_timeline")
    cost = chosen["cost"]
    cost["layout"] = chosen_layout.to_dict()
    cost["parallel"] = options.get("chosen_by") or ("auto" if parallel == "auto" else "given")
    out = {
        "cost": cost,
        "memory_per_gpu": chosen["memory_per_gpu"],
        "communication": chosen["communication"],
        "layouts": {"candidates": len(search["fitting"]) + len(search["rejected"]), "fitting": len(search["fitting"]),
                    "best": [_layout_row(ev) for ev in layouts[:8]]},
        "cost_constants": constants.to_dict(),
    }
    if options.get("out"):
        d = Path(options["out"])
        title = f"{cfg.name} on {target.name}: {chosen_layout.label()}"
        cands = [_layout_row(ev) for ev in layouts]
        (d / "memory_time.svg").write_text(memory_time_svg(chosen["memory_per_gpu"], cands, chosen_layout.label(), title))
        from dsv3c.schedules.render import write_trace

        write_trace(tl, d / "step.trace.json")  # the step with its communication (schedule.trace.json: compute)
        out["cost"]["files"] = ["memory_time.svg", "step.trace.json"]
    return out


def report_tables(plan: dict) -> list[tuple]:
    """report.txt sections (title, rows, headers) for layout, memory, communication, cost and constants."""
    if "cost" not in plan:
        return []
    c, mem, comm = plan["cost"], plan["memory_per_gpu"], plan["communication"]
    lay = c["layout"]
    sections = [("Training layout (" + c["parallel"] + ")",
                 [[k, v] for k, v in lay.items()] + [["micro-batch tokens", c["micro_batch_tokens"]]])]
    rows = []
    for i, r in enumerate(mem["ranks"]):
        rows.append([i, ",".join(map(str, r["stages"])), r["peak_micro_batches"]] +
                    [f"{r[k] / GB:.2f}" for k in ("weights", "gradients", "master_weights", "optimizer", "activations",
                                                   "fp8_cache", "comm_buffers", "workspace", "total")] +
                    ["yes" if r["fits"] else "NO: " + ", ".join(r["overflow"]["largest"])])
    sections.append((f"Memory per GPU (GB; capacity {mem['capacity'] / GB:.2f} GB)", rows,
                     ["rank", "stages", "peak mb", "weights", "grads", "master", "optim", "activ", "fp8 cache",
                      "comm buf", "workspace", "total", "fits"]))
    ep = comm["ep"]
    rows = [[f"EP {k} (per MoE layer, micro-batch)", f"{v['ib_bytes'] / GB:.3f}", f"{v['nvlink_bytes'] / GB:.3f}",
             _ms(v["seconds"])] for k, v in ep["per_layer_per_micro_batch"].items()]
    s = ep["per_step_per_gpu"]
    rows.append([f"EP per step per GPU ({s['moe_layers']} MoE layers x {s['micro_batches']} mb)",
                 f"{s['ib_bytes'] / GB:.1f}", f"{s['nvlink_bytes'] / GB:.1f}", _ms(s["seconds"])])
    pp = comm["pp"]
    rows.append([f"PP send per micro-batch ({pp['per_micro_batch']['link']})",
                 f"{pp['per_micro_batch']['bytes'] / GB:.3f}", "", _ms(pp["per_micro_batch"]["seconds"])])
    rows.append(["PP per step per GPU", f"{pp['per_step_per_gpu']['bytes'] / GB:.1f}", "",
                 _ms(pp["per_step_per_gpu"]["seconds"])])
    dp = comm["dp"]["per_step_per_gpu"]
    rows.append(["DP ZeRO-1 reduce-scatter + all-gather per step", f"{dp['ib_bytes'] / GB:.2f}",
                 f"{dp['nvlink_bytes'] / GB:.2f}", _ms(dp["seconds"])])
    sections.append(("Communication (GB over IB / NVLink, ms at the achieved bandwidths)", rows,
                     ["transfer", "IB GB", "NVLink GB", "ms"]))
    rows = [["step", f"{c['step_seconds']:.3f} s"], ["pipeline (simulated)", f"{c['pipeline_seconds']:.3f} s"],
            ["DP collectives (exposed)", f"{c['dp_seconds']:.3f} s"],
            ["tokens per step", f"{c['tokens_per_step']:,}"], ["tokens/s", f"{c['tokens_per_second']:,.0f}"],
            ["tokens/s per GPU", f"{c['tokens_per_gpu_per_second']:,.0f}"],
            ["model TFLOPs per token (main, 3x fwd)", f"{c['flops_per_token_main'] / 1e12:.4f}"],
            ["MFU", f"{100 * c['mfu']:.1f} %"], ["HFU", f"{100 * c['hfu']:.1f} %"],
            ["GPU-hours per trillion tokens", f"{c['gpu_hours_per_trillion_tokens']:,.0f}"],
            ["bubble per rank (ms, min..max)", f"{_ms(min(c['bubble_seconds']))} .. {_ms(max(c['bubble_seconds']))}"]]
    sections.append(("Step cost", rows))
    rows = [[k, _ms(v["F"]), _ms(v["B"]), _ms(v["I"]), _ms(v["W"]), _ms(v["FB"])] for k, v in c["chunk_seconds"].items()]
    sections.append((f"Chunk times per layer ({c['micro_batch_tokens']}-token micro-batch, ms)", rows,
                     ["layer", "F", "B", "I", "W", "F&B"]))
    lays = plan.get("layouts", {})
    rows = [[r["label"], f"{r['step_seconds']:.2f}", f"{100 * r['mfu']:.1f}", f"{r['gpu_hours_per_trillion_tokens']:,.0f}",
             f"{r['peak_gb']:.1f}"] for r in lays.get("best", [])]
    sections.append((f"Best layouts ({lays.get('fitting', 0)} of {lays.get('candidates', 0)} candidates fit)", rows,
                     ["layout", "step s", "MFU %", "GPU-h/T tokens", "peak GB"]))
    rows = [[k, f"{v['value']:g}", v["unit"], v["source"], v["note"]] for k, v in plan["cost_constants"].items()]
    sections.append(("Cost constants (--set name=value)", rows, ["name", "value", "unit", "source", "note"]))
    return sections
