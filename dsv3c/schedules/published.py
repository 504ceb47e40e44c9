"""The published bubble and memory table (DeepSeek-V3 report, Table 2) as data.

F: forward chunk, B: full backward chunk, W: weight-gradient backward, F&B: two overlapped chunks, per device.
DualPipeV is DualPipe cut in half: DualPipe's figures on 2·pp devices (a V stage is half a DualPipe stage).

Where the simulator reproduces them exactly (tests/test_schedules.py checks it): `bubble` is the largest
per-rank bubble (step time minus the rank's busy time), for M >= pp (1F1B, ZB1P) or any valid M (DualPipe,
DualPipeV). 1F1B: any F and B, every rank. ZB1P, DualPipe, DualPipeV: F = I = W (so B = 2W) and
B <= F&B <= F + B; with F&B = F + B every rank has the same bubble, with a shorter F&B the ranks that overlap
more pairs idle longer and the largest is the formula. `activations` is the largest per-rank peak of in-flight
stage activations (see dsv3c.schedules.checks), reached on the first rank for 1F1B and ZB1P, on every rank for
DualPipe and DualPipeV.
"""

PUBLISHED = {
    "1f1b": {
        "bubble": "(PP-1)(F+B)",
        "params": 1,
        "activations": "PP",
        "bubble_fn": lambda pp, d: (pp - 1) * (d["F"] + d["B"]),
        "activations_fn": lambda pp: pp,
    },
    "zb1p": {
        "bubble": "(PP-1)(F+B-2W)",
        "params": 1,
        "activations": "PP",
        "bubble_fn": lambda pp, d: (pp - 1) * (d["F"] + d["B"] - 2 * d["W"]),
        "activations_fn": lambda pp: pp,
    },
    "dualpipe": {
        "bubble": "(PP/2-1)(F&B+B-3W)",
        "params": 2,
        "activations": "PP+1",
        "bubble_fn": lambda pp, d: (pp / 2 - 1) * (d["F&B"] + d["B"] - 3 * d["W"]),
        "activations_fn": lambda pp: pp + 1,
    },
    "dualpipev": {  # DualPipe's row at 2·pp devices
        "bubble": "(PP-1)(F&B+B-3W)",
        "params": 2,
        "activations": "2PP+1 (half-size stages)",
        "bubble_fn": lambda pp, d: (pp - 1) * (d["F&B"] + d["B"] - 3 * d["W"]),
        "activations_fn": lambda pp: 2 * pp + 1,
    },
}


def published_bubble(kind: str, pp: int, durations: dict) -> float:
    """The table's bubble for kind on pp devices; durations needs F, B, W and F&B (default F + B)."""
    d = {"F&B": durations["F"] + durations["B"], **durations}
    return float(PUBLISHED[kind]["bubble_fn"](pp, d))


def published_activations(kind: str, pp: int) -> int:
    """The table's peak in-flight activations per device, in stage activations of one micro-batch."""
    return PUBLISHED[kind]["activations_fn"](pp)
