"""One GRPO stage with TRL's GRPOTrainer: the GRPOConfig crossroute builds, the training, and the atomic save."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from crossroute.core.errors import CrossrouteError
from crossroute.model.load import load_model, load_tokenizer, save_model

# GRPOConfig fields crossroute sets itself (per stage / per device); users may not override them.
RESERVED_GRPO = {"output_dir", "max_steps", "seed", "report_to", "save_strategy", "use_cpu"}


def grpo_kwargs(run_grpo: dict[str, Any], stage_grpo: dict[str, Any], steps: int, seed: int,
                output_dir: str) -> dict[str, Any]:
    """GRPOConfig arguments for a stage: crossroute's defaults, the run's `grpo:`, the stage's `grpo:`, then
    crossroute's own fields (RESERVED_GRPO)."""
    kw: dict[str, Any] = {
        "num_generations": 8,
        "per_device_train_batch_size": 64,
        "max_completion_length": 32,
        "learning_rate": 1e-5,
        "beta": 0.0,
        "logging_steps": 10,
        "disable_tqdm": False,
    }
    kw.update(run_grpo)
    kw.update(stage_grpo)
    kw.update({"output_dir": output_dir, "max_steps": steps, "seed": seed, "report_to": [],
               "save_strategy": "no"})
    if not torch.cuda.is_available():
        # CPU: no bf16, no gradient checkpointing (DESIGN.md section 4).
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

    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    unknown = sorted(set(kw) - names)
    if unknown:
        raise CrossrouteError(f"{where}.grpo.{unknown[0]}: not a GRPOConfig field (TRL {trl_version()}); "
                              "see configs/default_sequence.yaml for the fields crossroute passes through.")
    try:
        return GRPOConfig(**kw)
    except (ValueError, TypeError) as e:
        raise CrossrouteError(f"{where}.grpo: {str(e).splitlines()[0]}") from None


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


def train_grpo_stage(init: Path, rows: list[dict[str, Any]], reward: Any, args: Any, save_to: Path,
                     callbacks: CallbackFactory | None = None) -> StageRun:
    """Train one GRPO stage from checkpoint `init` on prompt `rows` and save it atomically to `save_to`."""
    from datasets import Dataset
    from trl import GRPOTrainer

    tokenizer = load_tokenizer(init)
    model = load_model(init).model
    model.train()
    cbs = callbacks(model, tokenizer, args) if callbacks is not None else []
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=cbs or None)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    # Every process takes part in gathering the weights (sharded under ZeRO-3/FSDP); the main one writes them.
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    is_main = trainer.accelerator.is_main_process
    if is_main:
        save_model(trainer.accelerator.unwrap_model(trainer.model), tokenizer, save_to, state_dict=state_dict)
    history = [h for h in trainer.state.log_history if "reward" in h]
    trainer.accelerator.wait_for_everyone()
    return StageRun(round(seconds, 2), history, cbs, is_main)
