"""Tests of targets/: GPU specs, topology, named targets, TOML files and cost model."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from targets import (DESCRIBE_HEADERS, GPUS, Target, TargetError, build_topology, compute_sms, describe_targets,
                     get_target, gpu_spec, list_targets)

BIG = get_target("h800x2048")
MID = get_target("h800x320")
gpu_ids = st.integers(0, BIG.gpus - 1)


def test_gpu_specs():
    h800, h100, h200 = gpu_spec("h800"), gpu_spec("H100"), gpu_spec("h200")
    assert (h800.sms, h800.arch, h800.nvlink_bandwidth, h800.nvlink_achieved) == (132, "sm_90a", 400e9, 160e9)
    assert h100.nvlink_bandwidth == h200.nvlink_bandwidth == 900e9
    assert h800.bf16_flops == h100.bf16_flops == 989e12 and h800.fp8_flops == 2 * 989.5e12
    assert h200.hbm_bandwidth == 4.8e12 and h200.hbm_bytes > 140e9 > h100.hbm_bytes > 80e9
    assert h800.smem_per_block == 227 * 1024 < h800.smem_per_sm == 228 * 1024
    with pytest.raises(TargetError, match="h900"):
        gpu_spec("h900")


def test_h20_datasheet_and_targets():
    """H20 as NVIDIA's datasheet gives it; nvlink_achieved by the 80 %-of-one-direction rule; h20x16 is 2 nodes."""
    h20 = gpu_spec("h20")
    assert (h20.arch, h20.hbm_bandwidth, h20.bf16_flops, h20.fp8_flops) == ("sm_90a", 4.0e12, 148e12, 296e12)
    assert 96e9 < h20.hbm_bytes < 110e9 and h20.nvlink_achieved == 0.8 * h20.nvlink_bandwidth / 2 == 360e9
    t = get_target("h20x16")
    assert (t.gpu.name, t.gpus, t.nodes) == ("h20", 16, 2) and "h20x16" in list_targets()
    assert get_target("h20x64").nodes == 8


@settings(deadline=None)
@given(gpu_ids, gpu_ids)
def test_bandwidth_symmetric_and_kind(a, b):
    assert BIG.bandwidth(a, b) == BIG.bandwidth(b, a)
    assert BIG.bandwidth(a, b, achieved=True) == BIG.bandwidth(b, a, achieved=True)
    assert BIG.link_kind(a, b) == BIG.link_kind(b, a)
    if a == b:
        assert BIG.link_kind(a, b) == "local" and math.isinf(BIG.bandwidth(a, b))
    elif a // 8 == b // 8:
        assert BIG.link_kind(a, b) == "nvlink"
        assert BIG.bandwidth(a, b) == 400e9 and BIG.bandwidth(a, b, achieved=True) == 160e9
    else:
        assert BIG.link_kind(a, b) == "ib"
        assert BIG.bandwidth(a, b) == pytest.approx(50e9) == BIG.bandwidth(a, b, achieved=True)


def test_route_classes_match_uncached_search():
    fabric = Target("radix16", gpu_spec("h800"), gpus=512, switch_radix=16)  # 8 leaves + 4 spines per plane
    topo = fabric.topology
    assert fabric.to_dict()["spines_per_plane"] == 4
    for a in (0, 13, 511):
        for b in range(fabric.gpus):
            assert topo.route(a, b) == topo.compute_route(a, b) == topo.compute_route(b, a), (a, b)


def test_cross_plane_route_goes_through_nvlink_then_ib():
    topo = BIG.topology
    path = topo.path(0, 9)  # node 0 local 0 -> node 1 local 1: different planes
    kinds = [topo.graph.edges[u, v]["kind"] for u, v in zip(path, path[1:])]
    assert "nvlink" in kinds and "ib" in kinds
    same_plane = topo.path(0, 8)
    assert all(topo.graph.edges[u, v]["kind"] != "nvlink" for u, v in zip(same_plane, same_plane[1:]))
    assert topo.plane_of(9) == 1 and topo.plane_of(17) == 1


def test_fat_tree_sizes_and_edge_attributes():
    g = BIG.topology.graph
    roles = [role for _, role in g.nodes(data="role")]
    assert roles.count("gpu") == roles.count("nic") == 2048 and roles.count("nvswitch") == 256
    assert roles.count("leaf") == 8 * 8 and roles.count("spine") == 8 * 4
    assert all(d["kind"] in ("nvlink", "pcie", "ib") and d["bandwidth"] > 0 for *_, d in g.edges(data=True))
    small = get_target("h800x32").topology.graph  # 4 NICs per plane: one leaf, no spine
    assert [r for _, r in small.nodes(data="role")].count("spine") == 0


@settings(deadline=None)
@given(st.sets(gpu_ids, max_size=64))
def test_nodes_of(gpus):
    assert BIG.nodes_of(gpus) == {g // 8 for g in gpus}
    for g in list(gpus)[:4]:
        assert BIG.node_of(g) == g // 8


def test_bad_gpu_id():
    with pytest.raises(TargetError, match="2048"):
        BIG.bandwidth(0, 2048)


@pytest.mark.parametrize("spec,gpus,nodes", [("h800x8", 8, 1), ("h800x32", 32, 4), ("h800x320", 320, 40),
                                             ("h800x2048", 2048, 256)])
def test_named_targets(spec, gpus, nodes):
    t = get_target(spec)
    assert (t.name, t.gpu.name, t.gpus, t.nodes, t.gpus_per_node, t.planes) == (spec, "h800", gpus, nodes, 8, 8)
    assert spec in list_targets()


@settings(deadline=None)
@given(st.sampled_from(sorted(GPUS)), st.one_of(st.integers(1, 7), st.integers(1, 64).map(lambda n: 8 * n)))
def test_general_form(gpu, n):
    t = get_target(f"{gpu}x{n}")
    assert (t.gpu.name, t.gpus, t.nodes) == (gpu, n, max(1, n // 8))
    assert t.gpus_per_node == min(n, 8)


@pytest.mark.parametrize("spec,part", [("h900x8", "h900"), ("h800x12", "12"), ("h800x0", "0"),
                                       ("h800x-8", "-8"), ("banana", "banana"), ("h800", "h800"),
                                       ("h800x20000", "20000"), ("missing.toml", "missing.toml")])
def test_bad_specs(spec, part):
    with pytest.raises(TargetError) as e:
        get_target(spec)
    assert part in str(e.value) and "\n" not in str(e.value)
    if spec == "h900x8":
        assert "h100" in str(e.value) and "h800" in str(e.value)


def test_target_validation():
    with pytest.raises(TargetError, match="divisible"):
        Target("x", gpu_spec("h800"), gpus=12)
    with pytest.raises(TargetError, match="gpus_per_node"):
        Target("x", gpu_spec("h800"), gpus=8, gpus_per_node=0)
    with pytest.raises(TargetError, match="comm_sms"):
        Target("x", gpu_spec("h800"), gpus=8, comm_sms=132)


GOOD_TOML = """
name = "lab"
gpu = "h100"
gpus = 16
gpus_per_node = 4
planes = 2
nic_gbps = 200
comm_sms = 24
[gpu_overrides]
nvlink_achieved = 300e9
sms = 120
"""


def test_toml_target(tmp_path):
    p = tmp_path / "lab.toml"
    p.write_text(GOOD_TOML)
    t = get_target(str(p))
    assert (t.name, t.gpu.name, t.gpus, t.nodes, t.gpus_per_node, t.planes) == ("lab", "h100", 16, 4, 4, 2)
    assert t.nic_bandwidth == 25e9 and t.gpu.nvlink_achieved == 300e9 and t.gpu.sms == 120
    assert compute_sms(t, "train") == 96 and compute_sms(t, "decode") == 120
    assert t.link_kind(0, 3) == "nvlink" and t.bandwidth(0, 4) == 25e9
    assert t.topology.plane_of(2) == 0 and t.topology.plane_of(3) == 1
    assert get_target(p) == t


@pytest.mark.parametrize("text,part", [
    ("name = 'a'\ngpu = \n", "line 2"),
    ("name = 'a'\ngpu = 'h800'\n", "'gpus'"),
    ("name = 'a'\ngpu = 'h800'\ngpus = '8'\n", "'gpus'"),
    ("name = 'a'\ngpu = 'h800'\ngpus = 12\n", "divisible"),
    ("name = 'a'\ngpu = 'h800'\ngpus = -8\n", "gpus"),
    ("name = 'a'\ngpu = 'h900'\ngpus = 8\n", "h900"),
    ("name = 'a'\ngpu = 'h800'\ngpus = 8\nnic_gbps = 0\n", "nic_gbps"),
    ("name = 'a'\ngpu = 'h800'\ngpus = 8\ncolour = 1\n", "colour"),
    ("name = 'a'\ngpu = 'h800'\ngpus = 8\n[gpu_overrides]\nsmz = 1\n", "smz"),
    ("name = 'a'\ngpu = 'h800'\ngpus = 8\n[gpu_overrides]\nsms = 1.5\n", "sms"),
])
def test_bad_toml(tmp_path, text, part):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(TargetError) as e:
        get_target(str(p))
    msg = str(e.value)
    assert part in msg and "bad.toml" in msg and "\n" not in msg


@pytest.mark.parametrize("spec", ["h800x8", "h800x2048", "h200x4"])
def test_to_dict(spec):
    d1, d2 = get_target(spec).to_dict(), get_target(spec).to_dict()
    assert json.dumps(d1) == json.dumps(d2)
    assert list(d1)[:4] == ["name", "gpu", "gpus", "nodes"]
    assert all(type(v) in (int, float, str) for v in d1.values())
    assert json.loads(json.dumps(d1)) == d1


def test_describe_targets():
    rows = describe_targets()
    assert [r[0] for r in rows] == list_targets() and all(len(r) == len(DESCRIBE_HEADERS) for r in rows)
    assert rows[-1] == ("h800x2048", "h800", 2048, 256, 400.0, 50.0, "sm_90a")


def test_build_large_topology():
    topo = build_topology(4096, 8, 8, 400e9, 160e9, 64e9, 50e9, 64)
    assert topo.num_gpus == 4096 and topo.link_kind(0, 4095) == "ib"


def test_compute_sms():
    h800 = gpu_spec("h800")
    assert h800.peak_flops("bf16") == 989e12 and h800.peak_flops("fp8") == 1979e12
    with pytest.raises(TargetError):
        h800.peak_flops("fp4")
    assert compute_sms(BIG, "train") == compute_sms(BIG, "prefill") == 112
    assert compute_sms(BIG, "decode") == 132
