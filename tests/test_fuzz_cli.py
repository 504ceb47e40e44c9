"""Fuzz corpus for the CLI (issue 13): malformed configs, target TOMLs, option lists and dump directories.

Every generated case holds at least one defect the door must catch, so each is refused in milliseconds, before
capture: exit 2, exactly one `dsv3c: error:` line, nothing written, the user's `precious/` untouched, no
exception out of `dsv3c.cli.main`. Counts (cases tried, clean, tracebacks, files lost) are printed at the end
of the module (`pytest tests/test_fuzz_cli.py -s -p no:xdist`) and written to $DSV3C_FUZZ_COUNTS if set.
"""

import json
import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_def.config import _REQUIRED, TINY
from tests.cli_harness import COUNTS, FOREIGN, FOREIGN_FILE, check_clean, run_case

FUZZ = settings(max_examples=270, deadline=2000, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
BASE = ["compile", "--target", "h800x8"]

# ---- values --------------------------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.text(max_size=8),
                         st.floats(allow_nan=True, allow_infinity=True))  # fmt: skip
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                           max_leaves=6)  # fmt: skip
INT_FIELDS = sorted(k for k, v in TINY.items() if isinstance(v, int) and not isinstance(v, bool))
FLOAT_FIELDS = ["routed_scaling_factor", "rope_theta", "rms_norm_eps"]
not_an_int = st.one_of(st.text(max_size=6), st.booleans(), st.lists(st.integers(), max_size=2),
                       st.floats().filter(lambda f: not f.is_integer() if math.isfinite(f) else True), st.just({}))  # fmt: skip
bad_float = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0]), st.text(max_size=4), st.booleans())
bad_block = st.lists(st.one_of(st.integers(-256, 512), st.floats(allow_nan=True), st.text(max_size=3)), max_size=3).filter(
    lambda b: b != [128, 128])  # fmt: skip
ROPE_KEYS = ["factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"]


def dumps(raw) -> bytes:
    """raw as the JSON text Python writes (NaN/Infinity literals included, as HF configs sometimes hold)."""
    return json.dumps(raw).encode()


@st.composite
def bad_configs(draw) -> bytes:
    """The bytes of a config.json with at least one defect, plus random extra fields."""
    raw = dict(TINY)
    raw.update(draw(st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in TINY), json_values,
                                    max_size=3)))  # fmt: skip
    kind = draw(st.sampled_from(["missing", "int_type", "float", "block", "rope", "binary", "utf8", "truncated",
                                 "not_object", "range"]))  # fmt: skip
    if kind == "missing":
        for key in draw(st.lists(st.sampled_from(sorted(_REQUIRED)), min_size=1, max_size=3)):
            raw.pop(key, None)
    elif kind == "int_type":
        raw[draw(st.sampled_from(INT_FIELDS))] = draw(not_an_int)
    elif kind == "float":
        raw[draw(st.sampled_from(FLOAT_FIELDS))] = draw(bad_float)
    elif kind == "block":
        raw["quantization_config"] = {**TINY["quantization_config"], "weight_block_size": draw(bad_block)}
    elif kind == "rope":
        key = draw(st.sampled_from(ROPE_KEYS))
        raw["rope_scaling"] = {**TINY["rope_scaling"], key: draw(st.one_of(bad_float, st.just("fast"), st.just([1])))}
    elif kind == "range":
        key = draw(st.sampled_from(["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "n_group"]))
        raw[key] = draw(st.one_of(st.integers(max_value=0), st.integers(min_value=1 << 24, max_value=1 << 62)))
    elif kind == "binary":
        return draw(st.binary(max_size=64))
    elif kind == "utf8":
        return b"\xff\xfe" + dumps(raw)[:40] + draw(st.binary(min_size=1, max_size=8))
    elif kind == "truncated":
        text = dumps(raw)
        return text[: draw(st.integers(0, len(text) - 1))]
    elif kind == "not_object":
        return dumps(draw(st.one_of(json_scalars, st.lists(json_scalars, max_size=3))))
    return dumps(raw)


TOML_OK = {"name": '"fuzz"', "gpu": '"h800"', "gpus": "8"}


def toml_value(draw) -> str:
    """A TOML value of any type."""
    return draw(st.sampled_from(['"x"', '"banana"', "0", "-8", "3", "1e400", "nan", "inf", "true", "[1, 2]", "1.5",
                                 '"../../evil"', "9999999999999", '""']))  # fmt: skip


@st.composite
def bad_tomls(draw) -> bytes:
    """The bytes of a target TOML with at least one defect."""
    keys = dict(TOML_OK)
    overrides = {}
    kind = draw(st.sampled_from(["arch", "smem", "unknown", "missing", "binary", "name", "nic", "gpus", "override"]))
    if kind == "arch":
        overrides["arch"] = draw(st.sampled_from(['"banana"', '"sm_80"', '""', "1"]))
    elif kind == "smem":
        overrides["smem_per_block"] = str(draw(st.integers(-10, 30000)))
    elif kind == "unknown":
        keys[draw(st.sampled_from(["colour", "gpu_count", "nodes", "Name"]))] = toml_value(draw)
    elif kind == "missing":
        for key in draw(st.lists(st.sampled_from(sorted(TOML_OK)), min_size=1, max_size=3)):
            keys.pop(key, None)
    elif kind == "binary":
        return draw(st.binary(max_size=48)) + b"\xff"
    elif kind == "name":
        keys["name"] = draw(st.sampled_from(['"../../evil"', '"a/b"', '".."', '"."', '"my cluster"', '""', "3"]))
    elif kind == "nic":
        keys["nic_gbps"] = draw(st.sampled_from(["nan", "inf", "-inf", "0", "-400", '"fast"']))
    elif kind == "gpus":
        keys["gpus"] = draw(st.sampled_from(["0", "-8", "12", "1.5", '"8"', "99999999"]))
    elif kind == "override":
        key = draw(st.sampled_from(["hbm_bandwidth", "sms", "fp8_flops", "name", "l2_bytes"]))
        overrides[key] = draw(st.sampled_from(["nan", "inf", "0", "-1", '"x"', "1.5e400", "true"]))
    lines = [f"{k} = {v}" for k, v in keys.items()]
    if overrides:
        lines += ["[gpu_overrides]"] + [f"{k} = {v}" for k, v in overrides.items()]
    return ("\n".join(lines) + "\n").encode()


# noise: valid-looking options that never make a case valid on their own
noise = st.lists(st.sampled_from([["--seq", "8"], ["--mode", "prefill"], ["--batch", "2"], ["--passes", "dce,cost"],
                                  ["--out", "out"], ["--dump-dir", "dumps"], ["--model", "tiny"],
                                  ["--precision", "attention_proj=bf16"]]), max_size=3)  # fmt: skip


@st.composite
def bad_options(draw) -> list[str]:
    """A compile or run command line with at least one defect in its options."""
    defect = draw(st.sampled_from([
        ["--passes", ""], ["--passes", ",,"], ["--passes", "lower_triton,fp8_quant"],
        ["--passes", "fp8_quant,mla_fuse,lower_triton"], ["--passes", "lower_triton,cost"], ["--passes", "dce,nope"],
        ["--mode", "train", "--kv-len", "4096"], ["--mode", "prefill", "--kv-len", "1"],
        ["--batch", "1000000000"], ["--seq", "1000000"], ["--batch", "0"], ["--seq", "-1"], ["--batch", "1e3"],
        ["--out", "."], ["--out", ".."], ["--out", FOREIGN], ["--out", FOREIGN_FILE], ["--dump-dir", FOREIGN],
        ["--dump-dir", FOREIGN_FILE], ["--dump-dir", f"{FOREIGN_FILE}/sub"], ["--out", f"{FOREIGN_FILE}/x"],
        ["--dump-mlir", "1"], ["--dump-dir", "d", "--dump-mlir", "99"], ["--dump-dir", "same", "--out", "same"],
        ["--precision", "nonsense"], ["--print-after", "nope"], ["--frobnicate"], ["--mode", "serve"],
        ["--model", "huge"], ["--target", "../../evil"], ["--target", "h800x12"], ["--target", FOREIGN],
        ["--config", FOREIGN], ["--config", "missing.json"],
    ]))  # fmt: skip
    opts = [x for pair in draw(noise) for x in pair]
    if "--out" in defect or "--dump-dir" in defect:
        opts = [x for x in opts if x not in ("--out", "out", "--dump-dir", "dumps")]
    return BASE + opts + defect


@st.composite
def bad_run_options(draw) -> list[str]:
    """A `dsv3c run` command line that must be refused before the model is built."""
    return ["run"] + draw(st.sampled_from([
        ["--seq", "100000"], ["--mode", "decode", "--kv-len", "100000"], ["--batch", "100000000"],
        ["--kv-len", "24"], ["--mode", "decode", "--batch", "100000000"], ["--seq", "5000"],
        ["--target", "banana"], ["--mode", "train"], ["--seq", "0"],
    ]))  # fmt: skip


# ---- the corpus ----------------------------------------------------------------------------------------


@FUZZ
@given(config=bad_configs(), opts=noise)
def test_fuzz_configs(capsys, config, opts):
    argv = BASE + ["--config", "config.json", *[x for pair in opts if pair[0] != "--model" for x in pair]]
    check_clean(run_case(capsys, argv, {"config.json": config}), argv)


@FUZZ
@given(toml=bad_tomls(), opts=noise)
def test_fuzz_target_files(capsys, toml, opts):
    argv = ["compile", "--target", "t.toml", "--model", "tiny", *[x for pair in opts if pair[0] != "--model" for x in pair]]
    check_clean(run_case(capsys, argv, {"t.toml": toml}), argv)


@FUZZ
@given(argv=bad_options())
def test_fuzz_options(capsys, argv):
    check_clean(run_case(capsys, argv, dirs=["same"]), argv)


@settings(FUZZ, max_examples=60)
@given(argv=bad_run_options())
def test_fuzz_run_options(capsys, argv):
    check_clean(run_case(capsys, argv), argv)


STATS = {"name": "dce", "seconds": 0.1, "nodes_before": 5, "nodes_after": 4, "stats": {"removed": 1}}


@st.composite
def dump_dirs(draw) -> tuple[dict, list[str]]:
    """A partial or corrupt dump directory and an inspect command line on it."""
    files = {}
    for i, name in enumerate(draw(st.lists(st.sampled_from(["dce", "cost", "mla_fuse"]), max_size=3)), 1):
        stem = f"dumps/{i:02d}_{name}"
        kind = draw(st.sampled_from(["ok", "binary", "truncated", "wrong", "json"]))
        good = json.dumps({**STATS, "name": name}).encode()
        files[f"{stem}.stats.json"] = {"ok": good, "binary": draw(st.binary(max_size=16)), "truncated": good[:20],
                                       "wrong": json.dumps({**STATS, "seconds": "x"}).encode(),
                                       "json": dumps(draw(json_values))}[kind]  # fmt: skip
        if draw(st.booleans()):
            files[f"{stem}.graph.txt"] = f"x = f(y)  # layers.{draw(st.integers(0, 3))}\n".encode()
    argv = ["inspect", "dumps"] + draw(st.sampled_from([[], ["--diff", "1", "2"], ["--diff", "dce", "cost"],
                                                         ["--diff", "1", "2", "--layer", "99"], ["--layer", "1"],
                                                         ["--diff", "1", "2", "--layer", "-1"]]))  # fmt: skip
    return files, argv


@settings(FUZZ, max_examples=200)
@given(case=dump_dirs())
def test_fuzz_inspect(capsys, case):
    files, argv = case
    rc, out, err, before, after = run_case(capsys, argv, files, dirs=["dumps"])
    assert after == before
    if rc == 2:
        assert len(err) == 1 and err[0].startswith("dsv3c: error: "), err
    else:
        assert rc == 0 and out and all(line.startswith("dsv3c: warning: cannot use ") for line in err), (rc, err)
    COUNTS["clean"] += 1


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    """After the module: print the corpus counts and check them (no tracebacks, no lost files)."""
    yield
    line = ", ".join(f"{k} {v}" for k, v in COUNTS.items())
    print(f"\nfuzz corpus: {line}")
    if os.environ.get("DSV3C_FUZZ_COUNTS"):
        with open(os.environ["DSV3C_FUZZ_COUNTS"], "w") as f:
            json.dump(COUNTS, f)
    assert COUNTS["tracebacks"] == 0 and COUNTS["files_lost"] == 0
