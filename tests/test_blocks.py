"""Programs of blocks: each distinct block captured once stands for the whole model's graph.

The whole graph (`dsv3c.capture`, `compile_model(whole_graph=True)`) is the reference: a program of blocks runs
the same function bit for bit before and after the passes, counts the same nodes and weights, and compiles to
the same plan. The 671B's default training compile is compared in tests/test_cli.py (its two 671B jobs).
"""

import copy
import dataclasses
import json

import pytest
import torch

import dsv3c
import passes
import targets
from dsv3c.driver import compile_model
from dsv3c.frontend.exporter import capture_blocks
from dsv3c.ir import Plan
from dsv3c.ir.blocks import BlockError
from dsv3c.passmgr.pipeline import PipelineError, run_pipeline
from dsv3c.passmgr.verify import VerificationError, verify
from model_def import DeepseekV3, ModelConfig

TINY = ModelConfig.preset("tiny")
DEEP = dataclasses.replace(TINY, num_hidden_layers=4, first_k_dense_replace=2)  # 2 dense, 2 MoE, MTP
TARGET = targets.get_target("h800x8")
SHAPES = {"train": {"seq": 4}, "prefill": {"seq": 4}, "decode": {"seq": 1, "kv_len": 4}}


def input_values(program, seed: int) -> list[torch.Tensor]:
    """Random values for the model's user inputs (token ids, caches), in `model_inputs` order."""
    gen = torch.Generator().manual_seed(seed)
    vals = {n.name: n.meta["val"] for n in program.placeholders()}
    blocks = program.blocks
    spec = {m: vals[t] for t in program.inputs for m in (blocks.expand([t]) if blocks else [t])}
    out = []
    for name in program.model_inputs:
        v = spec[name]
        if v.dtype == torch.long:
            out.append(torch.randint(0, program.cfg.vocab_size, tuple(v.shape), generator=gen))
        else:
            out.append(torch.randn(tuple(v.shape), generator=gen).to(v.dtype))
    return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DeepseekV3(DEEP)
    for name, buf in m.named_buffers():  # decisive routing, as tests/test_lowering.py sets it
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn(buf.shape) * 0.5)
    return m


def test_instances_of_deepseek_v3():
    """The 671B: 3 dense layers computed by layers.0, 58 MoE layers by layers.3, the MTP module by itself."""
    program = capture_blocks(ModelConfig.preset("deepseek-v3"), "decode", seq=1, kv_len=16)
    blocks = program.blocks
    assert [(i.unit, i.block, i.slot) for i in blocks.of("layers.0")] == [(f"layers.{i}", "layers.0", i) for i in range(3)]
    assert [i.unit for i in blocks.of("layers.3")] == [f"layers.{i}" for i in range(3, 61)]
    assert [(i.unit, i.slot) for i in blocks.of("mtp.0")] == [("mtp.0", 61)]
    assert program.inputs == ["input_ids", *[f"past_{i}_{kv}" for i in (0, 3, 61) for kv in "kv"]]
    assert program.model_inputs == ["input_ids", *[f"past_{i}_{kv}" for i in range(62) for kv in "kv"]]
    inst = blocks.of("layers.3")[2]
    assert blocks.rename(inst, "p_layers_3_mlp_experts_gate_proj") == "p_layers_5_mlp_experts_gate_proj"
    assert blocks.rename(inst, "layers.3.self_attn.kv_b_proj.weight") == "layers.5.self_attn.kv_b_proj.weight"
    assert blocks.rename(inst, "past_3_ckv") == "past_5_ckv" and blocks.rename(inst, "p_layers_30_x") == "p_layers_30_x"


@pytest.mark.parametrize("mode", sorted(SHAPES))
def test_captured_blocks_are_the_whole_graph(model, mode):
    """Same node count, inputs, outputs, weights (names, bytes) and outputs bit for bit, from distinct layer weights."""
    whole = dsv3c.capture(DEEP, mode, model=model, **SHAPES[mode])
    program = capture_blocks(DEEP, mode, model=model, **SHAPES[mode])
    assert len(program.graph.nodes) < len(whole.graph.nodes) == program.node_count()
    assert program.model_inputs == whole.inputs and program.model_outputs == whole.outputs
    assert set(program.model_weights()) == set(whole.weights) and program.weight_count() == len(whole.weights)
    assert program.weight_bytes_by_dtype() == whole.weight_bytes_by_dtype()
    args = input_values(whole, seed=1)
    with torch.no_grad():
        want, got = whole(*args), program(*args)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("mode", sorted(SHAPES))
def test_default_pipeline_on_blocks_equals_the_whole_graph(model, mode):
    """Every pass record (nodes before/after, counters) and the cost analysis agree, and the programs compute the
    same outputs bit for bit (fused, quantised and partitioned weights per layer); lowered (its kernels run on
    Triton's interpreter) in decode, the mode with the most kernel families."""
    names = passes.default_pipeline()
    names = names if mode == "decode" else names[: names.index("lower_triton")]
    runs = []
    for capture in (dsv3c.capture, capture_blocks):
        program = capture(DEEP, mode, model=model, **SHAPES[mode])
        plan = Plan(program, TARGET, options={"aot": False})
        records = run_pipeline(plan, names, passes.REGISTRY, passes.CAPTURED_OPS)
        args = input_values(program, seed=2)
        with torch.no_grad():
            outs = program(*args)
        runs.append(([{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in records],
                     plan.analyses.costs["per_layer"], plan.analyses.kernels, outs, program.weight_count()))
    (want_rec, *want), (got_rec, *got) = runs
    for w, g in zip(want_rec, got_rec, strict=True):
        assert g == w, w["name"]
    assert got[0] == want[0] and got[1] == want[1] and got[3] == want[3]
    assert list(got[2]) == list(want[2]) and all(torch.equal(got[2][k], want[2][k]) for k in want[2])


def _write_load(path, layers: int, experts: int) -> None:
    """A skewed expert load, different in every MoE layer (so EPLB places each layer's experts its own way)."""
    gen = torch.Generator().manual_seed(7)
    rows = [(torch.rand(experts, generator=gen) ** 4 * 1000).round().tolist() for _ in range(layers)]
    path.write_text(json.dumps({"layers": rows}))


def _plan_of(tmp_path, tag: str, **kw) -> dict:
    plan = compile_model(out=tmp_path / tag, **kw)
    text = json.loads((tmp_path / tag / "plan.json").read_text())
    assert {k: v for k, v in plan.items() if k != "_stages"} == text
    for record in text["passes"]:
        record.pop("seconds")
    return text


CASES = {  # id: (preset, mode, target, --parallel, expert load?)
    "train": ("tiny", "train", "h800x8", "ep=4", True),
    "prefill": ("tiny", "prefill", "h800x16", "auto", True),
    "decode": ("tiny", "decode", "h800x16", "ep=16,redundant=16", True),
    "kimi-decode": ("tiny-kimi-k2", "decode", "h800x8", "auto", False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_compile_of_blocks_equals_the_whole_graphs(tmp_path, case):
    """The plan (all but pass seconds) and report are byte-identical; with an expert-load file each MoE layer has
    its own placement, fan-out and redundant experts, which the program of blocks keeps per instance."""
    preset, mode, target, parallel, load = CASES[case]
    cfg = ModelConfig.preset(preset)
    kw = dict(cfg=cfg, target=target, mode=mode, parallel=parallel, seq=8, cost_options={"global_batch": 16})
    if mode == "decode":
        kw.update(seq=1, kv_len=8)
    if load:
        _write_load(tmp_path / "load.json", cfg.num_hidden_layers - cfg.first_k_dense_replace + 1, cfg.n_routed_experts)
        kw["expert_load"] = tmp_path / "load.json"
    blocks, whole = _plan_of(tmp_path, "blocks", **kw), _plan_of(tmp_path, "whole", whole_graph=True, **kw)
    assert blocks == whole
    assert (tmp_path / "blocks" / "report.txt").read_bytes() == (tmp_path / "whole" / "report.txt").read_bytes()
    if load:
        layers = next(p for p in blocks["passes"] if p["name"] == "expert_partition")["stats"]["layers"]
        assert len({json.dumps({k: v for k, v in r.items() if k != "layer"}) for r in layers}) > 1, layers


def test_verification_catches_instances_that_do_not_fit(model):
    program = capture_blocks(DEEP, "prefill", model=model, seq=4)
    verify(program, passes.CAPTURED_OPS)
    broken = copy.deepcopy(program)
    inst = broken.blocks.of("layers.2")[1]
    node = next(n for n in broken.graph.nodes if n.op == "call_function" and "layers.0" in str(n.meta["nn_module_stack"]))
    broken.blocks.args[(inst.unit, node.name)] = node.args  # a node of another block
    with pytest.raises(VerificationError, match="arguments given for node"):
        verify(broken, passes.CAPTURED_OPS)
    split = copy.deepcopy(program)  # a block's node moved behind the next block: the block is no longer one run
    first = next(n for n in split.graph.nodes if n.op == "call_function" and n.meta["nn_module_stack"]
                 and list(n.meta["nn_module_stack"].values())[-1][0].startswith("layers.0"))
    last = next(n for n in reversed(split.graph.nodes) if n.op == "call_function"
                and str(n.meta["nn_module_stack"]).count("layers.2"))
    with split.graph.inserting_after(last):
        moved = split.graph.node_copy(first)
    first.replace_all_uses_with(moved)
    split.graph.erase_node(first)
    with pytest.raises(BlockError, match="not contiguous"):
        split.blocks.check(split)


def test_a_pass_that_breaks_an_instance_is_reported(model):
    """Per-instance arguments of a node a pass erased are an IR error the pipeline names."""
    program = capture_blocks(DEEP, "prefill", model=model, seq=4)

    def stale(plan, opts):
        p = plan.program
        node = next(n for n in p.graph.nodes if n.op == "call_function" and n.meta.get("nn_module_stack")
                    and list(n.meta["nn_module_stack"].values())[-1][0].startswith("layers.2"))
        p.blocks.args[("layers.3", "no_such_node")] = node.args
        return {}

    registry = {**passes.REGISTRY, "_stale": passes.Pass("_stale", stale, "leaves stale instance arguments")}
    with pytest.raises(PipelineError, match="broke an IR invariant"):
        run_pipeline(Plan(program, TARGET), ["_stale"], registry, passes.CAPTURED_OPS)


def test_an_argument_that_differs_per_layer_is_lowered_per_layer():
    """A kernel attribute one layer sets its own way (an RMSNorm epsilon here) gets that layer its own kernel
    specialisation, and the lowered program still computes what it computed before lowering."""
    from tests.test_lowering import SHAPES as LOWERING_SHAPES, assert_close, transformed

    program, legal = transformed("prefill", LOWERING_SHAPES["prefill"], capture=capture_blocks)
    inst = program.blocks.of("layers.1")[1]  # tiny's layer 2
    norm = next(n for n in program.graph.nodes if n.target is torch.ops.dsv3.rms_norm.default
                and list(n.meta["nn_module_stack"].values())[-1][0].startswith("layers.1"))
    program.blocks.set_args(inst, norm, (*norm.args[:2], 0.5))  # eps 0.5 in layer 2 only
    args = input_values(program, seed=4)
    with torch.no_grad():
        before = program(*args)
    plan = Plan(program, targets.get_target("h800x2048"), options={"aot": False})
    stats = run_pipeline(plan, ["lower_triton"], passes.REGISTRY, legal)[0].stats
    kcs = [n for n in program.graph.nodes if n.target is torch.ops.dsv3.kernel_call.default]
    (kc, (_, kc_args)), = [(n, v) for n in kcs for v in program.blocks.varied(n)]
    assert kc_args[0] != kc.args[0] and {kc.args[0], kc_args[0]} <= {s.id for s in plan.analyses.call_specs}
    assert stats["kernel_calls"] == sum(map(program.times, kcs))
    with torch.no_grad():
        assert_close(program(*args), before)
