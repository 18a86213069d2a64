"""`crossroute train`: single-domain RL stages in sequence with TRL's GRPOTrainer, eval after each stage.

The run resumes at the first unfinished stage: a stage is done once its checkpoint was renamed into place
and its evaluation written. The forgetting matrix and the refresh analysis land in results/.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .config import load_yaml_mapping, validate_config
from .domains import Domain, get_domain
from .errors import CrossrouteError
from .evaluate import evaluate_all, scores_json
from .judge import JudgeConfig, check_endpoint, judge_reward
from .model import check_checkpoint_dir, load_model, load_tokenizer, resolve_model_path, save_model
from .progress import console
from .protect import ProtectCallback, ProtectConfig
from .rundir import RunDir, open_run

# GRPOConfig fields crossroute sets itself (per stage / per device); users may not override them.
RESERVED_GRPO = {"output_dir", "max_steps", "seed", "report_to", "save_strategy", "use_cpu"}


class StageConfig(BaseModel):
    """One RL stage: a domain, a number of optimizer steps, and GRPOConfig overrides for this stage."""

    model_config = ConfigDict(extra="forbid")

    domain: str
    steps: int = Field(gt=0)
    grpo: dict[str, Any] = Field(default_factory=dict)
    # Optional: protect earlier domains' conflict units during this stage (crossroute.protect).
    protect: ProtectConfig | None = None


class TrainConfig(BaseModel):
    """A sequential multi-domain RL run (see configs/default_sequence.yaml for every field documented)."""

    model_config = ConfigDict(extra="forbid")

    model: str = "default"
    domains: list[str] = Field(default_factory=lambda: ["math", "code", "qa", "cw"])
    eval_n: int = Field(100, gt=0)
    train_prompts: int = Field(2000, gt=0)
    seed: int = 0
    grpo: dict[str, Any] = Field(default_factory=dict)
    stages: list[StageConfig] = Field(min_length=1)
    refresh: StageConfig | None = None
    # An OpenAI-compatible LLM judge that replaces the rule-based rubric of writing (rubric) domains.
    judge: JudgeConfig | None = None

    @field_validator("domains")
    @classmethod
    def _known_domains(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one domain to evaluate")
        for d in v:
            get_domain(d)
        return v

    @model_validator(mode="after")
    def _stage_domains(self) -> TrainConfig:
        for i, st in enumerate(self.stages + ([self.refresh] if self.refresh else [])):
            where = f"stages[{i}]" if i < len(self.stages) else "refresh"
            if st.domain not in self.domains:
                raise ValueError(f"{where}.domain {st.domain!r} is not in domains {self.domains}")
            if st.protect is not None and st.domain in st.protect.domains:
                raise ValueError(f"{where}.protect.domains lists the stage's own domain {st.domain!r}")
        return self


def stage_names(cfg: TrainConfig) -> list[str]:
    """Checkpoint/result names of the stages in order: 01_math, 02_code, ..., refresh_math."""
    names = [f"{i + 1:02d}_{st.domain}" for i, st in enumerate(cfg.stages)]
    if cfg.refresh:
        names.append(f"refresh_{cfg.refresh.domain}")
    return names


def grpo_kwargs(cfg: TrainConfig, stage: StageConfig, output_dir: str) -> dict[str, Any]:
    """GRPOConfig arguments for `stage`: run defaults, then stage overrides, then crossroute's own fields."""
    kw: dict[str, Any] = {
        "num_generations": 8,
        "per_device_train_batch_size": 64,
        "max_completion_length": 32,
        "learning_rate": 1e-5,
        "beta": 0.0,
        "logging_steps": 10,
        "disable_tqdm": False,
    }
    kw.update(cfg.grpo)
    kw.update(stage.grpo)
    kw.update({"output_dir": output_dir, "max_steps": stage.steps, "seed": cfg.seed, "report_to": [],
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
        raise CrossrouteError(f"{where}.grpo.{unknown[0]}: not a GRPOConfig field (TRL {_trl_version()}); "
                              "see configs/default_sequence.yaml for the fields crossroute passes through.")
    try:
        return GRPOConfig(**kw)
    except (ValueError, TypeError) as e:
        raise CrossrouteError(f"{where}.grpo: {str(e).splitlines()[0]}") from None


def _trl_version() -> str:
    import trl

    return trl.__version__


def load_train_config(path: str | Path) -> TrainConfig:
    """Read and validate a train YAML; every error names the file and the field, before any training."""
    raw = load_yaml_mapping(path, "configs/default_sequence.yaml", "stages")
    return parse_train_config(raw, str(Path(path).expanduser()))


def parse_train_config(raw: dict[str, Any], where: str = "config") -> TrainConfig:
    """Validate a config mapping (pydantic, then every stage's GRPOConfig) without training anything."""
    cfg = validate_config(TrainConfig, raw, where, "domains")
    for i, st in enumerate(cfg.stages + ([cfg.refresh] if cfg.refresh else [])):
        label = f"{where}: stages[{i}]" if i < len(cfg.stages) else f"{where}: refresh"
        make_grpo_config(grpo_kwargs(cfg, st, tempfile.gettempdir()), label)
    return cfg


# ----------------------------------------------------------------------------- forgetting metrics

def forgetting_summary(rows: list[str], matrix: list[list[float]], domains: list[str],
                       trained: list[str], refresh_row: int | None) -> dict[str, Any]:
    """Peak, forgetting, backward transfer and averages of E[stage, domain] (DESIGN.md 2.1).

    rows[0] is the base model; rows[1..T] the sequence stages (trained[i] is stage i+1's domain);
    refresh_row, if given, indexes the refresh row (excluded from peak/forgetting/BWT).
    """
    seq_end = refresh_row if refresh_row is not None else len(rows)
    seq = matrix[:seq_end]
    final = seq[-1]
    peak = {d: max(r[j] for r in seq) for j, d in enumerate(domains)}
    forgetting = {d: peak[d] - final[j] for j, d in enumerate(domains)}
    # BWT over trained domains but the last: score at the end minus score right after its own stage.
    bwt_terms = []
    for i, d in enumerate(trained[:-1]):
        j = domains.index(d)
        bwt_terms.append(final[j] - seq[i + 1][j])
    out: dict[str, Any] = {
        "peak": peak,
        "forgetting": forgetting,
        "backward_transfer": sum(bwt_terms) / len(bwt_terms) if bwt_terms else 0.0,
        "average_base": sum(matrix[0]) / len(domains),
        "average_final": sum(final) / len(domains),
        "own_stage_gain": {f"{i + 1:02d}_{d}": seq[i + 1][domains.index(d)] - seq[i][domains.index(d)]
                           for i, d in enumerate(trained)},
    }
    if refresh_row is not None:
        ref = matrix[refresh_row]
        a = rows[refresh_row].removeprefix("refresh_")
        j = domains.index(a)
        lost = peak[a] - final[j]
        out["refresh"] = {
            "domain": a,
            "before": final[j],
            "after": ref[j],
            "peak": peak[a],
            "recovered_points": ref[j] - final[j],
            "recovery_share": (ref[j] - final[j]) / lost if lost > 0 else None,
            "others_change": {d: ref[k] - final[k] for k, d in enumerate(domains) if d != a},
            "average_after": sum(ref) / len(domains),
        }
    return out


# ----------------------------------------------------------------------------- the run

def _run_stage(cfg: TrainConfig, stage: StageConfig, name: str, init: Path, run: RunDir, domain: Domain) -> None:
    """Train one GRPO stage from checkpoint `init` and save it atomically as checkpoints/<name>."""
    from datasets import Dataset
    from trl import GRPOTrainer

    work = run.root / ".work" / name
    shutil.rmtree(work, ignore_errors=True)  # a killed stage restarts from its initial checkpoint
    kw = grpo_kwargs(cfg, stage, str(work))
    args = make_grpo_config(kw, f"stage {name}")
    rows = [e.row() for e in domain.examples("train", cfg.train_prompts, seed=cfg.seed)]
    dataset = Dataset.from_list(rows)
    tokenizer = load_tokenizer(init)
    model = load_model(init).model
    model.train()
    reward = judge_reward(cfg.judge) if cfg.judge is not None and domain.kind == "rubric" else domain.reward_func()
    callbacks = []
    if stage.protect is not None:
        callbacks.append(ProtectCallback(stage.protect, model, tokenizer, domain, args.learning_rate,
                                         stage.steps, seed=cfg.seed))
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=callbacks or None)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    # Every process takes part in gathering the weights (sharded under ZeRO-3/FSDP); the main one writes them.
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.accelerator.is_main_process:
        save_model(trainer.accelerator.unwrap_model(trainer.model), tokenizer, run.checkpoint(name),
                   state_dict=state_dict)
        history = [h for h in trainer.state.log_history if "reward" in h]
        run.write_result(f"train_{name}", {"stage": name, "domain": domain.name, "steps": stage.steps,
                                           "seconds": round(seconds, 2), "log": history,
                                           **({"protect": callbacks[0].summary()} if callbacks else {})})
    trainer.accelerator.wait_for_everyone()
    shutil.rmtree(work, ignore_errors=True)


def _dist_state(cfg: TrainConfig) -> Any:
    """Accelerate's process state (one process without a launcher), with the trainer's own barrier timeout:
    the other processes wait there while the main one evaluates a stage."""
    from datetime import timedelta

    from accelerate import PartialState

    return PartialState(timeout=timedelta(seconds=int(cfg.grpo.get("ddp_timeout", 1800))))


def _evaluate_checkpoint(run: RunDir, name: str, ckpt: Path, cfg: TrainConfig, domains: list[Domain]) -> dict:
    """Evaluate a stage checkpoint once: on the main process only under a multi-process launch (the
    others wait at a barrier, then read the result file)."""
    state = _dist_state(cfg)
    if state.is_main_process and run.read_result(f"eval_{name}") is None:
        loaded = load_model(ckpt)
        scores = evaluate_all(loaded.model, loaded.tokenizer, domains, n=cfg.eval_n)
        run.write_result(f"eval_{name}", {"stage": name, "checkpoint": str(ckpt), **scores_json(scores)})
        del loaded
    state.wait_for_everyone()  # every process reaches this once per checkpoint
    res = run.read_result(f"eval_{name}")
    if res is None:
        raise CrossrouteError(f"{run.results}: eval_{name}.json is missing after the main process evaluated it; "
                              "--out must be on a filesystem every node shares.")
    return res


def open_train_run(cfg: TrainConfig, out: str | Path, base: Path) -> RunDir:
    """Create or reopen the run directory of `cfg` starting from checkpoint `base` (main process first)."""
    with _dist_state(cfg).main_process_first():  # one process creates the run directory, then the others open it
        return open_run(out, {**cfg.model_dump(), "model": str(base)}, kind="train")


def run_training(cfg: TrainConfig, out: str | Path) -> dict[str, Any]:
    """Run (or resume) the sequence and the refresh; returns the forgetting results written to results/."""
    base = check_checkpoint_dir(cfg.model)
    if cfg.judge is not None:
        check_endpoint(cfg.judge)  # a judge that is down fails here, not hours into training
    run = open_train_run(cfg, out, base)
    domains = [get_domain(d) for d in cfg.domains]
    by_name = {d.name: d for d in domains}
    names = stage_names(cfg)
    stages = cfg.stages + ([cfg.refresh] if cfg.refresh else [])
    evals = [_evaluate_checkpoint(run, "base", base, cfg, domains)]
    prev = base
    last_seq = run.checkpoint(names[len(cfg.stages) - 1])
    for i, (name, st) in enumerate(zip(names, stages, strict=True)):
        init = last_seq if name.startswith("refresh_") else prev
        ckpt = run.checkpoint(name)
        if run.has_checkpoint(name):
            console.print(f"[dim]stage {name}: done, skipped[/dim]")
        else:
            console.print(f"[bold]stage {i + 1}/{len(stages)}: {name}[/bold] ({st.steps} GRPO steps on {st.domain})")
            _run_stage(cfg, st, name, init, run, by_name[st.domain])
        evals.append(_evaluate_checkpoint(run, name, ckpt, cfg, domains))
        prev = ckpt
    rows = ["base"] + names
    matrix = [[e["scores"][d] for d in cfg.domains] for e in evals]
    refresh_row = len(rows) - 1 if cfg.refresh else None
    result = {"rows": rows, "domains": cfg.domains, "matrix": matrix,
              **forgetting_summary(rows, matrix, cfg.domains, [s.domain for s in cfg.stages], refresh_row)}
    run.write_result("forgetting", result)
    return result


def run_checkpoints(run: RunDir) -> tuple[list[Path], list[str]]:
    """The base checkpoint and every sequence stage's checkpoint of a finished train run, with names."""
    raw = dict(run.read_config() or {})
    raw.pop("kind", None)
    cfg = TrainConfig.model_validate(raw)
    names = [n for n in stage_names(cfg) if not n.startswith("refresh_")]
    ckpts = [resolve_model_path(cfg.model)] + [run.checkpoint(n) for n in names]
    missing = [c for c in ckpts[1:] if not (c / "config.json").exists()]
    if missing:
        raise CrossrouteError(f"{missing[0]}: stage checkpoint missing; finish the run first (crossroute train).")
    return ckpts, ["base", *names]
