"""Rollback sweep cost: the P(ref) screen with greedy evals at its picks vs the old sweep (greedy at every point).

    python benchmarks/bench_rollback.py [--run /tmp/demo2] [--work /tmp/rbbench] [--others qa] [--repeats 1]

The demo's rollback (target math, eval_n 100, checkpoints 04_cw -> 02_math of a demo run; the demo's others are
[qa], --others qa,cw adds a domain with 40-token generations) run three ways in one process with 1 torch thread:
"old" is rollback.py as of OLD_COMMIT (before the screen), loaded from git; "new" the screened sweep; "full_all" the
new code evaluating every point (how well the screen ranks points, and its cost per model state against a greedy
eval's). Reports the time ratio old / new (medians, and minimums over --repeats), the full-evaluation counts, the
machine and its load; checks that every fully evaluated point of the new sweep has the old code's numbers. The demo
run is only read: its pinned eval sets are copied to --work.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossroute.domains.evalset import EVAL_SETS, with_eval_sets
from crossroute.domains.files import get_domain
from crossroute.repair.rollback import rollback_sweep

OLD_COMMIT = "7c3679cb000bad1fe648f934a0931687901f5f0c"  # the last rollback.py without the screen
REPO = Path(__file__).resolve().parents[1]


def old_module() -> types.ModuleType:
    """rollback.py as of OLD_COMMIT, imported from git (the old sweep, unchanged)."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{OLD_COMMIT}:src/crossroute/repair/rollback.py"],
                         capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType("rollback_old")
    sys.modules[mod.__name__] = mod
    exec(compile(src, "rollback_old.py", "exec"), mod.__dict__)  # noqa: S102 - our own file at a pinned commit
    return mod


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _rank(x: list[float]) -> np.ndarray:
    """Ranks with ties averaged (for Spearman's rho)."""
    arr = np.asarray(x, dtype=np.float64)
    ranks = np.empty_like(arr)
    ranks[arr.argsort(kind="stable")] = np.arange(len(arr), dtype=np.float64)
    for v in np.unique(arr):
        ranks[arr == v] = ranks[arr == v].mean()
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (nan when either side is constant)."""
    rx, ry = _rank(x), _rank(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _fields(p: Any) -> dict[str, Any]:
    return p if isinstance(p, dict) else vars(p)


def same_full_numbers(new_points: list[Any], old_points: list[Any]) -> tuple[int, int]:
    """(compared, equal): each fully evaluated new point vs the old sweep's point of the same variant/selector/fraction:
    scores, paired changes (CIs, p-values), recovery and collateral."""
    key = ("variant", "selector", "fraction")
    by_key = {tuple(_fields(p)[k] for k in key): _fields(p) for p in old_points}
    compared = equal = 0
    for p in map(_fields, new_points):
        q = by_key.get(tuple(p[k] for k in key))
        if not p["full_eval"] or q is None:
            continue
        compared += 1
        equal += all(p[f] == q[f] for f in ("n_units", "scores", "change", "recovery", "collateral"))
    return compared, equal


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=Path("/tmp/demo2"), help="a finished demo run (only read)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/rbbench"), help="where the eval sets are copied")
    ap.add_argument("--others", default="qa", help="the later domains, comma list (the demo: qa)")
    ap.add_argument("--repeats", type=int, default=1, help="old/new pairs (alternating order)")
    ap.add_argument("--eval-n", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    shutil.copytree(args.run / EVAL_SETS, args.work / EVAL_SETS, dirs_exist_ok=True)
    doms = with_eval_sets(args.work, [get_domain(n) for n in ["math", *args.others.split(",")]])
    now, to = args.run / "checkpoints" / "04_cw", args.run / "checkpoints" / "02_math"
    old_sweep = old_module().rollback_sweep
    load_before = _uptime()
    times: dict[str, list[float]] = {"old": [], "new": [], "full_all": []}
    results: dict[str, Any] = {}
    runs = {"old": lambda: old_sweep(now, to, doms[0], doms[1:], eval_n=args.eval_n),
            "new": lambda: rollback_sweep(now, to, doms[0], doms[1:], eval_n=args.eval_n),
            "full_all": lambda: rollback_sweep(now, to, doms[0], doms[1:], eval_n=args.eval_n, full_all=True)}
    for r in range(args.repeats):
        for mode in ("old", "new", "full_all") if r % 2 == 0 else ("new", "old", "full_all"):
            if mode == "full_all" and r > 0:
                continue
            t0 = time.perf_counter()
            results[mode] = runs[mode]()
            times[mode].append(time.perf_counter() - t0)
            print(f"{mode}: {times[mode][-1]:.1f} s", flush=True)
    load_after = _uptime()
    old, new, full = results["old"], results["new"], results["full_all"]
    k = len(new.points)
    t_old, t_new = float(np.median(times["old"])), float(np.median(times["new"]))
    compared, equal = same_full_numbers(new.points, old.points)
    a = new.domain
    rho = {d: spearman([p.screen_change[d]["value"] for p in full.points], [p.change[d]["value"] for p in full.points])
           for d in full.screen_now}

    def best(res: Any) -> dict[str, Any]:
        return {f: (res.best or {}).get(f) for f in ("variant", "selector", "fraction", "n_units", "scores")}

    out = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": platform.node(),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": 1,
        "load_before": load_before, "load_after": load_after, "domain": a, "others": new.others,
        "k_points": k, "bar_full_evals": k / 4 + 4,
        "n_full_evals": {"old": k + 2, "new": new.n_full_evals, "full_all": full.n_full_evals},
        "seconds": times, "ratio_old_over_new": t_old / t_new,
        "ratio_old_over_new_min": min(times["old"]) / min(times["new"]),
        # in the full_all run, the screen and the greedy eval of the same k + 2 states: cost per state
        "screen_over_greedy_per_state": full.meta["screen_s"] / full.meta["full_eval_s"],
        "new_phase_s": {"screen": new.meta["screen_s"], "full_evals": new.meta["full_eval_s"]},
        "full_all_phase_s": {"screen": full.meta["screen_s"], "full_evals": full.meta["full_eval_s"]},
        "full_points_equal_to_old": f"{equal}/{compared}",
        "spearman_screen_vs_greedy_change": rho,
        "best_old": best(old), "best_new": best(new), "new_full_evals": new.full_evals,
    }
    (args.work / f"bench_rollback_{'_'.join(new.others)}.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    print(f"| {out['date']} | {platform.node()}, {os.cpu_count()} cores, 1 thread | {a} vs {','.join(new.others)} | "
          f"k {k} | full evals old {k + 2} / new {new.n_full_evals} (bar {k / 4 + 4:g}) | old {t_old:.1f} s | "
          f"new {t_new:.1f} s (screen {new.meta['screen_s']:.1f} s) | {t_old / t_new:.2f}x | "
          f"equal {equal}/{compared} | load {load_before.split('load average:')[-1].strip()} |")


if __name__ == "__main__":
    main()
