"""`crossroute demo`: the whole pipeline on the embedded default over several training seeds, each part resuming.

Every seed is a full single-seed demo run in OUT/seeds/<k>/; its parts (mixed RL, the sequence, diagnosis, repair,
the protected sequence, CPI-FT, RL vs SFT) form a small task graph run by a pool of one-thread processes, one per
core. OUT then holds the across-seed forgetting result, the parts' costs (results/demo.json) and the report, whose
summary gives every figure as a mean with its 95 % t-interval across the seeds.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossroute.analyze.forgetting import compare_runs, per_example_scores
from crossroute.core.console import console
from crossroute.core.errors import CrossrouteError
from crossroute.core.rundir import RunDir, open_run
from crossroute.experiments.sequence import (
    TrainConfig,
    load_train_config,
    open_train_run,
    run_checkpoints,
    run_training,
)
from crossroute.measure.rescore import read_records
from crossroute.model.default import ASSETS
from crossroute.model.presets import Preset, get_preset, require_device
from crossroute.report.build import build_report

DEMO_CONFIG = ASSETS / "demo_sequence.yaml"  # identical to configs/default_sequence.yaml (a test checks)
CPIFT_CONFIG = ASSETS / "cpift_default.yaml"  # identical to configs/cpift_default.yaml (a test checks)
PROTECT_CONFIG = ASSETS / "protected_sequence.yaml"  # identical to configs/protected_sequence.yaml


DEMO_SEEDS = (0, 1, 2)  # training seeds of `crossroute demo`: every summary figure gets a t-interval over them
QUICK_SEED = 0
DEMO_DAMAGE_K = 10  # top eigenpairs of H_A per later domain: the summary reads the shares at r <= 5
DEMO_DAMAGE_N = 32  # examples behind each HVP of the damage decomposition (the command's default: 64)
DEMO_CIRCUIT_N = 32  # clean/corrupted pairs per domain for RL vs SFT's circuits (the command's default: 64)
QUICK_KL_N = 16  # `--quick`: fewer KL prompts; the quick pass skips mixed RL and every part after diagnosis
REFERENCE_SEED_COST: dict[str, float] = {  # priorities (rough one-thread seconds of the previous demo's parts): the
    # scheduler starts long chains first; the measured 3-seed demo (RESULTS.md) ran with these
    "mixed": 150, "sequence": 185, "diagnosis": 15, "repair": 110, "protected": 110, "cpift": 110, "rl_vs_sft": 100}


def repair_target(cfg: TrainConfig) -> tuple[str, int, list[str]]:
    """The domain the demo diagnoses and repairs (the refresh's, else the first stage's), the index of its stage
    and the domains trained after it: in the seed's Code -> Math -> QA -> CW, math at stage 1 and [qa, cw]."""
    target = cfg.refresh.domain if cfg.refresh else cfg.stages[0].label
    i = next(k for k, st in enumerate(cfg.stages) if st.domain == target)
    return target, i, [d for st in cfg.stages[i + 1:] for d in st.mixture]


def rollback_pair(later: list[str]) -> list[str]:
    """The later domain(s) rollback must not hurt: qa (the seed's Math-QA pair) when it follows, else all later."""
    return ["qa"] if "qa" in later else later


@dataclass(frozen=True)
class SeedJob:
    """One seed's demo run: where it lives and what it runs (picklable: the pool's processes rebuild configs)."""

    root: str
    seed: int
    sequence: str = str(DEMO_CONFIG)  # the preset's train config
    eval_n: int | None = None
    quick: bool = False
    model: str | None = None  # a base pretrained by the demo (presets without a shipped checkpoint)

    def config(self) -> TrainConfig:
        """The preset's train config for this seed (the quick pass: no mixed RL, fewer KL prompts)."""
        cfg = load_train_config(self.sequence)
        update: dict[str, Any] = {"seed": self.seed}
        if self.eval_n is not None:
            update["eval_n"] = self.eval_n
        if self.model is not None:
            update["model"] = self.model
        if self.quick:
            update.update(mixed=None, kl_n=min(cfg.kl_n, QUICK_KL_N))
        return cfg.model_copy(update=update)


def part_mixed(job: SeedJob) -> None:
    """Mixed RL from the base with the sequence's total steps (RUN/mixed), beside the sequence."""
    from crossroute.experiments.sequence import run_mixed
    from crossroute.model.load import check_checkpoint_dir

    cfg = job.config()
    if cfg.mixed is not None:
        open_train_run(cfg, job.root, check_checkpoint_dir(cfg.model))  # the seed's run holds RUN/mixed
        run_mixed(cfg, job.root)


def part_sequence(job: SeedJob) -> None:
    """The sequence and its refresh (resuming the mixed run when it is done), and the forgetting table."""
    from crossroute.report.console import print_forgetting

    print_forgetting(run_training(job.config(), job.root))


def part_diagnosis(job: SeedJob, probe: str = "qa") -> None:
    """Diagnosis I on the finished sequence: update anatomy as stored and in bf16 storage, active routes, and
    module-level conflict right after the repaired domain's stage."""
    from crossroute.analyze.conflict import conflict_result_name, run_conflict
    from crossroute.analyze.diff import diff_sequence, write_diff_results
    from crossroute.analyze.routes import run_routes

    run, cfg = RunDir(Path(job.root)), job.config()
    target, stage, _ = repair_target(cfg)
    ckpts, names = run_checkpoints(run)
    for storage in (None, "bfloat16"):
        name = "diff" if storage is None else f"diff_{storage}"
        if run.read_result(name) is None:
            data = diff_sequence(ckpts, progress=True, storage=storage).to_json()
            data["stage_names"] = names[1:]
            write_diff_results(data, run.root, name=name)
    if run.read_result("routes") is None:
        run_routes(ckpts[0], cfg.domain_names, run_dir=run.root, show_progress=True)
    if run.read_result(conflict_result_name(target, probe)) is None:
        run_conflict(ckpts[stage + 1], target, probe, run_dir=run.root, show_progress=True)


def part_repair(job: SeedJob) -> None:
    """Diagnosis II and repair of the target: second-order damage, then rollback at the seed's budgets (with its
    random and magnitude baselines) beside the refresh."""
    from crossroute.analyze.damage import run_damage
    from crossroute.repair.rollback import SEED_FULL_AT, run_rollback

    run, cfg = RunDir(Path(job.root)), job.config()
    target, stage, later = repair_target(cfg)
    ckpts, names = run_checkpoints(run)
    last = len(names) - 1  # run_checkpoints: base and the sequence's stages, no refresh
    if run.read_result(f"damage_{target}") is None:
        run_damage(ckpts[stage + 1], ckpts[last], target, later=later, run_dir=run.root, seed=job.seed,
                   k=DEMO_DAMAGE_K, n=DEMO_DAMAGE_N)
    if run.read_result(f"rollback_{target}") is None:
        run_rollback(ckpts[last], ckpts[stage + 1], target, rollback_pair(later), run_dir=run.root,
                     eval_n=cfg.eval_n, full_at=SEED_FULL_AT, seed=job.seed)
    rb, fg = run.read_result(f"rollback_{target}"), run.read_result("forgetting")
    best, ref = (rb or {}).get("best") or {}, (fg or {}).get("refresh") or {}
    if best and ref:
        console.print(f"repair of {target}: rollback {best['variant']}/{best['selector']} {best['fraction']} % "
                      f"({best['n_units']} units, no training) recovers {100 * (best['recovery'] or 0):.0f} %; "
                      f"refresh ({ref['after'] - ref['before']:+.1f} points) recovers "
                      f"{100 * (ref['recovery_share'] or 0):.0f} %")


def part_protected(job: SeedJob) -> None:
    """The same sequence with the target's conflict units frozen in the later stages, compared paired with the
    unprotected run; its first stages are the unprotected run's (identical config and seed: reused, not retrained)."""
    from crossroute.experiments.sequence import reuse_prefix

    run = RunDir(Path(job.root))
    if run.read_result("forgetting_protected") is not None:
        return
    cfg = load_train_config(PROTECT_CONFIG).model_copy(update={"seed": job.seed, **_job_overrides(job)})
    reused = reuse_prefix(run.root, job.config(), cfg, run.root / "protected")
    if reused:
        console.print(f"protected sequence: stages {', '.join(reused)} are the unprotected run's (same config)")
    protected = run_training(cfg, run.root / "protected")
    plain = run.read_result("forgetting")
    if plain is not None and plain["rows"] == protected["rows"]:
        def records(root: Path) -> list:
            return [per_example_scores(read_records(root / "results" / f"eval_{r}.jsonl")) for r in plain["rows"]]

        protected["vs_unprotected"] = compare_runs(plain["rows"], records(run.root), records(run.root / "protected"),
                                                   plain["domains"])
    run.write_result("forgetting_protected", protected)


def _job_overrides(job: SeedJob) -> dict[str, Any]:
    return {k: v for k, v in (("eval_n", job.eval_n), ("model", job.model)) if v is not None}


def part_cpift(job: SeedJob) -> None:
    """CPI-FT (core transplant + SLERP + SFT with frozen cores) vs mixed and sequential SFT."""
    from crossroute.repair.cpift import load_cpift_config, run_cpift_config

    run = RunDir(Path(job.root))
    if run.read_result("cpift") is None:
        cfg = load_cpift_config(CPIFT_CONFIG).model_copy(update={"seed": job.seed, **_job_overrides(job)})
        run.write_result("cpift", run_cpift_config(cfg, run.root / "cpift"))


def part_rl_vs_sft(job: SeedJob) -> None:
    """RL vs SFT from the base on the target (RL with the sequence's GRPO settings): forgetting, forward KL to the
    base, circuit retention."""
    from crossroute.experiments.rl_vs_sft import run_rl_vs_sft

    run = RunDir(Path(job.root))
    if run.read_result("rl_vs_sft") is None:
        cfg = job.config()
        run_rl_vs_sft(cfg.model, repair_target(cfg)[0], run.root, seed=job.seed, grpo=dict(cfg.grpo),
                      kl_n=cfg.kl_n, circuit_n=DEMO_CIRCUIT_N,
                      **({"eval_n": job.eval_n} if job.eval_n is not None else {}))


@dataclass(frozen=True)
class Part:
    """One part of a seed's demo: its function and the parts it needs finished first."""

    name: str
    run: Callable[[SeedJob], None]
    needs: tuple[str, ...] = ()
    what: str = ""


PARTS: tuple[Part, ...] = (
    Part("mixed", part_mixed, (), "mixed RL from the base, the sequence's total steps"),
    Part("sequence", part_sequence, ("mixed",), "sequence + refresh, eval and KL after every stage"),
    Part("diagnosis", part_diagnosis, ("sequence",), "update anatomy (fp32 and bf16), routes, conflict"),
    Part("repair", part_repair, ("diagnosis",), "second-order damage, rollback at the seed's budgets"),
    Part("protected", part_protected, ("sequence",), "protected sequence (freeze the target's conflict units)"),
    Part("cpift", part_cpift, (), "CPI-FT vs mixed and sequential SFT"),
    Part("rl_vs_sft", part_rl_vs_sft, (), "RL vs SFT: forgetting, forward KL, circuit retention"),
)
QUICK_PARTS = ("sequence", "diagnosis")
SHORT_PARTS = ("sequence", "diagnosis", "repair")  # presets without full_demo (gpu)


def parts_for(preset: Preset, quick: bool) -> list[Part]:
    """The parts a demo runs: all for the default preset, the first look with --quick, the short demo otherwise."""
    names = QUICK_PARTS if quick else (tuple(p.name for p in PARTS) if preset.full_demo else SHORT_PARTS)
    return [p for p in PARTS if p.name in names]


def _chain_cost(part: Part, parts: list[Part]) -> float:
    """The part's cost plus the longest chain of parts waiting on it (the scheduler's priority)."""
    after = [p for p in parts if part.name in p.needs]
    return REFERENCE_SEED_COST.get(part.name, 60) + max((_chain_cost(p, parts) for p in after), default=0.0)


def _run_part(name: str, job: SeedJob, log: str | None) -> float:
    """Run one part in this process, its output to `log` (a pool process) or the terminal; returns its seconds."""
    from crossroute.core.rundir import release_all

    part = next(p for p in PARTS if p.name == name)
    t0 = time.perf_counter()
    try:
        with _output_to(log):
            part.run(job)
    finally:
        if log is not None:
            release_all()  # a pool process: the runs it opened are free for the next part, in any process
    return round(time.perf_counter() - t0, 1)


@contextlib.contextmanager
def _output_to(log: str | None) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors, so rich, TRL and C code too) to `log`."""
    if log is None:
        yield
        return
    import sys

    Path(log).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def _pool_init() -> None:
    """A pool process: one torch thread (the pool runs one process per core)."""
    from crossroute.core.threads import configure_threads

    configure_threads(1)


def run_parts(jobs: list[SeedJob], parts: list[Part], workers: int, logs: Path | None = None) -> list[dict[str, Any]]:
    """Run every (seed, part) once its needs are done: in this process when `workers` is 1, else on a pool of
    `workers` one-thread processes (longest remaining chain first), each part's output in LOGS/seed<k>_<part>.log.
    Returns each part's seconds (resumed parts cost their reading); the first failure stops the pool and is raised
    here."""
    from crossroute.core.console import progress_bar

    todo = [(j, p) for j in jobs for p in parts]
    todo.sort(key=lambda t: (-_chain_cost(t[1], parts), t[0].seed))
    names = {p.name for p in parts}
    done: set[tuple[int, str]] = set()
    costs: list[dict[str, Any]] = []

    def ready(t: tuple[SeedJob, Part]) -> bool:
        return all((t[0].seed, n) in done for n in t[1].needs if n in names)

    if workers <= 1:
        from crossroute.core.threads import configure_threads, current_policy

        if current_policy().get("source") == "cores":  # not the user's choice: the parts run best on one thread
            configure_threads(1)
        for job, part in todo:  # the sorted order respects needs: a part's chain outweighs its followers'
            console.print(f"[bold]{part.name}[/bold] (seed {job.seed}): {part.what}")
            costs.append({"seed": job.seed, "part": part.name, "seconds": _run_part(part.name, job, None)})
        return costs
    ctx = multiprocessing.get_context("spawn")
    running: dict[Future, tuple[SeedJob, Part, Path]] = {}
    with (_one_thread_children(), ProcessPoolExecutor(workers, mp_context=ctx, initializer=_pool_init) as pool,
          progress_bar() as bar):
        task = bar.add_task(f"demo: {len(jobs)} seeds x {len(parts)} parts on {workers} processes", total=len(todo))
        try:
            while todo or running:
                for t in [t for t in todo if ready(t)][:max(0, workers - len(running))]:
                    todo.remove(t)
                    job, part = t
                    log = (logs or Path(job.root).parent) / f"seed{job.seed}_{part.name}.log"
                    running[pool.submit(_run_part, part.name, job, str(log))] = (job, part, log)
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in finished:
                    job, part, log = running.pop(f)
                    try:
                        seconds = f.result()  # a part's CrossrouteError (one line) stops the demo here
                    except BrokenProcessPool:
                        raise CrossrouteError(f"seed {job.seed}, {part.name}: its process died (out of memory, or "
                                              f"killed); see {log}. Rerun to resume.") from None
                    done.add((job.seed, part.name))
                    costs.append({"seed": job.seed, "part": part.name, "seconds": seconds})
                    bar.update(task, advance=1)
                    console.print(f"seed {job.seed}: {part.name} done ({seconds:.0f} s; log {log})")
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return costs


@contextlib.contextmanager
def _one_thread_children() -> Iterator[None]:
    """Start pool processes with one OpenMP/torch thread each (inherited environment), restoring this process's."""
    keys = ("OMP_NUM_THREADS", "CROSSROUTE_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pretrain_base(preset: Preset, run: RunDir) -> Path:
    """For a preset without a shipped checkpoint: pretrain it into RUN/checkpoints/base (once); returns its path."""
    from crossroute.core.atomic import atomic_write_json
    from crossroute.train.pretrain import PretrainConfig, pretrain

    base = run.checkpoint("base")
    if run.has_checkpoint("base"):
        console.print("[dim]pretrain: done, skipped[/dim]")
        return base
    pcfg = PretrainConfig.for_preset(preset)
    console.print(f"[bold]pretrain[/bold] preset {preset.name}: {preset.description}")
    _, _, stats = pretrain(pcfg, out=base)
    atomic_write_json(run.results / "pretrain.json", {"config": pcfg.model_dump(), **stats})
    console.print(f"pretrain: {stats['parameters']:,} parameters, {stats['steps_per_s']} steps/s, "
                  f"{stats['seconds']} s")
    return base


def _aggregate_forgetting(out: Path, jobs: list[SeedJob]) -> None:
    """OUT/results/forgetting.json: the seeds' forgetting results in one, each figure with its across-seed interval
    (the same aggregation as `crossroute train` with seeds:)."""
    from crossroute.experiments.sequence import aggregate_seeds

    results = [RunDir(Path(j.root)).read_result("forgetting") for j in jobs]
    trained = [list(s.mixture) for s in jobs[0].config().stages]
    RunDir(out).write_result("forgetting", aggregate_seeds(results, [j.seed for j in jobs], trained))


def run_demo(out: Path, eval_n: int | None = None, preset: str | Preset = "default", quick: bool = False,
             seeds: tuple[int, ...] | list[int] | None = None, workers: int | None = None) -> Path:
    """The demo on the preset's model; returns the report path.

    The default preset runs every part on DEMO_SEEDS (each seed in OUT/seeds/<k>/, the across-seed summary in OUT);
    `quick` runs the sequence and its diagnosis on one seed in OUT itself; a preset without a shipped checkpoint
    (gpu) pretrains its model first and runs the short demo (sequence, diagnosis, repair) on one seed."""
    from crossroute.core.threads import available_cores

    p = get_preset(preset) if isinstance(preset, str) else preset
    require_device(p)
    out = Path(out)
    t0 = time.perf_counter()
    seeds = list(seeds) if seeds else ([QUICK_SEED] if quick or not p.full_demo else list(DEMO_SEEDS))
    if len(set(seeds)) != len(seeds):
        raise CrossrouteError(f"--seeds {seeds}: give each seed once.")
    parts = parts_for(p, quick)
    model = None if p.shipped is not None else str(out / "checkpoints" / "base")  # pretrained by the demo
    if len(seeds) == 1:  # OUT is the seed's run itself
        jobs = [SeedJob(str(out), seeds[0], str(p.sequence), eval_n, quick, model)]
        run = open_train_run(jobs[0].config(), out, Path(model)) if model else None  # the record the sequence reopens
    else:
        jobs = [SeedJob(str(out / "seeds" / str(k)), k, str(p.sequence), eval_n, quick, model) for k in seeds]
        run = open_run(out, {"demo": p.name, "seeds": seeds, "eval_n": eval_n, "quick": quick,
                             "parts": [pt.name for pt in parts]}, kind="demo")
    if run is not None and model is not None:
        _pretrain_base(p, run)
    n_workers = max(1, min(workers or available_cores(), len(jobs) * len(parts))) if len(jobs) > 1 else 1
    costs = run_parts(jobs, parts, n_workers, out / "logs")
    from crossroute.report.sections.summary import write_demo_summary

    if len(jobs) > 1:
        _aggregate_forgetting(out, jobs)
        for job in jobs:
            build_report(job.root)
    wall = round(time.perf_counter() - t0, 1)
    write_demo_summary(out, [Path(j.root) for j in jobs], seeds, costs, wall, n_workers, [pt.name for pt in parts])
    path = build_report(out)
    console.print(f"demo: {wall:.0f} s on {n_workers} process(es); report: {path}")
    return path
