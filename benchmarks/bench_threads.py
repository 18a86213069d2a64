"""The thread policy vs one thread on a loaded machine, in one process: GRPO steps and a 4 x 100 eval on the default.

    python benchmarks/bench_threads.py [--load 1] [--rounds 3] [--steps 12] [--out FILE.json]

The process applies crossroute's start-up policy before torch loads (crossroute.core.threads: threads = cores /
local processes, OMP_WAIT_POLICY=PASSIVE), then starts `--load` busy processes (one spinning core each) and
alternates the policy's thread count with one thread: eval rounds interleaved, and GRPO steps alternating inside
one training run (a callback sets the count before each step). The figure is the ratio policy / one thread of
the median times (bar: <= 1, "no slower"); seconds depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from crossroute.core.threads import apply_policy

POLICY = apply_policy()  # before torch is imported, as the CLI does

import torch  # noqa: E402

from crossroute.domains.builtin import BUILTIN  # noqa: E402
from crossroute.measure.evaluate import evaluate_domain  # noqa: E402
from crossroute.model.load import load_model, resolve_model_path  # noqa: E402

DOMAINS = ("math", "code", "qa", "cw")


def start_load(n: int) -> list[subprocess.Popen]:
    """`n` processes spinning one core each (the "loaded machine")."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def eval_rounds(rounds: int, n: int) -> dict[str, list[float]]:
    """Seconds of a greedy eval of every built-in domain at `n` prompts, alternating the two settings."""
    loaded = load_model("default")
    times: dict[str, list[float]] = {"policy": [], "one": []}
    evaluate_domain(loaded.model, loaded.tokenizer, BUILTIN["math"], n=8)  # warm-up
    for r in range(rounds):
        order = ("policy", "one") if r % 2 == 0 else ("one", "policy")
        for setting in order:
            torch.set_num_threads(POLICY.threads if setting == "policy" else 1)
            t0 = time.perf_counter()
            for d in DOMAINS:
                evaluate_domain(loaded.model, loaded.tokenizer, BUILTIN[d], n=n)
            times[setting].append(time.perf_counter() - t0)
    return times


def grpo_steps(steps: int) -> dict[str, list[float]]:
    """Seconds per GRPO step on the default (math, the demo's batch), alternating the settings step by step."""
    from transformers import TrainerCallback

    from crossroute.train.grpo import grpo_kwargs, make_grpo_config, train_grpo_stage

    times: dict[str, list[float]] = {"policy": [], "one": []}

    class Alternate(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003, ANN201
            self.setting = ("policy", "one")[state.global_step % 2]
            torch.set_num_threads(POLICY.threads if self.setting == "policy" else 1)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003, ANN201
            if state.global_step > 2:  # the first steps warm caches and allocators
                times[self.setting].append(time.perf_counter() - self.t0)

    dom = BUILTIN["math"]
    init = resolve_model_path("default")
    rows = dom.train_rows(dom.examples("train", 512, seed=0), load_model(init).tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        kw = grpo_kwargs({"max_completion_length": 24, "learning_rate": 1e-4, "loss_type": "dapo",
                          "logging_steps": 1000, "disable_tqdm": True}, {}, steps, 0, str(Path(tmp) / "work"))
        args = make_grpo_config(kw, "bench")
        train_grpo_stage(init, rows, dom.reward_func(), args, Path(tmp) / "out", lambda m, t, a: [Alternate()])
    return times


def summary(times: dict[str, list[float]]) -> dict[str, float | list[float]]:
    pol, one = statistics.median(times["policy"]), statistics.median(times["one"])
    return {"policy_s": round(pol, 3), "one_thread_s": round(one, 3), "ratio": round(pol / one, 3),
            "policy_all": [round(x, 3) for x in times["policy"]], "one_all": [round(x, 3) for x in times["one"]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--load", type=int, default=1, help="busy processes started beside the benchmark")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_threads.json"))
    args = ap.parse_args()
    load = start_load(args.load)
    try:
        res = {"eval": summary(eval_rounds(args.rounds, args.n)), "grpo_step": summary(grpo_steps(args.steps))}
    finally:
        for p in load:
            p.kill()
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": platform.processor() or
            platform.machine(), "cores": os.cpu_count(), "policy": POLICY.to_json(), "extra_load": args.load,
            "loadavg": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**meta, **res}, indent=1))
    print(f"policy: {POLICY.threads} threads, OMP_WAIT_POLICY={POLICY.wait_policy}; +{args.load} busy processes; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| work | policy (s) | one thread (s) | policy / one |")
    print("|---|---|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v['policy_s']} | {v['one_thread_s']} | {v['ratio']} |")


if __name__ == "__main__":
    main()
