"""Pipeline schedules: DeepSeek's DualPipe exactly, torch's DualPipeV order, checks, simulator, pictures, CLI."""

import json
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsv3c.cli import main
from dsv3c.schedules import ScheduleError, build, parse
from dsv3c.schedules.checks import check, check_order, counts, peak_activations, run_lockstep, with_comms
from dsv3c.schedules.published import published_activations, published_bubble
from dsv3c.schedules.render import write_svg, write_trace
from dsv3c.schedules.simulate import UNIT_DURATIONS, simulate

# DeepSeek's DualPipe for pp = 8, 20 micro-batches (the DeepSeek-V3 report's Figure 5), in torch's action notation;
# stages 8..15 are the second direction (stage 8+s holds stage s's layers and lives on rank 7-s).
DUALPIPE_PP8_M20 = [
    "0F0 0F1 0F2 0F3 0F4 0F5 0F6 15F0 15I0 15W0 15F1 15I1 15W1 15F2 15I2 15W2 15F3 (0F7;15B3)OVERLAP_F_B (15F4;0B0)OVERLAP_F_B (0F8;15B4)OVERLAP_F_B (15F5;0B1)OVERLAP_F_B (0F9;15B5)OVERLAP_F_B (15F6;0B2)OVERLAP_F_B 15B6 (15F7;0B3)OVERLAP_F_B 15B7 (15F8;0B4)OVERLAP_F_B 15B8 (15F9;0B5)OVERLAP_F_B 15B9 0I6 0W6 0I7 0W7 0I8 0W8 0I9 0W9",
    "1F0 1F1 1F2 1F3 1F4 14F0 1F5 14F1 14I0 14W0 14F2 14I1 14W1 14F3 (1F6;14B2)OVERLAP_F_B (14F4;1B0)OVERLAP_F_B (1F7;14B3)OVERLAP_F_B (14F5;1B1)OVERLAP_F_B (1F8;14B4)OVERLAP_F_B (14F6;1B2)OVERLAP_F_B (1F9;14B5)OVERLAP_F_B (14F7;1B3)OVERLAP_F_B 14B6 (14F8;1B4)OVERLAP_F_B 14B7 (14F9;1B5)OVERLAP_F_B 14B8 1B6 14I9 1I7 14W9 1I8 1W7 1I9 1W8 1W9",
    "2F0 2F1 2F2 13F0 2F3 13F1 2F4 13F2 13I0 13W0 13F3 (2F5;13B1)OVERLAP_F_B (13F4;2B0)OVERLAP_F_B (2F6;13B2)OVERLAP_F_B (13F5;2B1)OVERLAP_F_B (2F7;13B3)OVERLAP_F_B (13F6;2B2)OVERLAP_F_B (2F8;13B4)OVERLAP_F_B (13F7;2B3)OVERLAP_F_B (2F9;13B5)OVERLAP_F_B (13F8;2B4)OVERLAP_F_B 13B6 (13F9;2B5)OVERLAP_F_B 13B7 2B6 13B8 2I7 13I9 2I8 2W7 2I9 13W9 2W8 2W9",
    "3F0 12F0 3F1 12F1 3F2 12F2 3F3 12F3 3F4 12B0 (12F4;3B0)OVERLAP_F_B (3F5;12B1)OVERLAP_F_B (12F5;3B1)OVERLAP_F_B (3F6;12B2)OVERLAP_F_B (12F6;3B2)OVERLAP_F_B (3F7;12B3)OVERLAP_F_B (12F7;3B3)OVERLAP_F_B (3F8;12B4)OVERLAP_F_B (12F8;3B4)OVERLAP_F_B (3F9;12B5)OVERLAP_F_B (12F9;3B5)OVERLAP_F_B 12B6 3B6 12B7 3B7 12I8 3I8 12I9 3I9 12W8 3W8 12W9 3W9",
    "11F0 4F0 11F1 4F1 11F2 4F2 11F3 4F3 11F4 4B0 (4F4;11B0)OVERLAP_F_B (11F5;4B1)OVERLAP_F_B (4F5;11B1)OVERLAP_F_B (11F6;4B2)OVERLAP_F_B (4F6;11B2)OVERLAP_F_B (11F7;4B3)OVERLAP_F_B (4F7;11B3)OVERLAP_F_B (11F8;4B4)OVERLAP_F_B (4F8;11B4)OVERLAP_F_B (11F9;4B5)OVERLAP_F_B (4F9;11B5)OVERLAP_F_B 4B6 11B6 4B7 11B7 4I8 11I8 4I9 11I9 4W8 11W8 4W9 11W9",
    "10F0 10F1 10F2 5F0 10F3 5F1 10F4 5F2 5I0 5W0 5F3 (10F5;5B1)OVERLAP_F_B (5F4;10B0)OVERLAP_F_B (10F6;5B2)OVERLAP_F_B (5F5;10B1)OVERLAP_F_B (10F7;5B3)OVERLAP_F_B (5F6;10B2)OVERLAP_F_B (10F8;5B4)OVERLAP_F_B (5F7;10B3)OVERLAP_F_B (10F9;5B5)OVERLAP_F_B (5F8;10B4)OVERLAP_F_B 5B6 (5F9;10B5)OVERLAP_F_B 5B7 10B6 5B8 10I7 5I9 10I8 10W7 10I9 5W9 10W8 10W9",
    "9F0 9F1 9F2 9F3 9F4 6F0 9F5 6F1 6I0 6W0 6F2 6I1 6W1 6F3 (9F6;6B2)OVERLAP_F_B (6F4;9B0)OVERLAP_F_B (9F7;6B3)OVERLAP_F_B (6F5;9B1)OVERLAP_F_B (9F8;6B4)OVERLAP_F_B (6F6;9B2)OVERLAP_F_B (9F9;6B5)OVERLAP_F_B (6F7;9B3)OVERLAP_F_B 6B6 (6F8;9B4)OVERLAP_F_B 6B7 (6F9;9B5)OVERLAP_F_B 6B8 9B6 6I9 9I7 6W9 9I8 9W7 9I9 9W8 9W9",
    "8F0 8F1 8F2 8F3 8F4 8F5 8F6 7F0 7I0 7W0 7F1 7I1 7W1 7F2 7I2 7W2 7F3 (8F7;7B3)OVERLAP_F_B (7F4;8B0)OVERLAP_F_B (8F8;7B4)OVERLAP_F_B (7F5;8B1)OVERLAP_F_B (8F9;7B5)OVERLAP_F_B (7F6;8B2)OVERLAP_F_B 7B6 (7F7;8B3)OVERLAP_F_B 7B7 (7F8;8B4)OVERLAP_F_B 7B8 (7F9;8B5)OVERLAP_F_B 7B9 8I6 8W6 8I7 8W7 8I8 8W8 8I9 8W9",
]


def test_dualpipe_is_deepseeks_schedule():
    assert build("dualpipe", 8, 20) == [rank.split() for rank in DUALPIPE_PP8_M20]


def _torch_dualpipev(pp: int, m: int) -> list[list[str]]:
    """torch's ScheduleDualPipeV order without a process group: its per-rank generator only reads these two."""
    from torch.distributed.pipelining.schedules import ScheduleDualPipeV

    sched = object.__new__(ScheduleDualPipeV)
    sched.pp_group_size, sched._n_microbatches = pp, m
    return [[str(a) for a in sched._calculate_single_rank_operations(r)] for r in range(pp)]


@pytest.mark.parametrize("pp,m", [(1, 2), (2, 4), (2, 7), (3, 6), (4, 8), (4, 13), (8, 16), (8, 21)])
def test_dualpipev_is_torchs_order(pp, m):
    assert build("dualpipev", pp, m) == _torch_dualpipev(pp, m)


@pytest.mark.parametrize("kind,pp,m,message", [
    ("gpipe", 4, 8, "unknown schedule kind"), ("1f1b", 0, 8, "pp must be"), ("zb1p", 2, 0, "micro-batches must"),
    ("dualpipe", 3, 12, "even pp"), ("dualpipe", 4, 9, "even number"), ("dualpipe", 4, 6, r">= 2\*pp"),
    ("dualpipev", 4, 7, r">= 2\*pp"),
])  # fmt: skip
def test_bad_arguments(kind, pp, m, message):
    with pytest.raises(ScheduleError, match=message) as info:
        build(kind, pp, m)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)


@st.composite
def configs(draw):
    """A kind with a pp and micro-batch count it accepts, M >= pp so that the published figures apply."""
    kind = draw(st.sampled_from(["1f1b", "zb1p", "dualpipev", "dualpipe"]))
    if kind == "dualpipe":
        pp = 2 * draw(st.integers(1, 6))
        return kind, pp, 2 * draw(st.integers(pp, pp + 5))
    pp = draw(st.integers(1, 10))
    low = 2 * pp if kind == "dualpipev" else pp
    return kind, pp, draw(st.integers(low, low + 9))


@given(configs())
def test_every_schedule_runs_and_matches_the_table(config):
    kind, pp, m = config
    sched = build(kind, pp, m)
    assert len(sched) == pp
    result = check(sched)  # order, counts, lock-step run with sends and receives
    assert result["rounds"] >= max(len(r) for r in sched)
    per_rank = counts(sched)
    forwards = {"1f1b": m, "zb1p": m, "dualpipev": 2 * m, "dualpipe": m}[kind]  # dualpipe: 2 stages x m/2
    for c in per_rank:
        assert c["F"] == forwards
        assert c["B"] + c["I"] == c["F"] and c["W"] == c["I"]
        if kind == "1f1b":
            assert c["I"] == c["W"] == c["F&B"] == 0
        if kind == "zb1p":
            assert c["B"] == c["F&B"] == 0
    peaks = result["peak_activations"]
    assert max(peaks) == published_activations(kind, pp)
    if kind in ("1f1b", "zb1p"):
        assert peaks[0] == pp  # the first rank holds the most
    else:
        assert set(peaks) == {published_activations(kind, pp)}  # every rank holds PP+1 (2PP+1 half stages for V)
    timeline = simulate(sched)  # unit durations: F=1, B=2, I=1, W=1, F&B=F+B
    assert timeline.step == max(r[-1].end for r in timeline.compute)
    assert timeline.bubble == pytest.approx([published_bubble(kind, pp, UNIT_DURATIONS)] * pp)


@given(configs(), st.sampled_from([0.5, 1.0, 2.0]), st.floats(0.0, 1.0))
def test_simulated_bubble_is_the_formula_for_equal_chunks(config, t, overlap):
    """With F = I = W (B = 2W) and B <= F&B <= F+B the largest per-rank bubble is the published one."""
    kind, pp, m = config
    d = {"F": t, "B": 2 * t, "I": t, "W": t, "F&B": 2 * t + overlap * t}
    timeline = simulate(build(kind, pp, m), d)
    assert max(timeline.bubble) == pytest.approx(published_bubble(kind, pp, d))
    assert all(b >= -1e-9 for b in timeline.bubble)


@given(st.integers(1, 8), st.integers(0, 8), st.floats(0.1, 3.0), st.floats(0.1, 3.0))
def test_1f1b_bubble_any_durations(pp, extra, f, b):
    timeline = simulate(build("1f1b", pp, pp + extra), {"F": f, "B": b})
    assert timeline.bubble == pytest.approx([(pp - 1) * (f + b)] * pp)


@pytest.mark.parametrize("kind,m", [("1f1b", 5), ("zb1p", 5), ("dualpipev", 3)])
def test_one_rank_step_is_the_sum_of_its_compute(kind, m):
    d = {"F": 1.5, "B": 2.5, "I": 1.0, "W": 1.5, "F&B": 3.0}
    timeline = simulate(build(kind, 1, m), d, comm=7.0)  # no hop crosses ranks, so comm costs nothing
    total = sum(e.end - e.start for e in timeline.compute[0])
    assert timeline.step == pytest.approx(total) and timeline.bubble == pytest.approx([0.0])
    assert timeline.comm == [[]]


def test_comm_delays_the_step():
    base, slow = (simulate(build("dualpipe", 4, 8), comm=c) for c in (0.0, 0.25))
    assert slow.step > base.step and slow.busy == base.busy
    assert all(e.label.split("SEND_")[0].isdigit() for track in slow.comm for e in track)


def test_a_crossed_order_deadlocks():
    crossed = [["0F0", "0B0", "0F1", "0B1"], ["1F1", "1B1", "1F0", "1B0"]]
    check_order(crossed)  # each stage's own order is fine
    with pytest.raises(ScheduleError, match="deadlock"):
        run_lockstep(crossed)
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(crossed)


@pytest.mark.parametrize("bad,message", [
    ([["0F0", "0F1", "0B0"], ["1F0", "1B0", "1F1", "1B1"]], "stage 0 micro-batch 1"),
    ([["0F0", "0I0", "0B1", "0F1"], ["1F0", "1B0", "1F1", "1B1"]], "stage 0 micro-batch"),
    ([["0F0", "1F0"], []], "holds"),
])  # fmt: skip
def test_check_order_rejects(bad, message):
    with pytest.raises(ScheduleError, match=message):
        check_order(bad)


def test_sends_and_receives():
    program = with_comms(build("1f1b", 2, 2))
    assert program[0] == ["0F0", "0SEND_F0", "0F1", "0SEND_F1", "0RECV_B0", "0B0", "0RECV_B1", "0B1"]
    assert program[1] == ["1RECV_F0", "1F0", "1B0", "1SEND_B0", "1RECV_F1", "1F1", "1B1", "1SEND_B1"]
    v = with_comms(build("dualpipev", 1, 2))  # both stages on one rank: nothing to send
    assert not any("SEND" in a or "RECV" in a for a in v[0])


def test_parse():
    assert [str(op) for op in parse("(0F7;15B3)OVERLAP_F_B")] == ["0F7", "15B3"]
    with pytest.raises(ScheduleError):
        parse("0X1")
    assert peak_activations([["0F0", "(0F1;0B0)OVERLAP_F_B", "0B1"]]) == [2]


def test_trace_and_svg(tmp_path):
    timeline = simulate(build("dualpipe", 4, 8), comm=0.1)
    a, b = write_trace(timeline, tmp_path / "a.json"), write_trace(timeline, tmp_path / "b.json")
    assert a.read_bytes() == b.read_bytes()
    events = json.loads(a.read_text())["traceEvents"]
    names = {(e["pid"], e["tid"], e["name"]): e["args"]["name"] for e in events if e["ph"] == "M" and "name" in e["args"]}
    for r in range(4):
        assert names[(r, 0, "process_name")] == f"rank {r}"
        assert names[(r, 0, "thread_name")] == "compute" and names[(r, 1, "thread_name")] == "comm"
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == set(range(4)) and {e["tid"] for e in spans} == {0, 1}
    assert sum(e["tid"] == 0 for e in spans) == sum(len(r) for r in build("dualpipe", 4, 8))
    assert max(e["ts"] + e["dur"] for e in spans if e["tid"] == 0) == pytest.approx(timeline.step * 1e6)
    svg = write_svg(timeline, tmp_path / "s.svg")
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    assert len(root.findall("{http://www.w3.org/2000/svg}rect")) > sum(len(r) for r in timeline.compute)


def test_cli_schedule(capsys, tmp_path):
    assert main(["schedule", "--kind", "dualpipe", "--pp", "4", "--micro-batches", "8",
                 "--trace", str(tmp_path / "t.json"), "--svg", str(tmp_path / "t.svg")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "bubble" in out and "rank 3: " in out and "(PP/2-1)(F&B+B-3W) = 2" in out
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    ET.parse(tmp_path / "t.svg")
    assert main(["schedule", "--kind", "zb1p", "--pp", "4", "--micro-batches", "8", "--json",
                 "--durations", "F=1,B=3,W=1"]) == 0  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    assert doc["durations"]["I"] == 2 and doc["step"] > 0 and len(doc["actions"]) == 4


@pytest.mark.parametrize("argv", [
    ["--kind", "dualpipe", "--pp", "3", "--micro-batches", "12"], ["--kind", "nope", "--pp", "2", "--micro-batches", "4"],
    ["--kind", "1f1b", "--pp", "0", "--micro-batches", "4"], ["--kind", "1f1b", "--pp", "2", "--micro-batches", "4",
    "--durations", "F=x"],
])  # fmt: skip
def test_cli_schedule_bad_input(capsys, argv):
    assert main(["schedule", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv3c: error: ") and err.count("\n") == 1
