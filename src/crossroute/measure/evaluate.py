"""Greedy-decoding evaluation: each domain's held-out score in [0, 100], with one record per example.

Prompts are tokenised exactly as TRL's GRPOTrainer tokenises them (`Domain.prompt_ids`: the same chat template,
the same special tokens), so a domain is scored on the prompts it was trained on. Every example's prompt,
completion, reference and score is kept (`DomainScore.records`), written to results/eval_<name>.jsonl, and
`crossroute rescore` can score the saved completions again with a changed verifier.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from crossroute.core.atomic import atomic_write_text, finite_or_none
from crossroute.core.console import progress_bar
from crossroute.core.errors import CrossrouteError
from crossroute.domains.base import Example
from crossroute.domains.domain import Domain
from crossroute.measure.backends import Generator, VllmGenerator, resolve_backend
from crossroute.measure.batches import collate, encode_answer
from crossroute.measure.proxy import answer_log_probs
from crossroute.measure.stats import mean_ci
from crossroute.model.load import check_checkpoint_dir, load_model, load_tokenizer

N_SAMPLES = 5  # records shown in scores.json / the report; every record goes to the JSONL
EVAL_SEED = 0  # which held-out prompts are drawn: fixed, so eval prompts never depend on a training seed


class EvalProtocol(BaseModel):
    """How every checkpoint of a run is evaluated (shared by train, cpift and `crossroute eval`).

    Greedy by default (temperature 0, k 1). With k > 1 samples per prompt at `temperature`/`top_p`, the score is
    avg@k (the mean over samples, = pass@1 for 0/1 scores) and `pass_at` gives the unbiased pass@j for each j
    (Chen et al. 2021); CIs bootstrap over prompts of the per-prompt means."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.0, ge=0, description="0: greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1)
    k: int = Field(1, ge=1, description="completions per prompt (sampling; needs temperature > 0 when > 1)")
    pass_at: list[int] = Field(default_factory=list, description="report unbiased pass@j for these j <= k")
    p_ref: bool = Field(False, description="also the teacher-forced probability of each reference answer")
    max_new_tokens: dict[str, int] = Field(default_factory=dict, description="per domain name: the budget")
    batch_size: int = Field(128, gt=0)
    sample_seed: int = Field(0, description="the sampler's seed (never the training seed)")
    backend: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="generation: HF generate, or vLLM's offline engine (auto: vLLM where installed with a GPU)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights' dtype while evaluated")

    @model_validator(mode="after")
    def _consistent(self) -> EvalProtocol:
        if self.k > 1 and self.temperature == 0:
            raise ValueError("k > 1 samples need temperature > 0 (greedy gives k identical completions)")
        bad = [j for j in self.pass_at if j < 1 or j > self.k]
        if bad:
            raise ValueError(f"pass_at {bad[0]} is outside 1..k (k = {self.k})")
        return self


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class DomainScore:
    """A domain's held-out score (mean per-example score x 100), its 95 % bootstrap CI [lo, hi] over prompts,
    and every example's record."""

    domain: str
    score: float
    n: int
    lo: float = float("nan")
    hi: float = float("nan")
    samples: list[dict[str, Any]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)
    description: str = ""
    scorer: str = ""
    p_ref: dict[str, Any] | None = None  # mean P(ref) in points with its CI, when asked for
    pass_at: dict[str, Any] = field(default_factory=dict)  # "pass@j": estimate with CI, when sampling


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded to one width (generation appends on the right), with the attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.inference_mode()
def generate_greedy_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 128,
) -> list[str]:
    """Greedy completions for tokenised prompts (left-padded batches of similar length), specials stripped."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    out: list[str] = [""] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = left_pad([prompt_ids[i] for i in idx], pad)
        width = ids.shape[1]
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        for i, t in zip(idx, texts, strict=True):
            out[i] = t
    return out


@torch.inference_mode()
def generate_sampled_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    k: int,
    temperature: float,
    top_p: float,
    seed: int = 0,
    batch_size: int = 128,
) -> list[list[str]]:
    """`k` sampled completions per tokenised prompt (HF generate), reproducible from `seed` per batch."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    out: list[list[str]] = [[] for _ in prompt_ids]
    per_batch = max(1, batch_size // k)
    for b, start in enumerate(range(0, len(order), per_batch)):
        idx = order[start : start + per_batch]
        ids, mask = left_pad([prompt_ids[i] for i in idx], pad)
        width = ids.shape[1]
        torch.manual_seed(seed * 100_003 + b)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=True, temperature=temperature, top_p=top_p, top_k=0, num_return_sequences=k,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        for row, i in enumerate(idx):
            out[i] = texts[row * k : (row + 1) * k]
    return out


class HfGenerator:
    """The HF `generate` backend on an in-memory model (greedy and sampled, left-padded length-sorted batches)."""

    name = "hf"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 128) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[str]:
        return generate_greedy_ids(self.model, self.tokenizer, prompt_ids, max_new_tokens, self.batch_size)

    def sample(self, prompt_ids: list[list[int]], max_new_tokens: int, k: int, temperature: float, top_p: float,
               seed: int) -> list[list[str]]:
        return generate_sampled_ids(self.model, self.tokenizer, prompt_ids, max_new_tokens, k, temperature, top_p,
                                    seed, self.batch_size)


@torch.inference_mode()
def reference_probability(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, domain: Domain,
                          examples: list[Example], batch_size: int = 64) -> list[float]:
    """P(ref) per example: exp(sum of log p(answer tokens + eos | prompt)), teacher-forced, the prompt shown as in
    GRPO and eval. It is the exact probability that sampling at T=1 reproduces the reference (one forward pass)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = [encode_answer(tokenizer, domain.prompt_ids(e, tokenizer), e.answer) for e in examples]
    out: list[float] = []
    for start in range(0, len(pairs), batch_size):
        batch = collate(pairs[start : start + batch_size], pad or 0)
        out.extend(float(v) for v in answer_log_probs(model, batch).exp())
    return out


def example_record(domain: Domain, example: Example, prompt_text: str, completion: str, score: float,
                   index: int) -> dict[str, Any]:
    """One evaluated example: what was asked, what the model said, what it was scored against, and the score."""
    rec: dict[str, Any] = {"domain": domain.name, "index": index, "id": example.id, "prompt": prompt_text,
                           "completion": completion, "score": score, "answer": example.answer}
    if example.answers:
        rec["answers"] = list(example.answers)
    if example.tests:
        rec["tests"] = example.tests
    if example.entry_point:
        rec["entry_point"] = example.entry_point
    if example.rubric is not None:
        rec["rubric"] = example.rubric
    if example.messages is not None:
        rec["messages"] = [dict(m) for m in example.messages]
    if example.prompt != prompt_text:
        rec["user_prompt"] = example.prompt
    return rec


def record_example(rec: dict[str, Any]) -> Example:
    """The Example an eval record was scored against (for re-scoring saved completions)."""
    msgs = rec.get("messages")
    return Example(str(rec.get("user_prompt", rec.get("prompt", ""))), str(rec.get("answer", "")),
                   rec.get("rubric"), "eval", tuple(rec.get("answers") or ()), str(rec.get("tests", "")),
                   str(rec.get("entry_point", "")), tuple(msgs) if msgs else None, str(rec.get("id", "")),
                   f"record {rec.get('index', '?')}")


def check_context(model: PreTrainedModel | None, domain: Domain, examples: list[Example], ids: list[list[int]],
                  budget: int) -> None:
    """Refuse a prompt that fills the model's context (nothing could be generated), naming the example; warn once
    when prompt plus budget runs past it (generation goes beyond the trained positions)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not limit:
        return
    over = None
    for e, row in zip(examples, ids, strict=True):
        if len(row) >= limit:
            where = e.where or (e.id and f"id {e.id}") or repr(e.prompt[:40])
            raise CrossrouteError(f"domain {domain.name}: {where}: the prompt is {len(row)} tokens, the model's "
                                  f"context {limit}; shorten the prompt or use a model with a longer context.")
        if over is None and len(row) + budget > limit:
            over = len(row)
    if over is not None:
        warnings.warn(f"domain {domain.name}: a {over}-token prompt plus the {budget}-token budget runs past the "
                      f"model's context of {limit}; generations that long go beyond its trained positions.",
                      stacklevel=2)


def evaluate_domain(
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    domain: Domain,
    n: int = 100,
    seed: int = EVAL_SEED,
    n_samples: int = N_SAMPLES,
    p_ref: bool = False,
    protocol: EvalProtocol | None = None,
    generator: Generator | None = None,
) -> DomainScore:
    """Score `domain` on `n` held-out prompts (greedy, or k samples per the protocol), keeping every example's
    record; with `p_ref`, also each example's teacher-forced probability of its reference answer. `generator`
    (e.g. vLLM) replaces HF generate on `model`; P(ref) always needs `model`."""
    proto = protocol or EvalProtocol(p_ref=p_ref)
    if generator is None:
        if model is None:
            raise CrossrouteError("evaluate_domain needs a model or a generator.")
        generator = HfGenerator(model, tokenizer, proto.batch_size)
    budget = proto.max_new_tokens.get(domain.name, domain.max_new_tokens)
    examples = domain.examples("eval", n, seed=seed)
    ids = [domain.prompt_ids(e, tokenizer) for e in examples]
    check_context(model, domain, examples, ids, budget)
    if proto.k == 1 and proto.temperature == 0:
        samples_per = [[c] for c in generator.greedy(ids, budget)]
    else:
        samples_per = generator.sample(ids, budget, proto.k, proto.temperature, proto.top_p, proto.sample_seed)
    flat = domain.score_batch([e for e, cs in zip(examples, samples_per, strict=True) for _ in cs],
                              [c for cs in samples_per for c in cs])
    per_prompt: list[list[float]] = []
    pos = 0
    for cs in samples_per:
        per_prompt.append(flat[pos : pos + len(cs)])
        pos += len(cs)
    scores = [sum(v) / len(v) for v in per_prompt]
    texts = [domain.plain_prompt(e) if not domain.uses_chat(tokenizer) else tokenizer.decode(i) for e, i in
             zip(examples, ids, strict=True)]
    records = []
    for j, (e, t, cs, v, sc) in enumerate(zip(examples, texts, samples_per, per_prompt, scores, strict=True)):
        rec = example_record(domain, e, t, cs[0], sc, j)
        if len(cs) > 1:
            rec["completions"], rec["scores"] = list(cs), list(v)
        records.append(rec)
    samples = [{"prompt": r["prompt"], "reference": r["answer"], "completion": r["completion"], "score": r["score"]}
               for r in records[:n_samples]]
    est = mean_ci(scores)
    mean = 100.0 * sum(scores) / len(scores) if scores else 0.0
    out = DomainScore(domain.name, round(mean, 4), len(scores), est.lo, est.hi, samples, records,
                      domain.description, domain.kind)
    for j in proto.pass_at:
        vals = [pass_at_k(len(v), sum(1 for x in v if x >= 1.0), j) for v in per_prompt]
        out.pass_at[f"pass@{j}"] = mean_ci(vals).to_json()
    if (proto.p_ref or p_ref) and examples and all(e.answer for e in examples):
        if model is None:
            raise CrossrouteError("P(ref) is teacher-forced on the HF model; evaluate_domain got none.")
        probs = reference_probability(model, tokenizer, domain, examples)
        for r, q in zip(records, probs, strict=True):
            r["p_ref"] = q
        out.p_ref = mean_ci(probs).to_json()
    return out


def evaluate_all(
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    domains: list[Domain],
    n: int = 100,
    seed: int = EVAL_SEED,
    show_progress: bool = False,
    p_ref: bool = False,
    protocol: EvalProtocol | None = None,
    generator: Generator | None = None,
) -> dict[str, DomainScore]:
    """Evaluate every domain; returns {name: DomainScore}."""
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    result: dict[str, DomainScore] = {}
    with progress_bar(show_progress) as bar:
        task = bar.add_task("eval", total=len(domains))
        for d in domains:
            bar.update(task, description=f"eval {d.name}")
            result[d.name] = evaluate_domain(model, tokenizer, d, n=n, seed=seed, p_ref=p_ref, protocol=protocol,
                                             generator=generator)
            bar.advance(task)
    if model is not None:
        model.train(was_training)
    return result


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def evaluate_checkpoint(path: str | Path, domains: list[Domain], n: int, protocol: EvalProtocol,
                        show_progress: bool = False) -> tuple[dict[str, DomainScore], str]:
    """Evaluate a checkpoint directory under `protocol` on the backend it resolves to (HF or vLLM); returns the
    scores and the backend's name. The HF model is loaded only when HF generates or P(ref) is asked for."""
    backend = resolve_backend(protocol.backend)
    if backend == "hf":
        loaded = load_model(path, dtype=DTYPES[protocol.dtype])
        return evaluate_all(loaded.model, loaded.tokenizer, domains, n=n, protocol=protocol,
                            show_progress=show_progress), backend
    check_checkpoint_dir(path)  # the checks load_model runs, before vLLM sees the files
    gen = VllmGenerator(path, dtype=protocol.dtype, seed=protocol.sample_seed)
    try:
        if protocol.p_ref:
            loaded = load_model(path, dtype=DTYPES[protocol.dtype])
            model, tokenizer = loaded.model, loaded.tokenizer
        else:
            model, tokenizer = None, load_tokenizer(path)
        return evaluate_all(model, tokenizer, domains, n=n, protocol=protocol, show_progress=show_progress,
                            generator=gen), backend
    finally:
        gen.close()


def scores_json(scores: dict[str, DomainScore]) -> dict[str, Any]:
    """JSON form of an evaluation: {"scores": {domain: score}, "ci": {domain: [lo, hi]}, "details": {...}}
    (the per-example records go to the JSONL)."""
    details = {k: {kk: vv for kk, vv in asdict(v).items() if kk != "records"} for k, v in scores.items()}
    return {"scores": {k: v.score for k, v in scores.items()}, "ci": {k: [v.lo, v.hi] for k, v in scores.items()},
            "n": {k: v.n for k, v in scores.items()}, "details": details}


def write_records(path: str | Path, scores: dict[str, DomainScore]) -> Path:
    """Every evaluated example of every domain as one JSON line each, written atomically."""
    lines = [json.dumps(finite_or_none(r), ensure_ascii=False, allow_nan=False) for s in scores.values()
             for r in s.records]
    return atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
