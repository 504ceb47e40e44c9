"""Inference plans: the prefill and decode deployment units, KV-cache capacity, and MTP speculative decoding.

Pure functions of (config, target, unit layout, constants); nothing is materialised (weights are counted
from the config). Every figure is a roofline estimate: each kernel takes max(FLOPs / peak on the SMs left
to compute, bytes / HBM bandwidth), scaled by the efficiency constants (1.0 by default: lower bounds).

Units (DeepSeek-V3 report, `REFERENCE.md` "Inference deployment"):
- prefill (32 GPUs): attention TP4 + SP with DP8; MoE EP32, 8 routed + 1 redundant slot per GPU; the
  shared expert on every GPU (it runs on the GPU's own tokens, no dispatch); dense MLPs TP1; two
  micro-batches whose attention/MoE overlap the other's two-hop dispatch/combine (normal DeepEP kernels,
  IB once per target node then NVLink).
- decode (320 GPUs): attention TP4 + SP with DP80; EP320, one routed expert per GPU on 256 GPUs, the
  other 64 hold the shared expert treated as an always-chosen routed one (replicas enough to carry its
  load: n_routed / top_k x n_shared of them, 32 for V3) and redundant routed replicas; low-latency
  dispatch/combine (every route straight over IB, no NVLink forwarding); two micro-batches.
  With EP <= n_routed (e.g. EP144: 2 routed slots per GPU) the shared expert sits on every GPU.
Attention layout and the KV cache: with head-TP each TP rank runs H/tp heads over all the sequences of
its DP group; MLA's latent cache (c_kv + k_pe, shared by all heads) is therefore *replicated* across
the TP group: each GPU of a group holds and reads the whole latent cache of the group's sequences.
"Batch per GPU" B is sequences in the unit / GPUs: a DP group serves tp x B sequences and each of its
GPUs holds tp x B caches.
Step model with two micro-batches: per layer, 2 x max(compute of one micro-batch, communication of one
micro-batch); communication not hidden behind the other micro-batch's compute is "exposed".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dsv3c.eplb import PlacementError
from dsv3c.ops.record import causal_pairs
from dsv3c.placement import default_mesh
from targets import compute_sms

GiB = 1024**3


class UnitError(ValueError):
    """An inference unit, batch or constant that cannot work; the message is one line."""


# ---- constants ------------------------------------------------------------------------------------------

# DeepEP's low-latency benchmark (H800, CX7 IB, EP256, 128 tokens per rank, top-8, hidden 7168; REFERENCE.md)
_LL = {"tokens": 128, "top_k": 8, "hidden": 7168, "dispatch_us": 194.0, "combine_us": 369.0}
_LL_DISPATCH_BW = _LL["tokens"] * _LL["top_k"] * (_LL["hidden"] + 4 * _LL["hidden"] // 128) / (_LL["dispatch_us"] * 1e-6)
_LL_COMBINE_BW = _LL["tokens"] * _LL["top_k"] * _LL["hidden"] * 2 / (_LL["combine_us"] * 1e-6)

CONSTANTS: dict[str, tuple[float, str]] = {
    "mtp_acceptance": (0.85, "measured: DeepSeek-V3 report, 2nd token accepted 85-90 % (lower end taken)"),
    "micro_batches": (2, "DeepSeek-V3 report: two micro-batches overlapped in prefill and decode"),
    "kv_bytes_per_value": (2, "DeepSeek-V3 report: BF16 latent cache (c_kv + k_pe)"),
    "act_bytes": (2, "BF16 activations"),
    "fp8_weight_bytes": (1 + 4 / (128 * 128), "checkpoint format: E4M3 + float32 scale per 128x128 block"),
    "bf16_weight_bytes": (2, "checkpoint format: embedding, head, norms, router, eh_proj in BF16"),
    "dispatch_payload_bytes_per_value": (1 + 4 / 128, "DeepSeek-V3 report: dispatch in FP8 + 1x128 scales"),
    "combine_payload_bytes_per_value": (2, "DeepSeek-V3 report: combine in BF16"),
    "ib_normal_bandwidth": (50e9, "measured: DeepEP normal internode kernels 43-58 GB/s per GPU (midpoint)"),
    "ll_dispatch_bandwidth": (_LL_DISPATCH_BW, "measured: DeepEP low-latency dispatch, EP256 128 tok top-8 in 194 us"),
    "ll_combine_bandwidth": (_LL_COMBINE_BW, "measured: DeepEP low-latency combine, EP256 128 tok top-8 in 369 us"),
    "nvlink_bandwidth": (0.0, "measured: the target's nvlink_achieved (DeepEP: ~160 GB/s on H800); 0 = take it"),
    "compute_efficiency": (1.0, "assumed: roofline bound (fraction of dense peak reached)"),
    "hbm_efficiency": (1.0, "assumed: roofline bound (fraction of HBM bandwidth reached)"),
    "expert_imbalance": (1.0, "assumed: max/mean routes per GPU after EPLB's redundant experts"),
    "hbm_reserved_fraction": (0.05, "assumed: CUDA context, allocator fragmentation"),
    "comm_buffer_bytes": (2 * GiB, "assumed: DeepEP buffers (low-latency: ~128 tokens x ranks x hidden, 2 phases)"),
    "workspace_bytes": (4 * GiB, "assumed: activations and GEMM workspaces of one step"),
    "dense_mlp_tp": (1, "DeepSeek-V3 report: 1-way TP for the shallow dense MLPs"),
    "vocab_parallel": (1, "assumed: embedding and head split over the attention TP group (1) or replicated (0)"),
}


def constants(overrides: dict | None = None) -> dict:
    """The constants' values with overrides applied (unknown names are a UnitError)."""
    out = {k: v for k, (v, _) in CONSTANTS.items()}
    for k, v in (overrides or {}).items():
        if k not in CONSTANTS:
            raise UnitError(f"unknown inference constant {k!r} (known: {', '.join(CONSTANTS)})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise UnitError(f"inference constant {k} must be a non-negative number, got {v!r}")
        out[k] = v
    if not 0 <= out["mtp_acceptance"] <= 1:
        raise UnitError(f"mtp acceptance must be in [0, 1], got {out['mtp_acceptance']}")
    return out


def constants_table(c: dict) -> dict:
    """{name: {value, source}} for plan.json."""
    return {k: {"value": c[k], "source": CONSTANTS[k][1]} for k in CONSTANTS}


# ---- the unit ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """An inference deployment unit: attention TP x DP, MoE EP, where the experts sit."""

    mode: str
    gpus: int
    gpus_per_node: int
    tp: int
    dp: int
    ep: int
    sp: bool
    routed_slots_per_gpu: int  # routed-expert slots on a GPU that holds routed experts
    redundant: int  # redundant routed replicas per layer
    shared: str  # "local": every GPU holds the shared expert; "dedicated": GPUs of their own hold it
    shared_replicas: int  # GPUs holding a shared replica (dedicated) or all GPUs (local)
    micro_batches: int

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["nodes"] = self.gpus // self.gpus_per_node
        d["layout"] = (f"attention TP{self.tp}{'+SP' if self.sp else ''} x DP{self.dp}; MoE EP{self.ep}: "
                       + (f"{self.routed_slots_per_gpu} routed slot(s)/GPU ({self.redundant} redundant), shared on every GPU"
                          if self.shared == "local" else
                          f"1 routed expert/GPU on {self.ep - self.shared_replicas - self.redundant_gpus} GPUs, "
                          f"{self.shared_replicas} GPUs with the shared expert, {self.redundant_gpus} with redundant experts"))
        return d

    @property
    def redundant_gpus(self) -> int:
        return self.redundant if self.shared == "dedicated" else 0


def make_unit(cfg, target, mode: str, tp: int | None = None, ep: int | None = None, dp: int | None = None,
              micro_batches: int = 2) -> Unit:
    """The unit for target and mode (DeepSeek's layout by default, degrees overridable); UnitError if impossible."""
    if mode not in ("prefill", "decode"):
        raise UnitError(f"inference units are for prefill or decode, not {mode!r}")
    overrides = {k: v for k, v in dict(tp=tp, ep=ep, dp=dp).items() if v is not None}
    experts, k, shared = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts
    if experts == 0:
        raise UnitError(f"model {cfg.name} has no routed experts: no EP unit")
    try:
        mesh = default_mesh(target.gpus, target.gpus_per_node, mode, experts=experts,
                            layers=cfg.num_hidden_layers, **overrides)
    except PlacementError as e:
        raise UnitError(f"{mode} unit on {target.gpus} GPUs: {str(e).splitlines()[0]}") from None
    if mesh.pp != 1:
        raise UnitError(f"{mode} unit: pipeline parallelism is not an inference layout")
    if cfg.num_attention_heads % mesh.tp:
        raise UnitError(f"{mode} unit: tp {mesh.tp} does not divide {cfg.num_attention_heads} heads")
    slots = experts + mesh.redundant
    if mode == "decode" and mesh.ep > experts:
        # one routed expert per GPU; the rest carry the shared expert (as a routed one) and redundant replicas
        extra = mesh.ep - experts
        if shared and extra < 1:
            raise UnitError(f"decode unit EP{mesh.ep}: no GPU left for the shared expert")
        shared_reps = min(extra, max(1, experts // k) * shared) if shared else 0
        return Unit(mode, mesh.gpus, mesh.gpus_per_node, mesh.tp, mesh.dp, mesh.ep, mesh.sp, 1, extra - shared_reps,
                    "dedicated", shared_reps, micro_batches)
    return Unit(mode, mesh.gpus, mesh.gpus_per_node, mesh.tp, mesh.dp, mesh.ep, mesh.sp, slots // mesh.ep,
                mesh.redundant, "local", mesh.gpus if shared else 0, micro_batches)


# ---- weights and memory --------------------------------------------------------------------------------------


def _attn_split(cfg) -> tuple[int, int]:
    """(replicated, head-split) attention parameters of one block."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    rep = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    if cfg.q_lora_rank is None:
        split = d * h * cfg.qk_head_dim
    else:
        rep += d * cfg.q_lora_rank
        split = cfg.q_lora_rank * h * cfg.qk_head_dim
    split += cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim) + h * cfg.v_head_dim * d
    return rep, split


def expert_params(cfg) -> int:
    """Parameters of one routed expert."""
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size


def layer_counts(cfg, mtp: bool) -> dict:
    """Dense and MoE blocks of the main model, and the MTP blocks (MoE in V3) when mtp."""
    dense = min(cfg.first_k_dense_replace, cfg.num_hidden_layers)
    return {"dense": dense, "moe": cfg.num_hidden_layers - dense,
            "mtp": cfg.num_nextn_predict_layers if mtp else 0}


def weight_bytes_per_gpu(cfg, unit: Unit, c: dict, mtp: bool = True) -> dict:
    """Weight bytes on the fullest GPU, by component (linear weights FP8, the rest BF16)."""
    fp8, bf16 = c["fp8_weight_bytes"], c["bf16_weight_bytes"]
    d, n = cfg.hidden_size, layer_counts(cfg, mtp)
    blocks = n["dense"] + n["moe"] + n["mtp"]
    moe_blocks = n["moe"] + n["mtp"]
    rep, split = _attn_split(cfg)
    vocab_split = unit.tp if c["vocab_parallel"] else 1
    slots = unit.routed_slots_per_gpu + (cfg.n_shared_experts if unit.shared == "local" else 0)
    return {
        "attention": int(blocks * (rep + split / unit.tp) * fp8),
        "dense_mlp": int(n["dense"] * 3 * d * cfg.intermediate_size * fp8 / c["dense_mlp_tp"]),
        "experts": int(moe_blocks * slots * expert_params(cfg) * fp8),
        "router": int(moe_blocks * cfg.n_routed_experts * d * bf16),
        "embedding_head": int(2 * cfg.vocab_size * d * bf16 / vocab_split),
        "mtp_eh_proj": int(n["mtp"] * 2 * d * d * bf16),
        "norms": int(blocks * 4 * d * bf16),
    }


def kv_bytes_per_token(cfg, c: dict, mtp: bool = False) -> dict:
    """Latent cache bytes per token: layers x (kv_lora_rank + qk_rope_head_dim) x bytes (70,272 for V3 in BF16)."""
    per_layer = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * c["kv_bytes_per_value"]
    main = cfg.num_hidden_layers * per_layer
    extra = layer_counts(cfg, mtp)["mtp"] * per_layer
    return {"main": int(main), "mtp": int(extra), "total": int(main + extra)}


def kv_capacity(cfg, target, unit: Unit, context: int, c: dict, mtp: bool = True, batch: float | None = None) -> dict:
    """Tokens and sequences of `context` tokens each GPU holds; with batch (per GPU), whether it fits (UnitError if not).

    sequences_per_gpu = sequences in the unit / GPUs: a GPU holds the caches of tp x that many sequences
    (its DP group's, replicated over the TP ranks).
    """
    if context < 1:
        raise UnitError(f"context must be positive, got {context}")
    weights = weight_bytes_per_gpu(cfg, unit, c, mtp)
    hbm = target.gpu.hbm_bytes
    reserved = int(hbm * c["hbm_reserved_fraction"])
    buffers = int(c["comm_buffer_bytes"] + c["workspace_bytes"])
    free = hbm - reserved - buffers - sum(weights.values())
    if free <= 0:
        raise UnitError(f"{unit.mode} unit EP{unit.ep} TP{unit.tp}: weights {sum(weights.values()) / 1e9:.1f} GB + "
                        f"buffers {buffers / 1e9:.1f} GB exceed the {hbm / 1e9:.1f} GB of HBM per GPU")
    per_token = kv_bytes_per_token(cfg, c, mtp)["total"]
    tokens = free // per_token
    out = {
        "hbm_bytes": int(hbm), "reserved_bytes": reserved, "buffer_bytes": buffers,
        "weight_bytes": sum(weights.values()), "weight_bytes_by_component": weights, "kv_free_bytes": int(free),
        "kv_bytes_per_token": per_token, "latent_cache": f"replicated over the TP{unit.tp} group (MLA's latent "
        "cache is shared by all heads; head-TP ranks each hold the group's whole cache)",
        "context": context, "tokens_per_gpu": int(tokens),
        "sequences_per_dp_group": int(tokens // context),
        "sequences_per_gpu": (tokens // context) / unit.tp,
    }
    if batch is not None:
        need = batch * unit.tp * context * per_token
        out["batch_per_gpu"] = batch
        out["batch_fits"] = need <= free
        if need > free:
            raise UnitError(f"batch {batch:g} per GPU at context {context} needs {need / 1e9:.1f} GB of latent cache "
                            f"per GPU ({unit.tp} x {batch:g} sequences x {context} tokens x {per_token} B) but only "
                            f"{free / 1e9:.1f} GB is left after weights and buffers (at most "
                            f"{out['sequences_per_gpu']:g} sequences per GPU)")
    return out


# ---- kernels --------------------------------------------------------------------------------------------------


def _kernel(name, flops, bytes_, dtype, target, mode, c) -> dict:
    """A kernel's roofline time, attributed to compute or memory by which bound it hits."""
    g = target.gpu
    peak = g.peak_flops(dtype) * compute_sms(target, mode) / g.sms * c["compute_efficiency"]
    tc, tm = flops / peak, bytes_ / (g.hbm_bandwidth * c["hbm_efficiency"])
    return {"name": name, "flops": flops, "bytes": bytes_, "seconds": max(tc, tm), "bound": "compute" if tc >= tm else "memory"}


def attention_kernels(cfg, unit, target, mode, c, seqs: float, new: int, context: int) -> list[dict]:
    """One block's attention on one GPU for `seqs` sequences of its DP group with `new` tokens after `context`.

    Down-projections (replicated) on the GPU's 1/tp share of the tokens (SP); q up-projection, attention
    and o_proj over H/tp heads for all the group's tokens. Prefill uses the plain form (K/V up-projected
    for every token), decode the absorbed form against the latent cache.
    """
    d, h = cfg.hidden_size, cfg.num_attention_heads // unit.tp
    dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    qlr = cfg.q_lora_rank or d
    fp8, e = c["fp8_weight_bytes"], c["act_bytes"]
    group = seqs * new  # tokens of the DP group
    mine = group / unit.tp
    t = context + new
    pairs = seqs * causal_pairs(new, t)
    width = r + dr + (cfg.q_lora_rank or 0)
    ks = [
        _kernel("attn.down_proj", 2 * mine * d * width, d * width * fp8 + mine * (d + width) * e, "fp8", target, mode, c),
        _kernel("attn.q_up", 2 * group * qlr * h * (dn + dr), qlr * h * (dn + dr) * fp8 + group * (qlr + h * (dn + dr)) * e,
                "fp8", target, mode, c),
    ]
    latent = seqs * t * (r + dr) * c["kv_bytes_per_value"]
    if mode == "prefill":
        ks += [
            _kernel("attn.kv_up", 2 * seqs * t * r * h * (dn + dv),
                    r * h * (dn + dv) * fp8 + latent + seqs * t * h * (dn + dv) * e, "fp8", target, mode, c),
            _kernel("attn.core", 2 * h * pairs * (dn + dr + dv),
                    group * h * (dn + dr + dv) * e + seqs * t * h * (dn + dr + dv) * e, "bf16", target, mode, c),
        ]
    else:
        ks += [
            _kernel("attn.absorb_uk", 2 * group * h * dn * r, h * dn * r * 2 + group * h * (dn + r) * e, "bf16", target, mode, c),
            _kernel("attn.core_latent", 2 * h * pairs * (2 * r + dr), latent + group * h * (2 * r + dr) * e, "bf16",
                    target, mode, c),
            _kernel("attn.absorb_uv", 2 * group * h * r * dv, h * r * dv * 2 + group * h * (r + dv) * e, "bf16", target, mode, c),
        ]
    ks.append(_kernel("attn.o_proj", 2 * group * h * dv * d, h * dv * d * fp8 + group * (h * dv + d) * e, "fp8",
                      target, mode, c))
    return ks


def ffn_kernels(cfg, unit, target, mode, c, tokens: float, moe: bool) -> list[dict]:
    """One block's FFN on one GPU holding `tokens` tokens (its SP share): dense MLP, or router + experts."""
    d, e, fp8 = cfg.hidden_size, c["act_bytes"], c["fp8_weight_bytes"]
    if not moe:
        f = cfg.intermediate_size // c["dense_mlp_tp"]
        return [_kernel("dense_mlp", 6 * tokens * d * f, 3 * d * f * fp8 + tokens * (2 * d + 3 * f) * e, "fp8", target, mode, c)]
    f, k, n_exp = cfg.moe_intermediate_size, cfg.num_experts_per_tok, cfg.n_routed_experts
    ks = [_kernel("router", 2 * tokens * d * n_exp, n_exp * d * 2 + tokens * d * e, "bf16", target, mode, c)]
    # routes arriving per GPU: every GPU sends tokens x (k [+ shared]) routes, spread evenly over the EP group
    if unit.shared == "dedicated":
        routes, slots = tokens * (k + cfg.n_shared_experts) * c["expert_imbalance"], 1
    else:
        routes, slots = tokens * k * c["expert_imbalance"], unit.routed_slots_per_gpu
    ks.append(_kernel("routed_experts", 6 * routes * d * f, 3 * slots * d * f * fp8 + routes * (2 * d + 3 * f) * e,
                      "fp8", target, mode, c))
    if unit.shared == "local" and cfg.n_shared_experts:
        fs = f * cfg.n_shared_experts
        ks.append(_kernel("shared_expert", 6 * tokens * d * fs, 3 * d * fs * fp8 + tokens * (2 * d + 3 * fs) * e,
                          "fp8", target, mode, c))
    return ks


def head_kernels(cfg, unit, target, mode, c, tokens: float, name: str = "head") -> list[dict]:
    """The output head over `tokens` tokens of this GPU (vocab-parallel over TP: V/tp columns for tp x tokens)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    split = unit.tp if c["vocab_parallel"] else 1
    rows = tokens * split
    return [_kernel(name, 2 * rows * d * v / split, v / split * d * 2 + rows * (d + v / split) * c["act_bytes"], "bf16",
                    target, mode, c)]


# ---- communication -----------------------------------------------------------------------------------------------


def expected_targets(cfg, unit: Unit) -> tuple[float, float]:
    """(E[distinct nodes], E[distinct GPUs]) a token's routed experts reach, uniform node-limited routing (prefill)."""
    import torch

    from dsv3c.eplb import rebalance_experts
    from passes.expert_partition import expected_targets as expect

    slots = unit.routed_slots_per_gpu * unit.ep
    nodes = max(1, unit.ep // unit.gpus_per_node)
    _, log2phy, _ = rebalance_experts(torch.ones(1, cfg.n_routed_experts), slots, cfg.n_group, nodes, unit.ep)
    return expect(None, log2phy[0], cfg.n_routed_experts, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok,
                  unit.routed_slots_per_gpu, min(unit.ep, unit.gpus_per_node))


def nvlink_bw(target, c) -> float:
    return c["nvlink_bandwidth"] or target.gpu.nvlink_achieved


def tp_comm(cfg, unit, target, c, tokens_mine: float) -> dict:
    """SP/TP collectives of one attention block (one GPU, NVLink): all-gather of the down-projected q/kv latents
    before the head-split part, reduce-scatter of o_proj's output after it."""
    if unit.tp == 1:
        return {"nvlink_bytes": 0, "seconds": 0.0}
    down = cfg.kv_lora_rank + cfg.qk_rope_head_dim + (cfg.q_lora_rank or cfg.hidden_size)
    b = (unit.tp - 1) * tokens_mine * (down + cfg.hidden_size) * c["act_bytes"]
    return {"nvlink_bytes": int(b), "seconds": b / nvlink_bw(target, c)}


def moe_comm(cfg, unit: Unit, target, c, tokens: float, targets: tuple[float, float] | None = None) -> dict:
    """Dispatch and combine of one MoE block for `tokens` tokens of one GPU (one micro-batch).

    prefill (normal kernels, two-hop): IB once per target node, NVLink on to the target GPUs
    (`dsv3c.ops.ep.two_hop_bytes`), IB and NVLink concurrent; combine mirrors dispatch in BF16.
    decode (low-latency kernels): each route straight to its GPU over IB; (k + shared) routes per token.
    """
    from dsv3c.ops.ep import two_hop_bytes

    d = cfg.hidden_size
    pay_d = d * c["dispatch_payload_bytes_per_value"]
    pay_c = d * c["combine_payload_bytes_per_value"]
    if unit.mode == "prefill":
        en, eg = targets or expected_targets(cfg, unit)
        out = {"expected_nodes_per_token": en, "expected_gpus_per_token": eg}
        nv, ib = nvlink_bw(target, c), c["ib_normal_bandwidth"]
        for phase, pay in (("dispatch", pay_d), ("combine", pay_c)):
            ib_b, nv_b = two_hop_bytes(int(tokens), pay, unit.ep, unit.gpus_per_node, en, eg)
            out[phase] = {"ib_bytes": ib_b, "nvlink_bytes": nv_b, "seconds": max(ib_b / ib, nv_b / nv)}
    else:
        routes = cfg.num_experts_per_tok + (cfg.n_shared_experts if unit.shared == "dedicated" else 0)
        remote = tokens * routes * (1 - 1 / unit.ep)
        out = {"routes_per_token": routes}
        for phase, pay, bw in (("dispatch", pay_d, c["ll_dispatch_bandwidth"]), ("combine", pay_c, c["ll_combine_bandwidth"])):
            ib_b = remote * pay
            out[phase] = {"ib_bytes": int(ib_b), "nvlink_bytes": 0, "seconds": ib_b / bw}
    out["seconds"] = out["dispatch"]["seconds"] + out["combine"]["seconds"]
    return out


# ---- layers and steps ------------------------------------------------------------------------------------------------


def _sum(ks: list[dict]) -> dict:
    comp = sum(k["seconds"] for k in ks if k["bound"] == "compute")
    mem = sum(k["seconds"] for k in ks if k["bound"] == "memory")
    return {"compute_seconds": comp, "memory_seconds": mem, "seconds": comp + mem,
            "flops": sum(k["flops"] for k in ks), "bytes": sum(k["bytes"] for k in ks)}


def block_time(cfg, unit, target, c, mode, seqs_mb, new, context, moe, targets=None) -> dict:
    """One block, both micro-batches: per micro-batch compute C and communication M; 2 x max(C, M) in all."""
    mine = seqs_mb * new / unit.tp
    ks = attention_kernels(cfg, unit, target, mode, c, seqs_mb, new, context) + ffn_kernels(cfg, unit, target, mode, c, mine, moe)
    comp = _sum(ks)
    tp = tp_comm(cfg, unit, target, c, mine)
    comm = {"tp": tp}
    m = tp["seconds"]
    if moe:
        comm["moe"] = moe_comm(cfg, unit, target, c, mine, targets)
        m += comm["moe"]["seconds"]
    mb = unit.micro_batches
    total = mb * max(comp["seconds"], m)
    return {
        "per_micro_batch": {**comp, "communication_seconds": m, "communication": comm},
        "compute_seconds": mb * comp["compute_seconds"], "memory_seconds": mb * comp["memory_seconds"],
        "exposed_communication_seconds": total - mb * comp["seconds"], "communication_seconds": mb * m,
        "seconds": total,
    }


def _step(cfg, unit, target, c, mode, seqs_mb, new, context, mtp_blocks: int, targets=None) -> dict:
    """Blocks of the main model (+ MTP blocks) for both micro-batches, and the totals."""
    n = layer_counts(cfg, True)
    dense = block_time(cfg, unit, target, c, mode, seqs_mb, new, context, False, targets)
    moe = block_time(cfg, unit, target, c, mode, seqs_mb, new, context, True, targets)
    parts = [(dense, n["dense"]), (moe, n["moe"])]
    if mtp_blocks:
        # the MTP block drafts from one position per sequence (decode) at the same context
        mtp = block_time(cfg, unit, target, c, mode, seqs_mb, 1, context + new - 1, cfg.is_moe_layer(cfg.num_hidden_layers), targets)
        parts.append((mtp, mtp_blocks))
    keys = ("compute_seconds", "memory_seconds", "exposed_communication_seconds", "communication_seconds", "seconds")
    tot = {k: sum(p[k] * m for p, m in parts) for k in keys}
    return {"dense_block": dense, "moe_block": moe, **({"mtp_block": parts[2][0]} if mtp_blocks else {}), "totals": tot}


def _add_kernels(tot: dict, ks: list[dict], times: int = 1) -> None:
    s = _sum(ks)
    for k in ("compute_seconds", "memory_seconds", "seconds"):
        tot[k] += times * s[k]


def prefill_figures(cfg, target, unit: Unit, prompt: int, c: dict, prompts_per_dp_group: int = 1) -> dict:
    """TTFT of `prompts_per_dp_group` prompts in every DP group, prefill tokens/s per GPU, comm per micro-batch.

    The micro-batches split the group's tokens evenly (a lone prompt in two chunks: the attention pairs of
    the chunks sum to the prompt's, so the per-micro-batch average is exact in total).
    """
    if prompt < 1 or prompts_per_dp_group < 1:
        raise UnitError("prompt length and prompts per DP group must be positive")
    seqs_mb = prompts_per_dp_group / unit.micro_batches
    targets = expected_targets(cfg, unit)
    step = _step(cfg, unit, target, c, "prefill", seqs_mb, prompt, 0, 0, targets)
    tot = step["totals"]
    _add_kernels(tot, head_kernels(cfg, unit, target, "prefill", c, prompts_per_dp_group / unit.tp))  # last tokens only
    ttft = tot["seconds"]
    tokens = unit.dp * prompts_per_dp_group * prompt
    mb_tokens = seqs_mb * prompt / unit.tp
    comm = step["moe_block"]["per_micro_batch"]["communication"]
    return {
        "prompt_tokens": prompt, "prompts_per_dp_group": prompts_per_dp_group,
        "tokens_per_gpu_per_micro_batch": mb_tokens,
        "ttft_seconds": ttft, "tokens_per_gpu_per_second": tokens / ttft / unit.gpus,
        "split_seconds": {k: tot[k] for k in ("compute_seconds", "memory_seconds", "exposed_communication_seconds")},
        "communication_bound_seconds": tot["communication_seconds"],
        "communication_per_micro_batch": {"moe_block": comm["moe"], "tp_per_block": comm["tp"]},
        "blocks": {k: step[k] for k in ("dense_block", "moe_block")},
    }


def decode_figures(cfg, target, unit: Unit, batch: float, context: int, c: dict, mtp: bool = False) -> dict:
    """One decode step at `batch` sequences per GPU and `context` cached tokens: TPOT split, tokens/s per GPU.

    With mtp every step verifies a draft (2 tokens per sequence through the main model) and drafts the
    next one with the MTP module; it yields 1 + P tokens per sequence on average.
    """
    if batch <= 0 or context < 0:
        raise UnitError(f"batch must be positive and context non-negative, got batch {batch}, context {context}")
    new = 2 if mtp else 1
    seqs_mb = batch * unit.tp / unit.micro_batches  # sequences of one DP group in one micro-batch
    step = _step(cfg, unit, target, c, "decode", seqs_mb, new, context, layer_counts(cfg, mtp)["mtp"])
    tot = step["totals"]
    _add_kernels(tot, head_kernels(cfg, unit, target, "decode", c, batch * new / unit.micro_batches), unit.micro_batches)
    if mtp:
        d = cfg.hidden_size
        eh = _kernel("mtp.eh_proj", 2 * batch * 2 * d * d, 2 * d * d * 2 + batch * 3 * d * 2, "bf16", target, "decode", c)
        _add_kernels(tot, [eh] + head_kernels(cfg, unit, target, "decode", c, batch, "mtp.head"))
    tokens_per_step = 1 + (c["mtp_acceptance"] if mtp else 0)
    step_s = tot["seconds"]
    layers = cfg.num_hidden_layers
    return {
        "batch_per_gpu": batch, "context": context, "mtp": mtp, "tokens_per_sequence_per_step": tokens_per_step,
        "step_seconds": step_s, "tpot_seconds": step_s / tokens_per_step,
        "tokens_per_gpu_per_second": batch * tokens_per_step / step_s,
        "split_seconds": {k: tot[k] for k in ("compute_seconds", "memory_seconds", "exposed_communication_seconds")},
        "per_layer_seconds": {
            "moe_block": {k: step["moe_block"][k] for k in ("compute_seconds", "memory_seconds", "exposed_communication_seconds", "seconds")},
            "dense_block": {k: step["dense_block"][k] for k in ("compute_seconds", "memory_seconds", "exposed_communication_seconds", "seconds")},
            "mean": step_s / (layers + layer_counts(cfg, mtp)["mtp"]),
        },
        "communication_bound_seconds": tot["communication_seconds"],
        "communication_bound_tokens_per_gpu_per_second": batch * tokens_per_step / tot["communication_seconds"]
        if tot["communication_seconds"] else None,  # one GPU: no communication, no bound (JSON has no inf)
        "communication_per_micro_batch": step["moe_block"]["per_micro_batch"]["communication"],
    }


def mtp_speedup(cfg, target, unit, batch, context, c) -> dict:
    """Tokens/s with MTP speculative decoding (acceptance P) over plain decoding."""
    plain = decode_figures(cfg, target, unit, batch, context, c, mtp=False)
    spec = decode_figures(cfg, target, unit, batch, context, c, mtp=True)
    return {"acceptance": c["mtp_acceptance"], "acceptance_source": CONSTANTS["mtp_acceptance"][1],
            "tokens_per_step": 1 + c["mtp_acceptance"], "step_cost_ratio": spec["step_seconds"] / plain["step_seconds"],
            "speedup": spec["tokens_per_gpu_per_second"] / plain["tokens_per_gpu_per_second"],
            "tpot_seconds": spec["tpot_seconds"], "tokens_per_gpu_per_second": spec["tokens_per_gpu_per_second"]}


# ---- the plan -----------------------------------------------------------------------------------------------------------


def inference_plan(cfg, target, mode: str, shapes: dict, options: dict | None = None) -> dict:
    """plan.json's `parallel` and `inference` for a prefill or decode compile.

    shapes: prefill {seq (prompt), batch (prompts per DP group, default 2)}; decode {batch (per GPU),
    kv_len (context)}. options: tp/ep/dp (unit degrees), mtp_acceptance, constants (overrides).
    """
    options = dict(options or {})
    over = dict(options.get("constants") or {})
    if options.get("mtp_acceptance") is not None:
        over["mtp_acceptance"] = options["mtp_acceptance"]
    c = constants(over)
    unit = make_unit(cfg, target, mode, options.get("tp"), options.get("ep"), options.get("dp"), int(c["micro_batches"]))
    out: dict = {"unit": unit.to_dict()}
    if mode == "prefill":
        prompt = shapes.get("seq") or 4096
        per_group = shapes.get("batch") or 1  # prompts per DP group; a lone prompt is split into two micro-batch chunks
        f = prefill_figures(cfg, target, unit, prompt, c, per_group)
        out.update(f)
        out["kv_capacity"] = kv_capacity(cfg, target, unit, prompt, c, mtp=False)
    else:
        batch, context = shapes.get("batch") or 1, shapes.get("kv_len") or 4096
        cap = kv_capacity(cfg, target, unit, context, c, mtp=bool(cfg.num_nextn_predict_layers), batch=batch)
        f = decode_figures(cfg, target, unit, batch, context, c)
        out.update(f)
        out["kv_capacity"] = cap
        if cfg.num_nextn_predict_layers:
            out["mtp"] = mtp_speedup(cfg, target, unit, batch, context, c)
    out["constants"] = constants_table(c)
    return {"parallel": unit.to_dict(), "inference": out}


# ---- report.txt -----------------------------------------------------------------------------------------------------------


def _us(s: float) -> str:
    return f"{s * 1e6:,.1f} us" if s < 1e-2 else f"{s * 1e3:,.2f} ms"


def _mb(b: float) -> str:
    return f"{b / 1e6:,.2f} MB"


def report_sections(inf: dict) -> list[tuple]:
    """report.txt sections (title, rows[, headers]) for plan.json's `inference`."""
    u, cap = inf["unit"], inf["kv_capacity"]
    secs = [("Inference unit", [["layout", u["layout"]], ["GPUs / nodes", f"{u['gpus']} / {u['nodes']}"],
                                ["micro-batches (overlapped)", u["micro_batches"]]])]
    if "ttft_seconds" in inf:
        rows = [["prompt", f"{inf['prompt_tokens']:,} tokens x {inf['prompts_per_dp_group']} per DP group"],
                ["time to first token", _us(inf["ttft_seconds"])],
                ["prefill tokens/s per GPU", f"{inf['tokens_per_gpu_per_second']:,.0f}"]]
        rows += [[k.replace("_seconds", "").replace("_", " ") + " (time)", _us(v)] for k, v in inf["split_seconds"].items()]
        rows.append(["communication alone (bound)", _us(inf["communication_bound_seconds"])])
        secs.append(("Prefill (roofline)", rows))
        m = inf["communication_per_micro_batch"]["moe_block"]
        rows = [[p, _mb(m[p]["ib_bytes"]), _mb(m[p]["nvlink_bytes"]), _us(m[p]["seconds"])] for p in ("dispatch", "combine")]
        tp = inf["communication_per_micro_batch"]["tp_per_block"]
        rows.append(["TP all-gather + reduce-scatter", "0", _mb(tp["nvlink_bytes"]), _us(tp["seconds"])])
        secs.append((f"Communication per micro-batch per MoE block per GPU ({inf['tokens_per_gpu_per_micro_batch']:,.0f} "
                     "tokens, two-hop)", rows, ["phase", "IB", "NVLink", "time"]))
    else:
        rows = [["batch per GPU / context", f"{inf['batch_per_gpu']:g} / {inf['context']:,} tokens"],
                ["TPOT", _us(inf["tpot_seconds"])], ["tokens/s per GPU", f"{inf['tokens_per_gpu_per_second']:,.0f}"]]
        rows += [[k.replace("_seconds", "").replace("_", " ") + " (time per step)", _us(v)] for k, v in inf["split_seconds"].items()]
        rows.append(["communication alone (bound per step)", _us(inf["communication_bound_seconds"])])
        bound = inf["communication_bound_tokens_per_gpu_per_second"]
        rows.append(["tokens/s per GPU, communication bound", "none (no communication)" if bound is None else f"{bound:,.0f}"])
        secs.append(("Decode (roofline)", rows))
        per = inf["per_layer_seconds"]
        secs.append(("Decode time per layer (both micro-batches)",
                     [[k, _us(v["compute_seconds"]), _us(v["memory_seconds"]), _us(v["exposed_communication_seconds"]),
                       _us(v["seconds"])] for k, v in per.items() if isinstance(v, dict)],
                     ["block", "compute", "memory", "exposed comm", "total"]))
        m = inf["communication_per_micro_batch"]["moe"]
        secs.append(("Communication per micro-batch per MoE block per GPU (low-latency, direct IB)",
                     [[p, _mb(m[p]["ib_bytes"]), _us(m[p]["seconds"])] for p in ("dispatch", "combine")],
                     ["phase", "IB", "time"]))
        if "mtp" in inf:
            t = inf["mtp"]
            secs.append(("MTP speculative decoding", [
                ["acceptance", f"{t['acceptance']:g} ({t['acceptance_source']})"],
                ["tokens per step", f"{t['tokens_per_step']:g}"], ["step cost ratio", f"{t['step_cost_ratio']:.3f}"],
                ["TPOT with MTP", _us(t["tpot_seconds"])],
                ["tokens/s per GPU with MTP", f"{t['tokens_per_gpu_per_second']:,.0f}"],
                ["speed-up", f"{t['speedup']:.3f}x"]]))
    secs.append(("KV cache capacity per GPU", [
        ["HBM", _mb(cap["hbm_bytes"])], ["weights", _mb(cap["weight_bytes"])],
        ["buffers + reserved", _mb(cap["buffer_bytes"] + cap["reserved_bytes"])], ["left for the cache", _mb(cap["kv_free_bytes"])],
        ["latent cache per token", f"{cap['kv_bytes_per_token']:,} B"], ["layout", cap["latent_cache"]],
        ["tokens per GPU", f"{cap['tokens_per_gpu']:,}"],
        [f"sequences of {cap['context']:,} per DP group", f"{cap['sequences_per_dp_group']:,}"],
        [f"sequences of {cap['context']:,} per GPU", f"{cap['sequences_per_gpu']:g}"]]))
    secs.append(("Inference constants", [[k, f"{v['value']:.6g}", v["source"]] for k, v in inf["constants"].items()],
                 ["constant", "value", "source"]))
    return secs
