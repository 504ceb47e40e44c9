"""Config presets and validation, and the one-line errors of bad configs and bad checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model_def import ConfigError, DeepseekV3, ModelConfig
from model_def.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model_def.config import DEEPSEEK_V3, TINY

# ---- presets and the two config.json forms ----------------------------------------------


def test_presets_load():
    """Both presets build and validate; the 671B one has DeepSeek-V3's shape and derived numbers."""
    v3 = ModelConfig.preset("deepseek-v3")
    assert (v3.hidden_size, v3.num_hidden_layers, v3.n_routed_experts) == (7168, 61, 256)
    assert v3.num_nextn_predict_layers == 1
    assert v3.qk_head_dim == 192 and abs(v3.softmax_scale - 0.1352) < 1e-4
    assert ModelConfig.preset("tiny").hidden_size == TINY["hidden_size"]
    with pytest.raises(ConfigError, match="unknown model preset 'nope'"):
        ModelConfig.preset("nope")


def transformers5_form(hub: dict) -> dict:
    """The same config as transformers 5 writes it: rope_parameters (rope_theta inside) instead of rope_scaling."""
    t5 = {k: v for k, v in hub.items() if k not in ("rope_scaling", "rope_theta")}
    scaling = dict(hub.get("rope_scaling") or {})
    kind = scaling.pop("type", scaling.pop("rope_type", "default"))
    t5["rope_parameters"] = {"rope_type": kind, "rope_theta": hub["rope_theta"], **scaling}
    return t5


def write(tmp_path, name: str, raw) -> str:
    """Write raw (a dict as JSON, or text as is) to tmp_path/name and return the path."""
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
    return path


@pytest.mark.parametrize("preset", [DEEPSEEK_V3, TINY, {**TINY, "rope_scaling": None}])
def test_hub_and_transformers5_forms_agree(tmp_path, preset):
    """from_json on the hub form (rope_scaling + rope_theta) and on transformers-5's rope_parameters form agree."""
    hub = ModelConfig.from_json(write(tmp_path, "hub.json", preset))
    t5 = ModelConfig.from_json(write(tmp_path, "t5.json", transformers5_form(preset)))
    assert hub == t5
    assert hub.yarn == t5.yarn and hub.softmax_scale == t5.softmax_scale


# ---- bad configs ------------------------------------------------------------------------


def config_error(tmp_path, raw) -> str:
    """The one-line message of the ConfigError that from_json raises for raw."""
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_json(write(tmp_path, "config.json", raw))
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("field", ["hidden_size", "n_group", "kv_lora_rank", "num_experts_per_tok", "rope_theta"])
def test_missing_field(tmp_path, field):
    """A missing required field is named."""
    raw = {k: v for k, v in TINY.items() if k != field}
    assert f"'{field}'" in config_error(tmp_path, raw)


@pytest.mark.parametrize(
    "field, value",
    [("hidden_size", "64"), ("hidden_size", 64.0), ("norm_topk_prob", "yes"), ("rope_theta", "1e4"),
     ("scoring_func", 1), ("q_lora_rank", True), ("rope_scaling", [1, 2])],
)  # fmt: skip
def test_wrong_type(tmp_path, field, value):
    """A field of the wrong JSON type is named."""
    assert field in config_error(tmp_path, {**TINY, field: value})


@pytest.mark.parametrize(
    "change, field",
    [({"n_routed_experts": 18}, "n_routed_experts"), ({"topk_group": 5}, "topk_group"),
     ({"num_experts_per_tok": 17, "topk_group": 4}, "num_experts_per_tok"), ({"hidden_size": 0}, "hidden_size"),
     ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"), ({"scoring_func": "softmax"}, "scoring_func")],
)  # fmt: skip
def test_inconsistent_values(tmp_path, change, field):
    """Values no model can have (indivisible experts, too many groups or experts, ...) are named."""
    assert field in config_error(tmp_path, {**TINY, **change})


def test_invalid_json(tmp_path):
    """A config that is not JSON (or not an object) is refused, naming the file."""
    assert "not valid JSON" in config_error(tmp_path, '{"hidden_size": 64,')
    assert "JSON object" in config_error(tmp_path, "[1, 2]")


# ---- bad checkpoints --------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model (with MTP) and its checkpoint directory, written once."""
    model = DeepseekV3(ModelConfig.preset("tiny"))
    path = tmp_path_factory.mktemp("ckpt") / "plain"
    save_checkpoint(model, path)
    return model, path


@pytest.fixture
def ckpt(saved, tmp_path):
    """A fresh copy of the saved checkpoint to damage, and a model to load it into."""
    model, path = saved
    shutil.copytree(path, tmp_path / "c")
    return DeepseekV3(model.cfg), tmp_path / "c"


def tensors(path) -> dict:
    """All tensors of a single-file checkpoint."""
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def checkpoint_error(model, path, *words) -> str:
    """The one-line CheckpointError message of loading path into model; it must contain every word."""
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(model, path)
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def test_truncated_file(ckpt):
    """A safetensors file cut short is named, with the first tensor that runs past its end."""
    model, path = ckpt
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    checkpoint_error(model, path, "model.safetensors", "truncated", "runs past the end")
    file.write_bytes(data[:5])
    checkpoint_error(model, path, "model.safetensors", "truncated")


def test_corrupt_header(ckpt):
    """A header that is not JSON, or has an entry with a bad dtype, is named."""
    model, path = ckpt
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8] = ord("#")
    file.write_bytes(bytes(data))
    checkpoint_error(model, path, "model.safetensors", "corrupt")
    header = json.dumps({"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}).encode()
    file.write_bytes(len(header).to_bytes(8, "little") + header + b"\0")
    checkpoint_error(model, path, "model.safetensors", "corrupt", "tensor x")


def test_missing_tensor(ckpt):
    """A tensor the model needs and the checkpoint lacks is named (HF name and ours)."""
    model, path = ckpt
    raw = tensors(path)
    del raw["model.layers.2.mlp.experts.7.up_proj.weight"]
    save_file(raw, path / "model.safetensors")
    name = "model.layers.2.mlp.experts.7.up_proj.weight"
    checkpoint_error(model, path, f"missing tensor {name}", "layers.2.mlp.experts.up_proj")


def test_unexpected_tensor(ckpt):
    """A tensor the model has no place for is named; an MTP layer the config lacks says so."""
    model, path = ckpt
    raw = tensors(path)
    save_file({**raw, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}, path / "model.safetensors")
    checkpoint_error(model, path, "unexpected tensor model.layers.0.self_attn.rotary_emb.inv_freq")
    save_file({**raw, "model.layers.4.enorm.weight": torch.ones(64)}, path / "model.safetensors")
    checkpoint_error(model, path, "unexpected tensor model.layers.4.enorm.weight", "MTP")


def test_wrong_shape(ckpt):
    """A tensor of the wrong shape is named with both shapes."""
    model, path = ckpt
    raw = tensors(path)
    raw["model.layers.1.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)
    save_file(raw, path / "model.safetensors")
    checkpoint_error(model, path, "model.layers.1.self_attn.kv_b_proj.weight", "[3, 3]", "expected")


def test_wrong_dtype(ckpt):
    """An integer tensor where a weight belongs is refused."""
    model, path = ckpt
    raw = tensors(path)
    raw["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(raw, path / "model.safetensors")
    checkpoint_error(model, path, "model.norm.weight", "I32")


def test_fp8_scale_errors(saved, tmp_path):
    """An FP8 weight without its scale_inv, or with a wrongly shaped one, and a stray scale_inv, are named."""
    model, _ = saved
    save_checkpoint(model, tmp_path, fp8=True)
    raw = tensors(tmp_path)
    name = "model.layers.0.self_attn.o_proj.weight"
    scale = raw.pop(name + "_scale_inv")
    save_file(raw, tmp_path / "model.safetensors")
    checkpoint_error(DeepseekV3(model.cfg), tmp_path, f"{name} is FP8 but {name}_scale_inv is missing")
    save_file({**raw, name + "_scale_inv": torch.ones(2, 2)}, tmp_path / "model.safetensors")
    checkpoint_error(DeepseekV3(model.cfg), tmp_path, f"{name}_scale_inv", "[1, 1]")
    stray = "model.norm.weight_scale_inv"
    save_file({**raw, name + "_scale_inv": scale, stray: torch.ones(1, 1)}, tmp_path / "model.safetensors")
    checkpoint_error(DeepseekV3(model.cfg), tmp_path, f"unexpected tensor {stray}")


def test_sharded_errors(saved, tmp_path):
    """A missing shard, a corrupt index and an index naming a tensor its shard lacks are named."""
    model, _ = saved
    save_checkpoint(model, tmp_path, shard_bytes=50_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    data = (tmp_path / shard).read_bytes()
    (tmp_path / shard).unlink()
    checkpoint_error(DeepseekV3(model.cfg), tmp_path, shard, "missing")
    (tmp_path / shard).write_bytes(data)
    index["weight_map"]["model.extra.weight"] = shard
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    checkpoint_error(DeepseekV3(model.cfg), tmp_path, shard, "model.extra.weight", "not in this shard")
    (tmp_path / "model.safetensors.index.json").write_text("{oops")
    checkpoint_error(DeepseekV3(model.cfg), tmp_path, "model.safetensors.index.json", "corrupt")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickled_weights_refused(saved, tmp_path, name):
    """.bin / .pt weights are refused by name without being opened, alone or listed in an index."""
    model, _ = saved
    torch.save({"w": torch.ones(2)}, tmp_path / name)
    checkpoint_error(DeepseekV3(model.cfg), tmp_path, name, "not a safetensors file")
    checkpoint_error(DeepseekV3(model.cfg), tmp_path / name, name, "not a safetensors file")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": name}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    checkpoint_error(DeepseekV3(model.cfg), tmp_path, name, "not a safetensors file")


def test_no_checkpoint_and_meta_model(saved, tmp_path):
    """An empty directory, a missing path and a model on 'meta' are refused in one line."""
    model, path = saved
    checkpoint_error(DeepseekV3(model.cfg), tmp_path, "no model.safetensors")
    checkpoint_error(DeepseekV3(model.cfg), tmp_path / "absent", "absent")
    checkpoint_error(DeepseekV3(model.cfg, device="meta"), path, "meta")


def test_failed_load_leaves_model_untouched(ckpt):
    """Names and shapes are all checked before any weight is copied."""
    model, path = ckpt
    raw = tensors(path)
    del raw["model.norm.weight"]
    save_file(raw, path / "model.safetensors")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint_error(model, path, "model.norm.weight")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
