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
from dsv3c import outdir, validate
from dsv3c.outdir import OutputError  # dsv3c.driver.OutputError: the name callers know
from dsv3c.frontend.exporter import capture, check_shapes
from dsv3c.cost.figures import model_figures
from dsv3c.ir import Plan
from dsv3c.layout import choose_layout
from dsv3c.passmgr.dumps import Dumper
from dsv3c.passmgr.pipeline import Printing, run_pipeline
from dsv3c.cost import plan_cost
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


def _with_schedule_options(items: list, mode: str, kind: str | None, micro_batches: int | None) -> list:
    """The pass list with --schedule/--micro-batches as pipeline_partition's options (so pipeline.txt replays them)."""
    wanted = {k: v for k, v in (("kind", kind), ("micro_batches", micro_batches)) if v is not None}
    if not wanted:
        return items
    if mode != "train":
        raise OptionError("--schedule and --micro-batches apply to training (--mode train) only")
    if not any(name == "pipeline_partition" for name, _ in items):
        raise OptionError("--schedule and --micro-batches need the pipeline_partition pass in --passes")
    return [(n, {**o, **wanted} if n == "pipeline_partition" else o) for n, o in items]


def check_schedule(cfg, mode: str, pp: int, items: list) -> None:
    """Reject, before any work, a pipeline schedule the mesh and model cannot run (ScheduleError)."""
    from dsv3c.schedules import ScheduleError, validate

    opts = next((o for n, o in items if n == "pipeline_partition"), None)
    if opts is None or mode != "train":
        return
    pp = opts.get("pp", pp)
    kind = opts.get("kind", "dualpipe" if pp > 1 and pp % 2 == 0 else "1f1b")
    validate(kind, pp, opts.get("micro_batches", 2 * pp))
    stages = 2 * pp if kind == "dualpipev" else pp
    if stages > cfg.num_hidden_layers + 2:
        raise ScheduleError(f"{stages} pipeline stages for {cfg.num_hidden_layers} layers plus embedding and head")


def _cost_parallel(mesh):
    """The layout the cost model evaluates: the compiled mesh's degrees."""
    return {"pp": mesh.pp, "ep": mesh.ep, "dp": mesh.dp, "tp": mesh.tp}


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
    parallel: str | None = None,
    expert_load=None,
    schedule: str | None = None,
    micro_batches: int | None = None,
    cost_options: dict | None = None,
    inference: dict | None = None,
) -> dict:
    """Compile cfg for target and mode; writes plan.json and report.txt (and kernels) to out; returns the plan."""
    tgt = targets.get_target(target)
    mode = mode or default_mode(tgt)
    shapes = dict(DEFAULT_SHAPES.get(mode, DEFAULT_SHAPES["train"]))
    given = {k: v for k, v in dict(batch=batch, seq=seq, kv_len=kv_len).items() if v is not None}
    shapes.update(given)
    shape_notes = validate.fit_default_shapes(cfg, mode, shapes, given)
    items = passes.parse_pipeline(pipeline) if pipeline is not None else [(n, {}) for n in passes.default_pipeline()]
    items = _with_schedule_options(items, mode, schedule, micro_batches)
    if dump_mlir is not None and not 0 <= dump_mlir < cfg.num_hidden_layers:
        raise OptionError(f"--dump-mlir layer {dump_mlir} is out of range 0..{cfg.num_hidden_layers - 1}")
    check_shapes(cfg, mode, **shapes)  # reject impossible shapes before anything is written
    out = Path(out if out is not None else f"build/{tgt.name}-{mode}")
    validate.check_compile(cfg, tgt, mode, shapes, [n for n, _ in items], kv_len, out, dump_dir)
    validate.check_work(cfg, tgt, mode, parallel, micro_batches, (cost_options or {}).get("global_batch"))
    layout = None
    if parallel not in (None, "auto"):  # impossible degrees fail before any capture
        layout = choose_layout(cfg, tgt, mode, parallel, expert_load)
    extra = inference_keys(cfg, tgt, mode, shapes, inference)  # and impossible units or batches
    stages = {}
    t2 = time.perf_counter()
    figures = model_figures(cfg, tgt, passes.REGISTRY)
    stages["model_figures"] = time.perf_counter() - t2
    cost_opts = {**(cost_options or {}), "policy": (options or {}).get("precision"), "schedule": schedule,
                 "micro_batches": micro_batches}
    if mode == "train" and parallel in (None, "auto"):  # the fastest layout that fits decides the mesh
        t3 = time.perf_counter()
        chosen, cost_opts["search"] = plan_cost.fastest_layout(cfg, tgt, figures, cost_opts)
        stages["layout_search"] = time.perf_counter() - t3
        parallel, cost_opts["chosen_by"] = f"pp={chosen.pp},ep={chosen.ep}", "auto"
        cost_opts["schedule"], cost_opts["micro_batches"] = chosen.kind, chosen.micro_batches
        if any(name == "pipeline_partition" for name, _ in items):
            items = _with_schedule_options(items, mode, chosen.kind, chosen.micro_batches)
    layout = layout or choose_layout(cfg, tgt, mode, parallel, expert_load)
    if mode == "train" and cost_opts.get("micro_batches") is None:  # given degrees: the step's micro-batches
        cost_opts["micro_batches"] = plan_cost.micro_batches_per_step(cost_opts, layout.mesh.dp)
        if any(name == "pipeline_partition" for name, _ in items):
            items = _with_schedule_options(items, mode, None, cost_opts["micro_batches"])
    check_schedule(cfg, mode, layout.mesh.pp, items)
    created = outdir.missing_dirs(out) + (outdir.missing_dirs(dump_dir) if dump_dir else [])
    staging = dumper = None
    try:
        with outdir.signals_deferred():  # a signal here would leave a staging directory nobody removes
            staging = prepare_output(out)
        t0 = time.perf_counter()
        model = DeepseekV3(cfg, device="meta", dtype=torch.bfloat16)
        program = capture(cfg, mode, model=model, **shapes)
        stages["capture"] = time.perf_counter() - t0
        ir_plan = Plan(program, tgt, options={**(options or {}), "out": str(staging), "placement": layout.tables})
        ir_plan.analyses.mesh = layout.mesh
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
        plan["parallel"] = layout.mesh.to_dict()
        plan["experts"] = layout.placement_dict(cfg)
        if mode == "train":
            t3 = time.perf_counter()
            plan.update(plan_cost.cost_plan(cfg, tgt, figures, {**cost_opts, "out": staging,
                                                                 "parallel": _cost_parallel(layout.mesh)}))
            stages["cost_model"] = time.perf_counter() - t3
        if extra:
            plan.setdefault("parallel", extra["parallel"])  # unless the compile wrote its own mesh
            plan["inference"] = extra["inference"]
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
