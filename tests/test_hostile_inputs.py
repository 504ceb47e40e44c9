"""Issue 21, case by case: bounded work for every input, every number checked, inputs read safely, outputs checked,
and nothing deleted that dsv3c did not write. Each case gives exit 2 with one line naming the problem (or exit 0)."""

import json
import os
import signal
from pathlib import Path

import pytest

import passes
from dsv3c import bounds, cli, inputs, outdir
from dsv3c.outdir import MARKER
from model_def.config import TINY as TINY_CONFIG
from tests.cli_harness import check_one_clean_error, listing

TINY = ["--model", "tiny", "--target", "h800x8"]
CHEAP = ["--seq", "8", "--passes", "dce"]
SCHED = ["schedule", "--kind", "1f1b", "--pp", "2", "--micro-batches", "4"]
TOML = 'name = "c"\ngpu = "h800"\ngpus = {gpus}\n'


def toml(gpus: int = 8, extra: str = "") -> bytes:
    """A target TOML of gpus H800s with extra lines."""
    return (TOML.format(gpus=gpus) + extra).encode()


def load(rows) -> bytes:
    """An expert-load JSON (NaN literals allowed)."""
    return json.dumps({"layers": rows}).encode()


CASES = {  # name: (argv, files, dirs, words the one error line holds)
    "toml_switch_radix_1": (["compile", "--model", "tiny", "--target", "t.toml", *CHEAP],
                            {"t.toml": toml(64, "switch_radix = 1\n")}, [], "switch_radix must be at least 2"),
    "parallel_unicode_digit": (["compile", *TINY, *CHEAP, "--parallel", "pp=²"], {}, [], "--parallel pp"),
    "parallel_redundant_1e6": (["compile", *TINY, *CHEAP, "--parallel", "redundant=1000000"], {}, [],
                               "layers x slots^2"),
    "expert_load_nested_1e5": (["compile", *TINY, *CHEAP, "--expert-load", "l.json"],
                               {"l.json": b"[" * 100000 + b"]" * 100000}, [], "deeper than 32 levels"),
    "expert_load_5000_digits": (["compile", *TINY, *CHEAP, "--expert-load", "l.json"],
                                {"l.json": b'{"layers": [[' + b"9" * 5000 + b"]]}"}, [], "5,000 digits"),
    "set_denormal": (["compile", *TINY, *CHEAP, "--mode", "train", "--set", "ib_GBps=1e-320"], {}, [],
                     "'ib_GBps' = 1e-320 is too small"),
    "trace_is_dir": (SCHED + ["--trace", "precious"], {}, [], "is a directory"),
    "trace_missing_folder": (SCHED + ["--trace", "missing/t.json"], {}, [], "does not exist"),
    "trace_under_file": (SCHED + ["--trace", "precious/notes.txt/t.json"], {}, [], "is not a directory"),
    "svg_missing_folder": (SCHED + ["--svg", "missing/t.svg"], {}, [], "does not exist"),
    "svg_under_file": (SCHED + ["--svg", "precious/notes.txt/t.svg"], {}, [], "is not a directory"),
    "run_ranks_batch_1e9": (["run", "--ranks", "2", "--batch", "1000000000"], {}, [], "GB limit"),
    "run_expert_load_out_under_file": (["run", "--ranks", "2", "--expert-load-out", "precious/notes.txt/l.json"],
                                       {}, [], "is not a directory"),
    "compile_micro_batches_1e9": (["compile", *TINY, "--mode", "train", "--micro-batches", "1000000000"], {}, [],
                                  "over the 2,097,152 the cost model simulates"),
    "compile_global_batch_1e18": (["compile", *TINY, "--mode", "train", "--global-batch", str(10**18)], {}, [],
                                  "over the 2,097,152 the cost model simulates"),
    "schedule_zb1p_huge": (["schedule", "--kind", "zb1p", "--pp", "100000", "--micro-batches", "200000"], {}, [],
                           "over the 65,536"),
    "schedule_dualpipev_1000_2000": (["schedule", "--kind", "dualpipev", "--pp", "1000", "--micro-batches", "2000"],
                                     {}, [], "over the 65,536"),
    "durations_nan": (SCHED + ["--durations", "F=nan"], {}, [], "'F=nan'"),
    "durations_inf": (SCHED + ["--durations", "F=inf"], {}, [], "'F=inf'"),
    "comm_nan": (SCHED + ["--comm", "nan"], {}, [], "--comm"),
    "comm_negative": (SCHED + ["--comm", "-5"], {}, [], "--comm"),
    "comm_inf": (SCHED + ["--comm", "inf"], {}, [], "--comm"),
    "gpu_override_non_finite_figures": (["compile", "--model", "tiny", "--target", "t.toml", *CHEAP],
                                        {"t.toml": toml(8, "[gpu_overrides]\nhbm_bandwidth = 1e-300\n")}, [],
                                        "gpu_overrides.hbm_bandwidth"),
    "expert_load_nan": (["compile", *TINY, *CHEAP, "--expert-load", "l.json"],
                        {"l.json": load([[float("nan")] * 16] * 3)}, [], "invalid count nan"),
    "expert_load_overflowing": (["compile", *TINY, *CHEAP, "--expert-load", "l.json"],
                                {"l.json": load([[1e308] * 16] * 3)}, [], "invalid count 1e+308"),
    "out_empty": (["compile", *TINY, *CHEAP, "--out", ""], {}, [], "--out is empty"),
    "global_batch_unicode": (["compile", *TINY, "--global-batch", "١٠"], {}, [], "digits 0-9"),
    "seed_too_large": (["run", "--seed", str(2**64)], {}, [], "--seed"),
    "tokens_over_bound": (["run", "--mode", "decode", "--tokens", "100000"], {}, [], "--tokens 100,000"),
    # found by the generated fuzzer (tests/test_fuzz_cli.py)
    "yarn_rope_theta_1": (["compile", "--target", "h800x8", "--config", "c.json", *CHEAP],
                          {"c.json": json.dumps({**TINY_CONFIG, "rope_theta": 1}).encode()}, [],
                          "rope_theta must exceed 1"),
    "run_ranks_ignoring_kv_len": (["run", "--ranks", "2", "--kv-len", "99999999"], {}, [], "--kv-len"),
    "run_pp_ignoring_tokens": (["run", "--pp", "1", "--tokens", "1185643"], {}, [], "--pp (a pipelined training step) does not apply"),
    "run_pp_micro_batches_over_bound": (["run", "--pp", "2", "--micro-batches", "5000"], {}, [],
                                        "--micro-batches 5,000"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_issue_case_is_one_clean_error(capsys, name):
    check_one_clean_error(capsys, CASES[name])


# ---- inputs that never end: FIFOs and devices are refused without being read ----------------------------------


SPECIAL = {  # name: (argv, the special file's path, what it is)
    "config_fifo": (["compile", "--target", "h800x8", "--config", "f.json"], "f.json", "FIFO"),
    "target_fifo": (["compile", "--model", "tiny", "--target", "f.toml"], "f.toml", "FIFO"),
    "expert_load_fifo": (["compile", *TINY, *CHEAP, "--expert-load", "f.json"], "f.json", "FIFO"),
    "stats_fifo": (["inspect", "d"], "d/01_dce.stats.json", "FIFO"),
    "stats_dev_zero": (["inspect", "d"], "d/01_dce.stats.json", "character device"),
}


@pytest.mark.parametrize("name", sorted(SPECIAL))
def test_special_files_are_refused_not_read(capsys, tmp_path, monkeypatch, name):
    """A FIFO or a link to /dev/zero where an input file is wanted: one line, at once (a read would block)."""
    argv, path, kind = SPECIAL[name]
    monkeypatch.chdir(tmp_path)
    Path("d").mkdir()
    if kind == "FIFO":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"is a {kind}, not a regular file" in err[0], err


def test_read_capped_limits(tmp_path):
    f = tmp_path / "f.json"
    f.write_bytes(b"[1, 2]")
    assert inputs.load_json(f, "x", 100) == [1, 2]
    with pytest.raises(ValueError, match="larger than 5 bytes"):
        inputs.read_capped(f, "x", 5)
    with pytest.raises(ValueError, match="is a directory"):
        inputs.read_capped(tmp_path, "x", 100)


def test_json_depth_ignores_brackets_inside_strings():
    assert inputs.json_depth('{"a": "[[[[[[", "b": [[1]]}') == 3
    assert inputs.json_depth(r'["\"[[[", []]') == 2
    assert inputs.parse_json('{"a": "' + "[" * 100 + '"}', "x") == {"a": "[" * 100}
    with pytest.raises(ValueError, match="deeper than 32"):
        inputs.parse_json("[" * 33 + "]" * 33, "x")
    assert inputs.parse_json("[" * 32 + "]" * 32, "x") is not None
    with pytest.raises(ValueError, match="20 digits"):
        inputs.parse_json("[-" + "1" * 20 + "]", "x")


# ---- bounds ------------------------------------------------------------------------------------------------


def test_bounds_parse_int():
    assert bounds.parse_int("16", "--pp", 1) == 16
    for text in ["²", "١٠", "1e3", "1_0", "", "0x10", "9" * 5000]:
        with pytest.raises(bounds.BoundError):
            bounds.parse_int(text, "--pp", 1)
    with pytest.raises(bounds.BoundError, match="at most 10"):
        bounds.parse_int("11", "x", 1, 10)


def test_train_work_bound_keeps_every_default():
    """The default global batch (15360) passes the bound for DeepSeek-V3 on any GPU count; 10x it on 8 GPUs not."""
    from model_def import ModelConfig

    cfg = ModelConfig.preset("deepseek-v3")
    for gpus in (1, 8, 16, 56, 64, 2048, 65536):
        bounds.check_train_work(cfg, gpus, 15360, None)
    with pytest.raises(bounds.BoundError, match="--global-batch 153,600"):
        bounds.check_train_work(cfg, 64, 153600, None)


def test_schedule_bound_counts_stages_times_micro_batches():
    """DualPipeV holds two stages per rank: pp 16 x 2 stages x 2048 micro-batches is at the bound, 2049 over it."""
    from dsv3c.schedules import ScheduleError

    bounds.check_schedule_size("dualpipev", 16, 2048)
    bounds.check_schedule_size("1f1b", 16, 4096)
    with pytest.raises(ScheduleError, match="65,568 stage x micro-batch slots"):
        bounds.check_schedule_size("dualpipev", 16, 2049)


# ---- defaults that work ------------------------------------------------------------------------------------


def test_decode_defaults_fit_the_model(capsys, tmp_path, monkeypatch):
    """`compile --model tiny --target h800x8 --mode decode` with its own defaults: kv_len shrinks, the report says so."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compile", *TINY, "--mode", "decode", "--passes", "dce", "--out", "o"]) == 0, capsys.readouterr()
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert plan["shapes"] == {"batch": 1, "seq": 1, "kv_len": 4095}
    assert "kv_len 4095 used" in plan["shapes_notes"][0]
    assert "kv_len 4095 used" in (tmp_path / "o" / "report.txt").read_text()
    assert cli.main(["compile", *TINY, "--mode", "decode", "--kv-len", "4096", "--passes", "dce", "--out", "p"]) == 2


def test_decode_on_one_gpu_compiles(capsys, tmp_path, monkeypatch):
    """One GPU has no communication: every figure stays finite (exit 1 before, found by the fuzzer)."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compile", "--model", "tiny", "--target", "h800x1", "--mode", "decode", "--passes", "dce,cost",
                     "--out", "o"]) == 0, capsys.readouterr().err  # fmt: skip
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert plan["inference"]["tpot_seconds"] > 0 and plan["inference"]["communication_per_micro_batch"] == {}


# ---- outputs: a foreign file survives every command ---------------------------------------------------------


def _quiet(capsys, argv) -> int:
    """main(argv), its output discarded; the exit status."""
    rc = cli.main(argv)
    capsys.readouterr()
    return rc


def test_foreign_file_survives_every_command(capsys, tmp_path, monkeypatch):
    """A user's file put into each output directory dsv3c wrote (or beside each output file) survives every command,
    and refusing names it."""
    monkeypatch.chdir(tmp_path)
    compile_ = ["compile", *TINY, *CHEAP, "--out", "out", "--dump-dir", "dumps"]
    assert _quiet(capsys, compile_) == 0
    assert set(outdir.manifest("out")) == {"plan.json", "report.txt"}
    assert {"pipeline.txt", "01_dce.stats.json"} <= set(outdir.manifest("dumps"))
    Path("sched").mkdir()
    for d in ("out", "dumps", "sched"):
        (tmp_path / d / "mine.txt").write_text(d)
    (tmp_path / "out" / "sub").mkdir()
    (tmp_path / "out" / "sub" / "deep.txt").write_text("deep")
    before = listing(tmp_path)
    commands = [compile_, ["compile", *TINY, *CHEAP, "--out", "out"], ["compile", *TINY, *CHEAP, "--out", "o2",
                                                                       "--dump-dir", "dumps"],
                SCHED + ["--trace", "sched/t.json", "--svg", "sched/t.svg"], ["inspect", "dumps"]]  # fmt: skip
    for argv in commands:
        _quiet(capsys, argv)
        after = listing(tmp_path)
        assert all(after.get(p) == h for p, h in before.items() if "mine" in p or "deep" in p), argv
    assert cli.main(compile_) == 2
    err = capsys.readouterr().err
    assert "mine.txt" in err and "sub/" in err


def test_marker_that_is_a_link_is_not_dsv3cs(capsys, tmp_path, monkeypatch):
    """A directory whose .dsv3c-output is a symlink to a file reading 'dsv3c 0.1.0' is not taken as dsv3c's."""
    monkeypatch.chdir(tmp_path)
    Path("theirs").mkdir()
    Path("theirs/data.txt").write_text("keep")
    Path("fake").write_text("dsv3c 0.1.0\ndata.txt\n")
    os.symlink("../fake", "theirs/" + MARKER)
    assert cli.main(["compile", *TINY, *CHEAP, "--out", "theirs"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert Path("theirs/data.txt").read_text() == "keep"


def test_manifest_cannot_delete_outside(tmp_path):
    """A marker listing '..', absolute paths or paths through a link deletes nothing outside its directory."""
    (tmp_path / "victim.txt").write_text("keep")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "f.txt").write_text("keep")
    d = tmp_path / "d"
    d.mkdir()
    (d / "link").symlink_to(elsewhere)
    (d / MARKER).write_text(f"dsv3c 0.1.0\n../victim.txt\n{tmp_path}/victim.txt\nlink/f.txt\n")
    assert outdir.remove_owned(d) == ["link"]
    assert (tmp_path / "victim.txt").read_text() == "keep" and (elsewhere / "f.txt").read_text() == "keep"


def test_output_file_checks(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "l").symlink_to(tmp_path / "f")
    for path, words in [("", "must name a file"), (tmp_path, "is a directory"), (tmp_path / "l", "symbolic link"),
                        (tmp_path / "no" / "t.json", "does not exist"), (tmp_path / "f" / "t.json", "not a directory"),
                        (f"{tmp_path}/x/", "must name a file")]:
        with pytest.raises(outdir.OutputError, match=words):
            outdir.check_output_file(path, "--trace")
    assert outdir.check_output_file(tmp_path / "f", "--trace") == tmp_path / "f"  # a file the user named: replaced


# ---- signals ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_while_making_the_output_leaves_nothing(capsys, tmp_path, monkeypatch, signum):
    """A signal while the staging directory is being made (new parents, new dump dir) is held until it exists,
    then unwinds through the cleanup: no staging, no new empty directory, exit 128 + signal."""
    import dsv3c.driver as driver

    made = driver.prepare_output

    def signalled(out):
        os.kill(os.getpid(), signum)  # held: arrives while the staging directory is half made
        return made(out)

    monkeypatch.setattr(driver, "prepare_output", signalled)
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["compile", *TINY, *CHEAP, "--out", "a/b/out", "--dump-dir", "c/dumps"])
    assert rc == 128 + signum, capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_signal_mid_compile_keeps_dumps_and_marks_them(capsys, tmp_path, monkeypatch):
    """SIGTERM during a pass: no output directory, the dumps so far stay and their manifest lists them."""

    def killer(program, ctx):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal should have interrupted this pass")

    passes.REGISTRY["test_kill"] = passes.Pass("test_kill", killer, "test only")
    try:
        monkeypatch.chdir(tmp_path)
        rc = cli.main(["compile", *TINY, "--seq", "8", "--passes", "dce,test_kill", "--out", "new/out",
                       "--dump-dir", "dumps"])
    finally:
        passes.REGISTRY.pop("test_kill")
    assert rc == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dumps"]
    assert outdir.foreign("dumps") == [] and "01_dce.stats.json" in outdir.manifest("dumps")
