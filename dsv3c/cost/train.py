"""The cost of a training plan: every unit priced from its block facts, the stage split, the simulated step,
memory per GPU, the data-parallel collectives and the optimizer step. One `TrainPricer` serves the layout
search, the stage split, the schedule simulation and the reported figures: they are the same computation.

Per unit (embedding, each layer, head, MTP) and micro-batch on one GPU, `dsv3c.cost.price` gives the
compute side F, I (backward for the input, with the recomputed forwards R) and W (backward for the weights,
with the FP32 gradient accumulation), and the communication side (EP dispatch/combine forward and backward,
on the comm SMs). A chunk run alone exposes its communication; an overlapped F&B pair (DualPipe, DualPipeV)
takes the longer of its two compute chunks together and their two communications together.

Stages are cut from the units' priced times (communication included) so that the slowest stage is as fast
as it can be, under each stage's share of the GPU's memory. The schedule of the chosen kind is simulated
once with those stage durations and the pipeline send of a micro-batch's activations between ranks; the
step adds the ZeRO-1 gradient reduce-scatter and parameter all-gather (the exposed share) and the AdamW
update of the GPU's optimizer shard. Every part of the step is reported: compute, memory, overheads (launch
gaps), exposed communication (bandwidth) and latency, bubble, optimizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from dsv3c.cost import calibration as cal
from dsv3c.cost.facts import BlockFacts
from dsv3c.cost.fastsim import CompiledSchedule
from dsv3c.cost.memory import activation_bytes_per_token
from dsv3c.cost.price import ZERO, BlockTime, Pricer, Shard, Time, compute_sms, overlap, parts_sum
from dsv3c.schedules import build
from dsv3c.schedules.simulate import simulate

GB = 1e9
STEP_PARTS = ("compute", "memory", "overhead", "comm", "latency", "bubble", "optimizer")


class LayoutError(ValueError):
    """A training layout the cost model cannot lay out (more stages than units, ...)."""


@dataclass(frozen=True)
class Candidate:
    """What the training cost model evaluates: the mesh's degrees, the schedule and its micro-batches."""

    pp: int
    ep: int
    dp: int
    kind: str
    micro_batches: int

    def label(self) -> str:
        """A short name: 'PP16 EP64 DP128 dualpipe m=120'."""
        return f"PP{self.pp} EP{self.ep} DP{self.dp} {self.kind} m={self.micro_batches}"

    @property
    def stages(self) -> int:
        """Model stages the layout cuts: 2·pp for DualPipeV, else pp."""
        return 2 * self.pp if self.kind == "dualpipev" else self.pp


def chunk_parts(t: BlockTime) -> dict[str, Time]:
    """A unit's (or stage's) chunk Times: F and B alone, I alone, W, their communication."""
    return {"F": t.F + t.f_comm, "B": t.B + t.b_comm, "I": t.I + t.R + t.b_comm, "W": t.W,
            "F_compute": t.F, "B_compute": t.B, "F_comm": t.f_comm, "B_comm": t.b_comm}


def add_blocks(times: list[BlockTime]) -> BlockTime:
    """Several units run one after the other in one chunk (a stage)."""
    return BlockTime(*(parts_sum(getattr(t, k) for t in times) for k in ("F", "I", "W", "R", "f_comm", "b_comm")),
                     flops=sum(t.flops for t in times), kernels=sum(t.kernels for t in times))


def partition(weights: list[float], n: int, fits=None) -> list[tuple[int, int]]:
    """Contiguous split of weights into n non-empty parts: the largest part as small as it can be, and among those
    splits the most even one (least sum of squares). Returns [(start, stop)].

    `fits(k, a, b)` may forbid part k = weights[a:b] (memory); it is dropped when no split satisfies it.
    """
    if n > len(weights):
        raise LayoutError(f"{n} pipeline stages but only {len(weights)} units (layers, embedding, head, MTP) to place")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    for rule in ((fits, None) if fits else (None,)):
        cap = _min_max(weights, n, rule)
        if cap is not None:
            return _even_split(prefix, n, cap * (1 + 1e-9), rule)
    raise LayoutError("no stage split")  # unreachable: without a rule a split always exists


def _packs(weights, cap: float, n: int, fits) -> bool:
    """Whether greedy left-to-right packing within cap (and fits) needs at most n parts."""
    parts, start, acc = 1, 0, 0.0
    for i, w in enumerate(weights):
        if w > cap or (fits and not fits(parts - 1, i, i + 1)):
            return False
        if i > start and (acc + w > cap or (fits and not fits(parts - 1, start, i + 1))):
            parts, start, acc = parts + 1, i, 0.0
            if parts > n:
                return False
        acc += w
    return True


def _min_max(weights, n: int, fits) -> float | None:
    """The smallest largest-part sum of a split into at most n parts (bisection), None when fits allows none."""
    lo, hi = max(weights), sum(weights)
    if not _packs(weights, hi, n, fits):
        return None
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _packs(weights, mid, n, fits) else (mid, hi)
    return hi


def _even_split(prefix, n: int, cap: float, fits) -> list[tuple[int, int]]:
    """The split into exactly n parts of at most cap each (and fitting) with the least sum of squared part sums."""
    size = len(prefix) - 1
    inf = math.inf
    best = [[inf] * (size + 1) for _ in range(n + 1)]
    arg = [[0] * (size + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for k in range(1, n + 1):
        for j in range(k, size - (n - k) + 1):
            i = j - 1
            while i >= k - 1 and prefix[j] - prefix[i] <= cap:
                if best[k - 1][i] < inf and (not fits or fits(k - 1, i, j)):
                    v = best[k - 1][i] + (prefix[j] - prefix[i]) ** 2
                    if v < best[k][j]:
                        best[k][j], arg[k][j] = v, i
                i -= 1
    if best[n][size] == inf:  # cap allows fewer parts only (zero-weight units): split anywhere below cap
        return _even_split(prefix, n, math.inf, fits) if cap < math.inf else [(k, k + 1) for k in range(n)]
    cut, j = [], size
    for k in range(n, 0, -1):
        cut.append((arg[k][j], j))
        j = arg[k][j]
    return cut[::-1]


def balance_ranks(weights: list[float], cut: list[tuple[int, int]], rank_of: list[int]) -> list[tuple[int, int]]:
    """The cut with its boundaries moved one unit at a time while that lowers the busiest rank's load (then the
    sum of squared rank loads): stages sharing a rank (DualPipe's two directions, DualPipeV's V) add up."""
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    bounds = [a for a, _ in cut] + [cut[-1][1]]
    ranks = max(rank_of) + 1

    def score(b):
        load = [0.0] * ranks
        for s in range(len(b) - 1):
            load[rank_of[s]] += prefix[b[s + 1]] - prefix[b[s]]
        return max(load), sum(x * x for x in load)

    best = score(bounds)
    improved = True
    while improved:
        improved = False
        for i in range(1, len(bounds) - 1):
            for step in (-1, 1):
                moved = bounds[:i] + [bounds[i] + step] + bounds[i + 1:]
                if not bounds[i - 1] < moved[i] < bounds[i + 1]:
                    continue
                got = score(moved)
                if got < best:
                    bounds, best, improved = moved, got, True
    return list(zip(bounds, bounds[1:]))


class TrainPricer:
    """Everything a training layout's evaluation needs that does not depend on the layout, computed once."""

    def __init__(self, cfg, target, facts: BlockFacts, constants, global_batch: int, fanout, imbalance=None,
                 redundant: int = 0, flops_per_token: tuple = (0, 0)):
        """fanout(ep) -> (E[nodes], E[GPUs]) a token's routes reach under that EP degree's placement; imbalance(ep)
        -> routes at the busiest GPU over the mean (default: the constant expert_imbalance); flops_per_token the
        model's (main-model, hardware) training FLOPs per token from its graph (for MFU and HFU)."""
        if facts.mode != "train":
            raise LayoutError("the training cost model needs block facts of a training capture")
        self.cfg, self.target, self.facts, self.c = cfg, target, facts, constants
        self.global_batch, self.redundant = global_batch, redundant
        self.flops_per_token_main, self.hardware_flops_per_token = flops_per_token
        self._fanout = {}
        self._fanout_of = fanout
        self.imbalance = imbalance or (lambda ep: constants["expert_imbalance"])
        self.pricer = Pricer(target.gpu, compute_sms(target.gpu, "train", constants), constants, "train")
        self.units = facts.units()
        rows = [(facts.params.get(u, {}).get("dense", 0), facts.params.get(u, {}).get("expert", 0),
                 *activation_bytes_per_token(cfg, u).values()) for u in self.units]
        self._prefix = [tuple(0.0 for _ in range(4))]
        for row in rows:  # prefix sums of (dense params, expert params, BF16 and FP8 activation bytes per token)
            self._prefix.append(tuple(a + b for a, b in zip(self._prefix[-1], row)))
        self._times: dict = {}
        self._stages: dict = {}
        self._sched: dict = {}

    def fanout(self, ep: int) -> tuple[float, float]:
        """Expected distinct (nodes, GPUs) a token's routes reach under EP ep's placement (computed once per ep)."""
        if ep not in self._fanout:
            self._fanout[ep] = self._fanout_of(ep) if ep > 1 else (1.0, 1.0)
        return self._fanout[ep]

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch (one captured sequence)."""
        return self.facts.tokens

    def slots(self, ep: int) -> int:
        """Expert slots per EP rank (routed experts and redundant replicas over the EP group)."""
        return max(1, ((self.cfg.n_routed_experts or 1) + self.redundant) // ep)

    def unit_time(self, kind: str, ep: int) -> BlockTime:
        """One unit's BlockTime under EP ep, the FP32 gradient accumulation of its weights in W."""
        key = (kind, ep)
        if key not in self._times:
            sh = Shard("train", ep=ep, slots=self.slots(ep), routes_per_token=self.cfg.num_experts_per_tok,
                       imbalance=self.imbalance(ep), fanout=self.fanout(ep) if ep > 1 else (1.0, 1.0),
                       gpus_per_node=self.target.gpus_per_node, comm_sms=int(self.c["comm_sms"]))
            t = self.pricer.block(self.facts.blocks[kind], sh)
            p = self.facts.params.get(kind, {})
            local = p.get("dense", 0) + p.get("expert", 0) / ep
            acc = Time(memory=cal.memory_seconds(local * self.c["grad_accum_bytes"], gpu=self.target.gpu, c=self.c))
            self._times[key] = BlockTime(t.F, t.I, t.W + acc, t.R, t.f_comm, t.b_comm, t.comm, t.flops, t.kernels)
        return self._times[key]

    def unit_weight(self, kind: str, cand: Candidate) -> float:
        """What a unit adds to its stage's time per micro-batch: F + B, overlapped when the schedule pairs chunks."""
        t = self.unit_time(kind, cand.ep)
        if cand.kind in ("dualpipe", "dualpipev"):
            return overlap(t.F + t.B, t.f_comm + t.b_comm).total
        return (t.F + t.B + t.f_comm + t.b_comm).total

    # ---- stages --------------------------------------------------------------------------------------
    def stage_units(self, cand: Candidate, fits=None) -> list[tuple[int, int]]:
        """The units of each model stage, [(start, stop)], cut on the priced unit times (and memory).

        The head and the MTP modules stay together on the last stage (the loss needs both), as one piece. Stages
        that share a rank are balanced by their sum: DualPipe runs model stage s on rank s and, in the other
        direction, on rank pp-1-s; DualPipeV's rank r holds stages r and 2·pp-1-r.
        """
        key = (cand.kind, cand.stages, cand.ep)
        if fits is None and key in self._stages:
            return self._stages[key]
        tail = self.units.index("head")
        weights = [self.unit_weight(u, cand) for u in self.units]
        pieces = weights[:tail] + [sum(weights[tail:])]
        if fits is not None:
            cut = partition(pieces, cand.stages, lambda k, a, b: fits(k, a, b + (len(weights) - len(pieces)) *
                                                                         (b == len(pieces))))
        else:
            rank_of = list(range(cand.stages))
            if cand.kind == "dualpipe":
                rank_of = [min(s, cand.pp - 1 - s) for s in range(cand.pp)]
            elif cand.kind == "dualpipev":
                rank_of = [min(s, 2 * cand.pp - 1 - s) for s in range(cand.stages)]
            cut = balance_ranks(pieces, partition(pieces, cand.stages), rank_of)
        cut = [(a, len(weights) if b == len(pieces) else b) for a, b in cut]
        if fits is None:
            self._stages[key] = cut
        return cut

    def stage_time(self, cand: Candidate, cut) -> list[BlockTime]:
        """Each model stage's BlockTime: its units one after the other."""
        return [add_blocks([self.unit_time(u, cand.ep) for u in self.units[a:b]]) for a, b in cut]

    def _range(self, a: int, b: int) -> tuple:
        """(dense params, expert params, BF16 bytes/token, FP8 bytes/token) of units[a:b]."""
        return tuple(y - x for x, y in zip(self._prefix[a], self._prefix[b]))

    def stage_params(self, cut, ep: int) -> list[tuple[float, float]]:
        """(dense, routed-expert) parameters each model stage holds on one GPU (experts: its EP shard)."""
        return [(r[0], r[1] / ep) for r in (self._range(a, b) for a, b in cut)]

    def stage_activations(self, cut) -> list[tuple[float, float]]:
        """(BF16, FP8) bytes each model stage keeps per micro-batch in flight for its backward."""
        return [(r[2] * self.tokens, r[3] * self.tokens) for r in (self._range(a, b) for a, b in cut)]

    # ---- schedule ------------------------------------------------------------------------------------
    def schedule(self, cand: Candidate):
        """(actions per rank, compiled schedule) of the candidate's kind, pp and micro-batches, built once."""
        key = (cand.kind, cand.pp, cand.micro_batches)
        if key not in self._sched:
            sched = build(cand.kind, cand.pp, cand.micro_batches)
            self._sched[key] = (sched, CompiledSchedule(sched))
        return self._sched[key]

    @staticmethod
    def model_stage(sched, cand: Candidate) -> list[int]:
        """The model stage each schedule stage runs (DualPipe's stage pp+s runs stage s's layers)."""
        n = len(sched.layout.stage_rank())
        return [s % cand.pp if cand.kind == "dualpipe" else s for s in range(n)]

    def rank_stages(self, sched, cand: Candidate) -> list[list[int]]:
        """The model stages each pipeline rank holds (DualPipe: two copies; DualPipeV: two stages)."""
        owner = sched.layout.stage_rank()
        model = self.model_stage(sched, cand)
        out = [[] for _ in range(cand.pp)]
        for s, r in sorted(owner.items()):
            out[r].append(model[s])
        return out

    def durations(self, sched, cand: Candidate, stages: list[BlockTime]) -> dict[str, list[Time]]:
        """Per schedule stage its F, B, I, W and F&B (with the co-resident stage's backward) Times."""
        owner = sched.layout.stage_rank()
        model = self.model_stage(sched, cand)
        parts = [chunk_parts(stages[model[s]]) for s in range(len(model))]
        by_rank: dict[int, list[int]] = {}
        for s, r in owner.items():
            by_rank.setdefault(r, []).append(s)
        out = {k: [p[k] for p in parts] for k in ("F", "B", "I", "W")}
        pair = []
        for s in range(len(model)):
            o = next((x for x in by_rank[owner[s]] if x != s), s)
            a, b = parts[s], parts[o]
            pair.append(overlap(a["F_compute"] + b["B_compute"], a["F_comm"] + b["B_comm"]))
        out["F&B"] = pair
        return out

    def pp_hop(self, cand: Candidate) -> dict:
        """A micro-batch's BF16 activations sent between neighbouring pipeline ranks: bytes, link, seconds."""
        nbytes = self.tokens * self.cfg.hidden_size * 2
        if cand.pp <= 1:
            return {"bytes": nbytes, "link": "none", "seconds": 0.0}
        stage_size = self.target.gpus // cand.pp
        link = "ib" if stage_size % self.target.gpus_per_node == 0 and self.target.nodes > 1 else "nvlink"
        return {"bytes": nbytes, "link": link, "seconds": cal.p2p_seconds(nbytes, link=link, c=self.c)}

    # ---- step parts outside the pipeline -------------------------------------------------------------
    def dp_collectives(self, cand: Candidate, rank_params) -> dict:
        """ZeRO-1 at step end on the busiest rank: gradient reduce-scatter and parameter all-gather over its DP groups."""
        gpn = self.target.gpus_per_node
        copies = 2 if cand.kind == "dualpipe" else 1
        worst = {"seconds": 0.0, "latency_seconds": 0.0, "reduce_scatter_bytes": 0.0, "all_gather_bytes": 0.0}
        for dense, expert in rank_params:
            row = {"seconds": 0.0, "latency_seconds": 0.0, "reduce_scatter_bytes": 0.0, "all_gather_bytes": 0.0}
            for params, group in ((dense, cand.dp * copies), (expert, max(1, cand.dp // cand.ep) * copies)):
                if group <= 1 or params == 0:
                    continue
                per_node = min(group, gpn) if group <= cand.dp else gpn
                kw = dict(ranks=group, ranks_per_node=per_node, c=self.c)
                rs_b, ag_b = params * self.c["grad_reduce_bytes"], params * self.c["param_gather_bytes"]
                rs, ag = cal.reduce_scatter_seconds(rs_b, **kw), cal.all_gather_seconds(ag_b, **kw)
                row["seconds"] += rs + ag
                row["latency_seconds"] += cal.reduce_scatter_seconds(0.0, **kw) + cal.all_gather_seconds(0.0, **kw)
                row["reduce_scatter_bytes"] += rs_b
                row["all_gather_bytes"] += ag_b
            if row["seconds"] > worst["seconds"]:
                worst = row
        return worst

    def optimizer_seconds(self, cand: Candidate, rank_params) -> float:
        """The AdamW update of the busiest rank's ZeRO-1 shard (memory-bound: bytes per parameter at HBM speed)."""
        copies = 2 if cand.kind == "dualpipe" else 1
        edp = max(1, cand.dp // cand.ep)
        shard = max(d / (cand.dp * copies) + e / (edp * copies) for d, e in rank_params)
        return cal.memory_seconds(shard * self.c["optimizer_bytes_per_param"], gpu=self.target.gpu, c=self.c)

    # ---- memory --------------------------------------------------------------------------------------
    def memory(self, cand: Candidate, sched, peaks, cut) -> dict:
        """memory_per_gpu: bytes per pipeline rank against the GPU's capacity."""
        cap = self.target.gpu.hbm_bytes
        copies = 2 if cand.kind == "dualpipe" else 1
        edp = max(1, cand.dp // cand.ep)
        params = self.stage_params(cut, cand.ep)
        acts = self.stage_activations(cut)
        buffers = self.comm_buffers(cand)
        ranks = []
        for r, held in enumerate(self.rank_stages(sched, cand)):
            dense = sum(params[s][0] for s in held)
            expert = sum(params[s][1] for s in held)
            row = {
                "weights": 2 * (dense + expert),
                "gradients": 4 * (dense + expert),
                "master_weights": 4 * (dense / (cand.dp * copies) + expert / (edp * copies)),
                "optimizer": 2 * 2 * (dense / (cand.dp * copies) + expert / (edp * copies)),
                "activations": peaks[r] * max(acts[s][0] for s in held),
                "fp8_cache": peaks[r] * max(acts[s][1] for s in held),
                "comm_buffers": buffers,
                "workspace": self.c["workspace_GB"] * GB,
                "peak_micro_batches": peaks[r],
                "stages": sorted(held),
            }
            row["total"] = sum(row[k] for k in MEMORY_PARTS)
            row["fits"] = row["total"] <= cap
            if not row["fits"]:
                largest = sorted(((k, row[k]) for k in MEMORY_PARTS), key=lambda kv: -kv[1])[:3]
                row["overflow"] = {"bytes": row["total"] - cap, "largest": [f"{k} {v / GB:.1f} GB" for k, v in largest]}
            ranks.append(row)
        return {"capacity": cap, "ranks": ranks, "fits": all(r["fits"] for r in ranks),
                "peak_total": max(r["total"] for r in ranks)}

    def comm_buffers(self, cand: Candidate) -> float:
        """Dispatch/combine buffers (two micro-batches in flight in an F&B pair) and pipeline send/receive buffers."""
        d = self.cfg.hidden_size
        buf = 0.0
        if cand.ep > 1:
            gpus = self.fanout(cand.ep)[1]
            buf = self.tokens * gpus * ((d + 4 * math.ceil(d / 128)) + 2 * d) * self.c["comm_buffer_factor"]
        return buf + (2 * 2 * self.tokens * d * 2 if cand.pp > 1 else 0)

    def memory_fits(self, cand: Candidate, sched, peaks):
        """fits(k, a, b) for `partition`: model stage k = units[a:b] within its share of the GPU's memory."""
        cap = self.target.gpu.hbm_bytes
        copies = 2 if cand.kind == "dualpipe" else 1
        edp = max(1, cand.dp // cand.ep)
        rank_of = [0] * cand.stages
        shares = [0] * cand.pp
        for r, held in enumerate(self.rank_stages(sched, cand)):
            for s in held:
                rank_of[s] = r
            shares[r] = len(set(held))
        fixed = self.comm_buffers(cand) + self.c["workspace_GB"] * GB

        def fits(k: int, a: int, b: int) -> bool:
            if k >= len(rank_of):
                return True
            dense, expert, bf16, fp8 = self._range(a, b)
            expert /= cand.ep
            static = 6 * (dense + expert) + 8 * (dense / (cand.dp * copies) + expert / (edp * copies))
            r = rank_of[k]
            return static + peaks[r] * (bf16 + fp8) * self.tokens <= (cap - fixed) / max(1, shares[r])

        return fits

    def memory_lower_bound(self, cand: Candidate) -> float:
        """A lower bound of the fullest rank's memory: the average rank's weights, gradients and optimizer shard."""
        copies = 2 if cand.kind == "dualpipe" else 1
        edp = max(1, cand.dp // cand.ep)
        (dense, expert), = self.stage_params([(0, len(self.units))], cand.ep)
        dense, expert = dense * copies / cand.pp, expert * copies / cand.pp
        static = 6 * (dense + expert) + 8 * (dense / (cand.dp * copies) + expert / (edp * copies))
        return static + self.c["workspace_GB"] * GB

    def step_lower_bound(self, cand: Candidate) -> float:
        """A lower bound of the candidate's step without its schedule: the busiest rank's compute alone (every stage
        runs each of its micro-batches' F, B and W once; overlap never makes a pair shorter than its compute), plus
        the DP collectives and the optimizer, which follow the pipeline."""
        cut = self.stage_units(cand)
        stages = self.stage_time(cand, cut)
        per_mb = [(t.F + t.B).total for t in stages]
        load = [0.0] * cand.pp
        if cand.kind == "dualpipe":  # each direction runs half the micro-batches through model stage s
            for s in range(cand.pp):
                load[s] += per_mb[s] * cand.micro_batches / 2
                load[cand.pp - 1 - s] += per_mb[s] * cand.micro_batches / 2
        else:
            for s, t in enumerate(per_mb):
                load[min(s, cand.stages - 1 - s) if cand.kind == "dualpipev" else s] += t * cand.micro_batches
        params = self.stage_params(cut, cand.ep)
        owners = ([[s, cand.pp - 1 - s] for s in range(cand.pp)] if cand.kind == "dualpipe" else
                  [[s, cand.stages - 1 - s] for s in range(cand.pp)] if cand.kind == "dualpipev" else
                  [[s] for s in range(cand.pp)])
        rank_params = [(sum(params[s][0] for s in h), sum(params[s][1] for s in h)) for h in owners]
        dp = self.dp_collectives(cand, rank_params)["seconds"] * self.c["dp_exposed_fraction"]
        return max(load) + dp + self.optimizer_seconds(cand, rank_params)

    # ---- one evaluation --------------------------------------------------------------------------------
    def evaluate(self, cand: Candidate, timeline: bool = False, cut=None) -> "Evaluation":
        """The candidate's stages (cut here, unless given), step (simulated), its parts, memory and communication."""
        sched, compiled = self.schedule(cand)
        peaks = compiled.peaks
        given = cut is not None
        cut = cut or self.stage_units(cand)
        memory = self.memory(cand, sched, peaks, cut)
        if not memory["fits"] and not given:  # the time-balanced split overflows a rank: cut within memory shares
            cut = self.stage_units(cand, self.memory_fits(cand, sched, peaks))
            memory = self.memory(cand, sched, peaks, cut)
        stages = self.stage_time(cand, cut)
        dur = self.durations(sched, cand, stages)
        hop = self.pp_hop(cand)
        totals = {k: [t.total for t in v] for k, v in dur.items()}
        if timeline:
            tl = simulate(sched, totals, hop["seconds"])
            pipe_step, busy = tl.step, tl.busy
        else:
            tl = None
            pipe_step, busy = compiled.step(totals, hop["seconds"])
        rank_parts = self.rank_parts(compiled, dur)
        held = self.rank_stages(sched, cand)
        params = self.stage_params(cut, cand.ep)
        rank_params = [(sum(params[s][0] for s in h), sum(params[s][1] for s in h)) for h in held]
        dp = self.dp_collectives(cand, rank_params)
        opt = self.optimizer_seconds(cand, rank_params)
        busiest = max(range(cand.pp), key=lambda r: busy[r])
        exposed = self.c["dp_exposed_fraction"]
        parts = rank_parts[busiest].as_dict()
        parts.pop("total")
        parts["bubble"] = pipe_step - busy[busiest]
        parts["comm"] += exposed * (dp["seconds"] - dp["latency_seconds"])
        parts["latency"] += exposed * dp["latency_seconds"]
        parts["optimizer"] = opt
        step = pipe_step + exposed * dp["seconds"] + opt
        return Evaluation(self, cand, sched, cut, stages, dur, hop, pipe_step, busy, step, parts, dp, opt, memory, tl)

    @staticmethod
    def rank_parts(compiled: CompiledSchedule, dur) -> list[Time]:
        """Per pipeline rank, the Time its actions add up to (the busy time split into its parts)."""
        out = [ZERO] * compiled.ranks
        for (rank, (kind, stage)), n in compiled.action_counts.items():
            out[rank] = out[rank] + dur["F&B" if kind == "P" else kind][stage] * n
        return out


MEMORY_PARTS = ("weights", "gradients", "master_weights", "optimizer", "activations", "fp8_cache", "comm_buffers",
                "workspace")


@dataclass
class Evaluation:
    """One candidate layout priced: what the search ranks and what the plan reports."""

    pricer: TrainPricer
    cand: Candidate
    sched: object
    cut: list
    stages: list
    durations: dict
    hop: dict
    pipeline_seconds: float
    busy: list
    step_seconds: float
    parts: dict
    dp: dict
    optimizer_seconds: float
    memory: dict
    timeline: object = None

    @property
    def fits(self) -> bool:
        """Whether every pipeline rank fits in the GPU's memory."""
        return self.memory["fits"]

    @cached_property
    def tokens_per_second(self) -> float:
        """Training tokens per second of the whole cluster."""
        return self.pricer.global_batch * self.pricer.tokens / self.step_seconds
