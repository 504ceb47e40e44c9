"""The pass pipeline: run named passes in order; verify, time, count and (if asked) dump after each."""

import sys
import time
from dataclasses import dataclass, field

from dsv3c.passmgr.dumps import Dumper, graph_text
from dsv3c.ir import PassContext, Program
from dsv3c.passmgr.verify import Propagator, VerificationError, verify


class PipelineError(Exception):
    """A pass failed or broke an invariant; the message names it and how to reproduce it."""


class UnknownPassError(ValueError):
    """A pipeline string names a pass that does not exist."""


@dataclass
class PassRecord:
    """What one pass run did: time, node counts and the pass's own counters."""

    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    stats: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The plan.json form of the record."""
        return {
            "name": self.name, "seconds": round(self.seconds, 4), "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after, "stats": self.stats,
        }  # fmt: skip


def parse_pipeline(text: str, registry: dict) -> list[str]:
    """The pass names of a pipeline string 'a,b,c', each checked against the registry."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UnknownPassError("the pass list is empty")
    for name in names:
        if name not in registry:
            raise UnknownPassError(f"unknown pass '{name}' (known: {', '.join(sorted(registry))})")
    return names


@dataclass
class Printing:
    """Which graphs to print to the terminal: after all passes, after named passes, or after changes."""

    after_all: bool = False
    after: tuple = ()
    after_change: bool = False

    def wanted(self, name: str, changed: bool) -> bool:
        """Whether to print the graph after pass `name`."""
        return self.after_all or name in self.after or (self.after_change and changed)


def run_pipeline(
    program: Program,
    names: list[str],
    ctx: PassContext,
    registry: dict,
    legal_ops: frozenset,
    dumper: Dumper | None = None,
    printing: Printing | None = None,
    progress=None,
    repro: str = "",
) -> list[PassRecord]:
    """Run the passes in order on program; returns one record per pass, raises PipelineError on failure."""
    propagator = Propagator()
    records = []
    legal = frozenset(legal_ops)
    text = graph_text(program) if (dumper or printing) else None
    for index, name in enumerate(names, start=1):
        p = registry[name]
        legal = p.legal_after(legal)
        before = len(program.graph.nodes)
        if progress:
            progress(index, len(names), name)
        start = time.perf_counter()
        try:
            program, stats = p.fn(program, ctx)
            verify(program, legal, propagator)
        except Exception as e:
            where = dumper.write_failure(index, name, text or graph_text(program), repro) if dumper else None
            kind = "broke an IR invariant" if isinstance(e, VerificationError) else "failed"
            msg = f"pass '{name}' {kind}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            if where:
                msg += f"; its input graph is in {where}"
            if repro:
                msg += f"; reproduce with: {repro}"
            raise PipelineError(msg) from e
        seconds = time.perf_counter() - start
        record = PassRecord(name, seconds, before, len(program.graph.nodes), stats)
        records.append(record)
        if dumper or printing:
            new_text = graph_text(program)
            if dumper:
                dumper.write_pass(index, name, program, new_text, text, record)
            if printing and printing.wanted(name, new_text != text):
                sys.stdout.write(f"// ----- after {index:02d}_{name} -----\n{new_text}\n")
            text = new_text
    return records
