"""Inference plans (issue 12): deployment units, KV capacity, decode/prefill figures, MTP speculative decoding."""

import dataclasses

import pytest
import torch

import targets
from dsv3c.cost import inference as inf
from model_def import DeepseekV3, ModelConfig
from model_def.counts import parameter_counts

V3 = ModelConfig.preset("deepseek-v3")
TINY = ModelConfig.preset("tiny")
H32, H320 = targets.get_target("h800x32"), targets.get_target("h800x320")


@pytest.fixture(scope="module")
def c():
    return inf.constants()


@pytest.fixture(scope="module")
def decode_unit():
    return inf.make_unit(V3, H320, "decode")


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


# ---- units ---------------------------------------------------------------------------------------------------------


def test_default_units(decode_unit):
    p = inf.make_unit(V3, H32, "prefill")
    assert (p.tp, p.dp, p.ep, p.sp, p.routed_slots_per_gpu, p.redundant, p.shared) == (4, 8, 32, True, 9, 32, "local")
    d = decode_unit
    assert (d.tp, d.dp, d.ep, d.routed_slots_per_gpu, d.shared) == (4, 80, 320, 1, "dedicated")
    assert d.shared_replicas + d.redundant == 64 and d.shared_replicas == 32
    e144 = inf.make_unit(V3, targets.get_target("h800x144"), "decode")
    assert (e144.ep, e144.routed_slots_per_gpu, e144.redundant, e144.shared) == (144, 2, 32, "local")


@pytest.mark.parametrize("target, mode, kw", [
    ("h800x320", "decode", {"tp": 3}),  # TP must divide a node
    ("h800x320", "decode", {"ep": 7}),  # EP must divide the unit and stay node-aligned
    ("h800x8", "decode", {}),  # EP8: 32 experts x 58 layers per GPU do not fit in 80 GB
    ("h800x320", "train", {}),
])  # fmt: skip
def test_impossible_units_rejected(target, mode, kw, c):
    with pytest.raises(inf.UnitError) as e:
        tgt = targets.get_target(target)
        inf.kv_capacity(V3, tgt, inf.make_unit(V3, tgt, mode, **kw), 4096, c)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


# ---- KV capacity -----------------------------------------------------------------------------------------------------


def test_kv_bytes_per_token_from_config(c):
    assert inf.kv_bytes_per_token(V3, c)["main"] == 70_272 == 61 * (512 + 64) * 2


def test_weights_counted_from_config_match_meta_model():
    counts = parameter_counts(DeepseekV3(V3, device="meta"))  # meta: nothing materialised
    by = counts["by_component"]
    assert inf.expert_params(V3) * V3.n_routed_experts * 58 == by["routed_experts"]  # MTP's block counts under "mtp"
    rep, split = inf._attn_split(V3)
    assert (rep + split) * 61 == by["attention"]


def test_kv_capacity_monotone(decode_unit, c):
    small = dataclasses.replace(H320, gpu=dataclasses.replace(H320.gpu, hbm_bytes=60 * 2**30))
    a = inf.kv_capacity(V3, small, decode_unit, 4096, c)
    b = inf.kv_capacity(V3, H320, decode_unit, 4096, c)
    assert a["tokens_per_gpu"] < b["tokens_per_gpu"]
    long = inf.kv_capacity(V3, H320, decode_unit, 32768, c)
    assert long["sequences_per_gpu"] < b["sequences_per_gpu"]
    assert b["tokens_per_gpu"] // 4096 == b["sequences_per_dp_group"] == 4 * b["sequences_per_gpu"]  # TP4 replicated


def test_batch_overflow_rejected(decode_unit, c):
    fits = inf.kv_capacity(V3, H320, decode_unit, 4096, c, batch=32)
    assert fits["batch_fits"]
    with pytest.raises(inf.UnitError, match="latent cache"):
        inf.kv_capacity(V3, H320, decode_unit, 32768, c, batch=32)


# ---- decode and prefill figures ----------------------------------------------------------------------------------------


def test_tpot_monotone_in_batch_and_context(decode_unit, c):
    def tpot(b, ctx):
        return inf.decode_figures(V3, H320, decode_unit, b, ctx, c)["tpot_seconds"]

    assert tpot(8, 4096) < tpot(32, 4096) < tpot(64, 4096)
    assert tpot(32, 1024) < tpot(32, 4096) < tpot(32, 16384)
    f = inf.decode_figures(V3, H320, decode_unit, 32, 4096, c)
    assert f["communication_bound_seconds"] <= f["step_seconds"]
    assert abs(sum(f["split_seconds"].values()) - f["step_seconds"]) < 1e-12


def test_mtp_speedup(decode_unit, c):
    s = inf.mtp_speedup(V3, H320, decode_unit, 32, 4096, c)
    assert s["acceptance"] == 0.85 and 1 < s["speedup"] < 1.85 and s["step_cost_ratio"] > 1
    higher = inf.mtp_speedup(V3, H320, decode_unit, 32, 4096, inf.constants({"mtp_acceptance": 0.9}))
    assert higher["speedup"] > s["speedup"]


def test_prefill_figures(c):
    unit = inf.make_unit(V3, H32, "prefill")
    f = inf.prefill_figures(V3, H32, unit, 4096, c)
    assert 0 < f["ttft_seconds"] < 10 and f["tokens_per_gpu_per_second"] > 0
    d = f["communication_per_micro_batch"]["moe_block"]["dispatch"]
    assert d["ib_bytes"] > 0 and d["nvlink_bytes"] > 0
    assert inf.prefill_figures(V3, H32, unit, 8192, c)["ttft_seconds"] > f["ttft_seconds"]


def test_inference_plan_keys():
    p = inf.inference_plan(V3, H320, "decode", {"batch": 16, "kv_len": 4096}, {"mtp_acceptance": 0.9})
    i = p["inference"]
    assert p["parallel"]["ep"] == 320 and i["mtp"]["acceptance"] == 0.9
    for key in ("tpot_seconds", "tokens_per_gpu_per_second", "kv_capacity", "communication_per_micro_batch", "constants"):
        assert key in i
    assert all("source" in v for v in i["constants"].values())
    assert inf.report_sections(i)
