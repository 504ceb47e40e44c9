"""Layout search: enumerate legal (pp, ep, dp, micro-batches, schedule) for a target, keep those that fit,
sort by step time.

Legality: `dsv3c.placement.make_mesh` (pp x dp = GPUs, no TP in training, EP inside a stage's data-parallel
ranks, node-aligned, dividing the experts), node-limited routing kept where the config has groups (the
contiguous placement of the EP group reaches at most topk_group nodes per token), `dsv3c.schedules.validate`
(DualPipe: even pp, even micro-batch count >= 2 pp), a stage per pipeline unit at least, and the global batch
dividing into micro-batches of `mb_seqs` sequences over the DP ranks. Memory is checked before the (more
expensive) simulation, and the per-block chunk costs, stage partitions and schedules are shared by all candidates.
"""

from __future__ import annotations

from functools import lru_cache

from dsv3c.cost.train import Layout, LayoutError, TrainCostModel
from dsv3c.placement import ExpertPlacement, PlacementError, keeps_node_limit, make_mesh
from dsv3c.schedules import KINDS, ScheduleError, validate


@lru_cache(maxsize=256)
def _keeps_node_limit(experts: int, n_group: int, topk_group: int, ep: int, gpus_per_node: int) -> bool:
    """Whether EP over ep ranks (the contiguous placement) keeps the config's node limit."""
    placement = ExpertPlacement.contiguous(1, experts, ep, min(ep, gpus_per_node))
    return keeps_node_limit(placement, n_group, topk_group)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg, target, global_batch: int, kinds=KINDS, mb_seqs=(1,), max_pp: int | None = None,
                      pp=None, ep=None, micro_batches=None) -> list[Layout]:
    """Every legal layout of the target (optionally restricted to given pp, ep, kind or micro-batch count)."""
    gpus, gpn = target.gpus, target.gpus_per_node
    units = cfg.num_hidden_layers + 1 + (1 if cfg.num_nextn_predict_layers else 0)
    out = []
    for p in ([pp] if pp else _divisors(gpus)):
        if max_pp and p > max_pp:
            continue
        dp = gpus // p
        for e in ([ep] if ep else _divisors(dp)):
            try:
                make_mesh(gpus, gpn, pp=p, ep=e, dp=dp, experts=cfg.n_routed_experts or None, mode="train")
            except PlacementError:
                continue
            if e > 1 and not cfg.n_routed_experts:
                continue
            if e > 1 and not _keeps_node_limit(cfg.n_routed_experts, cfg.n_group, cfg.topk_group, e, gpn):
                continue
            for kind in kinds:
                stages = 2 * p if kind == "dualpipev" else p
                if stages > units or (p == 1 and kind != "1f1b"):
                    continue
                for s in mb_seqs:
                    if global_batch % (dp * s):
                        continue
                    m = global_batch // (dp * s)
                    if micro_batches and m != micro_batches:
                        continue
                    try:
                        validate(kind, p, m)
                    except ScheduleError:
                        continue
                    out.append(Layout(p, e, dp, kind, m, s))
    return out


def search_layouts(cfg, target, seq: int = 4096, global_batch: int = 15360, constants=None, block_costs=None,
                   policy=None, model: TrainCostModel | None = None, top: int | None = None, **restrict) -> dict:
    """{"best": evaluation, "fitting": [evaluations sorted by step], "rejected": [(layout, reason)], "model"}."""
    model = model or TrainCostModel(cfg, target, constants, block_costs, seq, global_batch, policy)
    fitting, rejected = [], []
    for layout in candidate_layouts(cfg, target, global_batch, **restrict):
        try:
            bound = model.memory_lower_bound(layout)
            if bound > model.target.gpu.hbm_bytes:
                rejected.append((layout, f"needs at least {bound / 1e9:.1f} GB of {model.target.gpu.hbm_bytes / 1e9:.1f}"))
                continue
            ev = model.evaluate(layout, simulate_step=False)
        except LayoutError as e:
            rejected.append((layout, str(e)))
            continue
        if not ev["memory_per_gpu"]["fits"]:
            worst = max(ev["memory_per_gpu"]["ranks"], key=lambda r: r["total"])
            rejected.append((layout, f"needs {worst['total'] / 1e9:.1f} GB of {model.target.gpu.hbm_bytes / 1e9:.1f}"))
            continue
        fitting.append(model.evaluate(layout))
    fitting.sort(key=lambda ev: (ev["cost"]["step_seconds"], ev["memory_per_gpu"]["peak_total"]))
    if top:
        fitting = fitting[:top]
    return {"best": fitting[0] if fitting else None, "fitting": fitting, "rejected": rejected, "model": model}
