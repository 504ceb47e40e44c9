"""Generated fuzzing of the whole command line (issue 21): a Hypothesis grammar over every command, option and
value kind, and over the fields of every input file (config.json, target TOML, expert-load JSON, pass dumps).

Every case runs in a scratch directory holding a user's `precious/` folder with a file, links to both and a
dangling link. Properties: exit status 0 or 2; no traceback; exit 2 prints exactly one `dsv3c: error:` line and
touches nothing; exit 0 touches nothing but the command's outputs. Most cases run in-process through
`dsv3c.cli.main`; `test_fuzz_children` runs a sample as child processes under an address-space limit and a
timeout (bounded memory and time). Counts are printed after the module (`pytest tests/test_fuzz_cli.py -s -p
no:xdist`) and written to $DSV3C_FUZZ_COUNTS if set; $DSV3C_FUZZ_COMPILE, $DSV3C_FUZZ_OTHER and
$DSV3C_FUZZ_CHILDREN set the case counts (60, 100 and 3 by default, what CI runs; derandomised there).

Not drawn, and why: FIFOs (tests/test_hostile_inputs.py checks they are refused without being opened); sizes
the bounds accept that cost seconds a case (a valid `dsv3c run`, integers between 17 and 10**6 for sizes,
training at the default global batch of 15360): tests/test_hostile_inputs.py checks the bounds themselves.
"""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv3c.cost.constants import Constants
from model_def.config import TINY
from tests.cli_harness import COUNTS, FOREIGN, FOREIGN_FILE, LINKS, check_fuzz, run_child, run_in_process

FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                     HealthCheck.too_slow, HealthCheck.data_too_large])

# ---- value kinds ---------------------------------------------------------------------------------------------

UNICODE_DIGITS = ["²", "٣", "３", "⁴", "½", "१०"]
ODD_BUT_VALID = ["+3", " 4", "08"]
NOT_A_SIZE = ["0", "-1", "-8", "1_0", "1e3", "0x10", "", "1.5", "nan", "inf", "-inf", "9" * 40, "9" * 5000, str(2**63),
              str(10**18), "100000000", "1000000000", *UNICODE_DIGITS]  # fmt: skip
small_int = st.integers(1, 16).map(str)
huge_int = st.integers(10**6, 10**30).map(str)
size_text = st.one_of(small_int, huge_int, st.sampled_from(ODD_BUT_VALID + NOT_A_SIZE), st.integers(-(10**30), 0).map(str))
bad_size_text = st.one_of(huge_int, st.sampled_from(NOT_A_SIZE))  # refused for every run size option
float_text = st.one_of(st.sampled_from(["nan", "NaN", "inf", "-inf", "1e-320", "5e-324", "0", "-0", "-5", "1e308",
                                        "1e400", "0.5", "1", "2.5", "40", "abc", "", "²"]),
                       st.floats(allow_nan=True, allow_infinity=True).map(repr))  # fmt: skip
PATHS = ["out", "new/deep/out", FOREIGN, FOREIGN_FILE, f"{FOREIGN_FILE}/sub", "missing/x", *LINKS, "", ".", "..", "/",
         "out/", "dsv3c-dir"]  # fmt: skip
path_text = st.sampled_from(PATHS)
# JSON values of every kind a field might meet: NaN/inf, long integers, denormals, strings, nesting
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-4, 8), st.integers(-(10**25), 10**25),
                      st.sampled_from([float("nan"), float("inf"), -float("inf"), 5e-324, 1e308, 0.5, -0.0]),
                      st.text(max_size=6), st.sampled_from(UNICODE_DIGITS))  # fmt: skip
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=2),
                          max_leaves=5)  # fmt: skip


def jdump(value) -> bytes:
    """value as the JSON Python writes (NaN and Infinity literals included, as HF configs sometimes hold)."""
    return json.dumps(value).encode()


def deep(n: int) -> bytes:
    """A JSON array nested n deep."""
    return b"[" * n + b"]" * n


# ---- input files -----------------------------------------------------------------------------------------------


@st.composite
def configs(draw) -> bytes:
    """A config.json: the tiny config with 0-3 fields replaced, or a malformed file."""
    kind = draw(st.sampled_from(["fields", "fields", "fields", "deep", "binary", "truncated", "not_object", "big_int"]))
    raw = dict(TINY)
    if kind == "deep":
        return b'{"hidden_size": ' + deep(draw(st.sampled_from([33, 1000, 100000]))) + b"}"
    if kind == "binary":
        return draw(st.binary(max_size=64))
    if kind == "not_object":
        return jdump(draw(json_value))
    if kind == "big_int":
        return jdump(raw).replace(b'"hidden_size": 64', b'"hidden_size": ' + b"9" * draw(st.sampled_from([20, 5000])))
    for key in draw(st.lists(st.sampled_from(sorted(TINY) + ["rope_parameters", "extra"]), max_size=3)):
        raw[key] = draw(st.one_of(json_value, st.integers(1, 8)))
    text = jdump(raw)
    return text[: draw(st.integers(0, len(text) - 1))] if kind == "truncated" else text


TOML_VALUES = ['"x"', '"h800"', "0", "1", "2", "8", "64", "-8", "1e-300", "1e300", "nan", "inf", "-inf", "true",
               "[1, 2]", "1.5", '"../../evil"', "99999999999999999999", '""', "5e-324", '"²"']  # fmt: skip
TOML_KEYS = ["name", "gpu", "gpus", "gpus_per_node", "planes", "nic_gbps", "comm_sms", "switch_radix", "colour"]
OVERRIDE_KEYS = ["hbm_bandwidth", "sms", "fp8_flops", "bf16_flops", "nvlink_achieved", "hbm_bytes", "l2_bytes",
                 "smem_per_block", "pcie_bandwidth", "arch", "name"]  # fmt: skip


@st.composite
def target_tomls(draw) -> bytes:
    """A target TOML: a valid one with 0-3 keys and [gpu_overrides] fields changed, or a malformed file."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([b"a = " + b"[" * 5000, b"\xff\xfe", b"name = ", b"[gpu_overrides]\n[gpu_overrides]\n"]))
    keys = {"name": '"fuzz"', "gpu": '"h800"', "gpus": "8"}
    for key in draw(st.lists(st.sampled_from(TOML_KEYS), max_size=3)):
        keys[key] = draw(st.sampled_from(TOML_VALUES))
    lines = [f"{k} = {v}" for k, v in keys.items()]
    overrides = draw(st.dictionaries(st.sampled_from(OVERRIDE_KEYS), st.sampled_from(TOML_VALUES), max_size=2))
    if overrides:
        lines += ["[gpu_overrides]"] + [f"{k} = {v}" for k, v in overrides.items()]
    return ("\n".join(lines) + "\n").encode()


@st.composite
def expert_loads(draw) -> bytes:
    """An expert-load JSON for the tiny model (3 MoE layers x 16 experts) with some values replaced, or malformed."""
    kind = draw(st.sampled_from(["values", "values", "shape", "deep", "not_object", "big_int"]))
    rows = [[draw(st.integers(0, 100)) for _ in range(16)] for _ in range(3)]
    if kind == "deep":
        return b'{"layers": ' + deep(draw(st.sampled_from([40, 100000]))) + b"}"
    if kind == "not_object":
        return jdump(draw(json_value))
    if kind == "big_int":
        return jdump({"layers": rows}).replace(b"[", b"[" + b"7" * draw(st.sampled_from([20, 5000])) + b", ", 2)
    if kind == "shape":
        rows = [rows[0][: draw(st.integers(0, 16))]] * draw(st.integers(0, 4))
    for _ in range(draw(st.integers(0, 3))):
        if rows and rows[0]:
            rows[draw(st.integers(0, len(rows) - 1))][draw(st.integers(0, len(rows[0]) - 1))] = draw(json_leaf)
    return jdump({"layers": rows})


STATS = {"name": "dce", "seconds": 0.1, "nodes_before": 5, "nodes_after": 4, "stats": {"removed": 1}}


@st.composite
def dump_files(draw) -> dict:
    """A partial or corrupt dump directory `dumps/`: stats, graphs, pipeline.txt."""
    files = {}
    for i, name in enumerate(draw(st.lists(st.sampled_from(["dce", "cost", "mla_fuse"]), max_size=3)), 1):
        stem = f"dumps/{i:02d}_{name}"
        good = jdump({**STATS, "name": name})
        files[f"{stem}.stats.json"] = draw(st.sampled_from([good, good[:20], deep(100000), b"\xff", jdump({**STATS, "seconds": "x"})])
                                           | json_value.map(jdump))  # fmt: skip
        if draw(st.booleans()):
            files[f"{stem}.graph.txt"] = f"x = f(y)  # layers.{draw(st.integers(0, 3))}\n".encode()
    if draw(st.booleans()):
        files["dumps/pipeline.txt"] = draw(st.sampled_from([b"dce,cost\n", b"\xff\xfe", b""]))
    return files


# ---- commands --------------------------------------------------------------------------------------------------


def mostly(valid, other):
    """Values from valid three times in four, else from other."""
    return st.sampled_from([True, True, True, False]).flatmap(lambda ok: valid if ok else other)


def _opt(draw, argv: list, flag: str, values, p: int = 2) -> str | None:
    """With probability 1/p, append flag and a drawn value to argv; the value (or None)."""
    if draw(st.integers(1, p)) != 1:
        return None
    value = draw(values)
    argv += [flag, value]
    return value


def _options(draw, argv: list, table: list) -> dict:
    """Append some of table's (flag, valid values, any values) to argv: most with valid values, 0-2 of them with any
    value (so that both clean runs and single defects are common); {flag: value}."""
    chosen = draw(st.lists(st.sampled_from(table), unique_by=lambda row: row[0], max_size=4))
    wild = draw(st.sampled_from([0, 0, 1, 2]))
    values = {}
    for i, (flag, valid, anything) in enumerate(chosen):
        values[flag] = draw(anything if i < wild else valid)
        argv += [flag, values[flag]]
    return values


PARALLEL = st.one_of(st.sampled_from(["auto", "pp=2", "ep=8", "redundant=8", "pp=²", "ep=٣", "sp=maybe", "pp=2,pp=2",
                                      "xx=1", ""]),
                     st.tuples(st.sampled_from(["pp", "ep", "dp", "tp", "redundant"]), size_text).map("=".join))  # fmt: skip
SET = st.tuples(st.sampled_from(sorted(Constants().names()) + ["nope", ""]), float_text).map("=".join)
COMPILE_OPTIONS = [  # (flag, valid values, any values)
    ("--mode", st.sampled_from(["train", "prefill", "decode"]), st.sampled_from(["serve", "", "TRAIN"])),
    ("--batch", st.sampled_from(["1", "2"]), size_text),
    ("--seq", st.sampled_from(["8", "16"]), size_text),
    ("--kv-len", st.sampled_from(["8", "64"]), size_text),
    ("--micro-batches", st.sampled_from(["4", "8"]), size_text),
    ("--mtp-acceptance", st.sampled_from(["0.8", "1"]), float_text),
    ("--precision", st.just("attention_proj=bf16"), st.sampled_from(["x=y", "nonsense", "=", ""])),
    ("--parallel", st.sampled_from(["auto", "pp=2", "ep=8"]), PARALLEL),
    ("--expert-load", st.just("load.json"), st.sampled_from([FOREIGN, "link_file", "dangling", "missing.json"])),
    ("--schedule", st.sampled_from(["dualpipe", "1f1b", "zb1p"]), st.sampled_from(["banana", ""])),
    ("--set", st.sampled_from(["ib_GBps=40", "gemm_tensor_efficiency=0.5"]), SET),
    ("--out", st.sampled_from(["out", "new/deep/out", "dsv3c-dir"]), path_text),
    ("--dump-dir", st.just("dumps"), path_text),
    ("--dump-mlir", st.just("1"), size_text),
    ("--print-after", st.just("dce"), st.just("nope")),
]


@st.composite
def compile_case(draw) -> tuple[list, dict, list]:
    """(argv, files, outputs) of a `dsv3c compile`, every option drawn from its value kinds."""
    files, argv = {}, ["compile"]
    target = draw(mostly(st.sampled_from(["h800x8", "h800x1", "h100x8", "h800x32", "t.toml"]),
                         st.sampled_from(["h800x12", "h800x0", "h800x²", "banana", "../../evil", FOREIGN, "link_file", ""])))
    if target == "t.toml":
        files["t.toml"] = draw(target_tomls())
    argv += ["--target", target]
    source = draw(st.sampled_from(["tiny", "tiny", "tiny", "config", "config", "other"]))
    if source == "config":
        files["c.json"] = draw(configs())
        argv += ["--config", draw(st.sampled_from(["c.json", "c.json", "c.json", FOREIGN, "link_file", "dangling"]))]
    else:
        argv += ["--model", "tiny" if source == "tiny" else draw(st.sampled_from(["deepseek-v3", "huge", "", "²"]))]
    argv += ["--passes", draw(mostly(st.sampled_from(["dce", "dce,cost", "cost"]),
                                     st.sampled_from(["", ",,", "nope", "lower_triton,fp8_quant",
                                                      "fp8_quant,mla_fuse,lower_triton"])))]  # fmt: skip
    # a training compile at the default global batch costs seconds: drawn small or bad, never left out
    argv += ["--global-batch", draw(mostly(st.sampled_from(["8", "16"]), bad_size_text))]
    values = _options(draw, argv, COMPILE_OPTIONS)
    if values.get("--expert-load") == "load.json":
        files["load.json"] = draw(expert_loads())
    outputs = [p for p in (values.get("--out"), values.get("--dump-dir")) if p]
    return argv, files, outputs + (["build"] if "--out" not in values else [])


DURATIONS = st.lists(st.tuples(st.sampled_from(["F", "B", "I", "W", "F&B", "FB", "X", ""]), float_text),
                     max_size=3).map(lambda kv: ",".join(f"{k}={v}" for k, v in kv))  # fmt: skip
SCHEDULE_OPTIONS = [
    ("--durations", st.sampled_from(["F=1,B=2,W=1", "F=2,B=3"]), DURATIONS),
    ("--comm", st.sampled_from(["0", "0.5"]), float_text),
    ("--trace", st.sampled_from(["t.json", "new_t.json"]), path_text),
    ("--svg", st.just("s.svg"), path_text),
]


@st.composite
def schedule_case(draw) -> tuple[list, dict, list]:
    """(argv, files, outputs) of a `dsv3c schedule`."""
    argv = ["schedule", "--kind", draw(st.sampled_from(["1f1b", "zb1p", "dualpipev", "dualpipe", "1f1b", "zb1p",
                                                        "banana", ""]))]  # fmt: skip
    argv += ["--pp", draw(st.one_of(st.sampled_from(["1", "2", "4"] * 3), size_text))]
    argv += ["--micro-batches", draw(st.one_of(st.sampled_from(["4", "8", "16"] * 3), size_text))]
    values = _options(draw, argv, SCHEDULE_OPTIONS)
    if draw(st.booleans()):
        argv.append("--json")
    return argv, {}, [p for p in (values.get("--trace"), values.get("--svg")) if p]


@st.composite
def inspect_case(draw) -> tuple[list, dict, list]:
    """(argv, files, outputs) of a `dsv3c inspect` on a generated dump directory or another path."""
    files = draw(dump_files())
    argv = ["inspect", draw(st.sampled_from(["dumps", "dumps", FOREIGN, FOREIGN_FILE, "link_dir", "dangling", ""]))]
    if draw(st.booleans()):
        argv += ["--diff", draw(st.sampled_from(["1", "dce", "²", "99"])), draw(st.sampled_from(["2", "cost", "-1"]))]
    _opt(draw, argv, "--layer", size_text, 3)
    return argv, files, []


@st.composite
def run_case_argv(draw) -> tuple[list, dict, list]:
    """(argv, files, outputs) of a `dsv3c run` holding at least one bad size (a valid run costs tens of seconds)."""
    argv, files = ["run"], {}
    _opt(draw, argv, "--mode", st.sampled_from(["prefill", "decode", "train"]), 3)
    defect = draw(st.sampled_from(["--batch", "--seq", "--ranks", "--tokens", "--kv-len"]))
    for flag in ("--batch", "--seq", "--kv-len", "--ranks", "--ep", "--pp", "--micro-batches", "--tokens"):
        if flag == defect:
            argv += [flag, draw(bad_size_text)]
        else:
            _opt(draw, argv, flag, size_text, 5)
    _opt(draw, argv, "--seed", size_text, 5)
    _opt(draw, argv, "--schedule", st.sampled_from(["1f1b", "zb1p", "dualpipev", "dualpipe", "banana"]), 5)
    _opt(draw, argv, "--target", st.sampled_from(["h800x8", "banana", "t.toml"]), 5)
    if "t.toml" in argv:
        files["t.toml"] = draw(target_tomls())
    _opt(draw, argv, "--checkpoint", st.sampled_from([FOREIGN, FOREIGN_FILE, "link_file", "dangling"]), 5)
    out = _opt(draw, argv, "--expert-load-out", path_text | st.just("load_out.json"), 4)
    for flag in ("--train", "--json"):
        if draw(st.booleans()):
            argv.append(flag)
    return argv, files, [out] if out else []


any_case = st.one_of(compile_case(), compile_case(), schedule_case(), inspect_case(), run_case_argv(),
                     st.sampled_from([(["targets"], {}, []), (["passes"], {}, []), (["--version"], {}, [])]))


# ---- the properties --------------------------------------------------------------------------------------------


def _check(capsys, case) -> None:
    """Run one generated case in-process and check the fuzz properties (tests.cli_harness.check_fuzz)."""
    argv, files, outputs = case
    check_fuzz(run_in_process(capsys, argv, files), argv, outputs)


@settings(FUZZ, max_examples=int(os.environ.get("DSV3C_FUZZ_COMPILE", 60)))
@given(case=compile_case())
def test_fuzz_compile(capsys, case):
    _check(capsys, case)


@settings(FUZZ, max_examples=int(os.environ.get("DSV3C_FUZZ_OTHER", 100)))
@given(case=st.one_of(schedule_case(), inspect_case(), run_case_argv()))
def test_fuzz_other_commands(capsys, case):
    _check(capsys, case)


@settings(FUZZ, max_examples=int(os.environ.get("DSV3C_FUZZ_CHILDREN", 3)))
@given(case=any_case)
def test_fuzz_children(case):
    """A sample as child processes: bounded memory (RLIMIT_AS) and time (a timeout), same properties."""
    argv, files, outputs = case
    check_fuzz(run_child(argv, files), argv, outputs)


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    """After the module: print the counts and check them (no tracebacks, no lost files)."""
    yield
    line = ", ".join(f"{k} {v}" for k, v in COUNTS.items())
    print(f"\nfuzz corpus: {line}")
    if os.environ.get("DSV3C_FUZZ_COUNTS"):
        with open(os.environ["DSV3C_FUZZ_COUNTS"], "w") as f:
            json.dump(COUNTS, f)
    assert COUNTS["tracebacks"] == 0 and COUNTS["files_lost"] == 0
