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

Under expert parallelism (`run_speculative_ep`, the plan's mesh.gpus forked gloo processes): every rank
decodes its own prompt (data-parallel attention, as DeepSeek's decode units do) with the model's routed
experts partitioned over the plan's EP group (`dsv3c.runtime.stages.ep_partition`: the rank's slots of the
placement, dispatch and combine over the EP group, direct route as decode's low-latency kernels). The
ranks accept different numbers of tokens: after a step one rank's MTP module drafts from 2 kept positions,
another's from 1, so the MoE layers exchange different token counts per rank (the EP ops size their
receive buffers from the exchanged counts). A rank that has its tokens keeps stepping (its extra tokens
are dropped) until every rank of its EP group has, since each step's exchanges need the whole group.
Each rank checks its speculative tokens and its plain greedy tokens under EP against plain greedy
decoding of the whole single-process model on its prompt.
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
        logits, entries = _main(model, torch.tensor([[tokens[-1]]], device=prompt.device), past)
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
def generate_speculative(model: DeepseekV3, prompt: torch.Tensor, n: int, more=None) -> dict:
    """n greedy tokens with MTP drafts verified by the main model: tokens, steps, drafts and acceptances, and
    the positions kept per step. more(done) says whether to run another step (default: until n tokens)."""
    if not model.mtp:
        raise SpecError(f"model {model.cfg.name} has no MTP module (num_nextn_predict_layers 0)")
    tap = _NormTap(model)
    try:
        logits, entries = _main(model, prompt, None)
        past = _cat(None, entries)
        tokens = [int(logits[0, -1].argmax())]
        dev = prompt.device
        nxt = torch.cat([prompt[:, 1:], torch.tensor([[tokens[0]]], device=dev)], 1)
        draft, m_entries = _draft(model, tap.h, nxt, 0, None)
        mtp_past = [m_entries]
        steps = drafted = accepted = 0
        kept, needed = [], None
        more = more or (lambda done: not done)
        while more(len(tokens) >= n):
            pos = past[0][0].shape[1]  # the position of tokens[-1]
            logits, entries = _main(model, torch.tensor([[tokens[-1], draft]], device=dev), past)
            steps += 1
            drafted += 1
            choice = int(logits[0, 0].argmax())
            if choice == draft:
                accepted += 1
                after = int(logits[0, 1].argmax())
                tokens += [draft, after]
                past = _cat(past, entries)
                h, nxt = tap.h, torch.tensor([[draft, after]], device=dev)
            else:
                tokens.append(choice)
                past = _cat(past, entries, keep=1)  # roll back the rejected draft's entry
                h, nxt = tap.h[:, :1], torch.tensor([[choice]], device=dev)
            kept.append(nxt.shape[1])
            if needed is None and len(tokens) >= n:
                needed = steps
            draft, m_entries = _draft(model, h, nxt, pos, mtp_past[0])
            mtp_past = _cat(mtp_past, [m_entries])
            assert mtp_past[0][0].shape[1] == past[0][0].shape[1], "MTP and main caches out of step"
    finally:
        tap.close()
    return {"tokens": tokens[:n], "steps": steps if needed is None else needed, "drafted": drafted,
            "accepted": accepted, "kept": kept}


def copy_head_mtp(model: DeepseekV3, keep_routed: bool = False) -> DeepseekV3:
    """Make the model a bigram model whose MTP module predicts exactly its next prediction (acceptance 1).

    Zeroing every block's o_proj and FFN down-projections makes each block the identity, so the main
    model's greedy token after t is f(t) = argmax head(norm(emb(t))). eh_proj keeps only the embedding
    half (identity) and the MTP block is the identity too, so the MTP module's draft after (h_t, t+1) is
    argmax head(norm(norm(emb(t+1)))) = f(t+1): the main model's own next prediction (RMSNorm with unit
    weights is idempotent up to eps).

    keep_routed leaves the routed experts' down-projections as they are: every block then adds its routed
    experts' output of its own token, the main model's f(t) and the MTP module's draft see different expert
    sums, and they agree only where those do not change the argmax (acceptance between 0 and 1, token by
    token), while the expert-parallel exchanges carry real values.
    """
    with torch.no_grad():
        blocks = list(model.layers) + [m.block for m in model.mtp]
        for b in blocks:
            b.self_attn.o_proj.weight.zero_()
            mlp = b.mlp
            if hasattr(mlp, "experts"):
                if not keep_routed:
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


def _model(cfg, seed: int, copy_head: bool, keep_routed: bool = False) -> DeepseekV3:
    """The seeded float32 model in eval mode (every rank builds the same)."""
    torch.manual_seed(seed)
    model = DeepseekV3(cfg)
    model.reset_parameters(std=0.05, seed=seed)
    model.eval()
    if copy_head:
        copy_head_mtp(model, keep_routed)
    return model


def check_ep(cfg, plan, tokens: int, prompt_len: int) -> None:
    """SpecError unless speculative decoding of tokens after prompt_len can run under the plan."""
    if not model_has_mtp(cfg):
        raise SpecError(f"model {cfg.name} has no MTP module (num_nextn_predict_layers 0)")
    if tokens < 1 or prompt_len < 1:
        raise SpecError("--tokens and the prompt length must be positive")
    if prompt_len + 2 * tokens + 2 > cfg.max_position_embeddings:  # a rank that is done keeps stepping
        raise SpecError(f"prompt {prompt_len} + 2 x {tokens} tokens exceed max_position_embeddings "
                        f"{cfg.max_position_embeddings}")  # fmt: skip
    if plan.mesh.pp != 1 or plan.mesh.tp != 1:
        raise SpecError(f"speculative decoding runs on pp 1, tp 1 layouts, not pp {plan.mesh.pp} tp {plan.mesh.tp}")


def run_speculative_ep(cfg, plan, tokens: int, seed: int = 0, prompt_len: int = 8, copy_head: bool = False,
                       keep_routed: bool = False) -> dict:  # fmt: skip
    """Speculative decoding under the plan's expert parallelism on mesh.gpus forked gloo processes (module
    docstring); rank 0's JSON result."""
    import json
    import os
    import tempfile

    import torch.multiprocessing as mp

    from dsv3c.runtime.ep_run import _free_port

    check_ep(cfg, plan, tokens, prompt_len)
    job = {"cfg": cfg, "plan": plan, "tokens": tokens, "seed": seed, "prompt_len": prompt_len, "copy_head": copy_head,
           "keep_routed": keep_routed}  # fmt: skip
    world = plan.mesh.gpus
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        init = f"tcp://127.0.0.1:{_free_port()}"
        mp.start_processes(_ep_rank, args=(world, job, init, out), nprocs=world, start_method="fork", join=True)
        with open(out) as f:
            return json.load(f)


def model_has_mtp(cfg) -> bool:
    """Whether the model has an MTP module to draft with."""
    return cfg.num_nextn_predict_layers > 0


def _ep_rank(rank: int, world: int, job: dict, init: str | None, out_path: str | None) -> dict | None:
    """One rank of run_speculative_ep (init None: under torchrun, env://, with the backend job['backend'])."""
    from dsv3c.runtime.layout import in_process_group

    return in_process_group(rank, world, job.get("backend"), init, lambda dev: _decode_rank(rank, world, job, out_path, dev))


def _decode_rank(rank, world, job, out_path, device):
    import json

    import torch.distributed as dist

    from dsv3c.ops.ep_context import active
    from dsv3c.runtime.layout import Groups
    from dsv3c.runtime.stages import ep_partition

    cfg, plan, n = job["cfg"], job["plan"], job["tokens"]
    mesh = plan.mesh
    groups = Groups(mesh, rank, "decode")
    me = mesh.rank(rank)
    model = _model(cfg, job["seed"], job["copy_head"], job["keep_routed"])
    gen = torch.Generator().manual_seed(job["seed"] + 1)
    prompt = torch.randint(0, cfg.vocab_size, (world, job["prompt_len"]), generator=gen)[me["dp"]][None].to(device)
    model.to(device)
    greedy, _ = generate_plain(model, prompt, n)  # the whole model in this process: the reference
    placement = None if plan.placement is None else plan.placement.phy2log
    ep_partition(model, cfg, mesh.ep, me["ep"], placement, mesh.ep_gpus_per_node)
    model.to(device)
    ctx = groups.ep_context()

    def more(done: bool) -> bool:
        """Another step while any rank of the EP group needs tokens."""
        flag = torch.tensor([0 if done else 1], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.group)
        return bool(flag.item())

    with active(ctx):
        plain, _ = generate_plain(model, prompt, n)
        spec = generate_speculative(model, prompt, n, more)
    mine = {"rank": rank, "tokens_equal": spec["tokens"] == greedy, "plain_ep_equal": plain == greedy,
            "drafted": spec["drafted"], "accepted": spec["accepted"], "steps": spec["steps"], "kept": spec["kept"],
            "tokens": spec["tokens"]}  # fmt: skip
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank != 0:
        return None
    kept = [g["kept"] for g in gathered]
    steps = min(len(k) for k in kept)
    drafted, accepted = sum(g["drafted"] for g in gathered), sum(g["accepted"] for g in gathered)
    result = {"model": cfg.name, "ranks": world, "ep": mesh.ep, "route": groups.route, "seed": job["seed"],
              "prompt_len": job["prompt_len"], "tokens": n, "copy_head": job["copy_head"],
              "tokens_equal": all(g["tokens_equal"] for g in gathered),
              "plain_ep_tokens_equal": all(g["plain_ep_equal"] for g in gathered),
              "acceptance": accepted / drafted if drafted else None, "drafted": drafted, "accepted": accepted,
              "acceptance_per_rank": [g["accepted"] / g["drafted"] if g["drafted"] else None for g in gathered],
              "steps_per_rank": [g["steps"] for g in gathered], "steps_plain": n - 1,
              "steps_with_unequal_lengths": sum(len({k[i] for k in kept}) > 1 for i in range(steps)),
              "tokens_per_rank": [g["tokens"] for g in gathered]}  # fmt: skip
    result["ok"] = result["tokens_equal"] and result["plain_ep_tokens_equal"]
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f)
    return result
