"""The dsv3c command, run for real in subprocesses: determinism, the plan contract, errors, dumps, inspect, replay.

Independent commands are started together at module setup (each process pays ~2 s of imports) and awaited
where a test needs them; the 671B compile runs twice, the rest uses the tiny preset.
"""

import difflib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dsv3c  # noqa: F401  (first: registers the dsv3 ops before passes import them)
import passes
from passes import legal_ops
from model_def.config import TINY

_SCRIPT = Path(sys.executable).with_name("dsv3c")
CMD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "dsv3c.cli"]
TIMEOUT = 600


class Job:
    """A dsv3c command started now in cwd; result() waits and returns (returncode, stdout, stderr)."""

    def __init__(self, args, cwd: Path, logs: Path):
        self.args, self.cwd = list(args), cwd
        cwd.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        self.before = _listing(cwd)
        self._out, self._err = logs / "stdout", logs / "stderr"
        with open(self._out, "w") as out, open(self._err, "w") as err:
            self.proc = subprocess.Popen(CMD + self.args, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        self._result = None

    def result(self):
        if self._result is None:
            self.proc.wait(TIMEOUT)
            self._result = (self.proc.returncode, self._out.read_text(), self._err.read_text())
        return self._result

    def ok(self):
        rc, out, err = self.result()
        assert rc == 0, f"dsv3c {' '.join(self.args)} exited {rc}:\n{err[-4000:]}"
        return out


def _listing(directory: Path) -> set[str]:
    """Every path under directory (hidden ones included), relative."""
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def _plan(directory: Path) -> dict:
    return json.loads((directory / "plan.json").read_text())


def _comparable(plan: dict) -> dict:
    """The plan without its run-dependent values (passes[*].seconds)."""
    plan = json.loads(json.dumps(plan))
    for record in plan["passes"]:
        assert isinstance(record.pop("seconds"), float)
    return plan


# ---- error cases: exit status 2, one line, nothing written ------------------------------------------------

_DIVISIBLE = {**TINY, "n_routed_experts": 15, "num_experts_per_tok": 2}  # 15 experts in 4 groups

ERRORS = {  # id: (arguments, input files {name: text}, a phrase the message must contain)
    "unknown_target": (["compile", "--target", "h900x8", "--model", "tiny", "--out", "out"], {}, "h900x8"),
    "unknown_pass": (["compile", "--target", "h800x8", "--model", "tiny", "--passes", "dce,nope", "--out", "out"],
                     {}, "'nope'"),
    "malformed_target_toml": (["compile", "--target", "bad.toml", "--model", "tiny", "--out", "out"],
                              {"bad.toml": 'name = "x"\ngpu = \n'}, "bad.toml"),
    "malformed_config_json": (["compile", "--target", "h800x8", "--config", "bad.json", "--out", "out"],
                              {"bad.json": '{"vocab_size": 256,\n'}, "bad.json"),
    "experts_not_divisible_by_groups": (["compile", "--target", "h800x8", "--config", "div.json", "--out", "out"],
                                        {"div.json": json.dumps(_DIVISIBLE)}, "n_group"),
    # nodes of 2 GPUs: each of tiny's 4 expert groups spans 2 nodes, so a token's 2 groups can reach 4 nodes
    "ep_breaks_node_limit": (["compile", "--target", "pairs.toml", "--model", "tiny", "--mode", "prefill", "--seq", "8",
                              "--parallel", "ep=16", "--out", "out"],
                             {"pairs.toml": 'name = "pairs"\ngpu = "h800"\ngpus = 16\ngpus_per_node = 2\n'},
                             "topk_group=2 nodes"),
    "batch_zero": (["compile", "--target", "h800x8", "--model", "tiny", "--batch", "0", "--out", "out"], {}, "--batch"),
    "seq_not_int": (["compile", "--target", "h800x8", "--model", "tiny", "--seq", "abc", "--out", "out"], {}, "abc"),
    "mode_unknown": (["compile", "--target", "h800x8", "--model", "tiny", "--mode", "fly", "--out", "out"], {}, "fly"),
    # no --out: the default build/h800x8-decode must not appear either (nor build/)
    "decode_beyond_max_positions": (["compile", "--target", "h800x8", "--model", "tiny", "--mode", "decode",
                                     "--seq", "8", "--kv-len", "4096"], {}, "max_position_embeddings"),
    "out_under_regular_file": (["compile", "--target", "h800x8", "--model", "tiny", "--seq", "8",
                                "--out", "afile/out"], {"afile": "not a directory\n"}, "afile"),
    "dump_mlir_layer_out_of_range": (["compile", "--target", "h800x8", "--model", "tiny", "--dump-mlir", "999",
                                      "--dump-dir", "dump", "--out", "out"], {}, "999"),
    "print_after_unknown_pass": (["compile", "--target", "h800x8", "--model", "tiny", "--print-after", "nope",
                                  "--out", "out"], {}, "'nope'"),
    "inspect_not_a_dump": (["inspect", "."], {"notes.txt": "hello\n"}, "no pass dumps"),
}  # fmt: skip

# the tiny compile whose dumps the inspect/replay tests read: non-default pass list, default mode on h800x32
TINY_PASSES = ",".join([*passes.default_pipeline(), "dce"])
TINY_ARGS = ["compile", "--target", "h800x32", "--model", "tiny", "--seq", "8", "--passes", TINY_PASSES,
             "--dump-dir", "dump", "--dump-mlir", "1", "--print-after-all", "--out", "out"]  # fmt: skip
BIG_ARGS = ["compile", "--target", "h800x2048"]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Start every independent command at once: the two 671B compiles, the tiny compile, the error cases."""
    root = tmp_path_factory.mktemp("cli")
    started = {
        "big1": Job([*BIG_ARGS, "--out", "out1"], root / "big", root / "logs" / "big1"),
        "big2": Job([*BIG_ARGS, "--whole-graph", "--out", "out2"], root / "big", root / "logs" / "big2"),
        "tiny": Job(TINY_ARGS, root / "tiny", root / "logs" / "tiny"),
    }
    for case, (args, files, _) in ERRORS.items():
        cwd = root / "errors" / case
        cwd.mkdir(parents=True)
        for name, text in files.items():
            (cwd / name).write_text(text)
        started[case] = Job(args, cwd, root / "logs" / case)
    yield started
    for job in started.values():
        if job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait()


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_error_is_one_line_exit_2_and_writes_nothing(jobs, case):
    job = jobs[case]
    rc, out, err = job.result()
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("dsv3c: error: "), err
    assert "Traceback" not in err
    assert ERRORS[case][2] in lines[0]
    assert out == ""
    after = _listing(job.cwd)
    assert after == job.before, f"left behind: {sorted(after - job.before)}"


# ---- the 671B compile: deterministic, and the plan's contract -------------------------------------------


@pytest.fixture(scope="module")
def big(jobs):
    """(plan directory 1, plan directory 2, stdout of 1) of two 671B compiles with the same inputs: the program of
    blocks (the default) and the whole graph (--whole-graph)."""
    out = jobs["big1"].ok()
    jobs["big2"].ok()
    return jobs["big1"].cwd / "out1", jobs["big1"].cwd / "out2", out


def test_671b_compile_of_blocks_equals_the_whole_graphs(big):
    """Both paths write the same files and the same plan (pass seconds apart): every figure, count and kernel."""
    one, two, _ = big
    assert _listing(one) == _listing(two)  # kernels/ included
    assert (one / "report.txt").read_bytes() == (two / "report.txt").read_bytes()
    assert _comparable(_plan(one)) == _comparable(_plan(two))
    assert sorted(os.listdir(one.parent)) == ["out1", "out2"]  # no staging directory left


def test_671b_plan_contract(big):
    one, _, stdout = big
    plan = _plan(one)
    assert isinstance(plan["dsv3c_version"], str) and plan["dsv3c_version"] == dsv3c.__version__
    assert "_stages" not in plan
    model = plan["model"]
    assert model["name"] == "deepseek-v3"
    assert model["config"]["num_hidden_layers"] == 61 and model["config"]["n_routed_experts"] == 256
    params = model["params"]
    assert params["main"] == 671_026_419_200
    assert params["mtp"] == 11_610_068_224
    assert params["total"] == 671_026_419_200 + 11_610_068_224
    assert params["activated_per_token"] == 37_552_297_472
    assert sum(params["by_component"].values()) == params["total"]
    assert params["by_component"]["mtp"] == params["mtp"]
    flops = model["flops_per_token"]
    assert set(flops) == {"train", "prefill", "decode"}
    assert all(isinstance(v, int) and v > 0 for v in flops.values())
    assert flops["train"] > 2 * flops["prefill"]  # forward + backward
    kv = model["kv_cache_bytes_per_token"]
    assert kv["naive"] == 61 * 128 * (192 + 128) * 2  # plain K (128 heads x 192) and V (128 x 128), BF16
    if "mla_fuse" in passes.REGISTRY:
        assert kv["latent"] == 70_272  # 576 values per token per layer in BF16
    target = plan["target"]
    assert (target["name"], target["gpu"], target["gpus"], target["nodes"]) == ("h800x2048", "h800", 2048, 256)
    assert plan["mode"] == "train"  # the default on >= 256 GPUs
    names = [p["name"] for p in plan["passes"]]
    assert names == passes.default_pipeline()
    for record in plan["passes"]:
        assert set(record) == {"name", "options", "seconds", "nodes_before", "nodes_after", "stats"}
        assert isinstance(record["seconds"], float) and record["seconds"] >= 0
        assert isinstance(record["nodes_before"], int) and isinstance(record["nodes_after"], int)
        assert record["nodes_after"] > 0 and isinstance(record["stats"], dict)
    for a, b in zip(plan["passes"], plan["passes"][1:]):
        assert b["nodes_before"] == a["nodes_after"]
    assert isinstance(plan["kernels"], list)
    assert list(plan)[:6] == ["dsv3c_version", "model", "target", "mode", "shapes", "passes"]
    report = (one / "report.txt").read_text()
    assert "671,026,419,200" in report and "37,552,297,472" in report
    assert stdout.startswith("compiled deepseek-v3 for h800x2048 (train): ")


# ---- the tiny compile: dumps, MLIR, print-after-all, inspect, replay --------------------------------------


@pytest.fixture(scope="module")
def tiny(jobs):
    """(working directory, stdout) of the tiny compile with dumps."""
    out = jobs["tiny"].ok()
    return jobs["tiny"].cwd, out


@pytest.fixture(scope="module")
def followups(tiny, tmp_path_factory):
    """Commands that read the tiny compile's output, started together: listings, inspect, the replay."""
    cwd, _ = tiny
    logs = tmp_path_factory.mktemp("cli-logs")
    lines = (cwd / "dump" / "pipeline.txt").read_text().splitlines()
    opts = dict(line.split("=", 1) for line in lines[1:])
    replay = ["compile", "--model", "tiny", "--passes", lines[0], "--out", "replay"]
    replay += [arg for key, value in opts.items() for arg in (f"--{key.replace('_', '-')}", value)]
    commands = {
        "targets": ["targets"],
        "passes": ["passes"],
        "inspect": ["inspect", "dump"],
        "diff": ["inspect", "dump", "--diff", "1", "cost"],  # by number and by name
        "diff_layer": ["inspect", "dump", "--diff", "dce", "cost", "--layer", "1"],
        "diff_layer2": ["inspect", "dump", "--diff", "dce", "cost", "--layer", "2"],  # computed by block layers.1
        "diff_unknown": ["inspect", "dump", "--diff", "dce", "nope"],
        "replay": replay,
    }
    return {name: Job(args, cwd, logs / name) for name, args in commands.items()}


def test_default_mode_is_prefill_below_256_gpus(tiny):
    cwd, stdout = tiny
    plan = _plan(cwd / "out")
    assert plan["mode"] == "prefill"
    assert plan["target"]["name"] == "h800x32" and plan["target"]["gpus"] == 32
    assert plan["shapes"] == {"batch": 1, "seq": 8, "kv_len": 0}
    assert [p["name"] for p in plan["passes"]] == TINY_PASSES.split(",")
    assert stdout.rstrip().splitlines()[-1].startswith("compiled tiny for h800x32 (prefill): ")


def test_dumps_per_pass(tiny):
    cwd, _ = tiny
    dump = cwd / "dump"
    names = TINY_PASSES.split(",")
    lines = (dump / "pipeline.txt").read_text().splitlines()
    assert lines[0] == TINY_PASSES
    assert dict(line.split("=", 1) for line in lines[1:]) == {
        "batch": "1", "seq": "8", "mode": "prefill", "target": "h800x32"}  # fmt: skip
    plan = _plan(cwd / "out")
    for i, name in enumerate(names, 1):
        stem = dump / f"{i:02d}_{name}"
        stats = json.loads(stem.with_suffix(".stats.json").read_text())
        record = {k: v for k, v in plan["passes"][i - 1].items() if k != "seconds"}
        assert {k: v for k, v in stats.items() if k != "seconds"} == record
        graph = stem.with_suffix(".graph.txt").read_text()
        assert "# layers.1" in graph and "# mtp.0" in graph
        assert stem.with_suffix(".diff").exists()


def test_dump_mlir_of_layer_1(tiny):
    cwd, _ = tiny
    names = TINY_PASSES.split(",")
    files = sorted((cwd / "dump").glob("*.mlir"))
    assert [f.name for f in files] == [f"{i:02d}_{n}.mlir" for i, n in enumerate(names, 1)]
    for f in files:
        text = f.read_text()
        assert "func.func @layers_1(" in text
        assert 'torch.operator "torch.dsv3.' in text
        assert "torch.aten." in text


def test_print_after_all(tiny):
    cwd, stdout = tiny
    names = TINY_PASSES.split(",")
    headers = [line for line in stdout.splitlines() if line.startswith("// ----- after ")]
    assert headers == [f"// ----- after {i:02d}_{n} -----" for i, n in enumerate(names, 1)]
    # each printed graph is the dumped one
    last = stdout.split(f"// ----- after {len(names):02d}_{names[-1]} -----\n", 1)[1]
    assert last.startswith((cwd / "dump" / f"{len(names):02d}_{names[-1]}.graph.txt").read_text())


def test_targets_table(followups):
    out = followups["targets"].ok()
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip()}
    assert out.splitlines()[0].split()[0] == "name"
    for name in ("h800x8", "h20x16", "h800x32", "h800x320", "h800x2048"):
        assert name in rows
    assert rows["h800x2048"][1:4] == ["h800", "2048", "256"] and rows["h20x16"][1:4] == ["h20", "16", "2"]


def test_passes_table(followups):
    out = followups["passes"].ok()
    table, default, legal = out.partition("\ndefault pipeline: ")
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["pass", "default"]
    listed = [line.split()[0] for line in lines[2:] if line.strip()]
    assert sorted(listed) == sorted(passes.REGISTRY)
    assert default and legal.splitlines()[0] == ",".join(passes.default_pipeline())
    assert legal.strip().endswith(legal_ops.text())  # the legal-op tables of passes/README.md, from the op records


def test_inspect_lists_passes(followups, tiny):
    cwd, _ = tiny
    out = followups["inspect"].ok()
    lines = out.splitlines()
    assert lines[0] == f"pipeline: {TINY_PASSES}"
    rows = [line.split() for line in lines[3:] if line.strip()]
    names = TINY_PASSES.split(",")
    assert [(r[0], r[1]) for r in rows] == [(f"{i:02d}", n) for i, n in enumerate(names, 1)]
    plan = _plan(cwd / "out")
    assert [(int(r[3]), int(r[4])) for r in rows] == [(p["nodes_before"], p["nodes_after"]) for p in plan["passes"]]


def _graph(cwd: Path, name: str) -> tuple[str, str]:
    """(stem, text) of the first dump of pass name."""
    stem = next(p.name[: -len(".graph.txt")] for p in sorted((cwd / "dump").glob(f"*_{name}.graph.txt")))
    return stem, (cwd / "dump" / f"{stem}.graph.txt").read_text()


def _changed(diff: str) -> list[str]:
    """The -/+ lines of a unified diff, headers excluded."""
    return [line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("---", "+++"))]


def test_inspect_diff(followups, tiny):
    cwd, _ = tiny
    out = followups["diff"].ok()
    (sa, ta), (sb, tb) = _graph(cwd, "dce"), _graph(cwd, "cost")
    if ta == tb:
        assert out == "(no difference)\n"
        return
    lines = out.splitlines()
    assert lines[0].startswith(f"--- {sa}") and lines[1].startswith(f"+++ {sb}")
    expected = [line for line in difflib.unified_diff(ta.splitlines(), tb.splitlines(), lineterm="")]
    assert _changed(out) == _changed("\n".join(expected))


def test_inspect_diff_of_one_layer(followups, tiny):
    cwd, _ = tiny
    out = followups["diff_layer"].ok()
    (_, ta), (_, tb) = _graph(cwd, "dce"), _graph(cwd, "cost")
    la = [line for line in ta.splitlines() if line.endswith("# layers.1")]
    lb = [line for line in tb.splitlines() if line.endswith("# layers.1")]
    if la == lb:
        assert out == "(no difference)\n"
        return
    changed = _changed(out)
    assert changed, out
    assert all(line.endswith("# layers.1") for line in changed)
    removed = {line[1:] for line in changed if line[0] == "-"}
    added = {line[1:] for line in changed if line[0] == "+"}
    assert set(la) - set(lb) <= removed <= set(la)
    assert set(lb) - set(la) <= added <= set(lb)
    full = followups["diff"].ok()
    assert len(_changed(full)) > len(changed)  # other blocks changed too


def test_inspect_diff_of_a_layer_its_block_computes(followups, tiny):
    """tiny's layers 1 and 2 are both MoE: the program of blocks holds layer 1, which computes layer 2 as well."""
    cwd, _ = tiny
    _, text = _graph(cwd, "cost")
    assert "# block layers.1 computes layers.1, layers.2\n" in text and "# layers.2" not in text
    out = followups["diff_layer2"].ok()
    assert out == "# layers.2 is computed by block layers.1: its lines follow\n" + followups["diff_layer"].ok()


def test_inspect_diff_unknown_pass(followups):
    rc, out, err = followups["diff_unknown"].result()
    assert rc == 2 and out == ""
    assert err.splitlines() == [err.strip()] and err.startswith("dsv3c: error: no pass 'nope'")


def test_replay_from_pipeline_txt_gives_the_same_plan(followups, tiny):
    cwd, _ = tiny
    followups["replay"].ok()
    assert _comparable(_plan(cwd / "replay")) == _comparable(_plan(cwd / "out"))
    assert (cwd / "replay" / "report.txt").read_bytes() == (cwd / "out" / "report.txt").read_bytes()
