"""Config checks beyond types: finiteness, upper bounds, the FP8 block size and the rope_scaling numbers."""

import math

MAX_DIM = 1 << 20  # any size field (vocab, widths, positions) of a model dsv3c can compile
MAX_COUNT = 4096  # layers, heads, experts, groups

_COUNTS = ("num_hidden_layers", "num_attention_heads", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
           "n_group", "topk_group", "first_k_dense_replace", "num_nextn_predict_layers")
_DIMS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "q_lora_rank", "kv_lora_rank",
         "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_ROPE_NUMBERS = {"factor": (False, False), "original_max_position_embeddings": (False, False),
                 "beta_fast": (True, True), "beta_slow": (True, True), "mscale": (True, True),
                 "mscale_all_dim": (True, True), "attention_factor": (True, True)}  # key -> (optional, nullable)
SUPPORTED_BLOCK = [128, 128]


def _error(message: str):
    """Raise the ConfigError of message."""
    from model_def.config import ConfigError

    raise ConfigError(message)


def is_number(v) -> bool:
    """Whether v is a finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def non_finite(value, where: str = ""):
    """The path ('.a[0]') of the first NaN/inf float inside a JSON value, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = non_finite(item, f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]")
        if found is not None:
            return found
    return None


def check_bounds(cfg) -> None:
    """Raise ConfigError for the first count or size beyond what dsv3c compiles, or a non-finite float."""
    for name in ("routed_scaling_factor", "rope_theta", "rms_norm_eps"):
        if not is_number(getattr(cfg, name)):
            _error(f"{name} must be a finite number, got {getattr(cfg, name)}")
    if cfg.routed_scaling_factor <= 0:
        _error(f"routed_scaling_factor must be positive, got {cfg.routed_scaling_factor}")
    if not cfg.rms_norm_eps < 1:
        _error(f"rms_norm_eps must be in (0, 1), got {cfg.rms_norm_eps}")
    for name in _COUNTS:
        if getattr(cfg, name) > MAX_COUNT:
            _error(f"{name} must be at most {MAX_COUNT}, got {getattr(cfg, name)}")
    for name in (*_DIMS, "max_position_embeddings"):
        value = getattr(cfg, name)
        limit = MAX_DIM if name != "max_position_embeddings" else 1 << 24
        if value is not None and value > limit:
            _error(f"{name} must be at most {limit}, got {value}")
    if cfg.first_k_dense_replace > cfg.num_hidden_layers:
        _error(f"first_k_dense_replace ({cfg.first_k_dense_replace}) must not exceed num_hidden_layers "
               f"({cfg.num_hidden_layers})")


def check_rope_numbers(rs: dict) -> None:
    """Raise ConfigError unless every YaRN number in rope_scaling is a finite number in range."""
    for key, (optional, nullable) in _ROPE_NUMBERS.items():
        if key not in rs and optional:
            continue
        value = rs.get(key)
        if value is None and nullable:
            continue
        if not is_number(value) or value <= 0:
            _error(f"rope_scaling.{key} must be a positive finite number, got {value!r}")
    if not isinstance(rs.get("truncate", True), bool):
        _error(f"rope_scaling.truncate must be true or false, got {rs['truncate']!r}")
    if rs["factor"] < 1:
        _error(f"rope_scaling.factor must be at least 1, got {rs['factor']}")


def check_quantization(q) -> None:
    """Raise ConfigError unless quantization_config (if any) asks for the one supported FP8 recipe."""
    if q is None:
        return
    block = q.get("weight_block_size", SUPPORTED_BLOCK)
    if block != SUPPORTED_BLOCK or any(isinstance(b, bool) for b in block):
        _error(f"quantization_config.weight_block_size must be [128, 128] (the only supported block), got {block!r}")
    for key, allowed in (("quant_method", ("fp8",)), ("fmt", ("e4m3",)), ("activation_scheme", ("dynamic",))):
        if key in q and q[key] not in allowed:
            _error(f"quantization_config.{key} must be {' or '.join(map(repr, allowed))}, got {q[key]!r}")
