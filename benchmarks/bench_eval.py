"""Eval cost and precision on the embedded default: greedy accuracy vs P(ref) vs avg@16 sampled at T=1.

    python benchmarks/bench_eval.py [--n 1000]

Both costs are measured in the same process on the same prompts (the ratio is the figure; seconds depend on the
machine and its load). Prints each score with its 95 % bootstrap CI.
"""

from __future__ import annotations

import argparse
import time

from crossroute.domains.builtin import BUILTIN
from crossroute.measure.evaluate import EvalProtocol, evaluate_domain, reference_probability
from crossroute.measure.stats import mean_ci
from crossroute.model.load import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--sampled-n", type=int, default=200)
    args = ap.parse_args()
    loaded = load_model("default")
    model, tok = loaded.model, loaded.tokenizer
    print("| domain | n | greedy [95% CI] | P(ref) [95% CI] | avg@16, T=1 (n) | greedy s/1000 | P(ref) s/1000 "
          "| ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("math", "code", "qa"):
        dom = BUILTIN[name]
        examples = dom.examples("eval", args.n)
        t0 = time.perf_counter()
        g = evaluate_domain(model, tok, dom, n=args.n)
        t_greedy = time.perf_counter() - t0
        t0 = time.perf_counter()
        probs = reference_probability(model, tok, dom, examples)
        t_pref = time.perf_counter() - t0
        p = mean_ci(probs)
        s = evaluate_domain(model, tok, dom, n=args.sampled_n, protocol=EvalProtocol(temperature=1.0, k=16))
        k = 1000 / len(examples)
        print(f"| {name} | {len(examples)} | {g.score:.1f} [{g.lo:.1f}, {g.hi:.1f}] | {p.value:.2f} [{p.lo:.2f}, "
              f"{p.hi:.2f}] | {s.score:.2f} [{s.lo:.2f}, {s.hi:.2f}] ({s.n}) | {t_greedy * k:.2f} | {t_pref * k:.2f} | "
              f"{t_greedy / t_pref:.1f}x |")


if __name__ == "__main__":
    main()
