"""The `dsv3c schedule` report: build, check and simulate one schedule; as a table or a JSON document."""

import json

from tabulate import tabulate

from dsv3c.bounds import MAX_DURATION
from dsv3c.schedules.actions import ScheduleError
from dsv3c.schedules.build import build
from dsv3c.schedules.checks import check
from dsv3c.schedules.published import PUBLISHED, published_activations, published_bubble
from dsv3c.schedules.render import write_svg, write_trace
from dsv3c.schedules.simulate import complete_durations, simulate

DURATION_KEYS = ("F", "B", "I", "W", "F&B")


def parse_durations(text: str | None) -> dict:
    """'F=1,B=2,W=1' (FB is accepted for F&B) as a complete duration dict F, B, I, W, F&B."""
    given = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = "F&B" if key.strip().upper() == "FB" else key.strip().upper()
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not sep or key not in DURATION_KEYS or not 0 <= number <= MAX_DURATION:  # NaN fails too
            raise ScheduleError(f"--durations wants K=seconds pairs with K in F,B,I,W,F&B and seconds a finite "
                                f"number in [0, {MAX_DURATION:g}], got '{item.strip()}'")
        given[key] = number
    full = complete_durations(given)
    if min(full.values()) < 0:
        raise ScheduleError(f"--durations gives a negative duration: {full}")
    return full


def summarize(kind: str, pp: int, micro_batches: int, durations: dict | None = None, comm: float = 0.0,
              trace=None, svg=None) -> dict:  # fmt: skip
    """Build, check and simulate a schedule; write the trace and SVG if asked; return the figures as a dict."""
    schedule = build(kind, pp, micro_batches)
    d = complete_durations(durations)
    checked = check(schedule)
    timeline = simulate(schedule, d, comm=comm)
    if trace:
        write_trace(timeline, trace)
    if svg:
        write_svg(timeline, svg, f"{kind}, pp={pp}, {micro_batches} micro-batches: step {timeline.step:g}")
    row = PUBLISHED[kind]
    return {
        "kind": kind, "pp": pp, "micro_batches": micro_batches, "durations": d, "comm": comm,
        "step": timeline.step, "busy": timeline.busy, "bubble": timeline.bubble,
        "peak_activations": checked["peak_activations"], "lockstep_rounds": checked["rounds"],
        "published": {"bubble": row["bubble"], "bubble_value": published_bubble(kind, pp, d),
                      "activations": row["activations"], "activations_value": published_activations(kind, pp)},
        "actions": [list(rank) for rank in schedule], "trace": str(trace) if trace else None,
        "svg": str(svg) if svg else None,
    }  # fmt: skip


def format_table(summary: dict) -> str:
    """The summary as text: a row per rank (actions, busy, bubble, step, peak activations), then the actions."""
    rows = [[r, len(acts), f"{summary['busy'][r]:g}", f"{summary['bubble'][r]:g}", f"{summary['step']:g}",
             summary["peak_activations"][r]] for r, acts in enumerate(summary["actions"])]  # fmt: skip
    d = ", ".join(f"{k}={v:g}" for k, v in summary["durations"].items())
    p = summary["published"]
    lines = [
        f"{summary['kind']}: pp={summary['pp']}, {summary['micro_batches']} micro-batches; durations {d}; "
        f"comm {summary['comm']:g} per hop",
        tabulate(rows, headers=["rank", "actions", "busy", "bubble", "step", "peak act."], disable_numparse=True),
        f"published: bubble {p['bubble']} = {p['bubble_value']:g} (simulated max {max(summary['bubble']):g}); "
        f"activations {p['activations']} = {p['activations_value']} (max {max(summary['peak_activations'])})",
        "",
    ]
    lines += [f"rank {r}: {' '.join(acts)}" for r, acts in enumerate(summary["actions"])]
    return "\n".join(lines) + "\n"


def format_json(summary: dict) -> str:
    """The summary as a deterministic JSON document."""
    return json.dumps(summary, indent=1, sort_keys=True) + "\n"
