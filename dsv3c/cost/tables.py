"""report.txt's cost sections from plan.json: the training layout, step split, memory, communication, chunks,
best layouts; the inference unit, its latency split, KV capacity, communication, MTP; the cost constants."""

from __future__ import annotations

GB = 1e9


def _ms(s: float) -> str:
    return f"{1e3 * s:.2f}"


def _us(s: float) -> str:
    return f"{s * 1e6:,.1f} us" if s < 1e-2 else f"{s * 1e3:,.2f} ms"


def _range(r, fmt) -> str:
    return f"{fmt(r[0])} .. {fmt(r[1])}"


def _split_rows(split: dict, fmt) -> list:
    return [[k, fmt(v["value"]), _range(v["range"], fmt)] for k, v in split.items()]


def train_tables(plan: dict) -> list[tuple]:
    """report.txt sections (title, rows, headers) of a training plan."""
    c, mem, comm = plan["cost"], plan["memory_per_gpu"], plan["communication"]
    lay = c["layout"]
    sections = [("Training layout (" + c["parallel"] + ")",
                 [[k, lay[k]] for k in ("label", "pp", "ep", "dp", "schedule", "micro_batches", "zero")] +
                 [["micro-batch tokens", c["micro_batch_tokens"]],
                  ["stages (units)", " | ".join(f"{len(s['units'])}" for s in c["stage_seconds"])]])]
    r = c["ranges"]
    s = lambda x: f"{x:.3f} s"  # noqa: E731
    rows = [["step", s(c["step_seconds"]), _range(r["step_seconds"], s)],
            ["tokens/s per GPU", f"{c['tokens_per_gpu_per_second']:,.0f}",
             _range(r["tokens_per_gpu_per_second"], lambda x: f"{x:,.0f}")],
            ["MFU", f"{100 * c['mfu']:.1f} %", _range(r["mfu"], lambda x: f"{100 * x:.1f} %")],
            ["HFU", f"{100 * c['hfu']:.1f} %", ""],
            ["GPU-hours per trillion tokens", f"{c['gpu_hours_per_trillion_tokens']:,.0f}",
             _range(r["gpu_hours_per_trillion_tokens"], lambda x: f"{x:,.0f}")],
            ["tokens per step", f"{c['tokens_per_step']:,}", ""],
            ["model TFLOPs per token (main, 3x fwd)", f"{c['flops_per_token_main'] / 1e12:.4f}", ""]]
    sections.append(("Step cost (low .. high: every constant at the fast / slow end of its range)", rows,
                     ["figure", "value", "range"]))
    sections.append((f"Step split (seconds; pipeline rank {c['step_split_rank']}, the busiest, then DP and optimizer)",
                     _split_rows(c["step_split_seconds"], s), ["part", "seconds", "range"]))
    b = c["bubble"]
    sections.append(("Pipeline bubble", [["largest per-rank bubble", f"{b['largest_seconds']:.3f} s (rank {b['rank']})"],
                                         ["schedule formula", f"{b['formula']} = {b['formula_seconds']:.3f} s"],
                                         ["why", b["explanation"]]]))
    rows = [[k, _ms(v["F"]), _ms(v["B"]), _ms(v["I"]), _ms(v["W"]), _ms(v["FB"])] for k, v in c["chunk_seconds"].items()]
    sections.append((f"Chunk times per unit ({c['micro_batch_tokens']}-token micro-batch, ms)", rows,
                     ["unit", "F", "B", "I", "W", "F&B"]))
    rows = [[i, len(st["units"]), ",".join(st["units"][:1] + st["units"][-1:]), _ms(st["F"]), _ms(st["B"]),
             _ms(st["W"])] for i, st in enumerate(c["stage_seconds"])]
    sections.append(("Stages (ms per micro-batch)", rows, ["stage", "units", "first,last", "F", "B", "W"]))
    rows = []
    for i, rr in enumerate(mem["ranks"]):
        rows.append([i, ",".join(map(str, rr["stages"])), rr["peak_micro_batches"]] +
                    [f"{rr[k] / GB:.2f}" for k in ("weights", "gradients", "master_weights", "optimizer", "activations",
                                                    "fp8_cache", "comm_buffers", "workspace", "total")] +
                    ["yes" if rr["fits"] else "NO: " + ", ".join(rr["overflow"]["largest"])])
    sections.append((f"Memory per GPU (GB; capacity {mem['capacity'] / GB:.2f} GB)", rows,
                     ["rank", "stages", "peak mb", "weights", "grads", "master", "optim", "activ", "fp8 cache",
                      "comm buf", "workspace", "total", "fits"]))
    ep = comm["ep"]
    rows = [[f"EP {k} (per MoE layer, micro-batch)", f"{v['ib_bytes'] / GB:.3f}", f"{v['nvlink_bytes'] / GB:.3f}",
             _ms(v["seconds"]), _ms(v["latency_seconds"])] for k, v in ep["per_layer_per_micro_batch"].items()]
    st = ep["per_step_per_gpu"]
    rows.append([f"EP per step per GPU ({st['moe_layers']} MoE layers x {st['micro_batches']} mb)",
                 f"{st['ib_bytes'] / GB:.1f}", f"{st['nvlink_bytes'] / GB:.1f}", _ms(st["seconds"]), ""])
    pp = comm["pp"]
    rows.append([f"PP send per micro-batch ({pp['per_micro_batch']['link']})",
                 f"{pp['per_micro_batch']['bytes'] / GB:.3f}", "", _ms(pp["per_micro_batch"]["seconds"]), ""])
    dp = comm["dp"]["per_step_per_gpu"]
    rows.append(["DP ZeRO-1 reduce-scatter + all-gather per step",
                 f"{(dp['reduce_scatter_bytes'] + dp['all_gather_bytes']) / GB:.2f}", "", _ms(dp["seconds"]),
                 _ms(dp["latency_seconds"])])
    sections.append(("Communication (GB; ms, of which latency)", rows, ["transfer", "GB (IB)", "NVLink GB", "ms",
                                                                        "latency ms"]))
    lays = plan.get("layouts", {})
    rows = [[x["label"], f"{x['step_seconds']:.2f}", f"{100 * x['mfu']:.1f}", f"{x['gpu_hours_per_trillion_tokens']:,.0f}",
             f"{x['peak_gb']:.1f}"] for x in lays.get("best", [])]
    sections.append((f"Best layouts ({lays.get('candidates', 0)} candidates: {lays.get('rejected', 0)} do not fit, "
                     f"{lays.get('pruned', 0)} cannot beat these by a lower bound of their step, "
                     f"{lays.get('fitting', 0)} fit)", rows,
                     ["layout", "step s", "MFU %", "GPU-h/T tokens", "peak GB"]))
    return sections


def inference_tables(inf: dict) -> list[tuple]:
    """report.txt sections (title, rows[, headers]) of plan.json's `inference`."""
    u, cap = inf["unit"], inf["kv_capacity"]
    secs = [("Inference unit", [["layout", u["layout"]], ["GPUs / nodes", f"{u['gpus']} / {u['nodes']}"],
                                ["micro-batches (overlapped)", u["micro_batches"]]])]
    r = inf["ranges"]
    if "ttft_seconds" in inf:
        rows = [["prompt", f"{inf['prompt_tokens']:,} tokens x {inf['prompts_per_dp_group']} per DP group", ""],
                ["time to first token", _us(inf["ttft_seconds"]), _range(r["ttft_seconds"], _us)],
                ["prefill tokens/s per GPU", f"{inf['tokens_per_gpu_per_second']:,.0f}",
                 _range(r["tokens_per_gpu_per_second"], lambda x: f"{x:,.0f}")],
                ["prefill tokens/s per node", f"{inf['tokens_per_node_per_second']:,.0f}", ""]]
        secs.append(("Prefill (low .. high: constants at the fast / slow end of their ranges)", rows,
                     ["figure", "value", "range"]))
        secs.append(("Time to first token split", _split_rows(inf["split_seconds"], _us), ["part", "time", "range"]))
    else:
        rows = [["batch per GPU / context", f"{inf['batch_per_gpu']:g} / {inf['context']:,} tokens", ""],
                ["TPOT", _us(inf["tpot_seconds"]), _range(r["tpot_seconds"], _us)],
                ["tokens/s per GPU", f"{inf['tokens_per_gpu_per_second']:,.0f}",
                 _range(r["tokens_per_gpu_per_second"], lambda x: f"{x:,.0f}")],
                ["tokens/s per node", f"{inf['tokens_per_node_per_second']:,.0f}", ""]]
        secs.append(("Decode (low .. high: constants at the fast / slow end of their ranges)", rows,
                     ["figure", "value", "range"]))
        secs.append(("Decode step split", _split_rows(inf["split_seconds"], _us), ["part", "time", "range"]))
        if "mtp" in inf:
            t = inf["mtp"]
            secs.append(("MTP speculative decoding", [
                ["acceptance", f"{t['acceptance']:g} ({t['acceptance_source']})"],
                ["tokens per step", f"{t['tokens_per_step']:g}"], ["step cost ratio", f"{t['step_cost_ratio']:.3f}"],
                ["TPOT with MTP", f"{_us(t['tpot_seconds'])} ({_range(t['ranges']['tpot_seconds'], _us)})"],
                ["tokens/s per GPU with MTP", f"{t['tokens_per_gpu_per_second']:,.0f}"],
                ["speed-up", f"{t['speedup']:.3f}x"]]))
    secs.append(("Time per layer (both micro-batches)",
                 [[k, _us(v["compute"]), _us(v["memory"]), _us(v["comm"] + v["latency"]), _us(v["seconds"]),
                   _us(v["communication_side_seconds"])] for k, v in inf["per_layer"].items()],
                 ["block", "compute", "memory", "exposed comm", "total", "comm alone"]))
    rows = []
    for kind, transfers in inf["communication_per_micro_batch"].items():
        for name, v in transfers.items():
            nbytes = v.get("ib_bytes", 0) + v.get("nvlink_bytes", 0) + v.get("all_gather_bytes", 0) + \
                v.get("reduce_scatter_bytes", 0)
            rows.append([kind, name, f"{nbytes / 1e6:,.2f}", _us(v["seconds"]), _us(v["latency_seconds"])])
    secs.append(("Communication per micro-batch per block per GPU", rows,
                 ["block", "transfer", "MB", "time", "of which latency"]))
    secs.append(("KV cache capacity per GPU", [
        ["HBM", f"{cap['hbm_bytes'] / 1e9:,.2f} GB"], ["weights", f"{cap['weight_bytes'] / 1e9:,.2f} GB"],
        ["buffers + reserved", f"{(cap['buffer_bytes'] + cap['reserved_bytes']) / 1e9:,.2f} GB"],
        ["left for the cache", f"{cap['kv_free_bytes'] / 1e9:,.2f} GB"],
        ["latent cache per token", f"{cap['kv_bytes_per_token']:,} B"], ["layout", cap["latent_cache"]],
        ["tokens per GPU", f"{cap['tokens_per_gpu']:,}"],
        [f"sequences of {cap['context']:,} per DP group", f"{cap['sequences_per_dp_group']:,}"],
        [f"sequences of {cap['context']:,} per GPU", f"{cap['sequences_per_gpu']:g}"]]))
    return secs


def constant_table(constants: dict, note: str = "") -> tuple:
    """The cost constants section: every constant with its value, unit, source, range and citation."""
    rows = [[k, f"{v['value']:g}", v["unit"], v["source"],
             f"{v['range'][0]:g} .. {v['range'][1]:g}" if "range" in v else "", v["note"]] for k, v in constants.items()]
    return (f"Cost constants (--set name=value){'; ' + note if note else ''}", rows,
            ["name", "value", "unit", "source", "range", "note"])
