"""The model: KV-cache decoding, the 671B preset's parameter counts, and the load-balancing functions."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_def import DeepseekV3, ModelConfig
from model_def.balance import expert_load, sequence_balance_loss, update_bias
from model_def.counts import COMPONENTS, parameter_counts

# ---- KV cache ---------------------------------------------------------------------------


@torch.no_grad()
def random_model(seed: int) -> DeepseekV3:
    """The tiny preset in float32 with O(1) activations and a non-zero router bias."""
    model = DeepseekV3(ModelConfig.preset("tiny"))
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        scale = 0.2 if "norm" in name else p.shape[-1] ** -0.5
        p.copy_((1.0 if "norm" in name else 0.0) + scale * torch.randn(p.shape, generator=gen))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model


def extend(past, entries):
    """The cache after one step: each layer's (k, v) with this step's entries appended along the token axis."""
    if past is None:
        return entries
    return [(torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)) for (pk, pv), (k, v) in zip(past, entries)]


@pytest.mark.parametrize("chunks", [[1] * 7, [3, 1, 1, 2], [7]])
@settings(max_examples=4)
@given(seed=st.integers(0, 2**16))
def test_cached_decode_equals_full_forward(chunks, seed):
    """Feeding the tokens chunk by chunk with the KV cache gives the logits of one full forward."""
    model = random_model(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (2, sum(chunks)), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = model(ids)
        past, steps, start = None, [], 0
        for n in chunks:
            logits, entries = model(ids[:, start : start + n], past=past, return_cache=True)
            past, start = extend(past, entries), start + n
            steps.append(logits)
    assert len(past) == model.cfg.num_hidden_layers and past[0][0].shape[1] == ids.shape[1]
    got = torch.cat(steps, dim=1)
    assert ((got - full).abs().max() / full.abs().max()).item() < 1e-5


# ---- parameter counts -------------------------------------------------------------------

V3_MAIN = 671_026_419_200  # DESIGN.md: main model, router bias included, MTP excluded
V3_MTP = 11_610_068_224
V3_ACTIVATED = 37_552_297_472


@pytest.fixture(scope="module")
def v3_counts() -> dict:
    """parameter_counts of the 671B preset built on 'meta'."""
    return parameter_counts(DeepseekV3(ModelConfig.preset("deepseek-v3"), device="meta"))


def test_v3_counts(v3_counts):
    """The 671B preset's main, MTP and activated-per-token counts match DeepSeek-V3's."""
    assert v3_counts["main"] == V3_MAIN
    assert v3_counts["mtp"] == V3_MTP
    assert v3_counts["activated_per_token"] == V3_ACTIVATED
    assert v3_counts["total"] == V3_MAIN + V3_MTP


def test_v3_components(v3_counts):
    """The components partition the total; experts, router and embedding have their closed-form sizes."""
    by, cfg = v3_counts["by_component"], ModelConfig.preset("deepseek-v3")
    assert set(by) == set(COMPONENTS) and sum(by.values()) == v3_counts["total"]
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    e, f, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    assert by["routed_experts"] == moe_layers * e * 3 * f * d
    assert by["router"] == moe_layers * e * (d + 1)  # the 14,848 bias values included
    assert by["embedding"] == by["head"] == cfg.vocab_size * d
    assert by["dense_mlp"] == cfg.first_k_dense_replace * 3 * cfg.intermediate_size * d


def test_tiny_counts_match_tensors():
    """Tiny model: total = parameters + router biases; activated = main − (E − k) experts per MoE layer."""
    model = DeepseekV3(ModelConfig.preset("tiny"))
    counts, cfg = parameter_counts(model), model.cfg
    biases = sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    assert counts["total"] == sum(p.numel() for p in model.parameters()) + biases
    assert counts["mtp"] == sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp.")) + sum(
        b.numel() for n, b in model.named_buffers() if n.startswith("mtp.") and n.endswith("bias")
    )
    per_expert = 3 * cfg.moe_intermediate_size * cfg.hidden_size
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    idle = moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    assert counts["activated_per_token"] == counts["main"] - idle


# ---- load balancing ---------------------------------------------------------------------


@given(st.integers(1, 12), st.lists(st.integers(0, 50), min_size=1, max_size=12), st.floats(1e-4, 1e-1))
def test_update_bias(seed, load, gamma):
    """b_i rises by γ when under-loaded, falls by γ when over-loaded, stays at the mean; input untouched."""
    load = torch.tensor(load)
    bias = torch.randn(len(load), generator=torch.Generator().manual_seed(seed))
    before = bias.clone()
    new = update_bias(bias, load, gamma)
    assert torch.equal(bias, before) and new.dtype == torch.float32
    mean = load.double().mean()
    step = new.double() - bias.double()  # exact up to float32 rounding of the sum
    for i, c in enumerate(load.tolist()):
        want = 0.0 if c == mean else (gamma if c < mean else -gamma)
        assert abs(step[i].item() - want) < 1e-6, (i, c, mean)


def test_update_bias_exact_cases():
    """Balanced load leaves the bias alone; one hot expert is lowered while the others are raised."""
    bias = torch.zeros(4)
    assert torch.equal(update_bias(bias, torch.tensor([3, 3, 3, 3])), bias)
    assert torch.allclose(update_bias(bias, torch.tensor([9, 1, 1, 1]), 0.5), torch.tensor([-0.5, 0.5, 0.5, 0.5]))


@st.composite
def routing(draw):
    """(scores [T, E] positive, ids [T, k] distinct per token, k) for one sequence."""
    t, e = draw(st.integers(1, 9)), draw(st.integers(1, 8))
    k = draw(st.integers(1, e))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scores = torch.rand(t, e, generator=gen, dtype=torch.float64) + 1e-3
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    return scores, ids, k


@given(routing())
def test_expert_load_counts(r):
    """expert_load counts each expert's tokens and sums to T·k."""
    _, ids, k = r
    e = int(ids.max()) + 1
    load = expert_load(ids, e)
    assert load.sum().item() == ids.numel()
    assert load.tolist() == [int((ids == i).sum()) for i in range(e)]


@given(routing(), st.floats(1e-5, 1.0))
def test_sequence_balance_loss_matches_formula(r, alpha):
    """L = α Σ_i f_i P_i with f_i = E/(k·T)·count_i and P_i the mean of the per-token normalised scores."""
    scores, ids, k = r
    t, e = scores.shape
    want = 0.0
    for i in range(e):
        f = e / (k * t) * sum(int(i in ids[s].tolist()) for s in range(t))
        p = sum(float(scores[s, i] / scores[s].sum()) for s in range(t)) / t
        want += f * p
    got = sequence_balance_loss(scores, ids, k, alpha)
    assert abs(got.item() - alpha * want) <= 1e-12 + 1e-9 * alpha * want


@given(routing(), st.integers(0, 2**16))
def test_sequence_balance_loss_properties(r, seed):
    """Uniform scores give exactly α; per-token rescaling of scores changes nothing; gradients reach the scores."""
    scores, ids, k = r
    t, e = scores.shape
    uniform = sequence_balance_loss(torch.full((t, e), 0.3, dtype=torch.float64), ids, k, 1e-4)
    assert torch.isclose(uniform, torch.tensor(1e-4, dtype=torch.float64))
    c = torch.rand(t, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1
    assert torch.isclose(sequence_balance_loss(scores * c, ids, k), sequence_balance_loss(scores, ids, k))
    s = scores.clone().requires_grad_()
    sequence_balance_loss(s, ids, k).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_sequence_balance_loss_perfect_balance_is_alpha():
    """With every expert chosen equally often (f_i = 1), L = α for any scores."""
    ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    scores = torch.rand(4, 4, dtype=torch.float64) + 0.01
    assert torch.isclose(sequence_balance_loss(scores, ids, 2, 0.01), torch.tensor(0.01, dtype=torch.float64))


def test_sequence_balance_loss_rejects_wrong_k():
    """ids whose width is not top_k are refused."""
    with pytest.raises(ValueError, match="ids must have shape"):
        sequence_balance_loss(torch.rand(3, 4), torch.zeros(3, 2, dtype=torch.long), top_k=3)
