"""dsv3c run on ranks: the FP8 precision policy under expert parallelism, and the same entry under torchrun."""

import json
import math
import os
import signal
import subprocess
import sys

from dsv3c import cli
from model_def import ModelConfig

TINY = ModelConfig.preset("tiny")


def test_fp8_ep_run_equals_the_single_process_fp8_program(tmp_path, capsys):
    """--fp8 on 2 ranks: the compile's passes (fp8_quant, expert_partition, lower_triton), so dispatch carries E4M3
    codes and 1x128 scales, the experts run the grouped FP8 GEMM kernel (Triton's interpreter), combine is BF16;
    the logits equal the single-process FP8 program within the FP8 bound (the BF16 combine's partial sums are the
    whole difference)."""
    trace = tmp_path / "ep.trace.json"
    assert cli.main(["run", "--ranks", "2", "--ep", "2", "--fp8", "--json", "--trace", str(trace)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["precision"] == "fp8" and r["lowered"] and r["reference"] == "single-process FP8 program"
    assert r["passes"] == ["dce", "mla_fuse", "fp8_quant", "expert_partition", "lower_triton"]
    assert r["logits_max_rel_err"] <= r["tolerances"]["logits_rel"] == 0.2 and r["top1_agreement"] >= 0.9 and r["ok"]
    d = TINY.hidden_size
    spans = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X" and e["cat"] == "comm"]
    assert {e["pid"] for e in spans} == {0, 1}
    bytes_per_row = {}
    for e in spans:
        if e["args"]["rows_sent"]:
            bytes_per_row.setdefault(e["name"], set()).add(e["args"]["bytes_sent"] / e["args"]["rows_sent"])
    assert bytes_per_row["dispatch (ep)"] == {d + 4 * math.ceil(d / 128)}  # E4M3 codes + a float32 scale per 128
    assert bytes_per_row["combine (ep)"] == {2 * d}  # BF16


def _torchrun(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """python -m torch.distributed.run ... in its own process group, killed with its workers on timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun timed out: {err[-2000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_torchrun_runs_the_plan_like_dsv3c_run(tmp_path, capsys):
    """A compiled EP 4 plan under torchrun (4 processes, env://, gloo on the CPU) gives the figures `dsv3c run --plan`
    gives on forked processes: same entry, same layout, same numbers."""
    out = tmp_path / "plan"
    assert cli.main(["compile", "--model", "tiny", "--target", "h800x4", "--mode", "prefill", "--seq", "8", "--parallel",
                     "ep=4,tp=1", "--passes", "dce,expert_partition", "--out", str(out)]) == 0
    plan = str(out / "plan.json")
    capsys.readouterr()
    assert cli.main(["run", "--plan", plan, "--train", "--json"]) == 0
    forked = json.loads(capsys.readouterr().out)
    done = _torchrun(["--nproc-per-node", "4", "-m", "dsv3c.runtime.launch", "--plan", plan, "--train"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["ok"] and r["ranks"] == 4 and r["precision"] == "bf16"
    for key in ("logits_max_rel_err", "loss", "loss_rel_err", "grad_max_cos_diff", "layout", "sent_rows"):
        assert r[key] == forked[key], key
