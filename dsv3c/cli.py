"""The dsv3c command line: compile, targets, passes, inspect, run, schedule."""

import argparse
import json
import shlex
import sys
from pathlib import Path

from tabulate import tabulate

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad command-line input; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message):
        raise UsageError(message)


def _bounded(parse_value, minimum, maximum):
    """An argparse type: parse_value(text, name, minimum, maximum) of dsv3c.bounds, its BoundError as argparse's."""
    from dsv3c.bounds import BoundError

    def parse(text: str):
        try:
            return parse_value(text, "the value", minimum, maximum)
        except BoundError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _integer(minimum: int | None = None, maximum: int | None = None):
    """An argparse type: an integer in digits 0-9 within [minimum, maximum] (dsv3c.bounds.parse_int)."""
    from dsv3c.bounds import parse_int

    return _bounded(parse_int, minimum, maximum)


def _number(minimum: float, maximum: float):
    """An argparse type: a finite number within [minimum, maximum] (NaN, inf and out-of-range refused)."""
    from dsv3c.bounds import parse_float

    return _bounded(parse_float, minimum, maximum)


_positive = _integer(1)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all subcommands."""
    parser = _Parser(prog="dsv3c", description="Compile DeepSeek-V3-class MoE models for H800 clusters.")
    from dsv3c import __version__
    from dsv3c.bounds import MAX_DURATION, MAX_LINK_DELAY_MS, MAX_SEED

    parser.add_argument("--version", action="version", version=f"dsv3c {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compile", help="capture, transform and lower the model for a target")
    c.add_argument("--target", required=True, help="h800x2048, <gpu>x<N>, or a target .toml file")
    src = c.add_mutually_exclusive_group()
    src.add_argument("--model", default="deepseek-v3", help="built-in preset: deepseek-v3 (default), kimi-k2, "
                     "moonlight, tiny, tiny-kimi-k2 or tiny-moonlight")
    src.add_argument("--config", help="an HF-format config.json instead of a preset")
    c.add_argument("--mode", choices=["train", "prefill", "decode"], help="default: train on >=256 GPUs, else prefill")
    c.add_argument("--batch", type=_positive)
    c.add_argument("--seq", type=_positive)
    c.add_argument("--kv-len", type=_positive)
    c.add_argument("--mtp-acceptance", type=_number(0.0, 1.0), metavar="P",
                   help="decode: MTP draft acceptance for the speculative-decoding speed-up (default 0.85)")
    c.add_argument("--passes", help="comma-separated pass list (see `dsv3c passes`)")
    c.add_argument("--out", help="output directory (default build/<target>-<mode>)")
    c.add_argument("--precision", metavar="C=DTYPE,...", help="override the FP8 policy, e.g. attention_proj=bf16")
    c.add_argument("--parallel", default="auto", help="auto (default; train: the fastest layout that fits, inference: "
                   "DeepSeek-V3's unit) or degrees, e.g. pp=16,ep=64")
    c.add_argument("--expert-load", metavar="FILE", help='expert load JSON {"layers": [[count, ...], ...]}: place '
                   "redundant experts by it")
    c.add_argument("--schedule", choices=["dualpipe", "dualpipev", "1f1b", "zb1p"], help="train: pipeline schedule")
    c.add_argument("--micro-batches", type=_positive, help="train: micro-batches per step per pipeline")
    c.add_argument("--global-batch", type=_positive, help="train: sequences per step (default 15360)")
    c.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="sets",
                   help="override a cost-model constant (repeatable), e.g. --set ib_GBps=40")
    c.add_argument("--dump-dir", help="write per-pass dumps here")
    c.add_argument("--dump-mlir", type=_integer(0), metavar="LAYER", help="also dump this layer as MLIR after each pass")
    c.add_argument("--print-after-all", action="store_true")
    c.add_argument("--print-after", action="append", default=[], metavar="PASS")
    c.add_argument("--print-after-change", action="store_true")
    c.add_argument("--whole-graph", action="store_true", help="capture and transform the whole model as one graph "
                   "instead of each distinct block once (the same plan, slower; for checking the program of blocks)")

    sub.add_parser("targets", help="list the named targets")
    sub.add_parser("passes", help="list the passes with their contracts, in default order")

    i = sub.add_parser("inspect", help="summarise a dump directory")
    i.add_argument("dir")
    i.add_argument("--diff", nargs=2, metavar=("A", "B"), help="diff two passes (names or numbers)")
    i.add_argument("--layer", type=_integer(), help="restrict the diff to one layer")

    r = sub.add_parser("run", help="run a small model's lowered graph (Triton kernels) and check it against eager")
    rsrc = r.add_mutually_exclusive_group()
    rsrc.add_argument("--model", default="tiny", help="built-in preset (default tiny)")
    rsrc.add_argument("--config", help="an HF-format config.json instead of a preset")
    r.add_argument("--checkpoint", help="HF-layout safetensors directory (default: random weights)")
    r.add_argument("--plan", help="a plan.json of `dsv3c compile`: run its layout (ranks, degrees, stages, schedule, "
                   "expert placement) on gloo processes against one process")
    r.add_argument("--mode", choices=["prefill", "decode"], default="prefill")
    r.add_argument("--seed", type=_integer(0, MAX_SEED), default=0)
    r.add_argument("--batch", type=_positive)
    r.add_argument("--seq", type=_positive)
    r.add_argument("--kv-len", type=_positive)
    r.add_argument("--target", default="h800x2048", help="target whose tile configs the lowering uses")
    r.add_argument("--ranks", type=_positive, help="run on N gloo CPU processes (expert- or pipeline-parallel)")
    r.add_argument("--ep", type=_positive, help="expert-parallel degree: the expert-partitioned program (default --ranks)")
    r.add_argument("--pp", type=_positive, help="pipeline-parallel degree: a pipelined training step")
    r.add_argument("--schedule", default="1f1b", help="with --pp: 1f1b (default), zb1p, dualpipev or dualpipe")
    r.add_argument("--micro-batches", type=_positive, help="with --pp: micro-batches per step (default 2*pp)")
    r.add_argument("--train", action="store_true", help="with --ranks: loss and gradients too (implied by --pp)")
    r.add_argument("--json", action="store_true", help="with --ranks/--pp: print one JSON object")
    r.add_argument("--tokens", type=_positive, help="with --mode decode: greedy generation with and without MTP "
                   "speculative decoding (prints tokens_equal, acceptance, steps); with --ranks/--ep or a decode "
                   "--plan under expert parallelism")
    r.add_argument("--fp8", action="store_true", help="with --ranks/--ep (no --plan): the compile's default passes, "
                   "FP8 (dispatch in E4M3 with 1x128 scales, grouped FP8 expert GEMMs, BF16 combine)")
    r.add_argument("--trace", metavar="FILE", help="with --ranks/--plan: write the runtime trace (Chrome/Perfetto JSON)")
    r.add_argument("--link-delay-ms", type=_number(0.0, MAX_LINK_DELAY_MS), default=0.0, metavar="MS",
                   help="with --ranks/--plan: every EP exchange completes no earlier than MS after it is issued (a "
                   "slower link, to measure how much of it overlap hides)")
    r.add_argument("--expert-load-out", metavar="FILE", help="with --ep: write the observed expert load JSON")

    s = sub.add_parser("schedule", help="a pipeline schedule per rank with its simulated bubble and step")
    s.add_argument("--kind", required=True, help="1f1b, zb1p, dualpipev or dualpipe")
    s.add_argument("--pp", type=_positive, required=True)
    s.add_argument("--micro-batches", type=_positive, required=True)
    s.add_argument("--durations", metavar="K=T,...", help="per-action durations (F, B, I, W, F&B; default F=1,B=2,I=1,W=1)")
    s.add_argument("--comm", type=_number(0.0, MAX_DURATION), default=0.0, help="time per rank-to-rank hop (default 0)")
    s.add_argument("--trace", help="write a Chrome/Perfetto trace here")
    s.add_argument("--svg", help="write an SVG picture here")
    s.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return parser


def _load_config(args):
    """The ModelConfig named by --config or --model."""
    from model_def import ModelConfig

    return ModelConfig.from_json(args.config) if args.config else ModelConfig.preset(args.model)


def _progress(index: int, total: int, name: str) -> None:
    """One progress line per pass, on a terminal only."""
    sys.stderr.write(f"\r[{index}/{total}] {name:<20}")
    sys.stderr.flush()
    if index == total:
        sys.stderr.write("\n")


def _progress_lines(index: int, total: int, name: str) -> None:
    """One progress line per pass when stderr is not a terminal (logs, CI): no carriage returns."""
    sys.stderr.write(f"[{index}/{total}] {name}\n")
    sys.stderr.flush()


def cmd_compile(args, argv) -> int:
    """dsv3c compile."""
    import dsv3c.passmgr.pipeline as pipeline
    import passes
    from dsv3c import outdir, validate

    validate.check_compile_args(args)
    cfg = _load_config(args)
    options = {"precision": _precision(args.precision)} if args.precision else {}
    for name in args.print_after:
        passes.parse_pipeline(name)
    wanted = args.print_after_all or args.print_after or args.print_after_change
    printing = pipeline.Printing(args.print_after_all, tuple(args.print_after), args.print_after_change) if wanted else None
    with outdir.signals_interrupt():
        plan = _compile(args, argv, cfg, options, printing)
    out = args.out or f"build/{plan['target']['name']}-{plan['mode']}"
    m = plan["model"]
    print(f"compiled {m['name']} for {plan['target']['name']} ({plan['mode']}): {len(plan['passes'])} passes, "
          f"{len(plan['kernels'])} kernels -> {out}/plan.json, {out}/report.txt")  # fmt: skip
    return 0


def _compile(args, argv, cfg, options, printing) -> dict:
    """compile_model with the command line's options; the plan."""
    from dsv3c.driver import compile_model

    tty = sys.stderr.isatty()
    return compile_model(
        cfg, target=args.target, mode=args.mode, out=args.out, batch=args.batch, seq=args.seq,
        kv_len=args.kv_len, pipeline=args.passes, dump_dir=args.dump_dir, dump_mlir=args.dump_mlir,
        printing=printing, progress=_progress if tty else _progress_lines, repro=_repro(argv), options=options,
        parallel=args.parallel, expert_load=args.expert_load, schedule=args.schedule, micro_batches=args.micro_batches,
        cost_options=_cost_options(args),
        inference=None if args.mtp_acceptance is None else {"mtp_acceptance": args.mtp_acceptance},
        whole_graph=args.whole_graph,
    )  # fmt: skip


def _cost_options(args) -> dict:
    """The training cost model's options from compile's flags (--set checked here: one-line errors)."""
    from dsv3c.cost.constants import ConstantError, Constants, parse_sets

    try:
        sets = parse_sets(args.sets)
        Constants().with_overrides(sets)
    except ConstantError as e:
        raise UsageError(str(e)) from None
    return {"schedule": args.schedule, "micro_batches": args.micro_batches, "seq": args.seq,
            "global_batch": args.global_batch, "sets": sets}


def _precision(text: str) -> dict:
    """--precision 'a=bf16,b=fp8' as a checked policy override."""
    from dsv3c.ir.precision import PolicyError, resolve_policy

    try:
        pairs = dict(item.split("=", 1) for item in text.split(",") if item)
        resolve_policy(pairs)
    except ValueError as e:
        msg = str(e) if isinstance(e, PolicyError) else f"--precision wants component=dtype pairs, got '{text}'"
        raise UsageError(msg) from None
    return pairs


def _repro(argv) -> str:
    """The command line of this run, for failure reproducers."""
    return shlex.join(["dsv3c", *argv])


def cmd_targets(args, argv) -> int:
    """dsv3c targets."""
    import targets

    print(tabulate(targets.describe_targets(), headers=targets.DESCRIBE_HEADERS, disable_numparse=True))
    return 0


def cmd_passes(args, argv) -> int:
    """dsv3c passes."""
    import passes

    default = passes.default_pipeline()
    order = default + sorted(set(passes.REGISTRY) - set(default))
    rows = [[name, "yes" if name in default else "", passes.REGISTRY[name].contract] for name in order]
    print(tabulate(rows, headers=["pass", "default", "contract"]))
    print(f"\ndefault pipeline: {','.join(default)}")
    from passes import legal_ops

    print("\n" + legal_ops.text())
    return 0


def cmd_inspect(args, argv) -> int:
    """dsv3c inspect."""
    from dsv3c.passmgr import dumpview

    directory = Path(args.dir)
    if not directory.is_dir():
        raise UsageError(f"no dump directory at {directory}")
    if args.layer is not None and not args.diff:
        raise UsageError("--layer restricts a --diff; give --diff A B too")
    text = dumpview.diff(directory, *args.diff, layer=args.layer) if args.diff else dumpview.table(directory) + "\n"
    for problem in dumpview.problems(directory):
        print(f"dsv3c: warning: cannot use {problem}", file=sys.stderr)
    print(text, end="")
    return 0


RUN_MAX_PARAMS = 2_000_000_000  # run holds real weights on one device


def cmd_run(args, argv) -> int:
    """dsv3c run: exit 0 when the lowered graph's logits are within the FP8 tolerance (dsv3c.runtime.executor), else 1."""
    if args.tokens is not None and args.pp:
        raise UsageError("--tokens generates tokens: --pp (a pipelined training step) does not apply")
    if args.expert_load_out and (args.pp or (args.ranks is None and args.ep is None and not args.plan)):
        raise UsageError("--expert-load-out writes what an expert-parallel run observes: it needs --ranks, --ep or "
                         "--plan, without --pp")
    if args.micro_batches is not None and not args.pp:
        raise UsageError("--micro-batches applies to a pipelined training step: it needs --pp")
    if args.plan or args.pp or args.ranks is not None or args.ep is not None:
        return _run_parallel(args)
    if args.tokens is not None:
        return _run_speculative(args)
    if args.fp8 or args.trace or args.link_delay_ms:
        raise UsageError("--fp8, --trace and --link-delay-ms apply to runs on ranks (--ranks/--ep/--pp/--plan)")
    if args.train:
        raise UsageError("--train needs --ranks/--ep (expert-parallel) or --pp (pipelined)")
    import torch

    if not torch.cuda.is_available():  # kernels run on Triton's CPU interpreter, which must be chosen first
        _interpret_triton()
    from dsv3c.runtime.executor import run_model
    from model_def import DeepseekV3
    from model_def.counts import parameter_counts

    from dsv3c import validate
    from dsv3c.runtime.executor import DEFAULT_SHAPES

    cfg = _load_config(args)
    validate.check_mode_options(args.mode, args.kv_len, "run")
    shapes = {**DEFAULT_SHAPES[args.mode], **{k: v for k, v in dict(batch=args.batch, seq=args.seq,
                                                                        kv_len=args.kv_len).items() if v is not None}}
    validate.check_run_shapes(cfg, args.mode, shapes)
    import targets

    validate.check_target(targets.get_target(args.target))
    total = parameter_counts(DeepseekV3(cfg, device="meta"))["total"]
    if total > RUN_MAX_PARAMS:
        raise UsageError(f"model {cfg.name} has {total:,} parameters; run executes small models only")
    result = run_model(cfg, mode=args.mode, seed=args.seed, checkpoint=args.checkpoint, batch=args.batch,
                       seq=args.seq, kv_len=args.kv_len, target=args.target)
    print("\n".join(result.lines()))
    return 0 if result.ok else 1


def cmd_schedule(args, argv) -> int:
    """dsv3c schedule: build, check and simulate one pipeline schedule."""
    from dsv3c import bounds, outdir
    from dsv3c.schedules import report, validate

    validate(args.kind, args.pp, args.micro_batches)
    bounds.check_schedule_size(args.kind, args.pp, args.micro_batches)
    durations = report.parse_durations(args.durations)
    for flag in ("--trace", "--svg"):
        if getattr(args, flag[2:]) is not None:
            outdir.check_output_file(getattr(args, flag[2:]), flag)
    summary = report.summarize(args.kind, args.pp, args.micro_batches, durations, args.comm, args.trace, args.svg)
    print(report.format_json(summary) if args.json else report.format_table(summary), end="")
    return 0


def _run_parallel(args) -> int:
    """dsv3c run --plan FILE, or --ranks/--ep/--pp (a plan is made first): the plan's layout on gloo processes against
    the single-process model; exit 0 within tolerance, else 1."""
    import os

    if "triton" not in sys.modules and not _cuda():  # a plan's lowered kernels run on Triton's interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import passes
    from dsv3c.parallel import ParallelError
    from dsv3c.runtime.ep_run import EPRunError
    from dsv3c.runtime.launch import DEFAULT_PASSES, RunPlanError, load_plan, plan_run, run_plan
    from dsv3c.runtime.pipelined import PipelineArgError
    from dsv3c.runtime.speculative import SpecError
    from model_def import DeepseekV3
    from model_def.counts import parameter_counts

    from dsv3c import outdir, validate

    for flag, path in (("--expert-load-out", args.expert_load_out), ("--trace", args.trace)):
        if path:
            outdir.check_output_file(path, flag)
    try:
        if args.plan:
            if args.ranks or args.ep or args.pp or args.micro_batches or args.schedule != "1f1b" or args.fp8:
                raise UsageError("--plan takes the ranks, degrees, schedule, micro-batches and precision from the plan")
            cfg, mode, plan, names = load_plan(args.plan)
        else:
            if args.kv_len or args.checkpoint:
                raise UsageError("--ranks/--ep/--pp run on random weights: --kv-len and --checkpoint do not apply")
            cfg = _load_config(args)
            pp = args.pp or 1
            ranks = args.ranks or (args.ep or 1) * pp
            ep = args.ep if args.ep is not None else (ranks // pp if not args.pp else 1)
            mode = "decode" if args.mode == "decode" else ("train" if args.train or args.pp else "prefill")
            if mode == "decode" and (args.tokens is None or args.train):
                raise UsageError("--mode decode on ranks runs MTP speculative decoding: give --tokens N (no --train)")
            if args.tokens is not None and mode != "decode":
                raise UsageError("--tokens generates tokens: it needs --mode decode")
            validate.check_run_sizes(ranks, micro_batches=args.micro_batches or 2 * pp, tokens=args.tokens)
            if ranks % pp:
                raise UsageError(f"--pp {pp} does not divide --ranks {ranks}")
            names = passes.default_pipeline() if args.fp8 else list(DEFAULT_PASSES)
        if parameter_counts(DeepseekV3(cfg, device="meta"))["total"] > RUN_MAX_PARAMS:
            raise UsageError(f"model {cfg.name} is too large to run on CPU processes")
        if not args.plan:  # decode: a rank that has its tokens keeps stepping, up to 2 positions a step
            seq = (args.seq or 8) + (2 * args.tokens + 2 if args.tokens else 0)
            validate.check_run_shapes(cfg, "prefill", {"batch": args.batch or 1, "seq": seq, "kv_len": 0}, ranks)
            plan = plan_run(cfg, ranks, mode, pp, ep, args.schedule if args.pp else None, args.micro_batches,
                            args.seq or 8)
        validate.check_run_sizes(plan.mesh.gpus, micro_batches=plan.micro_batches or 1, tokens=args.tokens)
        batch = args.batch or 1
        if plan.mesh.pp > 1 and args.batch:  # a pipelined step's sequences per replica: micro-batches x their size
            if args.batch % plan.micro_batches:
                raise UsageError(f"--batch {args.batch} is not a multiple of the {plan.micro_batches} micro-batches")
            batch = args.batch // plan.micro_batches
        if "fp8_quant" in names and not _cuda():  # lowered kernels run on Triton's interpreter, chosen first
            _interpret_triton()
        result = run_plan(cfg, plan, mode, names, train=mode == "train" or args.train, seed=args.seed, batch=batch,
                          seq=args.seq or 8, link_delay=args.link_delay_ms / 1000, trace=args.trace, tokens=args.tokens)
    except (EPRunError, PipelineArgError, RunPlanError, ParallelError, SpecError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    if "expert_load" in result and args.expert_load_out:
        Path(args.expert_load_out).write_text(json.dumps({"layers": result["expert_load"]}) + "\n")
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "expert_load"}))
    else:
        print(run_summary(result))
    return 0 if result["ok"] else 1


def run_summary(result: dict) -> str:
    """The one-line (two with overlap) human summary of a run on ranks."""
    verdict = "OK" if result["ok"] else "OUT OF TOLERANCE"
    if "schedule" in result:
        line = (f"{result['schedule']} pp={result['pp']} ep={result['ep']} ranks={result['ranks']} micro-batches="
                f"{result['micro_batches']} ({result['executor']}): loss {result['loss']:.6f} (reference "
                f"{result['reference_loss']:.6f}), loss rel err {result['loss_rel_err']:.2e} (tol {result['loss_tol']:g}), "
                f"grad max cos-diff {result['grad_max_cos_diff']:.2e} (tol {result['cos_tol']:g}), grad max rel err "
                f"{result['grad_max_rel_err']:.2e}: {verdict}")  # fmt: skip
        o = result.get("overlap")
        if o:
            ratio = "n/a" if o["exposed_ratio"] is None else f"{o['exposed_ratio']:.2f}"
            line += (f"\noverlapped F&B: orders agree {o['orders_agree']} (loss rel {o['loss_rel_err_between_orders']:.1e}, "
                     f"grad cos-diff {o['grad_max_cos_diff_between_orders']:.1e}); exposed EP communication "
                     f"{o['exposed_ep_comm_seconds'][0]:.3f}s sequential, {o['exposed_ep_comm_seconds'][1]:.3f}s "
                     f"overlapped (ratio {ratio}, link delay {o['link_delay_seconds'] * 1000:g} ms)")  # fmt: skip
        return line
    if "acceptance" in result:
        return (f"ranks {result['ranks']} ep {result['ep']}: tokens_equal {result['tokens_equal']}, acceptance "
                f"{result['acceptance']}, steps per rank {result['steps_per_rank']} (plain {result['steps_plain']}), "
                f"steps with unequal lengths across ranks {result['steps_with_unequal_lengths']}: {verdict}")  # fmt: skip
    keys = ["logits_max_rel_err", "top1_agreement", "loss_rel_err", "grad_max_cos_diff", "max_nodes_per_token"]
    return (f"ranks {result['ranks']} ep {result['ep']} {result['precision']} ({result['reference']}, route "
            f"{result['route']}): " + ", ".join(f"{k} {result[k]:.3g}" for k in keys if k in result)
            + f": {verdict}")  # fmt: skip


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _interpret_triton() -> None:
    """Choose Triton's CPU interpreter (before triton is imported)."""
    import os

    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError("no GPU and triton was imported before TRITON_INTERPRET=1 could be set")
    os.environ["TRITON_INTERPRET"] = "1"


def _run_speculative(args) -> int:
    """dsv3c run --mode decode --tokens N: plain vs MTP-speculative greedy generation; exit 0 when the tokens agree."""
    from dsv3c.runtime.speculative import SpecError, run_speculative

    if args.mode != "decode":
        raise UsageError("--tokens generates tokens: it needs --mode decode")
    if args.checkpoint or args.kv_len:
        raise UsageError("--tokens runs on random weights from a --seq prompt: --checkpoint/--kv-len do not apply")
    from dsv3c import validate

    validate.check_run_sizes(1, tokens=args.tokens)
    cfg = _load_config(args)
    validate.check_run_shapes(cfg, "prefill", {"batch": 1, "seq": (args.seq or 8) + args.tokens + 1, "kv_len": 0})
    try:
        result = run_speculative(cfg, args.tokens, seed=args.seed, prompt_len=args.seq or 8)
    except SpecError as e:
        raise UsageError(str(e)) from None
    keys = ("tokens_equal", "acceptance", "steps_plain", "steps_speculative")
    if args.json:
        print(json.dumps(result))
    else:
        print(", ".join(f"{k} {result[k]}" for k in keys))
    return 0 if result["tokens_equal"] else 1


COMMANDS = {"compile": cmd_compile, "targets": cmd_targets, "passes": cmd_passes, "inspect": cmd_inspect, "run": cmd_run,
            "schedule": cmd_schedule}


def _user_errors() -> tuple:
    """The exception types that mean bad input (one line, exit 2), not a bug."""
    from dsv3c.bounds import BoundError
    from dsv3c.frontend.exporter import CaptureError
    from dsv3c.driver import OptionError, OutputError
    from dsv3c.passmgr.dumpview import DumpError
    from dsv3c.eplb import PlacementError
    from dsv3c.cost.constants import ConstantError
    from dsv3c.parallel import ParallelError
    from dsv3c.schedules import ScheduleError
    from passes import PassSpecError
    from model_def import ConfigError
    from model_def.checkpoint import CheckpointError
    from passes.expert_partition import PartitionError
    from targets import TargetError

    return (UsageError, ConfigError, TargetError, CaptureError, CheckpointError, OutputError, OptionError, PassSpecError,
            DumpError, ScheduleError, PlacementError, ConstantError, ParallelError, PartitionError, BoundError)


def main(argv=None) -> int:
    """Entry point of the dsv3c console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args, argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", 2)
        print("dsv3c: interrupted" + (f" ({e})" if signum != 2 else ""), file=sys.stderr)
        return 128 + signum
    except Exception as e:
        from dsv3c.passmgr.pipeline import PipelineError

        # a pass that refuses the input (e.g. an EP layout breaking the config's node limit) is bad input too
        if isinstance(e, _user_errors()) or (isinstance(e, PipelineError) and isinstance(e.__cause__, _user_errors())):
            print(f"dsv3c: error: {str(e).splitlines()[0]}", file=sys.stderr)
            return EXIT_USAGE
        from dsv3c.schema import PlanError

        if isinstance(e, (PipelineError, PlanError)):
            print(f"dsv3c: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
