"""HVP cost vs one forward+backward, and the cost of a rollback sweep point vs one evaluation.

Runs on the embedded default (CPU, or CUDA when available) in one process, so every figure is a
ratio against a baseline measured in the same run:
  * HVP (double backward, eager attention, micro-batched) time / one forward+backward on the same
    batches (target: at most 3x);
  * a rollback sweep of k points: model loads during the sweep (target: one per checkpoint) and
    per-point time / one evaluation of the same domains (target: about 1x, i.e. k evaluations).
Usage: python benchmarks/bench_hvp.py [--model PATH] [--n 64] [--batch-size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from crossroute.domains.files import get_domain
from crossroute.measure.evaluate import evaluate_domain
from crossroute.measure.hvp import grad_and_hvp
from crossroute.measure.proxy import domain_examples, make_batches, n_label_tokens, proxy_loss
from crossroute.model.load import load_model
from crossroute.model.units import UnitMap
from crossroute.repair import rollback


def timed_pair(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall times of `a` and `b`, measured interleaved (after a warm-up of each) so that any
    background load on the machine hits both alike."""
    a()
    b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--domain", default="math")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust to a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(args.model, attn_implementation="eager", device=dev)
    model, tok = loaded.model, loaded.tokenizer
    dom = get_domain(args.domain)
    batches = make_batches(tok, domain_examples(dom, args.n, 0, "eval"), args.batch_size)
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    total = n_label_tokens(batches)
    gen = torch.Generator().manual_seed(0)
    vec = {n: torch.randn(p.shape, generator=gen).to(dev) for n, p in model.named_parameters()}

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        for b in batches:
            proxy_loss(model, b, total).backward()

    t_fb, t_hvp = timed_pair(fwd_bwd, lambda: grad_and_hvp(model, batches, vec), args.repeats)

    # Rollback: per-point cost (swap in, evaluate, swap back) vs one evaluation; loads counted.
    doms = [get_domain(d) for d in ("math", "code", "qa", "cw")]

    def evaluate() -> None:
        for d in doms:
            evaluate_domain(model, tok, d, n=args.eval_n)

    other = load_model(args.model, device=dev).model
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=gen).to(dev))
    swapper = rollback.Swapper(model, dict(other.named_parameters()), UnitMap.of_model(model))
    units = rollback.all_units(swapper.umap)[: len(rollback.all_units(swapper.umap)) // 8]

    def point() -> None:
        with swapper.rolled_back(units):
            evaluate()

    t_eval, t_point = timed_pair(evaluate, point, args.repeats)
    loads = {"n": 0}
    real_load = rollback.load_model

    def counting_load(*a: object, **k: object) -> object:
        loads["n"] += 1
        return real_load(*a, **k)  # type: ignore[arg-type]

    rollback.load_model = counting_load  # type: ignore[assignment]
    fractions = (1.0, 2.0, 4.0, 8.0)
    t0 = time.perf_counter()
    res = rollback.rollback_sweep(args.model, args.model, dom, ["qa"], fractions=fractions, eval_n=args.eval_n)
    t_sweep = time.perf_counter() - t0
    rollback.load_model = real_load  # type: ignore[assignment]
    k = len(res.points)

    print(f"device {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else platform.processor() or 'cpu'}), "
          f"torch threads {torch.get_num_threads()}, {args.n} examples x {total} answer tokens, "
          f"batch {args.batch_size}")
    print(f"forward+backward {t_fb:.3f} s; HVP (double backward, eager) {t_hvp:.3f} s; ratio {t_hvp / t_fb:.2f} "
          f"(target <= 3)")
    print(f"one evaluation (4 domains x {args.eval_n}) {t_eval:.3f} s; one rollback point (swap {len(units)} "
          f"units + evaluate + swap back) {t_point:.3f} s; ratio {t_point / t_eval:.3f}")
    print(f"sweep of k={k} points: {t_sweep:.1f} s, model loads {loads['n']} (theta_now and theta_A, once each)")


if __name__ == "__main__":
    main()
