"""Circuits on the demo's models: today's patching passes vs the stacked, early-stopped ones, in one process.

Usage: python benchmarks/bench_circuits.py [--base PATH] [--rl PATH] [--sft PATH] [--domains math,code,qa,cw]
       [--n 64] [--repeats 2] [--reference] [--json OUT.json]

"today" is the committed analyze/circuits.py (git show HEAD:..., imported under another name; without git it falls
back to PatchPasses(stack=1, full_curve=True), the reference path of the new code). Both run run_circuits exactly as
experiments/rl_vs_sft.py does (base vs rl vs sft on every domain, circuit_n pairs, batch 32, top 16 confirmed), on 1
torch thread, the two interleaved `--repeats` times; the ratios are of the median wall and CPU (process) times, the
latter less sensitive to other jobs on a shared machine. Forward passes are
counted by wrapping each module's row_metric (one call = one forward; copies = rows / batch rows). The results are
compared field by field: the same circuits and rankings, every number within 1e-5 (curves at their common prefix
sizes; a stopped curve's smallest_reaching_target, seconds and warnings are not compared).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = {"base": str(ROOT / "src" / "crossroute" / "assets" / "default"), "rl": "/tmp/demo2/checkpoints/02_math",
        "sft": "/tmp/demo2/rl_vs_sft_math/sft_40"}
SKIP = {"seconds", "warnings", "smallest_reaching_target", "curve_truncated", "path", "curve_k", "curve_faithfulness",
        "curve_faithfulness_own_gap"}
TOL = 1e-5


def today_module() -> ModuleType | None:
    """The committed circuits.py imported as `circuits_today`, or None when git cannot show it."""
    try:
        src = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:src/crossroute/analyze/circuits.py"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp(prefix="bench_circuits_")) / "circuits_today.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("circuits_today", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["circuits_today"] = mod
    spec.loader.exec_module(mod)
    return mod


class Counter:
    """Wraps a module's row_metric: forwards (calls) and copies (rows / rows of a batch) per run."""

    def __init__(self, mod: ModuleType, batch_rows: int) -> None:
        self.mod, self.inner, self.batch_rows = mod, mod.row_metric, batch_rows
        self.forwards = self.copies = 0
        mod.row_metric = self

    def __call__(self, model: Any, ids: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.forwards += 1
        self.copies += ids.shape[0]
        return self.inner(model, ids, batch)

    def take(self) -> dict[str, int]:
        out = {"forwards": self.forwards, "row_passes": self.copies}
        self.forwards = self.copies = 0
        return out


def run(mod: ModuleType, args: argparse.Namespace, passes: Any) -> tuple[float, float, dict[str, Any]]:
    """Wall and CPU seconds and circuits_{d}.json dicts of base vs rl vs sft on every domain, as rl_vs_sft calls it."""
    kw = {} if passes is None else {"passes": passes}
    t0, c0 = time.perf_counter(), time.process_time()
    out = {d: mod.run_circuits(args.base, {"rl": args.rl, "sft": args.sft}, d, n=args.n, target=0.8, delta=0.1,
                               seed=0, device="cpu", **kw).to_json() for d in args.domains}
    return time.perf_counter() - t0, time.process_time() - c0, out


def diff(a: Any, b: Any, where: str = "") -> tuple[float, list[str]]:
    """(largest |a - b| over matching numbers, paths that differ otherwise); SKIP keys ignored, curves by k."""
    if isinstance(a, dict) and isinstance(b, dict):
        worst, bad = 0.0, []
        if "curve_k" in a and "curve_k" in b:
            fa = dict(zip(a["curve_k"], a["curve_faithfulness"], strict=True))
            fb = dict(zip(b["curve_k"], b["curve_faithfulness"], strict=True))
            w, x = diff([fa[k] for k in sorted(fa.keys() & fb.keys())], [fb[k] for k in sorted(fa.keys() & fb.keys())],
                        where + ".curve")
            worst, bad = max(worst, w), bad + x
        for k in sorted(a.keys() | b.keys()):
            if k in SKIP:
                continue
            if k not in a or k not in b:
                bad.append(f"{where}.{k} missing on one side")
                continue
            w, x = diff(a[k], b[k], f"{where}.{k}")
            worst, bad = max(worst, w), bad + x
        return worst, bad
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return 0.0, [f"{where}: lengths {len(a)} != {len(b)}"]
        worst, bad = 0.0, []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            w, z = diff(x, y, f"{where}[{i}]")
            worst, bad = max(worst, w), bad + z
        return worst, bad
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
        if math.isnan(a) and math.isnan(b):
            return 0.0, []
        d = abs(a - b)
        return d, [] if d <= TOL * max(1.0, abs(a)) else [f"{where}: {a} vs {b}"]
    return 0.0, [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for k, v in DEMO.items():
        ap.add_argument(f"--{k}", default=v)
    ap.add_argument("--domains", default="math,code,qa,cw")
    ap.add_argument("--n", type=int, default=64, help="pairs per domain (rl_vs_sft's circuit_n)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--reference", action="store_true", help="also time PatchPasses(stack=1, full_curve=True)")
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args()
    args.domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    torch.set_num_threads(1)
    from crossroute.analyze import circuits as new
    from crossroute.analyze.circuits import PatchPasses

    old = today_module()
    ref = PatchPasses(stack=1, full_curve=True)
    plans: dict[str, tuple[ModuleType, Any]] = {"today": (old, None) if old is not None else (new, ref),
                                                "new": (new, PatchPasses())}
    if args.reference:
        plans["reference"] = (new, ref)
    counters = {id(m): Counter(m, 32) for m, _ in plans.values()}
    load_before = uptime()
    times: dict[str, list[float]] = {k: [] for k in plans}
    cpu: dict[str, list[float]] = {k: [] for k in plans}
    counts: dict[str, dict[str, int]] = {}
    results: dict[str, dict[str, Any]] = {}
    for _ in range(args.repeats):
        for name, (mod, passes) in plans.items():
            secs, cpu_secs, res = run(mod, args, passes)
            times[name].append(secs)
            cpu[name].append(cpu_secs)
            counts[name] = counters[id(mod)].take()
            results[name] = res
            print(f"{name}: {secs:.2f} s wall, {cpu_secs:.2f} s CPU, {counts[name]}; {uptime()}", flush=True)
    load_after = uptime()
    worst, bad = diff(results["today"], results["new"])
    same = {d: {m: results["today"][d]["models"][m]["circuit"] == results["new"][d]["models"][m]["circuit"]
                for m in results["new"][d]["models"]} for d in args.domains}
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    summary = {
        "date": dt.date.today().isoformat(), "machine": f"{os.cpu_count()} CPUs, {cpu_model()}",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "uptime_before": load_before,
        "uptime_after": load_after, "today_is": "git HEAD circuits.py" if old is not None else "reference path",
        "models": {"base": args.base, "rl": args.rl, "sft": args.sft}, "domains": args.domains, "n": args.n,
        "seconds": times, "cpu_seconds": cpu, "median_seconds": med, "median_cpu_seconds": med_cpu,
        "ratio_today_over_new": med["today"] / med["new"],
        "cpu_ratio_today_over_new": med_cpu["today"] / med_cpu["new"],
        "passes": counts, "max_abs_diff": worst, "differences": bad[:20], "same_circuits": same,
        "curves": {d: {m: r["curve_k"] for m, r in results["new"][d]["models"].items()} for d in args.domains},
    }
    if "reference" in results:
        summary["reference_vs_today_max_abs_diff"], ref_bad = diff(results["today"], results["reference"])
        summary["reference_differences"] = ref_bad[:20]
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
