"""The FP8 graph against an FP8 emulation written here from the E4M3 weights and scales the program holds.

After `mla_fuse,fp8_quant` on a tiny model in prefill mode the graph runs node by node; at every FP8 op the
emulation below recomputes the op's output from the op's actual inputs (so a difference is attributable to
that op): E4M3 rounding (round to nearest even) by arithmetic on the binade's quantum, DeepSeek's 1x128
activation tiles (scale = max(amax, 1e-4) / 448), 128x128 weight blocks dequantised with their
`weight_scale_inv`, FP32 accumulation. Codes must match except at exact midpoints between two E4M3 values
(one flipped code there is the only allowed difference); GEMM outputs within 1e-5 relative, rows whose
internal activation quantisation hit a midpoint left out. No dsv3c.ops code is used by the emulation.
"""

import torch
from torch import fx

import dsv3c
from tests.test_passes import TINY, model_for, run_passes

RTOL = 1e-5
dsv3 = torch.ops.dsv3


def e4m3_round(v: torch.Tensor):
    """(v rounded to E4M3 by round-half-even on its binade's quantum, mask of exact midpoints); |v| <= 448."""
    v = v.double()
    mag = v.abs()
    exp = torch.floor(torch.log2(mag.clamp_min(2.0**-6)))
    quantum = torch.exp2(exp - 3)  # 3 mantissa bits; below 2^-6 the subnormal step 2^-9
    q = v / quantum
    frac = q - torch.floor(q)
    return torch.round(q) * quantum, frac == 0.5


def quant_tiles(x: torch.Tensor):
    """(dequantised codes as float64 [.., K], scales [.., K/128], midpoint mask) of 1x128 tiles along the last dim."""
    k = x.shape[-1]
    nb = -(-k // 128)
    xf = torch.nn.functional.pad(x.float(), (0, nb * 128 - k)).reshape(*x.shape[:-1], nb, 128)
    scale = (xf.abs().amax(-1).clamp_min(1e-4) / 448.0).float()
    v = (xf / scale[..., None]).clamp(-448, 448)
    codes, mid = e4m3_round(v)
    return codes.reshape(*x.shape[:-1], -1)[..., :k], scale, mid.reshape(*x.shape[:-1], -1)[..., :k]


def gemm(codes, scale, wq, ws):
    """y = x·wᵀ from activation codes (float64) and tile scales, E4M3 weight blocks and their scale_inv, FP32 accumulation."""
    n, k = wq.shape
    w = wq.double() * ws.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
    acc = torch.zeros(*codes.shape[:-1], n, dtype=torch.float32)
    for c in range(-(-k // 128)):  # one 128-long K chunk at a time, scaled, accumulated in FP32
        part = codes[..., c * 128 : (c + 1) * 128] @ (w[:, c * 128 : (c + 1) * 128].T / 1.0)
        acc += (part * scale[..., c : c + 1].double()).float()
    return acc


def close(got, want, rows_ok=None):
    got, want = got.float(), want.float()
    if rows_ok is not None:
        got, want = got[rows_ok], want[rows_ok]
    if not want.numel():
        return 0.0
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


class Checker(fx.Interpreter):
    """Runs the graph; checks each FP8 op's output against the emulation of its actual inputs."""

    def __init__(self, gm):
        super().__init__(gm)
        self.seen, self.midpoints = {}, 0

    def call_function(self, target, args, kwargs):
        out = super().call_function(target, args, kwargs)
        if target is dsv3.act_quant.default:
            codes, scale, mid = quant_tiles(args[0])
            xq, xs = out
            assert torch.equal(xs, scale), "act_quant scales differ from amax/448"
            differ = xq.double() != codes
            assert not (differ & ~mid).any(), "act_quant codes differ away from round-to-nearest-even midpoints"
            # at a midpoint the only allowed difference is one flipped code: the neighbour
            assert ((xq.double() - codes).abs()[differ] <= codes.abs()[differ] / 8 + 2.0**-9).all()
            self.midpoints += int(mid.sum())
            self.seen["act_quant"] = self.seen.get("act_quant", 0) + 1
        elif target is dsv3.fp8_gemm.default:
            xq, xs, wq, ws = args[:4]
            want = gemm(xq.double(), xs, wq, ws)
            assert close(out, want) <= RTOL, ("fp8_gemm", close(out, want))
            self.seen["fp8_gemm"] = self.seen.get("fp8_gemm", 0) + 1
        elif target is dsv3.moe_experts_fp8.default:
            want, rows_ok = self.experts(*args)
            assert rows_ok.float().mean() > 0.5, "most tokens should see no midpoint"
            assert close(out, want, rows_ok) <= RTOL, ("moe_experts_fp8", close(out, want, rows_ok))
            self.seen["moe_experts_fp8"] = self.seen.get("moe_experts_fp8", 0) + 1
        return out

    def experts(self, x, ids, weights, gq, gs, uq, us, dq, ds):
        """Σ_j g[t, j]·FFN_e(x_t) with every expert GEMM emulated; rows whose quantisation hit a midpoint flagged."""
        y = torch.zeros(x.shape, dtype=torch.float32)
        rows_ok = torch.ones(x.shape[0], dtype=torch.bool)
        for t in range(x.shape[0]):
            for j in range(ids.shape[1]):
                e = int(ids[t, j])
                c, s, m1 = quant_tiles(x[t : t + 1])
                h, u = gemm(c, s, gq[e], gs[e]), gemm(c, s, uq[e], us[e])
                a = h * torch.sigmoid(h) * u
                c2, s2, m2 = quant_tiles(a.to(x.dtype))
                y[t] += weights[t, j] * gemm(c2, s2, dq[e], ds[e])[0]
                rows_ok[t] &= not bool(m1.any() or m2.any())
        return y.to(x.dtype), rows_ok


def test_fp8_graph_matches_an_independent_fp8_emulation():
    model = model_for(TINY, 4, bias_std=3.0)
    x = torch.randint(0, TINY.vocab_size, (2, 8), generator=torch.Generator().manual_seed(4))
    program, _ = run_passes(dsv3c.capture(TINY, "prefill", 2, 8, model=model), ["mla_fuse", "fp8_quant"])
    checker = Checker(program.gm)
    call = [program.weights[n.name] if n.name in program.weights else x for n in program.placeholders()]
    with torch.no_grad():
        checker.run(*call)
    assert checker.seen.get("fp8_gemm", 0) > 0 and checker.seen.get("moe_experts_fp8", 0) > 0, checker.seen
    assert checker.seen["act_quant"] == checker.seen["fp8_gemm"]


def test_e4m3_emulation_rounds_half_to_even_and_flags_midpoints():
    v = torch.tensor([1.0625, 1.1875, 1.07, 2.0**-10, 3 * 2.0**-10, 448.0])
    got, mid = e4m3_round(v)
    assert got.tolist() == [1.0, 1.25, 1.125, 0.0, 2.0**-8, 448.0]
    assert mid.tolist() == [True, True, False, True, True, False]
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 3
    codes, _, m = quant_tiles(x)
    xq, _ = dsv3.act_quant(x)
    assert not ((xq.double() != codes) & ~m).any()
