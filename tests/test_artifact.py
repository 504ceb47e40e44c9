"""A lowered program is an artifact: another process loads it and runs it without lowering again."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3c
from dsv3c.codegen import lowering
from dsv3c.frontend.exporter import capture_blocks
from dsv3c.runtime.artifact import ArtifactError, LoadedProgram, save_program
from tests.test_blocks import input_values
from tests.test_lowering import SHAPES, lower, transformed

RUNNER = """
import sys
from safetensors.torch import load_file, save_file
from dsv3c.runtime.artifact import LoadedProgram
for program_dir, inputs, outputs in zip(*[iter(sys.argv[1:])] * 3):
    program = LoadedProgram(program_dir)
    given = load_file(inputs)
    outs = program(*[given[n] for n in program.inputs])
    save_file({k: v.contiguous() for k, v in outs.items()}, outputs)
"""

CASES = {"prefill": ("prefill", dsv3c.capture), "prefill-blocks": ("prefill", capture_blocks),
         "decode-blocks": ("decode", capture_blocks)}


def test_another_process_runs_the_lowered_programs(tmp_path):
    """Whole graphs and programs of blocks (each block's code once, run per instance with its own weights), lowered
    and saved with their weights, give in another process the outputs they give here, bit for bit."""
    here, argv = {}, []
    for case, (mode, capture) in CASES.items():
        program, legal = transformed(mode, SHAPES[mode], capture=capture)  # tiny: its MoE block computes 2 layers
        lower(program, legal, mode)
        calls = {n.args[0] for n in program.graph.nodes if n.target is lowering.kernel_call_op()}
        specs = [lowering.get_spec(i) for i in sorted(calls)]
        args = input_values(program, seed=3)
        with torch.no_grad():
            here[case] = program(*args)
        entry = save_program(program, specs, tmp_path / case, with_weights=True)
        assert entry["call_specs"] == len(calls) > 0 and entry["weights"] == program.weight_count()
        save_file(dict(zip(program.model_inputs, args)), str(tmp_path / f"{case}.in.safetensors"))
        argv += [str(tmp_path / case), str(tmp_path / f"{case}.in.safetensors"), str(tmp_path / f"{case}.out.safetensors")]
    assert all(torch.equal(here["prefill"][k], here["prefill-blocks"][k]) for k in here["prefill"])  # one model
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", RUNNER, *argv], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    for case in CASES:
        there = load_file(str(tmp_path / f"{case}.out.safetensors"))
        assert set(there) == set(here[case])
        for name, value in here[case].items():  # the same kernels with the same specialisations: the same numbers
            torch.testing.assert_close(there[name], value, rtol=0, atol=0)


def test_a_damaged_artifact_is_a_clear_error(tmp_path):
    (tmp_path / "program.json").write_text("{not json")
    (tmp_path / "program.py").write_text("")
    with pytest.raises(ArtifactError, match="cannot read lowered program"):
        LoadedProgram(tmp_path)
