"""Streaming diff vs raw read throughput on two ~1.2 GB Qwen3-0.6B-shaped checkpoints.

Usage: python benchmarks/bench_diff.py [--dir /tmp] [--dtype bf16] [--out RESULTS_diff.md]

Files are generated in a child process (so its memory does not count), then this process
measures raw read throughput of all bytes of both checkpoints and the diff throughput, both with
the page cache dropped first ("cold", when /proc/sys/vm/drop_caches is writable) and warm.
Bars: diff throughput >= 0.5 x raw read throughput; peak RSS <= 2 x largest tensor + 500 MB.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

SHAPE = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
             num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


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


def all_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Qwen3-0.6B-shaped model (tied embeddings)."""
    shapes = {"model.embed_tokens.weight": (SHAPE["vocab_size"], SHAPE["hidden_size"])}
    for i in range(SHAPE["num_hidden_layers"]):
        shapes.update(_layer_shapes(i))
    shapes["model.norm.weight"] = (SHAPE["hidden_size"],)
    return shapes


def generate(root: Path, dtype: torch.dtype, shard_bytes: int) -> None:
    """Write base/ and ckpt/ (a sparse perturbation of base) as sharded safetensors checkpoints."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    shards: list[list[str]] = [[]]
    size = 0
    shapes = all_shapes()
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    config = dict(SHAPE, architectures=["Qwen3ForCausalLM"], model_type="qwen3",
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
            if len(shape) == 1:
                a = torch.ones(shape, dtype=torch.float32)
            else:
                a = torch.randn(shape, generator=gen) * 0.02
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


def drop_caches() -> bool:
    """Drop the page cache (needs root); True when it worked."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def raw_read(files: list[Path]) -> float:
    """Seconds to read every byte of `files` with os.readv in 64 MiB chunks."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            while os.readv(fd, [view]):
                pass
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def timed_diff(root: Path) -> tuple[float, object]:
    from crossroute.analyze.diff import diff_checkpoints

    t0 = time.perf_counter()
    res = diff_checkpoints(root / "base", root / "ckpt")
    return time.perf_counter() - t0, res


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--shard-mb", type=int, default=500)
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS_diff.md")))
    ap.add_argument("--generate", help=argparse.SUPPRESS)
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    if args.generate:
        generate(Path(args.generate), dtype, args.shard_mb << 20)
        return
    root = Path(tempfile.mkdtemp(prefix="bench_diff_", dir=args.dir))
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--shard-mb",
                        str(args.shard_mb), "--generate", str(root)], check=True)
        gen_s = time.perf_counter() - t0
        files = sorted((root / "base").glob("*.safetensors")) + sorted(
            (root / "ckpt").glob("*.safetensors"))
        total = sum(f.stat().st_size for f in files)
        largest = max(math.prod(s) for s in all_shapes().values()) * dtype.itemsize
        rss0 = psutil.Process().memory_info().rss
        load = os.getloadavg()[0]
        rows = []
        for mode in ("cold", "warm"):
            if mode == "cold" and not drop_caches():
                rows.append((mode, None, None, None))
                continue
            if mode == "warm":
                raw_read(files)
            raw_s = raw_read(files)
            if mode == "cold":
                drop_caches()
            diff_s, res = timed_diff(root)
            rows.append((mode, total / raw_s, total / diff_s, diff_s))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        summary = res.to_json(include_unit_scores=False)
        report = render(args, rows, total, largest, peak, rss0, gen_s, summary, load)
        print(report)
        Path(args.out).write_text(report)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def render(args: argparse.Namespace, rows: list, total: int, largest: int, peak: int,
           rss0: int, gen_s: float, summary: dict, load: float) -> str:
    bar_rss = 2 * largest + 500e6
    lines = [
        "## Diff throughput (issue 4)", "",
        f"- Machine: {os.cpu_count()} CPUs (`nproc` {len(os.sched_getaffinity(0))}), "
        f"{cpu_model()}, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"{dt.date.today().isoformat()}; 1-min load average {load:.1f} when measuring "
        "(other jobs shared the machine).",
        f"- Checkpoints: two Qwen3-0.6B-shaped random {args.dtype} checkpoints, "
        f"{total / 2 / 1e9:.2f} GB each ({total / 1e9:.2f} GB read per diff), "
        f"~{args.shard_mb} MB shards; ckpt = base + N(0, 1e-3) on 15 % of entries "
        f"(generated in {gen_s:.0f} s). Largest tensor {largest / 1e6:.0f} MB.",
        f"- Diff found {100 * summary['zero_fraction']:.1f} % of entries unchanged, "
        f"rel. change {summary['rel_change']:.2e}.", "",
        "| page cache | raw read GB/s | diff GB/s | diff s | ratio (bar >= 0.5) |",
        "|---|---|---|---|---|",
    ]
    for mode, raw, diff, secs in rows:
        if raw is None:
            lines.append(f"| {mode} | n/a (drop_caches not permitted) | | | |")
            continue
        verdict = "pass" if diff / raw >= 0.5 else "FAIL"
        lines.append(f"| {mode} | {raw / 1e9:.2f} | {diff / 1e9:.2f} | {secs:.1f} | "
                     f"{diff / raw:.2f} ({verdict}) |")
    lines += [
        "",
        f"Peak RSS of the measuring process: {peak / 1e6:.0f} MB (of which {rss0 / 1e6:.0f} MB "
        f"before any read: interpreter + torch); bar 2 x {largest / 1e6:.0f} MB + 500 MB = "
        f"{bar_rss / 1e6:.0f} MB: {'pass' if peak <= bar_rss else 'FAIL'}.",
        "Cold: `echo 3 > /proc/sys/vm/drop_caches` before each measurement; "
        "warm: the files were read once before measuring.", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
