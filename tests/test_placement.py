"""ExpertPlacement, replica choice, the node-limited routing bound and the parallel mesh."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsv3c.placement import (ExpertPlacement, PlacementError, check_node_limit, contiguous_placement, default_mesh,
                             make_mesh, max_nodes_per_token_bound, nodes_reached, parse_parallel)


@st.composite
def placements(draw):
    """(placement, n_group, topk_group) of a small drawn balanced placement."""
    gpn = draw(st.sampled_from([1, 2, 4]))
    nodes = draw(st.integers(1, 4))
    gpus = gpn * nodes
    n_group = draw(st.integers(1, 8))
    experts = n_group * draw(st.integers(1, 3))
    slots = (-(-experts // gpus) + draw(st.integers(0, 2))) * gpus
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    w = torch.rand(draw(st.integers(1, 2)), experts, generator=g) ** 4 * 1000
    placement = ExpertPlacement.balanced(w, gpus, gpn, slots, n_group)
    return placement, n_group, draw(st.integers(1, n_group))


def brute_force_bound(placement, layer, n_group, topk_group) -> int:
    """Most nodes reachable by any token: every replica of every expert of any topk_group groups."""
    gsize, best = placement.experts // n_group, 0
    for combo in itertools.combinations(range(n_group), topk_group):
        nodes = {placement.node_of_slot(s) for s in range(placement.num_slots)
                 if int(placement.phy2log[layer, s]) // gsize in combo}
        best = max(best, len(nodes))
    return best


def test_contiguous_placement():
    phy2log, log2phy, logcnt = contiguous_placement(2, 8, 4)
    p = ExpertPlacement(4, 2, phy2log, log2phy, logcnt)
    assert p.local_experts(1, 2) == [4, 5] and p.redundant(0) == [] and (logcnt == 1).all()
    assert log2phy.shape == (2, 8, 1) and log2phy[0, :, 0].tolist() == list(range(8))
    with pytest.raises(PlacementError, match="do not divide evenly"):
        contiguous_placement(1, 6, 4)


@given(placements())
def test_placement_views_agree(case):
    p, _, _ = case
    for layer in range(p.layers):
        flat = [e for r in range(p.num_gpus) for e in p.local_experts(layer, r)]
        assert flat == p.phy2log[layer].tolist()
        assert p.redundant(layer) == [e for e in range(p.experts) if int(p.logcnt[layer, e]) > 1]
        assert all(len(p.local_experts(layer, r)) == p.slots_per_gpu for r in range(p.num_gpus))


@given(placements(), st.integers(0, 2**16))
def test_choose_replica_serves_the_expert_round_robin(case, seed):
    p, _, _ = case
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, p.experts, (64, 2), generator=g)
    slots = p.choose_replica(0, ids)
    assert torch.equal(p.phy2log[0][slots], ids)
    e = int(ids[0, 0])
    same = p.choose_replica(0, torch.full((60, 1), e)).flatten()
    counts = torch.bincount(same, minlength=p.num_slots)[p.log2phy[0, e, :int(p.logcnt[0, e])]]
    assert int(counts.max() - counts.min()) <= 1  # round-robin: replicas share an expert's tokens evenly


def test_choose_replica_prefers_the_tokens_node():
    phy2log = torch.tensor([[0, 1, 0, 2]])  # 4 GPUs, 1 slot each, 2 nodes of 2: expert 0 on both nodes
    from dsv3c.eplb import inverse_tables
    p = ExpertPlacement(4, 2, phy2log, *inverse_tables(phy2log, 3))
    slots = p.choose_replica(0, torch.zeros(6, 1, dtype=torch.int64), token_node=torch.tensor([0, 1] * 3))
    assert slots.flatten().tolist() == [0, 2] * 3
    assert p.choose_replica(0, torch.tensor([[0], [0]])).flatten().tolist() == [0, 2]


@given(placements())
def test_node_bound_matches_brute_force(case):
    p, n_group, topk_group = case
    bound = max_nodes_per_token_bound(p, n_group, topk_group)
    assert bound.exact
    for layer in range(p.layers):
        assert bound.per_layer[layer] == brute_force_bound(p, layer, n_group, topk_group)


@given(placements(), st.integers(0, 2**16), st.booleans())
def test_measured_routing_within_bound(case, seed, by_node):
    p, n_group, topk_group = case
    g, gsize = torch.Generator().manual_seed(seed), p.experts // n_group
    bound = max_nodes_per_token_bound(p, n_group, topk_group)
    tokens, k = 50, min(4, topk_group * gsize)
    ids = []
    for _ in range(tokens):  # a routing that respects the group limit: k experts within topk_group groups
        groups = torch.randperm(n_group, generator=g)[:topk_group]
        pool = (groups[:, None] * gsize + torch.arange(gsize)).flatten()
        ids.append(pool[torch.randperm(len(pool), generator=g)[:k]])
    ids = torch.stack(ids)
    home = torch.randint(0, p.num_nodes, (tokens,), generator=g) if by_node else None
    for layer in range(p.layers):
        assert int(nodes_reached(ids, p, layer, token_node=home).max()) <= bound.per_layer[layer]


def test_v3_groups_on_nodes_meet_the_limit():
    w = torch.rand(3, 256, generator=torch.Generator().manual_seed(0)) * 1000
    p = ExpertPlacement.balanced(w, 64, 8, 320, 8)  # EP64 over 8 nodes, 8 groups: one group per node
    bound = check_node_limit(p, 8, 4, 4)
    assert bound.per_layer == [4, 4, 4] and bound.exact
    glob = ExpertPlacement.balanced(w, 64, 8, 320, 1)  # global placement: groups spread over nodes
    with pytest.raises(PlacementError, match=r"layer 0: a token routed to groups \[0, 1, 2, 3\] can reach 8 nodes"):
        check_node_limit(glob, 8, 4, 4)


def test_node_bound_upper_bound_for_many_groups():
    p = ExpertPlacement.contiguous(1, 64, 32, 2)
    bound = max_nodes_per_token_bound(p, 64, 8, exact_limit=10)
    assert not bound.exact and bound.per_layer == [8]
    assert max_nodes_per_token_bound(p, 64, 8, experts_per_token=3).per_layer == [3]


# ------------------------------------------------------------------------------------------ mesh

def test_default_mesh_2048_train():
    m = default_mesh(2048, 8, "train")
    assert (m.pp, m.dp, m.tp, m.ep, m.edp, m.redundant) == (16, 128, 1, 64, 2, 0)
    groups = m.groups()
    sizes = {k: (len(v), len(v[0])) for k, v in groups.items()}
    assert sizes == {"tp": (2048, 1), "dp": (16, 128), "ep": (32, 64), "edp": (1024, 2), "pp": (128, 16)}
    for grp in groups["ep"]:
        assert len({m.rank(r)["node"] for r in grp}) == 8 == m.ep_nodes
    assert m.rank(1000) == {"rank": 1000, "node": 125, "local_gpu": 0, "pp": 7, "dp": 104, "tp": 0, "ep": 40,
                            "edp": 1}
    d = m.to_dict()
    assert d["groups"]["ep"]["first"] == ["0:64:1", "64:128:1"] and len(str(d)) < 2000


@pytest.mark.parametrize("gpus,mode,want", [
    (32, "prefill", (1, 8, 4, True, 32, 32)),
    (320, "decode", (1, 80, 4, True, 320, 64)),
])
def test_default_mesh_inference_units(gpus, mode, want):
    m = default_mesh(gpus, 8, mode)
    assert (m.pp, m.dp, m.tp, m.sp, m.ep, m.redundant) == want


@pytest.mark.parametrize("gpus", [1, 2, 4, 8, 16, 32, 64, 256, 320, 2048])
@pytest.mark.parametrize("mode", ["train", "prefill", "decode"])
@pytest.mark.parametrize("experts", [16, 64, 256])
def test_default_mesh_is_legal(gpus, mode, experts):
    gpn = min(gpus, 8)
    m = default_mesh(gpus, gpn, mode, experts=experts, layers=4)
    assert m.pp * m.dp * m.tp == gpus and (experts + m.redundant) % m.ep == 0 and m.pp <= 4
    check_partition(m)


def check_partition(m):
    """Every kind of group partitions the ranks, and rank() agrees with the membership."""
    for kind, groups in m.groups().items():
        assert sorted(r for g in groups for r in g) == list(range(m.gpus)), kind
    for grp in m.groups()["ep"]:
        assert [m.rank(r)["ep"] for r in grp] == list(range(m.ep))
        assert len({m.rank(r)["node"] for r in grp}) == m.ep_nodes
    for grp in m.groups()["tp"]:
        assert len({m.rank(r)["node"] for r in grp}) == 1


@given(st.sampled_from([1, 2, 4, 8]), st.integers(1, 8), st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4]),
       st.sampled_from([1, 2, 4, 8, 16, 32]))
def test_make_mesh_valid_or_one_line_error(gpn, nodes, pp, tp, ep):
    try:
        m = make_mesh(gpn * nodes, gpn, pp=pp, ep=ep, tp=tp)
    except PlacementError as exc:
        assert "\n" not in str(exc)
        return
    check_partition(m)


@pytest.mark.parametrize("kwargs,match", [
    (dict(gpus=12, gpus_per_node=8), "not whole nodes"),
    (dict(gpus=16, gpus_per_node=8, pp=3), "does not divide 16 GPUs"),
    (dict(gpus=16, gpus_per_node=8, pp=2, dp=4), "= 8, not the 16 GPUs"),
    (dict(gpus=16, gpus_per_node=4, tp=8), "tp 8 does not divide the 4 GPUs of a node"),
    (dict(gpus=16, gpus_per_node=8, ep=32), "ep 32 does not divide the 16 ranks"),
    (dict(gpus=24, gpus_per_node=8, ep=12), "straddle nodes"),
    (dict(gpus=16, gpus_per_node=8, sp=True), "needs tp > 1"),
    (dict(gpus=16, gpus_per_node=8, ep=16, experts=24), "does not divide 24 experts"),
    (dict(gpus=16, gpus_per_node=8, pp=0), "pp must be a positive integer"),
])
def test_make_mesh_errors(kwargs, match):
    with pytest.raises(PlacementError, match=match) as info:
        make_mesh(**kwargs)
    assert "\n" not in str(info.value)


def test_parse_parallel():
    assert parse_parallel("pp=16, ep=64") == {"pp": 16, "ep": 64}
    assert parse_parallel("tp=4,sp=true,redundant=0") == {"tp": 4, "sp": True, "redundant": 0}
    for bad, match in [("pp=16,xp=2", "unknown"), ("pp=a", "non-negative integer"), ("pp", "key=value"),
                       ("pp=2,pp=4", "twice"), ("ep=0", "positive"), ("sp=maybe", "true/false"), ("", "key=value")]:
        with pytest.raises(PlacementError, match=match):
            parse_parallel(bad)


def test_default_mesh_overrides_and_errors():
    m = default_mesh(2048, 8, "train", **parse_parallel("pp=8,ep=32"))
    assert (m.pp, m.dp, m.ep) == (8, 256, 32)
    with pytest.raises(PlacementError, match="unknown mode"):
        default_mesh(8, 8, "serve")
    with pytest.raises(PlacementError, match="ep 48 does not divide"):
        default_mesh(64, 8, "train", ep=48)
