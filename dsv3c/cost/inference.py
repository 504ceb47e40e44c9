"""The cost of an inference unit: prefill TTFT and decode TPOT from the block facts, KV capacity, MTP speculation.

The captured program is one DP group's work (one replica of the model): prefill `batch` prompts of `seq`
tokens, decode `batch` sequences per GPU at `kv_len` cached tokens. The unit runs two micro-batches (DeepSeek-V3
report 3.4): per layer, one micro-batch's compute overlaps the other's communication, so a layer takes
`overlap(2 x compute, 2 x communication)` — the longer side. The pricing module sees each GPU: attention
heads split over the TP group (the latent cache replicated over it), the rest split over tokens (SP); routed
experts over the EP group, the shared experts on every GPU on its own tokens.
Prefill serves the next token: the output head runs on each prompt's last position only. Decode with MTP
speculation verifies a draft (two tokens per sequence through the main model) and drafts the next with the
MTP module: 1 + acceptance tokens per step.
"""

from __future__ import annotations

from dsv3c.cost.facts import BlockFacts
from dsv3c.cost.price import ZERO, Pricer, Shard, Time, compute_sms, overlap



class UnitError(ValueError):
    """An inference unit, batch or constant that cannot work; the message is one line."""


def shard(plan, cfg, c, fanout, mode: str, scale: float) -> Shard:
    """How one GPU of the unit sees a block for one micro-batch of `scale` x the captured sequences."""
    m = plan.mesh
    return Shard(mode, scale=scale, tp=m.tp, sp=m.sp, ep=m.ep, slots=plan.unit.routed_slots_per_gpu,
                 routes_per_token=cfg.num_experts_per_tok, imbalance=plan.imbalance, fanout=fanout,
                 gpus_per_node=m.gpus_per_node, comm_sms=int(c["comm_sms"]))


def unit_step(plan, cfg, facts: BlockFacts, c, fanout, target, scale: float, head_scale: float,
              units: list[str] | None = None) -> dict:
    """One step of the unit over `units` (default: the main model): per kind the layer Time, and the step's parts."""
    pricer = Pricer(target.gpu, compute_sms(target.gpu, facts.mode, c), c, facts.mode)
    mb = int(c["inference_micro_batches"])
    per_kind, total, comm = {}, ZERO, {}
    for kind in units or [k for k in facts.units() if k != "mtp"]:
        if kind in per_kind:
            total = total + per_kind[kind]["time"]
            continue
        sh = shard(plan, cfg, c, fanout, facts.mode, head_scale if kind == "head" else scale)
        t = pricer.block(facts.blocks[kind], sh)
        layer = overlap(t.F * mb, t.f_comm * mb)
        per_kind[kind] = {"time": layer, "compute_side": t.F * mb, "communication_side": t.f_comm * mb}
        if t.comm:
            comm[kind] = t.comm
        total = total + layer
    return {"time": total, "per_kind": per_kind, "communication": comm}


def weight_bytes_per_gpu(plan, facts: BlockFacts) -> dict:
    """Weight bytes on the fullest GPU by block kind: head-parallel weights split over TP, the EP shard of the
    routed experts, everything else whole."""
    from dsv3c.cost.price import _head_parallel

    tp, u = plan.mesh.tp, plan.unit
    out = {}
    for kind, n in facts.counts.items():
        p = facts.params.get(kind, {})
        split = sum(f["weight_bytes"] * f["count"] for f in facts.blocks[kind]
                    if f["kernel"] == "gemm" and _head_parallel(f))
        dense = p.get("dense_bytes", 0) - split * (1 - 1 / tp)
        experts = facts.blocks[kind]
        e = next((f["shape"][2] for f in experts if f["kernel"] == "experts"), 1)
        routed = p.get("expert_bytes", 0) * u.routed_slots_per_gpu / e
        out[kind] = int(n * (dense + routed))
    return out


def kv_capacity(plan, facts: BlockFacts, target, c, kv_per_token: int, context: int, batch: float | None) -> dict:
    """Tokens and sequences of `context` tokens a GPU's KV cache holds; with batch (per GPU), whether it fits."""
    weights = weight_bytes_per_gpu(plan, facts)
    hbm = target.gpu.hbm_bytes
    reserved = int(hbm * c["hbm_reserved_fraction"])
    buffers = int(c["inference_buffers_GB"] * 1e9)
    free = hbm - reserved - buffers - sum(weights.values())
    tp = plan.mesh.tp
    if free <= 0:
        raise UnitError(f"{plan.mode} unit EP{plan.mesh.ep} TP{tp}: weights {sum(weights.values()) / 1e9:.1f} GB + "
                        f"buffers {buffers / 1e9:.1f} GB exceed the {hbm / 1e9:.1f} GB of HBM per GPU")
    tokens = free // kv_per_token
    out = {"hbm_bytes": int(hbm), "reserved_bytes": reserved, "buffer_bytes": buffers,
           "weight_bytes": sum(weights.values()), "weight_bytes_by_block": weights, "kv_free_bytes": int(free),
           "kv_bytes_per_token": kv_per_token,
           "latent_cache": f"replicated over the TP{tp} group (MLA's latent cache is shared by all heads; head-TP "
                           "ranks each hold the group's whole cache)",
           "context": context, "tokens_per_gpu": int(tokens), "sequences_per_dp_group": int(tokens // context),
           "sequences_per_gpu": (tokens // context) / tp}
    if batch is not None:
        need = batch * tp * context * kv_per_token
        out["batch_per_gpu"], out["batch_fits"] = batch, need <= free
        if need > free:
            raise UnitError(f"batch {batch:g} per GPU at context {context} needs {need / 1e9:.1f} GB of latent cache "
                            f"per GPU ({tp} x {batch:g} sequences x {context} tokens x {kv_per_token} B) but only "
                            f"{free / 1e9:.1f} GB is left after weights and buffers (at most "
                            f"{out['sequences_per_gpu']:g} sequences per GPU)")
    return out


def _split(t: Time) -> dict:
    """The step's parts for plan.json, as training's (an inference unit has no pipeline bubble and no optimizer)."""
    d = t.as_dict()
    return {"compute": d["compute"], "memory": d["memory"], "overhead": d["overhead"], "comm": d["comm"],
            "latency": d["latency"], "bubble": 0.0, "optimizer": 0.0}


def prefill(plan, cfg, facts: BlockFacts, target, c, fanout) -> dict:
    """TTFT of the captured prompts in every DP group, prefill tokens/s per GPU, communication per micro-batch."""
    mb = int(c["inference_micro_batches"])
    prompts, prompt = facts.shapes["batch"], facts.shapes["seq"]
    step = unit_step(plan, cfg, facts, c, fanout, target, 1 / mb, 1 / (mb * prompt))
    ttft = step["time"].total
    tokens = plan.mesh.dp * prompts * prompt
    return {"prompt_tokens": prompt, "prompts_per_dp_group": prompts,
            "tokens_per_gpu_per_micro_batch": prompts * prompt / mb / (plan.mesh.tp if plan.mesh.sp else 1),
            "ttft_seconds": ttft, "tokens_per_gpu_per_second": tokens / ttft / plan.mesh.gpus,
            "split_seconds": _split(step["time"]), "per_layer": _per_layer(step),
            "communication_per_micro_batch": step["communication"]}


def decode(plan, cfg, facts: BlockFacts, target, c, fanout, mtp: bool) -> dict:
    """One decode step at the captured batch per GPU and context: TPOT and its parts, tokens/s per GPU.

    With mtp every step verifies a draft (two tokens per sequence through the main model) and runs the MTP
    module once per sequence to draft the next: it yields 1 + acceptance tokens per sequence on average.
    """
    mb = int(c["inference_micro_batches"])
    tp = plan.mesh.tp
    new = 2 if mtp else 1
    scale = tp * new / mb  # the DP group's sequences of one micro-batch (x new tokens) over the captured ones
    step = unit_step(plan, cfg, facts, c, fanout, target, scale, scale)
    t = step["time"]
    if mtp and "mtp" in facts.blocks:
        draft = unit_step(plan, cfg, facts, c, fanout, target, tp / mb, tp / mb, ["mtp"] * facts.counts["mtp"])
        t = t + draft["time"]
    per_step = 1 + (c["mtp_acceptance"] if mtp else 0)
    batch = facts.shapes["batch"]
    return {"batch_per_gpu": batch, "context": facts.shapes["kv_len"], "speculative": mtp,
            "tokens_per_sequence_per_step": per_step,
            "step_seconds": t.total, "tpot_seconds": t.total / per_step,
            "tokens_per_gpu_per_second": batch * per_step / t.total, "split_seconds": _split(t),
            "per_layer": _per_layer(step), "communication_per_micro_batch": step["communication"]}


def _per_layer(step: dict) -> dict:
    """Per block kind: one block's time (both micro-batches) and its parts."""
    return {k: {**_split(v["time"]), "seconds": v["time"].total, "compute_side_seconds": v["compute_side"].total,
                "communication_side_seconds": v["communication_side"].total} for k, v in step["per_kind"].items()}
