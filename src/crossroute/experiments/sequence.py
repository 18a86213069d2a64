"""`crossroute train`: single-domain RL stages in sequence with TRL's GRPOTrainer, eval after each stage.

The run resumes at the first unfinished stage: a stage is done once its checkpoint was renamed into place
and its evaluation written. The forgetting matrix and the refresh analysis land in results/.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from crossroute.analyze.forgetting import forgetting_summary
from crossroute.core.config import load_yaml_mapping, validate_config
from crossroute.core.console import console
from crossroute.core.errors import CrossrouteError
from crossroute.core.rundir import RunDir, open_run
from crossroute.domains.base import Domain
from crossroute.domains.files import get_domain
from crossroute.domains.judge import JudgeConfig, check_endpoint, judge_reward
from crossroute.measure.evaluate import evaluate_all, scores_json
from crossroute.model.load import check_checkpoint_dir, load_model, resolve_model_path
from crossroute.repair.protect import ProtectCallback, ProtectConfig
from crossroute.train.grpo import grpo_kwargs, make_grpo_config, train_grpo_stage


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








def load_train_config(path: str | Path) -> TrainConfig:
    """Read and validate a train YAML; every error names the file and the field, before any training."""
    raw = load_yaml_mapping(path, "configs/default_sequence.yaml", "stages")
    return parse_train_config(raw, str(Path(path).expanduser()))


def parse_train_config(raw: dict[str, Any], where: str = "config") -> TrainConfig:
    """Validate a config mapping (pydantic, then every stage's GRPOConfig) without training anything."""
    cfg = validate_config(TrainConfig, raw, where, "domains")
    for i, st in enumerate(cfg.stages + ([cfg.refresh] if cfg.refresh else [])):
        label = f"{where}: stages[{i}]" if i < len(cfg.stages) else f"{where}: refresh"
        make_grpo_config(grpo_kwargs(cfg.grpo, st.grpo, st.steps, cfg.seed, tempfile.gettempdir()), label)
    return cfg


# ----------------------------------------------------------------------------- forgetting metrics



# ----------------------------------------------------------------------------- the run

def _run_stage(cfg: TrainConfig, stage: StageConfig, name: str, init: Path, run: RunDir, domain: Domain) -> None:
    """Train one GRPO stage from checkpoint `init` and save it atomically as checkpoints/<name>."""
    work = run.root / ".work" / name
    shutil.rmtree(work, ignore_errors=True)  # a killed stage restarts from its initial checkpoint
    args = make_grpo_config(grpo_kwargs(cfg.grpo, stage.grpo, stage.steps, cfg.seed, str(work)), f"stage {name}")
    rows = [e.row() for e in domain.examples("train", cfg.train_prompts, seed=cfg.seed)]
    reward = judge_reward(cfg.judge) if cfg.judge is not None and domain.kind == "rubric" else domain.reward_func()
    protect = stage.protect

    def callbacks(model: Any, tokenizer: Any, args: Any) -> list[Any]:
        if protect is None:
            return []
        return [ProtectCallback(protect, model, tokenizer, domain, args.learning_rate, stage.steps, seed=cfg.seed)]

    done = train_grpo_stage(init, rows, reward, args, run.checkpoint(name), callbacks)
    if done.is_main:
        run.write_result(f"train_{name}", {"stage": name, "domain": domain.name, "steps": stage.steps,
                                           "seconds": done.seconds, "log": done.log,
                                           **({"protect": done.callbacks[0].summary()} if done.callbacks else {})})
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
