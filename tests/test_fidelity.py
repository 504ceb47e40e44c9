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


def route(logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, k: int, scaling: float = 2.5):
    """(reference, kernel) routing of router logits [T, E]: the reference reads them through an identity gate."""
    from dsv3c.codegen.lowering import run_op
    from dsv3c.ops import ref

    eye = torch.eye(logits.shape[1])
    want = ref.moe_gate(logits, eye, bias, n_group, topk_group, k, True, scaling)
    got = run_op("moe_gate", logits, eye, bias, n_group=n_group, topk_group=topk_group, top_k=k,
                 norm_topk_prob=True, scaling=scaling)
    return want, tuple(got)


def lowest_index_rule(biased: torch.Tensor, n_group: int, topk_group: int, k: int) -> torch.Tensor:
    """Expert ids [T, k] by the documented rule: higher value first, the lower index among exact ties."""
    out = []
    for row in biased.tolist():
        size = len(row) // n_group
        groups = [sum(sorted(row[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: (-groups[g], g))[:topk_group]
        experts = [e for e in range(len(row)) if e // size in kept]
        out.append(sorted(experts, key=lambda e: (-row[e], e))[:k])
    return torch.tensor(out)


def test_router_ties_go_to_the_lowest_index_in_reference_and_kernel():
    torch.manual_seed(0)
    e, n_group, topk_group, k = 16, 4, 2, 4
    all_tied = torch.zeros(3, e)  # zero router weights: every score is sigmoid(0)
    partial = torch.randint(0, 3, (64, e)).float()  # few distinct values: ties inside and across groups
    for logits in (all_tied, partial):
        bias = torch.zeros(e)
        (ww, wid), (gw, gid) = route(logits, bias, n_group, topk_group, k)
        rule = lowest_index_rule(torch.sigmoid(logits) + bias, n_group, topk_group, k)
        assert torch.equal(wid, rule)
        assert torch.equal(gid, rule)
        torch.testing.assert_close(gw, ww, rtol=1e-6, atol=0)
    assert wid.dtype == torch.int64


def test_router_weights_survive_underflowing_scores():
    e, n_group, topk_group, k, scaling = 16, 4, 2, 4, 2.5
    tied = torch.full((4, e), -60.0) - 40.0 * torch.arange(4.0)[:, None] / 3  # rows at -60, -73.3, -86.7, -100
    spread = -60.0 - 40.0 * torch.rand(32, e, generator=torch.Generator().manual_seed(0))
    for logits in (tied, spread):
        (ww, wid), (gw, gid) = route(logits, torch.zeros(e), n_group, topk_group, k, scaling)
        s = torch.sigmoid(logits.double()).gather(1, wid)
        exact = s / s.sum(-1, keepdim=True) * scaling  # float64 never underflows here
        torch.testing.assert_close(ww.double(), exact, rtol=1e-5, atol=0)
        torch.testing.assert_close(ww.sum(-1), torch.full((logits.shape[0],), scaling), rtol=1e-6, atol=0)
        assert torch.equal(gid, wid)
        torch.testing.assert_close(gw, ww, rtol=1e-5, atol=0)
    (tied_w, _), _ = route(tied, torch.zeros(e), n_group, topk_group, k, scaling)
    torch.testing.assert_close(tied_w, torch.full((4, k), scaling / k), rtol=1e-6, atol=0)


def fp8_program(cfg: ModelConfig, model: DeepseekV3, names: list[str]):
    """A prefill capture of model after the passes `names`."""
    import dsv3c
    import passes
    import targets
    from dsv3c.ir import Plan

    plan = Plan(dsv3c.capture(cfg, "prefill", 1, 4, model=model), targets.get_target("h800x8"))
    for name in names:
        passes.REGISTRY[name].fn(plan, {})
    return plan.program


def test_fused_down_projection_is_quantised_per_segment():
    import dataclasses

    from dsv3c.ops import fp8

    cfg = dataclasses.replace(TINY, q_lora_rank=200, num_hidden_layers=1, first_k_dense_replace=1,
                              num_nextn_predict_layers=0)  # fmt: skip
    model = DeepseekV3(cfg)
    model.reset_parameters(std=0.05, seed=0)
    attn = model.layers[0].self_attn
    attn.kv_a_proj_with_mqa.weight.data *= 30  # segments of very different magnitude, so shared scales show
    program = fp8_program(cfg, model, ["mla_fuse", "fp8_quant"])
    w = program.weights
    fused = fp8.weight_dequant(w["layers_0_self_attn_qkv_a_proj_weight_e4m3"], w["layers_0_self_attn_qkv_a_proj_weight_scale_inv"])
    q_rows, kv_rows = cfg.q_lora_rank, cfg.kv_lora_rank + cfg.qk_rope_head_dim
    want = [fp8.weight_dequant(*fp8.weight_quant(m.weight)) for m in (attn.q_a_proj, attn.kv_a_proj_with_mqa)]
    assert torch.equal(fused[:q_rows], want[0])
    assert torch.equal(fused[-kv_rows:], want[1])
    assert not fused[q_rows:-kv_rows].any()  # rows that pad W_DQ to whole blocks stay zero


def write_pow2_scales(path) -> None:
    """Re-quantise every FP8 tensor of the checkpoint at path with power-of-two scales, in place."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from dsv3c.ops import fp8

    with safe_open(path / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name in [k for k in tensors if k.endswith("_scale_inv")]:
        base = name[: -len("_scale_inv")]
        w = fp8.weight_dequant(tensors[base], tensors[name])
        tensors[base], tensors[name] = fp8.weight_quant(w, pow2_scale=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_fp8_checkpoint_codes_and_scales_reach_the_program_unchanged(tmp_path):
    from safetensors import safe_open

    from model_def.checkpoint import hf_expert_name, hf_name, load_checkpoint, save_checkpoint

    cfg = TINY
    src = DeepseekV3(cfg)
    src.reset_parameters(std=0.05, seed=0)
    for pow2 in (False, True):
        path = tmp_path / f"pow2_{pow2}"
        save_checkpoint(src, path, fp8=True)
        if pow2:
            write_pow2_scales(path)
        model = DeepseekV3(cfg, dtype=torch.bfloat16)
        load_checkpoint(model, path)
        n = cfg.num_hidden_layers
        fqns = {k.replace(".", "_"): k for k in model.state_dict()}  # export's placeholder spelling → fqn
        with safe_open(path / "model.safetensors", "pt") as f:

            def stored(fqn: str):
                """(codes, scales) of our fqn as the file holds them (experts stacked)."""
                if fqn.endswith("_proj") and ".experts." in fqn:
                    names = [hf_expert_name(fqn, e, n) for e in range(cfg.n_routed_experts)]
                else:
                    names = [hf_name(fqn, n)]
                codes = torch.stack([f.get_tensor(x) for x in names])
                scales = torch.stack([f.get_tensor(x + "_scale_inv") for x in names])
                return (codes, scales) if len(names) > 1 else (codes[0], scales[0])

            for names in (["fp8_quant"], ["mla_fuse", "fp8_quant"]):
                program = fp8_program(cfg, model, names)
                checked = 0
                for key, value in program.weights.items():
                    if not key.endswith("_e4m3"):
                        continue
                    base = key[: -len("_e4m3")]
                    scales = program.weights[base + "_scale_inv"]
                    if base.endswith("qkv_a_proj_weight"):  # fused [W_DQ; zero pad; W_DKV]
                        prefix = base[: -len("qkv_a_proj_weight")]
                        (qc, qs), (kc, ks) = stored(fqns[prefix + "q_a_proj_weight"]), stored(fqns[prefix + "kv_a_proj_with_mqa_weight"])
                        pad = torch.zeros(-qc.shape[0] % 128, qc.shape[1], dtype=qc.dtype)
                        want = torch.cat([qc, pad, kc]), torch.cat([qs, ks])
                    else:
                        want = stored(fqns[base[len("p_") :]])
                    assert torch.equal(value.view(torch.uint8), want[0].view(torch.uint8)), (pow2, names, key)
                    assert torch.equal(scales, want[1]), (pow2, names, key)
                    checked += 1
                assert checked > 5
