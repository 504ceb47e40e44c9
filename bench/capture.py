"""Capture cost of the 671B model (MTP included): dsv3c.capture against a bare torch.export, per mode.

    python bench/capture.py                  # train, prefill, decode; one fresh process per measurement
    python bench/capture.py --modes decode --repeat 3

Every measurement runs in its own process (`--one MODE KIND`), so its peak RSS (getrusage ru_maxrss)
is its own. Both kinds build the same BF16 model on 'meta' first (not timed) and call with the inputs of
dsv3c's exporter.example_inputs: KIND `dsv3c` times dsv3c.capture(cfg, mode, ..., model=model) (export +
lifting to a Program), KIND `export` times torch.export.export(model, args, kwargs, strict=False) under the
same grad mode. ratio = dsv3c seconds / export seconds, from the same run. Runs on the CPU (no weights).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SHAPES = {
    "train": {"batch": 1, "seq": 4096, "kv_len": 0},
    "prefill": {"batch": 1, "seq": 4096, "kv_len": 0},
    "decode": {"batch": 1, "seq": 1, "kv_len": 4096},
}
KINDS = ("dsv3c", "export")


def _maxrss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(mode: str, kind: str) -> dict:
    """One measurement in this process: seconds of the capture call, peak RSS before it and after it."""
    t_start = time.perf_counter()
    import torch

    import dsv3c
    from model_def import DeepseekV3, ModelConfig

    try:
        from dsv3c.frontend.exporter import example_inputs
    except ImportError:  # older layout
        from dsv3c.capture import example_inputs

    cfg = ModelConfig.preset("deepseek-v3")
    shapes = SHAPES[mode]
    model = DeepseekV3(cfg, device="meta", dtype=torch.bfloat16)
    setup = time.perf_counter() - t_start
    rss_before = _maxrss_mib()
    t0 = time.perf_counter()
    if kind == "dsv3c":
        program = dsv3c.capture(cfg, mode, model=model, **shapes)
        nodes = len(program.graph.nodes)
    else:
        weight = model.embed_tokens.weight
        args, kwargs, _ = example_inputs(cfg, mode, **shapes, device=weight.device, dtype=weight.dtype)
        with torch.no_grad() if mode != "train" else torch.enable_grad():
            ep = torch.export.export(model, args, kwargs=kwargs, strict=False)
        nodes = len(ep.graph.nodes)
    seconds = time.perf_counter() - t0
    return {"mode": mode, "kind": kind, "seconds": seconds, "setup_seconds": setup, "nodes": nodes,
            "rss_before_mib": rss_before, "peak_rss_mib": _maxrss_mib()}  # fmt: skip


def measure(mode: str, kind: str) -> dict:
    """Run `--one mode kind` in a fresh interpreter and return its JSON result."""
    proc = subprocess.run([sys.executable, __file__, "--one", mode, kind], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"--one {mode} {kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=2, metavar=("MODE", "KIND"), help="one measurement in this process (internal)")
    parser.add_argument("--modes", default=",".join(SHAPES), help="comma-separated modes (default: all three)")
    parser.add_argument("--repeat", type=int, default=1, help="fresh processes per cell; the fastest is shown")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return

    from tabulate import tabulate

    rows = []
    for mode in args.modes.split(","):
        best = {}
        for kind in KINDS:
            runs = [measure(mode, kind) for _ in range(args.repeat)]
            best[kind] = min(runs, key=lambda r: r["seconds"])
            best[kind]["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
        d, e = best["dsv3c"], best["export"]
        shape = " ".join(f"{k}={v}" for k, v in SHAPES[mode].items())
        rows.append([mode, shape, d["nodes"], f"{d['seconds']:.2f}", f"{e['seconds']:.2f}",
                     f"{d['seconds'] / e['seconds']:.2f}", f"{d['peak_rss_mib']:.0f}", f"{e['peak_rss_mib']:.0f}",
                     f"{d['peak_rss_mib'] / e['peak_rss_mib']:.2f}", f"{d['rss_before_mib']:.0f}"])  # fmt: skip
    print(f"671B capture (MTP included), {args.repeat} fresh process(es) per cell")
    print(tabulate(rows, headers=["mode", "shapes", "nodes", "dsv3c s", "export s", "ratio", "dsv3c MiB",
                                  "export MiB", "RSS ratio", "MiB before"], disable_numparse=True))  # fmt: skip


if __name__ == "__main__":
    main()
