"""Action lists for the pipelined runner while `dsv3c.schedules` is not available.

`actions(kind, pp, micro_batches) -> list[list[str]]` (per pipeline rank, torch.distributed.pipelining
action strings). 1f1b is the textbook schedule; zb1p and dualpipev are torch's own (ScheduleInterleavedZeroBubble
with one stage per rank, ScheduleDualPipeV), read from their `pipeline_order` with stand-in stage objects;
dualpipe is NOT DeepSeek's exact schedule but a valid bidirectional one in the same numbering (list-scheduled
with unit durations, adjacent F/B pairs fused into OVERLAP_F_B, each stage's last backward split into I and a
deferred W) so that the executor meets every action kind. The real schedules come from `dsv3c.schedules.build`.
"""

from __future__ import annotations

import types


def one_f_one_b(pp: int, m: int) -> list[list[str]]:
    """1F1B: rank r runs pp-1-r warm-up forwards, then alternates F and B, then drains the backwards."""
    out = []
    for r in range(pp):
        w = min(pp - 1 - r, m)
        acts = [f"{r}F{i}" for i in range(w)]
        for i in range(m - w):
            acts += [f"{r}F{w + i}", f"{r}B{i}"]
        acts += [f"{r}B{i}" for i in range(m - w, m)]
        out.append(acts)
    return out


def _stand_in(index: int, num_stages: int, pp: int):
    """The attributes torch's schedule constructors read from a stage, without a process group."""
    return types.SimpleNamespace(stage_index=index, num_stages=num_stages, group_size=pp, group_rank=0, submod=None,
                                 stage_index_to_group_rank={}, is_first=index == 0, is_last=index == num_stages - 1)


def _torch_order(schedule) -> list[list[str]]:
    order = schedule.pipeline_order
    return [[str(a) for a in order[r] if a is not None] for r in sorted(order)]


def zb1p(pp: int, m: int) -> list[list[str]]:
    """torch's ZB1P (ScheduleInterleavedZeroBubble, one stage per rank)."""
    from torch.distributed.pipelining.schedules import ScheduleInterleavedZeroBubble

    return _torch_order(ScheduleInterleavedZeroBubble([_stand_in(0, pp, pp)], m, loss_fn=lambda o, t: o))


def dualpipev(pp: int, m: int) -> list[list[str]]:
    """torch's ScheduleDualPipeV: 2·pp stages, rank r holds r and 2·pp-1-r."""
    from torch.distributed.pipelining.schedules import ScheduleDualPipeV

    stages = [_stand_in(0, 2 * pp, pp), _stand_in(2 * pp - 1, 2 * pp, pp)]
    return _torch_order(ScheduleDualPipeV(stages, m, loss_fn=lambda o, t: o))


def bidirectional(pp: int, m: int) -> list[list[str]]:
    """A valid bidirectional (DualPipe-numbered) schedule: stage s on rank s for s < pp, stage pp+s (same layers
    as s) on rank pp-1-s, m/2 micro-batches per direction. List-scheduled on unit time steps (a ready forward of
    the direction with fewer forwards issued while fewer than pp+1 micro-batches are in flight on the rank, else
    a ready backward); then F/B neighbours whose
    dependencies were already met are fused into OVERLAP_F_B, and each stage's last plain B becomes I with
    its W deferred to the end."""
    half = m // 2
    n = 2 * pp

    def rank_of(k):
        return k if k < pp else n - 1 - k

    def nxt(k):
        return None if k in (pp - 1, n - 1) else k + 1

    def prv(k):
        return None if k in (0, pp) else k - 1

    done = {}  # (type, stage, mb) -> time step
    nf = {k: 0 for k in range(n)}
    nb = {k: 0 for k in range(n)}
    lists = [[] for _ in range(pp)]  # (action tuple, step, deps-met step)
    t = 0
    while any(nb[k] < half for k in range(n)):
        picks = []
        for r in range(pp):
            local = [r, n - 1 - r]
            in_flight = sum(nf[k] - nb[k] for k in local)
            fwd = bwd = None
            for k in sorted(local, key=lambda k: nb[k]):
                i = nb[k]
                if i < half and ("F", k, i) in done and (nxt(k) is None or done.get(("B", nxt(k), i), t) < t):
                    dep = 0 if nxt(k) is None else done[("B", nxt(k), i)]
                    bwd = (("B", k, i), max(dep, done[("F", k, i)]))
                    break
            for k in sorted(local, key=lambda k: (nf[k], k)):
                i = nf[k]
                if i < half and (prv(k) is None or done.get(("F", prv(k), i), t) < t):
                    fwd = (("F", k, i), 0 if prv(k) is None else done[("F", prv(k), i)])
                    break
            cand = fwd if fwd is not None and (bwd is None or in_flight < pp + 1) else bwd
            if cand is not None:
                picks.append((r, cand))
        if not picks and t > 4 * n * (m + 1):
            raise RuntimeError("bidirectional list scheduling made no progress")
        for r, (act, dep) in picks:
            done[act] = t
            (nf if act[0] == "F" else nb)[act[1]] += 1
            lists[r].append((act, t, dep))
        t += 1

    out = []
    for r in range(pp):
        acts, items, i = [], lists[r], 0
        while i < len(items):
            (a, ta, _), nxt_item = items[i], items[i + 1] if i + 1 < len(items) else None
            if nxt_item and a[0] == "F" and nxt_item[0][0] == "B" and nxt_item[0][1] != a[1] and nxt_item[2] < ta:
                b = nxt_item[0]
                acts.append(f"({a[1]}F{a[2]};{b[1]}B{b[2]})OVERLAP_F_B")
                i += 2
            else:
                acts.append(f"{a[1]}{a[0]}{a[2]}")
                i += 1
        deferred = []
        for k in (r, n - 1 - r):
            last = f"{k}B{half - 1}"
            if last in acts:
                acts[acts.index(last)] = f"{k}I{half - 1}"
                deferred.append(f"{k}W{half - 1}")
        out.append(acts + deferred)
    return out


def actions(kind: str, pp: int, m: int) -> list[list[str]]:
    """The fallback action lists for kind."""
    return {"1f1b": one_f_one_b, "zb1p": zb1p, "dualpipev": dualpipev, "dualpipe": bidirectional}[kind](pp, m)
