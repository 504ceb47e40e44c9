"""Fidelity defects of issue 8 (MTP input, fused FP8 blocks, stored FP8 codes, router ties/underflow, meta build)."""

import torch

from model_def import DeepseekV3, ModelConfig

TINY = ModelConfig.preset("tiny")


def tensor_table(model: torch.nn.Module) -> dict:
    """{name: (shape, dtype, device type)} of every parameter and buffer."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in tensors.items()}


def test_meta_context_builds_the_same_meta_model():
    for cfg in (TINY, ModelConfig.preset("deepseek-v3")):
        for dtype in (None, torch.bfloat16):
            with torch.device("meta"):
                ctx = DeepseekV3(cfg, dtype=dtype)
            arg = DeepseekV3(cfg, device="meta", dtype=dtype)
            want = tensor_table(arg)
            assert tensor_table(ctx) == want
            assert {dev for _, _, dev in want.values()} == {"meta"}


def mtp_reference(model: DeepseekV3, ids: torch.Tensor, draft: torch.Tensor, normed: bool = True) -> torch.Tensor:
    """MTP logits as transformers/vLLM define them: eh_proj([enorm(Emb(draft)); hnorm(norm(h))]) → block → head."""
    b, s = ids.shape
    cos, sin = model.rotary(b, 0, s)
    h = model.embed_tokens(ids)
    for layer in model.layers:
        h, _ = layer(h, cos, sin)
    h = model.norm(h) if normed else h  # normed=False is the old (wrong) semantics, kept for the report figure
    mtp = model.mtp[0]
    x = mtp.eh_proj(torch.cat([mtp.enorm(model.embed_tokens(draft)), mtp.hnorm(h)], dim=-1))
    x, _ = mtp.block(x, cos, sin)
    return model.lm_head(mtp.norm(x))


@torch.no_grad()
def test_mtp_reads_the_main_models_final_norm_output():
    torch.manual_seed(0)
    model = DeepseekV3(TINY)
    model.reset_parameters(std=0.05, seed=0)
    for name, p in model.named_parameters():  # non-unit norm weights, so skipping the final norm shows
        if name == "norm.weight":
            p.copy_(1 + 0.5 * torch.randn(p.shape))
    ids = torch.randint(0, TINY.vocab_size, (2, 7))
    _, train = model(ids, mtp=True)
    want = mtp_reference(model, ids[:, :-1], ids[:, 1:])
    torch.testing.assert_close(train, want, rtol=1e-5, atol=1e-6)
    logits, cached, _ = model(ids, mtp=True, return_cache=True)
    draft = torch.cat([ids[:, 1:], logits[:, -1:].argmax(-1)], dim=1)
    torch.testing.assert_close(cached, mtp_reference(model, ids, draft), rtol=1e-5, atol=1e-6)

