"""A timing simulator: each rank runs its actions in order, each as early as its inputs allow.

Durations are given per action kind: F (forward chunk), B (full backward), I (input-gradient backward),
W (weight-gradient backward) and F&B (an overlapped forward+backward pair), each a number or a mapping
stage -> number. Missing values are derived: B = I + W, I = B - W, W = B - I; an F&B pair defaults to the
sum F + B of its two chunks (both chunks share the GPU's compute; the overlap hides their all-to-all
communication, which per-chunk compute times do not include), else UNIT_DURATIONS fill the gaps.

Dependencies: F of a stage after F of the previous stage in its chain (same micro-batch), the backward (B or I)
of a stage after its own F and after the backward of the next stage in its chain (at the chain's end, after
its own F: the loss), W after its I. Crossing to another rank adds `comm` seconds (one hop), drawn on the
sender's communication track; stages on the same rank hand over for free.
"""

from dataclasses import dataclass, field
from typing import NamedTuple

from dsv3c.schedules.actions import Layout, Op, ScheduleError, layout_of, parse

UNIT_DURATIONS = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}  # the zero-bubble paper's F = I = W; F&B = F + B


class Event(NamedTuple):
    """One interval on a rank's track: start and end time, label (an action string), ops it runs."""

    start: float
    end: float
    label: str
    ops: tuple[Op, ...]


@dataclass
class Timeline:
    """Per rank, its compute and communication intervals; the step time, busy time and bubble per rank."""

    layout: Layout
    compute: list[list[Event]]
    comm: list[list[Event]]
    step: float
    busy: list[float]
    bubble: list[float] = field(default_factory=list)
    kind: str = ""


def duration(durations: dict, kind: str, stage: int) -> float:
    """The duration of one op of kind (F, B, I, W) at stage under durations (see the module docstring)."""

    def given(k):
        v = durations.get(k)
        if v is None:
            return None
        return float(v[stage] if hasattr(v, "__getitem__") else v)

    value = given(kind)
    if value is None:
        derived = {"B": ("I", "W", 1), "I": ("B", "W", -1), "W": ("B", "I", -1)}.get(kind)
        if derived:
            a, b_, sign = derived
            if given(a) is not None and given(b_) is not None:
                value = given(a) + sign * given(b_)
    return UNIT_DURATIONS[kind] if value is None else value


def complete_durations(given: dict | None) -> dict:
    """Scalar durations for all of F, B, I, W and F&B, derived from given as the module docstring says."""
    given = given or {}
    full = {k: duration(given, k, 0) for k in UNIT_DURATIONS}
    full["F&B"] = float(given.get("F&B", full["F"] + full["B"]))
    return full


def action_duration(durations: dict, ops: tuple[Op, ...]) -> float:
    """The duration of one action: its op's, or for an overlapped pair F&B (default: the sum of the two)."""
    if len(ops) == 2:
        pair = durations.get("F&B")
        if pair is not None:
            return float(pair[ops[0].stage] if hasattr(pair, "__getitem__") else pair)
    return sum(duration(durations, op.kind, op.stage) for op in ops)


def simulate(actions, durations: dict | None = None, comm: float = 0.0) -> Timeline:
    """The timeline of a schedule under durations with comm seconds per rank-to-rank hop."""
    durations = dict(UNIT_DURATIONS if durations is None else durations)
    layout = layout_of(actions)
    owner = layout.stage_rank()
    parsed = [[(a, parse(a)) for a in rank] for rank in actions]
    ends: dict[tuple[int, str, int], float] = {}  # (stage, "F" | "G" (backward) | "W", mb) -> end time
    compute = [[] for _ in actions]
    comms = [[] for _ in actions]
    free = [0.0] * len(actions)
    pos = [0] * len(actions)

    def hop(src: int, dst: int) -> float:
        return comm if owner[src] != owner[dst] else 0.0

    def ready(op: Op):
        """When op's inputs are there, or None when they are not computed yet."""
        if op.kind == "F":
            prev = layout.prev_stage(op.stage)
            if prev is None:
                return 0.0
            t = ends.get((prev, "F", op.mb))
            return None if t is None else t + hop(prev, op.stage)
        if op.kind == "W":
            return ends.get((op.stage, "G", op.mb))
        own = ends.get((op.stage, "F", op.mb))
        nxt = layout.next_stage(op.stage)
        if nxt is None or own is None:
            return own
        t = ends.get((nxt, "G", op.mb))
        return None if t is None else max(own, t + hop(nxt, op.stage))

    total = sum(len(p) for p in parsed)
    scheduled = 0
    while scheduled < total:
        progress = False
        for rank, prog in enumerate(parsed):
            while pos[rank] < len(prog):
                label, ops = prog[pos[rank]]
                times = [ready(op) for op in ops]
                if any(t is None for t in times):
                    break
                start = max([free[rank], *times])
                end = start + action_duration(durations, ops)
                compute[rank].append(Event(start, end, label, ops))
                for op in ops:
                    ends[(op.stage, "G" if op.kind in ("B", "I") else op.kind, op.mb)] = end
                    dst = layout.next_stage(op.stage) if op.kind == "F" else layout.prev_stage(op.stage)
                    if op.kind != "W" and dst is not None and owner[dst] != rank and comm > 0:
                        kind = "SEND_F" if op.kind == "F" else "SEND_B"
                        comms[rank].append(Event(end, end + comm, f"{op.stage}{kind}{op.mb}", (Op(op.stage, kind, op.mb),)))
                free[rank] = end
                pos[rank] += 1
                scheduled += 1
                progress = True
        if not progress:
            stuck = [str(prog[p][0]) for p, prog in zip(pos, parsed) if p < len(prog)]
            raise ScheduleError(f"the schedule cannot proceed (deadlock) at: {', '.join(stuck)}")
    step = max((ev[-1].end for ev in compute if ev), default=0.0)
    busy = [sum(e.end - e.start for e in ev) for ev in compute]
    for c in comms:
        c.sort()
    return Timeline(layout, compute, comms, step, busy, [step - b for b in busy], getattr(actions, "kind", ""))
