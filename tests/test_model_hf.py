"""Parity with transformers' DeepseekV3ForCausalLM via HF-layout checkpoints (plain and FP8); MTP round trips."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3c.ops import fp8
from model_def import DeepseekV3, ModelConfig
from model_def.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
# HF's defaults: grouped_mm experts need 16-byte strides, sdpa attention; eager is exact for tiny shapes
EAGER = {"experts_implementation": "eager", "attn_implementation": "eager"}


@st.composite
def hf_configs(draw) -> dict:
    """Keyword arguments of a tiny, valid DeepseekV3Config (no MTP: HF's causal LM has no MTP weights)."""
    n_group = draw(st.integers(1, 3))
    per_group = draw(st.integers(2, 3))  # HF's router takes the top-2 of each group
    topk_group = draw(st.integers(1, n_group))
    dense, moe = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    rope = {"rope_type": "default", "rope_theta": draw(st.sampled_from([100.0, 10000.0]))}
    if draw(st.booleans()):
        mscale, mscale_all_dim = draw(st.sampled_from([(1.0, 1.0), (0.707, 0.707), (1.0, 0.5)]))
        rope.update(
            rope_type="yarn", factor=draw(st.sampled_from([2.0, 4.0, 40.0])), original_max_position_embeddings=16,
            beta_fast=32, beta_slow=1, mscale=mscale, mscale_all_dim=mscale_all_dim,
        )  # fmt: skip
    return dict(
        vocab_size=draw(st.integers(8, 40)), hidden_size=draw(st.sampled_from([8, 16, 24])),
        intermediate_size=draw(st.integers(4, 24)), moe_intermediate_size=draw(st.integers(2, 12)),
        num_hidden_layers=max(dense + moe, 1), first_k_dense_replace=dense,
        num_attention_heads=(h := draw(st.integers(1, 3))), num_key_value_heads=h,
        q_lora_rank=draw(st.none() | st.integers(2, 12)), kv_lora_rank=draw(st.integers(2, 12)),
        qk_nope_head_dim=draw(st.integers(1, 8)), qk_rope_head_dim=draw(st.sampled_from([2, 4, 6])),
        v_head_dim=draw(st.integers(1, 8)), n_routed_experts=n_group * per_group, n_group=n_group,
        topk_group=topk_group, num_experts_per_tok=draw(st.integers(1, topk_group * per_group)),
        n_shared_experts=draw(st.integers(1, 2)), routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
        norm_topk_prob=draw(st.booleans()), max_position_embeddings=64, rope_parameters=rope, num_mtp_layers=0,
    )  # fmt: skip


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Random weights with O(1) activations: matrices ~ N(0, 1/fan_in), norms ~ 1 ± 0.2, router bias ~ N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def hf_config_json(path) -> ModelConfig:
    """Our config from the config.json HF wrote (it has no scoring_func/topk_method: V3's defaults apply)."""
    return ModelConfig.from_json(path / "config.json")


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours − ref| / max|ref|."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of an HF causal LM for ids, without a cache."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def ours_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of our model for ids."""
    with torch.no_grad():
        return model(ids)


def dequantised_copy(src, dst) -> None:
    """Write src's FP8 checkpoint dequantised (weight × scale_inv) as a float32 checkpoint at dst, config included."""
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(config))
    with safe_open(src / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        out = {}
        for k in keys - {k for k in keys if k.endswith("_scale_inv")}:
            t = f.get_tensor(k)
            out[k] = fp8.weight_dequant(t, f.get_tensor(k + "_scale_inv")) if k + "_scale_inv" in keys else t
    save_file(out, dst / "model.safetensors")


@given(kwargs=hf_configs(), seed=st.integers(0, 2**16), seq=st.integers(1, 7))
def test_hf_parity_plain_and_fp8(tmp_path_factory, kwargs, seed, seq):
    """Our model loaded from HF's save_pretrained (and from an FP8 copy of it) gives HF's logits."""
    tmp = tmp_path_factory.mktemp("hf")
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**kwargs, **EAGER)).float().eval()
    randomise(hf, seed)
    hf.save_pretrained(tmp / "plain")
    cfg = hf_config_json(tmp / "plain")
    ours = DeepseekV3(cfg)
    assert load_checkpoint(ours, tmp / "plain") == {}
    ids = torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(seed))
    ref = hf_logits(hf, ids)
    assert rel_err(ours_logits(ours, ids), ref) < 1e-5

    save_checkpoint(ours, tmp / "fp8", fp8=True)
    ours8 = DeepseekV3(ModelConfig.from_json(tmp / "fp8" / "config.json"))
    stored = load_checkpoint(ours8, tmp / "fp8")
    assert stored and all(w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 for w, s in stored.values())
    dequantised_copy(tmp / "fp8", tmp / "deq")
    hf8 = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp / "deq", dtype=torch.float32, **EAGER).eval()
    assert rel_err(ours_logits(ours8, ids), hf_logits(hf8, ids)) < 1e-5


def test_hf_writes_per_expert_names_and_no_mtp(tmp_path):
    """save_pretrained writes per-expert tensors under `model.` and no MTP layer, even with num_mtp_layers=1."""
    cfg = transformers.DeepseekV3Config(
        vocab_size=16, hidden_size=8, intermediate_size=8, moe_intermediate_size=4, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=4, kv_lora_rank=4,
        qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2, n_routed_experts=4, n_group=2, topk_group=1,
        num_experts_per_tok=2, num_mtp_layers=1,
    )  # fmt: skip
    transformers.DeepseekV3ForCausalLM(cfg).save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in keys
    assert not any("gate_up_proj" in k or k.startswith("model.layers.2.") for k in keys)


def tiny_mtp_model(seed: int, dtype=None) -> DeepseekV3:
    """The tiny preset (one MTP module) with random weights and a non-zero router bias."""
    model = DeepseekV3(ModelConfig.preset("tiny"), dtype=dtype)
    randomise(model, seed)
    return model


def state(model) -> dict:
    """Detached copies of the model's state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("shard_bytes", [None, 40_000])
def test_mtp_round_trip_bit_exact(tmp_path, shard_bytes):
    """save_checkpoint → load_checkpoint restores every tensor, MTP included, bit for bit (single file or sharded)."""
    model = tiny_mtp_model(0)
    save_checkpoint(model, tmp_path, shard_bytes=shard_bytes)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard_bytes is not None)
    other = DeepseekV3(ModelConfig.from_json(tmp_path / "config.json"))
    load_checkpoint(other, tmp_path)
    for k, v in state(model).items():
        assert torch.equal(other.state_dict()[k], v), k


def test_mtp_names_in_file(tmp_path):
    """MTP module 0 is written at layer num_hidden_layers with HF's MTP names."""
    model = tiny_mtp_model(1)
    save_checkpoint(model, tmp_path)
    n = model.cfg.num_hidden_layers
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    names = ["enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "self_attn.kv_b_proj.weight",
             "mlp.experts.0.down_proj.weight", "mlp.gate.e_score_correction_bias"]  # fmt: skip
    for name in names:
        assert f"model.layers.{n}.{name}" in keys
    assert not any(k.startswith("mtp.") or k.startswith(f"model.layers.{n + 1}.") for k in keys)


def test_fp8_round_trip(tmp_path):
    """An FP8 save keeps embedding, head, norms, router and eh_proj unquantised; loading dequantises the rest."""
    model = tiny_mtp_model(2)
    save_checkpoint(model, tmp_path, fp8=True)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
    n = model.cfg.num_hidden_layers
    for name in ["model.embed_tokens.weight", "lm_head.weight", f"model.layers.{n}.eh_proj.weight",
                 "model.layers.1.mlp.gate.weight", "model.norm.weight"]:  # fmt: skip
        assert raw[name].dtype == torch.float32 and name + "_scale_inv" not in raw
    assert raw["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert raw["model.layers.1.mlp.experts.5.up_proj.weight"].dtype == torch.float8_e4m3fn
    other = DeepseekV3(model.cfg)
    stored = load_checkpoint(other, tmp_path)
    wq, s = stored["layers.1.self_attn.q_b_proj.weight"]
    assert torch.equal(wq.view(torch.uint8), raw["model.layers.1.self_attn.q_b_proj.weight"].view(torch.uint8))
    assert torch.equal(other.layers[1].self_attn.q_b_proj.weight, fp8.weight_dequant(wq, s))
    wq, s = stored["mtp.0.block.mlp.experts.down_proj"]
    assert wq.shape == (16, 64, 32) and s.shape == (16, 1, 1)
    assert torch.equal(other.mtp[0].block.mlp.experts.down_proj[3], fp8.weight_dequant(wq[3], s[3]))
    assert torch.equal(other.mtp[0].eh_proj.weight, model.mtp[0].eh_proj.weight)


def test_bf16_model_loads_fp8_into_its_dtype(tmp_path):
    """A BF16 model gets the dequantised weights in BF16 and the router bias in float32."""
    model = tiny_mtp_model(3)
    save_checkpoint(model, tmp_path, fp8=True)
    other = DeepseekV3(model.cfg, dtype=torch.bfloat16)
    stored = load_checkpoint(other, tmp_path)
    w = other.layers[0].mlp.gate_proj.weight
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, fp8.weight_dequant(*stored["layers.0.mlp.gate_proj.weight"]).to(torch.bfloat16))
    bias = other.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, model.layers[1].mlp.gate.e_score_correction_bias)


def test_fused_expert_names_and_mtp_copies_accepted(tmp_path):
    """transformers-5's fused gate_up/down expert names load, and MTP copies of head/embedding are checked."""
    model = tiny_mtp_model(4)
    save_checkpoint(model, tmp_path)
    path = tmp_path / "model.safetensors"
    with safe_open(path, "pt") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
    e = model.cfg.n_routed_experts
    for layer in (1, 2):
        p = f"model.layers.{layer}.mlp.experts"
        gate = torch.stack([raw.pop(f"{p}.{i}.gate_proj.weight") for i in range(e)])
        up = torch.stack([raw.pop(f"{p}.{i}.up_proj.weight") for i in range(e)])
        raw[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        raw[f"{p}.down_proj"] = torch.stack([raw.pop(f"{p}.{i}.down_proj.weight") for i in range(e)])
    n = model.cfg.num_hidden_layers
    raw[f"model.layers.{n}.shared_head.head.weight"] = raw["lm_head.weight"].clone()
    raw[f"model.layers.{n}.embed_tokens.weight"] = raw["model.embed_tokens.weight"].clone()
    save_file(raw, path)
    other = DeepseekV3(model.cfg)
    load_checkpoint(other, tmp_path)
    for k, v in state(model).items():
        assert torch.equal(other.state_dict()[k], v), k
    raw[f"model.layers.{n}.shared_head.head.weight"][0, 0] += 1
    save_file(raw, path)
    with pytest.raises(CheckpointError, match=f"model.layers.{n}.shared_head.head.weight differs"):
        load_checkpoint(other, tmp_path)
