"""Run a parallel plan on torch.distributed: the layout comes from a compiled plan.json, or is planned first.

`load_plan(path)` reads a plan.json that `dsv3c compile` wrote (the model config, the mode, the ParallelPlan
and the passes the compile ran); `plan_run(cfg, ranks, ...)` plans a layout for `ranks` processes the way a
compile does (the one planner, on target h800x<ranks>; inference units without tensor parallelism, which the
runtime does not run); `run_plan(...)` executes it on forked gloo processes: a pipelined training step when
pp > 1 (dsv3c.runtime.pipelined: stages, schedule, micro-batches, expert placement from the plan), MTP
speculative decoding for a decode layout (dsv3c.runtime.speculative), else the plan's expert-partitioned
program (dsv3c.runtime.ep_run: its passes, so its precision). Nothing here computes a layout of its own.

`main` is the same run under torchrun, one process per rank of the plan:

    python -m torch.distributed.run --nproc-per-node 4 -m dsv3c.runtime.launch --plan plan.json [--train]

(env://; NCCL with cuda:LOCAL_RANK when CUDA is present or `--backend nccl`, gloo on the CPU otherwise);
rank 0 prints the result as one JSON line, and every rank exits 0 when it is within tolerance.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

DEFAULT_PASSES = ("expert_partition",)  # a run without a plan: the unquantized expert-partitioned program


class RunPlanError(ValueError):
    """A plan the runtime cannot run (not a dsv3c plan, too large, a layout the runtime does not execute)."""


def load_plan(path) -> tuple:
    """(model config, mode, ParallelPlan, pass names) of a plan.json written by `dsv3c compile`."""
    from dsv3c.eplb import PlacementError
    from dsv3c.parallel import from_dict
    from model_def import ConfigError, ModelConfig

    try:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text)
        cfg = ModelConfig.from_dict(data["model"]["config"], name=data["model"]["name"])
        mode = data["mode"]
        names = [p["name"] for p in data["passes"]]
        return cfg, mode, from_dict(data["parallel"], mode), names
    except OSError as e:
        raise RunPlanError(f"cannot read plan {path}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError, ConfigError, PlacementError) as e:
        raise RunPlanError(f"{path} is not a plan.json written by dsv3c compile: {str(e).splitlines()[0]}") from None


def plan_run(cfg, ranks: int, mode: str, pp: int = 1, ep: int = 1, kind: str | None = None,
             micro_batches: int | None = None, seq: int = 8):
    """The ParallelPlan a compile for target h800x<ranks> chooses for --parallel pp=<pp>,ep=<ep> (tp=1 outside
    training; training: the schedule kind and micro-batches per pipeline, default 2·pp)."""
    import passes
    import targets
    from dsv3c.cost.constants import Constants
    from dsv3c.cost.facts import analyse
    from dsv3c.cost.figures import lift_positions
    from dsv3c.parallel import plan_parallel

    target = targets.get_target(f"h800x{ranks}")
    shapes = {"batch": 1, "seq": 1, "kv_len": seq} if mode == "decode" else {"batch": 1, "seq": seq, "kv_len": 0}
    facts, _ = analyse(lift_positions(cfg, shapes), mode, shapes, target, passes.REGISTRY)
    train = mode == "train"
    micro_batches = (micro_batches or 2 * pp) if train else None
    request = f"pp={pp},ep={ep}" + ("" if train else ",tp=1")  # the runtime runs no tensor parallelism
    planned = plan_parallel(cfg, target, mode, request, facts=facts, constants=Constants.for_target(target),
                            kind=kind if train else None, micro_batches=micro_batches,
                            global_batch=micro_batches * (ranks // pp) if train else None)
    return planned.plan


def _job(cfg, plan, mode: str, names, train: bool, seed: int, batch: int, seq: int, link_delay: float, trace,
         tokens: int | None):  # fmt: skip
    """(runtime module, its job) for the plan: what run_plan forks and main runs under torchrun."""
    mesh = plan.mesh
    if mesh.tp != 1:
        raise RunPlanError(f"the runtime runs no tensor parallelism (the plan has tp {mesh.tp})")
    if mode == "decode":
        from dsv3c.runtime.speculative import check_ep

        if tokens is None:
            raise RunPlanError("a decode layout runs MTP speculative decoding: give --tokens N")
        check_ep(cfg, plan, tokens, seq)
        return "speculative", {"cfg": cfg, "plan": plan, "tokens": tokens, "seed": seed, "prompt_len": seq,
                               "copy_head": False, "keep_routed": False}  # fmt: skip
    if tokens is not None:
        raise RunPlanError(f"--tokens generates tokens: it needs a decode layout, not {mode}")
    if mesh.pp > 1:
        from dsv3c.runtime.pipelined import make_spec

        m = plan.micro_batches
        if "fp8_quant" in names:
            print("dsv3c: warning: the pipelined runtime runs the unquantized float32 model, not the plan's FP8 "
                  "policy", file=sys.stderr)  # fmt: skip
        spec = make_spec(cfg, plan.kind, mesh.pp, m, mesh.gpus, mesh.ep, mb_size=batch, seq=seq, seed=seed,
                         ranges=plan.layer_ranges(), placement=None if plan.placement is None else plan.placement.phy2log,
                         gpus_per_node=mesh.gpus_per_node, link_delay=link_delay, trace=trace)  # fmt: skip
        return "pipelined", spec
    from dsv3c.runtime.ep_run import make_job

    return "ep", make_job(cfg, plan, names, train, seed, batch, seq, link_delay, trace)


def run_plan(cfg, plan, mode: str = "prefill", names=DEFAULT_PASSES, train: bool = False, seed: int = 0,
             batch: int = 1, seq: int = 8, link_delay: float = 0.0, trace=None, tokens: int | None = None) -> dict:
    """Execute plan on mesh.gpus forked gloo processes and compare with one process; the result dict."""
    kind, job = _job(cfg, plan, mode, names, train, seed, batch, seq, link_delay, trace, tokens)
    if kind == "speculative":
        from dsv3c.runtime.speculative import run_speculative_ep

        return run_speculative_ep(**job)
    if kind == "pipelined":
        from dsv3c.runtime.pipelined import run_many

        return run_many([job])[0]
    from dsv3c.runtime.ep_run import run_ep

    return run_ep(job)


def main(argv=None) -> int:
    """torchrun entry (module docstring)."""
    import argparse

    from dsv3c import validate

    p = argparse.ArgumentParser(prog="python -m dsv3c.runtime.launch",
                                description="one rank of `dsv3c run --plan` under torchrun")  # fmt: skip
    p.add_argument("--plan", required=True, help="a plan.json of dsv3c compile")
    p.add_argument("--train", action="store_true", help="an EP layout: the loss and gradients too")
    p.add_argument("--tokens", type=int, help="a decode layout: tokens to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1, help="sequences per rank (pipelined: per micro-batch)")
    p.add_argument("--seq", type=int, default=8, help="tokens per sequence (decode: the prompt length)")
    p.add_argument("--backend", choices=["gloo", "nccl"], help="default: nccl when CUDA is present, else gloo")
    p.add_argument("--link-delay-ms", type=float, default=0.0)
    p.add_argument("--trace", help="write the runtime trace (Chrome/Perfetto JSON) here (rank 0)")
    a = p.parse_args(argv)
    try:
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    except (KeyError, ValueError):
        p.error("run under torchrun (RANK and WORLD_SIZE unset)")
    try:
        cfg, mode, plan, names = load_plan(a.plan)
        validate.check_run_sizes(plan.mesh.gpus, micro_batches=plan.micro_batches or 1, tokens=a.tokens)
        if world != plan.mesh.gpus:
            raise RunPlanError(f"the plan lays out {plan.mesh.gpus} ranks; torchrun started {world}")
        kind, job = _job(cfg, plan, mode, names, a.train or mode == "train", a.seed, a.batch, a.seq,
                         a.link_delay_ms / 1000, a.trace, a.tokens)  # fmt: skip
    except (RunPlanError, ValueError) as e:
        print(f"dsv3c: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    job = {**job, "backend": a.backend}
    if kind == "speculative":
        from dsv3c.runtime.speculative import _ep_rank as worker
    elif kind == "pipelined":
        from dsv3c.runtime.pipelined import _worker

        def worker(rank, world, job, init, out):
            return (_worker(rank, world, [job], init, out) or [None])[0]
    else:
        from dsv3c.runtime.ep_run import run_worker as worker
    result = worker(rank, world, job, None, None)
    if rank != 0:
        return 0
    print(json.dumps({k: v for k, v in result.items() if k != "expert_load"}))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    import torch

    if not torch.cuda.is_available():  # lowered kernels run on Triton's interpreter, chosen before triton loads
        os.environ.setdefault("TRITON_INTERPRET", "1")
    raise SystemExit(main())
