"""Parameter counts of a DeepseekV3 by component, computed from its module structure (works on 'meta').

An elided model (`DeepseekV3(..., elided=True)`) counts each built layer as many times as it stands for,
so its counts are the whole model's.
"""

from torch import nn

from model_def.modules import MLA, MLP, Experts, Gate, MoE, RMSNorm

COMPONENTS = (
    "embedding", "attention", "dense_mlp", "shared_experts", "routed_experts", "router", "norms", "head", "mtp",
)  # fmt: skip


def _component(path: list[nn.Module], name: str) -> str:
    """The component of a tensor owned by the last module of path (its ancestors from the root first)."""
    if name.startswith("mtp."):
        return "mtp"
    if name.startswith("embed_tokens."):
        return "embedding"
    if name.startswith("lm_head."):
        return "head"
    kinds = [type(m) for m in path]
    if RMSNorm in kinds:
        return "norms"
    if Gate in kinds:
        return "router"
    if Experts in kinds:
        return "routed_experts"
    if MLA in kinds:
        return "attention"
    if MLP in kinds:
        return "shared_experts" if MoE in kinds else "dense_mlp"
    raise ValueError(f"no component for tensor {name}")


def _tensors(model: nn.Module):
    """(component, fqn, numel) of every parameter and persistent buffer (the router bias) of model."""
    def walk(mod: nn.Module, prefix: str, path: list[nn.Module]):
        persistent = set(mod._buffers) - mod._non_persistent_buffers_set
        buffers = [(n, b) for n, b in mod.named_buffers(recurse=False) if n in persistent]
        own = [*mod.named_parameters(recurse=False), *buffers]
        for n, t in own:
            yield _component(path + [mod], prefix + n), prefix + n, t.numel()
        for n, child in mod.named_children():
            yield from walk(child, f"{prefix}{n}.", path + [mod])

    yield from walk(model, "", [])


def _repeats(model: nn.Module, fqn: str) -> int:
    """How many layers of the config the tensor or module fqn stands for (its layer's repeats, else 1)."""
    parts = fqn.split(".")
    return model.layer_repeats().get(".".join(parts[:2]), 1) if parts[0] == "layers" else 1


def parameter_counts(model: nn.Module) -> dict:
    """{total, main, mtp, activated_per_token, by_component}; activated = main's non-expert + top-k experts."""
    by = dict.fromkeys(COMPONENTS, 0)
    for comp, fqn, n in _tensors(model):
        by[comp] += n * _repeats(model, fqn)
    main = sum(v for k, v in by.items() if k != "mtp")
    top_k = model.cfg.num_experts_per_tok
    active_experts = 0
    for name, mod in model.named_modules():
        if isinstance(mod, Experts) and not name.startswith("mtp."):
            per_expert = sum(p.numel() for p in mod.parameters()) // mod.gate_proj.shape[0]
            active_experts += top_k * per_expert * _repeats(model, name)
    return {
        "total": main + by["mtp"],
        "main": main,
        "mtp": by["mtp"],
        "activated_per_token": main - by["routed_experts"] + active_experts,
        "by_component": by,
    }
