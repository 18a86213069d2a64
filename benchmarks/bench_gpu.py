"""GPU costs of crossroute's heavy paths on random-init Qwen3-0.6B / Qwen3-4B shapes, in one process.

Usage (from the repository root; benchmarks/run_gpu.sh runs the first line on the GPU machine):
    PYTHONPATH=src python benchmarks/bench_gpu.py --out results.json [--shapes 0.6b,4b] [--batch 8] [--seq 512]
        [--hvp-micro 2] [--budget-s 240] [--workdir /tmp] [--threads 0]
    .venv/bin/python benchmarks/bench_gpu.py --shapes tiny --out /tmp/tiny.json --threads 1   # CPU smoke run

Each shape is built from a Qwen3Config (no download), bf16 on CUDA (fp32 for "tiny" on CPU), SDPA
attention, and measured on one random-token batch of --batch x --seq tokens ("tiny": 2 x 32):

  fwd_bwd               forward + backward of the LM loss (labels = input_ids): the BASELINE.
  hvp                   crossroute.hvp.grad_and_hvp (double backward; it switches to eager attention)
                        over micro-batches of --hvp-micro sequences; ratio = HVP / fwd_bwd.
  hvp_lean              the same with with_grad=False and acc_dtype = the parameters' dtype (bf16 on CUDA):
                        vector and H v in 2 bytes per parameter, no ∇L; one call; the note compares its H v
                        on two layer-0 tensors with the fp32 result.
  sdpa_double_backward  (0.6b, tiny) plain double backward with SDPA attention left on: outcome
                        "ok" (with its relative difference to the eager H v) or the error.
  generate              model.generate, batch 64, 64 new tokens (tiny: 8), sampling; ratio = / fwd_bwd;
                        the note gives new tokens/s.
  diff_write            two bf16 safetensors checkpoints: "before" = the weights, "after" = before with
                        ~1 % of each tensor's entries changed (the planted fraction is counted exactly).
  diff_raw_read         every byte of both files read into a reused buffer (page cache warmed first):
                        the BASELINE of the diff rows; their ratio = their GB/s / raw read GB/s.
  diff_crossroute       crossroute.diff.diff_checkpoints(before, after, workers=os.cpu_count()).
  diff_naive_cpu        safe_open both, per tensor (b - a).float(), norm and count_nonzero, on CPU.
  diff_naive_gpu        the same with both tensors moved to CUDA first (skipped without CUDA).
  rollback_point        crossroute.rollback.Swapper: entering + leaving rolled_back() for 1 % of the
                        neuron/head/KV units, plus one no-grad forward of the batch; ratio = that / one
                        forward alone (a rollback sweep point is swap + evaluation).
  grpo_step             TRL GRPOTrainer steps (synthetic WordLevel tokenizer of the model's vocabulary,
                        64 prompts, 8 generations, 64 completions per step, 64 new tokens, tiny: 8);
                        median of the steps after the first; ratio = step / fwd_bwd.

Every part runs in its own try/except: an error (CUDA OOM included) is recorded and the run goes on;
once --budget-s seconds have passed since main() started (imports not counted), the remaining parts
are recorded as "skipped: budget" (a part that has started runs to its end).
Results go to --out after every part (atomic), and a markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

Record = dict[str, Any]
GIB = 2**30
PERTURB_FRACTION = 0.01
ROLLBACK_PERCENT = 1.0

QWEN3_COMMON: dict[str, Any] = dict(vocab_size=151936, head_dim=128, num_key_value_heads=8,
                                    tie_word_embeddings=True, max_position_embeddings=4096)


@dataclass(frozen=True)
class Shape:
    """A model shape and its per-shape workload sizes (None: the command-line value)."""

    name: str
    config: dict[str, Any]
    batch: int | None = None
    seq: int | None = None
    new_tokens: int = 64
    sdpa_probe: bool = False


SHAPES: dict[str, Shape] = {
    "0.6b": Shape("0.6b", dict(QWEN3_COMMON, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                               num_attention_heads=16), sdpa_probe=True),
    "4b": Shape("4b", dict(QWEN3_COMMON, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                           num_attention_heads=32)),
    "tiny": Shape("tiny", dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               tie_word_embeddings=True, max_position_embeddings=4096),
                  batch=2, seq=32, new_tokens=8, sdpa_probe=True),
}
PARTS: tuple[str, ...] = ("fwd_bwd", "hvp", "hvp_lean", "sdpa_double_backward", "generate", "diff_write",
                          "diff_raw_read", "diff_crossroute", "diff_naive_cpu", "diff_naive_gpu", "rollback_point",
                          "grpo_step")


# ----------------------------------------------------------------------------- device helpers


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / GIB if dev.type == "cuda" else None


def allocated_gib(dev: torch.device) -> float | None:
    return torch.cuda.memory_allocated(dev) / GIB if dev.type == "cuda" else None


def free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn: Callable[[], object], dev: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Wall times of `repeats` calls of `fn` after `warmup` calls, synchronised around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return times


def describe(exc: BaseException) -> str:
    """One line naming an exception (CUDA OOM messages keep their sizes)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ----------------------------------------------------------------------------- model and data


def build_model(shape: Shape, dev: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random-init Qwen3ForCausalLM of `shape`, created directly on `dev` in `dtype`, SDPA attention."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(**shape.config)
    with torch.device(dev):
        model = Qwen3ForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.to(dev)


def make_batch(vocab: int, batch: int, seq: int, dev: torch.device) -> dict[str, torch.Tensor]:
    """Random tokens in crossroute.gradients' batch format; every position is a label (as in fwd_bwd)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    return {"input_ids": ids.to(dev), "attention_mask": torch.ones_like(ids).to(dev), "labels": ids.clone().to(dev)}


def micro_batches(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    n = batch["input_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, max(1, size))]


def random_vector(model: torch.nn.Module, scale: float = 1e-3,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """N(0, scale^2) per parameter on its device, in grad_and_hvp's accumulation dtype (fp32 by default), so
    that its `.to(acc dtype)` is a no-op: a vector of another dtype costs its own copy plus one inside."""
    out = {}
    for i, (n, p) in enumerate(model.named_parameters()):
        gen = torch.Generator(device=p.device).manual_seed(1000 + i)
        out[n] = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).mul_(scale).to(dtype)
    return out


def perturb(t: torch.Tensor, frac: float, gen: torch.Generator) -> torch.Tensor:
    """`t` with about `frac` of its entries changed by +-(5 % of |t| + 1e-3): always visible in bf16."""
    a = t.float()
    r = torch.rand(a.shape, generator=gen, device=a.device)
    step = (a.abs() * 0.05 + 1e-3) * torch.where(r < frac / 2, -1.0, 1.0)
    return torch.where(r < frac, a + step, a).to(t.dtype)


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ----------------------------------------------------------------------------- the run


@dataclass
class ShapeRun:
    """What the parts of one shape share: the model, the batch and the baselines measured so far."""

    shape: Shape
    model: torch.nn.Module
    batch: dict[str, torch.Tensor]
    t_fb: float | None = None
    files: list[Path] = field(default_factory=list)
    raw_s: float | None = None
    planted: float | None = None
    hv_ref: dict[str, torch.Tensor] = field(default_factory=dict)


class Bench:
    """Runs parts under the time budget, records each result and rewrites --out after every part."""

    def __init__(self, args: argparse.Namespace, dev: torch.device, dtype: torch.dtype) -> None:
        self.args, self.dev, self.dtype = args, dev, dtype
        self.t0 = time.perf_counter()
        self.data: dict[str, Any] = {"meta": environment(dev), "args": vars(args), "shapes": {}}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def shape_entry(self, shape: str) -> dict[str, Any]:
        return self.data["shapes"].setdefault(shape, {"parts": {}})

    def record(self, shape: str, part: str, rec: Record) -> Record:
        self.shape_entry(shape)["parts"][part] = rec
        self.save()
        return rec

    def skip(self, shape: str, part: str, why: str) -> Record:
        return self.record(shape, part, {"seconds": None, "ratio": None, "peak_gib": None,
                                         "skipped": why, "note": f"skipped: {why}"})

    def run(self, shape: str, part: str, fn: Callable[[], Record]) -> Record:
        """Run one part (unless the budget is spent); errors are recorded, never raised."""
        if self.left() <= 0:
            return self.skip(shape, part, "budget")
        if self.args.parts and not any(part.startswith(p) for p in self.args.parts.split(",")):
            return self.skip(shape, part, "not selected (--parts)")
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {shape} {part}", flush=True)
        reset_peak(self.dev)
        try:
            rec = fn()
        except Exception as exc:  # noqa: BLE001 - one failing part (say CUDA OOM) must not end the run
            traceback.print_exc()
            sys.stderr.flush()
            rec = {"seconds": None, "ratio": None, "error": describe(exc), "note": describe(exc)}
        rec.setdefault("peak_gib", peak_gib(self.dev))
        free_memory(self.dev)
        rec["allocated_after_gib"] = allocated_gib(self.dev)
        print(f"    -> {row(shape, part, rec)}", flush=True)
        return self.record(shape, part, rec)

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, out)


def environment(dev: torch.device) -> dict[str, Any]:
    import safetensors
    import transformers
    import trl

    meta: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "safetensors": safetensors.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": str(dev), "device_name": platform.processor() or "cpu", "cuda_total_gib": None,
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        meta.update(device_name=props.name, cuda_total_gib=props.total_memory / GIB, cuda=torch.version.cuda)
    return meta


# ----------------------------------------------------------------------------- parts: compute


def part_fwd_bwd(b: Bench, run: ShapeRun) -> Record:
    model, batch = run.model, run.batch
    model.train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    try:
        t = statistics.median(timed(step, b.dev, b.args.repeats))
    finally:
        model.zero_grad(set_to_none=True)
    run.t_fb = t
    n = batch["input_ids"].numel()
    return {"seconds": t, "ratio": 1.0, "ratio_to": "fwd_bwd", "tokens": n, "note": f"{n / t:,.0f} tokens/s (baseline)"}


def ref_names(model: torch.nn.Module) -> list[str]:
    """A few layer-0 tensors whose H v the lean HVP is compared against."""
    return [n for n, _ in model.named_parameters()
            if "layers.0." in n and n.endswith(("q_proj.weight", "down_proj.weight"))]


def part_hvp(b: Bench, run: ShapeRun) -> Record:
    """grad_and_hvp as crossroute calls it: ∇L and H v accumulated in fp32 (fp32 vector: no copy inside)."""
    from crossroute.measure.hvp import grad_and_hvp

    micro = micro_batches(run.batch, b.args.hvp_micro)
    vec = random_vector(run.model)
    finite: list[bool] = []

    def once() -> None:
        _, g, hv = grad_and_hvp(run.model, micro, vec, method="double_backward", out_device=None)
        if not finite:
            finite.append(all(bool(torch.isfinite(x).all()) for x in (*g.values(), *hv.values())))
            run.hv_ref = {n: hv[n].detach().float().clone() for n in ref_names(run.model)}
        del g, hv

    t = statistics.median(timed(once, b.dev, b.args.hvp_repeats))
    gib = 3 * 4 * sum(p.numel() for p in run.model.parameters()) / GIB
    return {"seconds": t, "ratio": ratio(t, run.t_fb), "ratio_to": "fwd_bwd", "finite": finite[0],
            "micro_batches": len(micro), "buffers_gib": gib,
            "note": f"{len(micro)} micro-batches of {b.args.hvp_micro}, eager attention, finite: {finite[0]}; "
                    f"v, g, Hv in fp32: {gib:.1f} GiB"}


def part_hvp_lean(b: Bench, run: ShapeRun) -> Record:
    """The memory-lean call: no ∇L (with_grad=False), vector and H v in the parameters' dtype (acc_dtype).

    One timed call, no warm-up (the hvp part ran the same kernels just before)."""
    from crossroute.measure.hvp import grad_and_hvp

    micro = micro_batches(run.batch, b.args.hvp_micro)
    vec = random_vector(run.model, dtype=b.dtype)
    sync(b.dev)
    t0 = time.perf_counter()
    _, _, hv = grad_and_hvp(run.model, micro, vec, out_device=None, with_grad=False, acc_dtype=b.dtype)
    sync(b.dev)
    t = time.perf_counter() - t0
    finite = all(bool(torch.isfinite(x).all()) for x in hv.values())
    num = sum(float((hv[n].float() - r).square().sum()) for n, r in run.hv_ref.items())
    den = sum(float(r.square().sum()) for r in run.hv_ref.values())
    rel = (num / den) ** 0.5 if den else None
    gib = 2 * b.dtype.itemsize * sum(p.numel() for p in run.model.parameters()) / GIB
    dtype = str(b.dtype).removeprefix("torch.")
    return {"seconds": t, "ratio": ratio(t, run.t_fb), "ratio_to": "fwd_bwd", "finite": finite,
            "acc_dtype": dtype, "rel_diff_vs_fp32": rel, "buffers_gib": gib,
            "note": f"with_grad=False, acc_dtype={dtype}: v, Hv {gib:.1f} GiB; finite: {finite}; "
                    f"layer-0 q/down H v rel. diff to fp32 {fmt(rel, '.1e') or 'n/a'}"}


def part_sdpa_probe(b: Bench, run: ShapeRun) -> Record:
    """Double backward with SDPA attention left on; if it works, compare with the eager H v."""
    from crossroute.measure.hvp import grad_and_hvp
    from crossroute.measure.proxy import proxy_loss

    model, mb = run.model, micro_batches(run.batch, b.args.hvp_micro)[0]
    model.eval()
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    vec = random_vector(model)
    t0 = time.perf_counter()
    try:
        gs = torch.autograd.grad(proxy_loss(model, mb), params, create_graph=True)
        hs = torch.autograd.grad(gs, params, grad_outputs=[vec[n].to(g.dtype) for n, g in zip(names, gs, strict=True)],
                                 allow_unused=True)
        sync(b.dev)
    except Exception as exc:  # noqa: BLE001 - the failure is the finding
        return {"seconds": None, "ratio": None, "outcome": describe(exc),
                "attn": model.config._attn_implementation, "note": f"error: {describe(exc)}"}
    finally:
        model.train()
    t = time.perf_counter() - t0
    del gs
    eager = grad_and_hvp(model, [mb], vec, out_device=None)[2]
    num = sum(float((h.float() - eager[n]).square().sum()) for n, h in zip(names, hs, strict=True) if h is not None)
    den = sum(float(e.square().sum()) for e in eager.values())
    rel = (num / den) ** 0.5 if den else None
    return {"seconds": t, "ratio": None, "outcome": "ok", "rel_diff_vs_eager": rel,
            "note": f"ok; one micro-batch; rel. diff to eager H v {rel:.2e}" if rel is not None else "ok"}


def part_generate(b: Bench, run: ShapeRun) -> Record:
    model, vocab = run.model, run.shape.config["vocab_size"]
    n, new = b.args.gen_batch, run.shape.new_tokens
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, vocab, (n, b.args.prompt_len), generator=gen).to(b.dev)
    mask = torch.ones_like(ids)
    model.eval()

    def go(k: int) -> None:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=True,
                           temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0, eos_token_id=1)

    go(2)  # warm-up
    t = statistics.median(timed(lambda: go(new), b.dev, b.args.gen_repeats, warmup=0))
    model.train()
    rate = n * new / t
    return {"seconds": t, "ratio": ratio(t, run.t_fb), "ratio_to": "fwd_bwd", "new_tokens_per_s": rate,
            "note": f"batch {n} x {new} new tokens: {rate:,.0f} new tokens/s"}


# ----------------------------------------------------------------------------- parts: diff


def part_diff_write(b: Bench, run: ShapeRun, root: Path) -> Record:
    """Save before/after as bf16 safetensors + config.json; the after-before changed fraction is exact."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    gen = torch.Generator(device=b.dev).manual_seed(1)
    before, after = {}, {}
    changed = total = 0
    for n, p in run.model.named_parameters():  # tied lm_head is not listed again: no shared storage
        a = p.detach().to(torch.bfloat16)
        c = perturb(a, PERTURB_FRACTION, gen)
        changed += int((c != a).sum())
        total += a.numel()
        before[n], after[n] = a.to("cpu", copy=True), c.to("cpu", copy=True)
        del a, c
    for sub, sd in (("before", before), ("after", after)):
        (root / sub).mkdir(parents=True)
        save_file(sd, str(root / sub / "model.safetensors"), metadata={"format": "pt"})
        run.model.config.to_json_file(str(root / sub / "config.json"))
    t = time.perf_counter() - t0
    run.files = [root / "before" / "model.safetensors", root / "after" / "model.safetensors"]
    run.planted = changed / total
    size = sum(f.stat().st_size for f in run.files)
    return {"seconds": t, "ratio": None, "bytes": size, "planted_fraction": run.planted,
            "note": f"2 x {size / 2e9:.2f} GB, planted changed fraction {run.planted:.4%}"}


def read_all(files: list[Path], buf: bytearray) -> int:
    """Read every byte of `files` into the reused `buf`; returns the bytes read."""
    view, n = memoryview(buf), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while got := fh.readinto(view):
                n += got
    return n


def throughput(run: ShapeRun, t: float, extra: Record, what: str) -> Record:
    size = sum(f.stat().st_size for f in run.files)
    rate = size / t / 1e9
    return {"seconds": t, "ratio": ratio(run.raw_s, t), "ratio_to": "diff_raw_read (GB/s over GB/s)",
            "gb_per_s": rate, **extra,
            "note": f"{rate:.2f} GB/s{what}"}


def part_raw_read(b: Bench, run: ShapeRun) -> Record:
    buf = bytearray(64 << 20)
    read_all(run.files, buf)  # warm-up: both files in the page cache
    t0 = time.perf_counter()
    n = read_all(run.files, buf)
    run.raw_s = time.perf_counter() - t0
    return throughput(run, run.raw_s, {"bytes": n}, " (baseline)")


def part_diff_crossroute(b: Bench, run: ShapeRun) -> Record:
    from crossroute.analyze.diff import diff_checkpoints

    workers = os.cpu_count() or 1
    times = []
    for _ in range(b.args.diff_repeats):
        t0 = time.perf_counter()
        res = diff_checkpoints(run.files[0].parent, run.files[1].parent, workers=workers)
        times.append(time.perf_counter() - t0)
    t = min(times)
    changed = 1.0 - sum(x.zero for x in res.tensors) / res.numel
    return throughput(run, t, {"changed_fraction": changed, "planted_fraction": run.planted, "workers": workers},
                      f", {workers} workers, changed {changed:.4%} (planted {run.planted:.4%})")


def naive_diff(files: list[Path], dev: torch.device) -> tuple[float, float]:
    """(‖after - before‖, changed fraction), tensor by tensor via safe_open, computing on `dev`."""
    from safetensors import safe_open

    sq = torch.zeros((), dtype=torch.float64, device=dev)
    nz = torch.zeros((), dtype=torch.int64, device=dev)
    total = 0
    with safe_open(str(files[0]), framework="pt") as fa, safe_open(str(files[1]), framework="pt") as fb:
        for k in fa.keys():  # noqa: SIM118 - safe_open handles are not iterable
            a, c = fa.get_tensor(k).to(dev), fb.get_tensor(k).to(dev)
            d = (c - a).float()
            sq += torch.linalg.vector_norm(d).double() ** 2
            nz += torch.count_nonzero(d)
            total += d.numel()
    return float(sq) ** 0.5, int(nz) / total


def part_naive(b: Bench, run: ShapeRun, dev: torch.device) -> Record:
    times = []
    for _ in range(b.args.diff_repeats):
        t0 = time.perf_counter()
        norm, changed = naive_diff(run.files, dev)
        sync(dev)
        times.append(time.perf_counter() - t0)
    t = min(times)
    return throughput(run, t, {"changed_fraction": changed, "delta_norm": norm}, f", changed {changed:.4%}")


def bench_diff(b: Bench, run: ShapeRun) -> None:
    """The diff parts over two checkpoints written under --workdir (deleted afterwards)."""
    name = run.shape.name
    root = Path(tempfile.mkdtemp(prefix=f"bench_gpu_{name}_", dir=b.args.workdir))
    try:
        written = b.run(name, "diff_write", lambda: part_diff_write(b, run, root))
        if written.get("seconds") is None:
            for part in ("diff_raw_read", "diff_crossroute", "diff_naive_cpu", "diff_naive_gpu"):
                b.skip(name, part, written.get("skipped") or "no checkpoints")
            return
        b.run(name, "diff_raw_read", lambda: part_raw_read(b, run))
        b.run(name, "diff_crossroute", lambda: part_diff_crossroute(b, run))
        b.run(name, "diff_naive_cpu", lambda: part_naive(b, run, torch.device("cpu")))
        if b.dev.type == "cuda":
            b.run(name, "diff_naive_gpu", lambda: part_naive(b, run, b.dev))
        else:
            b.skip(name, "diff_naive_gpu", "no cuda")
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- parts: rollback, GRPO


def part_rollback(b: Bench, run: ShapeRun) -> Record:
    from crossroute.model.units import UnitMap
    from crossroute.repair.rollback import Swapper, budget

    model = run.model
    gen = torch.Generator(device=b.dev).manual_seed(3)
    with torch.no_grad():
        source = {n: perturb(p.detach(), PERTURB_FRACTION, gen) for n, p in model.named_parameters()}
    umap = UnitMap.of_model(model)
    swapper = Swapper(model, source, umap)
    del source
    pool = [u for k in umap.partition_kinds for u in umap.ids(k)]  # the sweep's joint pool: neurons, heads, KV groups
    units = random.Random(0).sample(pool, budget(len(pool), ROLLBACK_PERCENT))
    inputs = {"input_ids": run.batch["input_ids"], "attention_mask": run.batch["attention_mask"]}
    model.eval()

    def forward() -> None:
        with torch.no_grad():
            model(**inputs)

    def point() -> None:
        with swapper.rolled_back(units):
            forward()

    t_fwd = statistics.median(timed(forward, b.dev, b.args.repeats))
    t_point = statistics.median(timed(point, b.dev, b.args.repeats))
    model.train()
    return {"seconds": t_point, "ratio": ratio(t_point, t_fwd), "ratio_to": "one no-grad forward",
            "forward_s": t_fwd, "swap_s": t_point - t_fwd,
            "units": len(units), "pool": len(pool),
            "note": f"ratio to one forward ({t_fwd:.3f} s); {len(units)} of {len(pool)} units"}


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (generation included), synchronised at both ends."""

    def __init__(self, dev: torch.device) -> None:
        self.dev, self.times, self._t0 = dev, [], 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sync(self.dev)
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sync(self.dev)
        self.times.append(time.perf_counter() - self._t0)


def word_tokenizer(vocab: int) -> Any:
    """WordLevel tokenizer of `vocab` tokens split on whitespace: <pad>, </s>, <unk>, then t3..t{vocab-1}.

    The special tokens are not named t0..t2: added tokens match inside words ("t17" would become t1 + 7)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    text = f"t3 t17 t{vocab - 1}"
    ids = tok(text)["input_ids"]
    if ids != [3, 17, vocab - 1] or tok.decode(ids) != text or len(tok) != vocab:
        raise RuntimeError(f"synthetic tokenizer does not round-trip: {text!r} -> {ids} -> {tok.decode(ids)!r}")
    return tok


def reward_len_mod3(completions: list[Any], **kwargs: Any) -> list[float]:
    """A cheap deterministic reward: the completion's token count mod 3."""
    return [float(len(str(c).split()) % 3) for c in completions]


def grpo_config(b: Bench, run: ShapeRun, out: str) -> Any:
    from trl import GRPOConfig

    kw: dict[str, Any] = dict(
        output_dir=out, max_steps=b.args.grpo_steps, per_device_train_batch_size=64, num_generations=8,
        max_completion_length=run.shape.new_tokens, learning_rate=1e-6, beta=0.0, report_to=[],
        save_strategy="no", logging_steps=1, disable_tqdm=True, gradient_checkpointing=False, seed=0)
    kw.update({"bf16": True} if b.dev.type == "cuda" else {"use_cpu": True, "bf16": False})
    return GRPOConfig(**kw)


def part_grpo(b: Bench, run: ShapeRun) -> Record:
    from datasets import Dataset
    from trl import GRPOTrainer

    vocab = run.shape.config["vocab_size"]
    tok = word_tokenizer(vocab)
    rng = random.Random(4)
    prompts = [" ".join(f"t{rng.randrange(3, vocab)}" for _ in range(b.args.prompt_len)) for _ in range(64)]
    timer = StepTimer(b.dev)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_grpo_", dir=b.args.workdir) as out:
        trainer = GRPOTrainer(model=run.model, reward_funcs=reward_len_mod3, args=grpo_config(b, run, out),
                              train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                              callbacks=[timer])
        try:
            trainer.train()
            logs = [h for h in trainer.state.log_history if "reward" in h]
        finally:
            trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
            run.model.zero_grad(set_to_none=True)
            del trainer
    steps = timer.times[1:] or timer.times
    t = statistics.median(steps)
    length = logs[-1].get("completions/mean_length") if logs else None
    return {"seconds": t, "ratio": ratio(t, run.t_fb), "ratio_to": "fwd_bwd", "step_times": timer.times,
            "trl_step_times": [h.get("step_time") for h in logs], "completion_mean_length": length,
            "note": f"median of {len(steps)} steps after 1 warm-up; 64 completions x {run.shape.new_tokens} tokens"}


# ----------------------------------------------------------------------------- driver


def bench_shape(b: Bench, shape: Shape) -> None:
    dev, name = b.dev, shape.name
    batch, seq = shape.batch or b.args.batch, shape.seq or b.args.seq
    if b.left() <= 0:
        for part in PARTS:
            b.skip(name, part, "budget")
        return
    try:
        model = build_model(shape, dev, b.dtype)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        b.shape_entry(name)["error"] = describe(exc)
        b.save()
        return
    b.shape_entry(name).update(params=sum(p.numel() for p in model.parameters()), param_gib=param_bytes(model) / GIB,
                               dtype=str(b.dtype), batch=batch, seq=seq, config=shape.config)
    run = ShapeRun(shape, model, make_batch(shape.config["vocab_size"], batch, seq, dev))
    b.run(name, "fwd_bwd", lambda: part_fwd_bwd(b, run))
    b.run(name, "hvp", lambda: part_hvp(b, run))
    b.run(name, "hvp_lean", lambda: part_hvp_lean(b, run))
    run.hv_ref = {}
    if shape.sdpa_probe:
        b.run(name, "sdpa_double_backward", lambda: part_sdpa_probe(b, run))
    else:
        b.skip(name, "sdpa_double_backward", "probed on 0.6b only")
    b.run(name, "generate", lambda: part_generate(b, run))
    bench_diff(b, run)
    b.run(name, "rollback_point", lambda: part_rollback(b, run))
    b.run(name, "grpo_step", lambda: part_grpo(b, run))  # last: the trainer leaves its mark on the model


def fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def table(data: dict[str, Any]) -> str:
    lines = ["| shape | part | seconds | ratio | peak GPU GiB | note |", "|---|---|---|---|---|---|"]
    for name, entry in data["shapes"].items():
        if "error" in entry:
            lines.append(f"| {name} | build | | | | {entry['error']} |")
        lines += [row(name, part, rec) for part, rec in entry["parts"].items()]
    return "\n".join(lines)


def row(shape: str, part: str, rec: Record) -> str:
    note = str(rec.get("note", "")).replace("|", "/")
    return (f"| {shape} | {part} | {fmt(rec.get('seconds'), '.4g')} | {fmt(rec.get('ratio'), '.3g')} | "
            f"{fmt(rec.get('peak_gib'), '.2f')} | {note} |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", required=True, help="results JSON (rewritten after every part)")
    ap.add_argument("--shapes", default="0.6b,4b", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--hvp-micro", type=int, default=2, help="sequences per HVP micro-batch")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (after one warm-up)")
    ap.add_argument("--hvp-repeats", type=int, default=2)
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--gen-repeats", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt tokens for generate and GRPO")
    ap.add_argument("--grpo-steps", type=int, default=3, help="GRPO steps; the first is the warm-up")
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--parts", default="", help="comma-separated part-name prefixes to run (default: all), e.g. diff")
    ap.add_argument("--diff-repeats", type=int, default=2, help="diff timings: the best of this many passes")
    ap.add_argument("--workdir", default=tempfile.gettempdir(), help="where checkpoints are written")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape {unknown[0]!r}; use {', '.join(SHAPES)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    b = Bench(args, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    b.save()
    for name in args.shapes.split(","):
        bench_shape(b, SHAPES[name])
        free_memory(dev)  # the shape's model and batch went with bench_shape's frame
    b.data["total_s"] = time.perf_counter() - b.t0
    b.save()
    print(table(b.data), flush=True)
    return b.data


if __name__ == "__main__":
    main()
