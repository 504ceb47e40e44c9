"""The expert-parallel context the dsv3 EP ops read at run time: which process group, which rank.

The runtime (`dsv3c.runtime.ep_run`, or any torchrun worker) activates a context around the program's
call; with none active the EP ops run their single-rank reference semantics (EP size 1). The context
also collects what the routing did (per-layer expert loads, nodes per token) when `observe` is set.
This module imports nothing of dsv3c, so the op vocabulary can read it without an import cycle.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class EPContext:
    """An active EP group: torch.distributed group (None = the default group), this rank, the EP size."""

    rank: int
    size: int
    group: object = None
    gpus_per_node: int = 8  # EP ranks r and r' share a node iff r // gpus_per_node == r' // gpus_per_node
    observe: bool = False
    load: dict = field(default_factory=dict)  # MoE layer index -> routed tokens per logical expert (this rank)
    max_nodes_per_token: int = 0  # the most distinct nodes one of this rank's tokens was sent to
    max_gpus_per_token: int = 0


_CURRENT: list[EPContext] = []


def current() -> EPContext | None:
    """The innermost active EP context, or None (single-rank semantics)."""
    return _CURRENT[-1] if _CURRENT else None


@contextmanager
def active(ctx: EPContext):
    """Run the enclosed code with ctx as the EP context."""
    _CURRENT.append(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.pop()
