"""The precision policy: which GEMM components run in FP8 (DeepSeek-V3's recipe) and which stay BF16/FP32.

A compile-wide setting (`plan.options['precision']`): fp8_quant applies it, and the cost package reads it
to price each GEMM in its dtype (mla_fuse's choice among attention forms, for one).
"""

# The DeepSeek-V3 recipe: FP8 for the big linear GEMMs; embedding, head, router, norms, attention core
# and the MTP projection stay in BF16/FP32. Override per component with `--precision`.
DEFAULT_POLICY = {
    "attention_proj": "fp8",
    "dense_mlp": "fp8",
    "shared_experts": "fp8",
    "routed_experts": "fp8",
    "embedding": "bf16",
    "lm_head": "bf16",
    "router": "fp32",
    "norms": "fp32",
    "attention_core": "bf16",
    "mtp_eh_proj": "bf16",
}
SWITCHABLE = ("attention_proj", "dense_mlp", "shared_experts", "routed_experts", "lm_head", "mtp_eh_proj")


class PolicyError(ValueError):
    """A precision override names an unknown component or a dtype the component cannot take."""


def resolve_policy(overrides: dict | None) -> dict:
    """The default policy with user overrides applied (only GEMM components may switch to/from fp8)."""
    policy = dict(DEFAULT_POLICY)
    for component, dtype in (overrides or {}).items():
        if component not in policy:
            raise PolicyError(f"unknown precision component '{component}' (known: {', '.join(policy)})")
        if dtype not in ("fp8", "bf16") or (dtype == "fp8" and component not in SWITCHABLE):
            raise PolicyError(f"precision '{component}={dtype}' is not supported")
        policy[component] = dtype
    return policy
