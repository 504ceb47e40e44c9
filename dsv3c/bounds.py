"""Bounds on the work and memory the sizes a user types imply, checked before any allocation or simulation.

Each bound follows from what the code builds, measured on one core of the development machine:
- a pipeline schedule holds at most 3 actions (F, I, W) per stage and micro-batch, a "slot"; `dsv3c schedule`
  builds, checks and simulates it at 30-100 us per action (zb1p, pp 64, 2000 micro-batches: 384,000 actions,
  19 s), the training cost model's compiled simulator at about 20 us per action (1f1b, pp 8, 15360 micro-batches:
  245,760 actions, 4.4 s per layout);
- EPLB's placement (`rebalance_experts`) costs about 10 ns x layers x slots^2 (58 layers x 4352 slots: 12.7 s);
  its tables hold layers x slots entries;
- `dsv3c run` holds a float32 model per rank process and allocates logits, activations and caches
  (`dsv3c.validate.run_bytes`).
"""

import re

from dsv3c.schedules.actions import ScheduleError

MAX_SCHEDULE_SLOTS = 1 << 16  # `dsv3c schedule`: stages x micro-batches (<= 196,608 actions, ~10 s)
# per layout the training cost model simulates: DeepSeek-V3's default global batch (15360 sequences) at dp 1 on
# 63 DualPipeV stages fits (1,935,360 slots), so no default is refused on any target
MAX_TRAIN_SLOTS = 1 << 21
MAX_PLACEMENT_WORK = 1 << 28  # layers x (experts + redundant)^2: about 3 s of EPLB
MAX_RUN_RANKS = 16  # gloo processes `dsv3c run` forks, each holding the whole model
MAX_RUN_MICRO_BATCHES = 1024  # micro-batches of a real pipelined step in `dsv3c run --pp`
MAX_RUN_TOKENS = 4096  # greedy steps of `dsv3c run --tokens` (each reruns the model on the whole prefix)
MAX_DURATION = 1e9  # a `dsv3c schedule` duration or hop time: sums over every action stay finite
MAX_SEED = 2**63 - 1  # torch.manual_seed's range, non-negative half
MAX_DIGITS = 30  # a typed integer beyond 10**30 exceeds every bound here by far; int() of 5000 digits is refused


class BoundError(ValueError):
    """A size whose work or memory exceeds dsv3c's bound; the message names the bound."""


def parse_int(text: str, what: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """The integer a user typed (decimal, ASCII digits), checked against [minimum, maximum]; BoundError otherwise."""
    raw = str(text).strip()
    if not re.fullmatch(r"[+-]?[0-9]+", raw):
        raise BoundError(f"{what} must be an integer written in digits 0-9, got {text!r}")
    if len(raw.lstrip("+-").lstrip("0")) > MAX_DIGITS:
        raise BoundError(f"{what} {raw[:24]}{'...' if len(raw) > 24 else ''} has more than {MAX_DIGITS} digits")
    value = int(raw)
    if minimum is not None and value < minimum:
        raise BoundError(f"{what} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise BoundError(f"{what} must be at most {maximum:,}, got {value:,}")
    return value


def parse_float(text: str, what: str, minimum: float, maximum: float) -> float:
    """The finite number a user typed, in [minimum, maximum]; BoundError for NaN, inf or out of range."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise BoundError(f"{what} must be a number, got {text!r}") from None
    if not minimum <= value <= maximum:  # NaN fails too
        raise BoundError(f"{what} must be a finite number in [{minimum:g}, {maximum:g}], got {text!r}")
    return value


def schedule_stages(kind: str, pp: int) -> int:
    """Pipeline stages of a schedule kind on pp ranks (DualPipeV holds two per rank)."""
    return 2 * pp if kind == "dualpipev" else pp


def check_schedule_size(kind: str, pp: int, micro_batches: int, limit: int = MAX_SCHEDULE_SLOTS) -> None:
    """Refuse (ScheduleError) a schedule of more than limit stages x micro-batches, before it is built."""
    slots = schedule_stages(kind, pp) * micro_batches
    if slots > limit:
        raise ScheduleError(f"{kind} with pp {pp} and {micro_batches:,} micro-batches has {slots:,} stage x "
                            f"micro-batch slots, over the {limit:,} dsv3c builds and simulates")


def _divisors(n: int) -> list[int]:
    """The divisors of n in increasing order."""
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def check_train_work(cfg, gpus: int, global_batch: int, micro_batches: int | None,
                     limit: int = MAX_TRAIN_SLOTS) -> None:
    """Refuse (BoundError) a training step whose largest candidate pipeline has more than limit stage x
    micro-batch slots: over every pp dividing gpus that the model's pipeline units can fill, with dp = gpus / pp,
    the global_batch / dp micro-batches of the layout search and the given micro_batches."""
    units = cfg.num_hidden_layers + 1 + (1 if cfg.num_nextn_predict_layers else 0)
    worst = (0, 1, 1, None)
    for p in _divisors(gpus):
        if p > units:
            continue
        stages = 2 * p if 2 * p <= units else p  # DualPipeV's two stages per rank where the model has the units
        for m, flag in ((max(1, global_batch // (gpus // p)), "--global-batch"), (micro_batches, "--micro-batches")):
            if m and stages * m > worst[0]:
                worst = (stages * m, p, m, flag)
    slots, p, m, flag = worst
    if slots > limit:
        value = micro_batches if flag == "--micro-batches" else global_batch
        raise BoundError(f"{flag} {value:,}: a pipeline of pp {p} would run {m:,} micro-batches per step ({slots:,} "
                         f"stage x micro-batch slots), over the {limit:,} the cost model simulates")


def check_placement_work(layers: int, experts: int, redundant: int, limit: int = MAX_PLACEMENT_WORK) -> None:
    """Refuse (BoundError) a placement whose EPLB work, layers x (experts + redundant)^2, exceeds limit."""
    work = layers * (experts + redundant) ** 2
    if work > limit:
        raise BoundError(f"--parallel redundant={redundant}: placing {experts + redundant:,} expert slots in {layers} MoE "
                         f"layers costs layers x slots^2 = {work:,}, over the bound {limit:,}")
