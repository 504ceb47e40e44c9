"""Greedy generation with and without MTP speculative decoding on a small model (one process, float32).

Plain: prefill the prompt, then one main-model step per token (KV cache of (k, v) per block).

Speculative (MTP as a one-token draft): after a main-model pass, the MTP module drafts token t+2 from
the main model's hidden state at t's position (after the final norm, as `DeepseekV3.forward` feeds it)
and the embedding of token t+1, the main model's greedy choice. The next step feeds [t+1, draft] to the
main model: if its greedy choice after t+1 equals the draft, both the draft and the token after it are
taken (2 tokens for one step); otherwise its choice replaces the draft, and the draft's cache entry is
rolled back (the main model keeps only t+1's entry). The MTP module then runs on the positions that were
kept, with the embeddings of the tokens that really follow them, so its own cache stays consistent with
the main model's; its last logits give the next draft. Greedy verification makes the output identical to
plain greedy decoding (lossless); `acceptance` = drafts accepted / drafts verified.

Limitation: single process; the expert-partitioned gloo runner (`ep_run`) runs captured fixed-shape
programs, while speculative decoding changes the token count per step (2 verified, 1 or 2 kept).
"""

from __future__ import annotations

import torch

from model_def import DeepseekV3


class SpecError(ValueError):
    """Bad arguments to a speculative run (one line)."""


def _cat(past, entries, keep: int | None = None):
    """The cache with this step's entries appended (only the first `keep` positions of them)."""
    out = []
    for i, (k, v) in enumerate(entries):
        if keep is not None:
            k, v = k[:, :keep], v[:, :keep]
        out.append((k, v) if past is None else (torch.cat([past[i][0], k], 1), torch.cat([past[i][1], v], 1)))
    return out


class _NormTap:
    """Captures the main model's final-norm output (the hidden state the MTP module reads)."""

    def __init__(self, model):
        self.h = None
        self.handle = model.norm.register_forward_hook(lambda mod, inp, out: setattr(self, "h", out))

    def close(self):
        self.handle.remove()


def _main(model, ids, past):
    """Main model on ids after past: (logits, this step's entries)."""
    return model(ids, past=past, return_cache=True)


@torch.no_grad()
def generate_plain(model: DeepseekV3, prompt: torch.Tensor, n: int) -> tuple[list[int], int]:
    """n greedy tokens after prompt [1, P]; (tokens, main-model steps after the prefill)."""
    logits, entries = _main(model, prompt, None)
    past = _cat(None, entries)
    tokens = [int(logits[0, -1].argmax())]
    steps = 0
    while len(tokens) < n:
        logits, entries = _main(model, torch.tensor([[tokens[-1]]]), past)
        past = _cat(past, entries)
        tokens.append(int(logits[0, -1].argmax()))
        steps += 1
    return tokens, steps


def _draft(model, h, next_ids, start: int, mtp_past):
    """MTP over positions start.. (hidden h [1, s, D], following tokens next_ids [1, s]): (draft, entries)."""
    cos, sin = model.rotary(1, start, h.shape[1])
    logits, entries = model.mtp[0](h, model.embed_tokens(next_ids), cos, sin, mtp_past, model.lm_head)
    return int(logits[0, -1].argmax()), entries


@torch.no_grad()
def generate_speculative(model: DeepseekV3, prompt: torch.Tensor, n: int) -> dict:
    """n greedy tokens with MTP drafts verified by the main model: tokens, steps, drafts and acceptances."""
    if not model.mtp:
        raise SpecError(f"model {model.cfg.name} has no MTP module (num_nextn_predict_layers 0)")
    tap = _NormTap(model)
    try:
        logits, entries = _main(model, prompt, None)
        past = _cat(None, entries)
        tokens = [int(logits[0, -1].argmax())]
        nxt = torch.cat([prompt[:, 1:], torch.tensor([[tokens[0]]])], 1)
        draft, m_entries = _draft(model, tap.h, nxt, 0, None)
        mtp_past = [m_entries]
        steps = drafted = accepted = 0
        while len(tokens) < n:
            pos = past[0][0].shape[1]  # the position of tokens[-1]
            logits, entries = _main(model, torch.tensor([[tokens[-1], draft]]), past)
            steps += 1
            drafted += 1
            choice = int(logits[0, 0].argmax())
            if choice == draft:
                accepted += 1
                after = int(logits[0, 1].argmax())
                tokens += [draft, after]
                past = _cat(past, entries)
                h, nxt = tap.h, torch.tensor([[draft, after]])
            else:
                tokens.append(choice)
                past = _cat(past, entries, keep=1)  # roll back the rejected draft's entry
                h, nxt = tap.h[:, :1], torch.tensor([[choice]])
            draft, m_entries = _draft(model, h, nxt, pos, mtp_past[0])
            mtp_past = _cat(mtp_past, [m_entries])
            assert mtp_past[0][0].shape[1] == past[0][0].shape[1], "MTP and main caches out of step"
    finally:
        tap.close()
    return {"tokens": tokens[:n], "steps": steps, "drafted": drafted, "accepted": accepted}


def copy_head_mtp(model: DeepseekV3) -> DeepseekV3:
    """Make the model a bigram model whose MTP module predicts exactly its next prediction (acceptance 1).

    Zeroing every block's o_proj and FFN down-projections makes each block the identity, so the main
    model's greedy token after t is f(t) = argmax head(norm(emb(t))). eh_proj keeps only the embedding
    half (identity) and the MTP block is the identity too, so the MTP module's draft after (h_t, t+1) is
    argmax head(norm(norm(emb(t+1)))) = f(t+1): the main model's own next prediction (RMSNorm with unit
    weights is idempotent up to eps).
    """
    with torch.no_grad():
        blocks = list(model.layers) + [m.block for m in model.mtp]
        for b in blocks:
            b.self_attn.o_proj.weight.zero_()
            mlp = b.mlp
            if hasattr(mlp, "experts"):
                mlp.experts.down_proj.zero_()
                if hasattr(mlp, "shared_experts"):
                    mlp.shared_experts.down_proj.weight.zero_()
            else:
                mlp.down_proj.weight.zero_()
        for m in model.mtp:
            d = model.cfg.hidden_size
            m.eh_proj.weight.zero_()
            m.eh_proj.weight[:, :d] = torch.eye(d)
            for norm in (m.enorm, m.hnorm, m.norm):
                norm.weight.fill_(1.0)
        model.norm.weight.fill_(1.0)
    return model


def run_speculative(cfg, tokens: int, seed: int = 0, prompt_len: int = 8, copy_head: bool = False) -> dict:
    """Plain vs speculative greedy generation of `tokens` tokens on a seeded float32 model; the JSON result."""
    if tokens < 1 or prompt_len < 1:
        raise SpecError("--tokens and the prompt length must be positive")
    if prompt_len + tokens + 1 > cfg.max_position_embeddings:
        raise SpecError(f"prompt {prompt_len} + {tokens} tokens exceed max_position_embeddings {cfg.max_position_embeddings}")
    from dsv3c.eplb import one_thread

    with one_thread():  # tiny tensors: extra threads only spin
        return _run(cfg, tokens, seed, prompt_len, copy_head)


def _run(cfg, tokens, seed, prompt_len, copy_head) -> dict:
    torch.manual_seed(seed)
    model = DeepseekV3(cfg)
    model.reset_parameters(std=0.05, seed=seed)
    model.eval()
    if copy_head:
        copy_head_mtp(model)
    gen = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=gen)
    plain, steps_plain = generate_plain(model, prompt, tokens)
    spec = generate_speculative(model, prompt, tokens)
    return {
        "model": cfg.name, "seed": seed, "prompt_len": prompt_len, "tokens": tokens, "copy_head": copy_head,
        "tokens_equal": plain == spec["tokens"],
        "acceptance": spec["accepted"] / spec["drafted"] if spec["drafted"] else None,
        "drafted": spec["drafted"], "accepted": spec["accepted"],
        "steps_plain": steps_plain, "steps_speculative": spec["steps"],
        "tokens_plain": plain, "tokens_speculative": spec["tokens"],
    }
