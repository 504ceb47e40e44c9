"""The schedule simulator's step time, compiled once per schedule and re-timed per set of durations.

`dsv3c.schedules.simulate` re-parses the actions and re-discovers the order in which they become ready on
every call. That order depends only on which actions have run, never on their durations, so it is computed
once here (a topological order of the same dependencies, rank order kept) together with each action's dependencies; timing a schedule is
then one pass over that order: start = max(rank free, each dependency's end + one hop when it crosses
ranks), end = start + duration. The result equals `simulate(...).step` exactly (tests/test_plan_cost.py);
the layout search uses this, the report's trace uses `simulate` itself.
"""

from __future__ import annotations

import re
from collections import Counter

from dsv3c.schedules.actions import ScheduleError, layout_of, parse

_COMPUTE = re.compile(r"(\d+)([FBIW])(\d+)$")  # a plain compute action (the common case, parsed without Op tuples)
_EVENT = {"F": 0, "B": 1, "I": 1, "W": 2}  # what an op completes: its forward, its input gradient (G), its weights
_HELD = {"F": 1, "B": -1, "I": -1, "W": 0}  # stage activations an op adds to those its rank holds


class CompiledSchedule:
    """A schedule as (rank, duration key, dependencies) in ready order, plus its peak activations per rank.

    Events (an op's forward, input gradient or weight gradient done for one micro-batch of one stage) are
    numbered (stage·3 + kind)·M + micro-batch, so that finding the order is list indexing.
    """

    def __init__(self, actions):
        layout = layout_of(actions)
        owner = layout.stage_rank()
        n = len(owner)
        prev = [layout.prev_stage(s) for s in range(n)]
        nxt = [layout.next_stage(s) for s in range(n)]
        stride = max(layout.micro_batches, default=0) + 1
        per_stage = 3 * stride
        self.pair_parts = {}
        progs = [[self._action(a, prev, nxt, owner, stride) for a in rank] for rank in actions]
        where = [-1] * (n * per_stage)  # event -> index in order of the action that completes it
        order, pos, waiting = [], [0] * len(progs), {}  # waiting: event -> ranks blocked on it
        todo = list(range(len(progs)))
        while todo:
            rank = todo.pop()
            prog, i = progs[rank], pos[rank]
            while i < len(prog):
                key, deps, done, _ = prog[i]
                blocked = next((e for e, _ in deps if where[e] < 0), None)
                if blocked is not None:
                    waiting.setdefault(blocked, []).append(rank)
                    break
                idx = len(order)
                order.append((rank, key, tuple((where[e], hop) for e, hop in deps)))
                for e in done:
                    where[e] = idx
                    if e in waiting:
                        todo.extend(waiting.pop(e))
                i += 1
            pos[rank] = i
        if len(order) < sum(map(len, progs)):
            raise ScheduleError("the schedule cannot proceed (deadlock)")
        self.ranks = len(progs)
        self.order = order
        self.peaks = [_peak(prog) for prog in progs]
        self.action_counts = Counter((rank, key) for rank, key, _ in order)  # (rank, duration key) -> actions

    def _action(self, action: str, prev, nxt, owner, stride: int) -> tuple:
        """(duration key, [(event waited for, crosses ranks)], [events completed], op kinds) of one action string."""
        m = _COMPUTE.match(action)
        ops = ((int(m[1]), m[2], int(m[3])),) if m else tuple((o.stage, o.kind, o.mb) for o in parse(action))
        deps, done = [], []
        for s, kind, mb in ops:
            if kind not in _EVENT:
                raise ScheduleError(f"not a compute action: '{action}'")
            if kind == "F":
                p = prev[s]
                if p is not None:
                    deps.append((3 * stride * p + mb, owner[p] != owner[s]))
            elif kind == "W":
                deps.append((3 * stride * s + stride + mb, False))
            else:
                deps.append((3 * stride * s + mb, False))
                q = nxt[s]
                if q is not None:
                    deps.append((3 * stride * q + stride + mb, owner[q] != owner[s]))
            done.append(3 * stride * s + _EVENT[kind] * stride + mb)
        if len(ops) == 2:
            self.pair_parts[ops[0][0]] = (ops[0][1], ops[1][1], ops[1][0])
            key = ("P", ops[0][0])
        else:
            key = (ops[0][1], ops[0][0])
        return key, deps, done, [kind for _, kind, _ in ops]

    def step(self, durations: dict, comm: float = 0.0) -> tuple[float, list[float]]:
        """(step time, busy time per rank) under per-stage durations {F, B, I, W, F&B: list by stage}."""
        table = {}
        for rank, key, _ in self.order:
            if key in table:
                continue
            kind, stage = key
            if kind == "P":
                pair = durations.get("F&B")
                if pair is not None:
                    table[key] = float(pair[stage])
                else:
                    k1, k2, s2 = self.pair_parts[stage]
                    table[key] = float(durations[k1][stage]) + float(durations[k2][s2])
            else:
                table[key] = float(durations[kind][stage])
        ends = [0.0] * len(self.order)
        free = [0.0] * self.ranks
        busy = [0.0] * self.ranks
        for i, (rank, key, deps) in enumerate(self.order):
            start = free[rank]
            for j, hop in deps:
                t = ends[j] + (comm if hop else 0.0)
                if t > start:
                    start = t
            d = table[key]
            ends[i] = free[rank] = start + d
            busy[rank] += d
        return max(free), busy


def _peak(prog) -> int:
    """The most stage activations one rank's compiled actions hold at once (= schedules.checks.peak_activations)."""
    held = peak = 0
    for *_, kinds in prog:
        for kind in kinds:
            held += _HELD[kind]
            peak = max(peak, held)
    return peak
