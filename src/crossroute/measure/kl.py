"""KL between two checkpoints' next-token distributions on completions sampled from one of them (RL's Razor:
forward KL(base || model) on the new task predicts forgetting, Shenfeld et al. 2025).

At each sampled position (eos included) the exact full-vocabulary KL of the two next-token distributions given
the same prefix; completions are sampled at temperature 1 with no top-k/top-p, up to the domain's budget, stopped
at eos; prompts are tokenised as in GRPO and eval (`Domain.prompt_ids`) and left-padded for generation.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from crossroute.domains.domain import Domain
from crossroute.measure.evaluate import EVAL_SEED, left_pad
from crossroute.measure.stats import mean_ci

KL_DEFINITION = (
    "forward KL(base || model), the RL's Razor quantity: one completion per held-out prompt sampled from the base "
    "(temperature 1, no top-k/top-p, stopped at eos or max_new_tokens); at each sampled position, eos included, "
    "the exact full-vocabulary KL of the next-token distributions given the same prefix; kl_token = mean over all "
    "sampled tokens, kl_seq = mean over prompts of the per-completion sum. kl_reverse_*: KL(model || base), "
    "sampled from the model")


@torch.no_grad()
def sampled_kl(sampler: PreTrainedModel, p: PreTrainedModel, q: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
               prompt_ids: list[list[int]], max_new_tokens: int, seed: int = 0,
               batch_size: int = 64) -> dict[str, Any]:
    """Token-level KL(p || q) on completions sampled from `sampler` (exact over the vocabulary at each sampled
    position); `sampler` is p for the KL to be an unbiased estimate of the sequence-level KL."""
    device = next(sampler.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    total_kl, total_tok, seq_sums = 0.0, 0, []
    torch.manual_seed(seed)
    for start in range(0, len(prompt_ids), batch_size):
        ids, attn = left_pad(prompt_ids[start: start + batch_size], pad)
        ids, attn = ids.to(device), attn.to(device)
        gen = sampler.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                               top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
        plen = ids.shape[1]
        new = gen[:, plen:]
        # keep generated tokens up to and including the first eos
        is_eos = (new == eos).long() if eos is not None else torch.zeros_like(new)
        keep = ~((is_eos.cumsum(-1) - is_eos) > 0)
        mask = torch.cat([attn, keep.long()], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        lp_p = torch.log_softmax(p(input_ids=gen, attention_mask=mask, position_ids=pos).logits.float(), -1)
        lp_q = torch.log_softmax(q(input_ids=gen, attention_mask=mask, position_ids=pos).logits.float(), -1)
        lp_p, lp_q = lp_p[:, plen - 1: -1], lp_q[:, plen - 1: -1]  # predictions of the generated tokens
        kl = (lp_p.exp() * (lp_p - lp_q)).sum(-1) * keep
        total_kl += float(kl.sum())
        total_tok += int(keep.sum())
        seq_sums += kl.sum(-1).tolist()
    ci = mean_ci(seq_sums, scale=1.0)
    return {"kl_token": total_kl / max(total_tok, 1), "kl_seq": sum(seq_sums) / max(len(seq_sums), 1),
            "kl_seq_ci": [ci.lo, ci.hi], "n_prompts": len(prompt_ids), "n_tokens": total_tok}


def kl_to_base(model: PreTrainedModel, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
               prompt_ids: list[list[int]], max_new_tokens: int, seed: int = 0) -> dict[str, Any]:
    """Forward KL(base || model) sampled from the base (RL's Razor), and the reverse KL(model || base) sampled
    from the model under `reverse`."""
    fwd = sampled_kl(base, base, model, tokenizer, prompt_ids, max_new_tokens, seed)
    rev = sampled_kl(model, model, base, tokenizer, prompt_ids, max_new_tokens, seed)
    return {**fwd, "direction": "forward KL(base || model), sampled from the base", "reverse": rev}


def stage_kl(reference: PreTrainedModel, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
             domains: list[Domain], n: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Forward KL(reference || model) on each domain's first `n` eval prompts (the pinned set's, when pinned),
    sampled from the reference."""
    out = {}
    for d in domains:
        ids = [d.prompt_ids(e, tokenizer) for e in d.examples("eval", n, seed=EVAL_SEED)]
        out[d.name] = sampled_kl(reference, reference, model, tokenizer, ids, d.max_new_tokens, seed)
    return out


def zero_kl(n_prompts: int) -> dict[str, Any]:
    """The KL of a checkpoint to itself (no sampling needed)."""
    return {"kl_token": 0.0, "kl_seq": 0.0, "kl_seq_ci": [0.0, 0.0], "n_prompts": n_prompts, "n_tokens": None}

