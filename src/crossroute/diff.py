"""Streaming update anatomy of safetensors checkpoints (DESIGN.md §2.2): δ = ckpt − base in fp32.

Tensors are read one row block at a time from both checkpoints (never a whole model, never a
pickle), so memory stays bounded by a few fixed fp32 buffers, well under the largest tensor.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

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
_MEDIAN_SAMPLES = 1 << 16
_ZERO_BELOW = float(torch.finfo(torch.float32).tiny)  # |δ| under the smallest normal fp32 is "zero"
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")


# ----------------------------------------------------------------------------- results


@dataclass
class DeltaHistogram:
    """Fixed-bin histogram of log10|δ|: counts[i] covers [edges[i], edges[i+1]); zero/under/over."""

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
              "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass
class _TensorInfo:
    file: Path
    dtype: str
    shape: list[int]
    offset: int


@dataclass
class _Checkpoint:
    root: Path
    tensors: dict[str, _TensorInfo]
    config: dict[str, Any] | None


def _read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON)."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (OSError, struct.error, ValueError) as exc:
        raise CrossrouteError(f"cannot read safetensors header of {path}: {exc}; "
                              "re-save the checkpoint with save_pretrained") from exc
    header.pop("__metadata__", None)
    return header


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
        for name, meta in _read_header(f).items():
            tensors[name] = _TensorInfo(f, meta["dtype"], list(meta["shape"]),
                                        meta["data_offsets"][0])
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


class _Binner:
    """Counts |δ| against the thresholds and the histogram edges in one bucketize pass."""

    def __init__(self, thresholds: Sequence[float]) -> None:
        edges = [HIST_LOG10_MIN + i * (HIST_LOG10_MAX - HIST_LOG10_MIN) / HIST_BINS
                 for i in range(HIST_BINS + 1)]
        self.edges_log10 = edges

        def f32(x: float) -> float:
            return float(torch.tensor(x, dtype=torch.float32))

        self.thr_vals = [f32(t) for t in thresholds]
        self.edge_vals = [f32(10.0**e) for e in edges]
        self.zero_val = _ZERO_BELOW
        values = sorted({self.zero_val, *self.thr_vals, *self.edge_vals})
        self.pos = {v: i for i, v in enumerate(values)}
        self.boundaries = torch.tensor(values, dtype=torch.float32)
        self.n_buckets = len(values) + 1

    def count(self, absd: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Bucket counts (int64, n_buckets) of the non-negative `absd`; `idx` is int32 scratch."""
        torch.bucketize(absd, self.boundaries, right=True, out_int32=True, out=idx)
        return torch.bincount(idx.view(-1), minlength=self.n_buckets)

    def cum_below(self, counts: torch.Tensor) -> list[int]:
        """cum[k] = number of entries < boundaries[k]."""
        return torch.cumsum(counts, 0).tolist()

    def below(self, cum: list[int]) -> list[int]:
        return [cum[self.pos[v]] for v in self.thr_vals]

    def zeros(self, cum: list[int]) -> int:
        return cum[self.pos[self.zero_val]]

    def histogram(self, counts: torch.Tensor) -> DeltaHistogram:
        cum = self.cum_below(counts)
        total = cum[-1]
        at = [cum[self.pos[v]] for v in self.edge_vals]
        zero = self.zeros(cum)
        return DeltaHistogram(self.edges_log10, [at[i + 1] - at[i] for i in range(HIST_BINS)],
                              zero=zero, underflow=at[0] - zero, overflow=total - at[-1])


class _Buffers:
    """Reusable fp32 scratch space, so streaming allocates nothing per block."""

    def __init__(self, n: int) -> None:
        self.base = torch.empty(n, dtype=torch.float32)
        self.delta = torch.empty(n, dtype=torch.float32)
        self.idx = torch.empty(n, dtype=torch.int32)

    def view(self, buf: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        n = math.prod(shape)
        if n > buf.numel():
            raise AssertionError("block larger than buffer")
        return buf[:n].view(*shape)


def _blocks(shape: list[int], chunk: int) -> Iterator[tuple[int, int]]:
    """Row ranges (first-axis slices) of about `chunk` entries; 1-D tensors are cut flat."""
    if not shape:
        yield 0, 1
        return
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, chunk // max(row, 1))
    for r0 in range(0, shape[0], step):
        yield r0, min(shape[0], r0 + step)


def _read_block(handle: Any, name: str, shape: list[int], r0: int, r1: int) -> torch.Tensor:
    if not shape:
        return handle.get_tensor(name).reshape(1)
    return handle.get_slice(name)[r0:r1]


def _diff_tensor(
    name: str, info_a: _TensorInfo, info_b: _TensorInfo, ha: Any, hb: Any,
    role: _UnitRole | None, binner: _Binner, bufs: _Buffers, chunk: int,
    thresholds: tuple[float, ...],
) -> tuple[TensorStats, torch.Tensor, torch.Tensor | None]:
    """Stream one tensor; returns its stats, its bucket counts and its per-row/col δ² sums."""
    shape = info_b.shape
    numel = math.prod(shape)
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    counts = torch.zeros(binner.n_buckets, dtype=torch.int64)
    unit_sq: torch.Tensor | None = None
    if role is not None:
        unit_sq = torch.zeros(shape[role.axis], dtype=torch.float64)
    base_sq = delta_sq = 0.0
    max_abs = 0.0
    stride = max(1, numel // _MEDIAN_SAMPLES)
    samples: list[torch.Tensor] = []
    storage_dtype = _ST_DTYPES.get(info_b.dtype)
    for r0, r1 in _blocks(shape, chunk):
        a = _read_block(ha, name, shape, r0, r1)
        b = _read_block(hb, name, shape, r0, r1)
        if storage_dtype is None:
            storage_dtype = b.dtype
        bshape = [r1 - r0, row] if len(shape) > 1 else [a.numel()]
        base = bufs.view(bufs.base, bshape)
        delta = bufs.view(bufs.delta, bshape)
        base.copy_(a.reshape(bshape))
        delta.copy_(b.reshape(bshape))
        delta.sub_(base)
        flat_base, flat_delta = base.view(-1), delta.view(-1)
        base_sq += float(torch.dot(flat_base, flat_base))
        delta_sq += float(torch.dot(flat_delta, flat_delta))
        start = (-(r0 * row)) % stride
        samples.append(flat_base[start::stride].abs())
        if unit_sq is not None and role is not None:
            if len(shape) == 1:
                unit_sq[r0:r1] += delta.double().square()
            elif role.axis == 0:
                unit_sq[r0:r1] += torch.linalg.vector_norm(delta, dim=1).double().square()
            else:
                unit_sq += torch.linalg.vector_norm(delta, dim=0).double().square()
        delta.abs_()
        max_abs = max(max_abs, float(delta.max()))
        counts += binner.count(delta, bufs.view(bufs.idx, bshape))
    cum = binner.cum_below(counts)
    sample = torch.cat(samples) if samples else torch.zeros(1)
    eps = torch.finfo(storage_dtype).eps if storage_dtype.is_floating_point else 1.0
    resolution = 0.5 * eps * float(sample.median()) if sample.numel() else 0.0
    stats = TensorStats(
        name=name, shape=list(shape), dtype=str(storage_dtype).removeprefix("torch."),
        module_type=module_type(name), numel=numel, below=binner.below(cum),
        zero=binner.zeros(cum), delta_sq=delta_sq, base_sq=base_sq, max_abs=max_abs,
        resolution=resolution, thresholds=thresholds)
    return stats, counts, unit_sq


def _unit_scores(role: _UnitRole, unit_sq: torch.Tensor) -> torch.Tensor:
    """Per-unit sums of δ² from per-row/column sums (units are groups of `role.group`)."""
    return unit_sq.view(-1, role.group).sum(dim=1)


@contextlib.contextmanager
def _open_all(ckpt: _Checkpoint) -> Iterator[dict[Path, Any]]:
    with contextlib.ExitStack() as stack:
        files = dict.fromkeys(info.file for info in ckpt.tensors.values())
        yield {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in files}


def _top_units(scores: dict[str, list[list[float]]], pct: float) -> dict[str, list[str]]:
    """Top `pct` % of units of each kind by score (ties: lower layer, then index); zeros dropped."""
    out: dict[str, list[str]] = {}
    for kind, per_layer in scores.items():
        flat = [(s, layer, j) for layer, row in enumerate(per_layer) for j, s in enumerate(row)]
        k = math.ceil(len(flat) * pct / 100.0) if flat and pct > 0 else 0
        flat.sort(key=lambda t: (-t[0], t[1], t[2]))
        out[kind] = [f"L{layer}.{_UNIT_TAG[kind]}.{j}" for s, layer, j in flat[:k] if s > 0]
    return out


def diff_checkpoints(
    base: str | Path,
    ckpt: str | Path,
    top_k_percent: float = 1.0,
    thresholds: Sequence[float] = THRESHOLDS,
    progress: bool = False,
    chunk_elems: int = CHUNK_ELEMS,
) -> UpdateAnatomy:
    """Stream δ = ckpt − base (fp32) tensor by tensor and return its anatomy (DESIGN.md §2.2).

    Thresholds compare |δ| < fp32(τ). τ is *below the resolution* of a tensor when
    τ < ½·eps(storage dtype of ckpt)·median|θ_base| (median over ≤65 536 evenly strided entries):
    an update that small to an entry of typical size is rounded away when stored.
    """
    thresholds = tuple(float(t) for t in thresholds)
    a, b = _load_checkpoint(base), _load_checkpoint(ckpt)
    _check_same_architecture(a, b)
    layout = _layout(a)
    binner = _Binner(thresholds)
    bufs = _Buffers(max([chunk_elems] + [_max_block(i.shape, chunk_elems)
                                         for i in a.tensors.values()]))
    names = sorted(a.tensors, key=lambda n: (str(a.tensors[n].file), a.tensors[n].offset))
    tensors: list[TensorStats] = []
    total = torch.zeros(binner.n_buckets, dtype=torch.int64)
    unit_acc: dict[str, dict[int, torch.Tensor]] = {k: {} for k in UNIT_KINDS}
    with _open_all(a) as fa, _open_all(b) as fb, _progress(progress, len(names), b.root) as tick:
        for name in names:
            ia, ib = a.tensors[name], b.tensors[name]
            role = _unit_role(name, ia.shape, layout)
            stats, counts, unit_sq = _diff_tensor(name, ia, ib, fa[ia.file], fb[ib.file], role,
                                                  binner, bufs, chunk_elems, thresholds)
            tensors.append(stats)
            total += counts
            if role is not None and unit_sq is not None:
                per_unit = _unit_scores(role, unit_sq)
                acc = unit_acc[role.kind]
                acc[role.layer] = acc[role.layer] + per_unit if role.layer in acc else per_unit
            tick(name)
    scores = {kind: _per_layer_lists(acc) for kind, acc in unit_acc.items()}
    tensors.sort(key=lambda t: _natural_key(t.name))
    return UpdateAnatomy(
        base=str(base), ckpt=str(ckpt), thresholds=thresholds, top_k_percent=top_k_percent,
        tensors=tensors, unit_scores=scores, top_units=_top_units(scores, top_k_percent),
        histogram=binner.histogram(total), layout=layout.to_json() if layout else {})


def _natural_key(name: str) -> list[Any]:
    """Sort key that orders layers.2 before layers.10."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def _max_block(shape: list[int], chunk: int) -> int:
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return row * max(1, chunk // max(row, 1)) if len(shape) > 1 else min(chunk, max(1, row))


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
