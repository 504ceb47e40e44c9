"""Run a parallel plan on torch.distributed: the layout comes from a compiled plan.json, or is planned first.

`load_plan(path)` reads a plan.json that `dsv3c compile` wrote (the model config, the mode and the
ParallelPlan); `plan_run(cfg, ranks, ...)` plans a layout for `ranks` processes the way a compile does (the
one planner, on target h800x<ranks>); `run_plan(cfg, plan, ...)` executes it: a pipelined training step when
pp > 1 (stages, schedule and micro-batches from the plan), else the expert-partitioned program (EP degree,
GPUs per node and expert placement from the plan). Nothing here computes a layout of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

class RunPlanError(ValueError):
    """A plan the runtime cannot run (not a dsv3c plan, too large, a layout the runtime does not execute)."""


def load_plan(path) -> tuple:
    """(model config, mode, ParallelPlan) of a plan.json written by `dsv3c compile`."""
    from dsv3c.eplb import PlacementError
    from dsv3c.parallel import from_dict
    from model_def import ConfigError, ModelConfig

    try:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text)
        cfg = ModelConfig.from_dict(data["model"]["config"], name=data["model"]["name"])
        mode = data["mode"]
        return cfg, mode, from_dict(data["parallel"], mode)
    except OSError as e:
        raise RunPlanError(f"cannot read plan {path}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError, ConfigError, PlacementError) as e:
        raise RunPlanError(f"{path} is not a plan.json written by dsv3c compile: {str(e).splitlines()[0]}") from None


def plan_run(cfg, ranks: int, mode: str, pp: int = 1, ep: int = 1, kind: str | None = None,
             micro_batches: int | None = None, seq: int = 8):
    """The ParallelPlan a compile for target h800x<ranks> chooses for --parallel pp=<pp>,ep=<ep> (training: the
    schedule kind and micro-batches per pipeline, default 2·pp)."""
    import passes
    import targets
    from dsv3c.cost.constants import Constants
    from dsv3c.cost.facts import analyse
    from dsv3c.cost.figures import lift_positions
    from dsv3c.parallel import plan_parallel

    target = targets.get_target(f"h800x{ranks}")
    shapes = {"batch": 1, "seq": seq, "kv_len": 0}
    facts, _ = analyse(lift_positions(cfg, shapes), mode, shapes, target, passes.REGISTRY)
    train = mode == "train"
    micro_batches = (micro_batches or 2 * pp) if train else None
    planned = plan_parallel(cfg, target, mode, f"pp={pp},ep={ep}", facts=facts, constants=Constants.for_target(target),
                            kind=kind if train else None, micro_batches=micro_batches,
                            global_batch=micro_batches * (ranks // pp) if train else None)
    return planned.plan


def run_plan(cfg, plan, train: bool, seed: int = 0, batch: int = 1, seq: int = 8) -> dict:
    """Execute plan on mesh.gpus gloo processes and compare with one process (see dsv3c.runtime.ep_run/pipelined)."""
    mesh = plan.mesh
    if mesh.tp != 1:
        raise RunPlanError(f"the runtime runs no tensor parallelism (the plan has tp {mesh.tp})")
    if mesh.pp > 1:
        from dsv3c.runtime.pipelined import make_spec, run_many

        m = plan.micro_batches
        if mesh.ep not in (1, mesh.dp):
            raise RunPlanError(f"the pipelined runtime runs EP 1 or EP = dp ({mesh.dp}); the plan has EP {mesh.ep}")
        _check_contiguous(plan)
        spec = make_spec(cfg, plan.kind, mesh.pp, m, mesh.gpus, mesh.ep, mb_size=batch, seq=seq, seed=seed,
                         ranges=plan.layer_ranges())
        return run_many([spec])[0]
    from dsv3c.runtime.ep_run import run_ep

    return run_ep(cfg, mesh.gpus, mesh.ep, train=train, seed=seed, batch=batch, seq=seq,
                  gpus_per_node=mesh.gpus_per_node, placement=plan.tables())


def _check_contiguous(plan) -> None:
    """The pipelined runtime holds experts in contiguous slices: refuse other placements."""
    p = plan.placement
    if p is None:
        return
    import torch

    if p.num_slots != p.experts or not torch.equal(p.phy2log, torch.arange(p.experts).expand_as(p.phy2log)):
        raise RunPlanError("the pipelined runtime holds each EP rank's experts as a contiguous slice; the plan's "
                           "placement (redundant or rebalanced experts) runs only without --pp")
