"""Every registered pass keeps the function its contract promises, on drawn tiny configs and modes.

The passes run as a chain in the default pipeline order (each pass's prerequisites are the passes before
it there; a pass outside the default order is inserted at a drawn position where an op it rewrites is
legal). Before and after each pass the graph runs on the same inputs and the outputs are compared by name
with the pass's documented tolerance. A pass registered later is covered without touching this file: it
gets the strict tolerance unless TOLERANCE says otherwise.

Decode graphs read a K/V cache: a prefill graph of the same model fills it, and runs the passes that change
the decode graph's inputs (mla_fuse makes the cache latent) in lockstep, so that both sides of a pass read
a cache in the format they expect.

Programs of blocks (what `dsv3c compile` transforms) are checked the same way, on models whose MoE block
computes two layers: the program runs the whole model, each instance with its own weights, derived weights
and arguments, before and after each pass.
"""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dsv3c
import passes
from dsv3c.frontend.exporter import capture_blocks
from dsv3c.ir import Plan
from dsv3c.passmgr.verify import verify
from tests.test_lowering import LOWERING_RTOL
from tests.test_passes import FP8_LOGITS_RTOL, TARGET, TINY, model_for, tiny_configs

EXACT = 1e-5  # max |after - before| / max |before|: float32 reassociation only
FP8_OPS = frozenset({"fp8_gemm", "fp8_linear", "moe_experts_fp8", "moe_experts_fp8_train"})

# Passes whose output cannot run on CPU real tensors in this process, with the reason. None today:
# lower_triton runs with aot=False on Triton's CPU interpreter; expert_partition runs at ep=1 (no
# process group needed; ep > 1 is covered by tests/test_expert_partition.py on gloo).
SKIP: dict[str, str] = {}
# Passes slow enough to get their own, smaller example budget (the Triton interpreter runs every kernel).
SLOW = {"lower_triton"}
# Option values that make a pass runnable in one process (others: drawn from the option's choices, else default).
FIXED_OPTIONS = {"expert_partition": {"ep": 1},
                 "pipeline_partition": {"kind": "1f1b"}}  # one process: pp = 1, which DualPipe cannot take


def tolerance(name: str, legal_before: frozenset):
    """(kind, bound) for pass `name` run on a graph where the ops `legal_before` may appear.

    exact: max-abs relative 1e-5. fp8: tests/test_passes.py's FP8_LOGITS_RTOL, relative Frobenius per
    output (decisive routing). lowering: tests/test_lowering.py's LOWERING_RTOL, max-abs relative per output.
    expert_partition on FP8 experts combines in BF16 (DeepSeek's recipe, documented in dsv3c/ops/ep.py), and the
    next FP8 quantisation can turn a BF16 ulp into an E4M3 step: the FP8 tolerance; on unquantised experts exact.
    """
    if name == "fp8_quant":
        return "fp8", FP8_LOGITS_RTOL
    if name == "lower_triton":
        return "lowering", LOWERING_RTOL
    if name == "expert_partition" and legal_before & FP8_OPS:
        return "fp8", FP8_LOGITS_RTOL
    return "exact", EXACT


def chain_for(todo: list[str], data) -> list[str]:
    """The passes to run: the default pipeline up to the last pass in `todo` (each pass's prerequisites are
    the passes before it), with every pass outside the default order inserted at a drawn position where an
    op it rewrites is legal (and before lower_triton, which turns every compute op into kernel calls)."""
    order = passes.default_pipeline()
    chain = order[: max([order.index(n) + 1 for n in todo if n in order], default=0)]
    for name in (n for n in todo if n not in order):
        removes = passes.REGISTRY[name].removes
        positions = [i for i in range(len(chain) + 1) if removes & passes.legal_after(chain[:i])]
        assert positions, f"pass {name} rewrites ops that no prefix of the default pipeline makes legal"
        positions = [i for i in positions if "lower_triton" not in chain[:i]] or positions
        i = data.draw(st.sampled_from(positions), label=f"{name} at")
        chain = chain[:i] + [name] + chain[i:]
    return chain


def pass_options(name: str, data) -> dict:
    opts = dict(FIXED_OPTIONS.get(name, {}))
    for key, opt in passes.REGISTRY[name].options.items():
        if key not in opts and opt.choices:
            opts[key] = opt.check(name, key, data.draw(st.sampled_from(opt.choices), label=f"{name}.{key}"))
    return opts


@st.composite
def small_configs(draw, moe: int = 1):
    """tests/test_passes.py's tiny configs with at most one dense and `moe` MoE layers (the chain runs many graphs)."""
    cfg = draw(tiny_configs())
    dense = min(cfg.first_k_dense_replace, 1)
    return dataclasses.replace(cfg, first_k_dense_replace=dense, num_hidden_layers=dense + moe)


def apply(program, name: str, opts: dict, legal: frozenset) -> frozenset:
    """Run one pass on program in place, verify the IR, return the legal ops after it."""
    p = passes.REGISTRY[name]
    p.fn(Plan(program, TARGET, options={"aot": False}), dict(opts))
    legal = p.legal_after(legal)
    verify(program, legal)
    return legal


def compare(name: str, kind: str, bound: float, before: dict, after: dict, cfg, inference: bool) -> None:
    common = [k for k in before if k in after]
    assert "logits" in common, (name, list(before), list(after))
    draft_differs = kind == "lowering" and inference and "mtp_logits" in common and not torch.equal(
        before["logits"][:, -1].float().argmax(-1), after["logits"][:, -1].float().argmax(-1))
    for key in common:
        b, a = before[key].float(), after[key].float()
        assert a.shape == b.shape, (name, key)
        if draft_differs and (key == "mtp_logits" or key.startswith(f"cache_{cfg.num_hidden_layers}_")):
            # the MTP block drafts its last position from the main head's argmax: a near-tie moved it
            b, a = b[:, :-1], a[:, :-1]
        if not b.numel():
            continue
        if kind == "fp8":
            err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        else:
            err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        assert err <= bound, f"pass {name} changed output {key}: {kind} error {err:.3g} > {bound}"


def check_chain(cfg, seed, mode, batch, seq, names, options, checked, dtype=torch.float32, blocks=False) -> None:
    """Run the chain `names` on cfg captured for mode in dtype (as a program of blocks with `blocks`); compare
    before/after each pass in `checked`."""
    model = model_for(cfg, seed, bias_std=3.0)  # decisive routing: FP8 noise moves no token to other experts
    if dtype != torch.float32:  # the router bias and RoPE tables stay float32, as DeepseekV3(dtype=...) keeps them
        model.to(dtype)
        for _, buf in model.named_buffers():
            buf.data = buf.data.float()
    gen = torch.Generator().manual_seed(seed)
    shapes = dict(batch=batch, seq=1, kv_len=seq) if mode == "decode" else dict(batch=batch, seq=seq)
    capture = capture_blocks if blocks else dsv3c.capture
    program = capture(cfg, mode, model=model, **shapes)
    x = torch.randint(0, cfg.vocab_size, (batch, shapes["seq"]), generator=gen)
    prefill = prefill_legal = None
    if mode == "decode":
        prefill = capture(cfg, "prefill", batch, seq, model=model)
        prefill_legal = passes.CAPTURED_OPS
        x_prefill = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)

    def caches():
        out = prefill(x_prefill)
        return [out[n.replace("past_", "cache_", 1)] for n in program.model_inputs[1:]]

    def run(past):
        with torch.no_grad():
            return program(x, *past) if mode == "decode" else program(x)

    legal = passes.CAPTURED_OPS
    past = caches() if mode == "decode" else []
    for name in names:
        opts = options.get(name, {})
        if name not in checked:
            inputs = list(program.inputs)
            legal = apply(program, name, opts, legal)
            if mode == "decode" and program.inputs != inputs:
                prefill_legal = apply(prefill, name, opts, prefill_legal)
                past = caches()
            continue
        kind, bound = tolerance(name, legal)
        before = run(past)
        inputs = list(program.inputs)
        legal = apply(program, name, opts, legal)
        if mode == "decode" and program.inputs != inputs:  # the cache format changed: refill it
            prefill_legal = apply(prefill, name, opts, prefill_legal)
            past = caches()
        compare(name, kind, bound, before, run(past), cfg, mode != "train")


def _draw_case(data, slow: bool, moe: int = 1):
    """(cfg, seed, mode, batch, seq, chain, options, checked): one chain that checks every pass (slow or not)."""
    todo = sorted(n for n in passes.REGISTRY if n not in SKIP and (n in SLOW) == slow)
    cfg = data.draw(small_configs(moe), label="cfg")
    mode = data.draw(st.sampled_from(["train", "prefill", "decode"]), label="mode")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    batch = data.draw(st.integers(1, 2), label="batch")
    seq = data.draw(st.integers(2, 5), label="seq")
    chain = chain_for(todo, data)
    options = {n: pass_options(n, data) for n in chain}
    return cfg, seed, mode, batch, seq, chain, options, set(todo)


def test_every_pass_is_checked_or_skipped_with_a_reason():
    assert set(SKIP) <= set(passes.REGISTRY) and all(SKIP.values())
    assert set(passes.REGISTRY) - set(SKIP), "no pass left to check"
    assert SLOW <= set(passes.REGISTRY)


@settings(max_examples=2)
@given(data=st.data())
def test_every_pass_keeps_the_function(data):
    check_chain(*_draw_case(data, slow=False))


@settings(max_examples=1)
@given(data=st.data())
def test_every_slow_pass_keeps_the_function(data):
    """The passes in SLOW, each after its prerequisites (not compared again here)."""
    case = _draw_case(data, slow=True)
    if not case[-1]:
        pytest.skip("no slow pass registered")
    check_chain(*case, dtype=torch.bfloat16)  # the lowering tolerance is that of BF16 models (test_lowering.py)


@settings(max_examples=2)
@given(data=st.data())
def test_every_pass_keeps_the_function_of_a_program_of_blocks(data):
    """Every pass, lower_triton included, on a program of blocks whose MoE block computes two layers."""
    cfg, seed, mode, batch, seq, chain, options, checked = _draw_case(data, slow=False, moe=2)
    slow = sorted(SLOW)
    check_chain(cfg, seed, mode, batch, seq, chain + slow, options, checked | set(slow), blocks=True)


def test_a_pass_that_changes_the_function_is_caught(monkeypatch):
    """The check above can fail: a pass that scales the output head by 1 + 1e-4 is reported."""

    def scale_head(plan, opts):
        weights = plan.program.weights
        name = next(k for k in weights if "lm_head" in k)
        weights[name] = weights[name] * (1 + 1e-4)
        return {}

    monkeypatch.setitem(passes.REGISTRY, "_scale_head", passes.Pass("_scale_head", scale_head, "changes the function"))
    cfg = dataclasses.replace(TINY, num_hidden_layers=1, first_k_dense_replace=1, num_nextn_predict_layers=0)
    with pytest.raises(AssertionError, match="changed output logits"):
        check_chain(cfg, 0, "prefill", 1, 3, ["_scale_head"], {}, {"_scale_head"})
