"""HVP cost vs one forward+backward, Lanczos peak memory old vs new, and a rollback sweep point vs one evaluation.

Runs on the embedded default (CPU, or CUDA when available), so every figure is a ratio against a baseline
measured in the same run:
  * HVP (double backward, eager attention, micro-batched) time / one forward+backward on the same batches
    (target: at most 3x): grad + HVP together (`grad_and_hvp`, the figure RESULTS.md has tracked), the HVP
    alone (`hvp`, no gradient kept) and the packed HVP over a shared-route restriction (`packed_hvp`);
  * Lanczos peak memory (issue 19): the conflict subspace's thick-restart Lanczos over a restriction
    (every MLP neuron and attention head of the model by default), the implementation before issue 19
    (`old_lanczos` + `old_matvec`, copied here for comparison only: fp64 basis and stored products,
    full-size fp64 CPU unpacking per HVP) against `extreme_eigenpairs` + `packed_hvp`, each in a fresh
    child process; the figure is the peak RSS (VmHWM, reset just before the solver starts) minus the RSS
    at that point, next to the basis bytes each implementation allocates by design;
  * a rollback sweep of k points: model loads during the sweep (target: one per checkpoint) and
    per-point time / one evaluation of the same domains (target: about 1x, i.e. k evaluations).
Usage: python benchmarks/bench_hvp.py [--model PATH] [--n 64] [--batch-size 64] [--repeats 5]
       [--parts hvp,lanczos,rollback] [--lanczos-n 16] [--lanczos-matvecs 70]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from crossroute.analyze.subspace import basis_rows, extreme_eigenpairs
from crossroute.domains.files import get_domain
from crossroute.measure.evaluate import evaluate_domain
from crossroute.measure.hvp import Packing, grad_and_hvp, hvp, packed_hvp
from crossroute.measure.proxy import Batch, domain_examples, make_batches, n_label_tokens, proxy_loss
from crossroute.model.load import load_model
from crossroute.model.units import UnitMap


def timed_pair(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall times of `a` and `b`, measured interleaved (after a warm-up of each) so that any
    background load on the machine hits both alike."""
    ta, tb, _ = timed_ratios(a, b, repeats)
    return ta, tb


# ----------------------------------------------------------------------------- the implementation before issue 19
# Copied from crossroute.analyze.subspace / conflict_subspace as they were (commit 652cf37), for comparison only.


def _old_orthogonalise(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    for _ in range(2):
        w = w - basis @ (basis.T @ w)
    return w


def _old_ends(j: int, k_top: int, k_bottom: int) -> tuple[list[int], list[int]]:
    return list(range(j - 1, j - 1 - k_top, -1)), list(range(k_bottom))


def _old_relative_residuals(q: torch.Tensor, w: torch.Tensor, theta: torch.Tensor, s: torch.Tensor,
                            idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, hy, th = q @ s[:, idx], w @ s[:, idx], theta[idx]
    floor = 1e-12 * max(float(theta.abs().max()), 1e-300)
    res = (hy - y * th).norm(dim=0) / th.abs().clamp_min(floor)
    return y, hy, res


def _old_keep(j: int, k_top: int, k_bottom: int, m: int) -> list[int]:
    want = k_top + k_bottom
    extra = max(0, min(m - 1, (want + m) // 2) - want)
    if k_bottom == 0:
        kt, kb = k_top + extra, 0
    elif k_top == 0:
        kt, kb = 0, k_bottom + extra
    else:
        kt = k_top + math.ceil(extra * k_top / want)
        kb = k_bottom + extra - (kt - k_top)
    return list(range(kb)) + list(range(j - kt, j))


def old_lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, k_top: int = 20, k_bottom: int = 10,
                tol: float = 1e-3, max_matvec: int = 150, basis_size: int | None = None, seed: int = 0,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, int]:
    """The thick-restart Lanczos of `extreme_eigenpairs` before issue 19 (fp64 Q and W = HQ, n x m each).

    Returns (top values, bottom values, matvecs used); the eigenvectors are computed as before and dropped.
    """
    k_top = min(k_top, n)
    k_bottom = min(k_bottom, n - k_top)
    want = k_top + k_bottom
    m = min(n, basis_size or max(2 * want, want + 10))
    gen = torch.Generator().manual_seed(seed)
    qb = torch.zeros(n, m, dtype=torch.float64, device=device)
    wb = torch.zeros_like(qb)
    start = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    qb[:, 0] = start / start.norm()
    j, used = 0, 0
    while True:
        wb[:, j] = matvec(qb[:, j]).to(device=device, dtype=torch.float64).flatten()
        used, j = used + 1, j + 1
        g = qb[:, :j].T @ wb[:, :j]
        theta, s = torch.linalg.eigh(0.5 * (g + g.T))
        top, bottom = _old_ends(j, min(k_top, j), min(k_bottom, j - min(k_top, j)))
        _, _, res = _old_relative_residuals(qb[:, :j], wb[:, :j], theta, s, top + bottom)
        if j == n or (j >= want and bool((res <= tol).all())) or used >= max_matvec:
            break
        r = _old_orthogonalise(wb[:, j - 1], qb[:, :j])
        if float(r.norm()) <= 1e-10 * max(float(theta.abs().max()), 1e-300):
            r = _old_orthogonalise(torch.randn(n, generator=gen, dtype=torch.float64).to(device), qb[:, :j])
        if j == m:
            keep = _old_keep(j, k_top, k_bottom, m)
            qb[:, : len(keep)], wb[:, : len(keep)] = qb[:, :j] @ s[:, keep], wb[:, :j] @ s[:, keep]
            j = len(keep)
            r = _old_orthogonalise(r, qb[:, :j])
        qb[:, j] = r / r.norm()
    top, bottom = _old_ends(j, k_top if j >= want else min(k_top, j), k_bottom if j >= want else 0)
    _old_relative_residuals(qb[:, :j], wb[:, :j], theta, s, top)
    _old_relative_residuals(qb[:, :j], wb[:, :j], theta, s, bottom)
    return theta[top], theta[bottom], used


def old_matvec(model: torch.nn.Module, batches: list[Batch], umap: UnitMap,
               masks: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """conflict_subspace's matvec before issue 19: unpack to full-size fp64 CPU tensors, grad_and_hvp, pack."""
    names = list(masks)
    sizes = [int(masks[n].sum()) for n in names]

    def pack(t: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([t[n].detach().cpu().double()[masks[n]] for n in names])

    def unpack(v: torch.Tensor) -> dict[str, torch.Tensor]:
        out, off = {}, 0
        for n, s in zip(names, sizes, strict=True):
            t = torch.zeros(umap.shapes[n], dtype=torch.float64)
            t[masks[n]] = v[off: off + s]
            out[n] = t
            off += s
        return out

    return lambda v: pack(grad_and_hvp(model, batches, unpack(v), params=names, with_grad=False)[2])


# ----------------------------------------------------------------------------- Lanczos memory, one child per variant


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_bytes(reset: bool) -> int:
    if reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _restriction(umap: UnitMap, kinds: list[str]) -> list[str]:
    return [u for k in kinds for u in umap.ids(k)]


def lanczos_child(args: argparse.Namespace) -> None:
    """One variant's run in this (fresh) process; prints one JSON line."""
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, attn_implementation="eager", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    dom = get_domain(args.domain)
    batches = make_batches(tok, domain_examples(dom, args.lanczos_n, 0, "eval"), args.batch_size, dom)
    umap = UnitMap.of_model(model)
    masks = umap.mask(_restriction(umap, args.kinds.split(",")))
    n = sum(int(m.sum()) for m in masks.values())
    kt, kb = args.k, args.k // 2
    if args.child == "old":
        mv = old_matvec(model, batches, umap, masks)
        m = min(n, max(2 * (kt + kb), kt + kb + 10))
        basis = 2 * m * n * 8
        run = lambda: old_lanczos(mv, n, kt, kb, tol=1e-12, max_matvec=args.lanczos_matvecs)[:2]  # noqa: E731
    else:
        packing = Packing(model, masks)
        basis = basis_rows(n, kt, kb)[1] * n * torch.empty(0, dtype=packing.dtype).element_size()

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            ep = extreme_eigenpairs(lambda v: packed_hvp(model, batches, packing, v), n, kt, kb, tol=1e-12,
                                    max_matvec=args.lanczos_matvecs, device=packing.device, dtype=packing.dtype)
            return ep.top_values, ep.bottom_values

    before = _rss_bytes()
    reset = _reset_peak()
    t0 = time.perf_counter()
    top, bottom = run()
    secs = time.perf_counter() - t0
    peak = _peak_bytes(reset)
    print(json.dumps({"variant": args.child, "n": n, "basis_bytes": basis, "rss_before": before, "peak": peak,
                      "peak_reset": reset, "seconds": secs, "top": top[:3].tolist(), "bottom": bottom[:3].tolist()}))


def lanczos_memory(args: argparse.Namespace) -> list[dict]:
    """Run old and new in fresh children (one after the other) and return their JSON records."""
    out = []
    for variant in ("old", "new"):
        cmd = [sys.executable, __file__, "--child", variant] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "parts")]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--domain", default="math")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust to a shared machine)")
    ap.add_argument("--parts", default="hvp,lanczos,rollback")
    ap.add_argument("--kinds", default="neuron,head", help="unit kinds of the Lanczos restriction (all their units)")
    ap.add_argument("--k", type=int, default=20, help="Lanczos: top eigenpairs (k // 2 bottom ones), as the default")
    ap.add_argument("--lanczos-n", type=int, default=16, help="Lanczos: proxy examples per HVP")
    ap.add_argument("--lanczos-matvecs", type=int, default=70, help="Lanczos: HVPs (> basis size: one restart)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        lanczos_child(args)
        return
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else platform.processor() or 'cpu'}), "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} "
          f"{os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}, {time.strftime('%Y-%m-%d %H:%M')}")
    if "hvp" in parts:
        hvp_cost(args, dev)
    if "lanczos" in parts:
        recs = lanczos_memory(args)
        old, new = recs
        for r in recs:
            grow = r["peak"] - r["rss_before"]
            print(f"Lanczos {r['variant']}: n {r['n']:,} entries, {args.lanczos_matvecs} HVPs on {args.lanczos_n} "
                  f"examples, basis by design {r['basis_bytes'] / 2**20:.1f} MiB, peak RSS growth "
                  f"{grow / 2**20:.1f} MiB (peak {r['peak'] / 2**20:.1f} MiB, reset={r['peak_reset']}), "
                  f"{r['seconds']:.1f} s; top {[round(x, 4) for x in r['top']]}")
        g_old, g_new = old["peak"] - old["rss_before"], new["peak"] - new["rss_before"]
        print(f"Lanczos peak RSS growth new / old: {g_new / max(g_old, 1):.3f} ({g_old / 2**20:.1f} -> "
              f"{g_new / 2**20:.1f} MiB); basis bytes new / old {new['basis_bytes'] / old['basis_bytes']:.3f}")
    if "rollback" in parts:
        rollback_cost(args, dev)
    print(f"load average after {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


def hvp_cost(args: argparse.Namespace, dev: str) -> None:
    """HVP variants / one forward+backward, interleaved in this process."""
    loaded = load_model(args.model, attn_implementation="eager", device=dev)
    model, tok = loaded.model, loaded.tokenizer
    dom = get_domain(args.domain)
    batches = make_batches(tok, domain_examples(dom, args.n, 0, "eval"), args.batch_size)
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    total = n_label_tokens(batches)
    gen = torch.Generator().manual_seed(0)
    vec = {n: torch.randn(p.shape, generator=gen).to(dev) for n, p in model.named_parameters()}
    umap = UnitMap.of_model(model)
    packing = Packing(model, umap.mask(_restriction(umap, args.kinds.split(","))))
    v_packed = packing.pack(vec)

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        for b in batches:
            proxy_loss(model, b, total).backward()

    variants = {"grad + HVP (grad_and_hvp, double backward, eager)": lambda: grad_and_hvp(model, batches, vec),
                "HVP only (hvp, no gradient kept)": lambda: hvp(model, batches, vec),
                f"packed HVP over {packing.n:,} entries ({args.kinds})": lambda: packed_hvp(model, batches, packing,
                                                                                           v_packed)}
    print(f"{args.n} examples x {total} answer tokens, batch {args.batch_size}")
    for name, fn in variants.items():
        t_fb, t_hvp, ratios = timed_ratios(fwd_bwd, fn, args.repeats)
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        print(f"forward+backward {t_fb:.3f} s; {name} {t_hvp:.3f} s; ratio {statistics.median(ratios):.2f} "
              f"(median of {len(ratios)} back-to-back pairs, quartiles {q[0]:.2f}-{q[2]:.2f}; target <= 3)")
    model.zero_grad(set_to_none=True)


def timed_ratios(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float, list[float]]:
    """Median times of `a` and `b` and the per-repeat ratios b / a, each pair run back to back (after a warm-up),
    so that background load drifting over the run cancels in each ratio."""
    a()
    b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb), [y / x for x, y in zip(ta, tb, strict=True)]


def rollback_cost(args: argparse.Namespace, dev: str) -> None:
    """Rollback: per-point cost (swap in, evaluate, swap back) vs one evaluation; loads counted."""
    from crossroute.repair import rollback

    loaded = load_model(args.model, attn_implementation="eager", device=dev)
    model, tok = loaded.model, loaded.tokenizer
    dom = get_domain(args.domain)
    gen = torch.Generator().manual_seed(0)
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
    print(f"one evaluation (4 domains x {args.eval_n}) {t_eval:.3f} s; one rollback point (swap {len(units)} "
          f"units + evaluate + swap back) {t_point:.3f} s; ratio {t_point / t_eval:.3f}")
    print(f"sweep of k={k} points: {t_sweep:.1f} s, model loads {loads['n']} (theta_now and theta_A, once each)")


if __name__ == "__main__":
    main()
