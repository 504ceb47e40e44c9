"""The whole compile (`dsv3c compile --target h800x2048`) timed per stage, against a bare torch.export of the model.

    python bench/compile.py                              # train on h800x2048: deepseek-v3, then kimi-k2
    python bench/compile.py --model deepseek-v3 --mode decode --target h800x320

Per model, fresh processes: `--one compile` runs the compile as the CLI does (dsv3c.driver.compile_model with
the preset, default shapes, default pipeline, into a temporary directory; `--whole-graph` the whole-graph
path) and reports the stage seconds compile_model returns in plan['_stages'] (capture includes building the
meta model), each pass's seconds from plan.json, the import time and its peak RSS; `--one export` builds the
whole meta model and runs a bare torch.export.export with dsv3c's example inputs. ratio = seconds / bare
export seconds, from the same run. Runs on the CPU.

The compile runs twice, cold then warm: both with one fresh temporary kernel cache (DSV3C_CACHE_DIR, and
TRITON_CACHE_DIR for Triton's own cache), so the cold run compiles every distinct kernel for sm_90a (in
parallel, one worker per core) and the warm run takes them all from the cache; the table has a column each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _maxrss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_compile(model: str, target: str, mode: str | None, whole_graph: bool) -> dict:
    """The compile in this process: import seconds, stage seconds, per-pass seconds, peak RSS."""
    t0 = time.perf_counter()
    import dsv3c  # noqa: F401
    from dsv3c.driver import compile_model
    from model_def import ModelConfig

    imported = time.perf_counter() - t0
    cfg = ModelConfig.preset(model)
    compiled = []
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        plan = compile_model(cfg, target=target, mode=mode, out=Path(tmp) / "out", whole_graph=whole_graph,
                             options={"kernel_progress": lambda *a: compiled.append(a)})
        total = time.perf_counter() - t1
        on_disk = json.loads((Path(tmp) / "out" / "plan.json").read_text())
    return {
        "import": imported, "total": total, "stages": plan["_stages"], "mode": plan["mode"],
        "target": plan["target"]["name"], "shapes": plan["shapes"], "kernels": len(plan["kernels"]),
        "compiled": len(compiled),
        "passes": [(p["name"], p["seconds"], p["nodes_before"], p["nodes_after"]) for p in on_disk["passes"]],
        "peak_rss_mib": _maxrss_mib(),
    }  # fmt: skip


def one_export(model: str, mode: str) -> dict:
    """A bare torch.export of the whole meta model with dsv3c's example inputs: build and export seconds, peak RSS."""
    import torch

    import dsv3c  # noqa: F401  (registers the dsv3 ops the model calls)
    from dsv3c.driver import DEFAULT_SHAPES
    from model_def import DeepseekV3, ModelConfig

    from dsv3c.frontend.exporter import example_inputs

    cfg = ModelConfig.preset(model)
    t0 = time.perf_counter()
    model = DeepseekV3(cfg, device="meta", dtype=torch.bfloat16)
    built = time.perf_counter() - t0
    weight = model.embed_tokens.weight
    args, kwargs, _ = example_inputs(cfg, mode, **DEFAULT_SHAPES[mode], device=weight.device, dtype=weight.dtype)
    t1 = time.perf_counter()
    with torch.no_grad() if mode != "train" else torch.enable_grad():
        torch.export.export(model, args, kwargs=kwargs, strict=False)
    return {"build": built, "export": time.perf_counter() - t1, "peak_rss_mib": _maxrss_mib()}


def _fresh(*args: str, env: dict | None = None) -> tuple[dict, float]:
    """Run this script with args in a fresh interpreter: (its JSON result, wall seconds of the process)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="a preset (repeatable; default deepseek-v3 and kimi-k2)")
    parser.add_argument("--target", default="h800x2048")
    parser.add_argument("--mode", choices=["train", "prefill", "decode"], help="default: the target's default mode")
    parser.add_argument("--whole-graph", action="store_true", help="also time the whole-graph path (warm)")
    parser.add_argument("--one", choices=["compile", "export"], help="one measurement in this process (internal)")
    args = parser.parse_args()
    models = args.model or ["deepseek-v3", "kimi-k2"]
    if args.one == "compile":
        print(json.dumps(one_compile(models[0], args.target, args.mode, args.whole_graph)))
        return
    if args.one == "export":
        print(json.dumps(one_export(models[0], args.mode or "train")))
        return
    print(f"{os.cpu_count()} cores; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for model in models:
        report(model, args.target, args.mode, args.whole_graph)


def report(model: str, target: str, mode: str | None, whole_graph: bool) -> None:
    """The table of one model: cold and warm compile per stage against the bare export, and peak RSS."""
    from tabulate import tabulate

    one = ["--one", "compile", "--model", model, "--target", target, *(["--mode", mode] if mode else [])]
    caches = tempfile.mkdtemp(prefix="dsv3c-bench-cache-")
    env = {"DSV3C_CACHE_DIR": str(Path(caches) / "dsv3c"), "TRITON_CACHE_DIR": str(Path(caches) / "triton")}
    try:
        cold, cold_wall = _fresh(*one, env=env)
        c, c_wall = _fresh(*one, env=env)  # warm: every kernel from the cache
        whole = _fresh(*one, "--whole-graph", env=env) if whole_graph else None
    finally:
        shutil.rmtree(caches, ignore_errors=True)
    e, _ = _fresh("--one", "export", "--model", model, "--mode", c["mode"])
    bare = e["build"] + e["export"]

    def rows_of(r: dict, wall: float) -> list[tuple[str, float]]:
        st = r["stages"]
        rows = [("import dsv3c", r["import"]), ("capture (model build + export + lift)", st["capture"]),
                ("model figures (3 modes' block facts)", st["model_figures"]),
                ("parallel plan (layout search, pricing)", st["parallel_plan"])]
        rows += [(f"- pass {i:02d} {name} ({before} -> {after} nodes)", s)
                 for i, (name, s, before, after) in enumerate(r["passes"], 1)]  # fmt: skip
        rows += [("passes (incl. verification)", st["passes"]),
                 ("artifacts and the rest", r["total"] - sum(st.values())), ("compile_model total", r["total"]),
                 ("process wall (fresh interpreter)", wall)]  # fmt: skip
        return rows

    runs = [rows_of(cold, cold_wall), rows_of(c, c_wall)] + ([rows_of(*whole)] if whole else [])
    table = [[label, *(f"{r[i][1]:.2f}" for r in runs), f"{runs[1][i][1] / bare:.2f}"]
             for i, (label, _) in enumerate(runs[0])]
    table.append(["kernels compiled (sm_90a)", str(cold["compiled"]), str(c["compiled"]),
                  *([str(whole[0]["compiled"])] if whole else []), ""])
    table.append(["peak RSS MiB", f"{cold['peak_rss_mib']:.0f}", f"{c['peak_rss_mib']:.0f}",
                  *([f"{whole[0]['peak_rss_mib']:.0f}"] if whole else []), f"{c['peak_rss_mib'] / e['peak_rss_mib']:.2f}"])
    table.append(["bare torch.export (meta model build + export)", "", f"{bare:.2f}", *([""] if whole else []), "1.00"])
    print(f"\ndsv3c compile --model {model} --target {c['target']} (mode {c['mode']}, {json.dumps(c['shapes'])}): "
          f"{len(c['passes'])} passes, {c['kernels']} kernels")  # fmt: skip
    headers = ["stage", "cold s", "warm s", *(["whole graph s"] if whole else []), "warm x bare export"]
    print(tabulate(table, headers=headers, disable_numparse=True))
    print(f"bare export: {e['export']:.2f} s after a {e['build']:.2f} s model build, peak RSS {e['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
