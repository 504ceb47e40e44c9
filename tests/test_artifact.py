"""A lowered program is an artifact: another process loads it and runs it without lowering again."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3c.codegen import lowering
from dsv3c.runtime.artifact import ArtifactError, LoadedProgram, save_program
from tests.test_lowering import SHAPES, graph_inputs, lower, transformed

RUNNER = """
import sys
from safetensors.torch import load_file, save_file
from dsv3c.runtime.artifact import LoadedProgram
program = LoadedProgram(sys.argv[1])
inputs = load_file(sys.argv[2])
outs = program(*[inputs[n] for n in program.inputs])
save_file({k: v.contiguous() for k, v in outs.items()}, sys.argv[3])
"""


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_another_process_runs_the_lowered_program(tmp_path, mode):
    program, legal = transformed(mode, SHAPES[mode])
    lower(program, legal, mode)
    calls = {n.args[0] for n in program.graph.nodes if n.target is lowering.kernel_call_op()}
    specs = [lowering.get_spec(i) for i in sorted(calls)]
    args = graph_inputs(program, seed=3)
    with torch.no_grad():
        here = program(*args)
    entry = save_program(program, specs, tmp_path / "program", with_weights=True)
    assert entry["call_specs"] == len(calls) > 0
    save_file(dict(zip(program.inputs, args)), str(tmp_path / "inputs.safetensors"))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "program"), str(tmp_path / "inputs.safetensors"),
                          str(tmp_path / "outputs.safetensors")], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    there = load_file(str(tmp_path / "outputs.safetensors"))
    assert set(there) == set(here)
    for name, value in here.items():  # the same kernels with the same specialisations: the same numbers
        torch.testing.assert_close(there[name], value, rtol=0, atol=0)


def test_a_damaged_artifact_is_a_clear_error(tmp_path):
    (tmp_path / "program.json").write_text("{not json")
    (tmp_path / "program.py").write_text("")
    with pytest.raises(ArtifactError, match="cannot read lowered program"):
        LoadedProgram(tmp_path)
