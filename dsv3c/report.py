"""Artifacts: plan.json (the machine-readable contract) and report.txt (the same as tables)."""

import json
from pathlib import Path

from tabulate import tabulate

from dsv3c.schema import plan_json
from dsv3c.units import target_value


def build_plan(version, params, figures, ir_plan, records) -> dict:
    """The plan.json dict, in the key order of DESIGN.md; only passes[*].seconds depends on the run."""
    cfg, program, analyses = ir_plan.cfg, ir_plan.program, ir_plan.analyses
    plan = {
        "dsv3c_version": version,
        "model": {
            "name": cfg.name,
            "config": cfg.to_dict(),
            "params": params,
            "flops_per_token": figures["flops_per_token"],
            "flops_per_token_main": figures["flops_per_token_main"],
            "hardware_flops_per_token": figures["hardware_flops_per_token"],
            "kv_cache_bytes_per_token": figures["kv_cache_bytes_per_token"],
            "reference_shapes": figures["reference_shapes"],
        },
        "target": ir_plan.target.to_dict(),
        "mode": ir_plan.mode,
        "shapes": ir_plan.shapes,
        "passes": [r.to_dict() for r in records],
        "weights": {"bytes_by_dtype": program.weight_bytes_by_dtype(), "count": program.weight_count()},
        "kernels": analyses.kernels or [],
    }
    if analyses.precision_policy is not None:
        plan["precision_policy"] = analyses.precision_policy
    if analyses.costs is not None:
        plan["graph_cost"] = graph_cost(analyses.costs, ir_plan.mode)
    if analyses.schedule is not None:
        plan["schedule"] = analyses.schedule
    return plan


def graph_cost(costs: dict, mode: str) -> dict:
    """The cost pass's totals over the compiled graph, and per token in each FLOP convention."""
    from dsv3c.cost.nodes import hardware_flops, model_flops

    totals, tokens = costs["total"], costs["tokens"]
    return {
        "totals": totals,
        "tokens": tokens,
        "model_flops_per_token": model_flops(totals, mode == "train") // tokens,
        "hardware_flops_per_token": hardware_flops(totals) // tokens,
        "bytes_per_token": totals["bytes"] // tokens,
    }


def _n(x) -> str:
    """An integer with thousands separators."""
    return f"{x:,}"


def report_text(plan: dict) -> str:
    """report.txt: the plan as tables (no run-dependent values)."""
    m = plan["model"]
    p = m["params"]
    sections = [
        ("Model", [["name", m["name"]], ["mode", plan["mode"]], ["shapes", json.dumps(plan["shapes"])]]
         + [["shapes note", note] for note in plan.get("shapes_notes", [])]),
        ("Parameters", [[k, _n(p[k])] for k in ("total", "main", "mtp", "activated_per_token")]),
        ("Parameters by component", [[k, _n(v)] for k, v in p["by_component"].items()]),
        (
            "FLOPs per token (model: train = 3 x forward, MTP included; main: without MTP; hardware: as executed, "
            "with recomputation)",
            [[k, _n(m["flops_per_token"][k]), _n(m["flops_per_token_main"][k]), _n(m["hardware_flops_per_token"][k])]
             for k in m["flops_per_token"]],
            ["mode", "model", "main", "hardware"],
        ),
        ("KV cache bytes per token (all layers)", [[k, _n(v)] for k, v in m["kv_cache_bytes_per_token"].items()]),
        ("Target", [[k, target_value(k, v)] for k, v in plan["target"].items()]),
        (
            "Passes",
            [[r["name"], _n(r["nodes_before"]), _n(r["nodes_after"]), _top_counters(r["stats"])] for r in plan["passes"]],
            ["pass", "nodes before", "nodes after", "counters"],
        ),
        ("Weight bytes by dtype", [[k, _n(v)] for k, v in plan["weights"]["bytes_by_dtype"].items()]),
    ]
    if "graph_cost" in plan:
        g = plan["graph_cost"]
        rows = [["model FLOPs per token", _n(g["model_flops_per_token"])],
                ["hardware FLOPs per token", _n(g["hardware_flops_per_token"])],
                ["HBM bytes per token", _n(g["bytes_per_token"])], ["tokens", _n(g["tokens"])]]
        sections.append((f"Cost of the compiled graph ({plan['mode']}, cost pass)", rows))
    if "precision_policy" in plan:
        sections.append(("Precision policy", [[k, v] for k, v in plan["precision_policy"].items()]))
    if plan["kernels"]:
        rows = [[k["name"], k["op"], k["arch"], k["num_warps"], k["num_stages"], k["shared_bytes"]] for k in plan["kernels"]]
        sections.append(("Kernels", rows, ["kernel", "op", "arch", "warps", "stages", "shared bytes"]))
    from dsv3c.cost.tables import constant_table, inference_tables, train_tables

    if "cost" in plan:
        sections += train_tables(plan)
    if "inference" in plan:
        sections += inference_tables(plan["inference"])
    if "cost_constants" in plan:
        note = (plan.get("cost") or plan.get("inference") or {}).get("calibration", "")
        sections.append(constant_table(plan["cost_constants"], note))
    parts = [f"dsv3c {plan['dsv3c_version']} — {m['name']} for {plan['target']['name']}\n"]
    for title, rows, *headers in sections:
        parts.append(f"{title}\n{tabulate(rows, headers=headers[0] if headers else (), disable_numparse=True)}\n")
    return "\n".join(parts)


def _top_counters(stats: dict, n: int = 4) -> str:
    """The first n scalar counters of a pass's stats, as 'k=v' pairs."""
    items = [(k, v) for k, v in stats.items() if isinstance(v, (int, float, str, bool))][:n]
    return ", ".join(f"{k}={v}" for k, v in items)


def write_report(plan: dict, directory: Path) -> None:
    """Write plan.json and report.txt into directory."""
    (directory / "plan.json").write_text(plan_json(plan))
    (directory / "report.txt").write_text(report_text(plan))
