"""Checks on a schedule: counts and order per (stage, micro-batch), send/recv insertion, a lock-step run that
proves the absence of deadlock, and peak in-flight activations per rank.

Activation accounting: the activation a stage's F stores for a micro-batch is held from that F until the
backward that frees it, the B or the I (W needs only the weights' inputs, which we count with the I, as
DeepSeek's table and the zero-bubble paper do). In an overlapped (F;B) pair the F allocates before the B frees.
Counts are in units of one stage's activations for one micro-batch, summed over the stages a rank holds.
"""

from collections import Counter

from dsv3c.schedules.actions import Op, ScheduleError, layout_of, parse


def check_order(actions) -> None:
    """Raise ScheduleError unless each (stage, micro-batch) runs F then B, or F, I, W, on the stage's rank."""
    layout = layout_of(actions)
    owner = layout.stage_rank()
    seen: dict[tuple[int, int], list[str]] = {}
    for rank, rank_actions in enumerate(actions):
        for action in rank_actions:
            for op in parse(action):
                if op.kind not in ("F", "B", "I", "W"):
                    raise ScheduleError(f"rank {rank}: '{action}' is not a compute action")
                if owner.get(op.stage) != rank:
                    raise ScheduleError(f"rank {rank}: '{op}' runs a stage that rank {owner.get(op.stage)} holds")
                seen.setdefault((op.stage, op.mb), []).append(op.kind)
    for d, chain in enumerate(layout.chains):
        for s in chain:
            for m in range(layout.micro_batches[d]):
                kinds = seen.pop((s, m), [])
                if kinds not in (["F", "B"], ["F", "I", "W"]):
                    raise ScheduleError(f"stage {s} micro-batch {m} runs {' '.join(kinds) or 'nothing'}, "
                                        "not F B or F I W")  # fmt: skip
    if seen:
        s, m = min(seen)
        raise ScheduleError(f"stage {s} micro-batch {m} is outside the layout")


def with_comms(actions) -> list[list[str]]:
    """The schedule with SEND/RECV inserted: each send right after its producer, each receive right before its user."""
    # activations go s -> next(s) after F, gradients s -> prev(s) after B or I; same-rank hand-overs need none
    layout = layout_of(actions)
    owner = layout.stage_rank()
    out = []
    for rank, rank_actions in enumerate(actions):
        program = []
        for action in rank_actions:
            ops = parse(action)
            for op in ops:  # receives this action needs
                src = layout.prev_stage(op.stage) if op.kind == "F" else layout.next_stage(op.stage)
                if op.kind in ("F", "B", "I") and src is not None and owner[src] != rank:
                    program.append(f"{op.stage}RECV_{'F' if op.kind == 'F' else 'B'}{op.mb}")
            program.append(action)
            for op in ops:  # sends this action makes
                dst = layout.next_stage(op.stage) if op.kind == "F" else layout.prev_stage(op.stage)
                if op.kind in ("F", "B", "I") and dst is not None and owner[dst] != rank:
                    program.append(f"{op.stage}SEND_{'F' if op.kind == 'F' else 'B'}{op.mb}")
        out.append(program)
    return out


def run_lockstep(actions) -> int:
    """The number of lock-step rounds in which all ranks' programs (with_comms) complete; ScheduleError on deadlock."""
    # Sends are buffered (like isend); a receive, or a compute whose input is not there, blocks its rank, and each
    # rank runs its program in order. A round sees only what earlier rounds did.
    layout = layout_of(actions)
    owner = layout.stage_rank()
    programs = [[parse(a) for a in p] for p in with_comms(actions)]
    pos = [0] * len(programs)
    done: set[tuple[int, Op]] = set()  # (rank, op) executed in an earlier round

    def ready(rank: int, op: Op) -> bool:
        if op.kind == "SEND_F":
            return (rank, Op(op.stage, "F", op.mb)) in done
        if op.kind == "SEND_B":
            return any((rank, Op(op.stage, k, op.mb)) in done for k in ("B", "I"))
        if op.kind == "RECV_F":
            return (owner[layout.prev_stage(op.stage)], Op(layout.prev_stage(op.stage), "SEND_F", op.mb)) in done
        if op.kind == "RECV_B":
            nxt = layout.next_stage(op.stage)
            return (owner[nxt], Op(nxt, "SEND_B", op.mb)) in done
        if op.kind == "W":
            return (rank, Op(op.stage, "I", op.mb)) in done
        if op.kind == "F":
            src = layout.prev_stage(op.stage)
            if src is None:
                return True
            return (rank, Op(src, "F", op.mb) if owner[src] == rank else Op(op.stage, "RECV_F", op.mb)) in done
        # B or I: needs this stage's own F and the gradient from the next stage (or the loss at the chain's end)
        if (rank, Op(op.stage, "F", op.mb)) not in done:
            return False
        nxt = layout.next_stage(op.stage)
        if nxt is None:
            return True
        if owner[nxt] != rank:
            return (rank, Op(op.stage, "RECV_B", op.mb)) in done
        return any((rank, Op(nxt, k, op.mb)) in done for k in ("B", "I"))

    rounds = 0
    while any(p < len(prog) for p, prog in zip(pos, programs)):
        ran = []
        for rank, prog in enumerate(programs):
            if pos[rank] < len(prog) and all(ready(rank, op) for op in prog[pos[rank]]):
                ran.append((rank, prog[pos[rank]]))
        if not ran:
            blocked = [f"rank {r}: {','.join(map(str, prog[p]))}" for r, (p, prog) in enumerate(zip(pos, programs))
                       if p < len(prog)]  # fmt: skip
            raise ScheduleError(f"deadlock after {rounds} rounds; blocked: {'; '.join(blocked)}")
        for rank, ops in ran:
            done.update((rank, op) for op in ops)
            pos[rank] += 1
        rounds += 1
    return rounds


def peak_activations(actions) -> list[int]:
    """Per rank, the most stage activations held at once (held from F until the B or I that frees it)."""
    peaks = []
    for rank_actions in actions:
        held = peak = 0
        for action in rank_actions:
            for op in parse(action):
                held += {"F": 1, "B": -1, "I": -1}.get(op.kind, 0)
                peak = max(peak, held)
        peaks.append(peak)
    return peaks


def counts(actions) -> list[dict[str, int]]:
    """Per rank, how many F, B, I, W ops and OVERLAP_F_B pairs it runs."""
    out = []
    for rank_actions in actions:
        c = Counter()
        for action in rank_actions:
            ops = parse(action)
            c.update(op.kind for op in ops)
            if len(ops) == 2:
                c["F&B"] += 1
        out.append({k: c[k] for k in ("F", "B", "I", "W", "F&B")})
    return out


def check(actions) -> dict:
    """Run every check; return the lock-step round count and the peak activations per rank."""
    check_order(actions)
    return {"rounds": run_lockstep(actions), "peak_activations": peak_activations(actions)}
