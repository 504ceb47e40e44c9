"""mla_fuse: fuse the MLA down-projections, cache the latent, absorb the up-projections where cheaper.

Per attention block (found by module path, e.g. 'layers.5.self_attn'):
1. q_a_proj and kv_a_proj_with_mqa read the same x: one GEMM against [W^DQ; 0; W^DKV,W^KR], then a split.
   The zero rows pad W^DQ to whole 128-row blocks (none for V3's 1536), so FP8 blocks and scales stay
   per segment and the FP8 GEMM's block indexing (scale row = output row // 128) needs no change;
   program.weight_segments records each fused weight's (source fqn, rows) segments.
2. Prefill/decode caches become latent: c^KV after its norm (r) and the RoPE key k^R (dr) per token.
3. The pricing module compares the plain form (up-project K and V for every key) with the absorbed form
   (q·W^UK against the latent cache, W^UV after attention) for the captured shapes and picks the cheaper,
   with the compile's cost constants (`plan.options['constants']`, default the target's).
4. Training: RMSNorms and the up-projections are marked for recomputation in backward.
"""

import operator

import torch
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

import dsv3c.ops  # noqa: F401  (registers torch.ops.dsv3)
from dsv3c.cost.constants import Constants
from dsv3c.cost.mla import attention_form_costs, cheapest_buildable
from dsv3c.ir import Plan, Program, module_path
from dsv3c.ir.precision import resolve_policy
from dsv3c.ops import fp8
from dsv3c.ops.record import nbytes
from passes.registry import Option, register

aten = torch.ops.aten
dsv3 = torch.ops.dsv3


def attention_blocks(program: Program) -> dict[str, dict[str, fx.Node]]:
    """The nodes of each attention block keyed by role, by the block's module path."""
    blocks: dict[str, dict] = {}
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        path = module_path(node)
        if ".self_attn" not in path:
            continue
        prefix, _, leaf = path.partition(".self_attn")
        roles = blocks.setdefault(prefix + ".self_attn", {})
        leaf = leaf.lstrip(".")
        if leaf and node.target in (aten.linear.default, dsv3.rms_norm.default):
            roles[leaf] = node
        elif node.target is dsv3.mla_attention.default:
            roles["attention"] = node
        elif node.target is dsv3.rope.default and node.meta["val"].dim() == 3:
            roles["k_pe"] = node
    return {k: v for k, v in blocks.items() if "attention" in v}


def cache_index(program: Program, block: str) -> int:
    """The cache slot of an attention block: its layer index, MTP blocks after the main layers."""
    parts = block.split(".")
    n = program.cfg.num_hidden_layers
    return int(parts[1]) if parts[0] == "layers" else n + int(parts[1])


@register(
    "mla_fuse",
    "fuses the MLA down-projections, makes the KV cache latent (576 values/token/layer for V3), absorbs "
    "W_UK/W_UV where the cost model says so, marks norms and up-projections for recompute (train)",
    writes=["mla", "recompute"],
    options={"form": Option("attention form: auto (cheaper by the cost package), plain or absorbed",
                            ("auto", "plain", "absorbed"))},
)
def mla_fuse(plan: Plan, opts: dict):
    """The MLA rewrite of every attention block; the function is unchanged."""
    program = plan.program
    cfg = program.cfg
    blocks = attention_blocks(program)
    if not blocks:
        return {"blocks": 0}
    first = next(iter(blocks.values()))
    q = first["attention"].args[0].meta["val"]
    k = first["attention"].args[1].meta["val"]
    shape = dict(
        b=q.shape[0], s=q.shape[1], t=k.shape[1], h=q.shape[2], dn=cfg.qk_nope_head_dim, dr=cfg.qk_rope_head_dim,
        dv=cfg.v_head_dim, r=cfg.kv_lora_rank, elt=q.element_size(),
    )  # fmt: skip
    proj_dtype = resolve_policy(plan.options.get("precision"))["attention_proj"]
    constants = plan.options.get("constants") or Constants.for_target(plan.target)
    costs = attention_form_costs(shape, plan.target, program.mode, proj_dtype, constants)
    form = opts.get("form", "auto")
    form = cheapest_buildable(costs) if form == "auto" else form
    fused, stale_inputs = 0, []
    for block, roles in blocks.items():
        fused += _fuse_down_projections(program, block, roles) * program.times(roles["attention"])
        if program.mode != "train":
            stale_inputs += _make_cache_latent(program, block, roles, absorbed=form == "absorbed")
        elif form == "absorbed":
            _absorb(program, roles, None)
    program.graph.eliminate_dead_code()
    for name in stale_inputs:
        program.remove_input(name)
    program.drop_unused_weights()
    count = sum(program.times(roles["attention"]) for roles in blocks.values())  # the model's attention blocks
    stats = {"blocks": count, "fused_down_projections": fused, "form": form,
             **{f"{f}_us": costs[f]["us"] for f in ("plain", "plain_kv_cache", "absorbed")}}
    plan.analyses.mla = {"form": form, "shape": shape, **costs}
    if program.mode == "train":
        saved, marked = _mark_recompute(program, count)
        stats["recompute_bytes_per_token_per_layer"] = saved
        plan.analyses.recompute = {"nodes": marked, "bytes_per_token_per_layer": saved}
    else:
        stats["kv_cache_values_per_token_per_layer"] = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    program.recompile()
    return stats


def _weight(program: Program, node: fx.Node) -> torch.Tensor:
    """The tensor behind a weight placeholder node."""
    return program.weights[node.name]


def _fuse_down_projections(program: Program, block: str, roles: dict) -> int:
    """Replace q_a_proj and kv_a_proj_with_mqa (same input) by one GEMM and a split; 1 if done.

    W^DQ is zero-padded to whole 128-row FP8 blocks, so a block-scaled quantisation of the fused
    weight never shares a block (or a scale) between W^DQ and W^DKV: it equals quantising each alone.
    """
    qa, kva = roles.get("q_a_proj"), roles.get("kv_a_proj_with_mqa")
    if qa is None or kva is None or qa.args[0] is not kva.args[0]:
        return 0
    w_q, w_kv = _weight(program, qa.args[1]), _weight(program, kva.args[1])
    pad = -w_q.shape[0] % fp8.BLOCK

    def fuse(_, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([a, a.new_zeros(pad, a.shape[1]), b], dim=0)

    w = fuse(None, w_q, w_kv)
    wnode = program.add_weight(block.replace(".", "_") + "_qkv_a_proj_weight", w, (fuse, [qa.args[1], kva.args[1]]))
    fqns = program.weight_fqns
    segments = [(fqns.get(qa.args[1].name), w_q.shape[0]), (None, pad), (fqns.get(kva.args[1].name), w_kv.shape[0])]
    program.weight_segments[wnode.name] = segments
    sizes = [w_q.shape[0], pad, w_kv.shape[0]] if pad else [w_q.shape[0], w_kv.shape[0]]
    with program.graph.inserting_before(qa):
        y = program.call(aten.linear.default, (qa.args[0], wnode), like=qa)
        y.meta["nn_module_stack"] = dict(list(qa.meta["nn_module_stack"].items())[:-1])
        parts = program.call(aten.split_with_sizes.default, (y, sizes, -1), like=y)
        q_part = program.call(operator.getitem, (parts, 0), like=y)
        kv_part = program.call(operator.getitem, (parts, len(sizes) - 1), like=y)
    qa.replace_all_uses_with(q_part)
    kva.replace_all_uses_with(kv_part)
    return 1


def _make_cache_latent(program: Program, block: str, roles: dict, absorbed: bool) -> list[str]:
    """Cache c^KV (normed) and k^R instead of K and V, attend plain or absorbed; returns the stale inputs."""
    i = cache_index(program, block)
    ckv, kpe = roles["kv_a_layernorm"], roles["k_pe"]
    if f"cache_{i}_k" not in program.outputs:  # already latent (the pass ran before)
        return []
    program.set_output(f"cache_{i}_k", f"cache_{i}_ckv", ckv)
    program.set_output(f"cache_{i}_v", f"cache_{i}_kpe", kpe)
    past = None
    if f"past_{i}_k" in program.inputs:
        old_k = next(n for n in program.placeholders() if n.name == f"past_{i}_k")
        b, p = old_k.meta["val"].shape[:2]
        past = [
            program.add_input(f"past_{i}_{kind}", _like(node, b, p), before=f"past_{i}_k")
            for kind, node in (("ckv", ckv), ("kpe", kpe))
        ]
    if absorbed:
        _absorb(program, roles, past)
    elif past:
        _plain_from_latent(program, roles, *past)
    return [f"past_{i}_k", f"past_{i}_v"] if past else []


def _like(node: fx.Node, b: int, p: int) -> torch.Tensor:
    """An empty tensor of p cached tokens with node's last dim, dtype and device."""
    val = node.meta["val"]
    return torch.empty(b, p, val.shape[-1], dtype=val.dtype, device=val.device)


def _plain_from_latent(program: Program, roles: dict, past_ckv: fx.Node, past_kpe: fx.Node) -> None:
    """Plain decode from a latent cache: up-project the cached c^KV to K and V, then attend as before."""
    attn, kvb = roles["attention"], roles["kv_b_proj"]
    k_cat, v_cat = attn.args[1], attn.args[2]  # cat([past, new], 1) each
    b, p = past_ckv.meta["val"].shape[:2]
    _, _, h, dqk = k_cat.meta["val"].shape
    dv, dr = v_cat.meta["val"].shape[-1], past_kpe.meta["val"].shape[-1]
    with program.graph.inserting_before(k_cat):
        up = program.call(aten.linear.default, (past_ckv, kvb.args[1]), like=kvb)
        up = program.call(aten.view.default, (up, [b, p, h, dqk - dr + dv]), like=attn)
        parts = program.call(aten.split_with_sizes.default, (up, [dqk - dr, dv], -1), like=attn)
        k_nope = program.call(operator.getitem, (parts, 0), like=attn)
        v_past = program.call(operator.getitem, (parts, 1), like=attn)
        kpe = program.call(aten.unsqueeze.default, (past_kpe, 2), like=attn)
        kpe = program.call(aten.expand.default, (kpe, [b, p, h, dr]), like=attn)
        k_past = program.call(aten.cat.default, ([k_nope, kpe], -1), like=attn)
    k_cat.args = ([k_past, *k_cat.args[0][1:]], *k_cat.args[1:])
    v_cat.args = ([v_past, *v_cat.args[0][1:]], *v_cat.args[1:])


def _absorb(program: Program, roles: dict, past: list[fx.Node] | None) -> None:
    """Absorbed attention: q_lat = q_nope·W^UK, latent attention against [past; new] c^KV, k^R; o = o_lat·W^UV."""
    attn, kvb = roles["attention"], roles["kv_b_proj"]
    q_nope, q_pe = attn.args[0].args[0]  # q = cat([q_nope, q_pe])
    b, s, h, dn = q_nope.meta["val"].shape
    dv = attn.meta["val"].shape[-1]
    r = _weight(program, kvb.args[1]).shape[1]

    def uk(_, w):  # rows 0..dn-1 of each head of W^UKV are W^UK, the rest W^UV
        return w.view(h, dn + dv, r)[:, :dn, :].contiguous()  # [H, dn, r]

    def uv_t(_, w):
        return w.view(h, dn + dv, r)[:, dn:, :].transpose(1, 2).contiguous()  # [H, r, dv]

    name = module_path(attn).replace(".", "_")
    w = _weight(program, kvb.args[1])
    w_uk = program.add_weight(f"{name}_w_uk", uk(None, w), (uk, [kvb.args[1]]))
    w_uv = program.add_weight(f"{name}_w_uv_t", uv_t(None, w), (uv_t, [kvb.args[1]]))
    ckv, kpe = roles["kv_a_layernorm"], roles["k_pe"]
    with program.graph.inserting_before(attn):
        call = lambda target, *args: program.call(target, args, like=attn)  # noqa: E731
        q_lat = call(aten.reshape.default, call(aten.permute.default, q_nope, [2, 0, 1, 3]), [h, b * s, dn])
        q_lat = call(aten.bmm.default, q_lat, w_uk)
        q_lat = call(aten.permute.default, call(aten.reshape.default, q_lat, [h, b, s, r]), [1, 2, 0, 3])
        if past is not None:
            ckv = call(aten.cat.default, [past[0], ckv], 1)
            kpe = call(aten.cat.default, [past[1], kpe], 1)
        o = call(dsv3.latent_attention.default, q_lat, q_pe, ckv, kpe, attn.args[3])
        o = call(aten.reshape.default, call(aten.permute.default, o, [2, 0, 1, 3]), [h, b * s, r])
        o = call(aten.bmm.default, o, w_uv)
        o = call(aten.permute.default, call(aten.reshape.default, o, [h, b, s, dv]), [1, 2, 0, 3])
    attn.replace_all_uses_with(o)
    program.graph.erase_node(attn)


def _mark_recompute(program: Program, blocks: int) -> tuple[int, int]:
    """Mark RMSNorms and MLA up-projections for recompute: (activation bytes saved per token per block, nodes)."""
    saved = marked = 0
    for node in program.graph.nodes:
        path = module_path(node)
        recompute = node.target is dsv3.rms_norm.default or (
            node.target is aten.linear.default and path.endswith(("self_attn.q_b_proj", "self_attn.kv_b_proj"))
        )
        if recompute and (path.startswith("layers.") or path.startswith("mtp.")):
            node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE  # the key torch's partitioner reads
            saved += nbytes(node.meta["val"]) * program.times(node)
            marked += program.times(node)
    shapes = program.shapes
    return saved // (shapes["batch"] * shapes["seq"] * blocks), marked
