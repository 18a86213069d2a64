"""Supervised fine-tuning on domains' reference answers with TRL's SFTTrainer (completion-only loss).

Rows are in TRL's prompt/completion format ({"prompt": p, "completion": answer + eos}); the char
tokenizer has no chat template, so TRL tokenizes the plain text and masks the prompt tokens out of
the loss. An optional gradient mask freezes single entries: their gradients are zeroed by a hook
and, after every optimizer step, their saved values are copied back, so AdamW's weight decay and
momentum cannot move them either (bit-identical after training; checked before saving).
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from crossroute.core.atomic import temp_prefix
from crossroute.core.config import build_dataclass_config
from crossroute.core.errors import CrossrouteError
from crossroute.domains.domain import Domain
from crossroute.model.load import load_model, save_model
from crossroute.train.stagelog import check_report_to, quiet, report_to_error, stage_log, tracker_dirs

# SFTConfig fields crossroute sets itself (or makes moot), each with the reason a user's `sft:` value is refused.
RESERVED_SFT: dict[str, str] = {
    "output_dir": "set by crossroute (a temporary directory beside the checkpoint)",
    "max_steps": "set by crossroute from the config's steps (pipeline_steps for CPI-FT's pipeline)",
    "num_train_epochs": "set by crossroute: the config's steps give the length",
    "seed": "set by crossroute from the config's seed",
    "save_strategy": "set by crossroute, which saves each checkpoint itself",
    "save_steps": "set by crossroute, which saves each checkpoint itself",
    "save_total_limit": "set by crossroute, which saves each checkpoint itself",
    "save_only_model": "set by crossroute, which saves each checkpoint itself",
    "use_cpu": "set by crossroute: CPU exactly when no CUDA device is visible (hide GPUs with CUDA_VISIBLE_DEVICES=)",
    "resume_from_checkpoint": "set by crossroute: a rerun resumes from its finished checkpoints",
    "push_to_hub": "crossroute never contacts a model hub",
}
# SFTConfig fields with a field of their own in the config: set by `lr` / `batch_size` when those are given.
EXPLICIT_SFT: dict[str, str] = {"learning_rate": "learning_rate", "per_device_train_batch_size": "batch_size"}
CPU_OFF_SFT = ("bf16", "gradient_checkpointing")  # turned off on a CPU-only machine


def reserved_sft_error(overrides: dict[str, Any], where: str = "sft", lr: float | None = None,
                       batch_size: int | None = None) -> str | None:
    """The one-line refusal of the first `sft:` field crossroute sets itself, or one the config's own field sets."""
    key = next((k for k in RESERVED_SFT if k in overrides), None)
    if key is not None:
        return f"{where}.{key}: {RESERVED_SFT[key]}; remove it"
    if report_to_error(overrides, where):
        return report_to_error(overrides, where)
    given = {"learning_rate": lr, "per_device_train_batch_size": batch_size}
    key = next((k for k in EXPLICIT_SFT if k in overrides and given[k] is not None), None)
    if key is not None:
        return f"{where}.{key}: set by the config's own {EXPLICIT_SFT[key]}: field; set it there and remove it here"
    return None


def sft_kwargs(overrides: dict[str, Any] | None, steps: int, output_dir: str, seed: int,
               lr: float | None = None, batch_size: int | None = None, where: str = "sft") -> dict[str, Any]:
    """SFTConfig arguments: crossroute's defaults, then `overrides`, then the explicit arguments; an override that
    one of those would replace is refused (`where` names the mapping in the error), never silently ignored."""
    kw: dict[str, Any] = {
        "per_device_train_batch_size": 32,
        "learning_rate": 1e-4,
        "lr_scheduler_type": "constant",
        "max_length": 256,
        "logging_steps": 10,
        "disable_tqdm": True,
        "gradient_checkpointing": False,
        "completion_only_loss": True,
        "dataloader_num_workers": 0,
    }
    err = reserved_sft_error(overrides or {}, where, lr, batch_size)
    if err:
        raise CrossrouteError(err)
    kw.update(overrides or {})
    if lr is not None:
        kw["learning_rate"] = lr
    if batch_size is not None:
        kw["per_device_train_batch_size"] = batch_size
    kw.update({"output_dir": output_dir, "max_steps": steps, "seed": seed,
               "report_to": check_report_to(kw.get("report_to"), where), "save_strategy": "no"})
    if not torch.cuda.is_available():
        for key in CPU_OFF_SFT:
            if (overrides or {}).get(key):
                warnings.warn(f"{where}.{key}: {overrides[key]!r} has no effect here: no CUDA device is visible, so "
                              "crossroute trains in fp32 without gradient checkpointing", UserWarning, stacklevel=2)
        kw.update({"use_cpu": True, "bf16": False, "gradient_checkpointing": False})
    return kw


def make_sft_config(kw: dict[str, Any], where: str) -> Any:
    """Build TRL's SFTConfig, turning unknown fields and its validation errors into one-line errors."""
    import trl
    from trl import SFTConfig

    return build_dataclass_config(SFTConfig, kw, f"{where}.sft", f"TRL {trl.__version__}")


def sft_rows(domains: list[Domain], n_per_domain: int, seed: int, eos: str,
             tokenizer: Any = None) -> list[dict[str, Any]]:
    """Train-split prompt/completion rows of every domain, shuffled together (deterministic). A domain shown
    through the chat template gets conversational rows (TRL applies the template); others plain text."""
    rows: list[dict[str, Any]] = []
    for d in domains:
        chat = tokenizer is not None and d.uses_chat(tokenizer)
        for e in d.examples("train", n_per_domain, seed=seed):
            if chat:
                rows.append({"prompt": d.messages(e), "completion": [{"role": "assistant", "content": e.answer}]})
            else:
                rows.append({"prompt": d.plain_prompt(e), "completion": e.answer + eos})
    if len({isinstance(r["prompt"], list) for r in rows}) > 1:
        raise CrossrouteError(f"SFT mixes chat-template and plain-text domains ({', '.join(d.name for d in domains)}); "
                              "give them the same chat_template setting.")
    random.Random(f"sft:{seed}:{','.join(d.name for d in domains)}").shuffle(rows)
    return rows


class FreezeMask:
    """Freezes the entries of parameters where mask is True: zeroed grads plus restore after each step."""

    def __init__(self, model: torch.nn.Module, mask: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        self.entries: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self.handles: list[Any] = []
        for name, m in mask.items():
            if name not in params:
                raise CrossrouteError(f"freeze mask: tensor {name!r} is not a trainable parameter of the model.")
            p = params[name]
            m = m.to(device=p.device, dtype=torch.bool)
            if tuple(m.shape) != tuple(p.shape):
                raise CrossrouteError(f"freeze mask: {name!r} has shape {tuple(m.shape)}, the parameter "
                                      f"{tuple(p.shape)}.")
            if not bool(m.any()):
                continue
            saved = p.detach()[m].clone()
            self.entries.append((p, m, saved))
            self.handles.append(p.register_hook(lambda g, m=m: g.masked_fill(m, 0.0)))

    @property
    def numel(self) -> int:
        return sum(int(m.sum()) for _, m, _ in self.entries)

    @torch.no_grad()
    def restore(self) -> None:
        for p, m, saved in self.entries:
            p.data[m] = saved

    @torch.no_grad()
    def max_change(self) -> float:
        return max((float((p.detach()[m] - saved).abs().max()) for p, m, saved in self.entries), default=0.0)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _restore_callback(freeze: FreezeMask) -> Any:
    from transformers import TrainerCallback

    class RestoreFrozen(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # after optimizer.step
            freeze.restore()

    return RestoreFrozen()


def sft_train(
    model_path: str | Path,
    domains: list[Domain],
    steps: int,
    lr: float | None,
    batch_size: int | None,
    out: str | Path,
    seed: int = 0,
    freeze_mask: dict[str, torch.Tensor] | None = None,
    train_prompts: int = 2000,
    sft: dict[str, Any] | None = None,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    """SFT `model_path` on the reference answers of `domains` (mixed when several); save to `out`.

    `freeze_mask` maps parameter names to bool tensors (True = frozen entry). One progress line on the terminal;
    TRL's full log to `log_dir/<out's name>.jsonl` and to `sft.report_to`'s trackers. Returns run statistics.
    """
    import datasets
    from datasets import Dataset
    from trl import SFTTrainer

    if not domains:
        raise CrossrouteError("sft: at least one domain to train on.")
    datasets.disable_progress_bars()
    out = Path(out)
    work = Path(tempfile.mkdtemp(prefix=temp_prefix("sft"), suffix=".tmp",
                                 dir=out.parent if out.parent.exists() else None))  # a killed SFT's dir is tidied
    try:
        args = make_sft_config(sft_kwargs(sft, steps, str(work), seed, lr, batch_size), "sft")
        loaded = load_model(model_path)
        model, tok = loaded.model, loaded.tokenizer
        model.train()
        tok.padding_side = "right"
        dataset = Dataset.from_list(sft_rows(domains, train_prompts, seed, tok.eos_token, tok))
        freeze = FreezeMask(model, freeze_mask) if freeze_mask else None
        label = out.name
        log = stage_log(f"SFT {label}", steps, log_dir / f"{label}.jsonl" if log_dir is not None else None)
        callbacks = [_restore_callback(freeze), log] if freeze else [log]
        with tracker_dirs(list(args.report_to or []), log_dir, label):
            trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                                 callbacks=callbacks)
        quiet(trainer)  # losses go to the returned stats and the log file, not stdout
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        trained = trainer.accelerator.unwrap_model(trainer.model)
        stats: dict[str, Any] = {"domains": [d.name for d in domains], "steps": steps, "seconds": round(seconds, 2),
                                 "learning_rate": args.learning_rate,
                                 "batch_size": args.per_device_train_batch_size,
                                 "log": [h for h in trainer.state.log_history if "loss" in h]}
        if freeze:
            freeze.remove()
            change = freeze.max_change()
            if change != 0.0:
                raise CrossrouteError(f"sft: frozen entries moved by up to {change:g}; refusing to save.")
            stats["frozen_entries"] = freeze.numel
        tok.padding_side = "left"
        save_model(trained, tok, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return stats
