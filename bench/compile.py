"""The whole 671B compile (`dsv3c compile --target h800x2048`) timed per stage, against a bare torch.export.

    python bench/compile.py                              # train on h800x2048
    python bench/compile.py --mode decode --target h800x320

Two fresh processes: `--one compile` runs the compile as the CLI does (dsv3c.driver.compile_model with the
deepseek-v3 preset, default shapes, default pipeline, into a temporary directory) and reports the stage
seconds compile_model returns in plan['_stages'] (capture includes building the meta model), each pass's
seconds from plan.json, the import time and its peak RSS; `--one export` builds the same meta model and
runs a bare torch.export.export with dsv3c's example inputs. ratio = seconds / bare export seconds, from
the same run. Runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
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
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        plan = compile_model(cfg, target=target, mode=mode, out=Path(tmp) / "out")
        total = time.perf_counter() - t1
        on_disk = json.loads((Path(tmp) / "out" / "plan.json").read_text())
    return {
        "import": imported, "total": total, "stages": plan["_stages"], "mode": plan["mode"],
        "target": plan["target"]["name"], "shapes": plan["shapes"], "kernels": len(plan["kernels"]),
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
        from dsv3c.exporter import example_inputs
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


def _fresh(*args: str) -> tuple[dict, float]:
    """Run this script with args in a fresh interpreter: (its JSON result, wall seconds of the process)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
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

    c, c_wall = _fresh("--one", "compile", "--target", args.target, *(["--mode", args.mode] if args.mode else []))
    e, _ = _fresh("--one", "export", "--mode", c["mode"])
    bare = e["build"] + e["export"]
    st = c["stages"]
    rows = [["import dsv3c", c["import"], ""], ["capture (model build + export + lift)", st["capture"], ""]]
    rows += [[f"- pass {i:02d} {name} ({before} -> {after} nodes)", s, ""]
             for i, (name, s, before, after) in enumerate(c["passes"], 1)]  # fmt: skip
    rows += [["passes (incl. verification)", st["passes"], ""],
             ["model figures (3 reduced captures)", st["model_figures"], ""]]
    other = c["total"] - sum(st.values())
    rows += [["artifacts and the rest", other, ""], ["compile_model total", c["total"], ""],
             ["process wall (fresh interpreter)", c_wall, ""],
             ["bare torch.export (meta model build + export)", bare, ""]]  # fmt: skip
    table = [[label, f"{s:.2f}", f"{s / bare:.2f}"] for label, s, _ in rows]
    print(f"dsv3c compile --target {c['target']} (mode {c['mode']}, {json.dumps(c['shapes'])}): "
          f"{len(c['passes'])} passes, {c['kernels']} kernels")  # fmt: skip
    print(tabulate(table, headers=["stage", "seconds", "x bare export"], disable_numparse=True))
    print(f"\npeak RSS: compile {c['peak_rss_mib']:.0f} MiB, bare export {e['peak_rss_mib']:.0f} MiB "
          f"(ratio {c['peak_rss_mib'] / e['peak_rss_mib']:.2f}); bare export alone {e['export']:.2f} s "
          f"after a {e['build']:.2f} s model build")  # fmt: skip


if __name__ == "__main__":
    main()
