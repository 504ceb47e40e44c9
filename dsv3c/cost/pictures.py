"""memory_time.svg: memory per pipeline rank (stacked by kind, against capacity) beside a scatter of step time vs
peak memory for the searched layouts. Plain SVG strings, no extra dependencies."""

from __future__ import annotations

from xml.sax.saxutils import escape

PARTS = (("weights", "#6fa8dc"), ("gradients", "#93c47d"), ("master_weights", "#b4a7d6"), ("optimizer", "#8e7cc3"),
         ("activations", "#f6b26b"), ("fp8_cache", "#e69138"), ("comm_buffers", "#c27ba0"), ("workspace", "#999999"))
GB = 1e9


def _t(x, y, s, size=11, anchor="start", weight="normal"):
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-family="sans-serif" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}">{escape(str(s))}</text>')


def memory_time_svg(memory: dict, candidates: list[dict], chosen: str = "", title: str = "") -> str:
    """The picture: memory is {"capacity", "ranks": [...]}; candidates are [{"label", "step_seconds", "peak_gb"}]."""
    w, h = 1100, 460
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">',
           '<rect width="100%" height="100%" fill="white"/>', _t(20, 24, title or "memory per GPU and step time", 15,
                                                                  weight="bold")]
    # left: stacked bars per rank
    x0, y0, pw, ph = 60, 60, 560, 320
    cap = memory["capacity"]
    ranks = memory["ranks"]
    top = max([cap] + [r["total"] for r in ranks]) * 1.05
    out.append(_t(x0, y0 - 12, f"memory per pipeline rank (GB); capacity {cap / GB:.1f} GB", 12))
    bw = pw / max(1, len(ranks))
    for i, r in enumerate(ranks):
        y = y0 + ph
        for key, colour in PARTS:
            v = r.get(key, 0)
            hh = ph * v / top
            y -= hh
            out.append(f'<rect x="{x0 + i * bw + 1:.1f}" y="{y:.1f}" width="{max(1.0, bw - 2):.1f}" height="{hh:.1f}" '
                       f'fill="{colour}"><title>rank {i} {key}: {v / GB:.2f} GB</title></rect>')
        if not r.get("fits", True):
            out.append(_t(x0 + (i + 0.5) * bw, y - 3, "!", 12, "middle", "bold"))
        if len(ranks) <= 32 or i % 4 == 0:
            out.append(_t(x0 + (i + 0.5) * bw, y0 + ph + 14, i, 9, "middle"))
    cy = y0 + ph - ph * cap / top
    out.append(f'<line x1="{x0}" y1="{cy:.1f}" x2="{x0 + pw}" y2="{cy:.1f}" stroke="red" stroke-dasharray="5,3"/>')
    out.append(_t(x0 + pw, cy - 4, "capacity", 10, "end"))
    for g in range(0, int(top / GB) + 1, 20):
        yy = y0 + ph - ph * g * GB / top
        out.append(f'<line x1="{x0 - 4}" y1="{yy:.1f}" x2="{x0}" y2="{yy:.1f}" stroke="black"/>')
        out.append(_t(x0 - 6, yy + 4, g, 9, "end"))
    out.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
    out.append(_t(x0 + pw / 2, y0 + ph + 30, "pipeline rank", 11, "middle"))
    for j, (key, colour) in enumerate(PARTS):
        lx = x0 + (j % 4) * 140
        ly = y0 + ph + 48 + (j // 4) * 16
        out.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{colour}"/>')
        out.append(_t(lx + 14, ly, key, 10))
    # right: step time vs peak memory
    sx, sy, sw, sh = 700, 60, 360, 320
    out.append(_t(sx, sy - 12, "layouts: step time (s) vs peak memory per GPU (GB)", 12))
    out.append(f'<rect x="{sx}" y="{sy}" width="{sw}" height="{sh}" fill="none" stroke="black"/>')
    if candidates:
        ts = [c["step_seconds"] for c in candidates]
        ms = [c["peak_gb"] for c in candidates] + [cap / GB]
        tlo, thi = min(ts) * 0.95, max(ts) * 1.05
        mlo, mhi = min(ms) * 0.9, max(ms) * 1.05
        px = lambda m: sx + sw * (m - mlo) / (mhi - mlo or 1)  # noqa: E731
        py = lambda t: sy + sh - sh * (t - tlo) / (thi - tlo or 1)  # noqa: E731
        out.append(f'<line x1="{px(cap / GB):.1f}" y1="{sy}" x2="{px(cap / GB):.1f}" y2="{sy + sh}" stroke="red" '
                   'stroke-dasharray="5,3"/>')
        for c in candidates:
            best = c["label"] == chosen
            out.append(f'<circle cx="{px(c["peak_gb"]):.1f}" cy="{py(c["step_seconds"]):.1f}" r="{6 if best else 4}" '
                       f'fill="{"#cc0000" if best else "#3d85c6"}" fill-opacity="0.7"><title>{escape(c["label"])}: '
                       f'{c["step_seconds"]:.2f} s, {c["peak_gb"]:.1f} GB</title></circle>')
            if best:
                out.append(_t(px(c["peak_gb"]) + 8, py(c["step_seconds"]) - 6, c["label"], 10))
        for v, lab in ((tlo, f"{tlo:.1f}"), (thi, f"{thi:.1f}")):
            out.append(_t(sx - 4, py(v) + 4, lab, 9, "end"))
        for v in (mlo, mhi):
            out.append(_t(px(v), sy + sh + 14, f"{v:.0f}", 9, "middle"))
    out.append(_t(sx + sw / 2, sy + sh + 30, "peak memory per GPU (GB)", 11, "middle"))
    out.append("</svg>")
    return "\n".join(out) + "\n"
