"""One GRPO stage with TRL's GRPOTrainer: the GRPOConfig crossroute builds, the training, and the atomic save."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from crossroute.core.atomic import atomic_dir
from crossroute.core.config import build_dataclass_config
from crossroute.core.errors import CrossrouteError
from crossroute.model.load import load_model, load_tokenizer, save_model
from crossroute.train.stagelog import check_report_to, quiet, report_to_error, stage_log, tracker_dirs

# GRPOConfig fields crossroute sets itself (or that its per-stage loop makes moot), each with the reason a user's
# value is refused: a setting is never silently overridden.
RESERVED_GRPO: dict[str, str] = {
    "output_dir": "set by crossroute (a stage trains in RUN/.work/<stage> and is saved to RUN/checkpoints/<stage>)",
    "max_steps": "set by crossroute from the stage's steps",
    "num_train_epochs": "set by crossroute: the stage's steps give its length",
    "seed": "set by crossroute from the run's seed (or seeds)",
    "save_strategy": "set by crossroute, which saves each stage's checkpoint itself",
    "save_steps": "set by crossroute, which saves each stage's checkpoint itself",
    "save_total_limit": "set by crossroute, which saves each stage's checkpoint itself",
    "save_only_model": "set by crossroute, which saves each stage's checkpoint itself",
    "use_cpu": "set by crossroute: CPU exactly when no CUDA device is visible (hide GPUs with CUDA_VISIBLE_DEVICES=)",
    "resume_from_checkpoint": "set by crossroute: a rerun resumes at the first unfinished stage",
    "push_to_hub": "crossroute never contacts a model hub",
}
# Fields of the run's one process group (created once, before the first stage): a stage's own value would be ignored.
RUN_ONLY_GRPO: dict[str, str] = {
    "ddp_backend": "one process group serves every stage, so a stage's own value would be ignored; move it to the "
                   "run's top-level grpo:",
    "ddp_timeout": "one process group serves every stage, so a stage's own value would be ignored; move it to the "
                   "run's top-level grpo:",
}
# Fields crossroute turns off on a CPU-only machine (no bf16, no activation checkpointing: DESIGN.md section 4).
CPU_OFF = ("bf16", "gradient_checkpointing", "activation_checkpointing")


def reserved_grpo_error(given: dict[str, Any], where: str, stage: bool = True) -> str | None:
    """The one-line refusal of the first reserved field in a `grpo:` mapping (`where`: e.g. `stages[1].grpo`);
    `stage`: a stage's own mapping, where the run-wide fields (RUN_ONLY_GRPO) are refused too."""
    reserved = {**{k: f"{v}; remove it" for k, v in RESERVED_GRPO.items()}, **(RUN_ONLY_GRPO if stage else {})}
    key = next((k for k in reserved if k in given), None)
    if key is not None:
        return f"{where}.{key}: {reserved[key]}"
    return report_to_error(given, where)


def warn_cpu_overrides(given: dict[str, Any], where: str, cuda: bool | None = None) -> list[str]:
    """Warn (one line per field) about `grpo:` values crossroute turns off because no CUDA device is visible."""
    if torch.cuda.is_available() if cuda is None else cuda:
        return []
    lines = [f"{where}.{k}: {given[k]!r} has no effect here: no CUDA device is visible, so crossroute trains in "
             "fp32 without activation checkpointing" for k in CPU_OFF if given.get(k)]
    for line in lines:
        warnings.warn(line, UserWarning, stacklevel=2)
    return lines


def grpo_kwargs(run_grpo: dict[str, Any], stage_grpo: dict[str, Any], steps: int, seed: int,
                output_dir: str) -> dict[str, Any]:
    """GRPOConfig arguments for a stage: crossroute's defaults, the run's `grpo:`, the stage's `grpo:`, then
    crossroute's own fields; a user value for one of those (RESERVED_GRPO) is refused."""
    for given, where, stage in ((run_grpo, "grpo", False), (stage_grpo, "stage grpo", True)):
        err = reserved_grpo_error(given, where, stage)
        if err:
            raise CrossrouteError(err)
    kw: dict[str, Any] = {
        "num_generations": 8,
        "per_device_train_batch_size": 64,
        "max_completion_length": 32,
        "learning_rate": 1e-5,
        "beta": 0.0,
        "logging_steps": 10,
    }
    kw.update(run_grpo)
    kw.update(stage_grpo)
    kw.update({"output_dir": output_dir, "max_steps": steps, "seed": seed,
               "report_to": check_report_to(kw.get("report_to"), "grpo"), "save_strategy": "no"})
    if not torch.cuda.is_available():
        # CPU: no bf16, no gradient checkpointing (DESIGN.md section 4); warn_cpu_overrides names a user's value.
        kw.update({"use_cpu": True, "bf16": False})
        for key in ("gradient_checkpointing", "activation_checkpointing"):
            if key in kw:
                kw[key] = False
    if kw.get("use_vllm"):
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise CrossrouteError("grpo.use_vllm is true but vLLM is not installed; `pip install vllm` on the GPU "
                                  "machine or set use_vllm: false.") from None
    return kw


def make_grpo_config(kw: dict[str, Any], where: str) -> Any:
    """Build TRL's GRPOConfig, turning its own validation errors into one-line errors naming the stage."""
    from trl import GRPOConfig

    return build_dataclass_config(GRPOConfig, kw, f"{where}.grpo", f"TRL {trl_version()}; see "
                                  "configs/default_sequence.yaml for the fields crossroute passes through")


def trl_version() -> str:
    import trl

    return trl.__version__


CallbackFactory = Callable[[Any, Any, Any], list[Any]]  # (model, tokenizer, GRPOConfig) -> TRL callbacks


@dataclasses.dataclass
class StageRun:
    """What one trained stage reports: wall time, TRL's reward log, and the callbacks that ran."""

    seconds: float
    log: list[dict[str, Any]]
    callbacks: list[Any]
    is_main: bool


def lora_config(peft: dict[str, Any], where: str) -> Any:
    """PEFT's LoraConfig from a stage's `peft:` mapping (task_type CAUSAL_LM), its errors as one line."""
    from peft import LoraConfig

    if peft.get("use_dora"):
        raise CrossrouteError(f"{where}.peft.use_dora: DoRA is not supported (crossroute analyses LoRA's scale*B A "
                              "updates); remove it")
    return build_dataclass_config(LoraConfig, {"task_type": "CAUSAL_LM", **peft}, f"{where}.peft",
                                  "PEFT; e.g. r, lora_alpha, target_modules, lora_dropout")


def train_grpo_stage(init: Path, rows: list[dict[str, Any]], reward: Any, args: Any, save_to: Path,
                     callbacks: CallbackFactory | None = None, label: str | None = None,
                     log_dir: Path | None = None, peft: Any = None, adapter_to: Path | None = None) -> StageRun:
    """Train one GRPO stage from checkpoint `init` on prompt `rows` and save it atomically to `save_to`.

    The terminal shows one progress line (`label`, default save_to's name); TRL's full log goes to
    `log_dir/<label>.jsonl` and to the trackers in `args.report_to` (crossroute.train.stagelog). With `peft` (a
    LoraConfig) TRL trains a LoRA adapter: it is saved to `adapter_to` and `save_to` gets the merged weights, so
    later stages and every analysis read a full checkpoint."""
    from datasets import Dataset
    from trl import GRPOTrainer

    label = label or save_to.name
    tokenizer = load_tokenizer(init)
    model = load_model(init).model
    model.train()
    cbs = callbacks(model, tokenizer, args) if callbacks is not None else []
    log = stage_log(f"GRPO {label}", args.max_steps, log_dir / f"{label}.jsonl" if log_dir is not None else None)
    with tracker_dirs(list(args.report_to or []), log_dir, label):
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer, callbacks=[*cbs, log], peft_config=peft)
    quiet(trainer)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    # Every process takes part in gathering the weights (sharded under ZeRO-3/FSDP); the main one writes them.
    is_main = trainer.accelerator.is_main_process
    if peft is not None:
        if is_main:
            trained = trainer.accelerator.unwrap_model(trainer.model)
            if adapter_to is not None:
                with atomic_dir(adapter_to, force=False) as tmp:
                    trained.save_pretrained(tmp, safe_serialization=True)
            save_model(trained.merge_and_unload(), tokenizer, save_to)
    else:
        state_dict = trainer.accelerator.get_state_dict(trainer.model)
        if is_main:
            save_model(trainer.accelerator.unwrap_model(trainer.model), tokenizer, save_to, state_dict=state_dict)
    history = [h for h in trainer.state.log_history if "reward" in h]
    trainer.accelerator.wait_for_everyone()
    return StageRun(round(seconds, 2), history, cbs, is_main)
