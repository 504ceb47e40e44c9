"""The expert-parallel context the dsv3 EP ops read at run time: process groups, rank, route, how rows move.

The runtime (`dsv3c.runtime.ep_run`, `pipelined`, `speculative`, or any torchrun worker) activates a context
around the program's call (forward and backward); with none active the EP ops run on one rank (EP size 1,
every exchange the identity). Contexts are per thread: the pipelined runtime runs an overlapped forward
chunk and backward chunk in two threads, each with its own context over its own process groups.

`route` is the path a dispatch takes, from the parallel plan: "direct" (one all-to-all over the EP group:
an EP group inside one node, or decode's low-latency kernels, which go straight over IB) or "two-hop"
(train and prefill when the EP group spans nodes, as DeepEP's normal kernels: IB to the GPU with the
sender's local index on each target node over `rail_group`, then NVLink inside that node over `node_group`).

`all_to_all` issues every exchange as an asynchronous collective (`async_op=True`) and waits for it; the
wait blocks only the calling thread. `link_delay` (seconds) models a slower link for measurements: an
exchange completes no earlier than link_delay after it was issued. With a `tracer` each exchange is
recorded as a communication span of the calling thread. `comm` replaces torch.distributed with an
in-process exchange (`dsv3c.ops.ep.LocalExchange`, ranks as threads of one process).

This module imports nothing of dsv3c, so the op vocabulary can read it without an import cycle.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

HOPS = ("ep", "rail", "node")  # the groups an exchange can run over (see the module docstring)


@dataclass
class EPContext:
    """An active EP group: torch.distributed groups, this rank, the EP size, the route (module docstring)."""

    rank: int
    size: int
    group: object = None  # the EP group (None = the default group)
    gpus_per_node: int = 8  # EP ranks r and r' share a node iff r // gpus_per_node == r' // gpus_per_node
    route: str = "direct"
    rail_group: object = None
    node_group: object = None
    observe: bool = False
    link_delay: float = 0.0
    tracer: object = None  # anything with span(name, cat, start, end, args) (dsv3c.runtime.trace.Tracer)
    comm: object = None  # None: torch.distributed; else an in-process exchange with all_to_all(ctx, t, send, recv, hop)
    load: dict = field(default_factory=dict)  # MoE layer index -> routed tokens per logical expert (this rank)
    max_nodes_per_token: int = 0  # the most distinct nodes one of this rank's tokens was sent to
    max_gpus_per_token: int = 0
    sent_rows: dict = field(default_factory=lambda: dict.fromkeys(HOPS, 0))  # observe: dispatched token rows sent
    # to other ranks, per hop
    received_tokens: int = 0  # observe: token rows dispatch delivered here (the receive buffers' sizes)
    token_capacity: int = 0  # observe: the padded rows of the static shapes (ep·T per dispatch)

    def __post_init__(self):
        if self.route not in ("direct", "two-hop"):
            raise ValueError(f"route must be 'direct' or 'two-hop', got {self.route!r}")
        if self.route == "two-hop" and (self.size % self.gpus_per_node or self.size == self.gpus_per_node):
            raise ValueError(f"a two-hop route needs an EP group of whole nodes, more than one: ep {self.size}, "
                             f"{self.gpus_per_node} GPUs per node")

    @property
    def nodes(self) -> int:
        """Nodes the EP group spans."""
        return max(1, self.size // self.gpus_per_node)

    def hop_size(self, hop: str) -> int:
        """Ranks in the group of hop."""
        return {"ep": self.size, "rail": self.nodes, "node": min(self.size, self.gpus_per_node)}[hop]

    def hop_rank(self, hop: str) -> int:
        """This rank's index in the group of hop: its EP rank, its node, its local GPU."""
        return {"ep": self.rank, "rail": self.rank // self.gpus_per_node, "node": self.rank % self.gpus_per_node}[hop]

    def hop_members(self, hop: str) -> list[int]:
        """The EP ranks of this rank's group of hop, in the group's rank order."""
        g = self.gpus_per_node
        if hop == "ep":
            return list(range(self.size))
        if hop == "rail":
            return [n * g + self.rank % g for n in range(self.nodes)]
        return [(self.rank // g) * g + i for i in range(self.hop_size("node"))]

    def all_to_all(self, t: torch.Tensor, send: list[int], recv: list[int], hop: str = "ep",
                   name: str = "all_to_all") -> torch.Tensor:  # fmt: skip
        """t's rows over hop's group: send[p] rows to peer p, recv[p] rows from peer p (peers in hop_members order)."""
        start = time.perf_counter()
        if self.hop_size(hop) == 1:
            out = t.clone()
        elif self.comm is not None:
            out = self.comm.all_to_all(self, t, send, recv, hop)
        else:
            out = _dist_all_to_all(t, send, recv, {"ep": self.group, "rail": self.rail_group,
                                                   "node": self.node_group}[hop])  # fmt: skip
        if self.link_delay:
            time.sleep(max(0.0, start + self.link_delay - time.perf_counter()))
        if self.tracer is not None:
            row_bytes = math.prod(t.shape[1:]) * t.element_size()
            self.tracer.span(f"{name} ({hop})", "comm", start, time.perf_counter(),
                             {"rows_sent": sum(send), "rows_received": sum(recv), "bytes_sent": sum(send) * row_bytes})
        return out


def _dist_all_to_all(t: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """all_to_all_single issued asynchronously and waited for; rows travel as bytes (any dtype, bit-exact)."""
    import torch.distributed as dist

    width = math.prod(t.shape[1:])
    wire = t.contiguous().reshape(t.shape[0], width).view(torch.uint8)
    out = torch.empty((sum(recv), wire.shape[1]), dtype=torch.uint8, device=t.device)
    work = dist.all_to_all_single(out, wire, recv, send, group=group, async_op=True)
    work.wait()
    return out.view(t.dtype).reshape(sum(recv), *t.shape[1:])


_LOCAL = threading.local()


def _stack() -> list:
    if not hasattr(_LOCAL, "stack"):
        _LOCAL.stack = []
    return _LOCAL.stack


def current() -> EPContext | None:
    """This thread's innermost active EP context, or None (single-rank semantics)."""
    stack = _stack()
    return stack[-1] if stack else None


@contextmanager
def active(ctx: EPContext):
    """Run the enclosed code (in this thread) with ctx as the EP context."""
    stack = _stack()
    stack.append(ctx)
    try:
        yield ctx
    finally:
        stack.pop()
