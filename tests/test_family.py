"""The DeepSeek-V3 family: published configs and presets against transformers (parameter counts, logits), the
expected fan-out of routing without groups, and every mode compiling for every preset.

tests/data holds published config.json files, keys and values as published (compiled unchanged through
--config): kimi_k2_instruct.config.json is moonshotai/Kimi-K2-Instruct's on Hugging Face (as released in July
2025, transformers_version 4.48.3); moonlight_16b_a3b_instruct.config.json is moonshotai/Moonlight-16B-A3B-
Instruct's at revision 4e735b07a89f73647dfab71ab91b840f362ede5b (indented as HF writes it). The base models
(Kimi-K2-Base, Moonlight-16B-A3B) have the same architecture (Kimi-K2's model card, Moonlight's deployment docs).
"""

import copy
import functools
import json
from pathlib import Path

import pytest
import torch

import targets
from dsv3c.parallel.plan import expert_parallel
from dsv3c import cli
from dsv3c.ir import Plan
from dsv3c.placement import ExpertPlacement, expected_fanout
from model_def import ConfigError, DeepseekV3, ModelConfig
from model_def.config import PRESETS
from model_def.counts import parameter_counts
from passes.expert_partition import PartitionError
from tests.test_model_hf import EAGER, hf_logits, ours_logits, randomise, rel_err

transformers = pytest.importorskip("transformers")

DATA = Path(__file__).parent / "data"
PUBLISHED = {"kimi-k2": DATA / "kimi_k2_instruct.config.json",
             "moonlight": DATA / "moonlight_16b_a3b_instruct.config.json"}
FIELDS = [f for f in ModelConfig.__dataclass_fields__ if f not in ("name", "extra")]
KIMI_YARN = PRESETS["tiny-kimi-k2"]["rope_scaling"]
# the default pipeline without lower_triton (whose kernels for the full-size shapes take minutes to compile cold)
NO_KERNELS = "dce,mla_fuse,fp8_quant,expert_partition,cost,pipeline_partition"


def hf_config(raw: dict, **kwargs):
    """transformers' DeepseekV3Config of a config dict (a copy: transformers rewrites rope_scaling in place)."""
    return transformers.DeepseekV3Config(**copy.deepcopy(raw), **kwargs)


@functools.cache
def hf_main_parameters(name: str) -> int:
    """Parameters + router biases of transformers' DeepseekV3ForCausalLM for a preset, built on 'meta' (no MTP)."""
    with torch.device("meta"):
        model = transformers.DeepseekV3ForCausalLM(hf_config(PRESETS[name]))
    biases = sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    return sum(p.numel() for p in model.parameters()) + biases


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_is_the_preset(name):
    """The published config.json reads (through from_json) as the preset, field for field, and transformers takes it."""
    published = ModelConfig.from_json(PUBLISHED[name])
    preset = ModelConfig.preset(name)
    assert {f: getattr(published, f) for f in FIELDS} == {f: getattr(preset, f) for f in FIELDS}
    raw = json.loads(PUBLISHED[name].read_text())
    hf = hf_config(raw)
    assert (hf.n_group, hf.q_lora_rank, hf.n_routed_experts) == (preset.n_group, preset.q_lora_rank,
                                                                  preset.n_routed_experts)


def test_v3_releases_read_as_the_preset():
    """V3.1's FP8 config (UE8M0 scale format) and a transformers-5 form without rope scaling read with V3's shapes."""
    v31 = {**PRESETS["deepseek-v3"], "quantization_config": {**PRESETS["deepseek-v3"]["quantization_config"],
                                                             "scale_fmt": "ue8m0"}}
    v3 = ModelConfig.preset("deepseek-v3")
    assert {f: getattr(ModelConfig.from_dict(v31), f) for f in FIELDS if f != "quantization_config"} == {
        f: getattr(v3, f) for f in FIELDS if f != "quantization_config"}
    plain = {k: v for k, v in PRESETS["moonlight"].items() if k not in ("rope_scaling", "rope_theta")}
    t5 = ModelConfig.from_dict({**plain, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}})
    assert t5.rope_scaling is None and t5.yarn is None and t5.rope_theta == 50000.0


@pytest.mark.parametrize("change, phrase", [
    ({"tie_word_embeddings": True}, "tie_word_embeddings"), ({"attention_bias": True}, "attention_bias"),
    ({"rope_interleave": False}, "rope_interleave"), ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "'linear'"),
    ({"rope_scaling": {**KIMI_YARN, "truncate": "no"}}, "truncate"), ({"num_nextn_predict_layers": 2}, "> 1"),
])  # fmt: skip
def test_what_dsv3c_does_not_implement_is_refused_in_one_line(change, phrase):
    """Options transformers takes but dsv3c's model lacks are a one-line ConfigError naming the option."""
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict({**PRESETS["tiny-kimi-k2"], **change})
    assert phrase in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_counts_equal_transformers(name):
    """Main-model parameters (router bias included) equal transformers' model of the same config on 'meta'."""
    counts = parameter_counts(DeepseekV3(ModelConfig.preset(name), device="meta"))
    assert counts["main"] == hf_main_parameters(name)


def test_published_sizes():
    """Kimi-K2 is published as 1T total / 32B activated, Moonlight as 16B / 3B (A3B)."""
    kimi = parameter_counts(DeepseekV3(ModelConfig.preset("kimi-k2"), device="meta"))
    assert round(kimi["total"] / 1e12) == 1 and 32e9 <= kimi["activated_per_token"] < 33e9 and kimi["mtp"] == 0
    moon = parameter_counts(DeepseekV3(ModelConfig.preset("moonlight"), device="meta"))
    assert round(moon["total"] / 1e9) == 16 and round(moon["activated_per_token"] / 1e9) == 3


# ---- numerics of the variants against transformers ----------------------------------------------------------------

VARIANTS = {
    "kimi": PRESETS["tiny-kimi-k2"],  # one group, no MTP, more experts, other vocab and scale, beta_fast == beta_slow
    "moonlight": PRESETS["tiny-moonlight"],  # no q-LoRA, 2 shared experts, top-6 of one group, no rope scaling
    "yarn_untruncated": {**PRESETS["tiny-kimi-k2"],  # an empty correction range, an explicit attention factor
                         "rope_scaling": {**KIMI_YARN, "truncate": False, "attention_factor": 1.25}},
    "beta_fast_below_slow": {**PRESETS["tiny-kimi-k2"], "rope_scaling": {**KIMI_YARN, "beta_fast": 1, "beta_slow": 32}},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_logits_match_transformers(tmp_path, variant):
    """A tiny look-alike loaded from transformers' save_pretrained gives transformers' logits within 1e-4."""
    raw = VARIANTS[variant]
    hf = transformers.DeepseekV3ForCausalLM(hf_config(raw, **EAGER)).float().eval()
    randomise(hf, 7)
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_json(tmp_path / "config.json")
    expected = ModelConfig.from_dict(raw)
    assert {f: getattr(cfg, f) for f in FIELDS} == {f: getattr(expected, f) for f in FIELDS}
    ours = DeepseekV3(cfg)
    from model_def.checkpoint import load_checkpoint

    assert load_checkpoint(ours, tmp_path) == {}
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    assert rel_err(ours_logits(ours, ids), hf_logits(hf, ids)) < 1e-4


# ---- expected fan-out ---------------------------------------------------------------------------------------------


def monte_carlo_fanout(placement: ExpertPlacement, n_group: int, topk_group: int, top_k: int, tokens: int = 20000):
    """Mean distinct (nodes, GPUs) of sampled tokens: uniform topk_group groups, then uniform top_k experts in them."""
    gen = torch.Generator().manual_seed(0)
    e = placement.experts
    groups = torch.rand(tokens, n_group, generator=gen).topk(topk_group, dim=-1).indices
    kept = torch.zeros(tokens, n_group, dtype=torch.bool).scatter_(1, groups, True)
    kept = kept.repeat_interleave(e // n_group, dim=1)
    ids = torch.rand(tokens, e, generator=gen).masked_fill(~kept, -1).topk(top_k, dim=-1).indices
    gpus = placement.gpu_of_slot(placement.log2phy[0, :, 0][ids])
    nodes = placement.node_of_gpu(gpus)

    def distinct(t):
        s = t.sort(-1).values
        return (1 + (s[:, 1:] != s[:, :-1]).sum(-1)).double().mean().item()

    return distinct(nodes), distinct(gpus)


def shuffled_placement(experts: int, gpus: int, gpus_per_node: int, replicas: int, seed: int) -> ExpertPlacement:
    """A random placement of experts (plus `replicas` extra copies of random experts) over gpus."""
    gen = torch.Generator().manual_seed(seed)
    phy2log = torch.cat([torch.arange(experts), torch.randint(0, experts, (replicas,), generator=gen)])
    phy2log = phy2log[torch.randperm(phy2log.numel(), generator=gen)][None]
    from dsv3c.eplb import inverse_tables

    return ExpertPlacement(gpus, gpus_per_node, phy2log, *inverse_tables(phy2log, experts))


@pytest.mark.parametrize("n_group, topk_group, top_k", [(1, 1, 6), (4, 2, 3), (8, 3, 5), (4, 4, 8)])
def test_expected_fanout_matches_monte_carlo(n_group, topk_group, top_k):
    """The hypergeometric expectation agrees with sampled routing on a shuffled placement with replicas."""
    placement = shuffled_placement(32, 16, 4, 16, seed=n_group * 10 + top_k)
    got = expected_fanout(placement, n_group, topk_group, top_k)
    sampled = monte_carlo_fanout(placement, n_group, topk_group, top_k)
    assert got == pytest.approx(sampled, abs=0.04)


def test_expected_fanout_exact_cases():
    """One expert per GPU: top_k distinct GPUs; one node: one node; groups on their own nodes: topk_group nodes."""
    one_each = ExpertPlacement.contiguous(1, 16, 16, 4)
    assert expected_fanout(one_each, 1, 1, 5)[1] == pytest.approx(5)
    assert expected_fanout(ExpertPlacement.contiguous(1, 16, 4, 4), 1, 1, 5)[0] == pytest.approx(1)
    assert expected_fanout(one_each, 4, 2, 8)[0] == pytest.approx(2)  # 4 groups of 4 on 4 nodes, both groups full


# ---- expert_partition without a node limit ------------------------------------------------------------------------


def test_expert_partition_without_groups_plans_the_fanout():
    """n_group 1 over 2 nodes: no limit to prove (no PartitionError); the stats carry the expected fan-out."""
    import passes
    from dsv3c.frontend.exporter import capture

    cfg = ModelConfig.preset("tiny-kimi-k2")
    program = capture(cfg, "prefill", batch=1, seq=4)
    plan = Plan(program, targets.get_target("h800x16"))
    plan.analyses.parallel = expert_parallel(cfg, "prefill", 8, 4)
    stats = passes.REGISTRY["expert_partition"].fn(plan, {})
    assert stats["node_limited"] is False and stats["max_nodes_per_token"] == 2
    want = expected_fanout(ExpertPlacement.contiguous(1, cfg.n_routed_experts, 8, 4), 1, 1, cfg.num_experts_per_tok)
    got = (stats["expected_nodes_per_token"], stats["expected_gpus_per_token"])
    assert got == (round(want[0], 4), round(want[1], 4))
    tiny = ModelConfig.preset("tiny")
    grouped = Plan(capture(tiny, "prefill", batch=1, seq=4), targets.get_target("h800x16"))
    grouped.analyses.parallel = expert_parallel(tiny, "prefill", 16, 2)
    with pytest.raises(PartitionError, match="topk_group=2"):  # 4 groups on 8 nodes of 2: a token reaches 4 nodes
        passes.REGISTRY["expert_partition"].fn(grouped, {})


def test_training_search_keeps_the_node_limit():
    """On 1024 GPUs V3's candidate layouts stop at EP64 (its 8 groups on 8 nodes); Kimi-K2's (one group) go beyond."""
    from dsv3c.parallel.build import candidates

    t = targets.get_target("h800x1024")
    v3 = {c.ep for c in candidates(ModelConfig.preset("deepseek-v3"), t, 15360, {}, None, None)}
    kimi = {c.ep for c in candidates(ModelConfig.preset("kimi-k2"), t, 15360, {}, None, None)}
    assert max(v3) == 64 and 128 in kimi


# ---- every mode compiles for every preset -------------------------------------------------------------------------

# (preset, mode) -> (source, target, pass list). The 671B's training compile (the full default pipeline, node limit
# proven over 8 nodes) is test_cli's; its prefill unit would repeat Kimi-K2's at the same size. The tiny look-alikes
# lower to kernels in decode, the mode with the most kernel families (latent attention, no q-LoRA, one-group router).
COMPILES = {
    ("deepseek-v3", "decode"): (["--model", "deepseek-v3"], "h800x320", NO_KERNELS),
    ("kimi-k2", "train"): (["--config", str(PUBLISHED["kimi-k2"])], "h800x2048", NO_KERNELS),
    ("kimi-k2", "prefill"): (["--model", "kimi-k2"], "h800x32", NO_KERNELS),
    ("kimi-k2", "decode"): (["--model", "kimi-k2"], "h20x16", NO_KERNELS),
    ("moonlight", "train"): (["--config", str(PUBLISHED["moonlight"])], "h800x64", NO_KERNELS),
    ("moonlight", "prefill"): (["--model", "moonlight"], "h800x16", NO_KERNELS),
    ("moonlight", "decode"): (["--model", "moonlight"], "h20x16", NO_KERNELS),
    **{(tiny, mode): (["--model", tiny], "h800x8", None if mode == "decode" else NO_KERNELS)
       for tiny in ("tiny-kimi-k2", "tiny-moonlight") for mode in ("train", "prefill", "decode")},
}


@pytest.mark.parametrize("preset, mode", sorted(COMPILES))
def test_every_mode_compiles(tmp_path, capsys, preset, mode):
    """`dsv3c compile` exits 0 with a plan whose parameters equal transformers' and whose routing is planned as set."""
    source, target, pipeline = COMPILES[preset, mode]
    args = ["compile", *source, "--target", target, "--mode", mode, "--out", str(tmp_path / "out")]
    assert cli.main(args + (["--passes", pipeline] if pipeline else [])) == 0, capsys.readouterr().err
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["model"]["params"]["main"] == hf_main_parameters(preset)
    cfg = ModelConfig.preset(preset)
    ep = next(p["stats"] for p in plan["passes"] if p["name"] == "expert_partition")
    assert ep["node_limited"] == (cfg.n_group > 1 and cfg.topk_group < cfg.n_group)
    assert 1 <= ep["expected_nodes_per_token"] <= ep["max_nodes_per_token"]
    report = (tmp_path / "out" / "report.txt").read_text()
    assert ("MTP speculative decoding" in report) == (mode == "decode" and cfg.num_nextn_predict_layers > 0)
    if pipeline is None:
        assert plan["kernels"]
