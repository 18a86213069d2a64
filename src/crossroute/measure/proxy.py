"""Module-level gradient conflict between two domains at one checkpoint (DESIGN.md §2.4).

g_A, g_B are gradients of each domain's proxy loss (mean NLL of the reference answer tokens given
the prompt), accumulated over micro-batches in fp32. The global cosine can sit near 0 while single
modules conflict (cos < 0) or synergise (cos > 0) and cancel in the aggregate.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from crossroute.core.console import progress_bar
from crossroute.core.errors import CrossrouteError
from crossroute.domains.base import Example
from crossroute.domains.domain import Domain
from crossroute.domains.files import get_domain
from crossroute.measure.batches import collate, encode_answer, encode_pair

Batch = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- proxy loss


def make_batches(
    tokenizer: PreTrainedTokenizerBase, examples: list[Example], batch_size: int, domain: Domain | None = None
) -> list[Batch]:
    """Tokenise prompt+answer+eos, right-padded into batches; labels are -100 on prompt and pad. With `domain`,
    the prompt is tokenised as the domain shows it (chat template, system prompt), as in GRPO and eval.

    Right padding keeps every real token at its unpadded position and never masks a whole row, so
    results do not depend on how examples are grouped. Examples are grouped by length (stable).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if domain is None:
        pairs = [encode_pair(tokenizer, ex.prompt, ex.answer) for ex in examples]
    else:
        pairs = [encode_answer(tokenizer, domain.prompt_ids(ex, tokenizer), ex.answer) for ex in examples]
    seqs = sorted(pairs, key=lambda s: len(s[0]))
    return [collate(seqs[i : i + batch_size], pad or 0) for i in range(0, len(seqs), batch_size)]


def n_label_tokens(batches: list[Batch]) -> int:
    """Number of predicted (answer) tokens over all batches: the proxy loss's normaliser."""
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def proxy_loss(
    model: PreTrainedModel, batch: Batch, normalizer: float | None = None
) -> torch.Tensor:
    """Summed NLL of the batch's label tokens divided by `normalizer` (default: their count).

    Logits are computed only at label positions (hidden states × output head), in >= fp32.
    """
    device = next(model.parameters()).device
    batch = _to(batch, device)
    labels = batch["labels"]
    target = labels[:, 1:]
    sel = target != -100
    base = getattr(model, "model", None)
    head = model.get_output_embeddings()
    cfg = model.config
    special_logits = any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale"))
    if base is None or head is None or special_logits:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1][sel]
    else:
        hidden = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        logits = head(hidden[:, :-1][sel])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = torch.nn.functional.cross_entropy(logits, target[sel], reduction="sum")
    denom = float(sel.sum()) if normalizer is None else float(normalizer)
    return nll / max(denom, 1.0)


@torch.no_grad()
def mean_proxy_loss(model: PreTrainedModel, batches: list[Batch]) -> float:
    """The proxy loss over all batches (token-weighted mean NLL of the answers), no gradient."""
    total = n_label_tokens(batches)
    return float(sum(float(proxy_loss(model, b, total)) for b in batches))


@torch.no_grad()
def answer_log_probs(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """Per row of a make_batches batch: the summed log-probability of its label tokens, teacher-forced (exp: the
    row's P(ref)), float64 on CPU. Logits only at label positions, as in proxy_loss: no [rows, T, vocab] tensor."""
    device = next(model.parameters()).device
    batch = _to(batch, device)
    target = batch["labels"][:, 1:]
    sel = target != -100
    base, head, cfg = getattr(model, "model", None), model.get_output_embeddings(), model.config
    if base is None or head is None or any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale")):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][sel]
    else:
        logits = head(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0][:, :-1][sel])
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    tok = logp.gather(-1, target[sel].unsqueeze(-1)).squeeze(-1).double().cpu()
    return torch.zeros(sel.shape[0], dtype=torch.float64).index_add_(0, sel.nonzero()[:, 0].cpu(), tok)


def domain_examples(
    domain: Domain | str, n: int, seed: int = 0, split: str = "train", need_answer: bool = True
) -> list[Example]:
    """`n` examples of a domain (name or Domain); refuses domains without reference answers.

    A JSONL rubric domain has no reference completion: with need_answer=False its examples come
    back with an empty answer (prompt only); with need_answer=True it is an error.
    """
    dom = get_domain(domain) if isinstance(domain, str) else domain
    examples = dom.examples(split, n, seed=seed)
    if not examples:
        raise CrossrouteError(f"domain {dom.name!r} has no {split!r} examples; add some or use the "
                              "other split.")
    if dom.kind == "rubric" and dom.fixed is not None:
        if need_answer:
            raise CrossrouteError(
                f"domain {dom.name!r} ({dom.source}) has rubrics but no reference answers; the "
                "proxy loss needs a JSONL domain with 'answer' fields.")
        examples = [dataclasses.replace(e, answer="") for e in examples]
    return examples


def domain_gradient(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    domain: Domain | str,
    n: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    split: str = "train",
    show_progress: bool = False,
) -> dict[str, torch.Tensor]:
    """∇ of the domain's proxy loss (mean answer NLL over `n` examples) per parameter, fp32, CPU.

    Micro-batches of `batch_size` bound memory; the token-weighted sum makes the result independent
    of `batch_size`. The model's own `.grad` fields are not touched.
    """
    return gradient_and_loss(model, tokenizer, domain, n, batch_size, seed, split,
                             show_progress)[0]


def gradient_and_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    domain: Domain | str,
    n: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    split: str = "train",
    show_progress: bool = False,
) -> tuple[dict[str, torch.Tensor], float]:
    """`domain_gradient` and the proxy loss value it differentiates, from the same passes."""
    examples = domain_examples(domain, n, seed, split)
    dom = get_domain(domain) if isinstance(domain, str) else domain
    batches = make_batches(tokenizer, examples, batch_size, dom)
    total = n_label_tokens(batches)
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    acc = [torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
           for p in params]
    was_training = model.training
    loss_sum = 0.0
    model.eval()
    label = domain if isinstance(domain, str) else domain.name
    try:
        with progress_bar(show_progress) as bar:
            task = bar.add_task(f"gradient {label}", total=len(batches))
            for b in batches:
                loss = proxy_loss(model, b, total)
                loss_sum += float(loss.detach())
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for a, g in zip(acc, grads, strict=True):
                    if g is not None:
                        a.add_(g.to(a.dtype))
                bar.update(task, advance=1)
    finally:
        model.train(was_training)
    return {k: a.cpu() for (k, _), a in zip(named, acc, strict=True)}, loss_sum


# ----------------------------------------------------------------------------- cosines










# ----------------------------------------------------------------------------- run + render










