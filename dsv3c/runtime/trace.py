"""A run's trace: compute and communication spans per rank and thread, exposed communication, Chrome/Perfetto JSON.

`Tracer.span(name, cat, start, end, args)` records one span (perf_counter seconds) on the calling thread's
lane ("main", or the thread's name: the pipelined runtime's overlapped forward chunk runs in a thread of
its own). Compute spans cover a whole action (its own waits included); communication spans cover an
exchange from its issue to its completion.

Exposed communication of a rank: the time some EP exchange ("comm") is in flight while no lane computes,
where a lane computes during its compute spans except while it waits for its own exchanges or receives
("p2p", the pipeline's activations and gradients). Overlap hides an exchange
of one lane behind the other lane's compute (and two lanes' exchanges in flight at once count once).

`write_trace(path, runs)` writes the spans of several runs (one per process in the trace, rank by rank) in
the format of `dsv3c.schedules.render.write_trace`: "X" events in µs from the run's first span.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path


class Tracer:
    """Spans of one rank (module docstring)."""

    def __init__(self):
        self.spans: list[dict] = []

    def span(self, name: str, cat: str, start: float, end: float, args: dict | None = None) -> None:
        """Record [start, end] on this thread's lane."""
        thread = threading.current_thread()
        lane = "main" if thread is threading.main_thread() else thread.name
        self.spans.append({"lane": lane, "name": name, "cat": cat, "start": start, "end": end, "args": args or {}})


def _merge(intervals) -> list[tuple[float, float]]:
    """The union of intervals as sorted disjoint intervals."""
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        elif b > a:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _minus(base, cut) -> list[tuple[float, float]]:
    """The parts of the disjoint intervals base outside the disjoint intervals cut."""
    out = []
    for a, b in base:
        pos = a
        for c, d in cut:
            if d <= pos or c >= b:
                continue
            if c > pos:
                out.append((pos, c))
            pos = max(pos, d)
        if pos < b:
            out.append((pos, b))
    return out


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def exposed(spans: list[dict], comm_cat: str = "comm") -> dict:
    """Seconds of communication (summed over the exchanges), of compute, and of communication in flight while no
    lane computes, of one rank."""
    comm = [s for s in spans if s["cat"] == comm_cat]
    busy = []
    for lane in {s["lane"] for s in spans}:  # a lane computes in its compute spans except while it waits
        own = _merge((s["start"], s["end"]) for s in spans if s["lane"] == lane and s["cat"] != "compute")
        work = _merge((s["start"], s["end"]) for s in spans if s["lane"] == lane and s["cat"] == "compute")
        busy += _minus(work, own)
    busy = _merge(busy)
    flight = _merge((s["start"], s["end"]) for s in comm)
    return {"comm_seconds": sum(s["end"] - s["start"] for s in comm), "compute_seconds": _length(busy),
            "exposed_comm_seconds": _length(_minus(flight, busy))}  # fmt: skip


def write_trace(path, runs: dict[str, list[list[dict]]]) -> Path:
    """Write runs ({label: spans per rank}) as one Chrome/Perfetto trace: a process per (run, rank), a thread per lane."""
    events, pid = [], 0
    for label, per_rank in runs.items():
        for rank, spans in enumerate(per_rank):
            t0 = min((s["start"] for s in spans), default=0.0)
            events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                           "args": {"name": f"{label}: rank {rank}"}})  # fmt: skip
            events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
            lanes = sorted({s["lane"] for s in spans}, key=lambda name: (name != "main", name))
            for tid, lane in enumerate(lanes):
                events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": lane}})
            for s in spans:
                events.append({"ph": "X", "name": s["name"], "cat": s["cat"], "pid": pid, "tid": lanes.index(s["lane"]),
                               "ts": round((s["start"] - t0) * 1e6, 3), "dur": round((s["end"] - s["start"]) * 1e6, 3),
                               "args": s["args"]})  # fmt: skip
            pid += 1
    path = Path(path)
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}, separators=(",", ":")) + "\n")
    return path
