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
