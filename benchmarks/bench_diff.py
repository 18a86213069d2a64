"""Streaming diff (numba kernel and the torch reference path) vs raw reads on a generated bf16 checkpoint pair.

Usage: python benchmarks/bench_diff.py [--dir /tmp] [--layers 14] [--workers 2] [--repeat 1]

One run measures, on the same files: a raw read of every byte of both checkpoints, the diff with the numba kernel
and the diff with the torch path (the baseline), first with the page cache warm, then cold (every file evicted
with posix_fadvise(DONTNEED) before each measurement; a cold raw read and mincore check that eviction worked).
Each diff runs in a child process, so its peak RSS is its own (not the generator's); the numba kernel is loaded
(or compiled) before the clock starts and that time is reported apart, as is a compile with an empty cache.
Bars: numba diff >= 0.5 x warm raw read and >= 0.9 x cold raw read; peak RSS <= 2 x largest tensor + 0.5 GB.
The 1-min load average is recorded next to every figure (the machine may be shared). The files are generated in a
child process under --dir and removed at the end. Prints a markdown table; writes --json.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import math
import mmap
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPE = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
             vocab_size=151936)
DTYPES = ("bf16", "fp32")
ROOT = Path(__file__).resolve().parents[1]
BAR_WARM, BAR_COLD = 0.5, 0.9
RAW_CHUNK = 1 << 20


def _layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    h, inter = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    q = SHAPE["num_attention_heads"] * SHAPE["head_dim"]
    kv = SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    p = f"model.layers.{i}."
    return {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (SHAPE["head_dim"],),
            p + "self_attn.k_norm.weight": (SHAPE["head_dim"],),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter)}


def all_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Qwen3-0.6B-shaped model with `layers` layers (tied embeddings)."""
    shapes = {"model.embed_tokens.weight": (SHAPE["vocab_size"], SHAPE["hidden_size"])}
    for i in range(layers):
        shapes.update(_layer_shapes(i))
    shapes["model.norm.weight"] = (SHAPE["hidden_size"],)
    return shapes


def generate(root: Path, dtype_name: str, shard_bytes: int, layers: int) -> None:
    """Write base/ and ckpt/ (base + N(0, 1e-3) on 15 % of entries) as sharded safetensors checkpoints."""
    import torch
    from safetensors.torch import save_file

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    shards: list[list[str]] = [[]]
    size = 0
    shapes = all_shapes(layers)
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    config = dict(SHAPE, num_hidden_layers=layers, architectures=["Qwen3ForCausalLM"], model_type="qwen3",
                  tie_word_embeddings=True, torch_dtype=str(dtype).removeprefix("torch."))
    for sub in ("base", "ckpt"):
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text(json.dumps(config))
    weight_map = {}
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        base, ckpt = {}, {}
        for name in names:
            shape = shapes[name]
            a = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
            mask = torch.rand(shape, generator=gen) < 0.15
            b = a + mask * torch.randn(shape, generator=gen) * 1e-3
            base[name], ckpt[name] = a.to(dtype), b.to(dtype)
            weight_map[name] = fname
        save_file(base, str(root / "base" / fname), metadata={"format": "pt"})
        save_file(ckpt, str(root / "ckpt" / fname), metadata={"format": "pt"})
        del base, ckpt
    index = {"metadata": {}, "weight_map": weight_map}
    for sub in ("base", "ckpt"):
        (root / sub / "model.safetensors.index.json").write_text(json.dumps(index))


# ----------------------------------------------------------------------------- page cache


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (posix_fadvise DONTNEED; works without root)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(files: list[Path]) -> float:
    """Share of the files' pages in the page cache (mincore of a private mapping that touches nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    resident = total = 0
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh, mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY) as mm:
            n = (size + page - 1) // page
            vec = ctypes.create_string_buffer(n)
            addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                return float("nan")
            resident += sum(b & 1 for b in vec.raw)
            total += n
    return resident / total if total else 0.0


def raw_read(files: list[Path], chunk: int = RAW_CHUNK, willneed: bool = False) -> float:
    """Seconds to read every byte of `files` with os.readv in `chunk`-byte pieces (1 MiB: the fastest here; the
    earlier 64 MiB pieces run at a quarter of it, the buffer being far larger than the caches), optionally asking
    for readahead of each whole file first (posix_fadvise WILLNEED: the best a cold read gets)."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            if willneed:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            while os.readv(fd, [view]):
                pass
        finally:
            os.close(fd)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- the diff, in a child process


def child_diff(root: Path, kernel: str, workers: int, out: Path) -> None:
    """Run one diff; write {seconds, load_s, import_s, peak_rss, result} to `out`."""
    t0 = time.perf_counter()
    import numpy as np
    import torch

    from crossroute.analyze import diff_kernel
    from crossroute.analyze.diff import diff_checkpoints

    torch.set_num_threads(1)
    t1 = time.perf_counter()
    if kernel == "numba":  # load the compiled kernel (disk cache, or compile) before the clock starts
        stats = diff_kernel.PieceStats([1e-5], 8, 1, None)
        raw = np.zeros(16, dtype=np.uint8)
        stats.block(raw, diff_kernel.STORAGE_CODES[torch.bfloat16], raw, diff_kernel.STORAGE_CODES[torch.bfloat16],
                    0, 1, diff_kernel.POS_NONE)
    t2 = time.perf_counter()
    res = diff_checkpoints(root / "base", root / "ckpt", workers=workers, kernel=kernel)
    t3 = time.perf_counter()
    out.write_text(json.dumps({
        "seconds": t3 - t2, "load_s": t2 - t1, "import_s": t1 - t0, "kernel": res.kernel,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cache_notes": diff_kernel.CACHE_NOTES, "result": res.to_json(include_unit_scores=True)}))


def run_child(root: Path, kernel: str, workers: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        subprocess.run([sys.executable, __file__, "--child-diff", str(root), "--kernel", kernel,
                        "--workers", str(workers), "--child-out", tmp.name],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        return json.loads(Path(tmp.name).read_text())


def compare(a: Any, b: Any, where: str = "", rel: list[float] | None = None) -> list[str]:
    """Differences between two diff results other than floats (counts, fractions of counts, names: exact);
    the largest relative difference of the floats is appended to `rel`."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys differ"]
        return [d for k in a for d in compare(a[k], b[k], f"{where}.{k}", rel)]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: lengths differ"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in compare(x, y, f"{where}[{i}]", rel)]
    exact = any(k in where for k in ("below", "zero_fraction", "histogram", "resolution", "max_abs", "numel"))
    if isinstance(a, float) and isinstance(b, float) and not exact:
        if rel is not None and a != b:
            rel.append(abs(a - b) / max(abs(a), abs(b)))
        return []
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


# ----------------------------------------------------------------------------- main


def load() -> float:
    return os.getloadavg()[0]


def measure(root: Path, files: list[Path], workers: int) -> list[dict[str, Any]]:
    """One round: warm raw / numba / torch, then cold raw / numba / torch (each evicted first)."""
    total = sum(f.stat().st_size for f in files)
    rows: list[dict[str, Any]] = []

    def add(cache: str, what: str, seconds: float, load_before: float, **extra: Any) -> None:
        rows.append(dict(cache=cache, what=what, seconds=seconds, gb_s=total / seconds / 1e9,
                         load=load_before, load_after=load(), **extra))

    raw_read(files)  # warm the cache
    for _ in range(2):  # the second read is the figure; the first may still fault pages in
        ld = load()
        secs = raw_read(files)
    add("warm", "raw read", secs, ld)
    ld = load()
    add("warm", "raw read 64 MiB", raw_read(files, 64 << 20), ld)
    results = {}
    for kernel in ("numba", "torch"):
        ld = load()
        out = run_child(root, kernel, workers)
        results[kernel] = out
        add("warm", f"diff {kernel}", out["seconds"], ld, peak_rss=out["peak_rss"], load_s=out["load_s"],
            kernel=out["kernel"])
    for what in ("raw read", "raw read WILLNEED", "diff numba", "diff torch"):
        evict(files)
        resident = resident_fraction(files)
        ld = load()
        if what.startswith("raw read"):
            add("cold", what, raw_read(files, willneed=what.endswith("WILLNEED")), ld, resident_before=resident)
        else:
            kernel = what.split()[1]
            out = run_child(root, kernel, workers)
            add("cold", what, out["seconds"], ld, peak_rss=out["peak_rss"], load_s=out["load_s"],
                kernel=out["kernel"], resident_before=resident)
    rel: list[float] = []
    a, b = (dict(results[k]["result"], kernel=None) for k in ("numba", "torch"))
    diffs = compare(a, b, rel=rel)
    rows.append(dict(cache="-", what="numba == torch", mismatches=diffs[:10], n_mismatches=len(diffs),
                     float_max_rel=max(rel, default=0.0)))
    return rows


def compile_time(root: Path, workers: int) -> dict[str, Any]:
    """The numba kernel's first-call compile time with an empty cache (NUMBA_CACHE_DIR set to a new dir)."""
    with tempfile.TemporaryDirectory(prefix="numba_cache_") as cache:
        ld = load()
        first = run_child(root, "numba", workers, env={"NUMBA_CACHE_DIR": cache})
        again = run_child(root, "numba", workers, env={"NUMBA_CACHE_DIR": cache})
    return {"compile_s": first["load_s"], "cache_load_s": again["load_s"], "load": ld,
            "note": "one compiled signature serves bf16, fp16 and fp32 storage (raw bytes in, dtype code as data)"}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def render(meta: dict[str, Any], rows: list[dict[str, Any]], comp: dict[str, Any]) -> str:
    bar_rss = meta["rss_bar"]
    lines = [
        "## Diff throughput: numba kernel vs torch path vs raw read (issue 19)", "",
        f"- Machine: {meta['cpus']} CPUs, {meta['cpu']}, {meta['ram_gib']:.0f} GiB RAM; {meta['date']}; "
        f"workers {meta['workers']}; numba {meta['numba']}, torch {meta['torch']}.",
        f"- Checkpoints: two Qwen3-0.6B-shaped random {meta['dtype']} checkpoints with {meta['layers']} layers, "
        f"{meta['bytes'] / 2e9:.2f} GB each ({meta['bytes'] / 1e9:.2f} GB read per diff); ckpt = base + "
        f"N(0, 1e-3) on 15 % of entries. Largest tensor {meta['largest'] / 1e6:.0f} MB.",
        f"- numba kernel: compile with an empty cache {comp['compile_s']:.1f} s (load {comp['load']:.2f}), "
        f"load from the disk cache {comp['cache_load_s']:.2f} s (both outside the timed diff).",
        f"- Raw read: os.readv in {RAW_CHUNK >> 20} MiB pieces, file after file (the bar's baseline); also shown: "
        "64 MiB pieces (the earlier bench's read) and, cold, with posix_fadvise(WILLNEED) per file first.", "",
        "| round | page cache | what | s | GB/s | vs raw read (same cache) | vs torch | peak RSS MB | "
        "1-min load before / after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["cache"] == "-":
            continue
        raw = next(x for x in rows if x["round"] == r["round"] and x["cache"] == r["cache"] and x["what"] == "raw read")
        torch_row = next((x for x in rows if x["round"] == r["round"] and x["cache"] == r["cache"]
                          and x["what"] == "diff torch"), None)
        ratio = r["gb_s"] / raw["gb_s"]
        bar = BAR_WARM if r["cache"] == "warm" else BAR_COLD
        verdict = "" if r["what"] != "diff numba" else (" (pass)" if ratio >= bar else f" (FAIL, bar {bar})")
        vs_torch = f"{torch_row['seconds'] / r['seconds']:.2f}x" if torch_row and r["what"].startswith("diff") else ""
        rss = f"{r['peak_rss'] / 1e6:.0f}" if "peak_rss" in r else ""
        extra = f"; {100 * r['resident_before']:.1f} % resident before" if "resident_before" in r else ""
        lines.append(f"| {r['round']} | {r['cache']} | {r['what']} | {r['seconds']:.2f} | {r['gb_s']:.2f} | "
                     f"{ratio:.2f}{verdict} | {vs_torch} | {rss} | {r['load']:.2f} / {r['load_after']:.2f}{extra} |")
    for r in rows:
        if r["cache"] == "cold" and r["what"] == "diff numba":
            best = next(x for x in rows if x["round"] == r["round"] and x["what"] == "raw read WILLNEED")
            r["vs_willneed_read"] = r["gb_s"] / best["gb_s"]
    strict = ", ".join(f"{r['vs_willneed_read']:.2f}" for r in rows if "vs_willneed_read" in r)
    peaks = [r["peak_rss"] for r in rows if r.get("what") == "diff numba"]
    checks = [r for r in rows if r["cache"] == "-"]
    lines += [
        "",
        f"Peak RSS of the numba diff (child process): max {max(peaks) / 1e6:.0f} MB; bar 2 x "
        f"{meta['largest'] / 1e6:.0f} MB + 500 MB = {bar_rss / 1e6:.0f} MB: "
        f"{'pass' if max(peaks) <= bar_rss else 'FAIL'}.",
        "numba vs torch results: counts, threshold fractions, histogram, max|δ|, resolution "
        + ", ".join("identical" if not c["n_mismatches"] else f"{c['n_mismatches']} MISMATCHES" for c in checks)
        + "; float sums (norms, rel. change, unit scores) differ by at most "
        + ", ".join(f"{c['float_max_rel']:.1e}" for c in checks)
        + " relative (the torch path accumulates in fp32, numba in float64).",
        "Cold: posix_fadvise(DONTNEED) on every file before each cold measurement (mincore share shown). "
        f"Cold numba diff vs the cold raw read with WILLNEED (the stricter baseline): {strict}.", "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--layers", type=int, default=14, help="14: 0.75 GB per bf16 checkpoint, 1.5 GB per pair")
    ap.add_argument("--shard-mb", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="rounds of the six measurements")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "bench_diff.json"))
    ap.add_argument("--keep", help="reuse (or create and keep) the checkpoint pair in this directory")
    ap.add_argument("--generate", help=argparse.SUPPRESS)
    ap.add_argument("--child-diff", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--kernel", default="numba", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        generate(Path(args.generate), args.dtype, args.shard_mb << 20, args.layers)
        return
    if args.child_diff:
        child_diff(Path(args.child_diff), args.kernel, args.workers, Path(args.child_out))
        return
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_diff_", dir=args.dir))
    try:
        t0 = time.perf_counter()
        if not (root / "ckpt" / "model.safetensors.index.json").exists():
            shutil.rmtree(root, ignore_errors=True)
            subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--shard-mb", str(args.shard_mb),
                            "--layers", str(args.layers), "--generate", str(root)], check=True)
        gen_s = time.perf_counter() - t0
        files = sorted((root / "base").glob("*.safetensors")) + sorted((root / "ckpt").glob("*.safetensors"))
        itemsize = 2 if args.dtype == "bf16" else 4
        largest = max(math.prod(s) for s in all_shapes(args.layers).values()) * itemsize
        comp = compile_time(root, args.workers)
        rows = []
        for k in range(args.repeat):
            rows += [dict(r, round=k + 1) for r in measure(root, files, args.workers)]
        import numba
        import psutil
        import torch

        meta = dict(date=dt.datetime.now().isoformat(timespec="seconds"), cpus=os.cpu_count(), cpu=cpu_model(),
                    ram_gib=psutil.virtual_memory().total / 2**30, workers=args.workers, numba=numba.__version__,
                    torch=torch.__version__, dtype=args.dtype, layers=args.layers,
                    bytes=sum(f.stat().st_size for f in files), largest=largest, rss_bar=2 * largest + 500e6,
                    generate_s=gen_s, uptime=subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
        report = render(meta, rows, comp)
        print(report)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "compile": comp, "rows": rows}, indent=1) + "\n")
    finally:
        if not args.keep:
            with contextlib.suppress(OSError):
                shutil.rmtree(root)


if __name__ == "__main__":
    main()
