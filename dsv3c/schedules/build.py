"""Schedule generators: 1F1B, ZB-H1 (zb1p), DualPipeV and DeepSeek's bidirectional DualPipe, as action strings."""

from collections import Counter, deque

from dsv3c.schedules.actions import Layout, Schedule, ScheduleError, overlap

KINDS = ("1f1b", "zb1p", "dualpipev", "dualpipe")


def build(kind: str, pp: int, micro_batches: int) -> Schedule:
    """Per pipeline rank, its compute actions in order, for schedule kind on pp ranks and micro_batches."""
    validate(kind, pp, micro_batches)
    m = micro_batches
    if kind == "1f1b":
        ranks = [_one_f_one_b(pp, r, m, split=False) for r in range(pp)]
        layout = Layout(pp, (tuple(range(pp)),), (m,))
    elif kind == "zb1p":
        ranks = [_one_f_one_b(pp, r, m, split=True) for r in range(pp)]
        layout = Layout(pp, (tuple(range(pp)),), (m,))
    elif kind == "dualpipev":
        ranks = [_dualpipe_rank(pp, r, m, r, 2 * pp - 1 - r) for r in range(pp)]
        layout = Layout(pp, (tuple(range(2 * pp)),), (m,))
    else:
        half = pp // 2
        ranks = []
        for r in range(pp):
            down, up = r, 2 * pp - 1 - r  # direction 0's stage on r, direction 1's stage on r
            near, far = (down, up) if r < half else (up, down)  # "phase 0" is the direction entering nearer r
            ranks.append(_dualpipe_rank(half, min(r, pp - 1 - r), m // 2, near, far))
        layout = Layout(pp, (tuple(range(pp)), tuple(range(pp, 2 * pp))), (m // 2, m // 2))
    return Schedule(ranks, kind, pp, m, layout)


def validate(kind: str, pp: int, micro_batches: int) -> None:
    """Raise ScheduleError unless kind, pp and micro_batches make a schedule."""
    if kind not in KINDS:
        raise ScheduleError(f"unknown schedule kind '{kind}' (known: {', '.join(KINDS)})")
    if not isinstance(pp, int) or pp < 1:
        raise ScheduleError(f"pp must be a positive integer, got {pp}")
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ScheduleError(f"micro-batches must be a positive integer, got {micro_batches}")
    if kind == "dualpipev" and micro_batches < 2 * pp:
        raise ScheduleError(f"dualpipev needs micro-batches >= 2*pp = {2 * pp}, got {micro_batches}")
    if kind == "dualpipe":
        if pp % 2:
            raise ScheduleError(f"dualpipe needs an even pp, got {pp}")
        if micro_batches % 2:
            raise ScheduleError(f"dualpipe needs an even number of micro-batches, got {micro_batches}")
        if micro_batches < 2 * pp:
            raise ScheduleError(f"dualpipe needs micro-batches >= 2*pp = {2 * pp}, got {micro_batches}")


def _one_f_one_b(pp: int, r: int, m: int, split: bool) -> list[str]:
    """Rank r of 1F1B; with split, ZB-H1: backward as I then W, rank r keeping r W's deferred to fill its cooldown."""
    warmup = min(pp - 1 - r, m)
    out = [f"{r}F{i}" for i in range(warmup)]
    pending = deque()  # micro-batches whose I ran and whose W has not
    lag = r if split else 0  # the last rank waits longest at the end, so it defers most W's

    def backward(i):
        if not split:
            out.append(f"{r}B{i}")
            return
        out.append(f"{r}I{i}")
        pending.append(i)
        if len(pending) > lag:
            out.append(f"{r}W{pending.popleft()}")

    for i in range(m - warmup):
        out.append(f"{r}F{warmup + i}")
        backward(i)
    for i in range(m - warmup, m):
        backward(i)
    out.extend(f"{r}W{i}" for i in pending)
    return out


def _dualpipe_rank(n: int, h: int, chunks: int, near: int, far: int) -> list[str]:
    """One rank's actions in DeepSeek's DualPipe step (n ranks per half, h this rank's distance from its end)."""
    # near: the stage of the direction whose micro-batches enter at this rank's end ("phase 0"), far: the other;
    # chunks: micro-batches per direction. DualPipeV is the same program with n = pp, h = rank.
    out: list[str] = []
    fwd, bwd = Counter(), Counter()
    weights = deque()  # (stage, mb) of I's whose W is deferred; W always completes the oldest

    def f(s):
        fwd[s] += 1
        return f"{s}F{fwd[s] - 1}"

    def b(s, split=False):
        mb = bwd[s]
        bwd[s] += 1
        if split:
            weights.append((s, mb))
        return f"{s}{'I' if split else 'B'}{mb}"

    def w():
        s, mb = weights.popleft()
        return f"{s}W{mb}"

    middle = h == n - 1
    # 1. warm-up forwards of the near direction
    out += [f(near) for _ in range(2 * (n - h - 1))]
    # 2. near/far forward pairs
    for _ in range(h + 1):
        out += [f(near), f(far)]
    # 3. far backward split into I and W, then the next far forward (zero bubble)
    for _ in range(n - h - 1):
        out += [b(far, split=True), w(), f(far)]
    # 4. main phase: overlapped forward/backward pairs of both directions
    for i in range(chunks - 2 * n + h + 1):
        if i == 0 and middle:  # the middle ranks run their first pair back to back, which shortens the bubble
            out += [f(near), b(far)]
        else:
            out.append(overlap(f(near), b(far)))
        out.append(overlap(f(far), b(near)))
    # 5. far backwards interleaved with the remaining far forwards
    for _ in range(n - h - 1):
        out += [b(far), overlap(f(far), b(near))]
    # 6. backwards of both directions; from the middle of this phase on, split into I and W
    split = False
    for i in range(h + 1):
        if i == (h + 1) // 2 and h % 2 == 1:
            split = True
        out.append(b(far, split))
        if i == (h + 1) // 2 and h % 2 == 0:
            split = True
        out.append(b(near, split))
    # 7. deferred W's interleaved with the last near backwards
    for _ in range(n - h - 1):
        out += [w(), b(near, split=True)]
    # 8. weight-gradient cooldown
    out += [w() for _ in range(h + 1)]
    if weights:
        raise AssertionError("DualPipe left deferred W's")
    return out
