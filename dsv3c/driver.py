"""compile_model: config → capture → passes → artifacts, the whole compile as one function."""

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

import passes
import targets
from dsv3c import __version__
from dsv3c.frontend.exporter import capture, check_shapes
from dsv3c.cost.figures import model_figures
from dsv3c.ir import Plan
from dsv3c.passmgr.dumps import Dumper
from dsv3c.passmgr.pipeline import Printing, run_pipeline
from dsv3c.report import build_plan, write_report
from dsv3c.runtime.artifact import PROGRAM_DIR, save_program
from model_def import DeepseekV3, ModelConfig
from model_def.counts import parameter_counts


class OutputError(ValueError):
    """The output directory cannot be written."""


class OptionError(ValueError):
    """A compile option outside what the model allows."""


DEFAULT_SHAPES = {
    "train": {"batch": 1, "seq": 4096, "kv_len": 0},
    "prefill": {"batch": 1, "seq": 4096, "kv_len": 0},
    "decode": {"batch": 1, "seq": 1, "kv_len": 4096},
}


def default_mode(target: targets.Target) -> str:
    """Training layout for clusters of 256 GPUs or more, else prefill."""
    return "train" if target.gpus >= 256 else "prefill"


def missing_parents(out: Path) -> list[Path]:
    """The ancestors of out that do not exist yet, innermost first."""
    return [p for p in out.absolute().parents if not p.exists()]


def prepare_output(out: Path) -> Path:
    """A fresh staging directory beside out (checked writable now, before any work)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists() and not out.is_dir():
            raise OutputError(f"output path {out} exists and is not a directory")
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary directory
        return staging
    except OSError as e:
        raise OutputError(f"cannot write output directory {out}: {e.strerror or e}") from None


def publish(staging: Path, out: Path) -> None:
    """Move the finished staging directory to out atomically, replacing an older out."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def inference_keys(cfg, tgt, mode: str, shapes: dict, inference: dict | None) -> dict:
    """prefill/decode: the deployment unit (`parallel`) and its figures (`inference`); {} for train."""
    from dsv3c.cost.inference import UnitError, inference_plan

    if mode not in ("prefill", "decode"):
        return {}
    try:
        return inference_plan(cfg, tgt, mode, shapes, inference)
    except UnitError as e:
        raise OptionError(str(e)) from None


def compile_model(
    cfg: ModelConfig,
    target: str,
    mode: str | None = None,
    out=None,
    batch: int | None = None,
    seq: int | None = None,
    kv_len: int | None = None,
    pipeline: str | None = None,
    dump_dir=None,
    dump_mlir: int | None = None,
    printing: Printing | None = None,
    progress=None,
    repro: str = "",
    options: dict | None = None,
    inference: dict | None = None,
) -> dict:
    """Compile cfg for target and mode; writes plan.json and report.txt (and kernels) to out; returns the plan."""
    tgt = targets.get_target(target)
    mode = mode or default_mode(tgt)
    shapes = dict(DEFAULT_SHAPES.get(mode, DEFAULT_SHAPES["train"]))
    shapes.update({k: v for k, v in dict(batch=batch, seq=seq, kv_len=kv_len).items() if v is not None})
    items = passes.parse_pipeline(pipeline) if pipeline is not None else [(n, {}) for n in passes.default_pipeline()]
    if dump_mlir is not None and not 0 <= dump_mlir < cfg.num_hidden_layers:
        raise OptionError(f"--dump-mlir layer {dump_mlir} is out of range 0..{cfg.num_hidden_layers - 1}")
    check_shapes(cfg, mode, **shapes)  # reject impossible shapes before anything is written
    extra = inference_keys(cfg, tgt, mode, shapes, inference)  # and impossible units or batches
    out = Path(out or f"build/{tgt.name}-{mode}")
    created = missing_parents(out)
    staging = prepare_output(out)
    try:
        stages = {}
        t0 = time.perf_counter()
        model = DeepseekV3(cfg, device="meta", dtype=torch.bfloat16)
        program = capture(cfg, mode, model=model, **shapes)
        stages["capture"] = time.perf_counter() - t0
        ir_plan = Plan(program, tgt, options={**(options or {}), "out": str(staging)})
        dumper = Dumper(dump_dir, dump_mlir) if dump_dir else None
        if dumper:
            settings = {"mode": mode, "target": tgt.name, **{k: v for k, v in shapes.items() if v}}
            dumper.write_pipeline(passes.format_pipeline(items), settings)
        t1 = time.perf_counter()
        records = run_pipeline(ir_plan, items, passes.REGISTRY, passes.CAPTURED_OPS, dumper, printing, progress, repro)
        stages["passes"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        figures = model_figures(cfg, tgt, passes.REGISTRY)
        stages["model_figures"] = time.perf_counter() - t2
        plan = build_plan(__version__, parameter_counts(model), figures, ir_plan, records)
        if extra:
            plan.setdefault("parallel", extra["parallel"])  # unless the compile wrote its own mesh
            plan["inference"] = extra["inference"]
        if ir_plan.analyses.call_specs is not None:
            plan["program"] = save_program(ir_plan.program, ir_plan.analyses.call_specs, staging / PROGRAM_DIR)
        write_report(plan, staging)
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in created:  # directories this compile made for its output, innermost first
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
        raise
    plan["_stages"] = stages  # run-dependent timings for callers (bench/compile.py); not written to disk
    return plan
