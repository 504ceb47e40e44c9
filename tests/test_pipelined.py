"""Pipelined training steps (dsv3c.runtime.pipelined) against the single-process model, per schedule kind.

All four kinds run in ONE set of two spawned gloo processes (a module fixture): the process start and torch's
imports cost more than the tiny runs. Shapes: the tiny preset with 4 layers (so DualPipeV's 2·pp = 4 stages
each hold one), pp 2, 4 micro-batches of one 8-token sequence, float32. The combined pipeline + expert
parallelism run (ranks 4 = pp 2 x ep 2) uses its own four processes: 1f1b, 2 micro-batches per replica.
"""

import dataclasses
import json

import pytest

from dsv3c.runtime import pipelined
from dsv3c.runtime.pipelined import COS_TOL, KINDS, LOSS_TOL, PipelineArgError, make_spec
from model_def import ModelConfig

PP, M = 2, 4

DEEPSEEK_PP8_M20 = [  # issue 10: DeepSeek's DualPipe for the report's Figure 5 (pp 8, 20 micro-batches)
    "0F0 0F1 0F2 0F3 0F4 0F5 0F6 15F0 15I0 15W0 15F1 15I1 15W1 15F2 15I2 15W2 15F3 (0F7;15B3)OVERLAP_F_B (15F4;0B0)OVERLAP_F_B (0F8;15B4)OVERLAP_F_B (15F5;0B1)OVERLAP_F_B (0F9;15B5)OVERLAP_F_B (15F6;0B2)OVERLAP_F_B 15B6 (15F7;0B3)OVERLAP_F_B 15B7 (15F8;0B4)OVERLAP_F_B 15B8 (15F9;0B5)OVERLAP_F_B 15B9 0I6 0W6 0I7 0W7 0I8 0W8 0I9 0W9",
    "1F0 1F1 1F2 1F3 1F4 14F0 1F5 14F1 14I0 14W0 14F2 14I1 14W1 14F3 (1F6;14B2)OVERLAP_F_B (14F4;1B0)OVERLAP_F_B (1F7;14B3)OVERLAP_F_B (14F5;1B1)OVERLAP_F_B (1F8;14B4)OVERLAP_F_B (14F6;1B2)OVERLAP_F_B (1F9;14B5)OVERLAP_F_B (14F7;1B3)OVERLAP_F_B 14B6 (14F8;1B4)OVERLAP_F_B 14B7 (14F9;1B5)OVERLAP_F_B 14B8 1B6 14I9 1I7 14W9 1I8 1W7 1I9 1W8 1W9",
    "2F0 2F1 2F2 13F0 2F3 13F1 2F4 13F2 13I0 13W0 13F3 (2F5;13B1)OVERLAP_F_B (13F4;2B0)OVERLAP_F_B (2F6;13B2)OVERLAP_F_B (13F5;2B1)OVERLAP_F_B (2F7;13B3)OVERLAP_F_B (13F6;2B2)OVERLAP_F_B (2F8;13B4)OVERLAP_F_B (13F7;2B3)OVERLAP_F_B (2F9;13B5)OVERLAP_F_B (13F8;2B4)OVERLAP_F_B 13B6 (13F9;2B5)OVERLAP_F_B 13B7 2B6 13B8 2I7 13I9 2I8 2W7 2I9 13W9 2W8 2W9",
    "3F0 12F0 3F1 12F1 3F2 12F2 3F3 12F3 3F4 12B0 (12F4;3B0)OVERLAP_F_B (3F5;12B1)OVERLAP_F_B (12F5;3B1)OVERLAP_F_B (3F6;12B2)OVERLAP_F_B (12F6;3B2)OVERLAP_F_B (3F7;12B3)OVERLAP_F_B (12F7;3B3)OVERLAP_F_B (3F8;12B4)OVERLAP_F_B (12F8;3B4)OVERLAP_F_B (3F9;12B5)OVERLAP_F_B (12F9;3B5)OVERLAP_F_B 12B6 3B6 12B7 3B7 12I8 3I8 12I9 3I9 12W8 3W8 12W9 3W9",
    "11F0 4F0 11F1 4F1 11F2 4F2 11F3 4F3 11F4 4B0 (4F4;11B0)OVERLAP_F_B (11F5;4B1)OVERLAP_F_B (4F5;11B1)OVERLAP_F_B (11F6;4B2)OVERLAP_F_B (4F6;11B2)OVERLAP_F_B (11F7;4B3)OVERLAP_F_B (4F7;11B3)OVERLAP_F_B (11F8;4B4)OVERLAP_F_B (4F8;11B4)OVERLAP_F_B (11F9;4B5)OVERLAP_F_B (4F9;11B5)OVERLAP_F_B 4B6 11B6 4B7 11B7 4I8 11I8 4I9 11I9 4W8 11W8 4W9 11W9",
    "10F0 10F1 10F2 5F0 10F3 5F1 10F4 5F2 5I0 5W0 5F3 (10F5;5B1)OVERLAP_F_B (5F4;10B0)OVERLAP_F_B (10F6;5B2)OVERLAP_F_B (5F5;10B1)OVERLAP_F_B (10F7;5B3)OVERLAP_F_B (5F6;10B2)OVERLAP_F_B (10F8;5B4)OVERLAP_F_B (5F7;10B3)OVERLAP_F_B (10F9;5B5)OVERLAP_F_B (5F8;10B4)OVERLAP_F_B 5B6 (5F9;10B5)OVERLAP_F_B 5B7 10B6 5B8 10I7 5I9 10I8 10W7 10I9 5W9 10W8 10W9",
    "9F0 9F1 9F2 9F3 9F4 6F0 9F5 6F1 6I0 6W0 6F2 6I1 6W1 6F3 (9F6;6B2)OVERLAP_F_B (6F4;9B0)OVERLAP_F_B (9F7;6B3)OVERLAP_F_B (6F5;9B1)OVERLAP_F_B (9F8;6B4)OVERLAP_F_B (6F6;9B2)OVERLAP_F_B (9F9;6B5)OVERLAP_F_B (6F7;9B3)OVERLAP_F_B 6B6 (6F8;9B4)OVERLAP_F_B 6B7 (6F9;9B5)OVERLAP_F_B 6B8 9B6 6I9 9I7 6W9 9I8 9W7 9I9 9W8 9W9",
    "8F0 8F1 8F2 8F3 8F4 8F5 8F6 7F0 7I0 7W0 7F1 7I1 7W1 7F2 7I2 7W2 7F3 (8F7;7B3)OVERLAP_F_B (7F4;8B0)OVERLAP_F_B (8F8;7B4)OVERLAP_F_B (7F5;8B1)OVERLAP_F_B (8F9;7B5)OVERLAP_F_B (7F6;8B2)OVERLAP_F_B 7B6 (7F7;8B3)OVERLAP_F_B 7B7 (7F8;8B4)OVERLAP_F_B 7B8 (7F9;8B5)OVERLAP_F_B 7B9 8I6 8W6 8I7 8W7 8I8 8W8 8I9 8W9",
]


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
    assert results["dualpipe"]["executor"].startswith("bidirectional")


def test_bidirectional_lowering_detects_deadlock():
    # rank 0 waits for stage 1's backward before running its own forward: no order of sends can satisfy it
    with pytest.raises(ValueError, match="deadlock"):
        pipelined.lower_bidirectional([["0B0", "0F0", "3F0", "3B0"], ["1F0", "1B0", "2F0", "2B0"]], 2)


def test_deepseek_dualpipe_lowers_without_deadlock():
    """DeepSeek's exact schedule (pp 8, M 20) gets its sends and receives, every F/B/I/W once per stage and micro-batch.
    (Run on 8 gloo ranks with an 8-layer tiny model it matches the reference too; too slow for this file.)"""
    acts = [line.split() for line in DEEPSEEK_PP8_M20]
    lowered = pipelined.lower_bidirectional(acts, 8)
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


def test_pipeline_with_expert_parallelism_matches_single_process():
    """ranks 4, pp 2, ep 2: each stage's two data-parallel replicas form its EP group; every MoE layer (decoder
    and MTP) holds half of the routed experts and exchanges tokens with all_to_all over that group. Loss and
    every gradient (experts assembled from their owners, dense ones averaged over dp) match the reference."""
    r = pipelined.run_pipelined(ModelConfig.preset("tiny"), "1f1b", 2, 2, ranks=4, ep=2)  # 3 layers: 1 dense, 2 MoE + MTP
    assert (r["pp"], r["dp"], r["ep"], r["ranks"]) == (2, 2, 2, 4)
    assert r["losses_seen"] == 4 and not r["grads_missing"]
    assert r["ep_partitioned_params"] == 3 * 3  # layers 1, 2 and the MTP block: gate/up/down each
    assert r["ep_remote_routes"] > 0  # tokens really crossed ranks
    assert r["loss_rel_err"] <= LOSS_TOL, r
    assert r["grad_max_cos_diff"] <= COS_TOL and r["expert_grad_max_cos_diff"] <= COS_TOL, r
    assert r["ok"]


@pytest.mark.parametrize("ranks,ep,msg", [(4, 4, "ep must be 1 or ranks/pp"), (2, 2, "ep must be 1 or ranks/pp")])
def test_bad_expert_parallel_combinations(ranks, ep, msg):
    with pytest.raises(PipelineArgError, match=msg):
        make_spec(ModelConfig.preset("tiny"), "1f1b", 2, 2, ranks=ranks, ep=ep)


def test_ep_must_divide_the_experts():
    cfg = dataclasses.replace(ModelConfig.preset("tiny"), n_routed_experts=15, n_group=3, topk_group=1)
    with pytest.raises(PipelineArgError, match="does not divide the 15 routed experts"):
        make_spec(cfg, "1f1b", 2, 2, ranks=4, ep=2)
