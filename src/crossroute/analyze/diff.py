"""Streaming update anatomy of safetensors checkpoints (DESIGN.md §2.2): δ = ckpt − base in fp32.

Tensors are read in row blocks of ~1 M entries from both checkpoints with `os.preadv` at the byte
offsets of the (validated, JSON-only) safetensors header into reusable buffers: never a whole
model, never a pickle, and no mmap (safe_open's mapping kept every page read resident: RSS grew
to the size of both checkpoints). Memory is a few fixed buffers per worker thread.

Each block is reduced by a numba kernel (crossroute.analyze.diff_kernel: no GIL, one pass, exact counts) or,
with kernel="torch", by the torch reference path below, which the tests hold the kernel to.

With `storage` (a dtype name: "bfloat16", "float16", "float32") every floating-point block of both checkpoints is
rounded to that dtype (round-to-nearest-even, as `Tensor.to`) and back before δ is taken: the anatomy the same
update would have had stored in that dtype (fp32 training stored as bf16 rounds small updates to exactly 0). The
cast is done by torch on each block, into a reusable buffer, before either kernel reduces it.

Units (neurons, heads, KV groups, MoE routers and experts) and module types come from the unit table
(crossroute.model.units) built from config.json and the safetensors header: per tensor, δ² is summed per
position along its unit axis while streaming, then mapped to units. An architecture the table does not know
still gets the anatomy; its warning is recorded in the result and unit scores are empty.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossroute.analyze.diff_kernel import (
    DEFAULT_KERNEL,
    KEY_SHIFT,
    N_KEYS,
    POS_COL,
    POS_DELTA,
    POS_NONE,
    POS_ROW,
    STORAGE_CODES,
    PieceStats,
    bits_to_f32,
    f32_bits,
    resolve_kernel,
    storage_view,
)
from crossroute.core.atomic import atomic_write_json
from crossroute.core.console import console
from crossroute.core.errors import CrossrouteError
from crossroute.io.safetensors import (
    CHUNK_ELEMS,
    Checkpoint,
    TensorInfo,
    check_same_architecture,
    load_checkpoint,
    max_block,
    natural_key,
    open_shards,
    pread_into,
    prefetch,
    row_blocks,
)
from crossroute.model.adapters import adapter_info, is_adapter
from crossroute.model.load import resolve_model_path
from crossroute.model.units import UNIT_KINDS, UnitMap, unit_id

THRESHOLDS: tuple[float, ...] = (1e-9, 1e-8, 1e-7, 1e-6, 1e-5)
HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS = -12.0, 0.0, 60
# Module type of each tensor (per-module relative change); Llama-style models keep the historical *_proj keys.
MODULE_TYPES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "qkv", "o_proj", "gate_proj", "up_proj", "gate_up", "down_proj",
    "router", "experts_gate_up", "experts_down",
    "embed", "norm", "lm_head", "other",
)
# crossroute.model.units module label (TensorRule.module) -> MODULE_TYPES entry. A label missing here (a newly
# registered architecture) is used as its own module type.
MODULE_TYPE_OF_LABEL: dict[str, str] = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
    "qkv": "qkv", "gate_up": "gate_up", "router": "router",
    "experts_gate_up": "experts_gate_up", "experts_down": "experts_down",
    "qk_norm": "norm", "norm": "norm", "other": "other",
}
# Tensors outside the decoder layers (the unit map has no module for them): first matching name part wins.
OUTSIDE_LAYER_TYPES: tuple[tuple[str, str], ...] = (
    ("lm_head", "lm_head"), ("embed_out", "lm_head"), ("embed", "embed"), ("wte", "embed"), ("wpe", "embed"),
    ("norm", "norm"), ("ln_f", "norm"),
)
PIECE_ELEMS = 1 << 23  # entries per unit of work given to a worker thread (8 blocks)
NUMBA_BLOCK = 1 << 19  # entries per read of the numba path (1 MiB of bf16 per checkpoint): few calls into Python
_MEDIAN_SAMPLES = 1 << 16
# `storage` names diff_checkpoints accepts: each floating-point tensor is diffed as it would be stored in that dtype
STORAGE_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                                          "float32": torch.float32}
PREFETCH_BYTES = 256 << 20  # per checkpoint, requested ahead of the tensors being diffed
PREFETCH_CHUNK = 16 << 20  # bytes per readahead request


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
    units: dict[str, Any] = field(default_factory=dict)  # UnitMap.to_json(): arch, warning, counts
    kernel: str = DEFAULT_KERNEL  # block kernel of bf16/fp16/fp32 tensors, "numba" or "torch" (others: torch)
    kernel_warning: str | None = None  # why numba was asked for but torch ran
    adapter: dict[str, Any] | None = None  # ckpt is a LoRA adapter: its r, alpha and each update's effective rank
    storage: str | None = None  # the dtype both checkpoints were cast to before δ (None: diffed as stored)
    stored_entries: dict[str, int] = field(default_factory=dict)  # entries per dtype ckpt is stored in on disk

    @property
    def warning(self) -> str | None:
        """The unit map's warning (unknown architecture: no unit scores), else None."""
        return self.units.get("warning")

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
        order = [m for m in MODULE_TYPES if m in sums] + sorted(set(sums) - set(MODULE_TYPES))
        return {m: _ratio(*sums[m]) for m in order}

    def top_sets(self) -> dict[str, set[str]]:
        return {k: set(v) for k, v in self.top_units.items()}

    def to_json(self, include_unit_scores: bool = True) -> dict[str, Any]:
        dtypes = self.dtype_entries()
        share = self.below_resolution_share()
        delta_sq = sum(t.delta_sq for t in self.tensors)
        base_sq = sum(t.base_sq for t in self.tensors)
        out: dict[str, Any] = {
            "storage": self.storage, "stored_dtype": _dominant(self.stored_entries),
            "base": self.base, "ckpt": self.ckpt, "numel": self.numel,
            "dtype": _dominant(dtypes),
            "dtype_entries": dtypes, "thresholds": list(self.thresholds),
            "below_fraction": self.below_fraction(),
            "below_resolution_share": share,
            "below_resolution": [s >= 0.5 for s in share],
            "zero_fraction": sum(t.zero for t in self.tensors) / self.numel if self.numel else 0.0,
            "rel_change": _ratio(delta_sq, base_sq),
            "module_rel_change": self.module_rel_change(),
            "layout": self.layout, "units": self.units, "top_k_percent": self.top_k_percent,
            "top_units": self.top_units, "histogram": self.histogram.to_json(),
            "kernel": self.kernel, "kernel_warning": self.kernel_warning, "adapter": self.adapter,
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
        stored: dict[str, int] = {}
        for s in self.stages:
            for dtype, n in s.stored_entries.items():
                stored[dtype] = stored.get(dtype, 0) + n
        return {"storage": self.stages[0].storage if self.stages else None, "stored_dtype": _dominant(stored),
                "checkpoints": self.checkpoints, "stage_names": self.stage_names,
                "stages": [s.to_json(include_unit_scores) for s in self.stages],
                "jaccard": self.jaccard}


def check_finite_delta(name: str, a: TensorInfo, b: TensorInfo, base_sq: float, delta_sq: float) -> None:
    """Refuse a tensor whose base or update holds NaN/inf (its sums of squares are not finite): every statistic
    of it would be NaN, and NaN is not JSON."""
    if not math.isfinite(base_sq):
        raise CrossrouteError(f"{a.file}: tensor '{name}' holds NaN or inf values; diff needs finite weights: "
                              "use a checkpoint from before the divergence (load_model names every such tensor)")
    if not math.isfinite(delta_sq):
        raise CrossrouteError(f"{b.file}: tensor '{name}' holds NaN or inf values (or its update overflows fp32); "
                              "diff needs finite weights: use a checkpoint from before the divergence")


def _dominant(entries: Mapping[str, int]) -> str | None:
    """The dtype holding the most entries (the first of a tie), None when there are none."""
    return max(entries, key=entries.__getitem__) if entries else None


def resolve_storage(storage: str | None) -> torch.dtype | None:
    """The torch dtype of a `storage` name (STORAGE_DTYPES), None for None (diff as stored)."""
    if storage is None:
        return None
    if storage not in STORAGE_DTYPES:
        raise CrossrouteError(f"unknown storage dtype {storage!r} to diff as (--as-dtype); use one of "
                              f"{', '.join(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[storage]


def _ratio(num_sq: float, den_sq: float) -> float | None:
    return math.sqrt(num_sq / den_sq) if den_sq > 0 else None


def jaccard(a: set, b: set) -> float:
    """|A∩B| / |A∪B|; 0.0 when both sets are empty."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


# ----------------------------------------------------------------------------- units


def unit_map(ckpt: Checkpoint) -> UnitMap:
    """The unit map of a checkpoint from its config.json and safetensors header (on-disk names and shapes).

    An unknown architecture gives whole-tensor units only and `warning` set; it is printed once per process."""
    with warnings.catch_warnings():  # UnitMap warns via `warnings`; diff prints the same line on the console
        warnings.simplefilter("ignore", UserWarning)
        umap = UnitMap.build(ckpt.config or {}, [(n, info.shape) for n, info in ckpt.tensors.items()])
    if umap.warning and umap.warning not in _PRINTED:
        _PRINTED.add(umap.warning)
        console.print(f"[yellow]crossroute: warning:[/yellow] {ckpt.root}: {umap.warning}; diff reports the "
                      "anatomy without unit scores", highlight=False, soft_wrap=True)
    return umap


_PRINTED: set[str] = set()


def module_type(umap: UnitMap, name: str) -> str:
    """Module type of a tensor (one of MODULE_TYPES, or a new architecture's own module label)."""
    where = umap.module_of(name)
    if where is not None:
        return MODULE_TYPE_OF_LABEL.get(where[1], where[1])
    for part, kind in OUTSIDE_LAYER_TYPES:
        if part in name:
            return kind
    return "other"


def head_layout_json(umap: UnitMap) -> dict[str, int]:
    """The head layout of a known architecture with attention heads, else {} (kept for older readers)."""
    lay = umap.head_layout
    return lay.to_json() if lay is not None and umap.arch is not None and umap.n_units("head") else {}


@dataclass(frozen=True)
class _PosPlan:
    """Where a tensor's per-position δ² sums live: `axis` (and `expert_axis`) of its unit placements.

    `groups[kind]`: (offset, count, group) when that kind's units are `count` contiguous runs of `group`
    positions from `offset`, in order (summed with one view; bit-identical to a per-group sum), else None
    (mapped with UnitMap.unit_sums_from_positions)."""

    axis: int
    expert_axis: int | None
    n_pos: int
    groups: dict[str, tuple[int, int, int] | None]


def _pos_plan(umap: UnitMap, name: str) -> _PosPlan | None:
    places = umap.positions(name)
    if not places:
        return None
    groups: dict[str, tuple[int, int, int] | None] = {}
    for kind, _, _, uop in places:
        ok = (uop >= 0).nonzero().flatten()
        n_units = int(uop.max()) + 1 if ok.numel() else 0
        g = ok.numel() // n_units if n_units else 0
        off = int(ok[0]) if ok.numel() else 0
        contiguous = (g > 0 and n_units * g == ok.numel() and int(ok[-1]) - off + 1 == ok.numel()
                      and bool((uop[off:off + ok.numel()] == torch.arange(n_units).repeat_interleave(g)).all()))
        groups[kind] = (off, n_units, g) if contiguous else None
    _, axis, eaxis, uop0 = places[0]
    return _PosPlan(axis, eaxis, uop0.numel(), groups)


def _unit_sums(umap: UnitMap, name: str, plan: _PosPlan, pos_sq: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per kind, the float64 δ² sums of the tensor's units in its layer ([counts[kind][layer]])."""
    layer = umap.layer_of(name)
    out = {}
    for kind, grp in plan.groups.items():
        if grp is not None and grp[1] == umap.counts[kind][layer]:
            off, n, g = grp
            out[kind] = pos_sq[off:off + n * g].view(n, g).sum(dim=1)
        else:
            out[kind] = umap.unit_sums_from_positions(name, kind, pos_sq)
    return out


def _lower_median(x: torch.Tensor) -> float:
    """torch.median's value (the lower middle entry) by a partial sort: a sixth of its time on 65 536 entries."""
    k = (x.numel() - 1) // 2
    return float(np.partition(x.numpy(), k)[k])


def _pos_mode(plan: _PosPlan | None, shape: list[int]) -> tuple[int, int]:
    """(diff_kernel POS_* mode, its row length) for a tensor's per-position sums: the numba kernel sums along
    axis 0 (1-D: every entry its own position) and axis 1 of 2-D itself; other axes are left to _pos_block."""
    if plan is None:
        return POS_NONE, 1
    if len(shape) == 1:
        return POS_ROW, 1
    if plan.expert_axis is None and len(shape) >= 2 and plan.axis == 0:
        return POS_ROW, math.prod(shape[1:])
    if plan.expert_axis is None and len(shape) == 2:
        return POS_COL, shape[1]
    return POS_DELTA, 1


def _expert_sums(umap: UnitMap, acc: Mapping[str, list[torch.Tensor]], layer: int) -> torch.Tensor:
    """Aggregate "expert" unit e = its router row + all neurons of expert e (as in UnitMap.reduce)."""
    n_exp = umap.counts["expert"][layer]
    out = torch.zeros(n_exp, dtype=torch.float64)
    if umap.counts["router"][layer]:
        out += acc["router"][layer]
    inter = umap.dims.moe_intermediate if umap.dims is not None else 0
    if inter and umap.counts["neuron"][layer] == n_exp * inter:
        out += acc["neuron"][layer].view(n_exp, inter).sum(dim=1)
    return out


# ----------------------------------------------------------------------------- streaming

_KEY_SHIFT = KEY_SHIFT  # key = top 16 bits of |δ| as fp32 = |δ| truncated to bf16 precision
_N_KEYS = N_KEYS  # sign bit is clear after abs
_SPARSE_SHARE = 0.25  # blocks with at most this share of changed entries scatter only those


class _Binner:
    """Bins |δ| by the top 16 bits of its fp32 pattern (one shift, one bincount per block).

    Threshold counts stay exact: a block with entries in the key bucket holding τ is recounted
    with a direct comparison. Histogram edges 10**e are truncated to bf16 precision (< 0.8 %).
    """

    def __init__(self, thresholds: Sequence[float]) -> None:
        self.edges_log10 = [HIST_LOG10_MIN + i * (HIST_LOG10_MAX - HIST_LOG10_MIN) / HIST_BINS
                            for i in range(HIST_BINS + 1)]
        self.thr = [bits_to_f32(f32_bits(t)) for t in thresholds]
        bits = [f32_bits(t) for t in self.thr]
        self.thr_key = torch.tensor([b >> _KEY_SHIFT for b in bits])
        self.thr_exact = [b & ((1 << _KEY_SHIFT) - 1) == 0 for b in bits]
        # smallest value of τ's key bucket: |δ| below it is certainly below τ
        self.thr_lo = [bits_to_f32((b >> _KEY_SHIFT) << _KEY_SHIFT) for b in bits]
        self.edge_key = torch.tensor([f32_bits(10.0**e) >> _KEY_SHIFT for e in self.edges_log10])
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

    def __init__(self, n: int, storage: torch.dtype | None = None) -> None:
        self.raw_a = bytearray(n * 8)
        self.raw_b = bytearray(n * 8)
        self.base = torch.empty(n, dtype=torch.float32)
        self.delta = torch.empty(n, dtype=torch.float32)
        self.sq = torch.empty(n, dtype=torch.float32)
        self.key = torch.empty(n, dtype=torch.int32)
        self.ones = torch.ones(n, dtype=torch.float32)
        self.ones64 = torch.ones(n, dtype=torch.int64)
        # blocks of both checkpoints rounded to the storage dtype asked for (diff_checkpoints(storage=...))
        self.cast_a = torch.empty(n if storage else 0, dtype=storage or torch.float32)
        self.cast_b = torch.empty(n if storage else 0, dtype=storage or torch.float32)


@dataclass
class _Partial:
    """One piece's share of a tensor's statistics (all additive, but max and the median sample)."""

    key_counts: torch.Tensor
    fixes: list[int]
    pos_sq: torch.Tensor | None  # per-position δ² sums along the tensor's unit axis (float64)
    base_sq: float = 0.0
    delta_sq: float = 0.0
    max_abs: float = 0.0
    samples: list[torch.Tensor] = field(default_factory=list)

    def merge(self, other: _Partial) -> None:
        self.key_counts += other.key_counts
        self.fixes = [x + y for x, y in zip(self.fixes, other.fixes, strict=True)]
        if self.pos_sq is not None and other.pos_sq is not None:
            self.pos_sq += other.pos_sq
        self.base_sq += other.base_sq
        self.delta_sq += other.delta_sq
        self.max_abs = max(self.max_abs, other.max_abs)
        self.samples += other.samples


@dataclass
class _TensorResult:
    stats: TensorStats
    hist: list[int]
    unit_sq: dict[str, torch.Tensor]  # kind -> per-unit δ² sums of this tensor in its layer


class _Streamer:
    """Diffs tensors of two open checkpoints; `run_piece` is safe to call from worker threads."""

    def __init__(self, a: Checkpoint, b: Checkpoint, umap: UnitMap, thresholds: tuple[float, ...], chunk: int,
                 kernel: str = DEFAULT_KERNEL, storage: torch.dtype | None = None) -> None:
        self.a, self.b, self.umap, self.chunk, self.kernel, self.storage = a, b, umap, chunk, kernel, storage
        self.plans = {n: _pos_plan(umap, n) for n in a.tensors}
        self.thresholds = thresholds
        self.binner = _Binner(thresholds)
        self.block_elems = max([chunk] + [max_block(i.shape, chunk) for i in a.tensors.values()])
        self.fds: dict[Path, int] = {}
        self._local = threading.local()

    def __enter__(self) -> _Streamer:
        self._shards = open_shards(self.a.tensors, self.b.tensors)
        self.fds = self._shards.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._shards.__exit__(None, None, None)
        self.fds = {}

    def readahead(self, name: str, r0: int, r1: int) -> list[tuple[int, TensorInfo]]:
        """Readahead requests (descriptor, byte range) for rows [r0, r1) of a tensor in both checkpoints, in
        PREFETCH_CHUNK pieces alternating between them, so the disk streams both files."""
        per = []
        for ck in (self.a, self.b):
            info = ck.tensors[name]
            row = (math.prod(info.shape[1:]) if len(info.shape) > 1 else 1) * info.dtype.itemsize
            lo, hi = info.start + r0 * row, info.start + r1 * row
            per.append([(self.fds[info.file], TensorInfo(info.file, info.dtype, [], o, min(hi, o + PREFETCH_CHUNK) - o))
                        for o in range(lo, hi, PREFETCH_CHUNK)])
        return [r for pair in itertools.zip_longest(*per) for r in pair if r is not None]

    def _scratch(self) -> _Scratch:
        s = getattr(self._local, "scratch", None)
        if s is None:
            s = self._local.scratch = _Scratch(self.block_elems, self.storage)
        return s

    def diffed_dtype(self, info: TensorInfo) -> torch.dtype:
        """The dtype a tensor's entries are diffed in: the storage dtype asked for (floating-point tensors, as
        `model.to(dtype)` casts them), else its own."""
        return self.storage if self.storage is not None and info.dtype.is_floating_point else info.dtype

    def _cast(self, info: TensorInfo, x: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        """A block `x` of a tensor rounded to its diffed dtype (round-to-nearest-even, as Tensor.to) in `buf`;
        `x` itself when it is stored in that dtype already (the cast would change nothing)."""
        dtype = self.diffed_dtype(info)
        if dtype == info.dtype or not x.numel():
            return x
        out = buf[: x.numel()]
        out.copy_(x)
        return out

    def _read(self, info: TensorInfo, buf: bytearray, r0: int, r1: int) -> torch.Tensor:
        row = math.prod(info.shape[1:]) if info.shape else 1
        n = (r1 - r0) * row
        size = info.dtype.itemsize
        view = pread_into(self.fds[info.file], buf, n * size, info.start + r0 * row * size)
        return torch.frombuffer(view, dtype=info.dtype, count=n) if n else torch.empty(0)

    def _read_flat(self, info: TensorInfo, buf: bytearray, f0: int, f1: int, cast: torch.Tensor) -> np.ndarray:
        """Entries [f0, f1) of the flattened tensor, raw, as the numba kernel decodes them (rounded to the
        storage dtype asked for in `cast` first: the kernel then decodes that dtype)."""
        size = info.dtype.itemsize
        view = pread_into(self.fds[info.file], buf, (f1 - f0) * size, info.start + f0 * size)
        dtype = self.diffed_dtype(info)
        if dtype == info.dtype or f1 == f0:
            return storage_view(view, info.dtype, f1 - f0)
        x = self._cast(info, torch.frombuffer(view, dtype=info.dtype, count=f1 - f0), cast)
        return x.view(torch.uint8).numpy()

    def pieces(self, name: str) -> list[tuple[int, int]]:
        """Row ranges of about PIECE_ELEMS entries: the units of work spread over worker threads, so one
        large tensor (an embedding of 150 k rows) is diffed by many workers rather than one."""
        return list(row_blocks(self.b.tensors[name].shape, PIECE_ELEMS))  # a scalar is one piece (0, 1)

    def run_piece(self, name: str, r0: int, r1: int) -> _Partial:
        """Stream rows [r0, r1) of one tensor block by block; its share of the tensor's statistics.

        The numba kernel takes bf16/fp16/fp32 (as stored or cast to); any other dtype (fp64, fp8, ints) runs the
        torch path."""
        ia, ib = self.a.tensors[name], self.b.tensors[name]
        if self.kernel == "numba" and self.diffed_dtype(ia) in STORAGE_CODES and self.diffed_dtype(ib) in STORAGE_CODES:
            return self.run_piece_numba(name, r0, r1)
        return self.run_piece_torch(name, r0, r1)

    def run_piece_numba(self, name: str, r0: int, r1: int) -> _Partial:
        """run_piece by the numba kernel: flat reads of NUMBA_BLOCK entries (row blocks where the per-position
        sums stay on the torch path: 3-D axes and expert axes)."""
        ia, ib = self.a.tensors[name], self.b.tensors[name]
        shape = ib.shape
        plan = self.plans[name]
        s = self._scratch()
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        mode, prow = _pos_mode(plan, shape)
        pos_sq = torch.zeros(plan.n_pos, dtype=torch.float64) if plan else None
        stride = max(1, math.prod(shape) // _MEDIAN_SAMPLES)
        stats = PieceStats(self.binner.thr, (r1 - r0) * row, stride, pos_sq)
        ca, cb = STORAGE_CODES[self.diffed_dtype(ia)], STORAGE_CODES[self.diffed_dtype(ib)]
        if mode == POS_DELTA:
            delta = s.delta.numpy()
            for b0, b1 in row_blocks([r1 - r0, *shape[1:]] if shape else [], self.chunk):
                q0, q1 = r0 + b0, r0 + b1
                stats.block(self._read_flat(ia, s.raw_a, q0 * row, q1 * row, s.cast_a), ca,
                            self._read_flat(ib, s.raw_b, q0 * row, q1 * row, s.cast_b), cb, q0 * row, prow, mode,
                            delta)
                if pos_sq is not None and plan is not None:  # |δ| in place of δ: the same squares
                    self._pos_block(plan, shape, s.delta[:(q1 - q0) * row], s, pos_sq, q0, q1)
        else:
            step = max(1, min(self.chunk, NUMBA_BLOCK))
            for f0 in range(r0 * row, r1 * row, step):
                f1 = min(r1 * row, f0 + step)
                stats.block(self._read_flat(ia, s.raw_a, f0, f1, s.cast_a), ca,
                            self._read_flat(ib, s.raw_b, f0, f1, s.cast_b), cb, f0, prow, mode)
        return _Partial(key_counts=stats.key_counts(), fixes=stats.fixes(), pos_sq=pos_sq, base_sq=stats.base_sq,
                        delta_sq=stats.delta_sq, max_abs=stats.max_abs, samples=[stats.sample_tensor()])

    def run_piece_torch(self, name: str, r0: int, r1: int) -> _Partial:
        """run_piece by torch ops (the reference path): row blocks of `chunk` entries."""
        ia, ib = self.a.tensors[name], self.b.tensors[name]
        shape = ib.shape
        plan = self.plans[name]
        s = self._scratch()
        numel = math.prod(shape)
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        part = _Partial(key_counts=torch.zeros(_N_KEYS, dtype=torch.int64), fixes=[0] * len(self.thresholds),
                        pos_sq=torch.zeros(plan.n_pos, dtype=torch.float64) if plan else None)
        stride = max(1, numel // _MEDIAN_SAMPLES)
        for b0, b1 in row_blocks([r1 - r0, *shape[1:]] if shape else [], self.chunk):
            q0, q1 = r0 + b0, r0 + b1
            n = (q1 - q0) * row
            base, delta = s.base[:n], s.delta[:n]
            base.copy_(self._cast(ia, self._read(ia, s.raw_a, q0, q1), s.cast_a))
            delta.copy_(self._cast(ib, self._read(ib, s.raw_b, q0, q1), s.cast_b))
            delta.sub_(base)
            part.base_sq += float(torch.dot(base, base))
            part.delta_sq += float(torch.dot(delta, delta))
            part.samples.append(base[(-(q0 * row)) % stride::stride].abs())
            if part.pos_sq is not None and plan is not None:
                self._pos_block(plan, shape, delta, s, part.pos_sq, q0, q1)
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
        dtype = self.diffed_dtype(ib)
        if dtype != ib.dtype and not math.isfinite(first.base_sq + first.delta_sq):
            where = ib.file if math.isfinite(first.base_sq) else self.a.tensors[name].file
            raise CrossrouteError(f"{where}: tensor '{name}' holds NaN or inf values as {_dtype_name(dtype)} "
                                  f"(entries beyond ±{torch.finfo(dtype).max:g} overflow it); diff it as stored "
                                  "(no --as-dtype) or as bfloat16")
        check_finite_delta(name, self.a.tensors[name], ib, first.base_sq, first.delta_sq)
        sample = torch.cat(first.samples)
        eps = torch.finfo(dtype).eps if dtype.is_floating_point else 1.0
        stats = TensorStats(
            name=name, shape=list(ib.shape), dtype=_dtype_name(dtype),
            module_type=module_type(self.umap, name), numel=math.prod(ib.shape),
            below=self.binner.below(first.key_counts, first.fixes), zero=int(first.key_counts[0]),
            delta_sq=first.delta_sq, base_sq=first.base_sq, max_abs=first.max_abs,
            resolution=0.5 * eps * _lower_median(sample) if sample.numel() else 0.0,
            thresholds=self.thresholds)
        plan = self.plans[name]
        unit_sq = {} if plan is None or first.pos_sq is None else _unit_sums(self.umap, name, plan, first.pos_sq)
        return _TensorResult(stats, self.binner.histogram(first.key_counts), unit_sq)

    @staticmethod
    def _pos_block(plan: _PosPlan, shape: list[int], delta: torch.Tensor, s: _Scratch,
                   pos_sq: torch.Tensor, r0: int, r1: int) -> None:
        """Add this block (rows [r0, r1) of axis 0) of per-position δ² sums along the unit axis to `pos_sq`.

        With an expert axis, position e*shape[axis] + i is expert e's index i (UnitMap.positions)."""
        axis, eaxis, r = plan.axis, plan.expert_axis, r1 - r0
        if len(shape) == 1:
            pos_sq[r0:r1] += delta.double().square()
            return
        if eaxis is None and axis == 0:
            pos_sq[r0:r1] += torch.linalg.vector_norm(delta.view(r, -1), dim=1).double().square()
            return
        sq = torch.mul(delta, delta, out=s.sq[: delta.numel()]).view(r, *shape[1:])
        if eaxis is None and len(shape) == 2:  # axis 1: column sums
            pos_sq += torch.mv(sq.T, s.ones[:r]).double()
            return
        if eaxis is None:  # axis > 0 of a 3-D+ tensor: every position gets a share of every block
            pos_sq += sq.movedim(axis, 0).reshape(shape[axis], -1).sum(dim=1, dtype=torch.float64)
            return
        # (expert, axis) pair: a block covers experts [r0, r1) (eaxis 0), indices [r0, r1) (axis 0) or all
        per = sq.movedim((eaxis, axis), (0, 1))
        per = per.reshape(per.shape[0], per.shape[1], -1).sum(dim=2, dtype=torch.float64)
        grid = pos_sq.view(shape[eaxis], shape[axis])
        if eaxis == 0:
            grid[r0:r1] += per
        elif axis == 0:
            grid[:, r0:r1] += per
        else:
            grid += per


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Prefetcher:
    """Requests kernel readahead for the pieces ahead of the workers on a thread of its own, up to
    2 x PREFETCH_BYTES past the last piece started: a large posix_fadvise(WILLNEED) blocks until its reads are
    queued, which on a worker would stall the diff (a cold read would not overlap the compute)."""

    def __init__(self, requests: list[list[tuple[int, TensorInfo]]]) -> None:
        self._requests = requests
        self._ends = list(itertools.accumulate(sum(r.nbytes for _, r in job) for job in requests))
        self._cond = threading.Condition()
        self._started = -1  # highest piece index a worker has started
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="diff-prefetch", daemon=True)

    def __enter__(self) -> _Prefetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()

    def started(self, j: int) -> None:
        """A worker started piece j."""
        with self._cond:
            if j > self._started:
                self._started = j
                self._cond.notify()

    def _ahead(self, issued: int) -> int:
        done = self._ends[self._started] if self._started >= 0 else 0
        return (self._ends[issued - 1] if issued else 0) - done

    def _run(self) -> None:
        for j, job in enumerate(self._requests):
            with self._cond:
                while not self._stop and j > self._started + 1 and self._ahead(j) >= 2 * PREFETCH_BYTES:
                    self._cond.wait()
                if self._stop:
                    return
            for fd, rng in job:
                prefetch(fd, rng)


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
        out[kind] = [unit_id(layer, kind, j)
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
    kernel: str = DEFAULT_KERNEL,
    storage: str | None = None,
) -> UpdateAnatomy:
    """Stream δ = ckpt − base (fp32) tensor by tensor and return its anatomy (DESIGN.md §2.2).

    Thresholds compare |δ| < fp32(τ) exactly. τ is *below the resolution* of a tensor when
    τ < ½·eps(storage dtype of ckpt)·median|θ_base| (median over ≤65 536 evenly strided entries):
    an update that small to an entry of typical size is rounded away when stored.
    `kernel`: "numba" (default; torch with a recorded warning where numba is missing) or "torch".
    `storage`: a STORAGE_DTYPES name: every floating-point block of both checkpoints is rounded to it (and back to
    fp32) before δ is taken, so every statistic, each tensor's `dtype` and the resolution are of that dtype.
    """
    thresholds = tuple(float(t) for t in thresholds)
    if not all(0 < t < math.inf for t in thresholds):
        raise CrossrouteError(f"diff thresholds must be positive finite numbers, got {list(thresholds)}; "
                              "pass thresholds such as 1e-9 1e-8 1e-7 1e-6 1e-5")
    cast = resolve_storage(storage)
    kernel, kernel_warning = resolve_kernel(kernel)
    if kernel_warning and kernel_warning not in _PRINTED:
        _PRINTED.add(kernel_warning)
        console.print(f"[yellow]crossroute: warning:[/yellow] {kernel_warning}", highlight=False, soft_wrap=True)
    adapter = adapter_info(ckpt) if is_adapter(ckpt) else None
    a, b = load_checkpoint(resolve_model_path(base)), load_checkpoint(resolve_model_path(ckpt))
    check_same_architecture(a, b)
    umap = unit_map(a)
    names = sorted(a.tensors, key=lambda n: (str(a.tensors[n].file), a.tensors[n].start))
    n_workers = max(1, workers or min(os.cpu_count() or 1, torch.get_num_threads()))
    tensors: list[TensorStats] = []
    hist = [0] * (HIST_BINS + 3)
    kinds = [k for k in umap.kinds if k != "expert"]  # partition kinds; "expert" aggregates router + neurons
    unit_acc = {k: [torch.zeros(n, dtype=torch.float64) for n in umap.counts[k]] for k in kinds}
    with (_Streamer(a, b, umap, thresholds, chunk_elems, kernel, cast) as streamer, contextlib.ExitStack() as stack,
          _single_threaded_torch(), ThreadPoolExecutor(n_workers) as pool,
          _progress(progress, len(names), b.root) as tick):

        jobs = [(i, r0, r1) for i, name in enumerate(names) for r0, r1 in streamer.pieces(name)]
        last = {i: j for j, (i, _, _) in enumerate(jobs)}  # index of each tensor's last piece
        ahead = stack.enter_context(_Prefetcher([streamer.readahead(names[i], r0, r1) for i, r0, r1 in jobs]))

        def job(j: int) -> _Partial:
            i, r0, r1 = jobs[j]
            ahead.started(j)
            return streamer.run_piece(names[i], r0, r1)

        parts: list[_Partial] = []
        for j, part in enumerate(pool.map(job, range(len(jobs)))):  # in order: a tensor's pieces are adjacent
            parts.append(part)
            i = jobs[j][0]
            if last[i] != j:
                continue
            try:
                res = streamer.finish(names[i], parts)
            except CrossrouteError:
                pool.shutdown(wait=False, cancel_futures=True)  # a NaN checkpoint: stop now, not after every tensor
                raise
            parts = []
            tensors.append(res.stats)
            hist = [x + y for x, y in zip(hist, res.hist, strict=True)]
            layer = umap.layer_of(res.stats.name)
            for kind, per_unit in res.unit_sq.items():
                unit_acc[kind][layer] = unit_acc[kind][layer] + per_unit
            tick(res.stats.name)
    if "expert" in umap.kinds:
        unit_acc["expert"] = [_expert_sums(umap, unit_acc, ly) for ly in range(umap.num_layers)]
    scores = {kind: [acc.sqrt().tolist() for acc in unit_acc[kind]] for kind in umap.kinds}
    tensors.sort(key=lambda t: natural_key(t.name))
    return UpdateAnatomy(
        base=str(base), ckpt=str(ckpt), thresholds=thresholds, top_k_percent=top_k_percent,
        tensors=tensors, unit_scores=scores, top_units=_top_units(scores, top_k_percent),
        histogram=streamer.binner.to_histogram(hist), layout=head_layout_json(umap), units=umap.to_json(),
        kernel=kernel, kernel_warning=kernel_warning, adapter=adapter, storage=storage,
        stored_entries=_stored_entries(b))


def _stored_entries(ckpt: Checkpoint) -> dict[str, int]:
    """Entries per dtype the checkpoint's tensors are stored in on disk."""
    out: dict[str, int] = {}
    for info in ckpt.tensors.values():
        out[_dtype_name(info.dtype)] = out.get(_dtype_name(info.dtype), 0) + math.prod(info.shape)
    return out


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
    kernel: str = DEFAULT_KERNEL,
    storage: str | None = None,
) -> SequenceDiff:
    """Diff every checkpoint against its predecessor (each cast to `storage` first, see diff_checkpoints); Jaccard
    of top-k unit sets across stages."""
    resolve_storage(storage)  # a bad name fails before the first stage is streamed
    if len(checkpoints) < 2:
        raise CrossrouteError(f"diff needs at least two checkpoints, got {len(checkpoints)}; "
                              "pass the base checkpoint followed by one per stage")
    stages = [diff_checkpoints(prev, cur, top_k_percent, thresholds, progress, kernel=kernel, storage=storage)
              for prev, cur in zip(checkpoints[:-1], checkpoints[1:], strict=True)]
    sets = [s.top_sets() for s in stages]
    kinds = [k for k in UNIT_KINDS if any(k in s.unit_scores for s in stages)]
    matrix = {kind: [[jaccard(x.get(kind, set()), y.get(kind, set())) for y in sets] for x in sets]
              for kind in kinds}
    return SequenceDiff([str(c) for c in checkpoints], stages, matrix)


# ----------------------------------------------------------------------------- output


def write_diff_results(result: UpdateAnatomy | SequenceDiff | dict, run_dir: Path,
                       name: str = "diff") -> Path:
    """Write `run_dir/results/{name}.json` atomically; returns the path."""
    data = result if isinstance(result, dict) else result.to_json()
    return atomic_write_json(Path(run_dir) / "results" / f"{name}.json", data)
