"""The pass pipeline: verification catches broken graphs, pipelines replay, failures are reported, figures extrapolate.

Uses the tiny preset only; every capture is a few tenths of a second after the first.
"""

import copy
import dataclasses
import json

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch import fx

import dsv3c
import dsv3c.driver as driver
import passes
import targets
from dsv3c.ir import Plan
from dsv3c.ops import RECORDS, op_name
from dsv3c.passmgr.pipeline import PipelineError, run_pipeline
from dsv3c.frontend.exporter import capture_blocks
from dsv3c.cost.figures import mode_figures
from dsv3c.passmgr.verify import VerificationError, verify
from model_def import ModelConfig

TINY = ModelConfig.preset("tiny")
SHAPES = {
    "train": {"batch": 1, "seq": 8, "kv_len": 0},
    "prefill": {"batch": 1, "seq": 8, "kv_len": 0},
    "decode": {"batch": 1, "seq": 1, "kv_len": 8},
}


@pytest.fixture(scope="module")
def train_program():
    """The tiny model captured for training, once per module (tests deep-copy it)."""
    return dsv3c.capture(TINY, "train", 1, 8)


@pytest.fixture(scope="module")
def programs(train_program):
    """The tiny model captured in each mode."""
    return {"train": train_program, **{m: dsv3c.capture(TINY, m, **SHAPES[m]) for m in ("prefill", "decode")}}


def test_deepcopy_is_independent(train_program):
    """Breaking a copy leaves the fixture intact (the property tests below rely on it)."""
    program = copy.deepcopy(train_program)
    victim = next(n for n in program.graph.nodes if n.op == "call_function")
    victim.meta["val"] = _reshaped(program, victim.meta["val"])
    with pytest.raises(VerificationError):
        verify(program, passes.CAPTURED_OPS)
    verify(train_program, passes.CAPTURED_OPS)


# ---- verification catches every kind of breakage and names the node ------------------------------------

BREAKAGES = ("shape", "dtype", "no_val", "foreign_arg", "erased_arg", "later_arg", "illegal_op", "later_op",
             "weight_shape", "weight_dtype")  # fmt: skip
LATER_OPS = sorted({"latent_attention", "act_quant", "fp8_gemm", "fp8_linear"} - passes.CAPTURED_OPS)


def _tensor_nodes(program) -> list[fx.Node]:
    """call_function nodes whose meta['val'] is one tensor."""
    return [n for n in program.graph.nodes if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)]


def _reshaped(program, val: torch.Tensor, dtype=None) -> torch.Tensor:
    """A fake tensor like val with one more element in its last dim (or a new dim), or another dtype."""
    shape = list(val.shape)
    if dtype is None:
        shape = shape[:-1] + [shape[-1] + 1] if shape else [1]
    with program.fake_mode():
        return torch.empty(shape, dtype=dtype or val.dtype, device=val.device)


def _other_dtype(dtype: torch.dtype) -> torch.dtype:
    """A dtype different from dtype."""
    return torch.float32 if dtype != torch.float32 else torch.bfloat16


def _break(program, kind: str, data) -> tuple[str, set | None]:
    """Break program in place; returns the name the error must mention and the legal op set to verify with."""
    graph = program.graph
    legal = set(passes.CAPTURED_OPS)
    if kind in ("shape", "dtype", "no_val"):
        victim = data.draw(st.sampled_from(_tensor_nodes(program)), label="victim")
        val = victim.meta["val"]
        if kind == "no_val":
            del victim.meta["val"]
        else:
            victim.meta["val"] = _reshaped(program, val, _other_dtype(val.dtype) if kind == "dtype" else None)
        return victim.name, legal
    if kind in ("foreign_arg", "erased_arg", "later_arg"):
        candidates = [n for n in graph.nodes if n.op == "call_function" and n.all_input_nodes]
        victim = data.draw(st.sampled_from(candidates), label="victim")
        old = victim.all_input_nodes[0]
        if kind == "foreign_arg":  # a node of another graph
            other = fx.Graph()
            new = other.placeholder(old.name + "_elsewhere")
        elif kind == "erased_arg":  # a node that was erased while the victim still reads it
            with graph.inserting_before(victim):
                new = graph.call_function(torch.ops.aten.clone.default, (old,))
            new.meta["val"] = old.meta.get("val")
        else:  # a node defined after its user
            with graph.inserting_after(victim):
                new = graph.call_function(torch.ops.aten.clone.default, (old,))
            new.meta["val"] = old.meta.get("val")
        victim.replace_input_with(old, new)
        if kind == "erased_arg":
            new.users.clear()
            graph.erase_node(new)
        return victim.name, legal
    if kind == "illegal_op":  # a captured dsv3 op that is no longer legal: its first node is named
        dsv3_nodes = [n for n in graph.nodes if n.op == "call_function" and op_name(n.target)]
        victim = data.draw(st.sampled_from(dsv3_nodes), label="victim")
        first = next(n for n in dsv3_nodes if op_name(n.target) == op_name(victim.target))
        return first.name, legal - {op_name(victim.target)}
    if kind == "later_op":  # a node calling a dsv3 op that only later passes may introduce
        victim = data.draw(st.sampled_from([n for n in graph.nodes if n.op == "call_function"]), label="victim")
        later = [getattr(torch.ops.dsv3, name).default for name in LATER_OPS]
        victim.target = data.draw(st.sampled_from(later), label="op")
        return victim.name, legal
    # weight_shape / weight_dtype: the tensor held for a placeholder disagrees with its meta['val']
    name = data.draw(st.sampled_from(sorted(program.weights)), label="weight")
    value = program.weights[name]
    if kind == "weight_shape":
        shape = list(value.shape)
        shape = shape[:-1] + [shape[-1] + 1] if shape else [2]
        program.weights[name] = torch.empty(shape, dtype=value.dtype, device=value.device)
    else:
        program.weights[name] = torch.empty(value.shape, dtype=_other_dtype(value.dtype), device=value.device)
    return name, legal


@settings(max_examples=40)
@given(kind=st.sampled_from(BREAKAGES), data=st.data())
def test_verify_catches_breakage_and_names_node(train_program, kind, data):
    program = copy.deepcopy(train_program)
    name, legal = _break(program, kind, data)
    with pytest.raises(VerificationError) as err:
        verify(program, legal)
    assert f"'{name}'" in str(err.value), (kind, name, str(err.value))


@pytest.mark.parametrize("mode", ["train", "prefill", "decode"])
def test_unmodified_graph_verifies_through_default_pipeline(programs, mode):
    """Capture output verifies, and stays valid after every pass of the default pipeline (checked per pass); each
    dsv3 op first appears at the stage its record names (capture, or the pass that creates it)."""
    program = copy.deepcopy(programs[mode])
    verify(program, passes.CAPTURED_OPS)
    plan = Plan(program, targets.get_target("h800x8"))
    names, first = passes.default_pipeline(), {}

    def note_ops(stage: str) -> None:
        for node in plan.program.graph.nodes:
            if node.op == "call_function" and op_name(node.target):
                first.setdefault(op_name(node.target), stage)

    # progress is called before each pass: the graph is then the previous stage's
    records = run_pipeline(plan, names, passes.REGISTRY, passes.CAPTURED_OPS,
                           progress=lambda i, total, name: note_ops(names[i - 2] if i > 1 else "capture"))
    note_ops(names[-1])
    assert [r.name for r in records] == passes.default_pipeline()
    assert all(r.nodes_after > 0 for r in records)
    assert first == {op: RECORDS[op].stage for op in first}
    assert {"capture", "expert_partition", "lower_triton"} <= set(first.values())


# ---- pipelines replay from pipeline.txt ------------------------------------------------------------------


@pytest.fixture
def fast_compile(monkeypatch):
    """compile_model with capture and model figures memoised (both are independent of the pass list)."""
    real_figures = driver.model_figures
    captured = {}

    def memoised(real):
        def capture(cfg, mode, model=None, **shapes):
            key = (real.__name__, cfg.name, mode, tuple(sorted(shapes.items())))
            if key not in captured:
                captured[key] = real(cfg, mode, model=model, **shapes)
            return copy.deepcopy(captured[key])

        return capture

    monkeypatch.setattr(driver, "capture", memoised(driver.capture))
    monkeypatch.setattr(driver, "capture_blocks", memoised(driver.capture_blocks))
    figures = {}

    def model_figures(cfg, target, registry, options=None, program=None):
        if cfg.name not in figures:
            figures[cfg.name] = real_figures(cfg, target, registry, options, program)
        return copy.deepcopy(figures[cfg.name])

    monkeypatch.setattr(driver, "model_figures", model_figures)
    return driver.compile_model


def _comparable(plan: dict) -> dict:
    """The plan without run-dependent values (passes[*].seconds, _stages)."""
    plan = json.loads(json.dumps({k: v for k, v in plan.items() if k != "_stages"}))
    for record in plan["passes"]:
        record.pop("seconds")
    return plan


def _legal_order(names: list[str]) -> bool:
    """Whether the pass order passes the registry's run-after/invalidates rules (dsv3c.validate)."""
    from dsv3c.driver import OptionError
    from dsv3c.validate import check_pass_order

    try:
        check_pass_order(names, passes.REGISTRY)
        return True
    except OptionError:
        return False


def _compile_or_error(compile_model, names: str, mode: str, tmp, tag: str):
    """(plan or None, error message or None) of a tiny compile."""
    try:
        plan = compile_model(TINY, target="h800x8", mode=mode, out=tmp / f"out-{tag}", pipeline=names,
                             dump_dir=tmp / f"dump-{tag}", **SHAPES[mode])  # fmt: skip
        return _comparable(plan), None
    except PipelineError as e:
        return None, str(e)


@settings(max_examples=10, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(names=st.lists(st.sampled_from(sorted(passes.REGISTRY)), min_size=1, max_size=4),
       mode=st.sampled_from(sorted(SHAPES)))  # fmt: skip
@example(names=passes.default_pipeline(), mode="train")
@example(names=passes.default_pipeline(), mode="prefill")
@example(names=passes.default_pipeline(), mode="decode")
def test_pipeline_txt_replays_identically(fast_compile, tmp_path_factory, names, mode):
    assume(_legal_order(names))
    tmp = tmp_path_factory.mktemp("replay")
    first, first_error = _compile_or_error(fast_compile, ",".join(names), mode, tmp, "a")
    lines = (tmp / "dump-a" / "pipeline.txt").read_text().splitlines()
    assert [name for name, _ in passes.parse_pipeline(lines[0])] == names  # with the options the compile chose
    options = dict(line.split("=", 1) for line in lines[1:])
    assert options == {"mode": mode, "target": "h800x8", **{k: str(v) for k, v in SHAPES[mode].items() if v}}
    second, second_error = _compile_or_error(fast_compile, lines[0], options["mode"], tmp, "b")
    assert second_error == first_error
    assert second == first
    if first is not None:
        assert [p["name"] for p in first["passes"]] == names
        stems = sorted(p.name for p in (tmp / "dump-b").glob("*.stats.json"))
        assert stems == [f"{i:02d}_{n}.stats.json" for i, n in enumerate(names, 1)]


# ---- a failing pass is named, its input dumped, the reproducer printed -----------------------------------


@pytest.fixture
def bad_passes():
    """Two temporary passes: 'test_boom' raises, 'test_corrupt' leaves a wrong meta['val']; removed afterwards."""

    def boom(plan, opts):
        raise RuntimeError("test pass exploded\nsecond line")

    corrupted = []

    def corrupt(plan, opts):
        victim = _tensor_nodes(plan.program)[7]
        victim.meta["val"] = _reshaped(plan.program, victim.meta["val"])
        corrupted.append(victim.name)
        return {}

    added = {"test_boom": boom, "test_corrupt": corrupt}
    assert not set(added) & set(passes.REGISTRY)
    for name, fn in added.items():
        passes.REGISTRY[name] = passes.Pass(name, fn, "test only")
    try:
        yield corrupted
    finally:
        for name in added:
            passes.REGISTRY.pop(name, None)


@pytest.mark.parametrize("bad, kind", [("test_boom", "failed: test pass exploded"),
                                       ("test_corrupt", "broke an IR invariant: node '")])  # fmt: skip
def test_failing_pass_is_reported_with_reproducer(bad_passes, fast_compile, tmp_path, bad, kind):
    repro = f"dsv3c compile --target h800x8 --model tiny --passes dce,{bad}"
    out = tmp_path / "out"
    with pytest.raises(PipelineError) as err:
        fast_compile(TINY, target="h800x8", mode="prefill", out=out, pipeline=f"dce,{bad}",
                     dump_dir=tmp_path / "dump", repro=repro, **SHAPES["prefill"])  # fmt: skip
    msg = str(err.value)
    assert msg.startswith(f"pass '{bad}' {kind}")
    assert "\n" not in msg
    failed = tmp_path / "dump" / f"02_{bad}.FAILED.input.graph.txt"
    assert str(failed) in msg
    assert msg.endswith(f"reproduce with: {repro}")
    text = failed.read_text()
    assert text.splitlines()[0] == f"# reproduce with: {repro}"
    # the dumped input is the graph the failing pass received: the output of dce
    assert text.split("\n", 1)[1] == (tmp_path / "dump" / "01_dce.graph.txt").read_text()
    if bad == "test_corrupt":
        assert f"node '{bad_passes[0]}'" in msg
    # nothing published, no staging directory left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump"]


def test_cli_reports_failing_pass(bad_passes, fast_compile, tmp_path, capsys, monkeypatch):
    """The CLI turns a pass failure into one 'dsv3c: error:' line with its own command line, exit status 1."""
    from dsv3c import cli

    monkeypatch.chdir(tmp_path)
    argv = ["compile", "--target", "h800x8", "--model", "tiny", "--seq", "8", "--passes", "dce,test_boom",
            "--dump-dir", "d", "--out", "o"]  # fmt: skip
    assert cli.main(argv) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[")]  # progress
    assert len(err) == 1
    assert err[0].startswith("dsv3c: error: pass 'test_boom' failed: test pass exploded")
    assert err[0].endswith("reproduce with: dsv3c compile " + " ".join(argv[1:]))
    assert (tmp_path / "d" / "02_test_boom.FAILED.input.graph.txt").exists()
    assert not (tmp_path / "o").exists()


# ---- the model figures of the program of blocks are the full-depth graph's ------------------------------------------

EXTRAPOLATION_SHAPES = {
    "train": {"batch": 1, "seq": 2, "kv_len": 0},  # MTP training needs seq >= 2
    "prefill": {"batch": 1, "seq": 1, "kv_len": 0},  # one token: the per-token figure is the exact total
    "decode": {"batch": 1, "seq": 1, "kv_len": 8},
}


def _full_depth_figures(cfg, mode: str, shapes: dict) -> dict:
    """Total FLOPs (and KV cache bytes) of the full-depth graph after the passes mode_figures runs."""
    plan = Plan(dsv3c.capture(cfg, mode, **shapes), targets.get_target("h800x8"))
    program = plan.program
    registry = passes.REGISTRY
    registry["dce"].fn(plan, {})
    out = {}

    def cache_bytes():
        past = [n for n in program.placeholders() if n.name.startswith("past_")]
        main = [n for n in past if int(n.name.split("_")[1]) < cfg.num_hidden_layers]
        assert len(main) == 2 * cfg.num_hidden_layers
        return sum(n.meta["val"].numel() * n.meta["val"].element_size() for n in main)

    if mode == "decode":
        out["kv_naive"] = cache_bytes()
        if "mla_fuse" in registry:
            registry["mla_fuse"].fn(plan, {})
            out["kv_latent"] = cache_bytes()
    else:
        registry["mla_fuse"].fn(plan, {})
    registry["cost"].fn(plan, {})
    total = plan.analyses.costs["total"]
    out["flops"] = 3 * total["flops"] if mode == "train" else total["flops"]
    return out


def _layered(dense: int, moe: int) -> ModelConfig:
    return dataclasses.replace(TINY, num_hidden_layers=dense + moe, first_k_dense_replace=dense)


@pytest.mark.parametrize("mode", ["train", "prefill", "decode"])
def test_summary_extrapolation_equals_full_depth_cost(mode):
    cfg = _layered(dense=3, moe=4)
    shapes = EXTRAPOLATION_SHAPES[mode]
    assert [i.block for i in capture_blocks(cfg, mode, **shapes).blocks.instances] == [
        "layers.0"] * 3 + ["layers.3"] * 4 + ["mtp.0"]  # the figures capture one dense and one MoE block
    tokens = shapes["batch"] * shapes["seq"]
    figures = mode_figures(cfg, mode, targets.get_target("h800x8"), passes.REGISTRY, shapes)
    full = _full_depth_figures(cfg, mode, shapes)
    assert figures["model"] == full["flops"] // tokens
    if mode == "decode":
        kv_len = shapes["kv_len"]
        assert figures["kv_naive"] * kv_len == full["kv_naive"]
        if "kv_latent" in full:
            assert figures["kv_latent"] * kv_len == full["kv_latent"]
            assert figures["kv_latent"] < figures["kv_naive"]


@settings(max_examples=6)
@given(dense=st.integers(0, 2), moe=st.integers(0, 2), excess=st.integers(0, 2), mode=st.sampled_from(sorted(SHAPES)))
def test_summary_extrapolation_any_block_mix(dense, moe, excess, mode):
    """Also all-dense (first_k_dense_replace beyond the depth) and all-MoE configs."""
    if dense + moe == 0:
        dense = 1
    cfg = _layered(dense, moe)
    if moe == 0:
        cfg = dataclasses.replace(cfg, first_k_dense_replace=dense + excess)
    shapes = EXTRAPOLATION_SHAPES[mode]
    figures = mode_figures(cfg, mode, targets.get_target("h800x8"), passes.REGISTRY, shapes)
    full = _full_depth_figures(cfg, mode, shapes)
    assert figures["model"] == full["flops"] // (shapes["batch"] * shapes["seq"])
