"""Pipelined training steps on torch.distributed, checked against the single-process model.

`run_many([make_spec(cfg, kind, pp, micro_batches, ranks, ep, ...)])` forks `ranks` gloo CPU processes (a
free localhost port) and runs every spec in them; `_worker` is the same rank under torchrun (env://, NCCL
with cuda:LOCAL_RANK when CUDA is present; `dsv3c.runtime.launch`). Every rank builds the same float32 model
from the same seed and the same batch, keeps its pipeline stages (dsv3c.runtime.stages) and executes its
action list, one training step (forward, loss, backward; no optimizer step). The action lists are plain
data, `list[list[str]]` per pipeline rank in torch.distributed.pipelining's notation, from
`dsv3c.schedules.build`.

Ranks and groups are the parallel plan's mesh (`dsv3c.runtime.layout`): pipeline stage p is the dp
consecutive ranks p·dp .. p·dp+dp−1, replica d the d-th of them, a pipeline the ranks {p·dp + d}; the EP
groups are ep consecutive ranks of a stage (ep divides dp), edp the same EP rank in the stage's other EP
groups; GPUs per node (the EP route) and the layers per stage (`ranges`, the plan's cut) come from the plan.

Execution:
  * 1f1b, zb1p: torch.distributed.pipelining's own runtime. Each stage is a `PipelineStage`;
    `_PipelineScheduleRuntime._prepare_schedule_with_comms` takes the compute-only lists (F, B, I, W),
    infers the stage→rank map, and inserts SEND/RECV (torch's `_add_send_recv`) and REDUCE_GRAD; `step` runs
    them. Loss: `lm_loss` per micro-batch, scale_grads=True (mean). Each stage gets its input/output shapes
    statically (meta tensors), so the runtime skips its dynamic metadata inference (a forward and backward
    of every stage on uninitialised buffers, EP all-to-alls included).
  * dualpipev, dualpipe: the `ChainExecutor`, because torch's runtime runs an OVERLAP_F_B pair as its two
    sub-actions in turn and cannot express DualPipe's two chains (0→…→pp−1 and pp→…→2pp−1, stage pp+s a
    second copy of stage s's layers). `lower_p2p` inserts SEND_F/RECV_F/SEND_B/RECV_B over the schedule's
    chains by the same dataflow simulation as torch's `_add_send_recv` (each send's matching receive goes
    into the peer's list at the same simulated moment, so per rank pair the receives are posted in the
    senders' order: deadlock-free and tag-free, valid for gloo and NCCL alike; DualPipeV's bend hands over
    on the rank); each rank walks its list with isend/irecv, F with autograd, B as a full backward, I and W
    with torch's own split (`stage_backward_input` / `stage_backward_weight`). Gradients are divided by the
    micro-batch count at the end.

Overlapped F&B, as DeepSeek-V3 describes it (a forward chunk's dispatch/combine hidden behind another
micro-batch's backward and the reverse): with EP, a step with OVERLAP_F_B pairs runs twice in the same
processes, the pairs' sub-actions one after the other ("sequential") and then at once ("overlapped"): the
forward chunk in a thread of its own, the backward chunk in the main thread, each exchanging over its own
copy of the EP groups (the forward and backward lanes: every EP rank of a stage runs the same list, so each
lane's collectives meet in the same order). Every exchange is issued as an asynchronous collective and
waited for by its thread only, so while one chunk's exchange is in flight the other chunk computes. The two
orders compute the same thing (asserted to 1e-6 loss / 1e-12 gradient cos-diff; bitwise equal in practice):
only independent work is reordered. A `Tracer` records per rank the compute span of every sub-action, every
EP exchange and every pipeline receive wait; the result reports the EP communication in flight while no
thread computes (`dsv3c.runtime.trace.exposed`) for both orders, and `trace` writes both as one
Chrome/Perfetto file. `link_delay` makes every EP exchange take at least that long (a slower link).

Gradients: each rank sums, by model parameter name, the gradients of its stage copies (the tied embedding of
the first and last stage, DualPipe's two copies of each stage); rank 0 gathers them (gather_object) and
sums across ranks. dp > 1 replicates the pipeline: replica d runs micro-batches d·M..(d+1)·M−1, dense
gradients are averaged over the dp group (all_reduce), and the reference runs all dp·M micro-batches.
Expert parallelism: every MoE layer of a stage (decoder layers and the MTP block) holds its EP rank's slots
of the plan's placement (redundant replicas included; stages.EPExperts) and runs dsv3.ep_dispatch →
ep_experts → ep_combine over the EP group. A slot's gradient sums the EP group's tokens routed to it (each
replica's mean over its M micro-batches): it is summed over edp, divided by dp, and rank 0 adds the slots of
an expert into its gradient.

The check (rank 0): `reference_loss_and_grads` on the whole model; loss relative error and, per parameter,
cos-diff = 1 − 2Σxy / Σ(x² + y²) and ‖x − y‖ / ‖y‖, computed in float64. Passes when
loss_rel_err ≤ LOSS_TOL and every cos-diff ≤ COS_TOL, in every order run, and the orders agree.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import threading
import time
from dataclasses import asdict
from functools import partial

import torch
import torch.distributed as dist

from dsv3c.ops.ep_context import active
from dsv3c.placement import PlacementError, make_mesh
from dsv3c.runtime.stages import (
    MTP_LAMBDA, EPExperts, StageModule, build_model, lm_loss, make_batch, reference_loss_and_grads, split_layers,
    unit_name,
)  # fmt: skip

KINDS = ("1f1b", "zb1p", "dualpipev", "dualpipe")
CHAIN_KINDS = ("dualpipev", "dualpipe")  # lists with OVERLAP_F_B pairs: run by the ChainExecutor
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
    if ep < 1 or (ranks // pp) % ep:
        raise PipelineArgError(f"--ep {ep}: a stage's EP groups are consecutive ranks among its {ranks // pp} "
                               "data-parallel replica(s), so ep must divide ranks/pp")
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


def _stage_modules(model, kind, pp, pp_rank, ranges, ep=1, ep_rank=0, placement=None, gpus_per_node=8):
    """This pipeline rank's StageModules by stage (layers from ranges, this EP rank's expert slots of placement)."""
    n, rank, block, nblocks = stage_layout(kind, pp)
    spans = split_layers(model.cfg.num_hidden_layers, nblocks, ranges)
    mods = {}
    for k in range(n):
        if rank[k] == pp_rank:
            a, b = spans[block[k]]
            mods[k] = StageModule(model, a, b, first=block[k] == 0, last=block[k] == nblocks - 1, ep=ep,
                                  ep_rank=ep_rank, placement=placement, gpus_per_node=gpus_per_node)  # fmt: skip
    return mods


# ---- the chain executor (DualPipe, DualPipeV) -----------------------------------------------------------


def _parse(action: str):
    """'3F1' → [('F', 3, 1)]; '(0F3;3B1)OVERLAP_F_B' → [('F', 0, 3), ('B', 3, 1)]."""
    if action.endswith("OVERLAP_F_B"):
        return [x for part in action[action.index("(") + 1 : action.index(")")].split(";") for x in _parse(part)]
    m = re.fullmatch(r"(\d+)([FBIW])(\d+)", action.strip())
    if not m:
        raise ValueError(f"bad action '{action}'")
    return [(m.group(2), int(m.group(1)), int(m.group(3)))]


def schedule_layout(kind: str, pp: int, micro_batches: int):
    """The schedule's Layout (dsv3c.schedules): its chains of stages, stage ranks, micro-batches per chain."""
    from dsv3c.schedules import build

    return build(kind, pp, micro_batches).layout


def lower_p2p(actions: list[list[str]], layout) -> list[list[tuple]]:
    """Insert the P2P operations into compute lists over the layout's chains (torch's `_add_send_recv`
    simulation, any number of chains). Items: ('C', [sub-actions]) compute, ('SEND_F'|'RECV_F'|'SEND_B'|'RECV_B',
    stage, mb). RECV_F (k, m) receives stage k's input, RECV_B (k, m) the gradient of stage k's output; SEND_F
    (k, m) sends stage k's output, SEND_B (k, m) the gradient of stage k's input. Consecutive stages on one rank
    (the V's bend) hand over locally. Raises ValueError when the lists deadlock."""
    rank_of = layout.stage_rank()
    nxt = {k: layout.next_stage(k) for k in rank_of}
    prv = {k: layout.prev_stage(k) for k in rank_of}
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
            raise ValueError(f"pipeline action lists deadlock; next actions per rank: {stuck}")
    return out


class ChainExecutor:
    """Runs one rank's lowered list (`lower_p2p`) with torch.distributed P2P (isend/irecv on global ranks).

    F runs the stage under autograd, B a full backward, I and W torch's own split (`stage_backward_input` /
    `stage_backward_weight`). Forward work exchanges EP tokens over the forward lane's EPContext, backward work
    over the backward lane's. An OVERLAP_F_B pair runs its two sub-actions one after the other, or with
    `overlap` at once: the forward chunk in a thread of its own while this thread runs the backward chunk, so
    that while one chunk waits for its dispatch/combine (issued asynchronously) the other computes."""

    def __init__(self, mods: dict, layout, me: int, peer_global, act_shape, device, contexts=(None, None),
                 tracer=None, mtp_lambda=MTP_LAMBDA):  # fmt: skip
        self.mods, self.layout, self.me = mods, layout, me
        self.rank_of = layout.stage_rank()
        self.nxt = {k: layout.next_stage(k) for k in self.rank_of}
        self.prv = {k: layout.prev_stage(k) for k in self.rank_of}
        self.first_mb = {k: sum(layout.micro_batches[: layout.chain_of(k)]) for k in self.rank_of}
        self.peer_global = peer_global  # pipeline rank → global rank
        self.shape, self.device, self.mtp_lambda = act_shape, device, mtp_lambda
        self.contexts, self.tracer = contexts, tracer

    def step(self, lowered: list[tuple], mb_ids: list[torch.Tensor], overlap: bool = False) -> dict:
        """Execute; returns the losses of the micro-batches whose last stage is here, by global index."""
        self.mb_ids, self.losses = mb_ids, {}
        self.recv_f, self.recv_b, self.cache, self.bw_state, self.input_grads = {}, {}, {}, {}, {}
        sends = []
        for item in lowered:
            kind = item[0]
            if kind in ("RECV_F", "RECV_B"):
                _, k, m = item
                buf = torch.empty(self.shape, device=self.device)
                peer = self.prv[k] if kind == "RECV_F" else self.nxt[k]
                box = self.recv_f if kind == "RECV_F" else self.recv_b
                box[(k, m)] = (buf, dist.irecv(buf, self.peer_global[self.rank_of[peer]]))
            elif kind == "SEND_F":
                _, k, m = item
                t = self.cache[(k, m)][1].detach().contiguous()
                sends.append((t, dist.isend(t, self.peer_global[self.rank_of[self.nxt[k]]])))
            elif kind == "SEND_B":
                _, k, m = item
                t = self.input_grads.pop((k, m)).contiguous()
                sends.append((t, dist.isend(t, self.peer_global[self.rank_of[self.prv[k]]])))
            elif overlap and len(item[1]) == 2:
                self._overlapped(*item[1])
            else:
                for sub in item[1]:
                    self._run(sub)
        for _, work in sends:
            work.wait()
        if self.cache or self.bw_state or self.recv_f or self.recv_b or self.input_grads:
            raise RuntimeError("pipeline step ended with unfinished micro-batches")
        m = sum(self.layout.micro_batches)
        for mod in self.mods.values():
            for p in mod.parameters():
                if p.grad is not None:
                    p.grad.div_(m)
        return self.losses

    def _overlapped(self, a, b):
        """The forward sub-action in a thread, the backward one here, at once."""
        fwd, bwd = (a, b) if a[0] == "F" else (b, a)
        errors = []

        def forward():
            try:
                self._run(fwd)
            except BaseException as e:  # noqa: BLE001  (re-raised in the calling thread)
                errors.append(e)

        thread = threading.Thread(target=forward, name="forward chunk", daemon=True)
        thread.start()
        try:
            self._run(bwd)
        finally:
            thread.join()
        if errors:
            raise errors[0]

    def _run(self, sub):
        """One sub-action under its lane's EP context, recorded as a compute span."""
        ctx = self.contexts[0 if sub[0] == "F" else 1]
        start = time.perf_counter()
        with active(ctx) if ctx is not None else contextlib.nullcontext():
            self._compute(*sub)
        if self.tracer is not None:
            t, k, m = sub
            self.tracer.span(f"{k}{t}{m}", "compute", start, time.perf_counter(), {"stage": k, "micro_batch": m})

    def _wait(self, box, key, what):
        """The buffer of a posted receive, waited for (a p2p span)."""
        buf, work = box.pop(key)
        start = time.perf_counter()
        work.wait()
        if self.tracer is not None:
            self.tracer.span(f"recv {what} {key[0]}.{key[1]}", "p2p", start, time.perf_counter())
        return buf

    def _compute(self, t, k, m):
        from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

        mod, ids = self.mods[k], self.mb_ids[self.first_mb[k] + m]
        prv, nxt = self.prv[k], self.nxt[k]
        if t == "F":
            if prv is None:
                x = ids
            elif self.rank_of[prv] == self.me:  # the V's bend: the previous stage is on this rank
                x = self.cache[(prv, m)][1].detach().requires_grad_(True)
            else:
                x = self._wait(self.recv_f, (k, m), "activation").requires_grad_(True)
            out = mod(x, input_ids=ids)
            if nxt is None:
                out = lm_loss(out, ids, self.mtp_lambda)
                self.losses[self.first_mb[k] + m] = float(out.detach())
            self.cache[(k, m)] = (x, out)
        elif t in ("B", "I"):
            x, out = self.cache.pop((k, m))
            if nxt is None:
                grad = None
            elif self.rank_of[nxt] == self.me:
                grad = self.input_grads.pop((nxt, m))
            else:
                grad = self._wait(self.recv_b, (k, m), "gradient")
            if t == "B":
                torch.autograd.backward(out, grad_tensors=grad)
                if prv is not None:
                    self.input_grads[(k, m)] = x.grad
            elif prv is None:  # nothing needs an input gradient: the whole backward runs as W (as torch does)
                self.bw_state[(k, m)] = ("full", out, grad)
            else:
                dinputs, groups = stage_backward_input([out], None if grad is None else [grad], [x], mod.parameters())
                self.input_grads[(k, m)] = dinputs[0]
                self.bw_state[(k, m)] = ("split", groups, None)
        else:  # W
            how, a, b = self.bw_state.pop((k, m))
            if how == "full":
                torch.autograd.backward(a, grad_tensors=b)
            else:
                stage_backward_weight(mod.parameters(), a)


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
    import importlib

    importlib.import_module("torch._dynamo")  # (the custom ops' first call imports it; do it before timing)

    from dsv3c.runtime.layout import in_process_group

    results = in_process_group(rank, world, specs[0].get("backend"), init_method,
                               lambda device: [_step(rank, world, spec, device) for spec in specs])  # fmt: skip
    if rank == 0 and out_path:
        with open(out_path, "w") as f:
            json.dump(results, f)
    return results


def _step(rank, world, spec, device):
    from dsv3c.runtime.layout import Groups
    from dsv3c.runtime.trace import Tracer, exposed
    from model_def import ModelConfig

    cfg = ModelConfig.from_dict(spec["config"], name=spec["config_name"])
    kind, pp, m, lam, ep = spec["schedule"], spec["pp"], spec["micro_batches"], spec["mtp_lambda"], spec["ep"]
    dp = world // pp
    placement = None if spec["placement"] is None else torch.tensor(spec["placement"], dtype=torch.int64)
    experts = cfg.n_routed_experts or None
    slots = placement.shape[1] if placement is not None else (experts or 0)
    mesh = make_mesh(world, spec["gpus_per_node"], pp=pp, ep=ep, dp=dp, experts=experts,
                     redundant=slots - (experts or 0), mode="train")  # fmt: skip
    me = mesh.rank(rank)
    pp_rank, d = me["pp"], me["dp"]
    lanes = 2 if kind in CHAIN_KINDS and ep > 1 else 1  # forward and backward chunks exchange on their own groups
    groups = Groups(mesh, rank, "train", lanes)
    model = build_model(cfg, spec["seed"])
    batch_all = make_batch(cfg, m * dp, spec["mb_size"], spec["seq"], spec["seed"])
    batch = batch_all[d * m * spec["mb_size"] : (d + 1) * m * spec["mb_size"]].to(device)
    mods = {k: mod.to(device) for k, mod in _stage_modules(model, kind, pp, pp_rank, spec["ranges"], ep, me["ep"],
                                                           placement, mesh.ep_gpus_per_node).items()}  # fmt: skip
    tracer = Tracer()
    contexts = tuple(groups.ep_context(lane % lanes, link_delay=spec["link_delay"], tracer=tracer) if ep > 1 else None
                     for lane in range(2))  # fmt: skip
    actions = spec["actions"]
    runs = []
    for overlap in spec["overlap"]:
        for mod in mods.values():
            mod.zero_grad(set_to_none=True)
            for x in mod.modules():
                if isinstance(x, EPExperts):
                    x.remote_routes = 0
        tracer.spans = []
        t0 = time.perf_counter()
        if kind in CHAIN_KINDS:
            layout = schedule_layout(kind, pp, m)
            ex = ChainExecutor(mods, layout, pp_rank, [p * dp + d for p in range(pp)],
                               (spec["mb_size"], spec["seq"], cfg.hidden_size), device, contexts, tracer, lam)  # fmt: skip
            losses = ex.step(lower_p2p(actions, layout)[pp_rank], list(batch.chunk(m, dim=0)), overlap)
        else:
            with active(contexts[0]) if ep > 1 else contextlib.nullcontext():  # forward and backward exchange tokens
                losses = _torch_runtime_step(mods, kind, pp, pp_rank, m, actions, groups.of["pp"], device, batch, lam)
        step_s = time.perf_counter() - t0
        grads, shards = _reduce_grads(mods, groups, mesh, me, dp, experts)
        remote = sum(x.remote_routes for mod in mods.values() for x in mod.modules() if isinstance(x, EPExperts))
        runs.append(({k: v.cpu() for k, v in grads.items()}, {d * m + i: l for i, l in losses.items()}, sorted(shards),
                     remote, step_s, exposed(tracer.spans), list(tracer.spans)))  # fmt: skip
    layout_seen = {**groups.describe(), "stages": [[k, mod.start, mod.end] for k, mod in sorted(mods.items())],
                   "slots": _slots_held(mods)}  # fmt: skip
    gathered = [None] * world if rank == 0 else None
    dist.gather_object((runs, layout_seen), gathered, dst=0)
    if rank != 0:
        return None
    ref_model = build_model(cfg, spec["seed"]).to(device)
    ref_loss, ref_grads = reference_loss_and_grads(ref_model, batch_all.to(device), m * dp, lam)
    results = [_assemble([g[0][i] for g in gathered], dp, m * dp, ref_loss, ref_grads) for i in range(len(spec["overlap"]))]
    out = {"schedule": kind, "pp": pp, "dp": dp, "ep": ep, "ranks": world, "micro_batches": m,
           "micro_batch_size": spec["mb_size"], "seq": spec["seq"], "model": cfg.name, "layers": cfg.num_hidden_layers,
           "executor": ("chain executor (torch.distributed P2P)" if kind in CHAIN_KINDS
                        else "torch.distributed.pipelining runtime"),
           "backend": dist.get_backend(), "actions": actions, **results[0][0], "loss_tol": LOSS_TOL, "cos_tol": COS_TOL,
           "step_seconds_rank0": gathered[0][0][0][4], "layout": [g[1] for g in gathered]}  # fmt: skip
    if len(results) > 1:
        out["overlap"] = _overlap_summary(results, [[g[0][i] for g in gathered] for i in range(len(results))],
                                          spec["link_delay"])  # fmt: skip
    out["ok"] = all(r["ok"] for r, _ in results) and out.get("overlap", {}).get("orders_agree", True)
    if spec.get("trace"):
        from dsv3c.runtime.trace import write_trace

        names = ["overlapped" if o else "sequential" for o in spec["overlap"]]
        write_trace(spec["trace"], {n: [g[0][i][6] for g in gathered] for i, n in enumerate(names)})
        out["trace"] = str(spec["trace"])
    return out


def _slots_held(mods) -> dict:
    """The logical expert of every expert slot this rank's stages hold, by MoE layer (unit name)."""
    out = {}
    for mod in mods.values():
        for name, x in mod.named_modules():
            if isinstance(x, EPExperts):
                out[unit_name(mod.global_name(name))] = x.slot_experts
    return out


def _reduce_grads(mods, groups, mesh, me, dp, experts):
    """(this rank's gradients by model name, reduced over its groups; the EP-partitioned ones)."""
    grads, shards = {}, {}
    for mod in mods.values():
        for name, p in mod.named_parameters():
            if p.grad is not None:
                g = mod.global_name(name)
                grads[g] = grads[g] + p.grad if g in grads else p.grad.clone()
                if name in mod.ep_shards:
                    shards[g] = mod.ep_shards[name]
    if dp == 1:
        return grads, shards
    for g in sorted(grads):
        if g in shards:
            # an expert slot's gradient sums the tokens of the EP group's replicas routed to it (each replica's
            # mean over its m micro-batches): add the stage's other EP groups' (edp), divide by dp; the full
            # expert tensor is the slots' sum, assembled from the first EP group's ranks
            if mesh.edp > 1:
                dist.all_reduce(grads[g], group=groups.of["edp"])
            slot_experts = torch.tensor(shards[g], device=grads[g].device)
            full = grads[g].new_zeros((experts, *grads[g].shape[1:])).index_add_(0, slot_experts, grads[g] / dp)
            grads[g] = full if me["edp"] == 0 else torch.zeros_like(full)
            continue
        dist.all_reduce(grads[g], group=groups.of["dp"])
        grads[g] /= dp
    return grads, shards


def _assemble(per_rank, dp, micro_batches, ref_loss, ref_grads) -> tuple[dict, dict]:
    """One run's figures against the reference, and its gradients (summed over the ranks' payloads)."""
    total, all_losses, sharded, remote = {}, {}, set(), 0
    for g_r, l_r, s_r, n_r, *_ in per_rank:
        for k, v in g_r.items():
            total[k] = total[k] + v if k in total else v
        all_losses.update(l_r)
        sharded.update(s_r)
        remote += n_r
    for k in total:  # replicas beyond the first repeat replica 0's (already averaged) gradients
        if k not in sharded:  # (the owners' zero-padded slot sums of an EP-partitioned expert add up to it)
            total[k] = total[k] / dp
    loss = float(torch.tensor([all_losses[i] for i in sorted(all_losses)], dtype=torch.float64).mean())
    cmp = _compare(ref_loss, ref_grads, loss, total)
    if sharded:  # the EP-partitioned experts alone (gathered from their owners)
        ecmp = _compare(ref_loss, {k: ref_grads[k] for k in sharded}, loss, {k: total[k] for k in sharded})
        cmp.update(expert_grad_max_cos_diff=ecmp["grad_max_cos_diff"], expert_grad_max_rel_err=ecmp["grad_max_rel_err"],
                   ep_partitioned_params=len(sharded), ep_remote_routes=remote)  # fmt: skip
    ok = cmp["loss_rel_err"] <= LOSS_TOL and cmp["grad_max_cos_diff"] <= COS_TOL and not cmp["grads_missing"]
    figures = {"loss": loss, "reference_loss": ref_loss, "losses_seen": len(all_losses), **cmp,
               "ok": bool(ok and len(all_losses) == micro_batches)}
    return figures, total


def _overlap_summary(results, per_run, link_delay) -> dict:
    """The sequential and overlapped orders of one step side by side: agreement and exposed EP communication."""
    (seq, seq_grads), (ovl, ovl_grads) = results
    between = _compare(seq["loss"], seq_grads, ovl["loss"], ovl_grads)
    worst = max((float((ovl_grads[k] - v).abs().max()) for k, v in seq_grads.items()), default=0.0)
    figures = [[r[5] for r in run] for run in per_run]  # per run, per rank: comm / compute / exposed seconds
    exposed = [sum(f["exposed_comm_seconds"] for f in run) for run in figures]
    return {"orders": ["sequential", "overlapped"], "link_delay_seconds": link_delay,
            "step_seconds": [run[0][4] for run in per_run],
            "ep_comm_seconds": [sum(f["comm_seconds"] for f in run) for run in figures],
            "exposed_ep_comm_seconds": exposed, "exposed_ratio": exposed[1] / exposed[0] if exposed[0] else None,
            "exposed_ep_comm_seconds_per_rank": [[f["exposed_comm_seconds"] for f in run] for run in figures],
            "loss_rel_err_between_orders": between["loss_rel_err"],
            "grad_max_cos_diff_between_orders": between["grad_max_cos_diff"], "grad_max_abs_diff_between_orders": worst,
            "orders_agree": between["loss_rel_err"] <= LOSS_TOL and between["grad_max_cos_diff"] <= COS_TOL,
            "overlapped": ovl}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_spec(
    cfg, kind, pp, micro_batches, ranks=None, ep=1, mb_size=1, seq=8, seed=0, mtp_lambda=MTP_LAMBDA, ranges=None,
    actions=None, placement=None, gpus_per_node=None, overlap=None, link_delay=0.0, trace=None,
) -> dict:
    """The picklable description of one run (validated). placement: phy2log [MoE layers, slots] (None: contiguous);
    gpus_per_node: default the ranks of an h800x<ranks> node (at most 8); overlap: the orders to run, default
    both (sequential, overlapped) when the lists have OVERLAP_F_B pairs and EP exchanges to overlap."""
    ranks = ranks or pp
    check_args(kind, pp, micro_batches, ranks, ep, None if ranges else cfg.num_hidden_layers)
    slots = len(placement[0]) if placement is not None else cfg.n_routed_experts
    if ep > 1 and slots % ep:
        raise PipelineArgError(f"--ep {ep} does not divide the {slots} expert slots ({cfg.n_routed_experts} routed "
                               f"experts + {slots - cfg.n_routed_experts} redundant)")  # fmt: skip
    if seq < 3:
        raise PipelineArgError(f"seq must be >= 3 for the MTP loss, got {seq}")
    gpus_per_node = gpus_per_node or min(ranks, 8)
    try:  # the mesh the ranks will build: whole nodes, EP groups inside a node or of whole nodes
        make_mesh(ranks, gpus_per_node, pp=pp, ep=ep, experts=cfg.n_routed_experts or None,
                  redundant=slots - cfg.n_routed_experts if cfg.n_routed_experts else 0)  # fmt: skip
    except PlacementError as e:
        raise PipelineArgError(str(e).splitlines()[0]) from None
    if overlap is None:
        overlap = (False, True) if kind in CHAIN_KINDS and ep > 1 else (False,)
    raw = {k: v for k, v in asdict(cfg).items() if k not in ("name", "extra")}
    return {"config": raw, "config_name": cfg.name, "schedule": kind, "pp": pp, "ranks": ranks, "ep": ep,
            "micro_batches": micro_batches, "mb_size": mb_size, "seq": seq, "seed": seed, "mtp_lambda": mtp_lambda,
            "ranges": ranges, "actions": actions or schedule_actions(kind, pp, micro_batches),
            "placement": None if placement is None else [list(map(int, row)) for row in placement],
            "gpus_per_node": gpus_per_node, "overlap": list(overlap), "link_delay": link_delay,
            "trace": None if trace is None else str(trace)}  # fmt: skip


def run_pipelined(cfg, kind: str, pp: int, micro_batches: int, ranks: int | None = None, ep: int = 1, **kw) -> dict:
    """Spawn `ranks` gloo CPU processes, run one pipelined training step and compare with the single-process
    model; returns rank 0's result dict (schedule, pp, ranks, micro_batches, loss, loss_rel_err,
    grad_max_cos_diff, grad_max_rel_err, ok, …)."""
    return run_many([make_spec(cfg, kind, pp, micro_batches, ranks, ep, **kw)])[0]


def run_many(specs: list[dict]) -> list[dict]:
    """Run several specs (same rank count) one after the other in one set of processes (forked: the process
    start and torch's imports dominate a tiny run)."""
    import torch.multiprocessing as mp

    world = specs[0]["ranks"]
    if any(s["ranks"] != world for s in specs):
        raise PipelineArgError("run_many wants specs with one rank count")
    specs = [{**s, "backend": "gloo"} for s in specs]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(_worker, args=(world, specs, f"tcp://127.0.0.1:{_free_port()}", out), nprocs=world,
                           join=True, start_method="fork")  # fmt: skip
        with open(out) as f:
            return json.load(f)
