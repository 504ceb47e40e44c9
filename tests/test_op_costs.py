"""Every op record's cost against a formula written here, the cost pass against the model figures, and the
rule that an op cannot join the vocabulary without a cost and a lowering.

The formulas below are independent of dsv3c.ops.record's helpers: GEMMs 2·M·N·K, attention over the
causal pairs counted by brute force, elementwise ops their documented FLOPs per element and
inputs + outputs of bytes, backward FLOPs by the ratios the records document (0 for inference-only ops),
and the routed experts' weights charged for the expected distinct experts a step touches (never more
than min(E, T·k) of them).
"""

import dataclasses
import math
import subprocess
import sys
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dsv3c
import passes
from dsv3c.cost.figures import REFERENCE_SHAPES
from dsv3c.cost.nodes import node_cost
from dsv3c.ops import RECORDS, fp8
from dsv3c.ops.record import Cost, Lowering, NotLowered, OpRecordError, define
from model_def import ModelConfig

dsv3 = torch.ops.dsv3
F32, BF16, I64, E4M3 = torch.float32, torch.bfloat16, torch.int64, torch.float8_e4m3fn


def meta(*shape, dtype=F32):
    return torch.empty(shape, dtype=dtype, device="meta")


def nb(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def pairs(s: int, t: int) -> int:
    """(query, key) pairs visible under the causal mask for s queries at the end of t keys, counted one by one."""
    return sum(t - s + i + 1 for i in range(s))


def hit(tokens: int, experts: int, k: int) -> float:
    """Expected distinct experts hit when each of `tokens` picks k of `experts` uniformly (without replacement)."""
    miss_one = 1 - k / experts  # P(a given expert is not among one token's k)
    return experts * (1 - miss_one**tokens)


def two_hop(tokens, payload, ep, gpn, exp_nodes, exp_gpus):
    nodes, gpus = math.ceil(ep / gpn), min(ep, gpn)
    ib = tokens * payload * exp_nodes * (1 - 1 / nodes) if ep > 1 and nodes > 1 else 0
    nv = tokens * payload * exp_gpus * (1 - 1 / gpus) if ep > 1 and gpus > 1 else 0
    return int(ib), int(nv)


# ---- the cases: drawn shapes → (schema-order args as meta tensors, expected cost) -------------------------


def case(name: str, draw):
    """(args in schema order, expected Cost, upper bound on bytes or None) for op `name` at drawn shapes."""
    dt = draw(st.sampled_from([F32, BF16]))
    b, s, h = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 4))
    d = draw(st.sampled_from([8, 64, 130, 256]))
    if name in ("rms_norm", "rope", "swiglu"):
        x = meta(b, s, d, dtype=dt)
        if name == "rms_norm":
            args, per, ratio = (x, meta(d, dtype=dt), 1e-6), 4, 2
        elif name == "rope":
            x = meta(b, s, h, 2 * d, dtype=dt)
            args, per, ratio = (x, meta(b, s, d), meta(b, s, d)), 3, 1
        else:
            args, per, ratio = (x, meta(b, s, d, dtype=dt)), 5, 2
        out = meta(*x.shape, dtype=dt)
        n = x.numel()
        return args, out, Cost(per * n, ratio * per * n, nb(*[a for a in args if isinstance(a, torch.Tensor)], out))
    if name == "mla_attention":
        t = s + draw(st.integers(0, 9))
        dqk, dv = draw(st.integers(1, 48)), draw(st.integers(1, 32))
        q, k, v = meta(b, s, h, dqk, dtype=dt), meta(b, t, h, dqk, dtype=dt), meta(b, t, h, dv, dtype=dt)
        out = meta(b, s, h, dv, dtype=dt)
        f = 2 * b * h * pairs(s, t) * dqk + 2 * b * h * pairs(s, t) * dv  # QKᵀ then PV
        return (q, k, v, 0.1), out, Cost(f, int(2.5 * f), nb(q, k, v, out))
    if name == "latent_attention":
        t = s + draw(st.integers(0, 9))
        r, dr = draw(st.integers(1, 64)), draw(st.integers(1, 16))
        ql, qp, ckv, kpe = meta(b, s, h, r, dtype=dt), meta(b, s, h, dr, dtype=dt), meta(b, t, r, dtype=dt), meta(b, t, dr, dtype=dt)
        out = meta(b, s, h, r, dtype=dt)
        f = 2 * b * h * pairs(s, t) * (r + dr) + 2 * b * h * pairs(s, t) * r  # scores over r + dr, output over r
        return (ql, qp, ckv, kpe, 0.1), out, Cost(f, int(2.5 * f), nb(ql, qp, ckv, kpe, out))
    m, n = b * s, draw(st.sampled_from([8, 128, 200]))
    if name == "act_quant":
        x = meta(b, s, d, dtype=dt)
        out = (meta(b, s, d, dtype=E4M3), meta(b, s, math.ceil(d / 128)))
        return (x, False), out, Cost(3 * x.numel(), 0, nb(x, *out))
    if name == "fp8_gemm":
        xq, xs = meta(b, s, d, dtype=E4M3), meta(b, s, math.ceil(d / 128))
        wq, ws = meta(n, d, dtype=E4M3), meta(math.ceil(n / 128), math.ceil(d / 128))
        out = meta(b, s, n, dtype=dt)
        return (xq, xs, wq, ws, dt), out, Cost(2 * m * n * d, 0, nb(xq, xs, wq, ws, out))
    if name == "fp8_linear":
        x, w, out = meta(b, s, d, dtype=dt), meta(n, d, dtype=dt), meta(b, s, n, dtype=dt)
        return (x, w), out, Cost(2 * m * n * d, 2 * 2 * m * n * d, nb(x, w, out))  # Dgrad + Wgrad
    # routing and experts: T tokens [T, D], E experts, top-k, FFN width F
    t = draw(st.integers(1, 40))
    e = draw(st.sampled_from([4, 8, 16, 64, 256]))
    k = draw(st.integers(1, min(8, e)))
    f = draw(st.sampled_from([8, 32, 96]))
    x, ids, g = meta(t, d, dtype=dt), meta(t, k, dtype=I64), meta(t, k)
    if name == "moe_gate":
        w, bias = meta(e, d, dtype=dt), meta(e)
        out = (meta(t, k), meta(t, k, dtype=I64))
        return (x, w, bias, 1, 1, k, True, 2.5), out, Cost(2 * t * e * d, 2 * 2 * t * e * d, nb(x, w, bias, *out))
    ffn = 3 * 2 * d * f  # gate, up (D→F) and down (F→D) per (token, expert) route
    act = 2 * nb(x) * k + nb(x)  # each route reads x (and writes its FFN input); the summed output once
    if name in ("moe_experts", "moe_experts_fp8_train"):
        stacked = (meta(e, f, d, dtype=dt), meta(e, f, d, dtype=dt), meta(e, d, f, dtype=dt))
        weight = hit(t, e, k) * nb(*stacked) / e
        return (x, ids, g, *stacked), meta(t, d, dtype=dt), Cost(t * k * ffn, 2 * t * k * ffn, int(weight + act)), (
            min(e, t * k) * nb(*stacked) / e + act)
    if name == "moe_experts_fp8":
        c = lambda a, b_: meta(e, math.ceil(a / 128), math.ceil(b_ / 128))  # noqa: E731
        packed = (meta(e, f, d, dtype=E4M3), c(f, d), meta(e, f, d, dtype=E4M3), c(f, d), meta(e, d, f, dtype=E4M3), c(d, f))
        weight = hit(t, e, k) * nb(*packed) / e
        return (x, ids, g, *packed), meta(t, d, dtype=dt), Cost(t * k * ffn, 0, int(weight + act)), (
            min(e, t * k) * nb(*packed) / e + act)
    # expert parallelism: ep ranks of `slots` local experts, gpn GPUs per node
    ep = draw(st.sampled_from([1, 2, 4, 8, 16]))
    gpn = draw(st.sampled_from([1, 2, 4, 8]))
    slots = max(1, e // ep)
    p2l, l2p, cnt = meta(slots * ep, dtype=I64), meta(slots * ep, 1, dtype=I64), meta(slots * ep, dtype=I64)
    exp_nodes = draw(st.floats(1.0, float(math.ceil(ep / gpn))))
    exp_gpus = draw(st.floats(1.0, float(min(ep, k))))
    if name == "ep_dispatch":
        quant = draw(st.booleans())
        payload = d + 4 * math.ceil(d / 128) if quant else d * x.element_size()  # E4M3 codes + fp32 1x128 scales
        out = (meta(ep * t, d, dtype=dt), meta(ep * t * k, dtype=I64), meta(ep * t * k, dtype=I64), meta(4, ep, dtype=I64),
               meta(t * k, dtype=I64), meta(ep * t, dtype=I64))
        ib, nv = two_hop(t, payload, ep, gpn, exp_nodes, exp_gpus)
        return ((x, ids, p2l, l2p, cnt, ep, 0, quant, gpn, exp_nodes, exp_gpus), out,
                Cost(3 * t * d if quant else 0, t * d, int(nb(x, ids) + t * exp_gpus * payload), ib, nv))
    recv_x, recv_tok, recv_slot = meta(ep * t, d, dtype=dt), meta(ep * t * k, dtype=I64), meta(ep * t * k, dtype=I64)
    routes = t * k  # arriving at a rank on average (balanced): its T tokens' worth
    # slots a rank can touch: the expected distinct experts ep·T tokens hit, per rank; ≤ min(S, T·k)
    touched = hit(ep * t, ep * slots, k) / ep
    if name == "ep_experts":
        fp8_gemms = draw(st.booleans())
        local = (meta(slots, f, d, dtype=dt), meta(slots, f, d, dtype=dt), meta(slots, d, f, dtype=dt))
        out = meta(ep * t * k, d, dtype=BF16 if fp8_gemms else dt)
        weight = touched * nb(*local) / slots
        act = routes * d * (recv_x.element_size() + out.element_size())
        return ((recv_x, recv_tok, recv_slot, *local, fp8_gemms, ep), out,
                Cost(routes * ffn, 2 * routes * ffn, int(weight + act)), min(slots, routes) * nb(*local) / slots + act)
    if name == "ep_experts_fp8":
        c = lambda a, b_: meta(slots, math.ceil(a / 128), math.ceil(b_ / 128))  # noqa: E731
        local = (meta(slots, f, d, dtype=E4M3), c(f, d), meta(slots, f, d, dtype=E4M3), c(f, d),
                 meta(slots, d, f, dtype=E4M3), c(d, f))
        out = meta(ep * t * k, d, dtype=BF16)
        weight = touched * nb(*local) / slots
        act = routes * d * (recv_x.element_size() + out.element_size())
        return ((recv_x, recv_tok, recv_slot, *local, ep), out, Cost(routes * ffn, 0, int(weight + act)),
                min(slots, routes) * nb(*local) / slots + act)
    if name == "ep_combine":
        y = meta(ep * t * k, d, dtype=draw(st.sampled_from([F32, BF16])))
        out = meta(t, d, dtype=dt)
        row = d * y.element_size()
        # a row per (token, GPU) and per (token, node): the expert GPUs and the forwarders sum a token's routes
        ib, nv = two_hop(t, row, ep, gpn, exp_nodes, exp_gpus)
        counts, order = meta(4, ep, dtype=I64), meta(t * k, dtype=I64)
        return ((y, g, counts, order, ep, gpn, dt, exp_nodes, exp_gpus), out,
                Cost(2 * t * k * d, 2 * 2 * t * k * d, nb(out) + int(t * exp_gpus * row), ib, nv))
    raise KeyError(name)


COSTED = sorted(n for n in RECORDS if n != "kernel_call")


def expected_and_bound(name, draw):
    got = case(name, draw)
    if len(got) == 4:
        return got
    return (*got, None)


def check_record(name: str, draw) -> None:
    args, out, want, byte_bound = expected_and_bound(name, draw)
    got = RECORDS[name].cost(*args, out)
    assert isinstance(got, Cost), name
    for field in ("flops", "bwd_flops", "ib_bytes", "nvlink_bytes"):
        assert getattr(got, field) == getattr(want, field), (name, field, getattr(got, field), getattr(want, field))
    assert abs(got.bytes - want.bytes) <= 1, (name, "bytes", got.bytes, want.bytes)
    if byte_bound is not None:
        assert got.bytes <= byte_bound + 1, (name, "charges more expert weights than min(E, T·k) experts")


@pytest.mark.parametrize("name", COSTED)
@settings(max_examples=25)
@given(data=st.data())
def test_record_cost_matches_independent_formula(name, data):
    check_record(name, data.draw)


@pytest.mark.parametrize("lie", ["no_backward", "all_experts"])
@settings(max_examples=3)
@given(data=st.data())
def test_a_lying_record_is_caught(lie, data):
    """check_record fails for a record that forgets its backward or charges every expert's weights."""
    name = "fp8_linear" if lie == "no_backward" else "moe_experts"
    honest = RECORDS[name]

    def lying(*args):
        c = honest.cost(*args)
        if lie == "no_backward":
            return dataclasses.replace(c, bwd_flops=0)
        return dataclasses.replace(c, bytes=nb(*args[:3], *args[-1:]) + nb(*args[3:6]))  # every expert's weights

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(RECORDS, name, dataclasses.replace(honest, cost=lying))
        with pytest.raises(AssertionError):
            check_record(name, data.draw)


# ---- kernel_call: the cost of the op it lowers ------------------------------------------------------------


def test_kernel_call_costs_what_it_lowers():
    cfg = dataclasses.replace(ModelConfig.preset("tiny"), num_hidden_layers=2, first_k_dense_replace=1)
    program = dsv3c.capture(cfg, "prefill", 1, 6, model=None)
    from dsv3c.ir import Plan
    from tests.test_passes import TARGET

    plan = Plan(program, TARGET, options={"aot": False})
    for name in ("mla_fuse", "fp8_quant"):
        passes.REGISTRY[name].fn(plan, {})
    before = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and dsv3c.ops.op_name(node.target):
            c = node_cost(node)
            before.setdefault(dsv3c.ops.op_name(node.target), []).append(c)
    passes.REGISTRY["lower_triton"].fn(plan, {})
    from dsv3c.codegen.lowering import get_spec

    after = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and dsv3c.ops.op_name(node.target) == "kernel_call":
            after.setdefault(get_spec(node.args[0]).op, []).append(node_cost(node))
    assert after, "nothing was lowered"
    for op, costs in after.items():
        assert sorted(map(Cost.as_dict, costs), key=str) == sorted(map(Cost.as_dict, before[op]), key=str), op


# ---- the cost pass's totals against the plan's model figures ------------------------------------------------


@pytest.fixture(scope="module")
def compiled():
    cfg = ModelConfig.preset("tiny")
    need = max(s["seq"] + s["kv_len"] for s in REFERENCE_SHAPES.values())
    cfg = dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, need))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, shapes in REFERENCE_SHAPES.items():
            out[mode] = dsv3c.compile(cfg, target="h800x8", mode=mode, out=f"{tmp}/{mode}",
                                      pipeline="dce,mla_fuse,fp8_quant,cost", **shapes)
            out[mode]["quant_flops"] = _quantisation_flops(cfg, mode, shapes)
    return out


def _quantisation_flops(cfg, mode: str, shapes: dict) -> int:
    """FLOPs per token of the act_quant nodes fp8_quant inserts (the recipe's work, not the model's)."""
    from dsv3c.ir import Plan
    from tests.test_passes import TARGET

    plan = Plan(dsv3c.capture(cfg, mode, **shapes), TARGET)
    for name in ("dce", "mla_fuse", "fp8_quant"):
        passes.REGISTRY[name].fn(plan, {})
    quant = sum(node_cost(n).flops for n in plan.program.graph.nodes if dsv3c.ops.op_name(n.target) == "act_quant")
    return quant // (shapes["batch"] * shapes["seq"])


@pytest.mark.parametrize("mode", list(REFERENCE_SHAPES))
def test_cost_pass_totals_match_model_figures(compiled, mode):
    """The compiled graph's model FLOPs are the figures' (counted before fp8_quant) plus the quantisation kernels."""
    plan = compiled[mode]
    graph, model = plan["graph_cost"]["model_flops_per_token"], plan["model"]["flops_per_token"][mode]
    assert abs(graph - plan["quant_flops"] - model) <= 2, (mode, graph, plan["quant_flops"], model)
    bwd = plan["graph_cost"]["totals"]["bwd_flops"]
    assert (bwd > 0) == (mode == "train"), (mode, bwd)
    if mode != "train":
        assert plan["graph_cost"]["totals"]["recompute_flops"] == 0


# ---- no op without a cost and a lowering ------------------------------------------------------------------


def test_define_without_cost_or_lowering_raises():
    op = object()  # define checks its keywords before it touches the op
    with pytest.raises(TypeError):
        define(op)  # the keywords are required
    with pytest.raises(OpRecordError):
        define(op, cost=None, stage="capture", lowering=NotLowered("x"))
    with pytest.raises(OpRecordError):
        define(op, cost=lambda *a: Cost(), stage="capture", lowering="dsv3c.codegen.kernels.rmsnorm:build_rms_norm")
    assert op not in RECORDS.values()


CHECK_COMPLETE = """
import torch, dsv3c
from dsv3c.ops.record import OpRecordError, check_complete

@torch.library.custom_op("dsv3::_test_only_xyz", mutates_args=())
def f(x: torch.Tensor) -> torch.Tensor:
    return x.clone()

try:
    check_complete()
except OpRecordError as e:
    assert "_test_only_xyz" in str(e), e
    print("RAISED")
else:
    print("DID NOT RAISE")
"""


def test_check_complete_rejects_a_dsv3_op_without_record():
    # in a subprocess: the throwaway op would stay in this process's dsv3 namespace
    res = subprocess.run([sys.executable, "-c", CHECK_COMPLETE], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("RAISED"), res.stdout
