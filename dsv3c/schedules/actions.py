"""Action strings in torch.distributed.pipelining's notation, the Schedule container, and the stage layout.

A compute action is `{s}F{m}` (forward of stage s, micro-batch m), `{s}B{m}` (full backward), `{s}I{m}`
(input-gradient backward), `{s}W{m}` (weight-gradient backward) or `({s}F{m};{s2}B{m2})OVERLAP_F_B` (a forward
chunk overlapped with a backward chunk). Communication actions are `{s}SEND_F{m}`, `{s}RECV_F{m}`,
`{s}SEND_B{m}`, `{s}RECV_B{m}`, where s is the stage that sends or receives.
"""

import re
from typing import NamedTuple

OVERLAP = "OVERLAP_F_B"
COMPUTE_KINDS = ("F", "B", "I", "W")
COMM_KINDS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
_OP = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)$")


class ScheduleError(ValueError):
    """Bad schedule arguments or a malformed schedule; the message is one line."""


class Op(NamedTuple):
    """One elementary operation: stage, kind (F, B, I, W or a SEND/RECV kind), micro-batch."""

    stage: int
    kind: str
    mb: int

    def __str__(self):
        return f"{self.stage}{self.kind}{self.mb}"


def parse(action: str) -> tuple[Op, ...]:
    """The elementary ops of one action string (two for an OVERLAP_F_B pair, else one)."""
    text = action.strip()
    if text.startswith("(") and text.endswith(")" + OVERLAP):
        parts = text[1 : -len(OVERLAP) - 1].split(";")
        ops = tuple(_parse_op(p) for p in parts)
        if len(ops) != 2 or ops[0].kind != "F" or ops[1].kind not in ("B", "I"):
            raise ScheduleError(f"an {OVERLAP} pair is (F;B), got '{action}'")
        return ops
    return (_parse_op(text),)


def _parse_op(text: str) -> Op:
    """One `{s}{KIND}{m}` string as an Op."""
    match = _OP.match(text.strip())
    if not match:
        raise ScheduleError(f"not an action string: '{text}'")
    return Op(int(match.group(1)), match.group(2), int(match.group(3)))


def overlap(fwd: str, bwd: str) -> str:
    """The action string of a forward chunk overlapped with a backward chunk."""
    return f"({fwd};{bwd}){OVERLAP}"


class Layout(NamedTuple):
    """Where stages live and how they chain: chains[d] lists direction d's stages in forward order."""

    ranks: int
    chains: tuple[tuple[int, ...], ...]
    micro_batches: tuple[int, ...]  # per chain

    def stage_rank(self) -> dict[int, int]:
        """Stage -> rank (the rank whose action list holds it)."""
        return {s: r for r, stages in enumerate(self.rank_stages()) for s in stages}

    def rank_stages(self) -> list[tuple[int, ...]]:
        """Per rank, the stages it holds (1 for single-stage schedules, 2 for the V and bidirectional ones)."""
        n = sum(len(c) for c in self.chains)
        if n == self.ranks:
            return [(r,) for r in range(self.ranks)]
        return [(r, 2 * self.ranks - 1 - r) for r in range(self.ranks)]

    def next_stage(self, stage: int) -> int | None:
        """The stage after stage in its chain, None at the chain's end (where the loss is)."""
        for chain in self.chains:
            if stage in chain:
                i = chain.index(stage)
                return chain[i + 1] if i + 1 < len(chain) else None
        raise ScheduleError(f"stage {stage} is in no chain")

    def prev_stage(self, stage: int) -> int | None:
        """The stage before stage in its chain, None at the chain's start (where micro-batches enter)."""
        for chain in self.chains:
            if stage in chain:
                i = chain.index(stage)
                return chain[i - 1] if i > 0 else None
        raise ScheduleError(f"stage {stage} is in no chain")

    def chain_of(self, stage: int) -> int:
        """The index of the chain (direction) that holds stage."""
        for d, chain in enumerate(self.chains):
            if stage in chain:
                return d
        raise ScheduleError(f"stage {stage} is in no chain")


class Schedule(list):
    """Per rank, its compute action strings in order (a plain list of lists) that also knows its kind and layout."""

    def __init__(self, ranks_actions, kind: str, pp: int, micro_batches: int, layout: Layout):
        super().__init__(ranks_actions)
        self.kind, self.pp, self.micro_batches, self.layout = kind, pp, micro_batches, layout


def layout_of(actions) -> Layout:
    """The layout of a Schedule, or for plain lists one chain over all stages (two stages per rank form a V)."""
    if isinstance(actions, Schedule):
        return actions.layout
    stages, mbs = set(), set()
    for rank in actions:
        for action in rank:
            for op in parse(action):
                stages.add(op.stage)
                mbs.add(op.mb)
    n = max(stages) + 1 if stages else len(actions)
    return Layout(len(actions), (tuple(range(n)),), (max(mbs) + 1 if mbs else 0,))
