"""torch.library.opcheck of every dsv3 op: schema, fake implementation, autograd registration."""

import pytest
import torch

import dsv3c  # noqa: F401  (registers the dsv3 ops)
from dsv3c.ops import fp8, ref

dsv3 = torch.ops.dsv3
g = torch.Generator().manual_seed(0)


def randn(*shape, grad=False):
    """A seeded float32 tensor."""
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def _cases():
    """(op, args) pairs covering every dsv3 op the IR may contain before lowering."""
    t, d, e, f, k = 6, 64, 8, 32, 2
    x = randn(t, d, grad=True)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=g)
    wg, wu, wd = randn(e, f, d, grad=True), randn(e, f, d, grad=True), randn(e, d, f, grad=True)
    q, kk, v = randn(2, 3, 4, 24, grad=True), randn(2, 5, 4, 24, grad=True), randn(2, 5, 4, 16, grad=True)
    cos, sin = randn(2, 3, 4), randn(2, 3, 4)
    xq, xs = fp8.act_quant(randn(2, 3, 200))
    wq, ws = fp8.weight_quant(randn(130, 200))
    packed = [t for w in (wg, wu, wd) for t in fp8.weight_quant(w.detach())]  # stacked [E, N, K] experts
    # expert parallelism at EP 1 (no process group: every route stays local), contiguous placement
    phy2log, logcnt = torch.arange(e), torch.ones(e, dtype=torch.long)
    tables = (phy2log, phy2log.clone().unsqueeze(-1), logcnt)
    dispatch_args = (x, ids, *tables, 1, 0, False, 8, 1.0, float(k))
    recv_x, recv_tok, recv_slot, counts, order, _ = dsv3.ep_dispatch(*dispatch_args)
    recv_x = recv_x.detach().requires_grad_()
    y = dsv3.ep_experts(recv_x, recv_tok, recv_slot, wg, wu, wd, False, 1).detach().requires_grad_()
    return {
        "ep_dispatch": (dsv3.ep_dispatch, dispatch_args),
        "ep_experts": (dsv3.ep_experts, (recv_x, recv_tok, recv_slot, wg, wu, wd, False, 1)),
        "ep_experts_fp8": (dsv3.ep_experts_fp8, (recv_x.detach(), recv_tok, recv_slot, *packed, 1)),
        "ep_combine": (dsv3.ep_combine, (y, weights.clone().requires_grad_(), counts, order, 1, 8, torch.float32, 1.0,
                                         float(k))),
        "rms_norm": (dsv3.rms_norm, (randn(3, 5, 64, grad=True), randn(64, grad=True), 1e-6)),
        "rope": (dsv3.rope, (randn(2, 3, 4, 8, grad=True), cos, sin)),
        "swiglu": (dsv3.swiglu, (randn(4, 16, grad=True), randn(4, 16, grad=True))),
        "moe_gate": (dsv3.moe_gate, (x, randn(e, d, grad=True), randn(e), 4, 2, k, True, 2.5)),
        "moe_experts": (dsv3.moe_experts, (x, ids, weights, wg, wu, wd)),
        "mla_attention": (dsv3.mla_attention, (q, kk, v, 0.2)),
        "latent_attention": (
            dsv3.latent_attention, (randn(2, 3, 4, 16, grad=True), randn(2, 3, 4, 8, grad=True), randn(2, 5, 16, grad=True), randn(2, 5, 8, grad=True), 0.2)
        ),
        "act_quant": (dsv3.act_quant, (randn(3, 200),)),
        "fp8_gemm": (dsv3.fp8_gemm, (xq, xs, wq, ws, torch.float32)),
        "fp8_linear": (dsv3.fp8_linear, (randn(3, 200, grad=True), randn(130, 200, grad=True))),
        "moe_experts_fp8": (dsv3.moe_experts_fp8, (x.detach(), ids, weights, *packed)),
        "moe_experts_fp8_train": (dsv3.moe_experts_fp8_train, (x, ids, weights, wg, wu, wd)),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name):
    op, args = CASES[name]
    tests = ["test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_static"]
    if any(isinstance(a, torch.Tensor) and a.dtype == fp8.FP8 for a in args):
        tests.remove("test_schema")  # the schema checker compares inputs with ops that E4M3 tensors lack
    if name in ("moe_experts", "moe_experts_fp8_train", "ep_dispatch", "ep_experts", "ep_combine"):
        # their backward re-runs the per-expert reference or exchanges data-dependent counts: it runs
        # eagerly (tested in test_passes.py, test_expert_partition.py) but AOTAutograd cannot trace it
        tests.remove("test_aot_dispatch_static")
    torch.library.opcheck(op, args, test_utils=tests)


def test_every_registered_dsv3_op_is_checked():
    registered = {name for name in dir(torch.ops.dsv3) if not name.startswith("_") and isinstance(getattr(torch.ops.dsv3, name), torch._ops.OpOverloadPacket)}
    assert registered - {"kernel_call"} <= set(CASES), registered - set(CASES)


def test_recompute_autograd_matches_reference_gradients():
    q, k, v = randn(1, 3, 2, 8, grad=True), randn(1, 5, 2, 8, grad=True), randn(1, 5, 2, 4, grad=True)
    dsv3.mla_attention(q, k, v, 0.3).pow(2).sum().backward()
    ours = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref.mla_attention(q, k, v, 0.3).pow(2).sum().backward()
    for a, t in zip(ours, (q, k, v)):
        torch.testing.assert_close(a, t.grad)
