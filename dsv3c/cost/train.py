"""The cost of a training layout: chunk times per layer, step time from the schedule simulator, memory per
GPU, communication volumes. Pure functions of (config, target, layout, per-block costs, constants).

Time model (per layer, one micro-batch of `tokens` tokens on one GPU, balanced expert load):
- compute of a chunk = FP8 GEMM FLOPs / (FP8 peak x gemm_efficiency) + BF16 GEMM FLOPs / (BF16 peak x
  gemm_efficiency) + other FLOPs (attention core, elementwise) / (BF16 peak x attention_efficiency),
  peaks scaled to the SMs left to compute (sms - comm_sms); at least the HBM time of its bytes; plus a
  per-chunk kernel overhead. B = I + W includes the recomputed norms and up-projections.
- EP communication of an MoE layer (two-hop, `dsv3c.ops.ep.two_hop_bytes`): forward dispatch in FP8 with
  1x128 scales, combine in BF16; backward the same two exchanges in BF16. IB and NVLink run concurrently:
  seconds = max(IB bytes / IB bandwidth, NVLink bytes / NVLink bandwidth), bandwidth scaled by
  min(1, comm_sms / comm_sms_saturate).
- F alone = compute + communication (exposed); B alone likewise; W has none; F&B (DualPipe's overlapped
  pair) = max(compute of both, communication of both).
Step: the stage durations feed `dsv3c.schedules.simulate` (one hop = a micro-batch's BF16 activations over
the link between consecutive stages), then the ZeRO-1 gradient reduce-scatter and parameter all-gather over
the stage's data-parallel ranks (hierarchical: NVLink inside a node, IB across nodes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from dsv3c.cost import blocks as B
from dsv3c.cost.constants import Constants
from dsv3c.ops.ep import two_hop_bytes
from dsv3c.placement import ExpertPlacement, expected_fanout
from dsv3c.schedules import build
from dsv3c.cost.fastsim import CompiledSchedule, peaks_of
from dsv3c.schedules.simulate import simulate

GB = 1e9


class LayoutError(ValueError):
    """A layout the cost model cannot evaluate (illegal mesh or schedule)."""


@dataclass(frozen=True)
class Layout:
    """A training layout: pipeline/expert/data-parallel degrees, schedule and micro-batching."""

    pp: int
    ep: int
    dp: int
    kind: str
    micro_batches: int  # per step per pipeline (per DP rank)
    mb_seqs: int = 1  # sequences per micro-batch

    def to_dict(self) -> dict:
        return {"pp": self.pp, "ep": self.ep, "dp": self.dp, "tp": 1, "schedule": self.kind,
                "micro_batches": self.micro_batches, "micro_batch_sequences": self.mb_seqs, "zero": 1}

    def label(self) -> str:
        return f"PP{self.pp} EP{self.ep} DP{self.dp} {self.kind} m={self.micro_batches}x{self.mb_seqs}"


# ---- expected distinct targets of a token (the contiguous placement) ------------------------------------

@lru_cache(maxsize=256)
def expected_targets(experts: int, n_group: int, topk_group: int, top_k: int, ep: int, gpus_per_node: int):
    """(E[distinct nodes], E[distinct GPUs]) per token on the contiguous placement over ep ranks (expected_fanout)."""
    if ep <= 1 or not experts:
        return 1.0, 1.0
    placement = ExpertPlacement.contiguous(1, experts, ep, min(ep, gpus_per_node))
    return expected_fanout(placement, n_group, topk_group, top_k)


# ---- chunk times per block kind ----------------------------------------------------------------------

class ChunkModel:
    """Per-block chunk times for one micro-batch, reusable across layouts (cached per EP degree)."""

    def __init__(self, cfg, target, constants: Constants, block_costs: dict, tokens: int, seq: int,
                 policy: dict | None = None):
        self.cfg, self.target, self.c, self.tokens, self.seq = cfg, target, constants, tokens, seq
        self.policy = policy
        base_tokens = block_costs.get("tokens", tokens)
        scale = tokens / base_tokens
        analytic = B.analytic_block_costs(cfg, tokens, seq)
        self.blocks = {}
        for kind in B.KINDS:
            got = block_costs.get("blocks", {}).get(kind)
            self.blocks[kind] = ({k: v * scale for k, v in got.items()} if got is not None else analytic[kind])
        if "blocks" in block_costs and block_costs.get("seq", seq) != seq:  # the core is quadratic in seq
            extra = (B.attention_core_flops_per_token(cfg, seq) -
                     B.attention_core_flops_per_token(cfg, block_costs["seq"])) * tokens
            for kind in ("dense", "moe", "mtp"):
                self.blocks[kind]["flops"] += extra
                self.blocks[kind]["bwd_flops"] += 2.5 * extra
        self.n_dense = min(cfg.first_k_dense_replace, cfg.num_hidden_layers) if cfg.n_routed_experts else \
            cfg.num_hidden_layers
        self.n_moe = cfg.num_hidden_layers - self.n_dense
        self.has_mtp = cfg.num_nextn_predict_layers > 0
        self._ep: dict[int, dict] = {}

    # compute ---------------------------------------------------------------------------------------
    def _rates(self):
        g, c = self.target.gpu, self.c
        sms = g.sms - int(c["comm_sms"])
        if sms < 1:
            raise LayoutError(f"comm_sms {c['comm_sms']:g} leaves no SM to compute")
        frac = sms / g.sms
        return (g.fp8_flops * frac * c["gemm_efficiency"], g.bf16_flops * frac * c["gemm_efficiency"],
                g.bf16_flops * frac * c["attention_efficiency"], g.hbm_bandwidth * c["hbm_efficiency"])

    def compute(self, kind: str, ep: int) -> dict:
        """Compute seconds of F, I, W (B = I + W) and the FLOPs (model, hardware) of one block."""
        r8, r16, rother, hbm = self._rates()
        blk = self.blocks[kind]
        split = B.policy_split(self.cfg, kind, self.policy)
        t = self.tokens
        g8, g16, up = split["fp8"] * t, split["bf16"] * t, split["up"] * t
        fwd, bwd, rec = blk["flops"], blk["bwd_flops"], blk.get("recompute_flops", 0)
        other_f = max(0.0, fwd - g8 - g16)
        other_b = max(0.0, bwd - 2 * (g8 + g16))
        rec_fp8 = up if split["up_fp8"] else 0.0
        rec_other = max(0.0, rec - rec_fp8)
        nbytes = blk["bytes"]
        if kind in ("moe", "mtp") and ep > 1:  # each EP rank reads only its experts' weights
            p = B.params(self.cfg, kind)
            nbytes = max(0.0, nbytes - 2 * p["expert"] * (1 - 1 / ep))
        over = self.c["kernel_overhead_us"] * 1e-6
        f = max(g8 / r8 + g16 / r16 + other_f / rother, nbytes / hbm) + over
        w = max(g8 / r8 + g16 / r16, nbytes / hbm) + over  # one GEMM's worth per weight
        i = max(g8 / r8 + g16 / r16 + other_b / rother + rec_fp8 / r8 + rec_other / rother, 2 * nbytes / hbm) + over
        return {"F": f, "I": i, "W": w, "B": i + w, "model_flops": 3 * fwd, "hardware_flops": fwd + bwd + rec}

    # communication ---------------------------------------------------------------------------------
    def ep_comm(self, ep: int) -> dict:
        """Bytes (IB, NVLink) and seconds of the dispatch/combine of one MoE layer, forward and backward."""
        if ep in self._ep:
            return self._ep[ep]
        cfg, c, gpn = self.cfg, self.c, self.target.gpus_per_node
        if ep <= 1 or not cfg.n_routed_experts:
            zero = {"ib": 0, "nvlink": 0, "seconds": 0.0}
            out = {k: dict(zero) for k in ("dispatch", "combine", "dispatch_bwd", "combine_bwd")}
        else:
            nodes, gpus = expected_targets(cfg.n_routed_experts, cfg.n_group, cfg.topk_group,
                                           cfg.num_experts_per_tok, ep, gpn)
            D = cfg.hidden_size
            payloads = {"dispatch": D + 4 * math.ceil(D / 128), "combine": 2 * D, "dispatch_bwd": 2 * D,
                        "combine_bwd": 2 * D}
            out = {}
            for name, payload in payloads.items():
                ib, nv = two_hop_bytes(self.tokens, payload, ep, gpn, nodes, gpus)
                out[name] = {"ib": ib, "nvlink": nv, "seconds": self.link_seconds(ib, nv)}
        out["forward_seconds"] = out["dispatch"]["seconds"] + out["combine"]["seconds"]
        out["backward_seconds"] = out["dispatch_bwd"]["seconds"] + out["combine_bwd"]["seconds"]
        self._ep[ep] = out
        return out

    def link_seconds(self, ib: float, nvlink: float) -> float:
        """Seconds of concurrent IB and NVLink traffic on the comm SMs."""
        c = self.c
        scale = min(1.0, c["comm_sms"] / c["comm_sms_saturate"]) if c["comm_sms_saturate"] else 1.0
        if scale <= 0:
            return math.inf if ib or nvlink else 0.0
        return max(ib / (c["ib_GBps"] * GB * scale), nvlink / (c["nvlink_GBps"] * GB * scale))

    # chunks --------------------------------------------------------------------------------------
    def chunk(self, kind: str, ep: int) -> dict:
        """{F, B, I, W, FB} seconds of one block with its communication, plus the parts."""
        comp = self.compute(kind, ep)
        comm = self.ep_comm(ep) if kind in ("moe", "mtp") else None
        fm = comm["forward_seconds"] if comm else 0.0
        bm = comm["backward_seconds"] if comm else 0.0
        return {"F": comp["F"] + fm, "B": comp["B"] + bm, "I": comp["I"] + bm, "W": comp["W"],
                "FB": max(comp["F"] + comp["B"], fm + bm), "F_compute": comp["F"], "B_compute": comp["B"],
                "F_comm": fm, "B_comm": bm, "model_flops": comp["model_flops"],
                "hardware_flops": comp["hardware_flops"]}

    def units(self) -> list[str]:
        """The model's pipeline units in order: the layers, then the head, then MTP."""
        out = ["dense"] * self.n_dense + ["moe"] * self.n_moe + ["head"]
        return out + (["mtp"] if self.has_mtp else [])


# ---- stages ----------------------------------------------------------------------------------------

def partition(weights: list[float], n: int) -> list[tuple[int, int]]:
    """Contiguous split of weights into n non-empty parts minimising the largest part: [(start, stop)]."""
    if n > len(weights):
        raise LayoutError(f"{n} pipeline stages but only {len(weights)} layers/units to place")
    lo, hi = max(weights), sum(weights)

    def parts(cap):
        out, start, acc = [], 0, 0.0
        for i, w in enumerate(weights):
            if acc + w > cap and i > start:
                out.append((start, i))
                start, acc = i, 0.0
            acc += w
        out.append((start, len(weights)))
        return out

    for _ in range(60):
        mid = (lo + hi) / 2
        if len(parts(mid)) <= n:
            hi = mid
        else:
            lo = mid
    cut = parts(hi)
    # split further (the largest parts first) until there are exactly n non-empty parts
    while len(cut) < n:
        idx = max((j for j, (a, b) in enumerate(cut) if b - a > 1), key=lambda j: sum(weights[cut[j][0]:cut[j][1]]))
        a, b = cut[idx]
        best = min(range(a + 1, b), key=lambda m: max(sum(weights[a:m]), sum(weights[m:b])))
        cut[idx:idx + 1] = [(a, best), (best, b)]
    return cut


class TrainCostModel:
    """Everything a layout evaluation needs that does not depend on the layout, computed once."""

    def __init__(self, cfg, target, constants: Constants | None = None, block_costs: dict | None = None,
                 seq: int = 4096, global_batch: int = 15360, policy: dict | None = None):
        self.cfg, self.target, self.seq, self.global_batch = cfg, target, seq, global_batch
        self.c = constants or Constants.for_target(target)
        self.block_costs = block_costs or {}
        self.policy = policy
        self._chunks: dict[int, ChunkModel] = {}
        self._stages: dict = {}
        self._sched: dict = {}

    def chunks(self, mb_seqs: int) -> ChunkModel:
        if mb_seqs not in self._chunks:
            self._chunks[mb_seqs] = ChunkModel(self.cfg, self.target, self.c, self.block_costs, self.seq * mb_seqs,
                                               self.seq, self.policy)
        return self._chunks[mb_seqs]

    def schedule(self, kind: str, pp: int, m: int):
        key = (kind, pp, m)
        if key not in self._sched:
            sched = build(kind, pp, m)
            self._sched[key] = [sched, peaks_of(sched), None]
        return self._sched[key]

    def stages(self, layout: Layout) -> list[dict]:
        """Per model stage: its units, chunk times (summed), params and activation bytes per micro-batch."""
        n = 2 * layout.pp if layout.kind == "dualpipev" else layout.pp
        key = (n, layout.ep, layout.mb_seqs)
        if key in self._stages:
            return self._stages[key]
        cm = self.chunks(layout.mb_seqs)
        units = cm.units()
        per = {k: cm.chunk(k, layout.ep) for k in set(units)}
        cut = partition([per[u]["F_compute"] + per[u]["B_compute"] for u in units], n)
        out = []
        for s, (a, b) in enumerate(cut):
            kinds = units[a:b]
            st = {k: sum(per[u][k] for u in kinds) for k in ("F", "B", "I", "W", "F_compute", "B_compute",
                                                              "F_comm", "B_comm", "model_flops", "hardware_flops")}
            st["units"] = (a, b)
            st["layers"] = sum(1 for u in kinds if u in ("dense", "moe"))
            st["moe_layers"] = sum(1 for u in kinds if u in ("moe", "mtp"))
            st["kinds"] = kinds
            p_dense = p_expert = 0
            act = {"bf16": 0.0, "fp8": 0.0}
            for u in kinds:
                p = B.params(self.cfg, u)
                p_dense += p["dense"] if u != "head" else p["dense"] - p["embedding"]
                p_expert += p["expert"]
                a_ = B.activation_bytes_per_token(self.cfg, u)
                act["bf16"] += a_["bf16"] * cm.tokens
                act["fp8"] += a_["fp8"] * cm.tokens
            if s == 0:
                p_dense += B.params(self.cfg, "head")["embedding"]
            st["params_dense"], st["params_expert"] = p_dense, p_expert
            st["act_bf16"], st["act_fp8"] = act["bf16"], act["fp8"]
            out.append(st)
        self._stages[key] = out
        return out

    # ---- the pieces of one evaluation ------------------------------------------------------------
    def stage_map(self, layout: Layout, sched) -> tuple[list[int], dict[int, int]]:
        """(model stage of each schedule stage, rank of each schedule stage)."""
        owner = sched.layout.stage_rank()
        n_sched = len(owner)
        if layout.kind == "dualpipe":
            model = [s if s < layout.pp else s - layout.pp for s in range(n_sched)]
        else:
            model = list(range(n_sched))
        return model, owner

    def pp_hop(self, layout: Layout) -> dict:
        """Bytes and seconds of one pipeline send (a micro-batch's BF16 hidden states) between neighbours."""
        cm = self.chunks(layout.mb_seqs)
        nbytes = cm.tokens * self.cfg.hidden_size * 2
        if layout.pp <= 1:
            return {"bytes": nbytes, "seconds": 0.0, "link": "none"}
        stage_size = self.target.gpus // layout.pp
        cross_node = stage_size >= self.target.gpus_per_node or self.target.gpus_per_node % stage_size
        # consecutive stages are stage_size ranks apart: same local index on another node rides its plane's IB
        link = "ib" if cross_node and self.target.gpus > self.target.gpus_per_node else "nvlink"
        bw = (self.c["ib_GBps"] if link == "ib" else self.c["nvlink_GBps"]) * GB
        return {"bytes": nbytes, "seconds": nbytes / bw * self.c["pp_exposed_fraction"], "link": link}

    def rank_stages(self, layout: Layout, sched) -> list[list[int]]:
        model, owner = self.stage_map(layout, sched)
        out = [[] for _ in range(layout.pp)]
        for s, r in owner.items():
            out[r].append(model[s])
        return out

    def dp_collectives(self, layout: Layout, rank_params: list[tuple[float, float]]) -> dict:
        """ZeRO-1 reduce-scatter of gradients and all-gather of parameters at step end, per GPU (worst rank)."""
        gpn = self.target.gpus_per_node
        copies = 2 if layout.kind == "dualpipe" else 1
        worst = {"reduce_scatter_bytes": 0.0, "all_gather_bytes": 0.0, "seconds": 0.0, "ib_bytes": 0.0,
                 "nvlink_bytes": 0.0}
        for dense, expert in rank_params:
            t = ib_tot = nv_tot = 0.0
            for p, group in ((dense, layout.dp * copies), (expert, layout.dp // layout.ep * copies)):
                if group <= 1 or p == 0:
                    continue
                in_node = math.gcd(group, gpn) if layout.dp >= gpn else min(group, layout.dp)
                nodes = max(1, group // in_node)
                per_param = self.c["grad_reduce_bytes"] + self.c["param_gather_bytes"]
                nv = p * per_param * (in_node - 1) / in_node
                ib = p * per_param / in_node * (nodes - 1) / nodes
                ib_tot += ib
                nv_tot += nv
                t += self.link_seconds(ib, nv)
            if t > worst["seconds"]:
                worst = {"reduce_scatter_bytes": (ib_tot + nv_tot) * self.c["grad_reduce_bytes"] /
                         (self.c["grad_reduce_bytes"] + self.c["param_gather_bytes"]),
                         "all_gather_bytes": (ib_tot + nv_tot) * self.c["param_gather_bytes"] /
                         (self.c["grad_reduce_bytes"] + self.c["param_gather_bytes"]),
                         "seconds": t, "ib_bytes": ib_tot, "nvlink_bytes": nv_tot}
        return worst

    def link_seconds(self, ib, nv):
        return self.chunks(1).link_seconds(ib, nv)

    def memory(self, layout: Layout, sched, peaks, stages) -> dict:
        """memory_per_gpu for the layout (bytes per pipeline rank against the GPU's capacity)."""
        cap = self.target.gpu.hbm_bytes
        copies = 2 if layout.kind == "dualpipe" else 1
        edp = max(1, layout.dp // layout.ep)
        cm = self.chunks(layout.mb_seqs)
        comm = cm.ep_comm(layout.ep)
        gpus_per_token = expected_targets(self.cfg.n_routed_experts, self.cfg.n_group, self.cfg.topk_group,
                                          self.cfg.num_experts_per_tok, layout.ep,
                                          self.target.gpus_per_node)[1] if layout.ep > 1 else 1
        D = self.cfg.hidden_size
        buf = 0.0
        if layout.ep > 1:
            buf = cm.tokens * gpus_per_token * ((D + 4 * math.ceil(D / 128)) + 2 * D) * self.c["comm_buffer_factor"]
        buf += 2 * 2 * cm.tokens * D * 2 if layout.pp > 1 else 0  # PP send/recv buffers, both directions
        ranks = []
        for r, held in enumerate(self.rank_stages(layout, sched)):
            dense = sum(stages[s]["params_dense"] for s in held)
            expert = sum(stages[s]["params_expert"] for s in held) / layout.ep
            act_unit = max(stages[s]["act_bf16"] for s in held)
            fp8_unit = max(stages[s]["act_fp8"] for s in held)
            row = {
                "weights": 2 * (dense + expert),
                "gradients": 4 * (dense + expert),
                "master_weights": 4 * (dense / (layout.dp * copies) + expert / (edp * copies)),
                "optimizer": 2 * 2 * (dense / (layout.dp * copies) + expert / (edp * copies)),
                "activations": peaks[r] * act_unit,
                "fp8_cache": peaks[r] * fp8_unit,
                "comm_buffers": buf,
                "workspace": self.c["workspace_GB"] * GB,
                "peak_micro_batches": peaks[r],
                "stages": sorted(held),
            }
            row["total"] = sum(row[k] for k in ("weights", "gradients", "master_weights", "optimizer", "activations",
                                                 "fp8_cache", "comm_buffers", "workspace"))
            row["fits"] = row["total"] <= cap
            if not row["fits"]:
                parts = sorted(((k, row[k]) for k in ("weights", "gradients", "activations", "fp8_cache",
                                                      "master_weights", "optimizer", "comm_buffers")),
                               key=lambda kv: -kv[1])
                row["overflow"] = {"bytes": row["total"] - cap,
                                   "largest": [f"{k} {v / GB:.1f} GB" for k, v in parts[:3]]}
            ranks.append(row)
        return {"capacity": cap, "ranks": ranks, "fits": all(r["fits"] for r in ranks),
                "peak_total": max(r["total"] for r in ranks), "_comm": comm}

    def memory_lower_bound(self, layout: Layout) -> float:
        """A lower bound of rank 0's memory without building the schedule (every kind holds >= min(m, pp) F's there)."""
        stages = self.stages(layout)
        n = len(stages)
        held = [0, n - 1] if layout.kind in ("dualpipe", "dualpipev") and n > 1 else [0]
        copies = 2 if layout.kind == "dualpipe" else 1
        dense = sum(stages[s]["params_dense"] for s in held)
        expert = sum(stages[s]["params_expert"] for s in held) / layout.ep
        act = min(stages[s]["act_bf16"] + stages[s]["act_fp8"] for s in held)
        static = 6 * (dense + expert) + 8 * (dense / (layout.dp * copies) + expert / (max(1, layout.dp // layout.ep) * copies))
        return static + min(layout.micro_batches, layout.pp) * act + self.c["workspace_GB"] * GB

    def evaluate(self, layout: Layout, simulate_step: bool = True, keep_timeline: bool = False) -> dict:
        """cost, memory_per_gpu and communication of one layout."""
        entry = self.schedule(layout.kind, layout.pp, layout.micro_batches)
        sched, peaks = entry[0], entry[1]
        stages = self.stages(layout)
        mem = self.memory(layout, sched, peaks, stages)
        mem.pop("_comm")
        out = {"layout": layout, "memory_per_gpu": mem}
        if not simulate_step:
            return out
        model, owner = self.stage_map(layout, sched)
        rank_of = owner
        by_rank: dict[int, list[int]] = {}
        for s, r in rank_of.items():
            by_rank.setdefault(r, []).append(s)
        n = len(model)
        dur = {k: [stages[model[s]][k] for s in range(n)] for k in ("F", "B", "I", "W")}
        fb = []
        for s in range(n):
            others = [o for o in by_rank[rank_of[s]] if o != s]
            o = others[0] if others else s
            a, b = stages[model[s]], stages[model[o]]
            fb.append(max(a["F_compute"] + b["B_compute"], a["F_comm"] + b["B_comm"]))
        dur["F&B"] = fb
        hop = self.pp_hop(layout)
        if keep_timeline:
            tl = simulate(sched, dur, hop["seconds"])
            pipe_step, busy = tl.step, tl.busy
        else:
            tl = None
            if entry[2] is None:
                entry[2] = CompiledSchedule(sched)
            pipe_step, busy = entry[2].step(dur, hop["seconds"])
        rank_params = []
        for held in self.rank_stages(layout, sched):
            rank_params.append((sum(stages[s]["params_dense"] for s in held),
                                sum(stages[s]["params_expert"] for s in held) / layout.ep))
        dpc = self.dp_collectives(layout, rank_params)
        step = pipe_step + dpc["seconds"] * self.c["dp_exposed_fraction"]
        tokens = self.global_batch * self.seq
        gpus = self.target.gpus
        cm = self.chunks(layout.mb_seqs)
        per_block = {k: cm.chunk(k, layout.ep) for k in B.KINDS}
        n_main = cm.n_dense * per_block["dense"]["model_flops"] + cm.n_moe * per_block["moe"]["model_flops"] + \
            per_block["head"]["model_flops"]
        hw = cm.n_dense * per_block["dense"]["hardware_flops"] + cm.n_moe * per_block["moe"]["hardware_flops"] + \
            per_block["head"]["hardware_flops"] + (per_block["mtp"]["hardware_flops"] if cm.has_mtp else 0)
        main_per_token = n_main / cm.tokens
        hw_per_token = hw / cm.tokens
        tps = tokens / step
        peak = gpus * self.target.gpu.bf16_flops
        cost = {
            "step_seconds": step,
            "pipeline_seconds": pipe_step,
            "dp_seconds": dpc["seconds"],
            "tokens_per_step": tokens,
            "tokens_per_second": tps,
            "tokens_per_gpu_per_second": tps / gpus,
            "flops_per_token_main": main_per_token,
            "hardware_flops_per_token": hw_per_token,
            "mfu": main_per_token * tps / peak,
            "hfu": hw_per_token * tps / peak,
            "gpu_hours_per_trillion_tokens": gpus * (1e12 / tps) / 3600,
            "chunk_seconds": {k: {x: per_block[k][x] for x in ("F", "B", "I", "W", "FB")}
                              for k in B.KINDS if k != "mtp" or cm.has_mtp},
            "stage_seconds": [{x: st[x] for x in ("F", "B", "I", "W")} | {"layers": st["layers"],
                              "units": list(st["kinds"])} for st in stages],
            "bubble_seconds": [pipe_step - b for b in busy],
            "micro_batch_tokens": cm.tokens,
        }
        comm = cm.ep_comm(layout.ep)
        m = layout.micro_batches
        moe_per_rank = max(sum(stages[s]["moe_layers"] for s in held) for held in self.rank_stages(layout, sched))
        ep_mb = {k: {"ib_bytes": comm[k]["ib"], "nvlink_bytes": comm[k]["nvlink"], "seconds": comm[k]["seconds"]}
                 for k in ("dispatch", "combine", "dispatch_bwd", "combine_bwd")}
        ep_ib = sum(v["ib_bytes"] for v in ep_mb.values())
        ep_nv = sum(v["nvlink_bytes"] for v in ep_mb.values())
        ep_s = sum(v["seconds"] for v in ep_mb.values())
        boundaries = max(len([s for s in by_rank[r]]) for r in by_rank)
        out["cost"] = cost
        out["communication"] = {
            "ep": {"per_layer_per_micro_batch": ep_mb,
                   "per_step_per_gpu": {"moe_layers": moe_per_rank, "micro_batches": m,
                                        "ib_bytes": ep_ib * moe_per_rank * m, "nvlink_bytes": ep_nv * moe_per_rank * m,
                                        "seconds": ep_s * moe_per_rank * m}},
            "pp": {"per_micro_batch": {"bytes": hop["bytes"], "seconds": hop["seconds"], "link": hop["link"]},
                   "per_step_per_gpu": {"bytes": 2 * hop["bytes"] * m * boundaries if layout.pp > 1 else 0,
                                        "seconds": 2 * hop["seconds"] * m * boundaries if layout.pp > 1 else 0.0}},
            "dp": {"per_step_per_gpu": dpc},
        }
        out["_timeline"] = tl if keep_timeline else None
        return out


def evaluate_layout(cfg, target, layout: Layout, constants=None, block_costs=None, seq=4096, global_batch=15360,
                    policy=None) -> dict:
    """One layout's cost, memory and communication (a fresh TrainCostModel)."""
    return TrainCostModel(cfg, target, constants, block_costs, seq, global_batch, policy).evaluate(layout)
