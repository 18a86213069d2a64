"""Streaming update anatomy of safetensors checkpoints (DESIGN.md §2.2): δ = ckpt − base in fp32.

Tensors are read in row blocks of ~1 M entries from both checkpoints with `os.preadv` at the byte
offsets of the (validated, JSON-only) safetensors header into reusable buffers: never a whole
model, never a pickle, and no mmap (safe_open's mapping kept every page read resident: RSS grew
to the size of both checkpoints). Memory is a few fixed buffers per worker thread.
"""

from __future__ import annotations

import contextlib
import html
import itertools
import json
import math
import os
import re
import struct
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crossroute.atomic import atomic_write_json
from crossroute.errors import CrossrouteError

THRESHOLDS: tuple[float, ...] = (1e-9, 1e-8, 1e-7, 1e-6, 1e-5)
HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS = -12.0, 0.0, 60
MODULE_TYPES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "embed", "norm", "lm_head", "other",
)
UNIT_KINDS: tuple[str, ...] = ("neuron", "head", "kv")
_UNIT_TAG = {"neuron": "mlp", "head": "head", "kv": "kv"}
CHUNK_ELEMS = 1 << 20  # fp32 entries per streamed block (4 MiB)
PIECE_ELEMS = 1 << 23  # entries per unit of work given to a worker thread (8 blocks)
_MEDIAN_SAMPLES = 1 << 16
PREFETCH_BYTES = 256 << 20  # per checkpoint, requested ahead of the tensors being diffed
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")


# ----------------------------------------------------------------------------- results


@dataclass
class DeltaHistogram:
    """Fixed-bin histogram of log10|δ|: counts[i] covers [edges[i], edges[i+1]); zero/under/over.

    Edges 10**e are truncated to bf16 precision (< 0.8 % off); "zero" is |δ| < 2**-133."""

    edges_log10: list[float]
    counts: list[int]
    zero: int = 0
    underflow: int = 0  # 0 < |δ| < 10**edges[0]
    overflow: int = 0  # |δ| >= 10**edges[-1]

    def to_json(self) -> dict[str, Any]:
        return {"edges_log10": self.edges_log10, "counts": self.counts, "zero": self.zero,
                "underflow": self.underflow, "overflow": self.overflow}


@dataclass
class TensorStats:
    """Statistics of δ for one tensor; `below[i]` counts entries with |δ| < thresholds[i]."""

    name: str
    shape: list[int]
    dtype: str
    module_type: str
    numel: int
    below: list[int]
    zero: int
    delta_sq: float
    base_sq: float
    max_abs: float
    resolution: float
    thresholds: tuple[float, ...]

    @property
    def rel_change(self) -> float | None:
        """‖δ‖ / ‖θ_base‖, None when θ_base is all zeros."""
        return _ratio(self.delta_sq, self.base_sq)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "shape": self.shape, "dtype": self.dtype,
            "module_type": self.module_type, "numel": self.numel,
            "below_fraction": [b / self.numel if self.numel else 0.0 for b in self.below],
            "below_resolution": [t < self.resolution for t in self.thresholds],
            "resolution": self.resolution,
            "zero_fraction": self.zero / self.numel if self.numel else 0.0,
            "delta_norm": math.sqrt(self.delta_sq), "base_norm": math.sqrt(self.base_sq),
            "rel_change": self.rel_change, "max_abs_delta": self.max_abs,
        }


@dataclass
class UpdateAnatomy:
    """Anatomy of one update δ = ckpt − base (DESIGN.md §2.2); `to_json()` is the results layout."""

    base: str
    ckpt: str
    thresholds: tuple[float, ...]
    top_k_percent: float
    tensors: list[TensorStats]
    unit_scores: dict[str, list[list[float]]]
    top_units: dict[str, list[str]]
    histogram: DeltaHistogram
    layout: dict[str, int] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    def below_fraction(self) -> list[float]:
        """Fraction of all entries with |δ| < each threshold."""
        n = self.numel
        return [sum(t.below[i] for t in self.tensors) / n if n else 0.0
                for i in range(len(self.thresholds))]

    def below_resolution_share(self) -> list[float]:
        """Per threshold, the share of entries whose tensor cannot store an update that small."""
        n = self.numel
        return [sum(t.numel for t in self.tensors if tau < t.resolution) / n if n else 0.0
                for tau in self.thresholds]

    def dtype_entries(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.dtype] = out.get(t.dtype, 0) + t.numel
        return out

    def module_rel_change(self) -> dict[str, float | None]:
        """‖δ‖/‖θ_base‖ aggregated over all tensors of each module type present."""
        sums: dict[str, list[float]] = {}
        for t in self.tensors:
            acc = sums.setdefault(t.module_type, [0.0, 0.0])
            acc[0] += t.delta_sq
            acc[1] += t.base_sq
        return {m: _ratio(*sums[m]) for m in MODULE_TYPES if m in sums}

    def top_sets(self) -> dict[str, set[str]]:
        return {k: set(v) for k, v in self.top_units.items()}

    def to_json(self, include_unit_scores: bool = True) -> dict[str, Any]:
        dtypes = self.dtype_entries()
        share = self.below_resolution_share()
        delta_sq = sum(t.delta_sq for t in self.tensors)
        base_sq = sum(t.base_sq for t in self.tensors)
        out: dict[str, Any] = {
            "base": self.base, "ckpt": self.ckpt, "numel": self.numel,
            "dtype": max(dtypes, key=dtypes.__getitem__) if dtypes else None,
            "dtype_entries": dtypes, "thresholds": list(self.thresholds),
            "below_fraction": self.below_fraction(),
            "below_resolution_share": share,
            "below_resolution": [s >= 0.5 for s in share],
            "zero_fraction": sum(t.zero for t in self.tensors) / self.numel if self.numel else 0.0,
            "rel_change": _ratio(delta_sq, base_sq),
            "module_rel_change": self.module_rel_change(),
            "layout": self.layout, "top_k_percent": self.top_k_percent,
            "top_units": self.top_units, "histogram": self.histogram.to_json(),
            "tensors": [t.to_json() for t in self.tensors],
        }
        if include_unit_scores:
            out["unit_scores"] = self.unit_scores
        return out


@dataclass
class SequenceDiff:
    """Each checkpoint against its predecessor, plus Jaccard of top-k unit sets across stages."""

    checkpoints: list[str]
    stages: list[UpdateAnatomy]
    jaccard: dict[str, list[list[float]]]

    @property
    def stage_names(self) -> list[str]:
        return [Path(c).name for c in self.checkpoints[1:]]

    def to_json(self, include_unit_scores: bool = True) -> dict[str, Any]:
        return {"checkpoints": self.checkpoints, "stage_names": self.stage_names,
                "stages": [s.to_json(include_unit_scores) for s in self.stages],
                "jaccard": self.jaccard}


def _ratio(num_sq: float, den_sq: float) -> float | None:
    return math.sqrt(num_sq / den_sq) if den_sq > 0 else None


def jaccard(a: set, b: set) -> float:
    """|A∩B| / |A∪B|; 0.0 when both sets are empty."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


# ----------------------------------------------------------------------------- reading


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


@dataclass
class _TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: list[int]
    start: int  # absolute byte offset of the data in `file`
    nbytes: int


@dataclass
class _Checkpoint:
    root: Path
    tensors: dict[str, _TensorInfo]
    config: dict[str, Any] | None


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start, JSON header) of a safetensors file: 8-byte little-endian length, then JSON."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (OSError, struct.error, ValueError, MemoryError) as exc:
        raise CrossrouteError(f"cannot read safetensors header of {path}: {exc}; "
                              "re-save the checkpoint with save_pretrained") from exc
    header.pop("__metadata__", None)
    return 8 + n, header


def _tensor_infos(path: Path) -> dict[str, _TensorInfo]:
    """Validated tensor locations of one safetensors file (dtype, shape, byte range)."""
    base, header = _read_header(path)
    size = path.stat().st_size
    out = {}
    for name, meta in header.items():
        try:
            dtype = _ST_DTYPES[meta["dtype"]]
            shape = [int(x) for x in meta["shape"]]
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CrossrouteError(f"tensor '{name}' in {path} has an unsupported or malformed "
                                  f"header entry ({exc}); re-save the checkpoint") from exc
        if end - begin != math.prod(shape) * dtype.itemsize or base + end > size or begin < 0:
            raise CrossrouteError(f"tensor '{name}' in {path} has inconsistent data offsets "
                                  "(truncated or corrupt file); re-download or re-save it")
        out[name] = _TensorInfo(path, dtype, shape, base + begin, end - begin)
    return out


def _weight_files(root: Path) -> list[Path]:
    if not root.exists():
        raise CrossrouteError(f"checkpoint {root} does not exist; pass a checkpoint directory "
                              "holding config.json and model.safetensors (or its sharded index)")
    if root.is_file():
        if root.suffix == ".safetensors":
            return [root]
        raise CrossrouteError(f"{root} is not a checkpoint directory; pass the directory holding "
                              "model.safetensors")
    index = root / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CrossrouteError(f"cannot read {index}: {exc}; re-save the checkpoint with "
                                  "save_pretrained") from exc
        files = [root / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.exists():
                raise CrossrouteError(f"{index} lists shard {f.name}, which is missing; copy the "
                                      "missing shard or re-save the checkpoint")
        return files
    if (root / "model.safetensors").exists():
        return [root / "model.safetensors"]
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    if any(root.glob("pytorch_model*.bin")) or any(root.glob("*.pt")) or any(root.glob("*.pth")):
        raise CrossrouteError(
            f"{root} holds only pickle weights (pytorch_model.bin), which crossroute never loads; "
            "convert them once, for a source you trust, with transformers: AutoModelForCausalLM"
            ".from_pretrained(dir).save_pretrained(out, safe_serialization=True)")
    raise CrossrouteError(f"no model.safetensors or model.safetensors.index.json in {root}; pass a "
                          "checkpoint directory written by save_pretrained")


def _load_checkpoint(path: str | Path) -> _Checkpoint:
    root = Path(path)
    files = _weight_files(root)
    tensors: dict[str, _TensorInfo] = {}
    for f in files:
        tensors.update(_tensor_infos(f))
    cfg_path = (root if root.is_dir() else root.parent) / "config.json"
    config = None
    if cfg_path.exists():
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise CrossrouteError(f"cannot parse {cfg_path}: {exc}; fix or re-save it") from exc
    return _Checkpoint(root, tensors, config)


def _check_same_architecture(a: _Checkpoint, b: _Checkpoint) -> None:
    """Raise naming the first tensor whose presence or shape differs between A and B."""
    for name in sorted(set(a.tensors) ^ set(b.tensors)):
        where, missing = ("A", "B") if name in a.tensors else ("B", "A")
        raise CrossrouteError(
            f"checkpoints differ: tensor '{name}' is in {where} but not in {missing} "
            f"(A = {a.root}, B = {b.root}); diff needs two checkpoints of the same architecture")
    for name in sorted(a.tensors):
        sa, sb = a.tensors[name].shape, b.tensors[name].shape
        if sa != sb:
            raise CrossrouteError(
                f"checkpoints differ: tensor '{name}' has shape {tuple(sa)} in A but {tuple(sb)} "
                f"in B (A = {a.root}, B = {b.root}); diff needs two checkpoints of the same "
                "architecture")


# ----------------------------------------------------------------------------- units


@dataclass(frozen=True)
class _Layout:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def to_json(self) -> dict[str, int]:
        return {"num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                "head_dim": self.head_dim}


def _layout(ckpt: _Checkpoint) -> _Layout | None:
    """Head layout from config.json (text_config for multimodal wrappers); None if not attention."""
    if not any(_LAYER_RE.search(n) and "self_attn" in n for n in ckpt.tensors):
        return None
    cfg = ckpt.config
    if cfg is None:
        raise CrossrouteError(f"no config.json in {ckpt.root}; diff needs it for "
                              "num_attention_heads/num_key_value_heads/head_dim")
    if "num_attention_heads" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    try:
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError) as exc:
        raise CrossrouteError(f"{ckpt.root / 'config.json'} lacks {exc}; diff needs "
                              "num_attention_heads and hidden_size (or head_dim)") from exc
    return _Layout(heads, kv, head_dim)


def module_type(name: str) -> str:
    """Module type of a tensor name: one of MODULE_TYPES."""
    for m in MODULE_TYPES[:7]:
        if f"{m}." in name:
            return m
    if "embed" in name:
        return "embed"
    if "lm_head" in name:
        return "lm_head"
    if "norm" in name:
        return "norm"
    return "other"


@dataclass(frozen=True)
class _UnitRole:
    layer: int
    kind: str
    axis: int  # 0: units are row groups; 1: column groups
    group: int  # rows (or columns) per unit


def _unit_role(name: str, shape: list[int], layout: _Layout | None) -> _UnitRole | None:
    m = _LAYER_RE.search(name)
    if m is None:
        return None
    layer, proj, param = int(m.group(1)), m.group(3), m.group(4)
    if proj in ("gate_proj", "up_proj"):
        role = _UnitRole(layer, "neuron", 0, 1)
    elif proj == "down_proj" and param == "weight":
        role = _UnitRole(layer, "neuron", 1, 1)
    elif layout is None or proj not in ("q_proj", "k_proj", "v_proj", "o_proj"):
        return None
    elif proj == "q_proj":
        role = _UnitRole(layer, "head", 0, layout.head_dim)
    elif proj in ("k_proj", "v_proj"):
        role = _UnitRole(layer, "kv", 0, layout.head_dim)
    elif param == "weight":
        role = _UnitRole(layer, "head", 1, layout.head_dim)
    else:
        return None
    size = shape[role.axis] if len(shape) > role.axis else 0
    if layout is not None and role.kind in ("head", "kv"):
        want = (layout.num_heads if role.kind == "head" else layout.num_kv_heads) * layout.head_dim
        if size != want:
            raise CrossrouteError(
                f"tensor '{name}' has {size} {'rows' if role.axis == 0 else 'columns'} but "
                f"config.json implies {want} (heads × head_dim); check num_attention_heads, "
                "num_key_value_heads and head_dim in config.json")
    return role


# ----------------------------------------------------------------------------- streaming

_KEY_SHIFT = 16  # key = top 16 bits of |δ| as fp32 = |δ| truncated to bf16 precision
_N_KEYS = 1 << (31 - _KEY_SHIFT)  # sign bit is clear after abs
_SPARSE_SHARE = 0.25  # blocks with at most this share of changed entries scatter only those


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


class _Binner:
    """Bins |δ| by the top 16 bits of its fp32 pattern (one shift, one bincount per block).

    Threshold counts stay exact: a block with entries in the key bucket holding τ is recounted
    with a direct comparison. Histogram edges 10**e are truncated to bf16 precision (< 0.8 %).
    """

    def __init__(self, thresholds: Sequence[float]) -> None:
        self.edges_log10 = [HIST_LOG10_MIN + i * (HIST_LOG10_MAX - HIST_LOG10_MIN) / HIST_BINS
                            for i in range(HIST_BINS + 1)]
        self.thr = [struct.unpack("<f", struct.pack("<f", t))[0] for t in thresholds]
        bits = [_f32_bits(t) for t in self.thr]
        self.thr_key = torch.tensor([b >> _KEY_SHIFT for b in bits])
        self.thr_exact = [b & ((1 << _KEY_SHIFT) - 1) == 0 for b in bits]
        # smallest value of τ's key bucket: |δ| below it is certainly below τ
        self.thr_lo = [struct.unpack("<f", struct.pack("<I", (b >> _KEY_SHIFT) << _KEY_SHIFT))[0]
                       for b in bits]
        self.edge_key = torch.tensor([_f32_bits(10.0**e) >> _KEY_SHIFT for e in self.edges_log10])
        self.sparse_ok = all(b >> _KEY_SHIFT > 0 for b in bits)  # no τ shares the zeros' key bucket

    def block(self, absd: torch.Tensor, key: torch.Tensor, ones: torch.Tensor,
              counts: torch.Tensor, fixes: list[int]) -> None:
        """Add a block of |δ| (flat fp32) to the key `counts`; `fixes[i]` gains the entries of
        τ_i's own key bucket that lie below τ_i (recounted only when that bucket is hit)."""
        n = absd.numel()
        nonzero = int(torch.count_nonzero(absd))
        if self.sparse_ok and nonzero <= n * _SPARSE_SHARE:  # sparse: scatter only changed entries (0 is key 0)
            absd = absd[absd != 0]
            key = key[:nonzero]
            counts[0] += n - nonzero  # zeros lie below every τ and in its bucket's low part alike: no fix
        torch.bitwise_right_shift(absd.view(torch.int32), _KEY_SHIFT, out=key)
        before = counts[self.thr_key].tolist()
        counts.index_add_(0, key, ones[: key.numel()])
        after = counts[self.thr_key].tolist()
        for i, tau in enumerate(self.thr):
            if after[i] != before[i] and not self.thr_exact[i]:
                fixes[i] += int(torch.count_nonzero(absd < tau)) - int(
                    torch.count_nonzero(absd < self.thr_lo[i]))

    def below(self, counts: torch.Tensor, fixes: list[int]) -> list[int]:
        """Exact counts of |δ| < τ from key counts plus per-block fixes."""
        cum = torch.cumsum(counts, 0)
        k = self.thr_key
        lo = torch.where(k > 0, cum[(k - 1).clamp(min=0)], 0).tolist()
        return [x + f for x, f in zip(lo, fixes, strict=True)]

    def histogram(self, counts: torch.Tensor) -> list[int]:
        """[zero, underflow, *bins, overflow] from accumulated key counts."""
        cum = torch.cumsum(counts, 0)
        total = int(cum[-1])
        at = cum[self.edge_key - 1].tolist()  # entries below each (truncated) edge
        zero = int(counts[0])  # |δ| < 2**-133: zero in practice
        return [zero, at[0] - zero, *(at[i + 1] - at[i] for i in range(HIST_BINS)),
                total - at[-1]]

    def to_histogram(self, packed: list[int]) -> DeltaHistogram:
        return DeltaHistogram(self.edges_log10, packed[2:-1], zero=packed[0],
                              underflow=packed[1], overflow=packed[-1])


class _Scratch:
    """Per-worker reusable buffers, so streaming allocates nothing per block."""

    def __init__(self, n: int) -> None:
        self.raw_a = bytearray(n * 8)
        self.raw_b = bytearray(n * 8)
        self.base = torch.empty(n, dtype=torch.float32)
        self.delta = torch.empty(n, dtype=torch.float32)
        self.sq = torch.empty(n, dtype=torch.float32)
        self.key = torch.empty(n, dtype=torch.int32)
        self.ones = torch.ones(n, dtype=torch.float32)
        self.ones64 = torch.ones(n, dtype=torch.int64)


def _blocks(shape: list[int], chunk: int) -> Iterator[tuple[int, int]]:
    """Row ranges (first-axis slices) of about `chunk` entries; 1-D tensors are cut flat."""
    if not shape:
        yield 0, 1
        return
    row = math.prod(shape[1:])
    step = max(1, chunk // max(row, 1))
    for r0 in range(0, shape[0], step):
        yield r0, min(shape[0], r0 + step)


def _max_block(shape: list[int], chunk: int) -> int:
    row = math.prod(shape[1:]) if shape else 1
    rows = shape[0] if shape else 1
    return row * min(rows, max(1, chunk // max(row, 1)))


def _pread(fd: int, buf: bytearray, nbytes: int, offset: int) -> memoryview:
    view = memoryview(buf)[:nbytes]
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise CrossrouteError(f"unexpected end of file at byte {offset + done}; the "
                                  "checkpoint is truncated, re-download or re-save it")
        done += got
    return view


def _prefetch(fd: int, info: _TensorInfo) -> None:
    """Ask the kernel to start reading a tensor's bytes (overlaps disk reads with compute)."""
    with contextlib.suppress(AttributeError, OSError):
        os.posix_fadvise(fd, info.start, info.nbytes, os.POSIX_FADV_WILLNEED)


@contextlib.contextmanager
def open_shards(*tensor_maps: dict[str, _TensorInfo]) -> Iterator[dict[Path, int]]:
    """Read-only descriptors of every shard file holding these tensors (for pread), closed on exit."""
    fds: dict[Path, int] = {}
    try:
        for tensors in tensor_maps:
            for info in tensors.values():
                if info.file not in fds:
                    fds[info.file] = os.open(info.file, os.O_RDONLY)
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


@dataclass
class _Partial:
    """One piece's share of a tensor's statistics (all additive, but max and the median sample)."""

    key_counts: torch.Tensor
    fixes: list[int]
    unit_sq: torch.Tensor | None
    base_sq: float = 0.0
    delta_sq: float = 0.0
    max_abs: float = 0.0
    samples: list[torch.Tensor] = field(default_factory=list)

    def merge(self, other: _Partial) -> None:
        self.key_counts += other.key_counts
        self.fixes = [x + y for x, y in zip(self.fixes, other.fixes, strict=True)]
        if self.unit_sq is not None and other.unit_sq is not None:
            self.unit_sq += other.unit_sq
        self.base_sq += other.base_sq
        self.delta_sq += other.delta_sq
        self.max_abs = max(self.max_abs, other.max_abs)
        self.samples += other.samples


@dataclass
class _TensorResult:
    stats: TensorStats
    hist: list[int]
    unit_sq: torch.Tensor | None


class _Streamer:
    """Diffs tensors of two open checkpoints; `run(name)` is safe to call from worker threads."""

    def __init__(self, a: _Checkpoint, b: _Checkpoint, layout: _Layout | None,
                 thresholds: tuple[float, ...], chunk: int) -> None:
        self.a, self.b, self.layout, self.chunk = a, b, layout, chunk
        self.thresholds = thresholds
        self.binner = _Binner(thresholds)
        self.block_elems = max([chunk] + [_max_block(i.shape, chunk) for i in a.tensors.values()])
        self.fds: dict[Path, int] = {}
        self._local = threading.local()
        self._lock = threading.Lock()
        self._next = 0  # first tensor (in processing order) not yet prefetched

    def __enter__(self) -> _Streamer:
        self._shards = open_shards(self.a.tensors, self.b.tensors)
        self.fds = self._shards.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._shards.__exit__(None, None, None)
        self.fds = {}

    def prefetch_ahead(self, names: list[str], i: int) -> None:
        """Keep kernel readahead requested for about PREFETCH_BYTES past tensor `i`."""
        with self._lock:
            ahead = sum(self.b.tensors[n].nbytes for n in names[i:self._next])
            while self._next < len(names) and ahead < PREFETCH_BYTES:
                name = names[self._next]
                for ck in (self.a, self.b):
                    info = ck.tensors[name]
                    _prefetch(self.fds[info.file], info)
                ahead += self.b.tensors[name].nbytes
                self._next += 1

    def _scratch(self) -> _Scratch:
        s = getattr(self._local, "scratch", None)
        if s is None:
            s = self._local.scratch = _Scratch(self.block_elems)
        return s

    def _read(self, info: _TensorInfo, buf: bytearray, r0: int, r1: int) -> torch.Tensor:
        row = math.prod(info.shape[1:]) if info.shape else 1
        n = (r1 - r0) * row
        size = info.dtype.itemsize
        view = _pread(self.fds[info.file], buf, n * size, info.start + r0 * row * size)
        return torch.frombuffer(view, dtype=info.dtype, count=n) if n else torch.empty(0)

    def pieces(self, name: str) -> list[tuple[int, int]]:
        """Row ranges of about PIECE_ELEMS entries: the units of work spread over worker threads, so one
        large tensor (an embedding of 150 k rows) is diffed by many workers rather than one."""
        return list(_blocks(self.b.tensors[name].shape, PIECE_ELEMS))  # a scalar is one piece (0, 1)

    def run_piece(self, name: str, r0: int, r1: int) -> _Partial:
        """Stream rows [r0, r1) of one tensor block by block; its share of the tensor's statistics."""
        ia, ib = self.a.tensors[name], self.b.tensors[name]
        shape = ib.shape
        role = _unit_role(name, shape, self.layout)
        s = self._scratch()
        numel = math.prod(shape)
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        part = _Partial(key_counts=torch.zeros(_N_KEYS, dtype=torch.int64), fixes=[0] * len(self.thresholds),
                        unit_sq=torch.zeros(shape[role.axis], dtype=torch.float64) if role else None)
        stride = max(1, numel // _MEDIAN_SAMPLES)
        for b0, b1 in _blocks([r1 - r0, *shape[1:]] if shape else [], self.chunk):
            q0, q1 = r0 + b0, r0 + b1
            n = (q1 - q0) * row
            base, delta = s.base[:n], s.delta[:n]
            base.copy_(self._read(ia, s.raw_a, q0, q1))
            delta.copy_(self._read(ib, s.raw_b, q0, q1))
            delta.sub_(base)
            part.base_sq += float(torch.dot(base, base))
            part.delta_sq += float(torch.dot(delta, delta))
            part.samples.append(base[(-(q0 * row)) % stride::stride].abs())
            if part.unit_sq is not None and role is not None:
                self._unit_block(role, shape, delta, s, part.unit_sq, q0, q1)
            delta.abs_()
            part.max_abs = max(part.max_abs, float(delta.max()))
            self.binner.block(delta, s.key[:n], s.ones64, part.key_counts, part.fixes)
        return part

    def finish(self, name: str, parts: list[_Partial]) -> _TensorResult:
        """Merge a tensor's pieces into its stats, histogram and per-unit δ² sums."""
        ib = self.b.tensors[name]
        first = parts[0]
        for p in parts[1:]:
            first.merge(p)
        sample = torch.cat(first.samples)
        eps = torch.finfo(ib.dtype).eps if ib.dtype.is_floating_point else 1.0
        stats = TensorStats(
            name=name, shape=list(ib.shape), dtype=str(ib.dtype).removeprefix("torch."),
            module_type=module_type(name), numel=math.prod(ib.shape),
            below=self.binner.below(first.key_counts, first.fixes), zero=int(first.key_counts[0]),
            delta_sq=first.delta_sq, base_sq=first.base_sq, max_abs=first.max_abs,
            resolution=0.5 * eps * float(sample.median()) if sample.numel() else 0.0,
            thresholds=self.thresholds)
        return _TensorResult(stats, self.binner.histogram(first.key_counts), first.unit_sq)

    @staticmethod
    def _unit_block(role: _UnitRole, shape: list[int], delta: torch.Tensor, s: _Scratch,
                    unit_sq: torch.Tensor, r0: int, r1: int) -> None:
        """Add this block's per-row (or per-column) sums of δ² to `unit_sq`."""
        if len(shape) == 1:
            unit_sq[r0:r1] += delta.double().square()
            return
        mat = delta.view(r1 - r0, -1)
        if role.axis == 0:
            unit_sq[r0:r1] += torch.linalg.vector_norm(mat, dim=1).double().square()
        else:
            sq = torch.mul(delta, delta, out=s.sq[: delta.numel()]).view(r1 - r0, -1)
            unit_sq += torch.mv(sq.T, s.ones[: r1 - r0]).double()


def _unit_scores(role: _UnitRole, unit_sq: torch.Tensor) -> torch.Tensor:
    """Per-unit sums of δ² from per-row/column sums (units are groups of `role.group`)."""
    return unit_sq.view(-1, role.group).sum(dim=1)


@contextlib.contextmanager
def _single_threaded_torch() -> Iterator[None]:
    """Workers run torch ops on one intra-op thread each (no OpenMP barriers between them)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _top_units(scores: dict[str, list[list[float]]], pct: float) -> dict[str, list[str]]:
    """Top `pct` % of units of each kind by score (ties: lower layer, then index); zeros dropped."""
    out: dict[str, list[str]] = {}
    for kind, per_layer in scores.items():
        sizes = [len(row) for row in per_layer]
        n = sum(sizes)
        k = math.ceil(n * pct / 100.0) if n and pct > 0 else 0
        if not k:
            out[kind] = []
            continue
        flat = torch.tensor([s for row in per_layer for s in row], dtype=torch.float64)
        vals, idx = torch.sort(flat, descending=True, stable=True)  # stable: ties stay in (layer, index) order
        starts = torch.tensor([0, *itertools.accumulate(sizes)][:-1])
        picked = idx[:k][vals[:k] > 0]
        layers = torch.searchsorted(starts, picked, right=True) - 1
        out[kind] = [f"L{layer}.{_UNIT_TAG[kind]}.{j}"
                     for layer, j in zip(layers.tolist(), (picked - starts[layers]).tolist(), strict=True)]
    return out


def diff_checkpoints(
    base: str | Path,
    ckpt: str | Path,
    top_k_percent: float = 1.0,
    thresholds: Sequence[float] = THRESHOLDS,
    progress: bool = False,
    chunk_elems: int = CHUNK_ELEMS,
    workers: int | None = None,
) -> UpdateAnatomy:
    """Stream δ = ckpt − base (fp32) tensor by tensor and return its anatomy (DESIGN.md §2.2).

    Thresholds compare |δ| < fp32(τ) exactly. τ is *below the resolution* of a tensor when
    τ < ½·eps(storage dtype of ckpt)·median|θ_base| (median over ≤65 536 evenly strided entries):
    an update that small to an entry of typical size is rounded away when stored.
    """
    thresholds = tuple(float(t) for t in thresholds)
    a, b = _load_checkpoint(base), _load_checkpoint(ckpt)
    _check_same_architecture(a, b)
    layout = _layout(a)
    names = sorted(a.tensors, key=lambda n: (str(a.tensors[n].file), a.tensors[n].start))
    n_workers = max(1, workers or min(os.cpu_count() or 1, torch.get_num_threads()))
    tensors: list[TensorStats] = []
    hist = [0] * (HIST_BINS + 3)
    unit_acc: dict[str, dict[int, torch.Tensor]] = {k: {} for k in UNIT_KINDS}
    with (_Streamer(a, b, layout, thresholds, chunk_elems) as streamer,
          _single_threaded_torch(), ThreadPoolExecutor(n_workers) as pool,
          _progress(progress, len(names), b.root) as tick):

        jobs = [(i, r0, r1) for i, name in enumerate(names) for r0, r1 in streamer.pieces(name)]
        last = {i: j for j, (i, _, _) in enumerate(jobs)}  # index of each tensor's last piece

        def job(j: int) -> _Partial:
            i, r0, r1 = jobs[j]
            streamer.prefetch_ahead(names, i)
            return streamer.run_piece(names[i], r0, r1)

        parts: list[_Partial] = []
        for j, part in enumerate(pool.map(job, range(len(jobs)))):  # in order: a tensor's pieces are adjacent
            parts.append(part)
            i = jobs[j][0]
            if last[i] != j:
                continue
            res = streamer.finish(names[i], parts)
            parts = []
            tensors.append(res.stats)
            hist = [x + y for x, y in zip(hist, res.hist, strict=True)]
            role = _unit_role(res.stats.name, res.stats.shape, layout)
            if role is not None and res.unit_sq is not None:
                per_unit = _unit_scores(role, res.unit_sq)
                acc = unit_acc[role.kind]
                acc[role.layer] = acc[role.layer] + per_unit if role.layer in acc else per_unit
            tick(res.stats.name)
    scores = {kind: _per_layer_lists(acc) for kind, acc in unit_acc.items()}
    tensors.sort(key=lambda t: _natural_key(t.name))
    return UpdateAnatomy(
        base=str(base), ckpt=str(ckpt), thresholds=thresholds, top_k_percent=top_k_percent,
        tensors=tensors, unit_scores=scores, top_units=_top_units(scores, top_k_percent),
        histogram=streamer.binner.to_histogram(hist), layout=layout.to_json() if layout else {})


def _natural_key(name: str) -> list[Any]:
    """Sort key that orders layers.2 before layers.10."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def _per_layer_lists(acc: dict[int, torch.Tensor]) -> list[list[float]]:
    if not acc:
        return []
    return [acc[i].sqrt().tolist() if i in acc else [] for i in range(max(acc) + 1)]


@contextlib.contextmanager
def _progress(enabled: bool, total: int, label: Path) -> Iterator[Any]:
    if not enabled:
        yield lambda name: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(f"diff {label.name}", total=total)
        yield lambda name: bar.update(task, advance=1, description=f"diff {name}")


def diff_sequence(
    checkpoints: Sequence[str | Path],
    top_k_percent: float = 1.0,
    thresholds: Sequence[float] = THRESHOLDS,
    progress: bool = False,
) -> SequenceDiff:
    """Diff every checkpoint against its predecessor; Jaccard of top-k unit sets across stages."""
    if len(checkpoints) < 2:
        raise CrossrouteError(f"diff needs at least two checkpoints, got {len(checkpoints)}; "
                              "pass the base checkpoint followed by one per stage")
    stages = [diff_checkpoints(prev, cur, top_k_percent, thresholds, progress)
              for prev, cur in zip(checkpoints[:-1], checkpoints[1:], strict=True)]
    sets = [s.top_sets() for s in stages]
    matrix = {kind: [[jaccard(x[kind], y[kind]) for y in sets] for x in sets]
              for kind in UNIT_KINDS}
    return SequenceDiff([str(c) for c in checkpoints], stages, matrix)


# ----------------------------------------------------------------------------- output


def write_diff_results(result: UpdateAnatomy | SequenceDiff | dict, run_dir: Path,
                       name: str = "diff") -> Path:
    """Write `run_dir/results/{name}.json` atomically; returns the path."""
    data = result if isinstance(result, dict) else result.to_json()
    return atomic_write_json(Path(run_dir) / "results" / f"{name}.json", data)


def render_diff_section(results: dict) -> str:
    """HTML <section> for a diff result (SequenceDiff or UpdateAnatomy JSON): tables and plots."""
    from crossroute.plots import heatmap

    stages = results.get("stages", [results])
    names = results.get("stage_names") or [Path(s["ckpt"]).name for s in stages]
    parts = ["<section class=\"diff\">", "<h2>Update anatomy</h2>",
             "<p>δ = θ<sub>s</sub> − θ<sub>s−1</sub> in fp32. Fractions of entries with "
             "|δ| &lt; τ; * marks a τ below the storage dtype's resolution for most entries.</p>",
             _threshold_table(stages, names), _module_table(stages, names),
             _histogram_img(stages, names)]
    jac = results.get("jaccard") or {}
    for kind in UNIT_KINDS:
        if kind in jac and len(names) > 1:
            pct = stages[0].get("top_k_percent", "")
            parts.append(heatmap(jac[kind], names, names,
                                 f"Jaccard of top-{pct}% changed {kind} units"))
    parts.append("</section>")
    return "\n".join(parts)


def _threshold_table(stages: list[dict], names: list[str]) -> str:
    taus = stages[0]["thresholds"] if stages else []
    head = "".join(f"<th>&lt; {t:g}</th>" for t in taus)
    rows = []
    for name, s in zip(names, stages, strict=True):
        cells = "".join(
            f"<td>{100 * f:.2f}%{'*' if below else ''}</td>"
            for f, below in zip(s["below_fraction"], s["below_resolution"], strict=True))
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(str(s['dtype']))}</td>"
                    f"<td>{100 * s['zero_fraction']:.2f}%</td>{cells}</tr>")
    return ("<table><tr><th>stage</th><th>dtype</th><th>= 0</th>" + head + "</tr>"
            + "".join(rows) + "</table>")


def _module_table(stages: list[dict], names: list[str]) -> str:
    mods = [m for m in MODULE_TYPES if any(m in s["module_rel_change"] for s in stages)]
    head = "".join(f"<th>{m}</th>" for m in mods)
    rows = []
    for name, s in zip(names, stages, strict=True):
        cells = "".join(f"<td>{_fmt(s['module_rel_change'].get(m))}</td>" for m in mods)
        rows.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    return ("<h3>Relative change ‖δ‖/‖θ‖ per module type</h3><table><tr><th>stage</th>" + head
            + "</tr>" + "".join(rows) + "</table>")


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3g}"


def _histogram_img(stages: list[dict], names: list[str]) -> str:
    from matplotlib.figure import Figure

    from crossroute.plots import fig_to_img_tag

    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    for name, s in zip(names, stages, strict=True):
        h = s["histogram"]
        n = max(1, s["numel"])
        fracs = [c / n for c in h["counts"]]
        ax.stairs(fracs, h["edges_log10"], label=f"{name} (zero: {100 * h['zero'] / n:.1f}%)")
    ax.set_xlabel("log10 |δ|")
    ax.set_ylabel("fraction of entries")
    ax.set_title("Histogram of log10 |δ| per stage")
    ax.legend(fontsize=8)
    return fig_to_img_tag(fig, alt="histogram of log10 |delta|")
