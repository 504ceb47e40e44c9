"""Issue 13, case by case: every input the issue lists gives one clean error line (exit 2) or a correct output."""

import json
import math
import os
import re
import signal
from pathlib import Path

import pytest

import passes
from dsv3c import cli
from dsv3c.outdir import MARKER
from dsv3c.runtime.executor import RunResult
from dsv3c.schema import PlanError, plan_json
from dsv3c.units import target_value
from model_def.config import TINY
from tests.cli_harness import check_one_clean_error, plan_problems

BASE = ["compile", "--target", "h800x8", "--model", "tiny"]
CFG = ["compile", "--target", "h800x8", "--config", "c.json"]
TOML_OK = 'name = "c"\ngpu = "h800"\ngpus = 8\n'


def cfg(**changes) -> bytes:
    """The tiny config with changes, as JSON bytes (NaN literals allowed)."""
    return json.dumps({**TINY, **changes}).encode()


STATS = json.dumps({"name": "dce", "seconds": 0.1, "nodes_before": 2, "nodes_after": 1, "stats": {}}).encode()
GRAPH = b"x = f(y)  # layers.0\nz = g(x)  # layers.2\n"

CASES = {  # name: (argv, files, dirs, words the error line holds)
    "out_foreign_dir": (BASE + ["--out", "precious"], {}, [], "did not write"),
    "config_random_bytes": (CFG, {"c.json": bytes(range(256))}, [], "c.json"),
    "config_non_utf8": (CFG, {"c.json": b'{"a": "\xff\xfe"}'}, [], "not UTF-8"),
    "rope_beta_fast_string": (CFG, {"c.json": cfg(rope_scaling={**TINY["rope_scaling"], "beta_fast": "fast"})}, [],
                              "rope_scaling.beta_fast"),
    "target_toml_is_dir": (["compile", "--target", "t.toml", "--model", "tiny"], {}, ["t.toml"], "t.toml"),
    "dump_dir_is_file": (BASE + ["--dump-dir", "precious/notes.txt"], {}, [], "not a directory"),
    "dump_dir_unwritable": (BASE + ["--dump-dir", "precious/notes.txt/sub"], {}, [], "not a directory"),
    "out_dot": (BASE + ["--out", "."], {}, [], "'.'"),
    "out_dotdot": (BASE + ["--out", ".."], {}, [], "'..'"),
    "inspect_corrupt_stats": (["inspect", "d"], {"d/01_dce.stats.json": b"{not json"}, [], "no usable pass dumps"),
    "inspect_incomplete_stats": (["inspect", "d"], {"d/01_dce.stats.json": STATS[:30]}, [], "no usable"),
    "inspect_missing_graph": (["inspect", "d", "--diff", "1", "1"], {"d/01_dce.stats.json": STATS}, [], "graph.txt is missing"),
    "inspect_layer_99": (["inspect", "d", "--diff", "1", "1", "--layer", "99"],
                         {"d/01_dce.stats.json": STATS, "d/01_dce.graph.txt": GRAPH}, [], "layers 0..2"),
    "inspect_layer_minus_1": (["inspect", "d", "--diff", "1", "1", "--layer", "-1"],
                              {"d/01_dce.stats.json": STATS, "d/01_dce.graph.txt": GRAPH}, [], "--layer -1"),
    "run_seq_100000": (["run", "--seq", "100000"], {}, [], "max_position_embeddings"),
    "run_decode_kv_100000": (["run", "--mode", "decode", "--kv-len", "100000"], {}, [], "max_position_embeddings"),
    "run_batch_1e8": (["run", "--batch", "100000000"], {}, [], "GB"),
    "run_prefill_kv_len": (["run", "--kv-len", "8"], {}, [], "--kv-len"),
    "toml_arch_banana": (["compile", "--target", "t.toml", "--model", "tiny"],
                         {"t.toml": (TOML_OK + '[gpu_overrides]\narch = "banana"\n').encode()}, [], "banana"),
    "toml_smem_1024": (["compile", "--target", "t.toml", "--model", "tiny"],
                       {"t.toml": (TOML_OK + "[gpu_overrides]\nsmem_per_block = 1024\n").encode()}, [], "1024"),
    "toml_nic_nan": (["compile", "--target", "t.toml", "--model", "tiny"],
                     {"t.toml": (TOML_OK + "nic_gbps = nan\n").encode()}, [], "nic_gbps"),
    "target_named_evil": (["compile", "--target", "t.toml", "--model", "tiny"],
                          {"t.toml": TOML_OK.replace('"c"', '"../../evil"').encode()}, [], "../../evil"),
    "target_spec_evil": (["compile", "--target", "../../evil", "--model", "tiny"], {}, [], "../../evil"),
    "passes_lower_then_fp8": (BASE + ["--passes", "lower_triton,fp8_quant"], {}, [],
                              "'fp8_quant' cannot run after 'lower_triton'"),
    "passes_fp8_before_mla": (BASE + ["--passes", "fp8_quant,mla_fuse,lower_triton"], {}, [],
                              "'fp8_quant' must run after 'mla_fuse'"),
    "passes_empty": (BASE + ["--passes", ""], {}, [], "--passes is empty"),
    "rms_norm_eps_nan": (CFG, {"c.json": cfg(rms_norm_eps=math.nan)}, [], "rms_norm_eps"),
    "rope_theta_inf": (CFG, {"c.json": cfg(rope_theta=math.inf)}, [], "rope_theta"),
    "block_64": (CFG, {"c.json": cfg(quantization_config={"weight_block_size": [64, 64]})}, [], "weight_block_size"),
    "block_0": (CFG, {"c.json": cfg(quantization_config={"weight_block_size": [0, 0]})}, [], "weight_block_size"),
    "train_kv_len": (BASE + ["--mode", "train", "--kv-len", "4096"], {}, [], "--kv-len"),
    "batch_grid": (BASE + ["--batch", "1000000000"], {}, [], "CUDA's limit"),
    "batch_heads_grid": (BASE + ["--batch", "20000", "--seq", "1"], {}, [], "grid y"),
    "heads_not_dividing_experts": (CFG, {"c.json": cfg(n_group=3)}, [], "n_group"),
    "dump_mlir_without_dump_dir": (BASE + ["--dump-mlir", "1"], {}, [], "--dump-dir"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_issue_case_is_one_clean_error(capsys, name):
    check_one_clean_error(capsys, CASES[name])


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip().startswith("dsv3c 0.")


def test_plan_is_strict_json():
    """NaN/inf in a plan are an error at write time, not a bare NaN in plan.json."""
    with pytest.raises(PlanError, match="non-finite"):
        plan_json({"x": math.nan})
    with pytest.raises(PlanError, match="missing key 'mode'"):
        plan_json({"dsv3c_version": "0", "model": {}, "target": {}, "shapes": {}, "passes": [], "weights": {},
                   "kernels": []})  # fmt: skip


def test_report_units():
    assert target_value("hbm_bandwidth", 3.35e12) == "3.35 TB/s"
    assert target_value("fp8_flops", 1979e12) == "1,979 TFLOPS"
    assert target_value("hbm_bytes", 81559 * 1024**2) == "85.5 GB"
    assert target_value("gpus", 8) == 8


def test_run_result_with_nan_is_not_a_pass():
    r = RunResult("prefill", "cpu", math.nan, math.nan, math.nan, math.nan, math.nan, 1, 1, {})
    assert not r.ok and "FAIL" in r.lines()[-1] and "1.000" not in r.lines()[1]


def test_readme_inspect_example_layer_exists():
    """The README's `inspect --diff ... --layer N` example names a layer of the tiny dumps it shows (3 layers)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    layers = [int(n) for n in re.findall(r"dsv3c inspect \S+ --diff \S+ \S+ --layer (\d+)", readme)]
    assert layers and all(0 <= n < TINY["num_hidden_layers"] for n in layers)


def test_pass_contracts_are_declared():
    assert "mla_fuse" in passes.REGISTRY["fp8_quant"].after
    assert {"fp8_quant", "mla_fuse", "cost"} <= passes.REGISTRY["lower_triton"].invalidates
    assert "dce" not in passes.REGISTRY["lower_triton"].invalidates  # dce is op-agnostic: it may follow lowering


# ---- the few cases that compile: marker, replacement, schema, progress, signals ------------------------


def _compile(capsys, tmp_path, monkeypatch, extra=()):
    """A cheap tiny compile in tmp_path (dce,cost at seq 8); (exit status, stderr lines)."""
    monkeypatch.chdir(tmp_path)
    rc = cli.main(BASE + ["--seq", "8", "--passes", "dce,cost", "--out", "out", *extra])
    return rc, capsys.readouterr().err.splitlines()


def test_compile_marks_replaces_and_validates(capsys, tmp_path, monkeypatch):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep\n")
    rc, err = _compile(capsys, tmp_path, monkeypatch, ["--dump-dir", "dumps"])
    assert rc == 0, err
    assert err == ["[1/2] dce", "[2/2] cost"]  # one progress line per pass, no carriage returns, no warnings
    assert (tmp_path / "out" / MARKER).read_text().startswith("dsv3c ")
    assert (tmp_path / "dumps" / MARKER).is_file()
    assert plan_problems(tmp_path / "out" / "plan.json") == []
    assert "TB/s" in (tmp_path / "out" / "report.txt").read_text()
    (tmp_path / "dumps" / "stale.txt").write_text("mine")  # a user's file inside dsv3c's dumps: never deleted
    rc, err = _compile(capsys, tmp_path, monkeypatch, ["--dump-dir", "dumps"])
    assert rc == 2 and "stale.txt" in err[0], err
    assert (tmp_path / "dumps" / "stale.txt").read_text() == "mine"
    (tmp_path / "dumps" / "stale.txt").unlink()
    rc, err = _compile(capsys, tmp_path, monkeypatch, ["--dump-dir", "dumps"])  # only what dsv3c wrote: replaced
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dumps", "out", "precious"]
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep\n"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signal_during_compile_cleans_up(capsys, tmp_path, monkeypatch, signum):
    """SIGTERM/SIGHUP mid-compile: exit 128+signal, no staging directory or plan left behind."""

    def killer(program, ctx):
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal should have interrupted this pass")

    passes.REGISTRY["test_kill"] = passes.Pass("test_kill", killer, "test only")
    try:
        monkeypatch.chdir(tmp_path)
        rc = cli.main(BASE + ["--seq", "8", "--passes", "dce,test_kill", "--out", "build/out"])
    finally:
        passes.REGISTRY.pop("test_kill")
    assert rc == 128 + signum
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signum) is not None  # handlers restored
