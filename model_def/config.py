"""ModelConfig: the HF `config.json` of a DeepSeek-V3-class model, validated, with presets."""

import json
import math
from dataclasses import asdict, dataclass, field, fields

from model_def import checks


class ConfigError(ValueError):
    """A config that cannot describe a model; the message names the field."""


_YARN_DEFAULTS = {"beta_fast": 32, "beta_slow": 1, "mscale": None, "mscale_all_dim": None, "attention_factor": None,
                  "truncate": True}


@dataclass
class ModelConfig:
    """The fields of DeepSeek-V3's config.json (HF names) that define the computation."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    first_k_dense_replace: int
    num_nextn_predict_layers: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    rope_scaling: dict | None = None
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    num_key_value_heads: int | None = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    quantization_config: dict | None = None
    name: str = "custom"
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: nope + rope dims (192 for V3)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn(self) -> dict | None:
        """The YaRN parameters with defaults filled in, or None when RoPE is not scaled."""
        rs = self.rope_scaling
        if not rs or _rope_kind(rs) != "yarn":
            return None
        return {**_YARN_DEFAULTS, **{k: v for k, v in rs.items() if v is not None}}  # null: the default, as in HF

    @property
    def softmax_scale(self) -> float:
        """Attention scale: qk_head_dim^-0.5 · mscale², mscale = 0.1·mscale_all_dim·ln(factor) + 1 with YaRN."""
        scale = self.qk_head_dim**-0.5
        y = self.yarn
        if y and y.get("mscale_all_dim") and y["factor"] > 1:
            m = 0.1 * y["mscale_all_dim"] * math.log(y["factor"]) + 1.0
            scale *= m * m
        return scale

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i is an MoE layer; the MTP block (index >= num_hidden_layers) always is, as in V3."""
        return self.n_routed_experts > 0 and (i >= self.first_k_dense_replace or i >= self.num_hidden_layers)

    # ---- construction -------------------------------------------------------------

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """A built-in config by name (see PRESETS): the published models and their tiny look-alikes for tests."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset '{name}' (known: {', '.join(sorted(PRESETS))})")
        return cls.from_dict(PRESETS[name], name=name)

    @classmethod
    def from_json(cls, path) -> "ModelConfig":
        """Read and validate an HF-format config.json (a regular file, size- and depth-capped: dsv3c.inputs)."""
        from dsv3c.inputs import MAX_CONFIG_BYTES, load_json

        raw = load_json(path, "config", MAX_CONFIG_BYTES, ConfigError)
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path} must hold a JSON object")
        return cls.from_dict(raw, name=str(raw.get("_name_or_path") or "custom"))

    @classmethod
    def from_dict(cls, raw: dict, name: str = "custom") -> "ModelConfig":
        """Build from a config dict (hub form or transformers-5 `rope_parameters` form) and validate."""
        raw = dict(raw)
        if "rope_parameters" in raw and "rope_scaling" not in raw:
            rp = raw.pop("rope_parameters") or {}
            if not isinstance(rp, dict):
                raise ConfigError(f"rope_parameters must be an object or null, got {json.dumps(rp)[:80]}")
            rp = dict(rp)
            if "rope_theta" in rp:
                raw.setdefault("rope_theta", rp.pop("rope_theta"))
            kind = rp.pop("rope_type", rp.pop("type", "default"))
            raw["rope_scaling"] = {"type": kind, **rp}
        if isinstance(raw.get("rope_scaling"), dict) and _rope_kind(raw["rope_scaling"]) == "default":
            raw["rope_scaling"] = None  # transformers' "default" rope type: no scaling
        if "num_nextn_predict_layers" not in raw and "num_mtp_layers" in raw:
            raw["num_nextn_predict_layers"] = raw["num_mtp_layers"]
        known = {f.name for f in fields(cls)} - {"name", "extra"}
        values = {k: raw[k] for k in known if k in raw}
        missing = [f.name for f in fields(cls) if f.name in _REQUIRED and f.name not in values]
        if missing:
            raise ConfigError(f"config is missing field '{missing[0]}'")
        values = {k: _check_type(k, v) for k, v in values.items()}
        extra = {k: v for k, v in raw.items() if k not in known}
        cfg = cls(**values, name=name, extra=extra)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value no model can have."""
        positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings", "n_group",
            "topk_group", "num_experts_per_tok", "intermediate_size", "moe_intermediate_size",
        ]  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ["n_routed_experts", "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"q_lora_rank must be positive or null, got {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ConfigError("rope_theta and rms_norm_eps must be positive")
        if self.num_key_value_heads not in (None, self.num_attention_heads):
            raise ConfigError("num_key_value_heads must equal num_attention_heads for MLA")
        if self.scoring_func != "sigmoid":
            raise ConfigError(f"scoring_func must be 'sigmoid', got '{self.scoring_func}'")
        if self.topk_method != "noaux_tc":
            raise ConfigError(f"topk_method must be 'noaux_tc', got '{self.topk_method}'")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act must be 'silu', got '{self.hidden_act}'")
        self._validate_unsupported()
        if self.n_routed_experts:
            self._validate_routing()
        if self.num_nextn_predict_layers > 1:
            raise ConfigError(f"num_nextn_predict_layers > 1 is not supported, got {self.num_nextn_predict_layers}")
        if self.rope_scaling is not None:
            self._validate_rope_scaling()
        checks.check_bounds(self)
        checks.check_quantization(self.quantization_config)

    def _validate_routing(self) -> None:
        """Check the expert, group and top-k counts fit together."""
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})"
            )
        if self.topk_group > self.n_group:
            raise ConfigError(f"topk_group ({self.topk_group}) must not exceed n_group ({self.n_group})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must not exceed "
                f"n_routed_experts ({self.n_routed_experts})"
            )
        per_group = self.n_routed_experts // self.n_group
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in topk_group "
                f"groups ({self.topk_group * per_group})"
            )

    def _validate_unsupported(self) -> None:
        """Refuse the options transformers accepts for this architecture that dsv3c's model does not implement."""
        if self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings true is not supported: dsv3c compiles a separate output head")
        if self.extra.get("attention_bias"):
            raise ConfigError("attention_bias true is not supported: dsv3c's MLA projections have no bias")
        if self.extra.get("rope_interleave", True) is not True:
            raise ConfigError("rope_interleave false is not supported: dsv3c rotates interleaved pairs (2i, 2i+1)")

    def _validate_rope_scaling(self) -> None:
        """Check the rope_scaling dict describes YaRN with sane numbers."""
        rs = self.rope_scaling
        if not isinstance(rs, dict):
            raise ConfigError("rope_scaling must be an object or null")
        kind = _rope_kind(rs)
        if kind != "yarn":
            raise ConfigError(f"rope_scaling type '{kind}' is not supported: dsv3c implements YaRN and unscaled RoPE")
        for key in ("factor", "original_max_position_embeddings"):
            if not isinstance(rs.get(key), (int, float)) or isinstance(rs.get(key), bool) or rs[key] <= 0:
                raise ConfigError(f"rope_scaling.{key} must be a positive number")
        checks.check_rope_numbers(rs)
        if self.rope_theta <= 1:  # YaRN's correction range divides by log(rope_theta)
            raise ConfigError(f"rope_theta must exceed 1 with YaRN rope_scaling, got {self.rope_theta}")

    def to_dict(self) -> dict:
        """The config as HF config.json fields (hub form), deterministic."""
        d = {k: v for k, v in asdict(self).items() if k not in ("name", "extra")}
        d["model_type"] = "deepseek_v3"
        return dict(sorted(d.items()))


_OPTIONAL = {
    "rope_scaling", "num_key_value_heads", "tie_word_embeddings", "hidden_act", "quantization_config", "scoring_func",
    "topk_method",
}  # fmt: skip
_REQUIRED = {f.name for f in fields(ModelConfig)} - _OPTIONAL - {"name", "extra"}
_FLOATS = {"routed_scaling_factor", "rope_theta", "rms_norm_eps"}
_BOOLS = {"norm_topk_prob", "tie_word_embeddings"}
_STRS = {"scoring_func", "topk_method", "hidden_act"}
_DICTS = {"rope_scaling", "quantization_config"}


def _rope_kind(rs: dict):
    """The rope type a rope_scaling dict names ('type' in hub configs, 'rope_type' in transformers 5)."""
    return rs.get("type", rs.get("rope_type"))


def _check_type(name: str, value):
    """Return value if it has the JSON type field `name` needs, else raise ConfigError."""
    if name in _FLOATS:
        ok = checks.is_number(value)
        return float(value) if ok else _type_error(name, "a finite number", value)
    if name in _BOOLS:
        return value if isinstance(value, bool) else _type_error(name, "true or false", value)
    if name in _STRS:
        return value if isinstance(value, str) else _type_error(name, "a string", value)
    if name in _DICTS:
        if value is not None and not isinstance(value, dict):
            _type_error(name, "an object or null", value)
        bad = checks.non_finite(value)
        if bad is not None:
            raise ConfigError(f"{name}{bad} must be a finite number")
        return value
    if value is None and name in ("q_lora_rank", "num_key_value_heads"):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else _type_error(name, "an integer", value)


def _type_error(name, wanted, value):
    """Raise the ConfigError for a field of the wrong JSON type."""
    shown = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    raise ConfigError(f"{name} must be {wanted}, got {shown[:80]}")



DEEPSEEK_V3 = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 3, "num_nextn_predict_layers": 1, "max_position_embeddings": 163840,
    "rope_theta": 10000, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu",
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]},
}  # fmt: skip

TINY = {
    **DEEPSEEK_V3,
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 48,
    "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
    "first_k_dense_replace": 1, "max_position_embeddings": 4096,
    "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 256, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
}  # fmt: skip

# moonshotai/Kimi-K2-Instruct's config.json (Kimi-K2-Base has the same shapes): DeepSeek-V3's layout with 384
# experts in one group (no node limit), 64 heads, a 163,840-token vocabulary, YaRN with beta_fast = beta_slow,
# one dense layer and no MTP module. tests/data/kimi_k2_instruct.config.json is the published file.
KIMI_K2 = {
    **DEEPSEEK_V3,
    "model_type": "kimi_k2", "vocab_size": 163840, "num_attention_heads": 64, "num_key_value_heads": 64,
    "n_routed_experts": 384, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.827,
    "first_k_dense_replace": 1, "num_nextn_predict_layers": 0, "max_position_embeddings": 131072,
    "rope_theta": 50000.0,
    "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0,
                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
}  # fmt: skip

# moonshotai/Moonlight-16B-A3B-Instruct's config.json (the base Moonlight-16B-A3B has the same architecture): no
# q-LoRA, 64 experts in one group, 2 shared, top-6, no rope scaling, no MTP module, BF16 weights.
# tests/data/moonlight_16b_a3b_instruct.config.json is the published file.
MOONLIGHT = {
    **{k: v for k, v in DEEPSEEK_V3.items() if k not in ("rope_scaling", "quantization_config")},
    "vocab_size": 163840, "hidden_size": 2048, "intermediate_size": 11264, "moe_intermediate_size": 1408,
    "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": None,
    "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1,
    "routed_scaling_factor": 2.446, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0,
    "max_position_embeddings": 8192, "rope_theta": 50000.0, "rms_norm_eps": 1e-5,
}  # fmt: skip

# tiny look-alikes of the two, for tests: the same departures from V3 at TINY's sizes
TINY_KIMI_K2 = {
    **TINY,
    "model_type": "kimi_k2", "vocab_size": 320, "n_routed_experts": 24, "n_group": 1, "topk_group": 1,
    "routed_scaling_factor": 2.827, "num_nextn_predict_layers": 0, "rope_theta": 50000.0,
    "rope_scaling": {**KIMI_K2["rope_scaling"], "original_max_position_embeddings": 256},
}  # fmt: skip
TINY_MOONLIGHT = {
    **{k: v for k, v in TINY.items() if k not in ("rope_scaling", "quantization_config")},
    "q_lora_rank": None, "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1,
    "routed_scaling_factor": 2.446, "num_nextn_predict_layers": 0, "rope_theta": 50000.0, "rms_norm_eps": 1e-5,
}  # fmt: skip

PRESETS = {"deepseek-v3": DEEPSEEK_V3, "kimi-k2": KIMI_K2, "moonlight": MOONLIGHT, "tiny": TINY,
           "tiny-kimi-k2": TINY_KIMI_K2, "tiny-moonlight": TINY_MOONLIGHT}
