"""Pipelined training steps (dsv3c.runtime.pipelined) against the single-process model, per schedule kind.

All four kinds run in ONE set of two spawned gloo processes (a module fixture): the process start and torch's
imports cost more than the tiny runs. Shapes: the tiny preset with 4 layers (so DualPipeV's 2·pp = 4 stages
each hold one), pp 2, 4 micro-batches of one 8-token sequence, float32. The combined pipeline + expert
parallelism run (ranks 4 = pp 2 x ep 2) uses its own four processes: 1f1b, 2 micro-batches per replica.
"""

import dataclasses
import json

import pytest
import torch

from dsv3c import cli
from dsv3c.runtime import pipelined
from dsv3c.runtime.pipelined import COS_TOL, KINDS, LOSS_TOL, PipelineArgError, make_spec
from model_def import ModelConfig
from tests.test_schedules import DUALPIPE_PP8_M20 as DEEPSEEK_PP8_M20

PP, M = 2, 4


def assert_layout_matches(cfg, plan, seen: list[dict]) -> None:
    """What each rank of a run reports holding equals the plan, field by field: coordinates, the members of its
    EP, dp, edp and pp groups, GPUs per node, the layers of its stages, the logical expert of every slot."""
    from dsv3c.parallel import moe_layer_names

    mesh, p = plan.mesh, plan.placement
    assert sorted(r["rank"] for r in seen) == list(range(mesh.gpus))
    groups = mesh.groups()
    held = set()
    for r in seen:
        for key, value in mesh.rank(r["rank"]).items():
            assert r[key] == value, (key, r)
        for kind in ("ep", "dp", "edp", "pp"):
            assert r["groups"][kind] == next(g for g in groups[kind] if r["rank"] in g), (kind, r)
        assert r["gpus_per_node"] == mesh.gpus_per_node
        if mesh.ep > 1:
            per = mesh.slots_per_ep_rank
            for i, name in enumerate(moe_layer_names(cfg)):
                want = p.local_experts(i, r["ep"]) if p is not None else list(range(r["ep"] * per, (r["ep"] + 1) * per))
                if name in r["slots"]:
                    assert r["slots"][name] == want, (name, r)
                    held.add(name)
        if "stages" in r:
            _, rank_of, block, _ = pipelined.stage_layout(plan.kind, mesh.pp)
            ranges = plan.layer_ranges()
            assert r["stages"] == [[k, *ranges[block[k]]] for k in range(len(rank_of)) if rank_of[k] == r["pp"]], r
    assert mesh.ep == 1 or held == set(moe_layer_names(cfg))


def _cfg():
    return dataclasses.replace(ModelConfig.preset("tiny"), num_hidden_layers=4)


@pytest.fixture(scope="module")
def results():
    specs = [make_spec(_cfg(), kind, PP, M) for kind in KINDS]
    return {r["schedule"]: r for r in pipelined.run_many(specs)}


@pytest.mark.parametrize("kind", KINDS)
def test_kind_matches_single_process(results, kind):
    r = results[kind]
    assert (r["pp"], r["ranks"], r["micro_batches"]) == (PP, PP, M)
    assert r["losses_seen"] == M and not r["grads_missing"]
    assert r["loss_rel_err"] <= LOSS_TOL, r
    assert r["grad_max_cos_diff"] <= COS_TOL, r
    assert r["grad_max_rel_err"] <= 1e-5, r
    assert r["ok"]


def test_schedules_exercise_every_action_kind(results):
    """The lists actually run contain what the executors must handle: I/W on zb1p, OVERLAP_F_B on both dual kinds."""
    flat = {k: " ".join(" ".join(acts) for acts in results[k]["actions"]) for k in KINDS}
    assert "I" in flat["zb1p"] and "W" in flat["zb1p"]
    for k in ("dualpipev", "dualpipe"):
        assert "OVERLAP_F_B" in flat[k] and "W" in flat[k]
    assert results["dualpipe"]["executor"].startswith("chain executor")


def test_p2p_lowering_detects_deadlock():
    # rank 0 waits for stage 1's backward before running its own forward: no order of sends can satisfy it
    with pytest.raises(ValueError, match="deadlock"):
        pipelined.lower_p2p([["0B0", "0F0", "3F0", "3B0"], ["1F0", "1B0", "2F0", "2B0"]], pipelined.schedule_layout("dualpipe", 2, 4))


def test_deepseek_dualpipe_lowers_without_deadlock():
    """DeepSeek's exact schedule (pp 8, M 20) gets its sends and receives, every F/B/I/W once per stage and micro-batch.
    (Run on 8 gloo ranks with an 8-layer tiny model it matches the reference too; too slow for this file.)"""
    acts = [line.split() for line in DEEPSEEK_PP8_M20]
    lowered = pipelined.lower_p2p(acts, pipelined.schedule_layout("dualpipe", 8, 20))
    sends = sum(1 for rank in lowered for item in rank if item[0].startswith("SEND"))
    recvs = sum(1 for rank in lowered for item in rank if item[0].startswith("RECV"))
    assert sends == recvs == 2 * 2 * 7 * 10  # 2 directions x (F and B) x 7 links x 10 micro-batches


def test_compare_catches_a_wrong_gradient():
    import torch

    g = {"w": torch.arange(1.0, 7.0)}
    bad = pipelined._compare(1.0, g, 1.0 + 1e-5, {"w": g["w"] * 1.001})
    assert bad["loss_rel_err"] > LOSS_TOL and bad["grad_max_cos_diff"] > COS_TOL


@pytest.mark.parametrize(
    "kind,pp,m,ranks,msg",
    [("gpipe", 2, 4, None, "unknown schedule"), ("1f1b", 2, 4, 3, "does not divide"),
     ("dualpipe", 3, 6, None, "even pp"), ("dualpipe", 2, 2, None, r"micro-batches >= 2\*pp")],
)  # fmt: skip
def test_bad_combinations(kind, pp, m, ranks, msg):
    with pytest.raises(PipelineArgError, match=msg):
        pipelined.check_args(kind, pp, m, ranks)


def test_cli_json(capsys):
    from dsv3c.cli import main

    rc = main(["run", "--model", "tiny", "--ranks", "2", "--pp", "2", "--schedule", "1f1b", "--micro-batches", "2",
               "--train", "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["schedule"] == "1f1b" and out["pp"] == 2 and out["ranks"] == 2
    assert out["loss_rel_err"] <= LOSS_TOL and out["grad_max_cos_diff"] <= COS_TOL


def test_cli_usage_error(capsys):
    from dsv3c.cli import main

    assert main(["run", "--pp", "2", "--schedule", "dualpipe", "--micro-batches", "2", "--train", "--json"]) == 2
    err = capsys.readouterr().err
    assert "dualpipe" in err and len(err.strip().splitlines()) == 1


OVERLAP_CFG = dataclasses.replace(ModelConfig.preset("tiny"), num_hidden_layers=4, first_k_dense_replace=0)
LINK_DELAY = 0.005  # seconds per EP exchange: a slow link that the other chunk's compute can hide


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    """One set of four processes (pp 2 x dp 2, each stage's two replicas its EP group): 1F1B with EPLB's placement of
    two redundant experts; DualPipeV on an all-MoE model under a LINK_DELAY link, sequential and overlapped."""
    from dsv3c.parallel.build import place_experts

    tiny = ModelConfig.preset("tiny")
    load = torch.rand(3, tiny.n_routed_experts, generator=torch.Generator().manual_seed(0)) * 10
    placement = place_experts(tiny, 2, 4, tiny.n_routed_experts + 2, load).phy2log
    trace = tmp_path_factory.mktemp("trace") / "overlap.trace.json"
    specs = [make_spec(tiny, "1f1b", 2, 2, ranks=4, ep=2, placement=placement),
             make_spec(OVERLAP_CFG, "dualpipev", 2, 8, ranks=4, ep=2, link_delay=LINK_DELAY, trace=trace),
             make_spec(OVERLAP_CFG, "dualpipe", 2, 4, ranks=4, ep=2)]
    return (*pipelined.run_many(specs), placement, trace)


def test_pipeline_with_expert_parallelism_matches_single_process(four_ranks):
    """ranks 4, pp 2, ep 2: every MoE layer (decoder and MTP) holds its EP rank's slots of a placement with redundant
    experts and exchanges tokens with all_to_all over the stage's EP group. Loss and every gradient (experts summed
    over their slots and owners, dense ones averaged over dp) match the reference."""
    r, _, _, placement, _ = four_ranks
    assert (r["pp"], r["dp"], r["ep"], r["ranks"]) == (2, 2, 2, 4)
    assert r["losses_seen"] == 4 and not r["grads_missing"]
    assert r["ep_partitioned_params"] == 3 * 3  # layers 1, 2 and the MTP block: gate/up/down each
    assert r["ep_remote_routes"] > 0  # tokens really crossed ranks
    assert r["loss_rel_err"] <= LOSS_TOL, r
    assert r["grad_max_cos_diff"] <= COS_TOL and r["expert_grad_max_cos_diff"] <= COS_TOL, r
    assert r["ok"]
    for seen in r["layout"]:  # each rank holds its EP rank's slots of the placement, redundant ones included
        for name, slots in seen["slots"].items():
            row = ["layers.1", "layers.2", "mtp.0"].index(name)
            assert slots == placement[row, seen["ep"] * 9 : seen["ep"] * 9 + 9].tolist()


def test_overlapped_dualpipe_equals_sequential_and_hides_communication(four_ranks):
    """DualPipeV's OVERLAP_F_B pairs run with the forward chunk in a thread of its own while the backward chunk runs:
    the same step as running them one after the other (and as one process), with less exposed EP communication."""
    _, r, bidirectional, _, trace = four_ranks
    for one in (r, bidirectional):  # DualPipeV, and DualPipe's two chains
        o = one["overlap"]
        assert one["ok"] and o["orders_agree"] and o["overlapped"]["ok"], one
        assert o["loss_rel_err_between_orders"] <= 1e-6 and o["grad_max_cos_diff_between_orders"] <= 1e-12
    o = r["overlap"]
    assert o["overlapped"]["loss_rel_err"] <= LOSS_TOL and o["overlapped"]["grad_max_cos_diff"] <= COS_TOL
    # the sequential order exposes every delayed exchange; the overlapped one hides a good part of them
    assert o["exposed_ep_comm_seconds"][0] >= 0.9 * o["ep_comm_seconds"][0]
    assert o["exposed_ratio"] < 0.85, o
    # the trace shows it: compute of one thread during the other thread's exchanges, in the overlapped run only
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    spans = [e for e in events if e["ph"] == "X"]
    assert {n.split(":")[0] for n in names.values()} == {"sequential", "overlapped"} and len(names) == 8
    assert {e["cat"] for e in spans} >= {"compute", "comm"}

    def hidden(pid):
        """µs of EP exchanges of one thread during which another thread computes."""
        comm = [e for e in spans if e["pid"] == pid and e["cat"] == "comm"]
        work = [e for e in spans if e["pid"] == pid and e["cat"] == "compute"]
        return sum(max(0.0, min(c["ts"] + c["dur"], w["ts"] + w["dur"]) - max(c["ts"], w["ts"]))
                   for c in comm for w in work if w["tid"] != c["tid"])  # fmt: skip

    for pid, name in names.items():
        assert (hidden(pid) > 0) == name.startswith("overlapped"), name


@pytest.mark.parametrize("ranks,ep,msg", [(4, 4, "ep must divide ranks/pp"), (2, 2, "ep must divide ranks/pp")])
def test_bad_expert_parallel_combinations(ranks, ep, msg):
    with pytest.raises(PipelineArgError, match=msg):
        make_spec(ModelConfig.preset("tiny"), "1f1b", 2, 2, ranks=ranks, ep=ep)


def test_ep_must_divide_the_experts():
    cfg = dataclasses.replace(ModelConfig.preset("tiny"), n_routed_experts=15, n_group=3, topk_group=1)
    with pytest.raises(PipelineArgError, match="does not divide the 15 expert slots"):
        make_spec(cfg, "1f1b", 2, 2, ranks=4, ep=2)


def test_run_plan_executes_the_compiled_layout(tmp_path, capsys):
    """dsv3c run --plan: the compiled plan's EP x PP layout with redundant experts (EPLB's placement) on gloo equals the
    single-process model, in both orders of DualPipeV's F&B pairs, and every rank holds what the plan says."""
    from dsv3c.runtime.launch import load_plan

    out = tmp_path / "plan"
    args = ["compile", "--model", "tiny", "--target", "h800x4", "--mode", "train", "--seq", "16", "--parallel",
            "pp=2,ep=2,redundant=2", "--schedule", "dualpipev", "--micro-batches", "4", "--global-batch", "8",
            "--passes", "dce,mla_fuse,expert_partition,cost,pipeline_partition", "--out", str(out)]
    assert cli.main(args) == 0
    cfg, _, plan, _ = load_plan(out / "plan.json")
    assert (plan.mesh.pp, plan.mesh.ep, plan.mesh.dp, plan.kind, plan.mesh.redundant) == (2, 2, 2, "dualpipev", 2)
    assert plan.placement.redundant(0)  # not the contiguous placement: replicated experts
    capsys.readouterr()
    assert cli.main(["run", "--plan", str(out / "plan.json"), "--train", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["pp"], r["ep"], r["ranks"], r["schedule"], r["micro_batches"]) == (2, 2, 4, "dualpipev", 4)
    assert r["loss_rel_err"] <= 1e-6 and r["grad_max_cos_diff"] <= 1e-12 and r["ok"]
    assert r["ep_remote_routes"] > 0  # tokens really crossed ranks
    o = r["overlap"]
    assert o["orders_agree"] and o["overlapped"]["ok"]
    assert_layout_matches(cfg, plan, r["layout"])
