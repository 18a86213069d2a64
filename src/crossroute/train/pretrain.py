"""`crossroute pretrain`: train the embedded default from random init by SFT on the built-in domains.

Deterministic from a seed (CPU, fixed thread count): the shipped checkpoint is what this produces.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from crossroute.core.atomic import check_output_dir
from crossroute.core.console import progress_bar
from crossroute.domains.builtin import BUILTIN, DEFAULT_DOMAINS, kb_facts, other_convention
from crossroute.measure.batches import collate, encode_pair
from crossroute.model.default import build_default_model
from crossroute.model.load import default_device, save_model
from crossroute.model.presets import Preset, get_preset


class PretrainConfig(BaseModel):
    """Settings of the embedded default's pretraining (defaults produce the shipped checkpoint)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    steps: int = Field(3000, gt=0)
    batch_size: int = Field(64, gt=0)
    learning_rate: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    fact_share: float = Field(0.15, ge=0, le=1, description="share of each batch spent on knowledge-base facts")
    convention_noise: float = Field(
        0.4, ge=0, le=1,
        description="share of answers written in the conflicting domain's convention (headroom for RL, and the "
        "shared route that later stages fight over)")
    pool_per_domain: int = Field(4000, gt=0)
    threads: int = Field(1, gt=0, description="torch CPU threads; 1 makes the shipped default bit-reproducible "
                         "on a machine and avoids oversubscription on a shared one")
    preset: str = Field("default", description="model size (crossroute.presets): default or gpu")
    arch: dict[str, Any] = Field(default_factory=dict, description="Qwen3Config overrides of the default size")
    device: str | None = Field(None, description="cpu, cuda, cuda:1, ...; None: cuda when available")

    @classmethod
    def for_preset(cls, preset: str | Preset, **overrides: Any) -> PretrainConfig:
        """The preset's architecture and pretraining recipe, with `overrides` on top."""
        p = get_preset(preset) if isinstance(preset, str) else preset
        return cls(**{**p.pretrain, "preset": p.name, "arch": dict(p.arch), **overrides})


def build_corpus(tokenizer: PreTrainedTokenizerBase, cfg: PretrainConfig) -> tuple[list, list]:
    """(task sequences, fact sequences): train-split examples of every built-in domain, and KB facts."""
    tasks = []
    rng = random.Random(f"conventions:{cfg.seed}")
    for name in DEFAULT_DOMAINS:
        for ex in BUILTIN[name].examples("train", cfg.pool_per_domain, seed=cfg.seed):
            answer = other_convention(name, ex.answer) if rng.random() < cfg.convention_noise else ex.answer
            tasks.append(encode_pair(tokenizer, ex.prompt, answer))
    facts = []
    for fact in kb_facts():
        ids = tokenizer(fact, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        facts.append((ids, ids[:]))
    return tasks, facts


def pretrain(
    cfg: PretrainConfig, out: Path | None = None, show_progress: bool = True, force: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, float]]:
    """Train the default model from `cfg.seed`; save it to `out` when given. Returns stats too.

    An existing `out` is replaced only when crossroute wrote it (its .crossroute marker) or `force`; that is
    checked before training, so a refused --out costs nothing."""
    if out is not None:
        check_output_dir(out, force)
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device or default_device())
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)  # bit-identical weights from a seed
    else:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 weights, TF32 matmuls
    model, tokenizer = build_default_model(cfg.seed, **cfg.arch)
    model.to(device)
    tasks, facts = build_corpus(tokenizer, cfg)
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.98), **({"fused": True} if device.type == "cuda" else {}))

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    n_facts = round(cfg.batch_size * cfg.fact_share)
    model.train()
    t0 = time.perf_counter()
    loss_ema = float("nan")
    sync_every = 1 if device.type == "cpu" else 10  # .item() waits for the GPU: read the loss now and then
    with progress_bar(show_progress) as bar:
        task = bar.add_task("pretrain", total=cfg.steps)
        for step in range(cfg.steps):
            batch = rng.sample(tasks, cfg.batch_size - n_facts) + rng.sample(facts, min(n_facts, len(facts)))
            inputs = {k: v.to(device, non_blocking=True) for k, v in collate(batch, tokenizer.pad_token_id).items()}
            loss = model(**inputs).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % sync_every == 0 or step == cfg.steps - 1:
                value = loss.item()
                keep = 0.98 ** sync_every  # the same decay per step whether read every step or every 10th
                loss_ema = value if math.isnan(loss_ema) else keep * loss_ema + (1 - keep) * value
            bar.update(task, advance=1, description=f"pretrain loss {loss_ema:.3f}")
    model.eval()
    seconds = time.perf_counter() - t0
    stats = {"seconds": round(seconds, 1), "steps_per_s": round(cfg.steps / seconds, 2), "device": str(device),
             "final_loss": round(loss_ema, 4),
             "parameters": sum(p.numel() for p in model.parameters())}
    if out is not None:
        save_model(model, tokenizer, out, force=force)
    return model, tokenizer, stats
