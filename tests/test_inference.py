"""Inference plans: deployment units (--parallel honoured), KV capacity, prefill/decode figures, MTP speculation."""

import dataclasses
import json

import pytest

import passes
import targets
from dsv3c.cost import inference as inf
from dsv3c.cost.constants import Constants
from dsv3c.cost.facts import analyse
from dsv3c.cost.figures import lift_positions
from dsv3c.cost.plan_cost import inference_keys
from dsv3c.parallel import ParallelError, plan_parallel
from model_def import ModelConfig

V3 = ModelConfig.preset("deepseek-v3")
TINY = ModelConfig.preset("tiny")
KV = {"main": 70_272, "mtp": 1152}  # latent cache bytes per token: 61 (and 1 MTP) layers x (512 + 64) x 2


@pytest.fixture(scope="module")
def facts():
    """Reduced-capture block facts of the 671B model at a few shapes, captured once each."""
    cache = {}

    def get(mode, batch, seq, kv_len=0):
        key = (mode, batch, seq, kv_len)
        if key not in cache:
            shapes = {"batch": batch, "seq": seq, "kv_len": kv_len}
            cache[key] = analyse(lift_positions(V3, shapes), mode, shapes, targets.get_target("h800x8"),
                                 passes.REGISTRY)[0]
        return cache[key]

    return get


def priced(facts, target, mode, request="auto", constants=None, **shape):
    """(ParallelPlan, plan.json's inference) of V3 for a target, mode, --parallel request and shapes."""
    tgt = targets.get_target(target)
    c = constants or Constants.for_target(tgt)
    f = facts(mode, **shape)
    planned = plan_parallel(V3, tgt, mode, request, facts=f, constants=c)
    return planned.plan, inference_keys(planned, V3, tgt, f, c, KV)["inference"]


# ---- speculative decoding on the tiny model ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 7])
def test_speculative_is_lossless(seed):
    from dsv3c.runtime.speculative import run_speculative

    r = run_speculative(TINY, 5, seed=seed, prompt_len=4)
    assert r["tokens_equal"] and len(r["tokens_plain"]) == 5
    assert r["drafted"] == r["steps_speculative"] and 0 <= r["acceptance"] <= 1
    assert r["steps_speculative"] <= r["steps_plain"]


def test_acceptance_one_when_mtp_copies_the_next_prediction():
    from dsv3c.runtime.speculative import run_speculative

    r = run_speculative(TINY, 7, seed=3, prompt_len=4, copy_head=True)
    assert r["tokens_equal"] and r["acceptance"] == 1.0
    assert r["steps_speculative"] == 3 and r["steps_plain"] == 6  # 2 tokens per verified step


def test_speculation_under_expert_parallelism_is_lossless():
    """4 ranks, EP 4 (the planner's decode layout for h800x4): every rank decodes its own prompt with the routed
    experts spread over the group. The MTP drafts agree with the main model on some tokens only (copy_head with the
    routed experts kept), so the ranks accept different numbers of tokens and their MoE layers exchange different
    token counts; every rank's tokens equal greedy decoding of the whole model in one process."""
    from dsv3c.runtime.launch import plan_run
    from dsv3c.runtime.speculative import run_speculative_ep

    plan = plan_run(TINY, 4, "decode", 1, 4)
    assert (plan.mesh.ep, plan.mesh.tp, plan.mesh.dp) == (4, 1, 4)
    r = run_speculative_ep(TINY, plan, 12, seed=0, prompt_len=4, copy_head=True, keep_routed=True)
    assert r["ok"] and r["tokens_equal"] and r["plain_ep_tokens_equal"] and r["route"] == "direct"
    assert 0 < r["acceptance"] < 1 and len(set(r["acceptance_per_rank"])) > 1
    assert r["steps_with_unequal_lengths"] > 0  # ranks kept 1 and 2 positions in the same step
    assert min(r["steps_per_rank"]) < r["steps_plain"]  # accepted drafts saved main-model steps


def test_cli_speculation_on_ranks(capsys):
    from dsv3c.cli import main

    assert main(["run", "--mode", "decode", "--tokens", "6", "--ranks", "2", "--ep", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens_equal"] and r["ranks"] == 2 and r["ep"] == 2 and r["steps_plain"] == 5


# ---- units ---------------------------------------------------------------------------------------------------------


def test_default_units(facts):
    p, _ = priced(facts, "h800x32", "prefill", batch=1, seq=4096)
    m = p.mesh
    assert (m.tp, m.dp, m.ep, m.sp, p.unit.routed_slots_per_gpu, m.redundant) == (4, 8, 32, True, 8, 0)
    d, inf_d = priced(facts, "h800x320", "decode", batch=1, seq=1, kv_len=4096)
    assert (d.mesh.tp, d.mesh.dp, d.mesh.ep, d.unit.routed_slots_per_gpu, d.mesh.redundant) == (4, 80, 320, 1, 64)
    assert inf_d["unit"]["layout"].startswith("attention TP4+SP x DP80; MoE EP320")


def test_deepseeks_profiled_units_can_be_requested(facts):
    """Decode EP128 TP1 with 128 requests per GPU at 4K, prefill EP32 TP1: --parallel is honoured in inference."""
    d, inf_d = priced(facts, "h800x128", "decode", "tp=1,ep=128", batch=128, seq=1, kv_len=4096)
    assert (d.mesh.tp, d.mesh.dp, d.mesh.ep, d.mesh.sp, d.unit.routed_slots_per_gpu) == (1, 128, 128, False, 2)
    assert inf_d["kv_capacity"]["batch_fits"] and inf_d["tpot_seconds"] > 0
    p, inf_p = priced(facts, "h800x32", "prefill", "tp=1,ep=32", batch=4, seq=4096)
    assert (p.mesh.tp, p.mesh.dp, p.mesh.ep) == (1, 32, 32) and inf_p["ttft_seconds"] > 0
    assert "tp" not in inf_p["communication_per_micro_batch"].get("moe", {})  # no TP collectives without TP


@pytest.mark.parametrize("target, mode, request_", [
    ("h800x320", "decode", "tp=3"),  # TP must divide a node
    ("h800x320", "decode", "ep=7"),  # EP must divide the unit and stay node-aligned
    ("h800x32", "prefill", "pp=2"),  # an inference unit has no pipeline
    ("h800x32", "prefill", "tp=1,sp=1"),  # sequence parallelism needs TP
])  # fmt: skip
def test_impossible_units_rejected(facts, target, mode, request_):
    shape = {"batch": 1, "seq": 4096} if mode == "prefill" else {"batch": 1, "seq": 1, "kv_len": 4096}
    with pytest.raises(ParallelError) as e:
        priced(facts, target, mode, request_, **shape)
    assert "\n" not in str(e.value)


def test_units_that_do_not_fit_are_refused(facts):
    with pytest.raises(inf.UnitError, match="exceed"):  # EP8: 32 experts x 58 layers per GPU do not fit in 80 GB
        priced(facts, "h800x8", "decode", batch=1, seq=1, kv_len=4096)
    with pytest.raises(inf.UnitError, match="latent cache"):
        priced(facts, "h800x320", "decode", batch=512, seq=1, kv_len=4096)


# ---- KV capacity and figures ------------------------------------------------------------------------------------------


def test_kv_capacity_monotone(facts):
    d, base = priced(facts, "h800x320", "decode", batch=1, seq=1, kv_len=4096)
    cap = base["kv_capacity"]
    assert cap["tokens_per_gpu"] // 4096 == cap["sequences_per_dp_group"] == 4 * cap["sequences_per_gpu"]
    tgt = targets.get_target("h800x320")
    small = dataclasses.replace(tgt, gpu=dataclasses.replace(tgt.gpu, hbm_bytes=60 * 2**30))
    f = facts("decode", 1, 1, 4096)
    less = inf.kv_capacity(d, f, small, Constants.for_target(tgt), KV["main"], 4096, None)
    assert less["tokens_per_gpu"] < cap["tokens_per_gpu"]


def test_tpot_grows_with_batch_and_context(facts):
    tpot = lambda b, ctx: priced(facts, "h800x320", "decode", batch=b, seq=1, kv_len=ctx)[1]["tpot_seconds"]  # noqa: E731
    assert tpot(8, 4096) < tpot(32, 4096)
    assert tpot(8, 1024) < tpot(8, 4096)


def test_decode_split_adds_up_and_mtp_speeds_up(facts):
    _, f = priced(facts, "h800x320", "decode", batch=32, seq=1, kv_len=4096)
    assert sum(v["value"] for v in f["split_seconds"].values()) == pytest.approx(f["step_seconds"])
    s = f["mtp"]
    assert s["acceptance"] == 0.85 and 1 < s["speedup"] < 1.85 and s["step_cost_ratio"] > 1
    lo, hi = f["ranges"]["tpot_seconds"]
    assert lo <= f["tpot_seconds"] <= hi


def test_prefill_figures(facts):
    _, f = priced(facts, "h800x32", "prefill", batch=1, seq=4096)
    assert 0 < f["ttft_seconds"] < 10 and f["tokens_per_gpu_per_second"] > 0
    d = f["communication_per_micro_batch"]["moe"]["dispatch"]
    assert d["ib_bytes"] > 0 and d["nvlink_bytes"] > 0 and d["latency_seconds"] > 0
    _, longer = priced(facts, "h800x32", "prefill", batch=1, seq=8192)
    assert longer["ttft_seconds"] > f["ttft_seconds"]
