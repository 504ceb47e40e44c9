"""The one cost model on the 671B preset: constants, the stage split, the step (one simulation), memory, the search,
ranges, and --set reaching every mode."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import passes
import targets
from dsv3c.cost.constants import ConstantError, Constants, parse_sets
from dsv3c.cost.fastsim import CompiledSchedule
from dsv3c.cost.figures import model_figures
from dsv3c.cost.plan_cost import inference_keys, train_keys
from dsv3c.cost.train import balance_ranks, partition
from dsv3c.parallel import plan_parallel
from dsv3c.schedules import build
from dsv3c.schedules.simulate import simulate
from model_def import ModelConfig

V3 = ModelConfig.preset("deepseek-v3")
H2048 = targets.get_target("h800x2048")


@pytest.fixture(scope="module")
def figures():
    return model_figures(V3, H2048, passes.REGISTRY)


def plan_train(figures, request, constants=None, **kw):
    """The training plan of V3 on 2048 H800s for a --parallel request."""
    facts = figures["facts"]["train"]
    c = constants or Constants.for_target(H2048)
    return plan_parallel(V3, H2048, "train", request, facts=facts, constants=c,
                         flops_per_token=(facts.flops_per_token(True), facts.hardware_flops_per_token()), **kw)


@pytest.fixture(scope="module")
def deepseek(figures):
    """DeepSeek-V3's own layout: PP16 DualPipe, EP64, DP128."""
    return plan_train(figures, "pp=16,ep=64", kind="dualpipe")


def test_constants_overrides_ranges_and_errors():
    c = Constants.for_target(H2048)
    assert c["comm_sms"] == 20
    assert c["ib_GBps"] == 50 and c["nvlink_GBps"] == 160
    d = c.with_overrides({"grad_reduce_bytes": "2"})
    assert d["grad_reduce_bytes"] == 2 and d.entry("grad_reduce_bytes").source == "override" and c["grad_reduce_bytes"] == 4
    for bad in ({"nope": 1}, {"grad_reduce_bytes": "fast"}, {"mtp_acceptance": 2}, {"grad_reduce_bytes": -1},
                {"grad_reduce_bytes": "1e-320"}, {"comm_sms": "2.5"}, {"grad_reduce_bytes": "nan"}):
        with pytest.raises(ConstantError) as e:
            c.with_overrides(bad)
        assert "\n" not in str(e.value)
    assert parse_sets(["a=1", "b = 2"]) == {"a": "1", "b": "2"}
    with pytest.raises(ConstantError):
        parse_sets(["a"])
    for name in c.names():
        e = c.entry(name)
        assert e.source in ("measured", "datasheet", "assumed", "target", "fit") and e.note, name
        if e.low is not None:
            assert e.low <= e.high and c.at("fast")[name] in (e.low, e.high), name


def test_fast_timing_equals_simulator():
    for kind, pp, m in (("1f1b", 4, 8), ("zb1p", 4, 6), ("dualpipev", 3, 6), ("dualpipe", 4, 8)):
        sched = build(kind, pp, m)
        n = len(sched.layout.stage_rank())
        dur = {k: [0.5 + 0.1 * s + 0.3 * i for s in range(n)] for i, k in enumerate(("F", "B", "I", "W"))}
        dur["F&B"] = [2.0 + 0.05 * s for s in range(n)]
        tl = simulate(sched, dur, 0.07)
        step, busy = CompiledSchedule(sched).step(dur, 0.07)
        assert step == pytest.approx(tl.step) and busy == pytest.approx(tl.busy)


@settings(max_examples=30)
@given(weights=st.lists(st.floats(0.01, 5.0), min_size=1, max_size=30), data=st.data())
def test_partition_is_contiguous_min_max_and_balancing_never_worsens(weights, data):
    n = data.draw(st.integers(1, len(weights)))
    cut = partition(weights, n)
    assert len(cut) == n and cut[0][0] == 0 and cut[-1][1] == len(weights)
    assert all(a < b for a, b in cut) and all(cut[i][1] == cut[i + 1][0] for i in range(n - 1))
    best = max(sum(weights[a:b]) for a, b in cut)
    for _ in range(20):  # no random split into n parts has a smaller largest part
        points = sorted(data.draw(st.lists(st.integers(1, len(weights) - 1), min_size=n - 1, max_size=n - 1,
                                           unique=True))) if n > 1 else []
        bounds = [0, *points, len(weights)]
        assert max(sum(weights[a:b]) for a, b in zip(bounds, bounds[1:])) >= best - 1e-9
    ranks = data.draw(st.integers(1, n))
    rank_of = [min(s, n - 1 - s) % ranks for s in range(n)]
    moved = balance_ranks(weights, cut, rank_of)
    load = lambda c: max(sum(sum(weights[a:b]) for s, (a, b) in enumerate(c) if rank_of[s] == r)  # noqa: E731
                         for r in range(ranks))
    assert load(moved) <= load(cut) + 1e-9


def test_deepseek_stages_are_balanced_and_the_step_is_one_simulation(deepseek):
    ev = deepseek.evaluation
    assert (ev.cand.pp, ev.cand.ep, ev.cand.dp, ev.cand.kind) == (16, 64, 128, "dualpipe") and ev.fits
    pricer = ev.pricer
    weights = [sum(pricer.unit_weight(u, ev.cand) for u in pricer.units[a:b]) for a, b in ev.cut]
    layer = pricer.unit_weight("moe", ev.cand)
    # DualPipe runs stage s on rank s and again (the other direction) on rank pp-1-s: a rank's work is the sum
    ranks = [weights[r] + weights[15 - r] for r in range(8)]
    mean = sum(ranks) / len(ranks)
    assert all(abs(w - mean) <= layer for w in ranks), (ranks, mean, layer)
    assert max(weights) - min(weights) <= 2 * layer  # stages: whole layers, and the head and MTP are indivisible
    assert deepseek.plan.stages[0][0] == "embed" and deepseek.plan.stages[-1][-1] == "mtp.0"
    # the reported pipeline time is the schedule simulated with the priced stage durations, no other figure
    tl = simulate(ev.sched, {k: [t.total for t in v] for k, v in ev.durations.items()}, ev.hop["seconds"])
    assert tl.step == pytest.approx(ev.pipeline_seconds) and ev.timeline.step == pytest.approx(ev.pipeline_seconds)
    parts = ev.parts
    assert sum(parts.values()) == pytest.approx(ev.step_seconds)  # the split adds up to the step
    assert parts["bubble"] == pytest.approx(min(ev.pipeline_seconds - b for b in ev.busy))


def test_deepseek_figures_and_ranges(deepseek, tmp_path):
    keys = train_keys(deepseek, Constants.for_target(H2048), tmp_path)
    c = keys["cost"]
    assert 0 < c["mfu"] < c["hfu"] < 1 and c["step_seconds"] > 0
    lo, hi = c["ranges"]["step_seconds"]
    assert lo <= c["step_seconds"] <= hi
    lo, hi = c["ranges"]["mfu"]
    assert lo <= c["mfu"] <= hi
    for part in c["step_split_seconds"].values():
        assert part["range"][0] <= part["value"] + 1e-12 and part["value"] <= part["range"][1] + 1e-12
    b = c["bubble"]
    assert b["largest_seconds"] >= b["busiest_rank_seconds"] and "rank" in b["explanation"]
    ep = keys["communication"]["ep"]["per_layer_per_micro_batch"]
    assert ep["dispatch"]["ib_bytes"] < ep["combine"]["ib_bytes"]  # FP8 dispatch, BF16 combine
    assert all(v["latency_seconds"] > 0 for v in ep.values())
    assert (tmp_path / "schedule.trace.json").exists() and (tmp_path / "memory_time.svg").exists()
    assert set(keys["cost_constants"]) == set(Constants().names())


def test_search_returns_only_fitting_layouts_sorted(figures):
    planned = plan_train(figures, "auto")
    fitting = planned.search["fitting"]
    assert fitting and all(ev.fits for ev in fitting)
    steps = [ev.step_seconds for ev in fitting]
    assert steps == sorted(steps) and planned.evaluation.step_seconds == pytest.approx(steps[0])
    assert planned.plan.chosen_by == "auto"


@pytest.mark.parametrize("mode", ["train", "prefill", "decode"])
def test_set_reaches_every_mode(figures, mode):
    """--set ib_GBps=25 changes the figures of training, prefill and decode alike (the communication's; the step
    where it is exposed)."""
    c = Constants.for_target(H2048)
    slow_link = c.with_overrides({"ib_GBps": "25"})
    assert slow_link["ep_ll_dispatch_ib_GBps"] == pytest.approx(c["ep_ll_dispatch_ib_GBps"] / 2)
    if mode == "train":
        a, b = (plan_train(figures, "pp=16,ep=64", constants=k, kind="dualpipe").evaluation.step_seconds
                for k in (c, slow_link))
    else:
        target = targets.get_target("h800x32" if mode == "prefill" else "h800x320")
        facts = figures["facts"][mode]
        kv = {"main": figures["kv_cache_bytes_per_token"]["latent"], "mtp": 0}
        key = "ttft_seconds" if mode == "prefill" else "tpot_seconds"
        figs = [inference_keys(plan_parallel(V3, target, mode, "auto", facts=facts, constants=k), V3, target, facts, k,
                               kv)["inference"] for k in (c, slow_link)]
        assert figs[1][key] >= figs[0][key]
        a, b = (f["per_layer"]["moe"]["communication_side_seconds"] for f in figs)
    assert b > a


def test_step_lower_bound_never_exceeds_the_step(figures):
    """The search prunes by this bound: it must hold for every candidate it could prune."""
    planned = plan_train(figures, "auto")
    pricer = planned.pricer
    for ev in planned.search["fitting"]:
        assert pricer.step_lower_bound(ev.cand) <= ev.step_seconds * (1 + 1e-12), ev.cand.label()
    assert len(planned.search["fitting"]) >= 8 and planned.search["pruned"]
