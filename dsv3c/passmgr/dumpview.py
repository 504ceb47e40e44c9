"""`dsv3c inspect`: a dump directory as a table, and diffs between passes or for one layer."""

import json
from pathlib import Path

from tabulate import tabulate

from dsv3c.passmgr.dumps import layer_lines, unified_diff


class DumpError(ValueError):
    """A dump directory that lacks what was asked for."""


def _passes(directory: Path) -> list[tuple[str, dict]]:
    """(stem, stats) of every pass dumped in directory, in pipeline order."""
    found = [(p.name[: -len(".stats.json")], json.loads(p.read_text())) for p in sorted(directory.glob("*.stats.json"))]
    if not found:
        raise DumpError(f"{directory} holds no pass dumps (*.stats.json)")
    return found


def table(directory: Path) -> str:
    """One row per pass: number, name, seconds, nodes before/after, its top counters."""
    rows = []
    for stem, s in _passes(directory):
        counters = ", ".join(f"{k}={v}" for k, v in list(s["stats"].items())[:4] if not isinstance(v, (dict, list)))
        rows.append([stem.split("_", 1)[0], s["name"], f"{s['seconds']:.3f}", s["nodes_before"], s["nodes_after"], counters])
    pipeline = directory / "pipeline.txt"
    head = f"pipeline: {pipeline.read_text().splitlines()[0]}\n" if pipeline.exists() else ""
    return head + tabulate(rows, headers=["#", "pass", "seconds", "nodes before", "nodes after", "counters"])


def _stem(directory: Path, key: str) -> str:
    """The dump stem for a pass given by number ('3') or name ('mla_fuse'); the first match."""
    for stem, s in _passes(directory):
        if key == stem.split("_", 1)[0].lstrip("0") or key == stem.split("_", 1)[0] or key == s["name"]:
            return stem
    raise DumpError(f"no pass '{key}' in {directory}")


def diff(directory: Path, a: str, b: str, layer: int | None = None) -> str:
    """The unified diff of the graph after pass a against after pass b, optionally of one layer only."""
    sa, sb = _stem(directory, a), _stem(directory, b)
    ta = (directory / f"{sa}.graph.txt").read_text()
    tb = (directory / f"{sb}.graph.txt").read_text()
    if layer is not None:
        ta = "\n".join(layer_lines(ta, f"layers.{layer}")) + "\n"
        tb = "\n".join(layer_lines(tb, f"layers.{layer}")) + "\n"
    return unified_diff(ta, tb, sa, sb) or "(no difference)\n"
