"""`crossroute train`: single-domain RL stages in sequence with TRL's GRPOTrainer, eval after each stage.

The run resumes at the first unfinished stage: a stage is done once its checkpoint was renamed into place
and its evaluation written. The forgetting matrix and the refresh analysis land in results/.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from crossroute.analyze.forgetting import (
    PerExample,
    compare_runs,
    forgetting_points,
    forgetting_summary,
    forgetting_vs_kl,
    paired_summary,
    per_example_scores,
)
from crossroute.core.atomic import atomic_link_copy
from crossroute.core.config import MAX_EVAL_N, MAX_TRAIN_PROMPTS, load_yaml_mapping, validate_config
from crossroute.core.console import console
from crossroute.core.errors import CrossrouteError
from crossroute.core.rundir import RunDir, open_run
from crossroute.core.threads import configure_threads
from crossroute.domains.builtin import DEFAULT_DOMAINS
from crossroute.domains.domain import Domain
from crossroute.domains.evalset import EVAL_SETS, pin_eval_sets
from crossroute.domains.files import build_domains, domains_field, rebase_domains
from crossroute.domains.judge import JudgeConfig, check_endpoint
from crossroute.domains.spec import DomainSpec
from crossroute.measure.evaluate import EvalProtocol, evaluate_checkpoint, scores_json, write_records
from crossroute.measure.kl import KL_DEFINITION, stage_kl
from crossroute.measure.rescore import read_records
from crossroute.measure.stats import across_seeds
from crossroute.model.load import Loaded, check_checkpoint_dir, load_model, load_tokenizer, resolve_model_path
from crossroute.repair.protect import ProtectConfig, protect_callback
from crossroute.train.grpo import (
    grpo_kwargs,
    lora_config,
    make_grpo_config,
    reserved_grpo_error,
    train_grpo_stage,
    warn_cpu_overrides,
)
from crossroute.train.mixture import mixture_rewards, mixture_rows


class StageConfig(BaseModel):
    """One RL stage: a domain (or a mixture: a list, or a mapping of domains to weights), a number of optimizer
    steps, and GRPOConfig overrides for this stage."""

    model_config = ConfigDict(extra="forbid")

    domain: str | list[str] | dict[str, float]
    steps: int = Field(gt=0)
    grpo: dict[str, Any] = Field(default_factory=dict)
    # Optional: protect earlier domains' conflict units during this stage (crossroute.protect).
    protect: ProtectConfig | None = None
    # Optional: train a LoRA adapter (PEFT LoraConfig fields: r, lora_alpha, target_modules, ...) instead of every
    # weight; the stage's checkpoint holds the merged weights and RUN/adapters/<stage>/ the adapter.
    peft: dict[str, Any] | None = None

    @field_validator("domain")
    @classmethod
    def _mixture(cls, v: str | list[str] | dict[str, float]) -> str | list[str] | dict[str, float]:
        if isinstance(v, str):
            return v
        names = list(v)
        if not names:
            raise ValueError("a mixed stage needs at least one domain")
        if len(set(names)) != len(names):
            raise ValueError(f"{names}: each domain once")
        if isinstance(v, dict) and not all(math.isfinite(w) and w > 0 for w in v.values()):
            raise ValueError(f"{v}: weights must be finite and > 0")
        return v

    @property
    def mixture(self) -> dict[str, float]:
        """The stage's domains with their weights (a single domain has weight 1)."""
        if isinstance(self.domain, str):
            return {self.domain: 1.0}
        return dict(self.domain) if isinstance(self.domain, dict) else {d: 1.0 for d in self.domain}

    @property
    def label(self) -> str:
        """The stage's name part: its domain, or its mixture's domains joined by '+'."""
        return "+".join(self.mixture)

    @property
    def mixed(self) -> bool:
        return not isinstance(self.domain, str)


class MixedBaseline(BaseModel):
    """Mixed RL beside the sequence: one GRPO stage from the same base on a mixture of the sequence's domains, with
    the same total steps by default, trained in RUN/mixed/ and compared with the end of the sequence."""

    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(None, gt=0, description="default: the sequence's total steps (the same compute)")
    weights: dict[str, float] | None = Field(None, description="default: the sequence's domains, each weighted by "
                                             "its stages' steps")
    grpo: dict[str, Any] = Field(default_factory=dict)

    def stage(self, stages: list[StageConfig]) -> StageConfig:
        """The mixed stage that matches `stages`."""
        weights = self.weights
        if weights is None:
            weights = {}
            for st in stages:
                for d, w in st.mixture.items():
                    weights[d] = weights.get(d, 0.0) + st.steps * w / sum(st.mixture.values())
        return StageConfig(domain=dict(weights), steps=self.steps or sum(st.steps for st in stages), grpo=self.grpo)


class TrainConfig(BaseModel):
    """A sequential multi-domain RL run (see configs/default_sequence.yaml for every field documented)."""

    model_config = ConfigDict(extra="forbid")

    model: str = "default"
    # Every domain, declared once by name: a built-in name, a spec mapping (files, fields, scorer, chat template),
    # a spec YAML file, or a data file. Stages, refresh and protect refer to these names.
    domains: dict[str, DomainSpec | str] = Field(default_factory=lambda: {d: d for d in DEFAULT_DOMAINS})
    eval_n: int = Field(100, gt=0, le=MAX_EVAL_N)
    eval: EvalProtocol = Field(default_factory=EvalProtocol)  # greedy or k samples, pass@j, P(ref), budgets
    train_prompts: int = Field(2000, gt=0, le=MAX_TRAIN_PROMPTS)
    seed: int = 0
    # Several training seeds: the whole sequence runs once per seed (RUN/seeds/<k>/, each resumable) and every
    # summary figure is aggregated (mean, SD, 95 % t-interval over seeds). Eval prompts never depend on the seed.
    seeds: list[int] | None = Field(None, min_length=1)
    kl_n: int = Field(64, ge=0, le=MAX_EVAL_N, description="eval prompts per domain for each stage's forward KL to "
                      "the base and to the previous checkpoint (RL's Razor); 0 turns it off")
    threads: int | None = Field(None, gt=0, description="torch CPU threads per process (default: cores / processes)")
    grpo: dict[str, Any] = Field(default_factory=dict)
    stages: list[StageConfig] = Field(min_length=1)
    refresh: StageConfig | None = None
    mixed: MixedBaseline | None = None  # mixed RL beside the sequence (configs/mixed_vs_sequential.yaml)
    # An OpenAI-compatible LLM judge: the scorer of every `scorer: judge` domain, as reward and in eval.
    judge: JudgeConfig | None = None
    _built: dict[str, Domain] | None = PrivateAttr(None)

    @field_validator("domains", mode="before")
    @classmethod
    def _domains_form(cls, v: Any) -> Any:
        return domains_field(v)

    @field_validator("domains")
    @classmethod
    def _some_domains(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("at least one domain to evaluate")
        return v

    @model_validator(mode="after")
    def _stage_domains(self) -> TrainConfig:
        names = list(self.domains)
        err = reserved_grpo_error(self.grpo, "grpo", stage=False)
        if err:
            raise ValueError(err)
        for i, st in enumerate(self.stages + ([self.refresh] if self.refresh else [])):
            where = f"stages[{i}]" if i < len(self.stages) else "refresh"
            missing = next((d for d in st.mixture if d not in self.domains), None)
            if missing:
                raise ValueError(f"{where}.domain {missing!r} is not declared in domains {names}")
            if st.mixed and (where == "refresh" or st.protect is not None):
                raise ValueError(f"{where}.domain: a mixture is for sequence stages without protect; give one domain")
            err = reserved_grpo_error(st.grpo, f"{where}.grpo")
            if err:
                raise ValueError(err)
            if st.peft is not None and st.protect is not None:
                raise ValueError(f"{where}: protect and peft together are not supported (protect edits the full "
                                 "weights' gradients); drop one")
            if st.peft is not None:
                try:
                    lora_config(st.peft, where)
                except CrossrouteError as e:
                    raise ValueError(str(e)) from None
            if st.protect is not None:
                _check_protect(st.protect, st.label, where, names, [d for s in self.stages[:i] for d in s.mixture])
        if self.mixed is not None:
            missing = next((d for d in (self.mixed.weights or {}) if d not in self.domains), None)
            if missing:
                raise ValueError(f"mixed.weights: {missing!r} is not declared in domains {names}")
            err = reserved_grpo_error(self.mixed.grpo, "mixed.grpo")
            if err:
                raise ValueError(err)
            self.mixed.stage(self.stages)  # weights > 0
        built = self.built_domains()
        for i, st in enumerate(self.stages + ([self.refresh] if self.refresh else [])):
            where = f"stages[{i}]" if i < len(self.stages) else "refresh"
            dry = next((d for d in st.mixture if not built[d].examples("train", 1)), None)
            if dry:
                raise ValueError(f"{where}.domain {dry!r} has no train rows (only an eval file?); give it a "
                                 "train file to train on")
        empty = next((n for n, d in built.items() if not d.examples("eval", 1)), None)
        if empty:
            raise ValueError(f"domains.{empty}: no eval rows; give it an eval file (or file: to split one)")
        return self

    @property
    def domain_names(self) -> list[str]:
        """The declared domains' names, in order (the forgetting matrix's columns)."""
        return list(self.domains)

    def built_domains(self) -> dict[str, Domain]:
        """The declared domains, built once (files read, every reference checked by its scorer)."""
        if self._built is None:
            self._built = build_domains(self.domains, judge=self.judge)
        return self._built


def _check_protect(protect: ProtectConfig, own: str, where: str, declared: list[str], trained: list[str]) -> None:
    """A stage's `protect.domains` must be declared, not the stage's own domain `own`, and trained by an earlier
    stage (`trained`): a domain not trained yet has nothing learnt to protect."""
    if own in protect.domains:
        raise ValueError(f"{where}.protect.domains lists the stage's own domain {own!r}")
    missing = next((d for d in protect.domains if d not in declared), None)
    if missing:
        raise ValueError(f"{where}.protect.domains: {missing!r} is not declared in domains {declared}")
    later = next((d for d in protect.domains if d not in trained), None)
    if later:
        raise ValueError(f"{where}.protect.domains: {later!r} is not trained by an earlier stage (earlier stages "
                         f"train {sorted(set(trained))}); protect only domains trained before this stage")


def stage_names(cfg: TrainConfig) -> list[str]:
    """Checkpoint/result names of the stages in order: 01_math, 02_code, ..., refresh_math."""
    names = [f"{i + 1:02d}_{st.label}" for i, st in enumerate(cfg.stages)]
    if cfg.refresh:
        names.append(f"refresh_{cfg.refresh.domain}")
    return names








def load_train_config(path: str | Path) -> TrainConfig:
    """Read and validate a train YAML; every error names the file and the field, before any training."""
    raw = load_yaml_mapping(path, "configs/default_sequence.yaml", "stages")
    if "domains" in raw:  # relative data paths are the config file's
        raw["domains"] = rebase_domains(raw["domains"], Path(path).expanduser().resolve().parent)
    return parse_train_config(raw, str(Path(path).expanduser()))


def parse_train_config(raw: dict[str, Any], where: str = "config") -> TrainConfig:
    """Validate a config mapping (pydantic, then every stage's GRPOConfig) without training anything."""
    if raw.get("seeds") and "seed" in raw:
        raise CrossrouteError(f"{where}: seed: is not used when seeds: is given (every seed in seeds runs); remove "
                              "one of them")
    cfg = validate_config(TrainConfig, raw, where, "domains")
    _dist_state(cfg)  # before any GRPOConfig: the process group gets the run's ddp_backend and ddp_timeout
    warn_cpu_overrides(cfg.grpo, f"{where}: grpo")
    for i, st in enumerate(cfg.stages + ([cfg.refresh] if cfg.refresh else [])):
        label = f"{where}: stages[{i}]" if i < len(cfg.stages) else f"{where}: refresh"
        warn_cpu_overrides(st.grpo, f"{label}.grpo")
        doms = [cfg.built_domains()[d] for d in st.mixture]
        make_grpo_config(domain_grpo_kwargs(cfg, st, doms, tempfile.gettempdir()), label)
    return cfg


# ----------------------------------------------------------------------------- forgetting metrics



# ----------------------------------------------------------------------------- the run

def _run_stage(cfg: TrainConfig, stage: StageConfig, name: str, init: Path, run: RunDir,
               domains: list[Domain]) -> None:
    """Train one GRPO stage from checkpoint `init` and save it atomically as checkpoints/<name>; its scratch
    RUN/.work/<name> (TRL's output_dir) is made fresh by the main process and removed once the stage is saved."""
    state = _dist_state(cfg)
    work = run.work / name
    if state.is_main_process:
        run.work_dir(name)  # a killed stage restarts from its initial checkpoint, with fresh scratch
    _wait_for_main(state, f"start stage {name}")
    args = make_grpo_config(domain_grpo_kwargs(cfg, stage, domains, str(work)), f"stage {name}")
    configure_threads(cfg.threads)  # GRPOConfig re-creates accelerate's state, which may reset torch's threads on CPU
    domain = domains[0]
    if stage.mixed:
        rows = mixture_rows(domains, stage.mixture, cfg.train_prompts, cfg.seed, load_tokenizer(init))
        reward: Any = mixture_rewards(domains)
    else:
        rows = domain.train_rows(domain.examples("train", cfg.train_prompts, seed=cfg.seed), load_tokenizer(init))
        reward = domain.reward_func()
    protect = stage.protect

    def callbacks(model: Any, tokenizer: Any, args: Any) -> list[Any]:
        if protect is None:
            return []
        earlier = [cfg.built_domains()[d] for d in protect.domains]
        return [protect_callback(protect, model, tokenizer, domain, args.learning_rate, stage.steps, seed=cfg.seed,
                                earlier=earlier)]

    peft = lora_config(stage.peft, name) if stage.peft is not None else None
    done = train_grpo_stage(init, rows, reward, args, run.checkpoint(name), callbacks, label=name,
                            log_dir=run.root / "logs", peft=peft,
                            adapter_to=run.root / "adapters" / name if peft is not None else None)
    if done.is_main:
        run.write_result(f"train_{name}", {"stage": name, "domain": stage.label, "steps": stage.steps,
                                           "seconds": done.seconds, "log": done.log,
                                           **({"protect": done.callbacks[0].summary()} if done.callbacks else {})})
        run.remove_work(name)  # and .work itself once empty; train_grpo_stage returns after every process is done


def domain_grpo_kwargs(cfg: TrainConfig, stage: StageConfig, domains: list[Domain],
                       output_dir: str) -> dict[str, Any]:
    """GRPOConfig arguments for a stage on `domains` (one, or a mixture's): a file domain's generation budget (the
    largest of a mixture's) and chat-template arguments apply unless the run's or the stage's `grpo:` sets them."""
    given = {**cfg.grpo, **stage.grpo}
    derived: dict[str, Any] = {}
    budgets = [d.max_new_tokens for d in domains if d.source != "builtin"]
    if budgets and "max_completion_length" not in given:
        derived["max_completion_length"] = max(budgets)
    kwargs = {json.dumps(d.chat_template_kwargs or {}, sort_keys=True) for d in domains}
    if len(kwargs) > 1 and "chat_template_kwargs" not in given:
        raise CrossrouteError(f"stage {stage.label}: its domains' chat_template_kwargs differ ({sorted(kwargs)}); "
                              "TRL renders one stage with one set: set grpo.chat_template_kwargs for the stage")
    if domains[0].chat_template_kwargs and "chat_template_kwargs" not in given:
        derived["chat_template_kwargs"] = dict(domains[0].chat_template_kwargs)
    return grpo_kwargs({**derived, **cfg.grpo}, stage.grpo, stage.steps, cfg.seed, output_dir)


def _dist_state(cfg: TrainConfig | None = None) -> Any:
    """Accelerate's process state (one process without a launcher). The first call creates the run's one process
    group (gloo on a CPU-only machine, as the trainers' use_cpu), with the run's `grpo.ddp_backend` and
    `grpo.ddp_timeout`: the barrier timeout the other processes wait under while the main one evaluates a stage.
    Every trainer then reuses that group (TRL's CPU path would create it without the timeout)."""
    import os
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    grpo = cfg.grpo if cfg is not None else {}
    kw: dict[str, Any] = {"cpu": not torch.cuda.is_available(),
                          "timeout": timedelta(seconds=int(grpo.get("ddp_timeout", 1800)))}
    if grpo.get("ddp_backend") and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        kw["backend"] = grpo["ddp_backend"]
    return PartialState(**kw)


def _evaluate_checkpoint(run: RunDir, name: str, ckpt: Path, cfg: TrainConfig, domains: list[Domain]) -> dict:
    """Evaluate a stage checkpoint once: on the main process only under a multi-process launch (the
    others wait at a barrier, then read the result file)."""
    state = _dist_state(cfg)
    records = run.results / f"eval_{name}.jsonl"
    if state.is_main_process and (run.read_result(f"eval_{name}") is None or not records.exists()):
        scores, backend = evaluate_checkpoint(ckpt, domains, cfg.eval_n, cfg.eval)
        write_records(records, scores)
        run.write_result(f"eval_{name}", {"stage": name, "checkpoint": str(ckpt), "backend": backend,
                                          **scores_json(scores)})
    _wait_for_main(state, f"evaluate {name}")  # every process reaches this once per checkpoint
    res = run.read_result(f"eval_{name}")
    if res is None:
        raise CrossrouteError(f"{run.results}: eval_{name}.json is missing after the main process evaluated it; "
                              "--out must be on a filesystem every node shares.")
    return res


def _wait_for_main(state: Any, what: str) -> None:
    """All processes meet at a barrier; when the main process failed instead (its one-line error is printed above),
    the others end with one line too, not a gloo/NCCL traceback each."""
    try:
        state.wait_for_everyone()
    except RuntimeError as e:  # torch.distributed: the peer closed the connection (DistBackendError included)
        raise CrossrouteError(f"process {state.process_index}: the main process stopped while the others waited for "
                              f"it to {what} ({str(e).splitlines()[0][:120]}); see the main process's error.") from None


def is_main_process() -> bool:
    """Whether this is the process that writes (the only one without a multi-process launch): after
    run_training, the CLI should print the forgetting table and build the report there only."""
    return bool(_dist_state().is_main_process)


def _say(cfg: TrainConfig, message: str) -> None:
    """A progress line, printed by the main process only (the others would repeat it)."""
    if _dist_state(cfg).is_main_process:
        console.print(message)


def open_train_run(cfg: TrainConfig, out: str | Path, base: Path) -> RunDir:
    """Create or reopen the run directory of `cfg` starting from checkpoint `base`.

    Only the main process opens it (it alone takes the run's lock and writes run.yaml); the others wait at a
    barrier, then use the directory it opened without opening it themselves, so they never contend for the lock."""
    state = _dist_state(cfg)
    if state.is_main_process:
        run = open_run(out, {**cfg.model_dump(), "model": str(base)}, kind="train")
    _wait_for_main(state, "open the run directory")  # a main process that refuses it exits instead
    return run if state.is_main_process else _joined_run(out)


def _joined_run(out: str | Path) -> RunDir:
    """The run directory the main process opened, as another process sees it (never opened a second time)."""
    run = RunDir(Path(out).expanduser())
    if not run.config_path.exists():
        raise CrossrouteError(f"{run.root}: no run.yaml after the main process opened the run; --out must be on a "
                              "filesystem every node shares.")
    return run


def run_training(cfg: TrainConfig, out: str | Path) -> dict[str, Any]:
    """Run (or resume) the sequence and the refresh, once or once per seed; returns the forgetting results."""
    if not cfg.seeds:
        return _run_one(cfg, out)
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise CrossrouteError(f"seeds {cfg.seeds}: give each seed once.")
    base = check_checkpoint_dir(cfg.model)
    run = open_train_run(cfg, out, base)
    with _dist_state(cfg).main_process_first():
        pinned = pin_eval_sets(run.root, list(cfg.built_domains().values()), cfg.eval_n)
    results = []
    for k in cfg.seeds:
        _say(cfg, f"[bold]seed {k}[/bold] ({cfg.seeds.index(k) + 1}/{len(cfg.seeds)})")
        one = cfg.model_copy(update={"seed": k, "seeds": None})
        one._built = {d.name: d for d in pinned}  # every seed scores the parent run's pinned prompts
        results.append(_run_one(one, run.root / "seeds" / str(k)))
    result = aggregate_seeds(results, list(cfg.seeds), [list(s.mixture) for s in cfg.stages])
    if _dist_state(cfg).is_main_process:
        run.write_result("forgetting", result)
    return result


def aggregate_seeds(results: list[dict[str, Any]], seeds: list[int], trained: list[list[str]]) -> dict[str, Any]:
    """One forgetting result from per-seed ones: the mean matrix with its summary, every paired figure per seed,
    and its mean, SD and 95 % t-interval over seeds."""
    rows, doms = results[0]["rows"], results[0]["domains"]
    matrix = [[sum(r["matrix"][i][j] for r in results) / len(results) for j in range(len(doms))]
              for i in range(len(rows))]
    refresh_row = len(rows) - 1 if rows[-1].startswith("refresh_") else None
    figures: dict[str, list[float]] = {}
    for r in results:
        paired = r["paired"]
        for d, v in paired["forgetting"].items():
            figures.setdefault(f"forgetting:{d}", []).append(v["value"])
        for stage, v in paired["own_stage_gain"].items():
            figures.setdefault(f"own_stage_gain:{stage}", []).append(v["value"])
        for d, v in (paired.get("refresh") or {}).items():
            figures.setdefault(f"refresh_change:{d}", []).append(v["value"])
        for d, v in (r.get("mixed_vs_sequential") or {}).get("difference", {}).items():
            figures.setdefault(f"mixed_minus_sequential:{d}", []).append(v["value"])
        figures.setdefault("backward_transfer", []).append(r["backward_transfer"])
        figures.setdefault("average_final", []).append(r["average_final"])
    per_seed = [{"seed": k, "matrix": r["matrix"],
                 "forgetting": {d: v["value"] for d, v in r["paired"]["forgetting"].items()},
                 "forgetting_significant": {d: v["significant"] for d, v in r["paired"]["forgetting"].items()}}
                for k, r in zip(seeds, results, strict=True)]
    out = {"rows": rows, "domains": doms, "matrix": matrix,
           **forgetting_summary(rows, matrix, doms, trained, refresh_row),
           "seeds": {"seeds": seeds, "per_seed": per_seed,
                     "aggregate": {k: {**across_seeds(v), "values": v} for k, v in figures.items()}}}
    if all("forgetting_vs_kl" in r for r in results):  # one fit over every seed's points
        out["forgetting_vs_kl"] = forgetting_vs_kl([{**p, "seed": k} for k, r in zip(seeds, results, strict=True)
                                                    for p in r["forgetting_vs_kl"]["points"]])
    return out


RUN_LEVEL_FREE = frozenset({"stages", "refresh", "mixed", "seeds", "threads"})  # fields a shared prefix may differ in


def shared_prefix(a: TrainConfig, b: TrainConfig) -> int:
    """How many leading sequence stages runs of `a` and `b` train identically: every run-level field equal (model,
    domains, eval, seed, GRPO defaults, ...) and each stage's config equal; 0 when any run-level field differs."""
    if a.model_dump(exclude=set(RUN_LEVEL_FREE)) != b.model_dump(exclude=set(RUN_LEVEL_FREE)):
        return 0
    n = 0
    for sa, sb in zip(a.stages, b.stages, strict=False):
        if sa.model_dump() != sb.model_dump():
            break
        n += 1
    return n


def reuse_prefix(src: str | Path, cfg_src: TrainConfig, cfg: TrainConfig, out: str | Path) -> list[str]:
    """Give run OUT (of `cfg`) the finished stages it shares with run SRC (of `cfg_src`, same seed): checkpoints,
    eval records, train stats, KL and logs of each leading stage that `shared_prefix` finds identical, hard-linked.
    Training is deterministic from the seed, so this is what rerunning them gives; run_training then resumes after
    them. Returns the stage names reused (the demo's protected sequence starts from the plain one's Code -> Math)."""
    n = shared_prefix(cfg_src, cfg)
    if n == 0:
        return []
    src_run, run = RunDir(Path(src)), open_train_run(cfg, out, check_checkpoint_dir(cfg.model))
    names = stage_names(cfg)[:n]
    if not all(src_run.has_checkpoint(x) for x in names):
        return []

    def take(rel: str) -> None:
        """SRC/rel linked into OUT/rel, when SRC has it and OUT does not yet."""
        if (src_run.root / rel).exists() and not (run.root / rel).exists():
            (run.root / rel).parent.mkdir(parents=True, exist_ok=True)
            atomic_link_copy(src_run.root / rel, run.root / rel)

    take(EVAL_SETS)
    take("results/eval_base.jsonl")
    take("results/eval_base.json")
    reused = []
    for name in names:
        if run.has_checkpoint(name):
            continue
        for rel in (f"results/eval_{name}.jsonl", f"results/eval_{name}.json", f"results/train_{name}.json",
                    f"results/kl_{name}.json", f"logs/{name}.jsonl"):
            take(rel)
        atomic_link_copy(src_run.checkpoint(name), run.checkpoint(name))  # last: a checkpoint marks the stage done
        reused.append(name)
    return reused


def _run_one(cfg: TrainConfig, out: str | Path) -> dict[str, Any]:
    """One seed's sequence and refresh (resumable); returns the forgetting results written to results/."""
    _dist_state(cfg)  # the process group first: on CPU, accelerate may set torch's threads when it creates it
    configure_threads(cfg.threads)
    base = check_checkpoint_dir(cfg.model)
    if cfg.judge is not None:
        check_endpoint(cfg.judge)  # a judge that is down fails here, not hours into training
    run = open_train_run(cfg, out, base)
    with _dist_state(cfg).main_process_first():  # the main process draws and writes the sets, the others read
        domains = pin_eval_sets(run.root, list(cfg.built_domains().values()), cfg.eval_n)
    by_name = {d.name: d for d in domains}
    names = stage_names(cfg)
    stages = cfg.stages + ([cfg.refresh] if cfg.refresh else [])
    evals = [_evaluate_checkpoint(run, "base", base, cfg, domains)]
    kls: dict[str, dict[str, Any] | None] = {}
    held: dict[Path, Loaded] = {}  # the last stage's model, kept for the next stage's KL
    prev = base
    last_seq = run.checkpoint(names[len(cfg.stages) - 1])
    for i, (name, st) in enumerate(zip(names, stages, strict=True)):
        init = last_seq if name.startswith("refresh_") else prev
        ckpt = run.checkpoint(name)
        if run.has_checkpoint(name):
            _say(cfg, f"[dim]stage {name}: done, skipped[/dim]")
        else:
            _say(cfg, f"[bold]stage {i + 1}/{len(stages)}: {name}[/bold] ({st.steps} GRPO steps on "
                      f"{' + '.join(st.mixture)})")
            _run_stage(cfg, st, name, init, run, [by_name[d] for d in st.mixture])
        evals.append(_evaluate_checkpoint(run, name, ckpt, cfg, domains))
        kls[name] = _stage_kl(run, name, ckpt, base, init, cfg, domains, held)
        prev = ckpt
    rows = ["base"] + names
    matrix = [[e["scores"][d] for d in cfg.domain_names] for e in evals]
    refresh_row = len(rows) - 1 if cfg.refresh else None
    trained = [list(s.mixture) for s in cfg.stages]
    per_row = [per_example_scores(read_records(run.results / f"eval_{r}.jsonl")) for r in rows]
    result = {"rows": rows, "domains": cfg.domain_names, "matrix": matrix,
              "ci": [[e.get("ci", {}).get(d) for d in cfg.domain_names] for e in evals],
              **forgetting_summary(rows, matrix, cfg.domain_names, trained, refresh_row),
              "paired": paired_summary(rows, per_row, cfg.domain_names, trained, refresh_row)}
    if cfg.mixed is not None:
        end = len(cfg.stages)
        result["mixed_vs_sequential"] = _mixed_beside(cfg, run, domains, rows[end], per_row[end], matrix[end])
    if all(kls.values()):
        result["kl"] = {"definition": KL_DEFINITION, "n": cfg.kl_n,
                        "to_base": {r: kls[r]["to_base"] for r in names},
                        "to_previous": {r: kls[r]["to_previous"] for r in names}}
        result["forgetting_vs_kl"] = forgetting_vs_kl(
            forgetting_points(rows, per_row, cfg.domain_names, trained, result["kl"]["to_previous"]))
    if _dist_state(cfg).is_main_process:
        run.write_result("forgetting", result)
    return result


def run_mixed(cfg: TrainConfig, out: str | Path, domains: list[Domain] | None = None) -> dict[str, Any]:
    """Train (or resume) the mixed-RL baseline of `cfg` in OUT/mixed: one GRPO stage from the same base on the
    sequence's mixture, scored on `domains` (the parent run's pinned prompts; None: pinned there, the same prompts,
    which never depend on the seed). Independent of the sequence, so it may run beside it (crossroute demo)."""
    if cfg.mixed is None:
        raise CrossrouteError("mixed: the train config has no mixed baseline (mixed: {} in the train YAML).")
    stage = cfg.mixed.stage(cfg.stages)
    sub = cfg.model_copy(update={"stages": [stage], "refresh": None, "mixed": None, "seeds": None})
    sub._built = {d.name: d for d in domains} if domains is not None else None
    _say(cfg, f"[bold]mixed RL beside the sequence[/bold]: {stage.steps} steps on "
              + " + ".join(f"{d} ({w:g})" for d, w in stage.mixture.items()))
    return _run_one(sub, Path(out) / "mixed")


def _mixed_beside(cfg: TrainConfig, run: RunDir, domains: list[Domain], seq_row: str, seq_scores: PerExample,
                  seq_means: list[float]) -> dict[str, Any]:
    """Train the mixed baseline in RUN/mixed (resumable, same pinned prompts) and compare its end with the end of
    the sequence per domain: mixed minus sequential, paired over the same prompts."""
    stage = cfg.mixed.stage(cfg.stages)
    mixed = run_mixed(cfg, run.root, domains)
    row = mixed["rows"][-1]
    mixed_scores = per_example_scores(read_records(run.root / "mixed" / "results" / f"eval_{row}.jsonl"))
    return {"sequential": seq_row, "mixed": f"mixed/{row}", "steps": stage.steps, "weights": stage.mixture,
            "scores": {"sequential": dict(zip(cfg.domain_names, seq_means, strict=True)),
                       "mixed": dict(zip(cfg.domain_names, mixed["matrix"][-1], strict=True))},
            "difference": compare_runs([seq_row], [seq_scores], [mixed_scores], cfg.domain_names)[seq_row]}


def _stage_kl(run: RunDir, name: str, ckpt: Path, base: Path, init: Path, cfg: TrainConfig,
              domains: list[Domain], held: dict[Path, Loaded]) -> dict[str, Any] | None:
    """Forward KL(base || stage) and KL(init || stage) on each domain's first kl_n eval prompts, once (main process;
    the others wait and read kl_<name>.json); None when kl_n is 0. `held` keeps the stage's model for the next
    stage, whose init it is (one load fewer per stage; at most two models in memory)."""
    if not cfg.kl_n:
        return None
    state = _dist_state(cfg)
    if state.is_main_process and run.read_result(f"kl_{name}") is None:
        prev = held.pop(init.resolve(), None)
        held.clear()
        model = load_model(ckpt)

        def kl_from(ref: Path, loaded: Loaded | None = None) -> dict[str, Any]:
            ref_model = (loaded or load_model(ref)).model
            return stage_kl(ref_model, model.model, model.tokenizer, domains, cfg.kl_n, cfg.seed)

        to_prev = kl_from(init, prev)
        del prev
        to_base = to_prev if init.resolve() == base.resolve() else kl_from(base)
        held[ckpt.resolve()] = model
        run.write_result(f"kl_{name}", {"stage": name, "previous": str(init), "definition": KL_DEFINITION,
                                        "to_base": to_base, "to_previous": to_prev})
    _wait_for_main(state, f"measure the KL of {name}")
    return run.read_result(f"kl_{name}")


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
