"""Pictures of a Timeline: a Chrome/Perfetto trace (JSON) and an SVG in the style of DeepSeek's DualPipe figure."""

import json
from pathlib import Path
from xml.sax.saxutils import escape

from dsv3c.schedules.actions import Layout
from dsv3c.schedules.simulate import Timeline

COMPUTE_TID, COMM_TID = 0, 1
# (direction 0, direction 1) fill per kind: forward orange, backward green, input-grad teal, weight-grad blue
COLOURS = {
    "F": ("#f6b26b", "#e69138"),
    "B": ("#93c47d", "#6aa84f"),
    "I": ("#76d7c4", "#45b39d"),
    "W": ("#9fc5e8", "#6fa8dc"),
}
STROKE = ("#555555", "#000000")  # directions differ in outline too: thin grey vs thicker black


def direction(layout: Layout, stage: int) -> int:
    """0 or 1: which chain (bidirectional) or which leg of the V (two stages per rank) stage belongs to."""
    if len(layout.chains) > 1:
        return layout.chain_of(stage)
    return int(sum(len(c) for c in layout.chains) > layout.ranks and stage >= layout.ranks)


def _kind(ops) -> str:
    """The kind shown for an event: F, B, I, W, F&B or a SEND kind."""
    return "F&B" if len(ops) == 2 else ops[0].kind


def trace_events(timeline: Timeline, unit_us: float = 1e6) -> list[dict]:
    """The timeline as Chrome trace events: one process per rank, threads compute and comm, times in µs."""
    events = []
    for rank in range(timeline.layout.ranks):
        events.append({"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        for tid, name in ((COMPUTE_TID, "compute"), (COMM_TID, "comm")):
            events.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid, "args": {"name": name}})
    for tid, tracks in ((COMPUTE_TID, timeline.compute), (COMM_TID, timeline.comm)):
        for rank, track in enumerate(tracks):
            for ev in track:
                args = {"ops": [str(op) for op in ev.ops],
                        "direction": [direction(timeline.layout, op.stage) for op in ev.ops]}  # fmt: skip
                events.append({
                    "ph": "X", "name": ev.label, "cat": _kind(ev.ops), "pid": rank, "tid": tid,
                    "ts": round(ev.start * unit_us, 3), "dur": round((ev.end - ev.start) * unit_us, 3), "args": args,
                })  # fmt: skip
    return events


def write_trace(timeline: Timeline, path, unit_us: float = 1e6) -> Path:
    """Write the timeline as a Chrome/Perfetto trace JSON file (timeline times in seconds unless unit_us says)."""
    path = Path(path)
    doc = {"traceEvents": trace_events(timeline, unit_us), "displayTimeUnit": "ms",
           "otherData": {"kind": timeline.kind, "step": timeline.step}}  # fmt: skip
    path.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n")
    return path


def _box(x, y, w, h, fill, stroke, width) -> str:
    """One SVG rectangle."""
    return (f'<rect x="{x:.2f}" y="{y:.2f}" width="{w:.2f}" height="{h:.2f}" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="{width}"/>')  # fmt: skip


def _text(x, y, text, size=10, anchor="middle") -> str:
    """One SVG text element."""
    return (f'<text x="{x:.2f}" y="{y:.2f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-family="sans-serif">{escape(text)}</text>')  # fmt: skip


def svg(timeline: Timeline, title: str = "") -> str:
    """The timeline as an SVG document: a row per rank, a box per action labelled with its micro-batch."""
    layout = timeline.layout
    left, top, row, gap = 60.0, 30.0, 24.0, 6.0
    scale = max(4.0, min(40.0, 1600.0 / timeline.step)) if timeline.step else 20.0
    width = left + timeline.step * scale + 20
    legend_y = top + layout.ranks * (row + gap) + 10
    height = legend_y + 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}">',
           f'<rect x="0" y="0" width="{width:.0f}" height="{height:.0f}" fill="white"/>',
           _text(left, 18, title or f"{timeline.kind} schedule: step {timeline.step:g}", 13, "start")]  # fmt: skip
    for rank, track in enumerate(timeline.compute):
        y = top + rank * (row + gap)
        out.append(_text(left - 8, y + row * 0.65, f"rank {rank}", 11, "end"))
        for ev in track:
            x, w = left + ev.start * scale, (ev.end - ev.start) * scale
            parts = ev.ops if len(ev.ops) == 2 else ev.ops[:1]
            h = row / len(parts)  # an overlapped pair: forward on top, backward below
            for i, op in enumerate(parts):
                d = direction(layout, op.stage)
                out.append(_box(x, y + i * h, w, h, COLOURS[op.kind][d], STROKE[d], 0.5 + d))
                if w >= 8:
                    out.append(_text(x + w / 2, y + i * h + h * 0.5 + 3.5, str(op.mb), 9 if len(parts) == 2 else 10))
    x = left
    for i, (kind, label) in enumerate((("F", "forward"), ("B", "backward"), ("I", "backward for input"),
                                       ("W", "backward for weights"))):  # fmt: skip
        for d in (0, 1):
            out.append(_box(x, legend_y + d * 18, 14, 12, COLOURS[kind][d], STROKE[d], 0.5 + d))
        out.append(_text(x + 18, legend_y + 10, label, 10, "start"))
        x += 150
    out.append(_box(x, legend_y, 14, 6, COLOURS["F"][0], STROKE[0], 0.5))
    out.append(_box(x, legend_y + 6, 14, 6, COLOURS["B"][1], STROKE[1], 1.5))
    out.append(_text(x + 18, legend_y + 10, "overlapped F&B (forward over backward)", 10, "start"))
    out.append(_text(left, legend_y + 40, "upper swatches: direction 0; lower (darker, bold outline): direction 1; "
                                          "numbers: micro-batch", 10, "start"))  # fmt: skip
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_svg(timeline: Timeline, path, title: str = "") -> Path:
    """Write the timeline as an SVG picture in the style of DeepSeek's DualPipe figure."""
    path = Path(path)
    path.write_text(svg(timeline, title))
    return path
