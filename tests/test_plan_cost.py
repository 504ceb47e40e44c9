"""The training cost model: constants, chunk times, step time, memory, communication, layout search, pictures."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import targets
from dsv3c.cost.constants import ConstantError, Constants, parse_sets
from dsv3c.cost.fastsim import CompiledSchedule, peaks_of
from dsv3c.cost.pictures import memory_time_svg
from dsv3c.cost.plan_cost import cost_plan, report_tables
from dsv3c.cost.search import candidate_layouts, search_layouts
from dsv3c.cost.train import Layout, TrainCostModel, partition
from dsv3c.schedules import build
from dsv3c.schedules.checks import peak_activations
from dsv3c.schedules.simulate import simulate
from model_def import ModelConfig

V3 = ModelConfig.preset("deepseek-v3")
H2048 = targets.get_target("h800x2048")
DS_LAYOUT = Layout(16, 64, 128, "dualpipe", 120, 1)


@pytest.fixture(scope="module")
def v3_model():
    return TrainCostModel(V3, H2048)


@pytest.fixture(scope="module")
def v3_eval(v3_model):
    return v3_model.evaluate(DS_LAYOUT)


def test_constants_overrides_and_errors():
    c = Constants.for_target(H2048)
    assert c["ib_GBps"] == 50 and c["nvlink_GBps"] == 160 and c["comm_sms"] == 20
    d = c.with_overrides({"ib_GBps": "25"})
    assert d["ib_GBps"] == 25 and d.entry("ib_GBps").source == "override" and c["ib_GBps"] == 50
    for bad in ({"nope": 1}, {"ib_GBps": "fast"}, {"gemm_efficiency": 2}, {"ib_GBps": -1}):
        with pytest.raises(ConstantError) as e:
            c.with_overrides(bad)
        assert "\n" not in str(e.value)
    assert parse_sets(["a=1", "b = 2"]) == {"a": "1", "b": "2"}
    with pytest.raises(ConstantError):
        parse_sets(["a"])
    assert all(v["source"] in ("measured", "datasheet", "assumed", "target") for v in c.to_dict().values())


def test_deepseek_layout_fits_and_is_plausible(v3_eval):
    mem, cost = v3_eval["memory_per_gpu"], v3_eval["cost"]
    assert mem["fits"] and len(mem["ranks"]) == 16
    assert set(mem["ranks"][0]["stages"]) == {0, 15}  # DualPipe: first and last stage share a rank
    # sanity band only (DeepSeek-V3 reports 180K H800 GPU-hours per trillion tokens, everything included)
    assert 60_000 < cost["gpu_hours_per_trillion_tokens"] < 300_000
    assert 0.2 < cost["mfu"] < cost["hfu"] < 0.8
    ch = cost["chunk_seconds"]["moe"]
    assert ch["B"] == pytest.approx(ch["I"] + ch["W"])
    assert ch["FB"] <= ch["F"] + ch["B"] + 1e-12  # overlap never costs more than running them apart
    ep = v3_eval["communication"]["ep"]["per_layer_per_micro_batch"]
    assert ep["dispatch"]["ib_bytes"] < ep["combine"]["ib_bytes"]  # FP8 dispatch, BF16 combine


def test_fast_timing_equals_simulator():
    durations = {"F": [1.0, 1.2, 0.9, 1.1], "B": [2.0, 2.1, 1.9, 2.2], "I": [1.2, 1.1, 1.0, 1.3],
                 "W": [0.8, 1.0, 0.9, 0.9], "F&B": [2.5, 2.7, 2.6, 2.4]}
    for kind, pp, m in (("1f1b", 4, 8), ("zb1p", 4, 8), ("dualpipe", 4, 8), ("dualpipev", 2, 8)):
        sched = build(kind, pp, m)
        n = len(sched.layout.stage_rank())
        dur = {k: v[:n] if n <= 4 else (v * 2)[:n] for k, v in durations.items()}
        step, busy = CompiledSchedule(sched).step(dur, 0.3)
        tl = simulate(sched, dur, 0.3)
        assert step == pytest.approx(tl.step) and busy == pytest.approx(tl.busy)
        assert peaks_of(sched) == peak_activations(sched)
        assert peaks_of(sched)[0] >= min(m, pp)  # what the search's memory lower bound assumes


def test_partition_is_contiguous_and_complete():
    w = [1.0] * 3 + [2.0] * 10 + [3.0, 4.0]
    for n in (1, 2, 5, 15):
        cut = partition(w, n)
        assert len(cut) == n and cut[0][0] == 0 and cut[-1][1] == len(w)
        assert all(a < b for a, b in cut) and all(cut[i][1] == cut[i + 1][0] for i in range(n - 1))


@settings(max_examples=8, deadline=None)
@given(st.sampled_from(["1f1b", "zb1p", "dualpipe"]), st.sampled_from([8, 16, 32]))
def test_more_micro_batches_never_shrink_activations(kind, m):
    model = TrainCostModel(V3, targets.get_target("h800x256"), global_batch=16 * m)
    a = model.evaluate(Layout(4, 8, 64, kind, m), simulate_step=False)["memory_per_gpu"]
    b = model.evaluate(Layout(4, 8, 64, kind, 2 * m), simulate_step=False)["memory_per_gpu"]
    assert all(y["activations"] >= x["activations"] for x, y in zip(a["ranks"], b["ranks"]))


@settings(max_examples=8, deadline=None)
@given(st.sampled_from(["ib_GBps", "nvlink_GBps"]), st.floats(1.1, 8.0))
def test_more_bandwidth_never_slows_a_step(name, factor):
    base = Constants.for_target(H2048)
    slow = TrainCostModel(V3, H2048, base).evaluate(DS_LAYOUT)["cost"]["step_seconds"]
    fast = TrainCostModel(V3, H2048, base.with_overrides({name: base[name] * factor})).evaluate(DS_LAYOUT)
    assert fast["cost"]["step_seconds"] <= slow + 1e-12


@settings(max_examples=6, deadline=None)
@given(st.integers(1, 6), st.sampled_from([1, 8]))
def test_one_stage_step_is_compute_plus_exposed_communication(m, ep):
    tgt = targets.get_target("h800x8")
    model = TrainCostModel(V3, tgt, global_batch=8 * m)
    ev = model.evaluate(Layout(1, ep, 8, "1f1b", m))
    st_ = model.stages(Layout(1, ep, 8, "1f1b", m))[0]
    compute = m * (st_["F_compute"] + st_["B_compute"])
    exposed = m * (st_["F_comm"] + st_["B_comm"])
    assert ev["cost"]["pipeline_seconds"] == pytest.approx(compute + exposed)
    assert (ep == 1) == (exposed == 0)


def test_search_returns_only_fitting_layouts_sorted():
    tgt = targets.get_target("h800x256")
    res = search_layouts(V3, tgt, global_batch=1024)
    steps = [ev["cost"]["step_seconds"] for ev in res["fitting"]]
    assert steps == sorted(steps)
    assert all(ev["memory_per_gpu"]["fits"] for ev in res["fitting"])
    assert all(r["total"] <= tgt.gpu.hbm_bytes for ev in res["fitting"] for r in ev["memory_per_gpu"]["ranks"])
    assert res["rejected"]  # the full model on 256 GPUs rules some layouts out


@settings(max_examples=6, deadline=None)
@given(st.sampled_from([32, 64]), st.sampled_from([128, 256, 512]))
def test_search_never_returns_a_layout_that_does_not_fit(gpus, batch):
    res = search_layouts(V3, targets.get_target(f"h800x{gpus}"), global_batch=batch)
    assert all(ev["memory_per_gpu"]["fits"] for ev in res["fitting"])


def test_candidates_are_legal():
    for lay in candidate_layouts(V3, H2048, 15360):
        assert lay.pp * lay.dp == 2048 and lay.dp % lay.ep == 0 and 15360 % lay.dp == 0
        assert lay.kind != "dualpipe" or (lay.pp % 2 == 0 and lay.micro_batches >= 2 * lay.pp)


def test_cost_plan_report_and_pictures(tmp_path):
    plan = cost_plan(V3, H2048, None, {"parallel": {"pp": 16, "ep": 64}, "schedule": "dualpipe", "out": tmp_path,
                                       "sets": {"ib_GBps": 45}})
    assert plan["cost"]["layout"]["pp"] == 16 and plan["cost"]["layout"]["schedule"] == "dualpipe"
    assert plan["cost_constants"]["ib_GBps"]["value"] == 45
    svg = (tmp_path / "memory_time.svg").read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert (tmp_path / "step.trace.json").exists()
    titles = [s[0] for s in report_tables(plan)]
    assert any("Memory per GPU" in t for t in titles) and any("constants" in t for t in titles)
    assert "<svg" in memory_time_svg(plan["memory_per_gpu"], [], "", "x")
