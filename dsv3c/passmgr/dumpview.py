"""`dsv3c inspect`: a dump directory as a table, and diffs between passes or for one layer.

Partial and corrupt dump directories are read as far as they go: unreadable `*.stats.json` files are
reported (see `problems`), and a DumpError (exit 2) is raised only when nothing usable is left.
"""

import os
import re
from pathlib import Path

from tabulate import tabulate

from dsv3c import inputs
from dsv3c.passmgr.dumps import computed_by, layer_lines, unified_diff


class DumpError(ValueError):
    """A dump directory that lacks what was asked for."""


_FIELDS = {"name": str, "seconds": (int, float), "nodes_before": int, "nodes_after": int, "stats": dict}


def _read_stats(path: Path) -> dict:
    """The stats of one pass dump, or a DumpError saying why the file cannot be used."""
    s = inputs.load_json(path, "pass stats", inputs.MAX_DUMP_BYTES, DumpError)
    if not isinstance(s, dict):
        raise DumpError(f"{path.name}: not a JSON object")
    for key, kind in _FIELDS.items():
        if not isinstance(s.get(key), kind) or isinstance(s.get(key), bool):
            raise DumpError(f"{path.name}: missing or malformed '{key}'")
    return s


def scan(directory: Path) -> tuple[list[tuple[str, dict]], list[str]]:
    """(stem, stats) of every readable pass dump in pipeline order, and one problem line per unreadable one."""
    found, problems = [], []
    for p in sorted(directory.glob("*.stats.json")):
        try:
            found.append((p.name[: -len(".stats.json")], _read_stats(p)))
        except DumpError as e:
            problems.append(str(e))
    return found, problems


def _passes(directory: Path) -> list[tuple[str, dict]]:
    """(stem, stats) of every readable pass dumped in directory; DumpError when there is none."""
    found, problems = scan(directory)
    if not found:
        if not problems:
            raise DumpError(f"{directory} holds no pass dumps (*.stats.json)")
        more = "; ..." if len(problems) > 1 else ""
        raise DumpError(f"{directory} holds no usable pass dumps ({problems[0]}{more})")
    return found


def problems(directory: Path) -> list[str]:
    """What inspect cannot read in directory: corrupt stats files, passes without their graph.txt."""
    found, bad = scan(directory)
    return bad + [f"{stem}.graph.txt: missing" for stem, _ in found if not (directory / f"{stem}.graph.txt").is_file()]


def table(directory: Path) -> str:
    """One row per pass: number, name, seconds, nodes before/after, its top counters."""
    rows = []
    for stem, s in _passes(directory):
        counters = ", ".join(f"{k}={v}" for k, v in list(s["stats"].items())[:4] if not isinstance(v, (dict, list)))
        rows.append([stem.split("_", 1)[0], s["name"], f"{s['seconds']:.3f}", s["nodes_before"], s["nodes_after"], counters])
    pipeline = directory / "pipeline.txt"
    head = ""
    try:
        lines = inputs.read_text(pipeline, "pipeline", inputs.MAX_DUMP_BYTES, DumpError).splitlines()
        head = f"pipeline: {lines[0]}\n" if lines else ""
    except DumpError:
        pass  # pipeline.txt is optional: the table stands without its header line
    return head + tabulate(rows, headers=["#", "pass", "seconds", "nodes before", "nodes after", "counters"])


def _stem(directory: Path, key: str) -> str:
    """The dump stem for a pass given by number ('3') or name ('mla_fuse'); the first match."""
    for stem, s in _passes(directory):
        if key == stem.split("_", 1)[0].lstrip("0") or key == stem.split("_", 1)[0] or key == s["name"]:
            return stem
    raise DumpError(f"no pass '{key}' in {directory}")


def _graph(directory: Path, stem: str) -> str:
    """The graph text after one pass; DumpError when it is missing or unreadable."""
    path = directory / f"{stem}.graph.txt"
    if not os.path.lexists(path):
        raise DumpError(f"{path} is missing: the dump of pass {stem} is incomplete")
    return inputs.read_text(path, "pass graph", inputs.MAX_DUMP_BYTES, DumpError)


def layers_in(text: str) -> list[int]:
    """The decoder layer numbers a graph text computes: those it tags its nodes with ('# layers.N') and those
    its blocks compute, sorted."""
    tagged = {int(m) for m in re.findall(r"# layers\.(\d+)$", text, flags=re.M)}
    return sorted(tagged | {int(u.split(".")[1]) for u in computed_by(text) if u.startswith("layers.")})


def diff(directory: Path, a: str, b: str, layer: int | None = None) -> str:
    """The unified diff of the graph after pass a against after pass b, optionally of one layer only."""
    sa, sb = _stem(directory, a), _stem(directory, b)
    ta, tb = _graph(directory, sa), _graph(directory, sb)
    if layer is not None:
        have = sorted(set(layers_in(ta)) | set(layers_in(tb)))
        if layer not in have:
            span = f"{have[0]}..{have[-1]}" if have else "none"
            raise DumpError(f"--layer {layer} is not in the dump (layers {span})")
        name = f"layers.{layer}"
        blocks = {computed_by(t).get(name, name) for t in (ta, tb)} - {name}
        note = "".join(f"# {name} is computed by block {b}: its lines follow\n" for b in sorted(blocks))
        ta = "\n".join(layer_lines(ta, name)) + "\n"
        tb = "\n".join(layer_lines(tb, name)) + "\n"
        return note + (unified_diff(ta, tb, sa, sb) or "(no difference)\n")
    return unified_diff(ta, tb, sa, sb) or "(no difference)\n"
