"""dsv3c run: the tiny model's lowered graph runs its Triton kernels (CPU interpreter here) within the FP8 tolerance."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv3c  # noqa: F401  (first: registers the dsv3 ops)
from dsv3c import cli
from dsv3c.runtime.executor import REL_TOL, TOP1_MIN, RunResult
from model_def import DeepseekV3, ModelConfig
from model_def.checkpoint import save_checkpoint
from model_def.config import TINY

_SCRIPT = Path(sys.executable).with_name("dsv3c")
CMD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "dsv3c.cli"]


def parse(text: str) -> dict:
    """The numbers `dsv3c run` prints."""
    eager = re.search(r"vs eager model: +max abs error (\S+), max rel error (\S+) .*top-1 agreement (\S+)", text)
    ref = re.search(r"vs reference graph: max abs error (\S+), max rel error (\S+)", text)
    assert eager and ref, text
    return {"max_abs": float(eager[1]), "max_rel": float(eager[2]), "top1": float(eager[3]),
            "kernel_rel": float(ref[2])}


def assert_within_tolerance(text: str) -> None:
    got = parse(text)
    assert got["max_rel"] <= REL_TOL and got["top1"] >= TOP1_MIN and got["kernel_rel"] <= REL_TOL, got
    assert "PASS" in text


def test_run_tiny_exits_0_within_tolerance():
    """The real command, in a clean process without TRITON_INTERPRET: run must choose the interpreter itself."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([*CMD, "run", "--model", "tiny"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_within_tolerance(proc.stdout)
    assert "on cpu" in proc.stdout or "on cuda" in proc.stdout


def test_run_decode_from_checkpoint(tmp_path, capsys):
    """Decode against a latent KV cache, with weights loaded from an HF-layout checkpoint and a config.json."""
    torch.manual_seed(7)
    model = DeepseekV3(ModelConfig.preset("tiny"), device="cpu", dtype=torch.bfloat16)
    save_checkpoint(model, tmp_path / "ckpt")
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    code = cli.main(["run", "--config", str(tmp_path / "config.json"), "--checkpoint", str(tmp_path / "ckpt"),
                     "--mode", "decode", "--seed", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert_within_tolerance(out)


def test_exit_status_follows_the_tolerance():
    base = dict(mode="prefill", device="cpu", max_abs=0.01, max_rel=0.05, top1=1.0, kernel_max_abs=0.01,
                kernel_max_rel=0.02, kernel_calls=98, kernels=25, unlowered={})
    assert RunResult(**base).ok
    assert not RunResult(**{**base, "max_rel": REL_TOL * 1.01}).ok
    assert not RunResult(**{**base, "top1": TOP1_MIN - 0.01}).ok
    assert not RunResult(**{**base, "kernel_max_rel": REL_TOL * 1.01}).ok
    assert RunResult(**{**base, "max_rel": 1.0}).lines()[-1].startswith("FAIL")


@pytest.mark.parametrize("argv", [["run", "--model", "deepseek-v3"], ["run", "--mode", "train"]])
def test_run_refuses_what_it_cannot_run(argv, capsys):
    assert cli.main(argv) == 2
    assert "error" in capsys.readouterr().err
