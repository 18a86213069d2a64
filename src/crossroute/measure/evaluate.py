"""Greedy-decoding evaluation: each domain's held-out score in [0, 100]."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from crossroute.core.console import progress_bar
from crossroute.domains.base import Domain


@dataclass
class DomainScore:
    """A domain's held-out score (mean per-example score x 100) and a few samples to read."""

    domain: str
    score: float
    n: int
    samples: list[dict[str, Any]] = field(default_factory=list)


@torch.inference_mode()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 128,
) -> list[str]:
    """Greedy completions for `prompts` (left-padded batches), special tokens stripped."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, t in zip(idx, texts, strict=True):
            out[i] = t
    return out


def evaluate_domain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    domain: Domain,
    n: int = 100,
    seed: int = 0,
    n_samples: int = 5,
) -> DomainScore:
    """Score `domain` on `n` held-out prompts with greedy decoding."""
    examples = domain.examples("eval", n, seed=seed)
    completions = generate_greedy(model, tokenizer, [e.prompt for e in examples], domain.max_new_tokens)
    scores = [domain.score(e, c) for e, c in zip(examples, completions, strict=True)]
    samples = [
        {"prompt": e.prompt, "reference": e.answer, "completion": c, "score": s}
        for e, c, s in list(zip(examples, completions, scores, strict=True))[:n_samples]
    ]
    mean = 100.0 * sum(scores) / len(scores) if scores else 0.0
    return DomainScore(domain.name, round(mean, 4), len(scores), samples)


def evaluate_all(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    domains: list[Domain],
    n: int = 100,
    seed: int = 0,
    show_progress: bool = False,
) -> dict[str, DomainScore]:
    """Evaluate every domain; returns {name: DomainScore}."""
    was_training = model.training
    model.eval()
    result: dict[str, DomainScore] = {}
    with progress_bar(show_progress) as bar:
        task = bar.add_task("eval", total=len(domains))
        for d in domains:
            bar.update(task, description=f"eval {d.name}")
            result[d.name] = evaluate_domain(model, tokenizer, d, n=n, seed=seed)
            bar.advance(task)
    model.train(was_training)
    return result


def scores_json(scores: dict[str, DomainScore]) -> dict[str, Any]:
    """JSON form of an evaluation: {"scores": {domain: score}, "details": {...}}."""
    return {"scores": {k: v.score for k, v in scores.items()}, "details": {k: asdict(v) for k, v in scores.items()}}
