"""The block facts the planner prices (op records through the cost pass) against closed-form oracles."""

import dataclasses

import pytest

import passes
import targets
from dsv3c.cost.facts import analyse, block_counts
from dsv3c.cost.figures import lift_positions
from model_def import DeepseekV3, ModelConfig
from model_def.counts import parameter_counts
from tests import oracles

V3 = ModelConfig.preset("deepseek-v3")
TINY = ModelConfig.preset("tiny")
SHAPES = {"batch": 1, "seq": 256, "kv_len": 0}


@pytest.fixture(scope="module", params=["deepseek-v3", "tiny"])
def train_facts(request):
    cfg = lift_positions(ModelConfig.preset(request.param), SHAPES)
    facts, _ = analyse(cfg, "train", SHAPES, targets.get_target("h800x8"), passes.REGISTRY)
    return cfg, facts


def test_gemm_and_attention_flops_equal_the_closed_forms(train_facts):
    cfg, facts = train_facts
    for kind in ("dense", "moe", "head", "mtp"):
        if kind not in facts.blocks:
            continue
        fs = facts.blocks[kind]
        tokens = facts.tokens - 1 if kind == "mtp" else facts.tokens  # MTP runs on the positions with a next token
        gemm = sum(f["flops"] * f["count"] for f in fs if f["kernel"] in ("gemm", "experts"))
        want = sum(v for k, v in oracles.gemm_flops_per_token(cfg, kind).items() if not k.startswith("_")) * tokens
        if kind != "head" and cfg.q_lora_rank:  # mla_fuse pads W^DQ to whole 128-row FP8 blocks in the fused GEMM
            want += 2 * (-cfg.q_lora_rank % 128) * cfg.hidden_size * tokens
        assert gemm == want, (kind, gemm, want)
        core = sum(f["flops"] * f["count"] for f in fs if f["kernel"] == "attention")
        want_core = oracles.attention_core_flops_per_token(cfg, tokens) * tokens if kind != "head" else 0
        assert core == pytest.approx(want_core, rel=1e-12), kind
        # Wgrad: one forward's worth for every GEMM with a weight (the attention core has none)
        wgrad = sum(f["wgrad_flops"] * f["count"] for f in fs)
        assert wgrad == gemm, kind
        assert all(f["bwd_flops"] >= f["wgrad_flops"] for f in fs)


def test_block_params_equal_the_closed_forms(train_facts):
    cfg, facts = train_facts
    embedding = cfg.hidden_size * cfg.vocab_size
    for kind in ("dense", "moe", "head", "mtp"):
        if kind not in facts.params:
            continue
        got, want = facts.params[kind], oracles.params(cfg, kind)
        shared = {"head": embedding, "mtp": embedding}.get(kind, 0)  # the MTP's embedding lookup sits with the
        # head's nodes, its shared output head in the MTP block: each reads the shared weight
        assert got["dense"] == want["dense"] + shared + (_pad(cfg) if kind != "head" else 0), (kind, got, want)
        assert got["expert"] == want["expert"], kind


def test_every_parameter_is_in_exactly_one_block_but_the_shared_ones(train_facts):
    cfg, facts = train_facts
    counts = block_counts(cfg)
    total = sum((p["dense"] + p["expert"]) * counts[k] for k, p in facts.params.items())
    model = DeepseekV3(cfg, device="meta")
    params = parameter_counts(model)["total"]
    buffers = model.get_buffer("rotary.inv_freq").numel()  # the RoPE frequencies, read as a weight of the graph
    shared = 2 * cfg.hidden_size * cfg.vocab_size if cfg.num_nextn_predict_layers else 0
    blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    assert total == params + buffers + shared + blocks * _pad(cfg)


def _pad(cfg) -> int:
    """Zero rows mla_fuse adds to W^DQ in the fused down-projection (whole 128-row FP8 blocks), as elements."""
    return (-cfg.q_lora_rank % 128) * cfg.hidden_size if cfg.q_lora_rank else 0


def test_flops_per_token_from_facts_equal_the_model_figures():
    cfg = dataclasses.replace(TINY, max_position_embeddings=8192)
    from dsv3c.cost.figures import mode_figures

    got = mode_figures(cfg, "train", targets.get_target("h800x8"), passes.REGISTRY)
    facts = got["facts"]
    assert facts.flops_per_token(main_only=False) == pytest.approx(got["model"], abs=1)
    assert facts.flops_per_token(main_only=True) == pytest.approx(got["main"], abs=1)
    assert facts.hardware_flops_per_token() == pytest.approx(got["hardware"], abs=1)
