"""Streaming checkpoint merges: SLERP, linear interpolation and core-entry transplantation.

Tensors are read one at a time from the (validated, JSON-only) safetensors headers with the diff
module's readers and written straight into the output files, shard by shard in the base's layout:
memory is about the largest tensor times the number of input checkpoints. Math runs in fp32; the
output keeps the base's dtypes, config and tokenizer files.

Per-layer `t` schedules follow mergekit: `t` is a number, a list of numbers (a gradient across the
layers) or a list of `{filter: substring, value: ...}` entries where the first matching filter (or
an entry without one) wins. A gradient's anchors spread evenly over the layers: layer i of N sits at
x = i/(N-1) and takes the linear interpolation of the anchors at x·(len-1); tensors outside the
layers sit at x = 0 (embeddings) or x = 1 (final norm, lm_head), as in mergekit's planner.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from crossroute.core.atomic import MARKER, atomic_dir, check_output_dir
from crossroute.core.errors import CrossrouteError
from crossroute.io.safetensors import (
    Checkpoint,
    SafetensorsWriter,
    TensorReader,
    check_same_architecture,
    load_checkpoint,
    natural_key,
)

DEFAULT_EPS = 5e-4  # |cos| > 1 - eps counts as colinear (mergekit's DOT_THRESHOLD 0.9995)
METHODS = ("slerp", "linear", "transplant")
_LAYER_NUM = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_SKIP_COPY = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")

TensorFn = Callable[[str, torch.Tensor, list[torch.Tensor]], torch.Tensor]


# ----------------------------------------------------------------------------- per-tensor math

def slerp_flagged(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = DEFAULT_EPS) -> tuple[torch.Tensor, bool]:
    """SLERP of the flattened fp32 vectors a -> b; (result shaped like a, whether it fell back to linear)."""
    va, vb = a.reshape(-1).float(), b.reshape(-1).float()
    na, nb = torch.linalg.vector_norm(va), torch.linalg.vector_norm(vb)
    if float(na) == 0.0 or float(nb) == 0.0:
        return ((1 - t) * va + t * vb).view(a.shape), True
    cos = float(torch.dot(va, vb) / (na * nb))
    cos = max(-1.0, min(1.0, cos))
    if abs(cos) > 1.0 - eps:
        return ((1 - t) * va + t * vb).view(a.shape), True
    theta = math.acos(cos)
    s = math.sin(theta)
    wa, wb = math.sin((1 - t) * theta) / s, math.sin(t * theta) / s
    return (wa * va + wb * vb).view(a.shape), False


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Spherical interpolation of two tensors as flat fp32 vectors (t=0: a, t=1: b).

    Uses the unnormalised vectors: sin((1-t)θ)/sinθ · a + sin(tθ)/sinθ · b with cos θ the cosine of a
    and b; falls back to linear interpolation when |cos θ| > 1 - eps (nearly colinear) or a norm is 0.
    """
    return slerp_flagged(a, b, t, eps)[0]


def linear(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """(1 - t)·a + t·b in fp32."""
    return (1 - t) * a.float() + t * b.float()


def transplant(base: torch.Tensor, donor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`base` with the entries selected by `mask` taken from `donor` (fp32).

    `mask` is a bool tensor shaped like base, or a 1-D int64 tensor of flat indices.
    """
    out = base.float().clone().reshape(-1)
    idx = mask.reshape(-1).nonzero().squeeze(1) if mask.dtype == torch.bool else mask.long()
    out[idx] = donor.float().reshape(-1)[idx]
    return out.view(base.shape)


# ----------------------------------------------------------------------------- t schedules

def layer_position(name: str, num_layers: int) -> float:
    """mergekit's x in [0, 1]: i/(N-1) for layer i, 0 for embeddings, 1 for other non-layer tensors."""
    m = _LAYER_NUM.search(name)
    if m is None:
        return 0.0 if "embed" in name or name.endswith(("wte.weight", "wpe.weight")) else 1.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def _gradient(values: Sequence[float], x: float) -> float:
    scaled = x * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * float(values[i0]) + frac * float(values[i1])


def check_t_value(value: Any, where: str = "t") -> float:
    """A t value as a float, refusing one outside [0, 1] or NaN (it would extrapolate, or write NaN tensors)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CrossrouteError(f"{where}: {value!r} is not a number.")
    if not 0.0 <= float(value) <= 1.0:  # False for NaN too
        raise CrossrouteError(f"{where}: {value!r} is outside [0, 1]; t is the other model's weight (0 keeps the "
                              "base, 1 takes the other model): pass a number from 0 to 1.")
    return float(value)


def check_t_setting(setting: Any, where: str = "t") -> None:
    """Every number anywhere in a t setting (a number, a gradient, filter entries' values) must be in [0, 1]."""
    if isinstance(setting, list):
        for i, v in enumerate(setting):
            check_t_setting(v, f"{where}[{i}]")
    elif isinstance(setting, dict):
        if "value" in setting:
            check_t_setting(setting["value"], f"{where}.value")
    else:
        check_t_value(setting, where)


def evaluate_t(setting: Any, name: str, x: float) -> float | None:
    """The value of a mergekit-style setting for tensor `name` at layer position `x` (None: no match)."""
    if isinstance(setting, bool):
        raise CrossrouteError(f"t: {setting!r} is not a number.")
    if isinstance(setting, int | float):
        return float(setting)
    if isinstance(setting, list) and setting and all(isinstance(v, int | float) for v in setting):
        return _gradient(setting, x)
    if isinstance(setting, list):
        for i, cond in enumerate(setting):
            if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
                raise CrossrouteError(f"t[{i}]: expected {{filter: SUBSTRING, value: NUMBER or [NUMBERS]}}, "
                                      f"got {cond!r}.")
            f = cond.get("filter")
            if f is None or f == "*" or str(f) in name:
                return evaluate_t(cond["value"], name, x)
        return None
    raise CrossrouteError(f"t: {setting!r} is not a number, a list of numbers or a list of filter entries.")


def load_t_schedule(source: str | Path | float | list | dict | None, default: float = 0.5) -> Any:
    """A t setting from a YAML file path, a YAML string, or an already-parsed value.

    Accepts a bare setting, a mapping with `t:`, or a whole mergekit config (`parameters: {t: ...}`).
    """
    if source is None:
        return default
    raw: Any = source
    if isinstance(source, Path) or (isinstance(source, str) and Path(source).expanduser().is_file()):
        path = Path(source).expanduser()
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise CrossrouteError(f"{path}: invalid YAML ({str(e).splitlines()[0]}).") from None
    elif isinstance(source, str):
        try:
            raw = yaml.safe_load(source)
        except yaml.YAMLError as e:
            raise CrossrouteError(f"t schedule: not a file and not valid YAML ({str(e).splitlines()[0]}).") from None
    if isinstance(raw, dict):
        if isinstance(raw.get("parameters"), dict) and "t" in raw["parameters"]:
            raw = raw["parameters"]["t"]
        elif "t" in raw:
            raw = raw["t"]
        else:
            raise CrossrouteError("t schedule: a mapping needs a 't' key (or mergekit's parameters.t).")
    evaluate_t(raw, "", 0.0)  # validate the shape once
    check_t_setting(raw)
    return raw


def t_for(setting: Any, name: str, num_layers: int) -> float:
    value = evaluate_t(setting, name, layer_position(name, num_layers))
    if value is None:
        raise CrossrouteError(f"t schedule: no entry matches tensor {name!r}; add a final entry without "
                              "a filter (e.g. {value: 0.5}).")
    return check_t_value(value, f"t of tensor {name!r}")


# ----------------------------------------------------------------------------- streaming I/O





def num_layers_of(ck: Checkpoint) -> int:
    """Decoder layers: config's num_hidden_layers (text_config too), else 1 + the largest layer index."""
    cfg = ck.config or {}
    if "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    if isinstance(cfg.get("num_hidden_layers"), int):
        return int(cfg["num_hidden_layers"])
    idx = [int(m.group(1)) for n in ck.tensors if (m := _LAYER_NUM.search(n))]
    return max(idx) + 1 if idx else 1


def open_checkpoints(base: str | Path, others: Sequence[str | Path]) -> tuple[Checkpoint, list[Checkpoint]]:
    """Load and cross-check the headers of the base and the other checkpoints (same tensors, shapes)."""
    from crossroute.model.load import resolve_model_path

    b = load_checkpoint(resolve_model_path(base))
    os_ = [load_checkpoint(resolve_model_path(o)) for o in others]
    for o in os_:
        check_same_architecture(b, o)
    return b, os_


def tensor_names(ck: Checkpoint) -> list[str]:
    """Tensor names in natural order (layers.2 before layers.10)."""
    return sorted(ck.tensors, key=natural_key)


def check_merge_out(out: str | Path, inputs: Sequence[Path], force: bool = False) -> Path:
    """Refuse a merge output that is one of its inputs, or that crossroute may not replace (core.atomic)."""
    out = Path(out).expanduser()
    for p in inputs:
        if out.resolve() == Path(p).resolve():
            raise CrossrouteError(f"--out {out}: is an input checkpoint of this merge; pass a new output directory.")
    return check_output_dir(out, force)


def check_finite(name: str, tensor: torch.Tensor, out: Path) -> None:
    """Refuse to write a merged tensor holding NaN or inf (a NaN input, or an overflow in its dtype)."""
    t = tensor if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else tensor.float()
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise CrossrouteError(f"{out}: merged tensor '{name}' has {bad} NaN or inf values, so nothing was written: an "
                              f"input checkpoint holds NaN/inf in '{name}' (or the result overflows {tensor.dtype}); "
                              "merge checkpoints with finite weights.")


def stream_merge(base: str | Path, others: Sequence[str | Path], out: str | Path, fn: TensorFn,
                 force: bool = False) -> Path:
    """Write `out` = fn(name, base_fp32, [other_fp32...]) for every floating tensor, base dtype kept.

    Non-floating tensors are copied from base. Output shards mirror the base's files; config,
    tokenizer and other non-weight files are copied from base. The directory appears atomically; an existing
    `out` is replaced only when crossroute wrote it (or `force`); a tensor with NaN/inf stops the merge.
    """
    b, os_ = open_checkpoints(base, others)
    out = check_merge_out(out, [b.root, *(o.root for o in os_)], force)
    files: dict[Path, list[str]] = {}
    for name, info in sorted(b.tensors.items(), key=lambda kv: (str(kv[1].file), kv[1].start)):
        files.setdefault(info.file, []).append(name)
    readers = [TensorReader(ck) for ck in [b, *os_]]
    with atomic_dir(out, force=force) as tmp:
        for f in sorted(b.root.iterdir()) if b.root.is_dir() else []:
            if f.is_file() and not f.name.endswith(_SKIP_COPY) and f.name != MARKER:
                shutil.copy2(f, tmp / f.name)
        for r in readers:
            r.__enter__()
        try:
            for file, names in files.items():
                specs = [(n, b.tensors[n].dtype, b.tensors[n].shape) for n in names]
                writer = SafetensorsWriter(tmp / file.name, specs)
                try:
                    for n in names:
                        bt = readers[0].read(n)
                        if bt.dtype.is_floating_point:
                            res = fn(n, bt.float(), [r.read(n).float() for r in readers[1:]])
                            bt = res.to(bt.dtype).reshape(bt.shape)
                            check_finite(n, bt, out)
                        writer.write(n, bt)
                except BaseException:
                    writer.abort()  # the real error (a full disk, a NaN) propagates, not "tensors never written"
                    raise
                writer.close()
        finally:
            for r in readers:
                r.__exit__()
    return out


# ----------------------------------------------------------------------------- masks (core regions)

def save_index_masks(masks: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Save {tensor name: sorted int64 flat indices} as safetensors (atomic; empty tensors omitted)."""
    from safetensors.torch import save

    from crossroute.core.atomic import atomic_write_bytes

    data = {k: v.to(torch.int64).contiguous() for k, v in masks.items() if v.numel()}
    return atomic_write_bytes(path, save(data, metadata={"format": "crossroute-index-mask"}))


def load_index_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Read index masks written by save_index_masks (safetensors, never pickle)."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise CrossrouteError(f"{path}: no such mask file; pass a core mask written by `crossroute cpift` "
                              "(cores/<task>.safetensors).")
    try:
        masks = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise CrossrouteError(f"{path}: not a safetensors index mask ({str(e).splitlines()[0]}).") from None
    for k, v in masks.items():
        if v.dtype != torch.int64 or v.dim() != 1:
            raise CrossrouteError(f"{path}: mask {k!r} must be a 1-D int64 tensor of flat indices.")
    return masks


def _abs_bits(x: torch.Tensor) -> torch.Tensor:
    """|x| as int32 bit patterns: monotone in |x| for finite fp32 values."""
    return x.float().abs().contiguous().view(torch.int32)


def core_masks(base: str | Path, ckpt: str | Path, percent: float) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Global top-`percent` % of |ckpt - base| over all floating entries, as sorted flat indices per tensor.

    Exact and streaming (three passes, one tensor at a time): a histogram of the top 16 bits of |δ|
    finds the bucket of the k-th largest value, a second histogram of the low bits inside it the exact
    value v; entries above v are all kept, entries equal to v are kept in natural tensor order, then
    flat-index order, until k = ceil(N·p/100) entries. Returns (masks, stats).
    """
    if not 0 < percent <= 100:
        raise CrossrouteError(f"core percent {percent} must be in (0, 100].")
    b, (o,) = open_checkpoints(base, [ckpt])
    names = [n for n in tensor_names(b) if b.tensors[n].dtype.is_floating_point]
    with TensorReader(b) as rb, TensorReader(o) as ro:

        def deltas() -> Any:
            for n in names:
                yield n, _abs_bits(ro.read(n).float() - rb.read(n).float()).reshape(-1)

        hi = torch.zeros(1 << 16, dtype=torch.int64)
        total = 0
        for _, bits in deltas():
            hi += torch.bincount(bits >> 16, minlength=1 << 16)
            total += bits.numel()
        k = min(total, math.ceil(total * percent / 100.0))
        above = torch.flip(torch.cumsum(torch.flip(hi, [0]), 0), [0])  # above[j] = count with key >= j
        bucket = int((above >= k).nonzero().max()) if k else 0
        n_above_bucket = int(above[bucket + 1]) if bucket + 1 < above.numel() else 0
        lo = torch.zeros(1 << 16, dtype=torch.int64)
        for _, bits in deltas():
            inside = bits[(bits >> 16) == bucket]
            if inside.numel():
                lo += torch.bincount(inside & 0xFFFF, minlength=1 << 16)
        lo_above = torch.flip(torch.cumsum(torch.flip(lo, [0]), 0), [0])
        need = k - n_above_bucket
        low = int((lo_above >= need).nonzero().max()) if need > 0 else 0xFFFF
        v = (bucket << 16) | low
        n_greater = n_above_bucket + (int(lo_above[low + 1]) if low + 1 < lo_above.numel() else 0)
        ties = k - n_greater
        masks: dict[str, torch.Tensor] = {}
        for n, bits in deltas():
            idx = (bits > v).nonzero().squeeze(1)
            if ties > 0:
                eq = (bits == v).nonzero().squeeze(1)[:ties]
                ties -= eq.numel()
                idx = torch.cat([idx, eq]).sort().values
            masks[n] = idx.to(torch.int64)
    threshold = torch.tensor([v], dtype=torch.int32).view(torch.float32).item()
    kept = sum(int(m.numel()) for m in masks.values())
    return masks, {"numel": total, "k": kept, "percent": percent, "threshold": threshold}


def mask_jaccard(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Jaccard of two index-mask sets of (tensor, index) entries; 0.0 when both are empty."""
    inter = 0
    for name in set(a) & set(b):
        inter += int(torch.isin(a[name], b[name], assume_unique=True).sum())
    union = sum(int(v.numel()) for v in a.values()) + sum(int(v.numel()) for v in b.values()) - inter
    return inter / union if union else 0.0


# ----------------------------------------------------------------------------- merges

def merge_checkpoints(
    method: str,
    base: str | Path,
    others: Sequence[str | Path],
    out: str | Path,
    t: Any = 0.5,
    eps: float = DEFAULT_EPS,
    masks: Sequence[dict[str, torch.Tensor]] | None = None,
    top_percent: float = 1.0,
    force: bool = False,
) -> dict[str, Any]:
    """Merge `others` into `base` tensor by tensor and write checkpoint `out`; returns merge statistics.

    slerp / linear: exactly one other model; t (number or mergekit-style schedule) is its weight
    (t=0 keeps base). transplant: each donor's masked entries replace the base's (masks default to
    each donor's global top-`top_percent` % of |donor - base|); where several donors' masks overlap,
    the donor with the larger |donor - base| wins (ties: the earlier donor). `force`: replace an existing `out`
    crossroute did not write.
    """
    if method not in METHODS:
        raise CrossrouteError(f"merge method {method!r} unknown; use one of {', '.join(METHODS)}.")
    if not others:
        raise CrossrouteError(f"merge {method}: pass at least one model to merge into the base.")
    stats: dict[str, Any] = {"method": method, "base": str(base), "models": [str(o) for o in others]}
    if method in ("slerp", "linear"):
        if len(others) != 1:
            raise CrossrouteError(f"merge {method}: takes exactly one model besides the base, got {len(others)}.")
        setting = load_t_schedule(t) if not isinstance(t, int | float) else check_t_value(t)
        b, _ = open_checkpoints(base, others)
        n_layers = num_layers_of(b)
        used: dict[str, float] = {}
        fallback: list[str] = []

        def fn(name: str, a: torch.Tensor, rest: list[torch.Tensor]) -> torch.Tensor:
            tv = t_for(setting, name, n_layers)
            used[name] = tv
            if method == "linear":
                return linear(a, rest[0], tv)
            res, lin = slerp_flagged(a, rest[0], tv, eps)
            if lin:
                fallback.append(name)
            return res

        stream_merge(base, others, out, fn, force=force)
        stats.update({"t": used, "linear_fallback": fallback} if method == "slerp" else {"t": used})
        return stats
    if masks is None:
        masks = [core_masks(base, o, top_percent)[0] for o in others]
    elif len(masks) != len(others):
        raise CrossrouteError(f"merge transplant: {len(masks)} masks for {len(others)} donors.")
    collisions = 0
    moved = 0

    def tfn(name: str, a: torch.Tensor, rest: list[torch.Tensor]) -> torch.Tensor:
        nonlocal collisions, moved
        res, c, m = transplant_cores(a, rest, [mk.get(name) for mk in masks])
        collisions += c
        moved += m
        return res

    stream_merge(base, others, out, tfn, force=force)
    stats.update({"transplanted": moved, "collisions": collisions,
                  "collision_rule": "larger |donor - base| wins; ties: earlier donor"})
    return stats


def transplant_cores(base: torch.Tensor, donors: list[torch.Tensor],
                     masks: list[torch.Tensor | None]) -> tuple[torch.Tensor, int, int]:
    """Transplant each donor's index-masked entries into `base` (fp32).

    Where masks overlap the larger |donor - base| wins (ties: the earlier donor). Returns (tensor,
    entries in two or more masks, entries transplanted).
    """
    out = base.float().reshape(-1).clone()
    flat = base.float().reshape(-1)
    best = torch.full_like(out, -1.0)
    all_idx = []
    for donor, idx in zip(donors, masks, strict=True):
        if idx is None or idx.numel() == 0:
            continue
        d = donor.float().reshape(-1)
        mag = (d[idx] - flat[idx]).abs()
        win = mag > best[idx]
        sel = idx[win]
        out[sel] = d[sel]
        best[sel] = mag[win]
        all_idx.append(idx)
    if not all_idx:
        return out.view(base.shape), 0, 0
    _, counts = torch.unique(torch.cat(all_idx), return_counts=True)
    return out.view(base.shape), int((counts > 1).sum()), int(counts.numel())


def run_merge(method: str, base: str | Path, models: Sequence[str | Path], out: str | Path,
              t_schedule_yaml: str | Path | None = None, t: float = 0.5, mask: str | Path | None = None,
              top_percent: float = 1.0, force: bool = False) -> Path:
    """CLI entry: `crossroute merge slerp|linear|transplant BASE MODEL... --out DIR`.

    slerp/linear take `t` or a mergekit-style schedule file (`t_schedule_yaml`); transplant takes a
    core mask file (safetensors of flat indices, one donor) or the donors' top-`top_percent` % cores.
    Writes OUT/merge.json with the statistics next to the weights. An existing OUT is replaced only when
    crossroute wrote it (its .crossroute marker) or `force`; an input checkpoint as OUT is refused.
    """
    from crossroute.core.atomic import atomic_write_json
    from crossroute.model.load import check_checkpoint_dir

    setting: Any = load_t_schedule(t_schedule_yaml) if t_schedule_yaml is not None else t
    if method != "transplant" and isinstance(setting, int | float):
        check_t_value(setting, "--t")
    base_p = check_checkpoint_dir(base)
    model_ps = [check_checkpoint_dir(m, need_tokenizer=False) for m in models]
    check_merge_out(out, [base_p, *model_ps], force)
    masks = None
    if mask is not None:
        if method != "transplant":
            raise CrossrouteError("--mask applies to transplant only.")
        if len(model_ps) != 1:
            raise CrossrouteError("--mask gives one donor's core; pass exactly one donor model with it.")
        masks = [load_index_masks(mask)]
    stats = merge_checkpoints(method, base_p, model_ps, out, t=setting, masks=masks, top_percent=top_percent,
                              force=force)
    atomic_write_json(Path(out) / "merge.json", {**stats, "t_schedule": setting if method != "transplant" else None})
    return Path(out)
