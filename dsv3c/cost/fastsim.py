"""The schedule simulator's step time, compiled once per schedule and re-timed per set of durations.

`dsv3c.schedules.simulate` re-parses the actions and re-discovers the order in which they become ready on
every call. That order depends only on which actions have run, never on their durations, so it is computed
once here (a topological order of the same dependencies, rank order kept) together with each action's dependencies; timing a schedule is
then one pass over that order: start = max(rank free, each dependency's end + one hop when it crosses
ranks), end = start + duration. The result equals `simulate(...).step` exactly (tests/test_plan_cost.py);
the layout search uses this, the report's trace uses `simulate` itself.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

from dsv3c.schedules.actions import ScheduleError, layout_of, parse

_parse = lru_cache(maxsize=1 << 18)(parse)  # action strings repeat across schedules of one pp and m


def peaks_of(actions) -> list[int]:
    """Per rank, the most stage activations held at once (= dsv3c.schedules.checks.peak_activations)."""
    delta = {"F": 1, "B": -1, "I": -1}
    digits = str.maketrans("", "", "0123456789")
    peaks = []
    for prog in actions:
        held = peak = 0
        for a in prog:
            ops = _parse(a) if a.startswith("(") else ((None, a.translate(digits)),)
            for op in ops:
                held += delta.get(op[1], 0)
                if held > peak:
                    peak = held
        peaks.append(peak)
    return peaks


class CompiledSchedule:
    """A schedule as (rank, duration key, dependencies) in ready order, plus its peak activations per rank."""

    def __init__(self, actions):
        layout = layout_of(actions)
        owner = layout.stage_rank()
        parsed = [[_parse(a) for a in rank] for rank in actions]
        n_stages = len(owner)
        prev = {st: layout.prev_stage(st) for st in range(n_stages)}
        nxt_of = {st: layout.next_stage(st) for st in range(n_stages)}
        self.ranks = len(actions)
        where: dict[tuple[int, str, int], int] = {}  # (stage, F|G|W, mb) -> index in self.order
        order, pos = [], [0] * len(actions)
        total = sum(len(p) for p in parsed)

        def dep_keys(op):
            if op.kind == "F":
                p = prev[op.stage]
                return [] if p is None else [((p, "F", op.mb), owner[p] != owner[op.stage])]
            if op.kind == "W":
                return [((op.stage, "G", op.mb), False)]
            out = [((op.stage, "F", op.mb), False)]
            nxt = nxt_of[op.stage]
            if nxt is not None:
                out.append(((nxt, "G", op.mb), owner[nxt] != owner[op.stage]))
            return out

        deps_of = [[[d for op in ops for d in dep_keys(op)] for ops in prog] for prog in parsed]
        waiting: dict = {}  # key -> ranks blocked on it
        todo = list(range(len(parsed)))
        while todo:
            rank = todo.pop()
            prog, deps_r = parsed[rank], deps_of[rank]
            while pos[rank] < len(prog):
                deps = deps_r[pos[rank]]
                missing = next((k for k, _ in deps if k not in where), None)
                if missing is not None:
                    waiting.setdefault(missing, []).append(rank)
                    break
                ops = prog[pos[rank]]
                idx = len(order)
                key = ("P", ops[0].stage) if len(ops) == 2 else (ops[0].kind, ops[0].stage)
                order.append((rank, key, tuple((where[k], hop) for k, hop in deps)))
                for op in ops:
                    k = (op.stage, "G" if op.kind in ("B", "I") else op.kind, op.mb)
                    where[k] = idx
                    todo.extend(waiting.pop(k, ()))
                pos[rank] += 1
        if len(order) < total:
            raise ScheduleError("the schedule cannot proceed (deadlock)")
        self.order = order
        self.pair_parts = {}
        for rank_ops in parsed:
            for ops in rank_ops:
                if len(ops) == 2:
                    self.pair_parts[ops[0].stage] = (ops[0].kind, ops[1].kind, ops[1].stage)
        self.peaks = peaks_of(actions)
        self.action_counts = Counter((rank, key) for rank, key, _ in order)  # (rank, duration key) -> actions

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
