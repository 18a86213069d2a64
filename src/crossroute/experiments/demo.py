"""`crossroute demo`: the whole pipeline on the embedded default, each part resuming if already done."""

from __future__ import annotations

import time
from pathlib import Path

from crossroute.analyze.forgetting import compare_runs, per_example_scores
from crossroute.core.console import console
from crossroute.core.rundir import RunDir
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


def repair_target(cfg: TrainConfig) -> tuple[str, int, list[str]]:
    """The domain the demo diagnoses and repairs (the refresh's, else the first stage's), the index of its stage
    and the domains trained after it: in the seed's Code -> Math -> QA -> CW, math at stage 1 and [qa, cw]."""
    target = cfg.refresh.domain if cfg.refresh else cfg.stages[0].label
    i = next(k for k, st in enumerate(cfg.stages) if st.domain == target)
    return target, i, [d for st in cfg.stages[i + 1:] for d in st.mixture]


def rollback_pair(later: list[str]) -> list[str]:
    """The later domain(s) rollback must not hurt: qa (the seed's Math-QA pair) when it follows, else all later."""
    return ["qa"] if "qa" in later else later


def _diagnose(run: RunDir, target: str, stage: int, probe: str) -> None:
    """Diagnosis I on the finished sequence: update anatomy, active routes, module-level conflict right after
    `target`'s stage (checkpoint `stage` + 1; 0 is the base)."""
    from crossroute.analyze.conflict import conflict_result_name, run_conflict
    from crossroute.analyze.diff import diff_sequence, write_diff_results
    from crossroute.analyze.routes import run_routes

    ckpts, names = run_checkpoints(run)
    if run.read_result("diff") is None:
        data = diff_sequence(ckpts, progress=True).to_json()
        data["stage_names"] = names[1:]
        write_diff_results(data, run.root)
    cfg = run.read_config() or {}
    if run.read_result("routes") is None:
        run_routes(ckpts[0], cfg.get("domains", ["math", "code", "qa", "cw"]), run_dir=run.root, show_progress=True)
    if run.read_result(conflict_result_name(target, probe)) is None:
        run_conflict(ckpts[stage + 1], target, probe, run_dir=run.root, show_progress=True)


def _repair(run: RunDir, target: str, stage: int, later: list[str]) -> None:
    """Diagnosis II and repair of `target`: second-order damage, then rollback vs the refresh."""
    from crossroute.analyze.damage import run_damage
    from crossroute.repair.rollback import SEED_FULL_AT, run_rollback

    ckpts, names = run_checkpoints(run)
    last = max(i for i, n in enumerate(names) if not n.startswith("refresh_"))  # the end of the sequence
    if run.read_result(f"damage_{target}") is None:
        run_damage(ckpts[stage + 1], ckpts[last], target, later=later, run_dir=run.root)
    if run.read_result(f"rollback_{target}") is None:
        eval_n = int((run.read_config() or {}).get("eval_n", 100))  # the run's pinned eval sets, as they are
        run_rollback(ckpts[last], ckpts[stage + 1], target, rollback_pair(later), run_dir=run.root, eval_n=eval_n,
                     full_at=SEED_FULL_AT)
    rb, fg = run.read_result(f"rollback_{target}"), run.read_result("forgetting")
    best, ref = (rb or {}).get("best") or {}, (fg or {}).get("refresh") or {}
    if best and ref:
        console.print(f"repair of {target}: rollback {best['variant']}/{best['selector']} {best['fraction']} % "
                      f"({best['n_units']} units, no training) recovers {100 * (best['recovery'] or 0):.0f} %; "
                      f"refresh ({ref['after'] - ref['before']:+.1f} points) recovers "
                      f"{100 * (ref['recovery_share'] or 0):.0f} %")


def _pretrain_base(preset: Preset, cfg: TrainConfig, out: Path) -> None:
    """For a preset without a shipped checkpoint: pretrain it into the run as checkpoints/base (once)."""
    from crossroute.core.atomic import atomic_write_json
    from crossroute.train.pretrain import PretrainConfig, pretrain

    base = Path(out) / "checkpoints" / "base"
    cfg.model = str(base)
    run = open_train_run(cfg, out, base)  # the record run_training reopens
    if run.has_checkpoint("base"):
        console.print("[dim]pretrain: done, skipped[/dim]")
        return
    pcfg = PretrainConfig.for_preset(preset)
    console.print(f"[bold]pretrain[/bold] preset {preset.name}: {preset.description}")
    _, _, stats = pretrain(pcfg, out=base)
    atomic_write_json(run.results / "pretrain.json", {"config": pcfg.model_dump(), **stats})
    console.print(f"pretrain: {stats['parameters']:,} parameters, {stats['steps_per_s']} steps/s, "
                  f"{stats['seconds']} s")


def run_demo(out: Path, eval_n: int | None = None, preset: str | Preset = "default") -> Path:
    """Sequence + refresh on the preset's model, diagnosis, repairs, then the report; returns the report path.

    The default preset starts from the shipped checkpoint and runs every part; a preset without one
    (gpu) pretrains its model first and runs pretrain, sequence, refresh, diagnosis, rollback, report.
    """
    from crossroute.report.console import print_forgetting

    p = get_preset(preset) if isinstance(preset, str) else preset
    require_device(p)
    cfg = load_train_config(p.sequence)
    if eval_n is not None:
        cfg.eval_n = eval_n
    t0 = time.perf_counter()
    if p.shipped is None:
        _pretrain_base(p, cfg, out)
        console.print(f"pretrain: {time.perf_counter() - t0:.0f} s")
        t0 = time.perf_counter()
    result = run_training(cfg, out)
    print_forgetting(result)
    console.print(f"sequence + refresh: {time.perf_counter() - t0:.0f} s")
    t1 = time.perf_counter()
    target, stage, later = repair_target(cfg)
    _diagnose(RunDir(Path(out)), target, stage, "qa")
    console.print(f"diagnosis (diff, routes, conflict): {time.perf_counter() - t1:.0f} s")
    t2 = time.perf_counter()
    run = RunDir(Path(out))
    _repair(run, target, stage, later)
    console.print(f"damage + rollback: {time.perf_counter() - t2:.0f} s")
    if p.full_demo:
        _prevent_and_compare(run, cfg)
    path = build_report(out)
    console.print(f"report: {path}")
    return path


def _prevent_and_compare(run: RunDir, cfg: TrainConfig) -> None:
    """The default preset's extra parts: protected sequence, CPI-FT vs SFT baselines, RL vs SFT circuits."""
    t2 = time.perf_counter()
    if run.read_result("forgetting_protected") is None:
        protected = run_training(load_train_config(PROTECT_CONFIG), run.root / "protected")
        plain = run.read_result("forgetting")
        if plain is not None and plain["rows"] == protected["rows"]:
            def records(root: Path) -> list:
                return [per_example_scores(read_records(root / "results" / f"eval_{r}.jsonl")) for r in plain["rows"]]

            protected["vs_unprotected"] = compare_runs(plain["rows"], records(run.root),
                                                       records(run.root / "protected"), plain["domains"])
        run.write_result("forgetting_protected", protected)
    console.print(f"protected sequence (freeze math's conflict units): {time.perf_counter() - t2:.0f} s")
    t2 = time.perf_counter()
    if run.read_result("cpift") is None:
        from crossroute.repair.cpift import run_cpift

        run.write_result("cpift", run_cpift(CPIFT_CONFIG, run.root / "cpift"))
    console.print(f"CPI-FT vs mixed/sequential SFT: {time.perf_counter() - t2:.0f} s")
    t2 = time.perf_counter()
    if run.read_result("rl_vs_sft") is None:
        from crossroute.experiments.rl_vs_sft import run_rl_vs_sft

        run_rl_vs_sft("default", repair_target(cfg)[0], run.root)
    console.print(f"RL vs SFT (forgetting, KL to base, circuit retention): {time.perf_counter() - t2:.0f} s")
