"""Pipelined training steps on torch.distributed, checked against the single-process model.

`run_pipelined(cfg, kind, pp, micro_batches, ...)` starts `ranks` processes (torch.multiprocessing.spawn,
gloo on CPU, a free localhost port), or runs as one of them under torchrun (`worker_main`, env://, NCCL on
GPUs). Every rank builds the same float32 model from the same seed and the same batch, keeps its pipeline
stages (dsv3c.runtime.stages) and executes its action list, one training step (forward, loss, backward; no
optimizer step). The action lists are plain data, `list[list[str]]` per pipeline rank in
torch.distributed.pipelining's notation, from `dsv3c.schedules.build`.

Execution:
  * 1f1b, zb1p, dualpipev: torch.distributed.pipelining's own runtime. Each stage is a `PipelineStage`;
    `_PipelineScheduleRuntime._prepare_schedule_with_comms` takes the compute-only lists (F, B, I, W,
    OVERLAP_F_B), infers the stage→rank map, and inserts SEND/RECV (torch's `_add_send_recv`) and
    REDUCE_GRAD; `step` runs them. Loss: `lm_loss` per micro-batch, scale_grads=True (mean). Each stage gets
    its input/output shapes statically (meta tensors), so the runtime skips its dynamic metadata inference
    (a forward and backward of every stage on uninitialised buffers, EP all-to-alls included).
  * dualpipe (bidirectional): torch's runtime cannot express it: its stage graph is one chain 0→1→…→N−1
    (stage k sends to k+1, stage 0 is the only first and N−1 the only last stage), while DualPipe has two
    chains over the same ranks, 0→…→pp−1 and pp→…→2pp−1, with stage pp+s a second copy of stage s's
    layers. `BidirectionalExecutor` runs it: `lower_bidirectional` inserts SEND_F/RECV_F/SEND_B/RECV_B by
    the same dataflow simulation as torch's `_add_send_recv` (each send's matching receive goes into the
    peer's list at the same simulated moment, so per rank pair the receives are posted in the senders'
    order: deadlock-free and tag-free, valid for gloo and NCCL alike); then each rank walks its list with
    torch.distributed isend/irecv, computing F with autograd, B as a full backward, I and W with torch's own
    split (`stage_backward_input` / `stage_backward_weight`), OVERLAP_F_B as its two sub-actions in turn
    (as torch's runtime does: no real overlap on one CPU stream). Gradients are divided by the micro-batch
    count at the end.

Gradients: each rank sums, by model parameter name, the gradients of its stage copies (the tied embedding of
the first and last stage, DualPipe's two copies of each stage); rank 0 gathers them (gather_object) and
sums across ranks. With ranks = pp × dp, dp > 1 replicates the pipeline: replica d runs micro-batches
d·M..(d+1)·M−1, gradients are averaged over the dp group (all_reduce), and the reference runs all dp·M
micro-batches.

Ranks follow the parallel plan's rank map: pipeline stage p is the dp consecutive global ranks p·dp ..
p·dp+dp−1, replica d is the d-th of them, and a pipeline is the ranks {p·dp + d}.

Expert parallelism (ep = dp > 1): the dp replicas of a pipeline stage (its consecutive ranks) form that
stage's EP group (its own process group, created on every rank in the same order); replica d is EP rank d.
Every MoE layer of a stage (decoder layers and the MTP block) holds only its EP rank's routed experts
(contiguous: experts d·E/ep … (d+1)·E/ep − 1; stages.EPExperts) and runs dsv3.ep_dispatch → ep_experts →
ep_combine: real all_to_all_single over the EP group, forward and (hand-written) backward, with the
EPContext active over the whole step. The replicas run identical action lists, so every EP collective of a
stage is met by its peers at the same point of their lists, whatever the kind (no deadlock with the pipeline
P2P). Gradients: dense parameters are averaged over the dp group as above; an expert's gradient on its
owner already sums every replica's tokens routed to it (each replica's mean over its M micro-batches), so it
is divided by dp, not all-reduced, and rank 0 assembles each expert tensor from its owners' slices.

The check (rank 0): `reference_loss_and_grads` on the whole model; loss relative error and, per parameter,
cos-diff = 1 − 2Σxy / Σ(x² + y²) and ‖x − y‖ / ‖y‖, computed in float64. Passes when
loss_rel_err ≤ LOSS_TOL and every cos-diff ≤ COS_TOL.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import time
from dataclasses import asdict, replace
from functools import partial

import torch
import torch.distributed as dist

from dsv3c.ops.ep_context import EPContext, active
from dsv3c.runtime.stages import (
    MTP_LAMBDA, EPExperts, StageModule, build_model, lm_loss, make_batch, reference_loss_and_grads, split_layers,
)  # fmt: skip

KINDS = ("1f1b", "zb1p", "dualpipev", "dualpipe")
LOSS_TOL = 1e-6
COS_TOL = 1e-12


class PipelineArgError(ValueError):
    """An impossible combination of kind, pp, ranks, ep and micro-batches (one line)."""


def check_args(
    kind: str, pp: int, micro_batches: int, ranks: int | None = None, ep: int = 1, num_layers: int | None = None
) -> int:
    """Validate the combination; return dp = ranks / pp."""
    ranks = pp if ranks is None else ranks
    if kind not in KINDS:
        raise PipelineArgError(f"unknown schedule '{kind}' (known: {', '.join(KINDS)})")
    if pp < 1 or ranks < 1 or micro_batches < 1:
        raise PipelineArgError("pp, ranks and micro-batches must be positive")
    if ranks % pp:
        raise PipelineArgError(f"--pp {pp} does not divide --ranks {ranks}")
    if ep < 1 or ep != 1 and ep != ranks // pp:
        raise PipelineArgError(
            f"--ep {ep}: a stage's EP group is its {ranks // pp} data-parallel replica(s), so ep must be 1 or ranks/pp"
        )
    if kind in ("dualpipe", "dualpipev") and pp < 2 or kind == "dualpipe" and pp % 2:
        raise PipelineArgError(f"{kind} needs an {'even ' if kind == 'dualpipe' else ''}pp >= 2, got {pp}")
    if kind == "dualpipe" and (micro_batches % 2 or micro_batches < 2 * pp):
        raise PipelineArgError(f"dualpipe needs an even number of micro-batches >= 2*pp = {2 * pp}, got {micro_batches}")
    if kind == "dualpipev" and micro_batches < 2 * pp:
        raise PipelineArgError(f"dualpipev needs micro-batches >= 2*pp = {2 * pp}, got {micro_batches}")
    if kind in ("1f1b", "zb1p") and micro_batches < pp:
        raise PipelineArgError(f"{kind} needs micro-batches >= pp = {pp}, got {micro_batches}")
    blocks = pp * (2 if kind == "dualpipev" else 1)
    if num_layers is not None and num_layers < blocks - 1:  # the last stage may hold only the norm, head and MTP
        raise PipelineArgError(f"{num_layers} layers cannot fill {blocks} pipeline stages")
    return ranks // pp


def schedule_actions(kind: str, pp: int, micro_batches: int) -> list[list[str]]:
    """Per pipeline rank, the compute actions of dsv3c.schedules.build."""
    from dsv3c.schedules import build

    return [list(map(str, acts)) for acts in build(kind, pp, micro_batches)]


# ---- stage layout --------------------------------------------------------------------------------------


def stage_layout(kind: str, pp: int):
    """(number of stages, stage → pipeline rank, stage → layer block, number of blocks)."""
    if kind in ("1f1b", "zb1p"):
        return pp, list(range(pp)), list(range(pp)), pp
    n = 2 * pp
    rank = [k if k < pp else n - 1 - k for k in range(n)]
    if kind == "dualpipev":
        return n, rank, list(range(n)), n
    return n, rank, [k % pp for k in range(n)], pp  # dualpipe: stage pp+s is a copy of block s


def _stage_modules(model, kind, pp, pp_rank, ranges, ep=1, ep_rank=0):
    n, rank, block, nblocks = stage_layout(kind, pp)
    spans = split_layers(model.cfg.num_hidden_layers, nblocks, ranges)
    mods = {}
    for k in range(n):
        if rank[k] == pp_rank:
            a, b = spans[block[k]]
            mods[k] = StageModule(model, a, b, first=block[k] == 0, last=block[k] == nblocks - 1, ep=ep, ep_rank=ep_rank)
    return mods


# ---- the bidirectional executor ------------------------------------------------------------------------


def _parse(action: str):
    """'3F1' → [('F', 3, 1)]; '(0F3;3B1)OVERLAP_F_B' → [('F', 0, 3), ('B', 3, 1)]."""
    if action.endswith("OVERLAP_F_B"):
        return [x for part in action[action.index("(") + 1 : action.index(")")].split(";") for x in _parse(part)]
    m = re.fullmatch(r"(\d+)([FBIW])(\d+)", action.strip())
    if not m:
        raise ValueError(f"bad action '{action}'")
    return [(m.group(2), int(m.group(1)), int(m.group(3)))]


def bidirectional_links(pp: int):
    """(next stage or None, previous stage or None) per stage of DualPipe's two chains."""
    n = 2 * pp
    nxt = [None if k in (pp - 1, n - 1) else k + 1 for k in range(n)]
    prv = [None if k in (0, pp) else k - 1 for k in range(n)]
    return nxt, prv


def lower_bidirectional(actions: list[list[str]], pp: int) -> list[list[tuple]]:
    """Insert the P2P operations into DualPipe's compute lists (torch's `_add_send_recv` simulation with two
    chains). Items: ('C', [sub-actions]) compute, ('SEND_F'|'RECV_F'|'SEND_B'|'RECV_B', stage, mb). RECV_F
    (k, m) receives stage k's input, RECV_B (k, m) the gradient of stage k's output; SEND_F (k, m) sends stage
    k's output, SEND_B (k, m) the gradient of stage k's input. Raises ValueError when the lists deadlock."""
    _, rank_of, _, _ = stage_layout("dualpipe", pp)
    nxt, prv = bidirectional_links(pp)
    queues = [[_parse(a) for a in acts] for acts in actions]
    out = [[] for _ in actions]
    seen = [set() for _ in actions]

    def ready(r, sub):
        t, k, m = sub
        if t == "F" and prv[k] is not None:
            return ("RECV_F", k, m) in seen[r] or ("F", prv[k], m) in seen[r]
        if t in ("B", "I") and nxt[k] is not None:
            return ("RECV_B", k, m) in seen[r] or ("B", nxt[k], m) in seen[r] or ("I", nxt[k], m) in seen[r]
        return True

    while any(queues):
        progress = False
        for r in range(len(queues)):
            if not queues[r] or not all(ready(r, s) for s in queues[r][0]):
                continue
            subs = queues[r].pop(0)
            out[r].append(("C", subs))
            for t, k, m in subs:
                seen[r].add((t, k, m))
                if t == "F" and nxt[k] is not None and rank_of[nxt[k]] != r:
                    out[r].append(("SEND_F", k, m))
                    out[rank_of[nxt[k]]].append(("RECV_F", nxt[k], m))
                    seen[rank_of[nxt[k]]].add(("RECV_F", nxt[k], m))
                if t in ("B", "I") and prv[k] is not None and rank_of[prv[k]] != r:
                    out[r].append(("SEND_B", k, m))
                    out[rank_of[prv[k]]].append(("RECV_B", prv[k], m))
                    seen[rank_of[prv[k]]].add(("RECV_B", prv[k], m))
            progress = True
        if not progress:
            stuck = {r: q[0] for r, q in enumerate(queues) if q}
            raise ValueError(f"dualpipe action lists deadlock; next actions per rank: {stuck}")
    return out


class BidirectionalExecutor:
    """Runs one rank's lowered DualPipe list with torch.distributed P2P (isend/irecv on global ranks)."""

    def __init__(self, mods: dict, pp: int, micro_batches: int, peer_global, act_shape, device, mtp_lambda=MTP_LAMBDA):
        self.mods, self.pp, self.m = mods, pp, micro_batches
        self.half = micro_batches // 2
        self.peer_global = peer_global  # pipeline rank → global rank
        self.shape, self.device, self.mtp_lambda = act_shape, device, mtp_lambda
        _, self.rank_of, _, _ = stage_layout("dualpipe", pp)
        self.nxt, self.prv = bidirectional_links(pp)

    def _ids(self, k, m):
        """Direction d = k // pp runs global micro-batches d·M/2 … d·M/2 + M/2 − 1."""
        return self.mb_ids[(k // self.pp) * self.half + m]

    def step(self, lowered: list[tuple], mb_ids: list[torch.Tensor]) -> list[float]:
        """Execute; returns the losses of the micro-batches whose last stage is here, by global index."""
        from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

        self.mb_ids = mb_ids
        recv_f, recv_b, sends = {}, {}, []
        cache, bw_state, local_grads = {}, {}, {}
        losses = {}
        for item in lowered:
            kind = item[0]
            if kind == "RECV_F":
                _, k, m = item
                buf = torch.empty(self.shape, device=self.device)
                recv_f[(k, m)] = (buf, dist.irecv(buf, self.peer_global[self.rank_of[self.prv[k]]]))
            elif kind == "RECV_B":
                _, k, m = item
                buf = torch.empty(self.shape, device=self.device)
                recv_b[(k, m)] = (buf, dist.irecv(buf, self.peer_global[self.rank_of[self.nxt[k]]]))
            elif kind == "SEND_F":
                _, k, m = item
                t = cache[(k, m)][1].detach().contiguous()
                sends.append((t, dist.isend(t, self.peer_global[self.rank_of[self.nxt[k]]])))
            elif kind == "SEND_B":
                _, k, m = item
                t = local_grads.pop((k, m)).contiguous()
                sends.append((t, dist.isend(t, self.peer_global[self.rank_of[self.prv[k]]])))
            else:
                for t, k, m in item[1]:
                    mod, ids = self.mods[k], self._ids(k, m)
                    first, last = self.prv[k] is None, self.nxt[k] is None
                    if t == "F":
                        if first:
                            x = ids
                        else:
                            buf, work = recv_f.pop((k, m))
                            work.wait()
                            x = buf.requires_grad_(True)
                        out = mod(x, input_ids=ids)
                        if last:
                            loss = lm_loss(out, ids, self.mtp_lambda)
                            losses[(k // self.pp) * self.half + m] = float(loss.detach())
                            out = loss
                        cache[(k, m)] = (x, out)
                        continue
                    if t in ("B", "I"):
                        x, out = cache.pop((k, m))
                        if last:
                            grad = None
                        else:
                            buf, work = recv_b.pop((k, m))
                            work.wait()
                            grad = buf
                        if t == "B":
                            torch.autograd.backward(out, grad_tensors=grad)
                            if not first:
                                local_grads[(k, m)] = x.grad
                        elif first:  # nothing needs an input gradient: the whole backward runs as W (as torch does)
                            bw_state[(k, m)] = ("full", out, grad)
                        else:
                            grads = None if grad is None else [grad]
                            dinputs, groups = stage_backward_input([out], grads, [x], mod.parameters())
                            local_grads[(k, m)] = dinputs[0]
                            bw_state[(k, m)] = ("split", groups, None)
                    elif t == "W":
                        how, a, b = bw_state.pop((k, m))
                        if how == "full":
                            torch.autograd.backward(a, grad_tensors=b)
                        else:
                            stage_backward_weight(mod.parameters(), a)
        for _, work in sends:
            work.wait()
        if cache or bw_state or recv_f or recv_b or local_grads:
            raise RuntimeError("dualpipe step ended with unfinished micro-batches")
        for mod in self.mods.values():
            for p in mod.parameters():
                if p.grad is not None:
                    p.grad.div_(self.m)
        return losses


# ---- the worker ----------------------------------------------------------------------------------------


def _torch_runtime_step(mods, kind, pp, pp_rank, micro_batches, actions, pp_group, device, batch, mtp_lambda):
    """One step through torch.distributed.pipelining's runtime; returns {global mb index: loss} for the last stage."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import _Action, _PipelineScheduleRuntime

    n = len(stage_layout(kind, pp)[1])
    mb = batch.shape[0] // micro_batches
    seq = batch.shape[1]

    def example(k):
        """Static (meta) input and output of stage k: torch's runtime then skips its dynamic metadata
        inference, which would run a forward and a backward of every stage on uninitialised buffers (and,
        with expert parallelism, their all-to-alls)."""
        mod = mods[k]
        hidden = torch.empty(mb, seq, mod.hidden_size, device="meta", requires_grad=True)
        x = torch.empty(mb, seq, dtype=batch.dtype, device="meta") if mod.first else hidden
        if not mod.last:
            return x, hidden
        v = mod.lm_head.weight.shape[0]
        outs = (torch.empty(mb, seq, v, device="meta", requires_grad=True),)
        if len(mod.mtp):
            outs += (torch.empty(mb, seq - 1, v, device="meta", requires_grad=True),)
        return x, outs

    stages = []
    for k in sorted(mods):
        inp, out = example(k)
        grads = {"input_grads": None if mods[k].first else inp, "output_grads": None if mods[k].last else out}
        stages.append(PipelineStage(mods[k], k, n, device, input_args=inp, output_args=out, group=pp_group, **grads))
    loss_fn = partial(lm_loss, mtp_lambda=mtp_lambda)
    sched = _PipelineScheduleRuntime(stages, micro_batches, loss_fn=loss_fn, scale_grads=True)
    sched._prepare_schedule_with_comms({r: [_Action.from_str(a) for a in acts] for r, acts in enumerate(actions)})
    has_first, has_last = 0 in mods, (n - 1) in mods
    losses = []
    sched.step(*((batch,) if has_first else ()), target=batch if has_last else None, losses=losses if has_last else None,
               return_outputs=False, input_ids=batch)  # fmt: skip
    return {i: float(l.detach()) for i, l in enumerate(losses)} if has_last else {}


def _compare(ref_loss, ref_grads, loss, grads) -> dict:
    loss_rel = abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)
    worst_cos, worst_rel, worst_name, missing = 0.0, 0.0, None, sorted(set(ref_grads) ^ set(grads))
    for name, r in ref_grads.items():
        if name not in grads:
            continue
        x, y = grads[name].double().flatten().cpu(), r.double().flatten().cpu()
        den = float((x * x + y * y).sum())
        cos = 0.0 if den == 0 else 1.0 - 2.0 * float((x * y).sum()) / den
        ny = float(y.norm())
        rel = float((x - y).norm()) / ny if ny else float((x - y).norm())
        if cos >= worst_cos:
            worst_cos, worst_name = cos, name
        worst_rel = max(worst_rel, rel)
    return {"loss_rel_err": loss_rel, "grad_max_cos_diff": worst_cos, "grad_max_rel_err": worst_rel,
            "grad_worst_param": worst_name, "grads_compared": len(ref_grads), "grads_missing": missing}  # fmt: skip


def _worker(rank: int, world: int, specs: list[dict], init_method: str | None, out_path: str | None):
    """One process: run every spec in turn in one process group; rank 0 writes the list of results."""
    torch.set_num_threads(1)
    import importlib

    importlib.import_module("torch._dynamo")  # (the custom ops' first call imports it; do it before timing)

    backend = specs[0].get("backend") or ("nccl" if torch.cuda.is_available() and init_method is None else "gloo")
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    kw = {"init_method": init_method} if init_method else {}
    dist.init_process_group(backend, rank=rank, world_size=world, **kw)
    try:
        results = [_step(rank, world, spec, device) for spec in specs]
    finally:
        dist.destroy_process_group()
    if rank == 0 and out_path:
        with open(out_path, "w") as f:
            json.dump(results, f)
    return results


def _step(rank, world, spec, device):
    from model_def import ModelConfig

    t0 = time.perf_counter()
    cfg = ModelConfig.from_dict(spec["config"], name=spec["config_name"])
    kind, pp, m, lam = spec["schedule"], spec["pp"], spec["micro_batches"], spec["mtp_lambda"]
    dp = world // pp
    # the plan's rank map: pipeline stage p is the dp consecutive ranks p·dp .. p·dp+dp−1, replica d the d-th of them
    pp_rank, d = divmod(rank, dp)
    pp_groups = [dist.new_group([p * dp + j for p in range(pp)]) for j in range(dp)] if dp > 1 else [dist.group.WORLD]
    dp_groups = [dist.new_group(list(range(p * dp, (p + 1) * dp))) for p in range(pp)] if dp > 1 else None
    ep = spec.get("ep", 1)
    # a stage's EP group: its dp replicas (consecutive ranks), EP rank d; created on every rank in the same order
    ep_groups = dp_groups if ep > 1 else None
    model = build_model(cfg, spec["seed"])
    batch_all = make_batch(cfg, m * dp, spec["mb_size"], spec["seq"], spec["seed"])
    batch = batch_all[d * m * spec["mb_size"] : (d + 1) * m * spec["mb_size"]].to(device)
    mods = {k: mod.to(device)
            for k, mod in _stage_modules(model, kind, pp, pp_rank, spec.get("ranges"), ep, d).items()}  # fmt: skip
    actions = spec["actions"]
    ep_ctx = EPContext(rank=d, size=ep, group=ep_groups[pp_rank]) if ep > 1 else None
    with active(ep_ctx) if ep_ctx else contextlib.nullcontext():  # forward and backward exchange tokens
        if kind == "dualpipe":
            lowered = lower_bidirectional(actions, pp)[pp_rank]
            ex = BidirectionalExecutor(mods, pp, m, [p * dp + d for p in range(pp)],
                                       (spec["mb_size"], spec["seq"], cfg.hidden_size), device, lam)  # fmt: skip
            losses = ex.step(lowered, list(batch.chunk(m, dim=0)))
        else:
            losses = _torch_runtime_step(mods, kind, pp, pp_rank, m, actions, pp_groups[d], device, batch, lam)
    grads, shards = {}, {}
    for mod in mods.values():
        for name, p in mod.named_parameters():
            if p.grad is not None:
                g = mod.global_name(name)
                grads[g] = grads[g] + p.grad if g in grads else p.grad.clone()
                if name in mod.ep_shards:
                    shards[g] = mod.ep_shards[name]
    if dp > 1:  # average the replicas' gradients over the dp group
        for g in sorted(grads):
            if g in shards:
                # an EP-partitioned expert: only this rank holds it, and its gradient already sums every
                # replica's tokens routed to it (each replica's mean over its m micro-batches): / dp
                first, n_exp = shards[g]
                full = grads[g].new_zeros((n_exp, *grads[g].shape[1:]))
                full[first : first + grads[g].shape[0]] = grads[g] / dp
                grads[g] = full
                continue
            dist.all_reduce(grads[g], group=dp_groups[pp_rank])
            grads[g] /= dp
    step_s = time.perf_counter() - t0
    gathered = [None] * world if rank == 0 else None
    remote = sum(x.remote_routes for mod in mods.values() for x in mod.modules() if isinstance(x, EPExperts))
    payload = ({k: v.cpu() for k, v in grads.items()}, {d * m + i: l for i, l in losses.items()}, sorted(shards), remote)
    dist.gather_object(payload, gathered, dst=0)
    if rank != 0:
        return None
    total, all_losses, sharded, remote = {}, {}, set(), 0
    for g_r, l_r, s_r, n_r in gathered:
        for k, v in g_r.items():
            total[k] = total[k] + v if k in total else v
        all_losses.update(l_r)
        sharded.update(s_r)
        remote += n_r
    for k in total:  # replicas beyond the first repeat replica 0's (already averaged) gradients
        if k not in sharded:  # (the owners' zero-padded slices of an EP-partitioned expert add up to it)
            total[k] = total[k] / dp
    loss = float(torch.tensor([all_losses[i] for i in sorted(all_losses)], dtype=torch.float64).mean())
    ref_model = build_model(cfg, spec["seed"]).to(device)
    ref_loss, ref_grads = reference_loss_and_grads(ref_model, batch_all.to(device), m * dp, lam)
    cmp = _compare(ref_loss, ref_grads, loss, total)
    if sharded:  # the EP-partitioned experts alone (gathered from their owners)
        ecmp = _compare(ref_loss, {k: ref_grads[k] for k in sharded}, loss, {k: total[k] for k in sharded})
        cmp.update(expert_grad_max_cos_diff=ecmp["grad_max_cos_diff"], expert_grad_max_rel_err=ecmp["grad_max_rel_err"],
                   ep_partitioned_params=len(sharded), ep_remote_routes=remote)  # fmt: skip
    ok = cmp["loss_rel_err"] <= LOSS_TOL and cmp["grad_max_cos_diff"] <= COS_TOL and not cmp["grads_missing"]
    return {"schedule": kind, "pp": pp, "dp": dp, "ep": spec["ep"], "ranks": world, "micro_batches": m,
            "micro_batch_size": spec["mb_size"], "seq": spec["seq"], "model": cfg.name, "layers": cfg.num_hidden_layers,
            "executor": "bidirectional (torch.distributed P2P)" if kind == "dualpipe" else "torch.distributed.pipelining runtime",
            "backend": dist.get_backend(), "actions": actions, "loss": loss, "reference_loss": ref_loss,
            "losses_seen": len(all_losses), **cmp, "loss_tol": LOSS_TOL, "cos_tol": COS_TOL,
            "step_seconds_rank0": step_s, "ok": bool(ok and len(all_losses) == m * dp)}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_spec(
    cfg, kind, pp, micro_batches, ranks=None, ep=1, mb_size=1, seq=8, seed=0, mtp_lambda=MTP_LAMBDA, ranges=None,
    actions=None,
) -> dict:
    """The picklable description of one run (validated)."""
    check_args(kind, pp, micro_batches, ranks, ep, None if ranges else cfg.num_hidden_layers)
    if ep > 1 and cfg.n_routed_experts % ep:
        raise PipelineArgError(f"--ep {ep} does not divide the {cfg.n_routed_experts} routed experts")
    if seq < 3:
        raise PipelineArgError(f"seq must be >= 3 for the MTP loss, got {seq}")
    raw = {k: v for k, v in asdict(cfg).items() if k not in ("name", "extra")}
    return {"config": raw, "config_name": cfg.name, "schedule": kind, "pp": pp, "ranks": ranks or pp, "ep": ep,
            "micro_batches": micro_batches, "mb_size": mb_size, "seq": seq, "seed": seed, "mtp_lambda": mtp_lambda,
            "ranges": ranges, "actions": actions or schedule_actions(kind, pp, micro_batches)}  # fmt: skip


def run_pipelined(cfg, kind: str, pp: int, micro_batches: int, ranks: int | None = None, ep: int = 1, **kw) -> dict:
    """Spawn `ranks` gloo CPU processes, run one pipelined training step and compare with the single-process
    model; returns rank 0's result dict (schedule, pp, ranks, micro_batches, loss, loss_rel_err,
    grad_max_cos_diff, grad_max_rel_err, ok, …)."""
    return run_many([make_spec(cfg, kind, pp, micro_batches, ranks, ep, **kw)])[0]


def run_many(specs: list[dict]) -> list[dict]:
    """Run several specs (same rank count) one after the other in one set of spawned processes (the process
    start and torch's imports dominate a tiny run)."""
    import torch.multiprocessing as mp

    world = specs[0]["ranks"]
    if any(s["ranks"] != world for s in specs):
        raise PipelineArgError("run_many wants specs with one rank count")
    specs = [{**s, "backend": "gloo"} for s in specs]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(world, specs, f"tcp://127.0.0.1:{_free_port()}", out), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


def worker_main(cfg, kind, pp, micro_batches, ep=1, **kw):
    """Entry point under torchrun (env://: RANK, WORLD_SIZE, MASTER_ADDR/PORT; NCCL when CUDA is present).
    Returns the result dict on rank 0, None elsewhere."""
    world = int(os.environ["WORLD_SIZE"])
    spec = make_spec(cfg, kind, pp, micro_batches, world, ep, **kw)
    return _worker(int(os.environ["RANK"]), world, [spec], None, None)[0]


def _torchrun_main(argv=None) -> int:
    """`torchrun --nproc-per-node N -m dsv3c.runtime.pipelined --schedule K --pp P --micro-batches M [--model tiny]`:
    the same step under torchrun (env://; NCCL with one GPU per rank when CUDA is present, else gloo).
    Rank 0 prints the result as JSON; exit 0 within tolerance."""
    import argparse

    from model_def import ModelConfig

    ap = argparse.ArgumentParser(prog="dsv3c.runtime.pipelined")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--layers", type=int, help="override num_hidden_layers")
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--pp", type=int, required=True)
    ap.add_argument("--ep", type=int, default=1, help="expert parallelism over each stage's dp replicas (WORLD_SIZE/pp)")
    ap.add_argument("--micro-batches", type=int)
    ap.add_argument("--seq", type=int, default=8)
    args = ap.parse_args(argv)
    cfg = ModelConfig.preset(args.model)
    if args.layers:
        cfg = replace(cfg, num_hidden_layers=args.layers)
    result = worker_main(cfg, args.schedule, args.pp, args.micro_batches or 2 * args.pp, args.ep, seq=args.seq)
    if result is None:
        return 0
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(_torchrun_main())
