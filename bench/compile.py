"""The whole 671B compile (`dsv3c compile --target h800x2048`) timed per stage, against a bare torch.export.

    python bench/compile.py                              # train on h800x2048
    python bench/compile.py --mode decode --target h800x320

Two fresh processes: `--one compile` runs the compile as the CLI does (dsv3c.driver.compile_model with the
deepseek-v3 preset, default shapes, default pipeline, into a temporary directory) and reports the stage
seconds compile_model returns in plan['_stages'] (capture includes building the meta model), each pass's
seconds from plan.json, the import time and its peak RSS; `--one export` builds the same meta model and
runs a bare torch.export.export with dsv3c's example inputs. ratio = seconds / bare export seconds, from
the same run. Runs on the CPU.

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


def one_compile(target: str, mode: str | None) -> dict:
    """The compile in this process: import seconds, stage seconds, per-pass seconds, peak RSS."""
    t0 = time.perf_counter()
    import dsv3c  # noqa: F401
    from dsv3c.driver import compile_model
    from model_def import ModelConfig

    imported = time.perf_counter() - t0
    cfg = ModelConfig.preset("deepseek-v3")
    compiled = []
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        plan = compile_model(cfg, target=target, mode=mode, out=Path(tmp) / "out",
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


def one_export(mode: str) -> dict:
    """A bare torch.export of the meta model with dsv3c's example inputs: build and export seconds, peak RSS."""
    import torch

    import dsv3c  # noqa: F401  (registers the dsv3 ops the model calls)
    from dsv3c.driver import DEFAULT_SHAPES
    from model_def import DeepseekV3, ModelConfig

    try:
        from dsv3c.frontend.exporter import example_inputs
    except ImportError:  # older layout
        from dsv3c.capture import example_inputs

    cfg = ModelConfig.preset("deepseek-v3")
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
    parser.add_argument("--target", default="h800x2048")
    parser.add_argument("--mode", choices=["train", "prefill", "decode"], help="default: the target's default mode")
    parser.add_argument("--one", choices=["compile", "export"], help="one measurement in this process (internal)")
    args = parser.parse_args()
    if args.one == "compile":
        print(json.dumps(one_compile(args.target, args.mode)))
        return
    if args.one == "export":
        print(json.dumps(one_export(args.mode or "train")))
        return

    from tabulate import tabulate

    one = ["--one", "compile", "--target", args.target, *(["--mode", args.mode] if args.mode else [])]
    caches = tempfile.mkdtemp(prefix="dsv3c-bench-cache-")
    env = {"DSV3C_CACHE_DIR": str(Path(caches) / "dsv3c"), "TRITON_CACHE_DIR": str(Path(caches) / "triton")}
    try:
        cold, cold_wall = _fresh(*one, env=env)
        c, c_wall = _fresh(*one, env=env)  # warm: every kernel from the cache
    finally:
        shutil.rmtree(caches, ignore_errors=True)
    e, _ = _fresh("--one", "export", "--mode", c["mode"])
    bare = e["build"] + e["export"]

    def rows_of(r: dict, wall: float) -> list[tuple[str, float]]:
        st = r["stages"]
        rows = [("import dsv3c", r["import"]), ("capture (model build + export + lift)", st["capture"])]
        rows += [(f"- pass {i:02d} {name} ({before} -> {after} nodes)", s)
                 for i, (name, s, before, after) in enumerate(r["passes"], 1)]  # fmt: skip
        rows += [("passes (incl. verification)", st["passes"]),
                 ("model figures (3 reduced captures)", st["model_figures"])]
        rows += [("artifacts and the rest", r["total"] - sum(st.values())), ("compile_model total", r["total"]),
                 ("process wall (fresh interpreter)", wall)]  # fmt: skip
        return rows

    table = [[label, f"{cs:.2f}", f"{ws:.2f}", f"{ws / bare:.2f}"]
             for (label, cs), (_, ws) in zip(rows_of(cold, cold_wall), rows_of(c, c_wall), strict=True)]
    table.append(["kernels compiled (sm_90a)", str(cold["compiled"]), str(c["compiled"]), ""])
    table.append(["bare torch.export (meta model build + export)", "", f"{bare:.2f}", "1.00"])
    print(f"dsv3c compile --target {c['target']} (mode {c['mode']}, {json.dumps(c['shapes'])}): "
          f"{len(c['passes'])} passes, {c['kernels']} kernels")  # fmt: skip
    print(tabulate(table, headers=["stage", "cold s", "warm s", "warm x bare export"], disable_numparse=True))
    print(f"\npeak RSS: compile {c['peak_rss_mib']:.0f} MiB, bare export {e['peak_rss_mib']:.0f} MiB "
          f"(ratio {c['peak_rss_mib'] / e['peak_rss_mib']:.2f}); bare export alone {e['export']:.2f} s "
          f"after a {e['build']:.2f} s model build")  # fmt: skip


if __name__ == "__main__":
    main()
