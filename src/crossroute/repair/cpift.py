"""`crossroute cpift`: Core Parameter Isolation Fine-Tuning against mixed and sequential SFT (DESIGN.md 3.3).

1. Probe: a short SFT per task from the same base θ0; core region C_i = global top-p % of |θ_i − θ0|
   over all parameters, saved as sorted int64 flat indices per tensor (cores/<task>.safetensors).
2. Group: tasks whose cores overlap with Jaccard ≥ τ are linked; groups = connected components.
3. Transplant: every task's core entries go into the base; an entry in two cores takes the task
   with the larger |θ_i − θ0| (ties: the earlier task); the collision count is reported.
4. SLERP: each non-core entry is the AVERAGE over tasks of SLERP(θ0, θ_i, ω), computed per tensor on
   the vector of its non-core entries (order-independent; linear when nearly colinear).
   Steps 3-4 start from the base θ0 (the brief's order), not from a multi-stage model.
5. Pipeline: a short SFT per group in order, the cores of all earlier groups frozen by a gradient
   mask (zeroed gradients plus restore after each step: bit-identical).
Baselines from the same base: mixed SFT over all tasks (steps × tasks) and sequential SFT (steps
per task, in config order): the same total steps as the probes.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from crossroute.analyze.forgetting import per_example_scores
from crossroute.core.config import MAX_EVAL_N, MAX_TRAIN_PROMPTS, load_yaml_mapping, validate_config
from crossroute.core.console import console
from crossroute.core.rundir import RunDir, open_run
from crossroute.core.threads import configure_threads
from crossroute.domains.domain import Domain
from crossroute.domains.evalset import pin_eval_sets
from crossroute.domains.files import build_domains, domains_field, get_domain, rebase_domains
from crossroute.domains.spec import DomainSpec
from crossroute.measure.evaluate import EvalProtocol, evaluate_checkpoint
from crossroute.measure.stats import paired_by_key, paired_diff
from crossroute.model.load import check_checkpoint_dir, load_model
from crossroute.repair.merge import (
    DEFAULT_EPS,
    core_masks,
    load_index_masks,
    mask_jaccard,
    save_index_masks,
    slerp_flagged,
    stream_merge,
    transplant_cores,
)
from crossroute.train.sft import make_sft_config, sft_kwargs, sft_train

METHODS = ("base", "mixed_sft", "sequential_sft", "cpift")


class CpiftConfig(BaseModel):
    """A CPI-FT comparison run (see configs/cpift_default.yaml for every field documented)."""

    model_config = ConfigDict(extra="forbid")

    model: str = "default"
    # Domains declared by name (spec mappings, spec files or data files, as in a train config); a task that is
    # not declared here is resolved as a built-in name, a file or NAME=PATH.
    domains: dict[str, DomainSpec | str] = Field(default_factory=dict)
    tasks: list[str] = Field(default_factory=lambda: ["math", "code", "qa", "cw"])
    eval_n: int = Field(100, gt=0, le=MAX_EVAL_N)
    eval: EvalProtocol = Field(default_factory=EvalProtocol)
    train_prompts: int = Field(2000, gt=0, le=MAX_TRAIN_PROMPTS)
    seed: int = 0
    threads: int | None = Field(None, gt=0)
    steps: int = Field(40, gt=0, description="SFT steps per task (probes, sequential stages); mixed gets steps x tasks")
    pipeline_steps: int = Field(20, gt=0, description="SFT steps per group in CPI-FT's pipeline")
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(32, gt=0)
    core_percent: float = Field(1.0, gt=0, le=100)
    tau: float = Field(0.1, ge=0, le=1)
    omega: float = Field(0.5, ge=0, le=1)
    slerp_eps: float = Field(DEFAULT_EPS, gt=0, lt=1)
    fusion: Literal["task_vector_slerp", "raw_slerp"] = Field(
        "task_vector_slerp", description="SLERP between task vectors theta_i - theta_0 (raw weights of a base and "
        "its fine-tune are colinear, so raw SLERP is plain interpolation), or raw-weight SLERP with the base")
    fuse_from: Literal["base", "sequential_sft"] = Field(
        "base", description="the model fusion starts from: theta_0, or the final multi-stage (sequential SFT) "
        "model, whose task vector is SLERPed with the tasks' by omega")
    sft: dict[str, Any] = Field(default_factory=dict)
    _built: list[Domain] | None = PrivateAttr(None)

    @field_validator("tasks")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError("CPI-FT needs at least two tasks")
        if len(set(v)) != len(v):
            raise ValueError("tasks must be distinct")
        return v

    @field_validator("domains", mode="before")
    @classmethod
    def _domains_form(cls, v: Any) -> Any:
        return domains_field(v) if v else {}

    @model_validator(mode="after")
    def _tasks_resolve(self) -> CpiftConfig:
        self.task_domains()
        return self

    def task_domains(self) -> list[Domain]:
        """Each task's Domain: a declared one by name, else a built-in name, file or NAME=PATH (built once)."""
        if self._built is None:
            declared = build_domains(self.domains)
            self._built = [declared[t] if t in declared else get_domain(t) for t in self.tasks]
        return self._built


def parse_cpift_config(raw: dict[str, Any], where: str = "config") -> CpiftConfig:
    """Validate a mapping (pydantic, then the SFTConfig it implies); errors name the field."""
    cfg = validate_config(CpiftConfig, raw, where, "tasks")
    make_sft_config(sft_kwargs(cfg.sft, cfg.steps, tempfile.gettempdir(), cfg.seed, cfg.learning_rate,
                               cfg.batch_size, where=f"{where}: sft"), where)
    return cfg


def load_cpift_config(path: str | Path) -> CpiftConfig:
    """Read and validate a CPI-FT YAML before any training."""
    raw = load_yaml_mapping(path, "configs/cpift_default.yaml", "model, tasks, steps")
    if raw.get("domains"):  # relative data paths are the config file's
        raw["domains"] = rebase_domains(raw["domains"], Path(path).expanduser().resolve().parent)
    return parse_cpift_config(raw, str(Path(path).expanduser()))


# ----------------------------------------------------------------------------- pieces

def group_tasks(jaccard: list[list[float]], tau: float) -> list[list[int]]:
    """Connected components of the graph linking tasks i, j with Jaccard ≥ tau; ordered by first member."""
    n = len(jaccard)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if jaccard[i][j] >= tau:
                parent[find(j)] = find(i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def _angle_deg(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """The angle between two flat vectors in degrees (None when one is zero)."""
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    if na == 0.0 or nb == 0.0:
        return None
    cos = max(-1.0, min(1.0, float(torch.dot(a, b)) / (na * nb)))
    return math.degrees(math.acos(cos))


def fuse_task_vectors(taus: list[torch.Tensor], omega: float, eps: float) -> tuple[torch.Tensor, list[float | None],
                                                                                     int]:
    """One task vector from several by SLERP: two tasks SLERP(tau_1, tau_2, omega); more tasks incrementally,
    tau = SLERP(tau, tau_i, 1/i), every task weighted equally. Returns it, each step's angle, linear fallbacks."""
    acc = taus[0].float()
    angles: list[float | None] = []
    fallback = 0
    for i, tau in enumerate(taus[1:], start=2):
        t = omega if len(taus) == 2 else 1.0 / i
        angles.append(_angle_deg(acc, tau.float()))
        acc, lin = slerp_flagged(acc, tau.float(), t, eps)
        fallback += int(lin)
    return acc, angles, fallback


def _angle_summary(angles: list[float]) -> dict[str, float | int | None]:
    """Mean, min, median and max of per-tensor angles in degrees."""
    if not angles:
        return {"n": 0, "mean": None, "min": None, "median": None, "max": None}
    xs = sorted(angles)
    return {"n": len(xs), "mean": round(sum(xs) / len(xs), 3), "min": round(xs[0], 3),
            "median": round(xs[len(xs) // 2], 3), "max": round(xs[-1], 3)}


def fuse(base: str | Path, task_models: list[Path], cores: list[dict[str, torch.Tensor]], out: str | Path,
         omega: float, eps: float = DEFAULT_EPS, fusion: str = "task_vector_slerp",
         start: Path | None = None) -> dict[str, Any]:
    """Steps 3-4, streaming: core entries transplanted; non-core entries fused by `fusion`:

    task_vector_slerp: theta_0 + SLERP of the task vectors theta_i - theta_0 (fuse_task_vectors); with `start`
    (the final multi-stage model theta_S), theta_0 + SLERP(theta_S - theta_0, that vector, omega).
    raw_slerp: the mean over tasks of SLERP(theta_0, theta_i, omega) on raw weights (nearly always a linear
    fallback: the vectors are colinear). Angles between the SLERPed vectors are reported per tensor."""
    collisions = moved = fallback = n_tensors = 0
    angles: list[float] = []
    start_angles: list[float] = []
    k = len(task_models)

    def fn(name: str, a: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
        nonlocal collisions, moved, fallback, n_tensors
        rest, start_t = models[:k], (models[k] if start is not None else None)
        idx = [c.get(name) for c in cores]
        flat = a.reshape(-1)
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        for i in idx:
            if i is not None:
                keep[i] = False
        base_k = flat[keep].float()
        if fusion == "raw_slerp":
            acc = torch.zeros(int(keep.sum()), dtype=torch.float32)
            for r in rest:
                angle = _angle_deg(base_k, r.reshape(-1)[keep].float())
                if angle is not None:
                    angles.append(angle)
                s, lin = slerp_flagged(base_k, r.reshape(-1)[keep], omega, eps)
                acc += s
                fallback += int(lin)
            mixed_k = acc / len(rest)
        else:
            taus = [r.reshape(-1)[keep].float() - base_k for r in rest]
            tau, step_angles, fb = fuse_task_vectors(taus, omega, eps)
            angles.extend(x for x in step_angles if x is not None)
            fallback += fb
            if start_t is not None:
                tau_s = start_t.reshape(-1)[keep].float() - base_k
                angle = _angle_deg(tau_s, tau)
                if angle is not None:
                    start_angles.append(angle)
                tau, lin = slerp_flagged(tau_s, tau, omega, eps)
                fallback += int(lin)
            mixed_k = base_k + tau
        n_tensors += 1
        mixed = flat.clone()
        mixed[keep] = mixed_k.to(flat.dtype)
        res, c, m = transplant_cores(mixed, rest, idx)
        # the collision rule compares |θ_i − θ0| with θ0, not with the SLERP-mixed value
        collisions += c
        moved += m
        return res.view(a.shape)

    stream_merge(base, [*task_models, *([start] if start is not None else [])], out, fn)
    mode = ("SLERP between task vectors theta_i - theta_0" + (" (incremental, equal weights)" if len(task_models) > 2
                                                               else f" (omega {omega:g})")
            if fusion == "task_vector_slerp" else "raw-weight SLERP with the base, averaged over tasks")
    out_stats: dict[str, Any] = {
        "collisions": collisions, "transplanted": moved, "slerp_tensors": n_tensors,
        "slerp_pairs_linear_fallback": fallback, "omega": omega, "fusion": fusion, "slerp_mode": mode,
        "angles_deg": _angle_summary(angles), "fuse_from": "sequential_sft" if start is not None else "base",
        "collision_rule": "larger |theta_i - theta_0| wins; ties: the earlier task"}
    if start is not None:
        out_stats["start"] = str(start)
        out_stats["start_angles_deg"] = _angle_summary(start_angles)
    return out_stats


def freeze_mask_for(model_path: Path, cores: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Bool masks (True = frozen) of the union of `cores`, shaped like the model's parameters."""
    model = load_model(model_path).model
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for core in cores:
        for name, idx in core.items():
            if name not in params:
                continue  # e.g. a tied lm_head stored under another name
            m = out.setdefault(name, torch.zeros(params[name].numel(), dtype=torch.bool))
            m[idx] = True
    return {k: v.view(params[k].shape) for k, v in out.items()}


# ----------------------------------------------------------------------------- the run

class _Runner:
    def __init__(self, cfg: CpiftConfig, run: RunDir, base: Path) -> None:
        self.cfg, self.run, self.base = cfg, run, base
        self.domains = pin_eval_sets(run.root, cfg.task_domains(), cfg.eval_n)
        self.train_log: dict[str, Any] = run.read_result("cpift_train") or {}
        self.per_example: dict[str, dict[str, dict[str, float]]] = {}

    def sft(self, name: str, init: Path, domains: list[Domain], steps: int,
            freeze: dict[str, torch.Tensor] | None = None) -> Path:
        ckpt = self.run.checkpoint(name)
        if self.run.has_checkpoint(name):
            console.print(f"[dim]{name}: done, skipped[/dim]")
            return ckpt
        console.print(f"[bold]{name}[/bold]: {steps} SFT steps on {'+'.join(d.name for d in domains)}"
                      + (f", {sum(int(m.sum()) for m in freeze.values())} entries frozen" if freeze else ""))
        stats = sft_train(init, domains, steps, self.cfg.learning_rate, self.cfg.batch_size, ckpt, seed=self.cfg.seed,
                          freeze_mask=freeze, train_prompts=self.cfg.train_prompts, sft=self.cfg.sft,
                          log_dir=self.run.root / "logs")
        stats.pop("log", None)
        self.train_log[name] = stats
        self.run.write_result("cpift_train", self.train_log)
        return ckpt

    def evaluate(self, ckpt: Path) -> dict[str, float]:
        """Each task's score on `ckpt`; every example's score is kept (self.per_example) for paired tests."""
        scores, _ = evaluate_checkpoint(ckpt, self.domains, self.cfg.eval_n, self.cfg.eval)
        self.per_example[str(ckpt)] = per_example_scores([r for v in scores.values() for r in v.records])
        return {k: v.score for k, v in scores.items()}

    def paired(self, a: Path, b: Path) -> dict[str, dict[str, Any]]:
        """Per task, b minus a over the same eval prompts: paired bootstrap CI and p-value."""
        pa, pb = self.per_example[str(a)], self.per_example[str(b)]
        return {t: paired_diff(*paired_by_key(pa[t], pb.get(t, {}))).to_json() for t in pa}


def sequential(r: _Runner, base: Path, doms: list[Domain], steps: int) -> Path:
    """The sequential-SFT baseline (one task after another, resumable); returns its final checkpoint."""
    prev = base
    for i, d in enumerate(doms):
        prev = r.sft(f"seq_{i + 1:02d}_{d.name}", prev, [d], steps)
    return prev


def run_cpift_config(cfg: CpiftConfig, out: str | Path) -> dict[str, Any]:
    """Run (or resume) probes, grouping, fusion, pipeline and both baselines; write results/cpift.json."""
    configure_threads(cfg.threads)
    t_start = time.perf_counter()
    base = check_checkpoint_dir(cfg.model)
    run = open_run(out, {**cfg.model_dump(), "model": str(base)}, kind="cpift")
    r = _Runner(cfg, run, base)
    tasks, doms = cfg.tasks, r.domains
    seconds: dict[str, float] = {}

    # (1) probes and core regions
    t0 = time.perf_counter()
    probes = [r.sft(f"probe_{t}", base, [d], cfg.steps) for t, d in zip(tasks, doms, strict=True)]
    cores: list[dict[str, torch.Tensor]] = []
    core_stats: dict[str, Any] = {}
    (run.root / "cores").mkdir(exist_ok=True)
    for t, p in zip(tasks, probes, strict=True):
        path = run.root / "cores" / f"{t}.safetensors"
        masks, st = core_masks(base, p, cfg.core_percent)
        save_index_masks(masks, path)
        cores.append(load_index_masks(path))
        core_stats[t] = st
    # (2) grouping
    jac = [[mask_jaccard(a, b) for b in cores] for a in cores]
    groups_idx = group_tasks(jac, cfg.tau)
    groups = [[tasks[i] for i in g] for g in groups_idx]
    console.print("core overlap (Jaccard):\n" + _matrix_text(jac, tasks)
                  + f"\ngroups (Jaccard >= {cfg.tau}): " + " | ".join("+".join(g) for g in groups))
    # (3-4) transplant + SLERP
    fused = run.checkpoint("fused")
    fuse_stats = run.read_result("cpift_fuse")
    start = sequential(r, base, doms, cfg.steps) if cfg.fuse_from == "sequential_sft" else None
    if fuse_stats is None or not run.has_checkpoint("fused"):
        fuse_stats = fuse(base, probes, cores, fused, cfg.omega, cfg.slerp_eps, cfg.fusion, start)
        run.write_result("cpift_fuse", fuse_stats)
    console.print(f"fused: {fuse_stats['transplanted']} core entries transplanted, "
                  f"{fuse_stats['collisions']} in two or more cores")
    # (5) pipeline over groups, earlier groups' cores frozen
    prev = fused
    for g, members in enumerate(groups_idx):
        earlier = [cores[i] for gg in groups_idx[:g] for i in gg]
        freeze = freeze_mask_for(prev, earlier) if earlier else None
        prev = r.sft(f"cpift_{g + 1:02d}_{'+'.join(tasks[i] for i in members)}", prev,
                     [doms[i] for i in members], cfg.pipeline_steps, freeze)
    cpift_final = prev
    seconds["cpift"] = round(time.perf_counter() - t0, 1)

    # baselines
    t0 = time.perf_counter()
    mixed = r.sft("mixed_sft", base, doms, cfg.steps * len(tasks))
    seconds["mixed_sft"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    prev = sequential(r, base, doms, cfg.steps)
    seconds["sequential_sft"] = round(time.perf_counter() - t0, 1)

    # evaluation
    t0 = time.perf_counter()
    ckpts = {"base": base, "mixed_sft": mixed, "sequential_sft": prev, "cpift": cpift_final}
    scores = {m: r.evaluate(c) for m, c in ckpts.items()}
    extra = {f"probe_{t}": r.evaluate(p) for t, p in zip(tasks, probes, strict=True)}
    extra["fused"] = r.evaluate(fused)
    seconds["eval"] = round(time.perf_counter() - t0, 1)
    seconds["total"] = round(time.perf_counter() - t_start, 1)

    steps = {"base": 0, "mixed_sft": cfg.steps * len(tasks), "sequential_sft": cfg.steps * len(tasks),
             "cpift": cfg.steps * len(tasks) + cfg.pipeline_steps * len(groups)}
    avg = {m: round(sum(s.values()) / len(s), 4) for m, s in scores.items()}
    trained = [m for m in METHODS if m != "base"]
    result: dict[str, Any] = {
        "model": str(base), "domains": tasks, "methods": list(METHODS),
        "scores": scores, "average": avg, "steps": steps, "seconds": seconds,
        "best": max(trained, key=avg.__getitem__), "lowest": min(trained, key=avg.__getitem__),
        "core": {"percent": cfg.core_percent, "per_task": core_stats, "jaccard": jac, "tau": cfg.tau,
                 "groups": groups, "files": {t: f"cores/{t}.safetensors" for t in tasks}},
        "fuse": fuse_stats, "intermediate_scores": extra,
        "order": f"probes -> cores -> groups -> transplant + {fuse_stats.get('slerp_mode', 'SLERP')} from "
                 f"{fuse_stats.get('fuse_from', 'base')} -> pipeline SFT per group (earlier groups' cores frozen)",
        "config": cfg.model_dump(),
    }
    # CPI-FT minus each baseline, per task, paired over the same prompts (CI, McNemar / sign-flip p).
    result["cpift_vs"] = {m: r.paired(ckpts[m], ckpts["cpift"]) for m in ("base", "mixed_sft", "sequential_sft")}
    result["claim"] = {"mixed_lowest": result["lowest"] == "mixed_sft", "cpift_best": result["best"] == "cpift"}
    run.write_result("cpift", result)
    console.print(_table_text(result))
    return result


def run_cpift(config_path: str | Path, out: str | Path) -> dict[str, Any]:
    """CLI entry: `crossroute cpift CONFIG.yaml --out RUN_DIR`."""
    return run_cpift_config(load_cpift_config(config_path), out)


# ----------------------------------------------------------------------------- rendering

def _matrix_text(m: list[list[float]], labels: list[str]) -> str:
    w = max(len(x) for x in labels) + 1
    lines = [" " * w + "".join(f"{x:>8}" for x in labels)]
    lines += [f"{a:<{w}}" + "".join(f"{v:8.3f}" for v in row) for a, row in zip(labels, m, strict=True)]
    return "\n".join(lines)


def _table_text(res: dict[str, Any]) -> str:
    doms = res["domains"]
    lines = [f"{'method':<16}" + "".join(f"{d:>9}" for d in doms) + f"{'avg':>9}{'steps':>7}"]
    for m in res["methods"]:
        lines.append(f"{m:<16}" + "".join(f"{res['scores'][m][d]:9.2f}" for d in doms)
                     + f"{res['average'][m]:9.2f}{res['steps'][m]:7d}")
    return "\n".join(lines)


