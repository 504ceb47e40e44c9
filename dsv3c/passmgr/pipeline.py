"""The pass pipeline: run named passes with their options on a Plan; verify, time, count and dump after each."""

import sys
import time
from dataclasses import dataclass, field

from dsv3c.ir import Plan
from dsv3c.ops.record import check_complete
from dsv3c.passmgr.dumps import Dumper, graph_text
from dsv3c.passmgr.verify import Propagator, VerificationError, verify


class PipelineError(Exception):
    """A pass failed or broke an invariant; the message names it and how to reproduce it."""


@dataclass
class PassRecord:
    """What one pass run did: time, node counts and the pass's own counters."""

    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    stats: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The plan.json form of the record."""
        return {
            "name": self.name, "options": self.options, "seconds": round(self.seconds, 4),
            "nodes_before": self.nodes_before, "nodes_after": self.nodes_after, "stats": self.stats,
        }  # fmt: skip


@dataclass
class Printing:
    """Which graphs to print to the terminal: after all passes, after named passes, or after changes."""

    after_all: bool = False
    after: tuple = ()
    after_change: bool = False

    def wanted(self, name: str, changed: bool) -> bool:
        """Whether to print the graph after pass `name`."""
        return self.after_all or name in self.after or (self.after_change and changed)


def _items(names) -> list[tuple[str, dict]]:
    """(pass, options) pairs from pass names or pairs."""
    return [(item, {}) if isinstance(item, str) else (item[0], dict(item[1])) for item in names]


def _check_reads(p, plan: Plan) -> None:
    """Raise PipelineError unless the analyses pass p reads have been written."""
    missing = sorted(p.reads - plan.analyses.available())
    if missing:
        raise PipelineError(f"pass '{p.name}' reads {', '.join(missing)}, which no earlier pass wrote")


def run_pipeline(
    plan: Plan,
    names,
    registry: dict,
    legal_ops: frozenset,
    dumper: Dumper | None = None,
    printing: Printing | None = None,
    progress=None,
    repro: str = "",
) -> list[PassRecord]:
    """Run the passes (names or (name, options) pairs) in order on plan; one record per pass, PipelineError on failure."""
    check_complete()
    propagator = Propagator()
    records = []
    legal = frozenset(legal_ops)
    items = _items(names)
    text = graph_text(plan.program) if (dumper or printing) else None
    for index, (name, opts) in enumerate(items, start=1):
        p = registry[name]
        _check_reads(p, plan)
        legal = p.legal_after(legal)
        before = plan.program.node_count()
        if progress:
            progress(index, len(items), name)
        start = time.perf_counter()
        try:
            stats = p.fn(plan, opts)
            verify(plan.program, legal, propagator)
        except Exception as e:
            where = dumper.write_failure(index, name, text or graph_text(plan.program), repro) if dumper else None
            kind = "broke an IR invariant" if isinstance(e, VerificationError) else "failed"
            msg = f"pass '{name}' {kind}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            if where:
                msg += f"; its input graph is in {where}"
            if repro:
                msg += f"; reproduce with: {repro}"
            raise PipelineError(msg) from e
        seconds = time.perf_counter() - start
        record = PassRecord(name, seconds, before, plan.program.node_count(), stats, opts)
        records.append(record)
        if dumper or printing:
            new_text = graph_text(plan.program)
            if dumper:
                dumper.write_pass(index, name, plan.program, new_text, text, record)
            if printing and printing.wanted(name, new_text != text):
                sys.stdout.write(f"// ----- after {index:02d}_{name} -----\n{new_text}\n")
            text = new_text
    return records
