"""compile_model: config → capture → passes → artifacts, the whole compile as one function."""

import copy
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

import passes
import targets
from dsv3c import __version__
from dsv3c import outdir, validate
from dsv3c.outdir import OutputError  # dsv3c.driver.OutputError: the name callers know
from dsv3c.frontend.exporter import capture, capture_blocks, check_shapes
from dsv3c.cost.constants import Constants
from dsv3c.cost.facts import analyse
from dsv3c.cost.figures import REFERENCE_SHAPES, lift_positions, model_figures
from dsv3c.cost.inference import UnitError
from dsv3c.cost.plan_cost import inference_keys, schedule_timing, train_keys
from dsv3c.ir import Plan
from dsv3c.parallel import ParallelError, plan_parallel
from dsv3c.passmgr.dumps import Dumper
from dsv3c.passmgr.pipeline import Printing, run_pipeline
from dsv3c.report import build_plan, write_report
from dsv3c.runtime.artifact import PROGRAM_DIR, save_program
from model_def import DeepseekV3, ModelConfig
from model_def.counts import parameter_counts


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


def compile_facts(cfg, tgt, mode: str, shapes: dict, figures: dict, options: dict, program):
    """The block facts the compile is priced on: the figures' capture when the shapes are the reference ones, else
    those of (a copy of) the compile's program of blocks, or of their own capture."""
    if shapes == REFERENCE_SHAPES[mode]:
        return figures["facts"][mode]
    lifted = lift_positions(cfg, shapes)
    own = copy.deepcopy(program) if program is not None and program.blocks is not None and lifted == cfg else None
    facts, _ = analyse(lifted, mode, shapes, tgt, passes.REGISTRY, options, own)
    return facts



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
    parallel: str | None = None,
    expert_load=None,
    schedule: str | None = None,
    micro_batches: int | None = None,
    cost_options: dict | None = None,
    inference: dict | None = None,
    whole_graph: bool = False,
) -> dict:
    """Compile cfg for target and mode; writes plan.json and report.txt (and kernels) to out; returns the plan.

    A straight line: target → capture (each distinct block once) → block facts → ParallelPlan (priced) → passes
    → report. whole_graph: capture and transform the whole model as one graph instead of its program of blocks
    (the same plan, slower; the reference the program of blocks is tested against).
    """
    tgt = targets.get_target(target)
    mode = mode or default_mode(tgt)
    shapes = dict(DEFAULT_SHAPES.get(mode, DEFAULT_SHAPES["train"]))
    given = {k: v for k, v in dict(batch=batch, seq=seq, kv_len=kv_len).items() if v is not None}
    shapes.update(given)
    shape_notes = validate.fit_default_shapes(cfg, mode, shapes, given)
    items = passes.parse_pipeline(pipeline) if pipeline is not None else [(n, {}) for n in passes.default_pipeline()]
    if dump_mlir is not None and not 0 <= dump_mlir < cfg.num_hidden_layers:
        raise OptionError(f"--dump-mlir layer {dump_mlir} is out of range 0..{cfg.num_hidden_layers - 1}")
    check_shapes(cfg, mode, **shapes)  # reject impossible shapes before anything is written
    out = Path(out if out is not None else f"build/{tgt.name}-{mode}")
    validate.check_compile(cfg, tgt, mode, shapes, [n for n, _ in items], kv_len, out, dump_dir)
    cost_options = cost_options or {}
    validate.check_work(cfg, tgt, mode, parallel, micro_batches, cost_options.get("global_batch"))
    sets = dict(cost_options.get("sets") or {})
    if (inference or {}).get("mtp_acceptance") is not None:
        sets["mtp_acceptance"] = inference["mtp_acceptance"]
    constants = Constants.for_target(tgt).with_overrides(sets)
    opts = {**(options or {}), "constants": constants}
    stages = {}
    t0 = time.perf_counter()
    model = DeepseekV3(cfg, device="meta", dtype=torch.bfloat16, elided=not whole_graph)
    program = (capture if whole_graph else capture_blocks)(cfg, mode, model=model, **shapes)
    stages["capture"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    figures = model_figures(cfg, tgt, passes.REGISTRY, opts, None if whole_graph else program)
    facts = compile_facts(cfg, tgt, mode, shapes, figures, opts, program)
    stages["model_figures"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        planned = plan_parallel(cfg, tgt, mode, parallel, facts=facts, constants=constants, expert_load=expert_load,
                                kind=schedule, micro_batches=micro_batches,
                                global_batch=cost_options.get("global_batch"),
                                flops_per_token=(facts.flops_per_token(main_only=True), facts.hardware_flops_per_token()))
        latent = figures["kv_cache_bytes_per_token"]["latent"]
        kv = {"main": latent, "mtp": latent // cfg.num_hidden_layers * cfg.num_nextn_predict_layers}
        priced = None if mode == "train" else inference_keys(planned, cfg, tgt, facts, constants, kv)
    except (ParallelError, UnitError) as e:
        raise OptionError(str(e)) from None
    stages["parallel_plan"] = time.perf_counter() - t0
    created = outdir.missing_dirs(out) + (outdir.missing_dirs(dump_dir) if dump_dir else [])
    staging = None
    try:
        with outdir.signals_deferred():  # a signal here would leave a staging directory nobody removes
            staging = prepare_output(out)
        ir_plan = Plan(program, tgt, options={**opts, "out": str(staging)})
        ir_plan.analyses.parallel = planned.plan
        dumper = Dumper(outdir.prepare_dump_dir(dump_dir), dump_mlir) if dump_dir else None
        if dumper:
            settings = {"mode": mode, "target": tgt.name, **{k: v for k, v in shapes.items() if v}}
            dumper.write_pipeline(passes.format_pipeline(items), settings)
        t1 = time.perf_counter()
        try:
            records = run_pipeline(ir_plan, items, passes.REGISTRY, passes.CAPTURED_OPS, dumper, printing, progress, repro)
        finally:
            if dumper:
                outdir.mark(dumper.dir, dumper.written)  # the manifest: what a later run may replace
        stages["passes"] = time.perf_counter() - t1
        plan = build_plan(__version__, parameter_counts(model), figures, ir_plan, records)
        if shape_notes:
            plan["shapes_notes"] = shape_notes
        plan["parallel"] = planned.plan.to_dict()
        plan["experts"] = planned.plan.experts_dict()
        if mode == "train":
            plan.update(train_keys(planned, constants, staging))
            if "schedule" in plan:
                plan["schedule"].update(schedule_timing(planned.evaluation))
        else:
            plan.update(priced)
        if ir_plan.analyses.call_specs is not None:
            plan["program"] = save_program(ir_plan.program, ir_plan.analyses.call_specs, staging / PROGRAM_DIR)
        write_report(plan, staging)
        with outdir.signals_deferred():
            outdir.mark(staging)
            outdir.publish(staging, out)
    except BaseException:
        with outdir.signals_deferred():
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            outdir.remove_unused(sorted(created, key=lambda p: -len(p.parts)))  # what this compile made, if unused
        raise
    plan["_stages"] = stages  # run-dependent timings for callers (bench/compile.py); not written to disk
    return plan
