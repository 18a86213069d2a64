"""Checkpoint merges: mergekit's methods run by mergekit itself, and crossroute's own streamed core transplant.

Every mergekit method (`mergekit_methods()`: linear, slerp, nuslerp, task_arithmetic, ties, dare_ties,
dare_linear, della, model_stock, ram, ...) runs through mergekit's own planner and executor: tensors load
lazily shard by shard, math runs on the CPU in fp32 (mergekit's `dtype`) and the output keeps the base's
dtype (`out_dtype`), config and tokenizer are mergekit's copies from the base. A configuration is built
from a method name and its parameters (global, per model), or read from a mergekit YAML file as written
for `mergekit-yaml`. Output follows crossroute's conventions: OUT appears atomically with its `.crossroute`
marker, a foreign OUT is refused unless `force`, a tensor with NaN/inf is never written, and OUT keeps
the exact configuration as mergekit_config.yml (`mergekit-yaml OUT/mergekit_config.yml DIR` redoes it).

crossroute keeps only what mergekit lacks: the core-masked transplant (exact global top-p % cores,
streamed tensor by tensor) and the streaming helpers and SLERP math CPI-FT fuses task vectors with
(crossroute.repair.cpift). See docs/merge.md.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
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
DEFAULT_T = 0.5  # slerp / linear: the other model's weight when none is given
MERGE_SEED = 0  # seed of mergekit's random methods (DARE, DELLA): the same command writes the same weights
COMPUTE_DTYPE = "float32"  # mergekit's `dtype` for configurations crossroute builds
TRANSPLANT = "transplant"
_SKIP_COPY = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_YAML_SUFFIXES = (".yaml", ".yml")
_PARAM_OPTION = re.compile(r"(?:(\d+):)?([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.S)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64"}

TensorFn = Callable[[str, torch.Tensor, list[torch.Tensor]], torch.Tensor]
ValueCheck = Callable[[Any, str], Any]


# ----------------------------------------------------------------------------- per-tensor math (CPI-FT)

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


# ----------------------------------------------------------------------------- parameter settings

def check_t_value(value: Any, where: str = "t") -> float:
    """A t value as a float, refusing one outside [0, 1] or NaN (it would extrapolate, or write NaN tensors)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CrossrouteError(f"{where}: {value!r} is not a number.")
    if not 0.0 <= float(value) <= 1.0:  # False for NaN too
        raise CrossrouteError(f"{where}: {value!r} is outside [0, 1]; t is the other model's weight (0 keeps the "
                              "base, 1 takes the other model): pass a number from 0 to 1.")
    return float(value)


def check_setting(setting: Any, where: str, check: ValueCheck) -> None:
    """Validate a mergekit parameter setting; `check(value, where)` judges every plain value in it.

    A setting is a value, a gradient (a list of values spread over the layers) or filter entries
    ({filter: SUBSTRING, value: VALUE or [VALUES]}; the first entry whose filter is in the tensor name wins).
    Unlike mergekit, an entry with other keys (a typo such as `filtr`) is refused, not read as "every tensor".
    """
    entries = [setting] if isinstance(setting, dict) else setting
    if isinstance(entries, list) and entries and all(isinstance(e, dict) for e in entries):
        for i, e in enumerate(entries):
            at = f"{where}[{i}]" if isinstance(setting, list) else where
            if "value" not in e or set(e) - {"filter", "value"} or not isinstance(e.get("filter"), str | None):
                raise CrossrouteError(f"{at}: expected {{filter: SUBSTRING, value: VALUE or [VALUES]}}, got {e!r}.")
            if isinstance(e["value"], dict) or (isinstance(e["value"], list) and any(
                    isinstance(v, dict | list) for v in e["value"])):
                raise CrossrouteError(f"{at}.value: {e['value']!r}: a filter entry's value is a value or a gradient "
                                      "[V0, V1, ...], not more filter entries.")
            check_setting(e["value"], f"{at}.value", check)
        return
    if isinstance(setting, list):
        if not setting:
            raise CrossrouteError(f"{where}: an empty list; pass a value or a gradient [V0, V1, ...].")
        for i, v in enumerate(setting):
            if isinstance(v, dict | list):
                raise CrossrouteError(f"{where}[{i}]: {v!r}: a gradient holds plain values; filter entries form a "
                                      "list of their own.")
            check(v, f"{where}[{i}]")
        return
    check(setting, where)


def load_t_schedule(source: str | Path | float | list | dict | None, default: float = DEFAULT_T) -> Any:
    """A t setting from a YAML file path, a YAML string, or an already-parsed value, checked (values in [0, 1]).

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
    if isinstance(raw, dict) and set(raw) - {"filter", "value"}:
        if isinstance(raw.get("parameters"), dict) and "t" in raw["parameters"]:
            raw = raw["parameters"]["t"]
        elif "t" in raw:
            raw = raw["t"]
        else:
            raise CrossrouteError("t schedule: a mapping needs a 't' key (or mergekit's parameters.t).")
    check_setting(raw, "t", check_t_value)
    return raw


def one_minus(setting: Any) -> Any:
    """The setting 1 - s, value by value (a gradient's anchors too: interpolation commutes with 1 - x)."""
    if isinstance(setting, dict):
        return {**setting, "value": one_minus(setting["value"])}
    if isinstance(setting, list):
        return [one_minus(v) for v in setting]
    return 1.0 - float(setting)


def parse_param_options(items: Sequence[str]) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """`--param` options as (global parameters, {input index: parameters}); index 0 is the base, 1.. the models.

    NAME=VALUE sets a global parameter, I:NAME=VALUE input I's own; VALUE is YAML (0.5, true, a gradient
    [0, 0.5, 1], filter entries [{filter: mlp, value: 0.3}, {value: 0.5}]); 1e-5 reads as a number.
    """
    shared: dict[str, Any] = {}
    per_input: dict[int, dict[str, Any]] = {}
    for item in items:
        m = _PARAM_OPTION.fullmatch(item)
        if m is None:
            raise CrossrouteError(f"--param {item!r}: expected NAME=VALUE or I:NAME=VALUE (I: 0 the base, 1.. the "
                                  "models), e.g. --param density=0.5 --param 1:weight=0.7.")
        index, name, text = m.groups()
        try:
            value = _numbers(yaml.safe_load(text)) if text.strip() else None
        except yaml.YAMLError as e:
            raise CrossrouteError(f"--param {name}: {text!r} is not a YAML value ({str(e).splitlines()[0]}).") from None
        if value is None:
            raise CrossrouteError(f"--param {name}: no value; pass {name}=VALUE.")
        target = shared if index is None else per_input.setdefault(int(index), {})
        if name in target:
            whose = "" if index is None else f" for input {index}"
            raise CrossrouteError(f"--param {item}: {name} is given twice{whose}; pass it once.")
        target[name] = value
    return shared, per_input


def _numbers(value: Any) -> Any:
    """YAML 1.1 reads 1e-5 as a string: values that parse as floats become floats (filters stay strings)."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
        return value
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: v if k == "filter" else _numbers(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------- streaming I/O

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


def check_written_finite(folder: Path, out: Path) -> None:
    """Read back every floating tensor written into `folder` (one at a time) and refuse NaN/inf (check_finite)."""
    ck = load_checkpoint(folder)
    with TensorReader(ck) as reader:
        for name in tensor_names(ck):
            if ck.tensors[name].dtype.is_floating_point:
                check_finite(name, reader.read(name), out)


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


# ----------------------------------------------------------------------------- mergekit

def mergekit_methods() -> tuple[str, ...]:
    """The merge methods in mergekit's registry, sorted."""
    from mergekit.merge_methods import registry

    return tuple(sorted(m.spec.name for m in registry.registered_methods()))


def mergekit_method(name: str) -> Any:
    """mergekit's merge method `name` (its `.spec` lists the parameters); an unknown name lists them all."""
    from mergekit.merge_methods import registry

    names = mergekit_methods()
    if name not in names:
        raise CrossrouteError(f"merge method {name!r} unknown; use {TRANSPLANT}, a mergekit YAML file (.yaml), or one "
                              f"of mergekit's methods: {', '.join(names)}.")
    return registry.get(name)


def is_yaml_path(method: str | Path) -> bool:
    """Whether a METHOD argument names a mergekit YAML file rather than a method."""
    return Path(str(method)).suffix.lower() in _YAML_SUFFIXES


def _one_line(e: BaseException) -> str:
    """The first line of an exception; for pydantic's ValidationError its first error, with where it is."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        with contextlib.suppress(Exception):
            err = errors()[0]
            loc = ".".join(str(x) for x in err.get("loc", ()))
            return f"{loc}: {err['msg']}" if loc else str(err["msg"])
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _value_check(method: str, param: Any) -> ValueCheck:
    """A check of one plain value of mergekit parameter `param` against mergekit's own type for it."""

    def check(value: Any, where: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise CrossrouteError(f"{where}: {value!r} is not finite; pass a number.")
        try:
            param.validate(value)
        except ValueError as e:  # pydantic's ValidationError
            kind = getattr(param.value_type, "__name__", str(param.value_type))
            raise CrossrouteError(f"{where}: {value!r} is not a valid {kind} for {method}'s {param.name} "
                                  f"({_one_line(e)}).") from None
        if method == "slerp" and param.name == "t":
            check_t_value(value, where)

    return check


def check_parameters(method: str, block: Mapping[str, Any] | None, where: str, level: str) -> None:
    """Check one parameters block of `method`: names it has, allowed at this level, values of mergekit's types.

    level: "global" (top level or a slice: every parameter; per-input ones are every input's default), "base"
    (the base's own: per-input ones only) or "model" (another model's: per-input and non-base ones). mergekit
    itself ignores a misspelt name or one given where it does not apply; crossroute refuses both.
    """
    from mergekit.merge_methods.base import ParameterScope

    params = {p.name: p for p in mergekit_method(method).spec.parameters}
    if block is not None and not isinstance(block, Mapping):
        raise CrossrouteError(f"{where.rstrip('.')}: expected a mapping of parameters, got {block!r}.")
    for name, setting in (block or {}).items():
        at = f"{where}{name}"
        if name not in params:
            raise CrossrouteError(f"{at}: {method} has no parameter {name!r}; its parameters: "
                                  f"{', '.join(params) or 'none'}.")
        p = params[name]
        if level != "global" and p.scope == ParameterScope.SHARED:
            raise CrossrouteError(f"{at}: {name} is one setting for all of {method}'s inputs; give it globally "
                                  f"(--param {name}=VALUE, or the top-level parameters), not per model.")
        if level == "base" and p.scope == ParameterScope.NON_BASE:
            raise CrossrouteError(f"{at}: {method} applies {name} to the other models, not to the base; give it "
                                  "to them (or globally).")
        check_setting(setting, at, _value_check(method, p))


def _check_required(method: str, params: Mapping[str, Any], base_params: Mapping[str, Any],
                    model_params: Sequence[Mapping[str, Any]]) -> None:
    """Every required parameter of `method` is given, globally or for each input it applies to."""
    from mergekit.merge_methods.base import ParameterScope

    for p in mergekit_method(method).spec.parameters:
        if not p.required or p.name in params:
            continue
        if p.scope == ParameterScope.SHARED:
            raise CrossrouteError(f"merge {method}: parameter {p.name} is required; pass --param {p.name}=VALUE.")
        missing = [i for i, mp in enumerate(model_params, 1) if p.name not in mp]
        if p.scope == ParameterScope.INPUT and p.name not in base_params:
            missing.insert(0, 0)
        if missing:
            raise CrossrouteError(f"merge {method}: parameter {p.name} is required for input "
                                  f"{', '.join(map(str, missing))} (0: the base, 1..: the models); pass --param "
                                  f"{p.name}=VALUE for all, or --param I:{p.name}=VALUE per input.")


def _model_ref(path: Path) -> str | dict[str, Any]:
    """mergekit's reference to local checkpoint `path`: the path, or {model: {path: ...}} when it holds '@' or '+'
    (which mergekit's string form reads as a hub revision or a LoRA adapter)."""
    text = str(path)
    return {"model": {"path": text}} if "@" in text or "+" in text else text


def base_dtype_name(base: Path) -> str | None:
    """The dtype most of the base's floating tensors have, as mergekit names it (None: no floating tensors)."""
    counts = Counter(i.dtype for i in load_checkpoint(base).tensors.values() if i.dtype.is_floating_point)
    return _DTYPE_NAMES.get(counts.most_common(1)[0][0]) if counts else None


def build_mergekit_config(method: str, base: Path, models: Sequence[Path], params: Mapping[str, Any] | None = None,
                          model_params: Sequence[Mapping[str, Any] | None] | None = None,
                          base_params: Mapping[str, Any] | None = None, dtype: str | None = COMPUTE_DTYPE,
                          out_dtype: str | None = None) -> dict[str, Any]:
    """A mergekit configuration (a plain dict, as its YAML) merging `models` into `base` with mergekit's `method`.

    params: the top-level parameters (a per-input one there is every input's default); model_params[i]:
    models[i]'s own; base_params: the base's (per-input parameters such as linear's weight). The base is
    mergekit's base_model and the first input. dtype: mergekit's compute dtype; out_dtype: the written one.
    """
    mergekit_method(method)
    if not models:
        raise CrossrouteError(f"merge {method}: pass at least one model to merge into the base.")
    per_model = [dict(p or {}) for p in model_params] if model_params is not None else [{} for _ in models]
    if len(per_model) != len(models):
        raise CrossrouteError(f"merge {method}: {len(per_model)} per-model parameter sets for {len(models)} models; "
                              "pass one per model (or none).")
    seen = [Path(base).resolve(), *(Path(m).resolve() for m in models)]
    for i, p in enumerate(seen):
        if p in seen[:i]:
            raise CrossrouteError(f"merge {method}: {p} is given twice; pass each checkpoint once.")
    glob, base_p = dict(params or {}), dict(base_params or {})
    check_parameters(method, glob, "--param ", "global")
    check_parameters(method, base_p, "--param 0:", "base")
    for i, mp in enumerate(per_model, 1):
        check_parameters(method, mp, f"--param {i}:", "model")
    _check_required(method, glob, base_p, per_model)
    try:
        mergekit_method(method).validate_inputs(["base", *range(1, len(models) + 1)], "base")
    except ValueError as e:
        raise CrossrouteError(f"merge {method}: {_one_line(e)} (the base counts as one input).") from None

    def entry(path: Path, own: dict[str, Any]) -> dict[str, Any]:
        return {"model": _model_ref(path), **({"parameters": own} if own else {})}

    entries = [entry(base, base_p), *(entry(m, mp) for m, mp in zip(models, per_model, strict=True))]
    config: dict[str, Any] = {"merge_method": method, "base_model": _model_ref(base), "models": entries}
    if glob:
        config["parameters"] = glob
    if dtype:
        config["dtype"] = dtype
    if out_dtype:
        config["out_dtype"] = out_dtype
    return config


def load_mergekit_yaml(path: str | Path) -> tuple[dict[str, Any], str]:
    """(configuration, its text) of a mergekit YAML file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CrossrouteError(f"{path}: no such mergekit YAML file; pass the path of a mergekit configuration "
                              "(merge_method, base_model, models, parameters).")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CrossrouteError(f"{path}: invalid YAML ({str(e).splitlines()[0]}).") from None
    if not isinstance(raw, dict):
        raise CrossrouteError(f"{path}: a mergekit configuration is a mapping (merge_method, models, ...), "
                              f"got {type(raw).__name__}.")
    return raw, text


def _same_ref(a: Any, b: Any) -> bool:
    from mergekit.common import ModelReference

    return a is not None and b is not None and ModelReference.model_validate(a) == ModelReference.model_validate(b)


def _parameter_blocks(node: Mapping[str, Any], at: str = "", base: Any = None) -> Iterator[tuple[str, Any, str]]:
    """(where, parameters block, level) of every parameters block in a mergekit configuration (check_parameters)."""
    yield f"{at}parameters.", node.get("parameters"), "global"
    base = node.get("base_model") or base
    for key in ("models", "sources"):
        for i, m in enumerate(node.get(key) or []):
            yield (f"{at}{key}[{i}].parameters.", m.get("parameters"),
                   "base" if _same_ref(m.get("model"), base) else "model")
    for i, s in enumerate(node.get("slices") or []):
        yield from _parameter_blocks(s, f"{at}slices[{i}].", base)
    for name, module in (node.get("modules") or {}).items():
        yield from _parameter_blocks(module, f"{at}modules.{name}.", base)


def mergekit_configuration(config: Mapping[str, Any], where: str) -> Any:
    """`config` as mergekit's MergeConfiguration: a known method, every parameters block checked, one-line errors."""
    from mergekit.config import MergeConfiguration

    method = config.get("merge_method")
    if not isinstance(method, str):
        raise CrossrouteError(f"{where}: merge_method is missing; name one of mergekit's methods: "
                              f"{', '.join(mergekit_methods())}.")
    mergekit_method(method)
    try:
        cfg = MergeConfiguration.model_validate(dict(config))
    except (ValueError, RuntimeError) as e:  # pydantic's ValidationError, mergekit's own validators
        raise CrossrouteError(f"{where}: not a valid mergekit configuration ({_one_line(e)}).") from None
    for at, block, level in _parameter_blocks(config):
        check_parameters(method, block, f"{where}: {at}", level)
    return cfg


def check_mergekit_inputs(cfg: Any, where: str) -> list[Path]:
    """The local checkpoint directories a MergeConfiguration reads; hub names, revisions, LoRA references and
    checkpoints mergekit would unpickle are refused (crossroute merges offline, from safetensors)."""
    from crossroute.model.load import check_checkpoint_dir

    paths = []
    for ref in sorted(cfg.referenced_models(), key=str):
        if ref.lora is not None:
            raise CrossrouteError(f"{where}: {ref} is a model with a LoRA adapter; crossroute merges full "
                                  "checkpoints: merge the adapter into its model first (peft's merge_and_unload, "
                                  "then save_pretrained) and pass that directory.")
        if ref.model.revision:
            raise CrossrouteError(f"{where}: {ref} names a hub revision; crossroute merges offline: pass a local "
                                  "checkpoint directory.")
        path = Path(ref.model.path)
        if not path.is_dir():
            raise CrossrouteError(f"{where}: model {str(path)!r} is not a local checkpoint directory (crossroute "
                                  "merges offline; relative paths are read from the current directory, as "
                                  "mergekit-yaml does); pass a checkpoint directory.")
        check_checkpoint_dir(path, need_tokenizer=False)
        if not any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
            raise CrossrouteError(f"{path}: mergekit reads model.safetensors or model.safetensors.index.json and "
                                  "this checkpoint has neither; re-save it with save_pretrained(dir, "
                                  "safe_serialization=True).")
        paths.append(path)
    return paths


@contextlib.contextmanager
def _callers_rng_kept() -> Iterator[None]:
    """Restore the CPU torch, numpy and Python RNG states after mergekit's seeding (transformers' set_seed)."""
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def _fresh_loaders(refs: Sequence[Any]) -> Iterator[None]:
    """Drop mergekit's process-wide cached loaders of `refs` before and after a merge: a checkpoint rewritten at
    the same path is read anew, and no file stays open."""
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    for ref in refs:
        cache.loaders.pop(ref, None)
    try:
        yield
    finally:
        for ref in refs:
            cache.loaders.pop(ref, None)


def run_mergekit(config: Mapping[str, Any], out: str | Path, where: str = "merge", source: str | None = None,
                 seed: int | None = MERGE_SEED, force: bool = False) -> Path:
    """Run mergekit's own merge of `config` into `out`, atomically, and return `out`.

    CPU, mergekit's lazy per-shard loading, its tokenizer copy from the base (copy_tokenizer, no surgery beyond
    the configuration's own); `seed` seeds its random methods as mergekit-yaml's --random-seed does (the
    caller's RNG states are restored). OUT/mergekit_config.yml keeps `source` (default: `config` as YAML).
    """
    from mergekit.merge import run_merge as mergekit_run_merge
    from mergekit.options import MergeOptions

    cfg = mergekit_configuration(config, where)
    inputs = check_mergekit_inputs(cfg, where)
    out = check_merge_out(out, inputs, force)
    options = MergeOptions(device="cpu", copy_tokenizer=True, write_model_card=False, quiet=True, random_seed=seed)
    with atomic_dir(out, force=force) as tmp, _fresh_loaders(cfg.referenced_models()), _callers_rng_kept():
        try:
            mergekit_run_merge(cfg, str(tmp), options=options)
        except (RuntimeError, ValueError, KeyError) as e:  # mergekit's refusals; OSError (a full disk) passes
            raise CrossrouteError(f"{where}: mergekit refused the merge: {_one_line(e)}.") from None
        check_written_finite(tmp, out)
        (tmp / "mergekit_config.yml").write_text(source if source is not None else
                                                 yaml.safe_dump(dict(config), sort_keys=False))
    return out


def _local_dir(path: str | Path) -> Path:
    from crossroute.model.load import resolve_model_path

    return resolve_model_path(path).resolve()


def merge_with_mergekit(method: str | Path, base: str | Path | None, models: Sequence[str | Path], out: str | Path,
                        params: Mapping[str, Any] | None = None,
                        model_params: Sequence[Mapping[str, Any] | None] | None = None,
                        base_params: Mapping[str, Any] | None = None, seed: int | None = MERGE_SEED,
                        force: bool = False) -> dict[str, Any]:
    """Merge with mergekit and return the merge statistics (what merge.json records).

    `method`: a mergekit method name, run on `base` and `models` with `params` (global), `model_params`
    (one mapping per model) and `base_params` (build_mergekit_config); or a mergekit YAML file path, which
    names its own models and parameters (base and models must then be empty).
    """
    if is_yaml_path(method):
        if base is not None or models or params or model_params or base_params:
            raise CrossrouteError(f"{method}: a mergekit YAML names its own models and parameters; pass no BASE, "
                                  "MODEL or --param with it.")
        config, source = load_mergekit_yaml(method)
        where, config_file = str(method), str(Path(method).expanduser())
    else:
        mergekit_method(str(method))
        if base is None:
            raise CrossrouteError(f"merge {method}: pass the base checkpoint and the models to merge into it.")
        b, ms = _local_dir(base), [_local_dir(m) for m in models]
        open_checkpoints(b, ms)
        config = build_mergekit_config(str(method), b, ms, params, model_params, base_params,
                                       out_dtype=base_dtype_name(b))
        source, where, config_file = None, f"merge {method}", None
    run_mergekit(config, out, where=where, source=source, seed=seed, force=force)
    from importlib.metadata import version

    base_used = config.get("base_model") if base is None else str(base)
    return {"method": config["merge_method"], "engine": "mergekit", "mergekit_version": version("mergekit"),
            "base": base_used, "models": [str(m) for m in models],
            "config_file": config_file, "config": dict(config), "seed": seed}


# ----------------------------------------------------------------------------- crossroute's own: core transplant

def transplant_merge(base: str | Path, donors: Sequence[str | Path], out: str | Path,
                     masks: Sequence[dict[str, torch.Tensor]] | None = None, top_percent: float = 1.0,
                     force: bool = False) -> dict[str, Any]:
    """Write `base` with each donor's core entries transplanted, streamed tensor by tensor; returns statistics.

    masks default to each donor's global top-`top_percent` % of |donor - base| (core_masks); where several
    donors' masks overlap, the donor with the larger |donor - base| wins (ties: the earlier donor).
    """
    if not donors:
        raise CrossrouteError(f"merge {TRANSPLANT}: pass at least one donor model to transplant into the base.")
    if masks is None:
        masks = [core_masks(base, d, top_percent)[0] for d in donors]
    elif len(masks) != len(donors):
        raise CrossrouteError(f"merge {TRANSPLANT}: {len(masks)} masks for {len(donors)} donors.")
    collisions = 0
    moved = 0

    def fn(name: str, a: torch.Tensor, rest: list[torch.Tensor]) -> torch.Tensor:
        nonlocal collisions, moved
        res, c, m = transplant_cores(a, rest, [mk.get(name) for mk in masks])
        collisions += c
        moved += m
        return res

    stream_merge(base, donors, out, fn, force=force)
    return {"method": TRANSPLANT, "engine": "crossroute", "base": str(base), "models": [str(d) for d in donors],
            "transplanted": moved, "collisions": collisions,
            "collision_rule": "larger |donor - base| wins; ties: earlier donor"}


# ----------------------------------------------------------------------------- entries

def interpolation_params(method: str, n_models: int, t: Any, params: Mapping[str, Any] | None,
                         model_params: Sequence[Mapping[str, Any] | None] | None,
                         base_params: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[dict[str, Any]],
                                                                         dict[str, Any], Any]:
    """crossroute's `t` for slerp / linear as mergekit parameters: slerp's t; linear's weights 1 - t (the base) and
    t (the one other model), normalize off. Returns (params, model_params, base_params, the t applied or None);
    t None means DEFAULT_T unless the parameters already set slerp's t / linear's weight."""
    glob, base_p = dict(params or {}), dict(base_params or {})
    per_model = [dict(p or {}) for p in model_params] if model_params is not None else [{} for _ in range(n_models)]
    name = {"slerp": "t", "linear": "weight"}.get(method)
    given = name is not None and any(name in p for p in (glob, base_p, *per_model))
    if t is not None and (name is None or given):
        raise CrossrouteError(f"merge {method}: --t applies to slerp and linear without their own t / weight "
                              f"parameters; pass {method}'s parameters with --param only.")
    if name is None or given:
        return glob, per_model, base_p, None
    setting = DEFAULT_T if t is None else t
    check_setting(setting, "--t", check_t_value)
    if method == "slerp":
        glob["t"] = setting
    else:
        if n_models != 1:
            raise CrossrouteError(f"merge linear: --t is the weight of one other model, got {n_models} models; pass "
                                  "each model's weight with --param I:weight=VALUE instead.")
        base_p["weight"], per_model[0]["weight"] = one_minus(setting), setting
        glob.setdefault("normalize", False)
    return glob, per_model, base_p, setting


def merge_checkpoints(method: str, base: str | Path, others: Sequence[str | Path], out: str | Path, t: Any = None,
                      masks: Sequence[dict[str, torch.Tensor]] | None = None, top_percent: float = 1.0,
                      params: Mapping[str, Any] | None = None,
                      model_params: Sequence[Mapping[str, Any] | None] | None = None,
                      base_params: Mapping[str, Any] | None = None, seed: int | None = MERGE_SEED,
                      force: bool = False) -> dict[str, Any]:
    """Merge `others` into `base` and write checkpoint `out`; returns merge statistics.

    transplant: crossroute's streamed core transplant (transplant_merge). Any mergekit method: mergekit's merge
    (merge_with_mergekit); slerp / linear also take crossroute's `t` (a number or a t schedule: the other
    model's weight, 0 keeps the base). `force`: replace an existing `out` crossroute did not write.
    """
    if method == TRANSPLANT:
        if t is not None or params or model_params or base_params:
            raise CrossrouteError(f"merge {TRANSPLANT}: takes --mask or --top-percent, not --t or --param.")
        return {**transplant_merge(base, others, out, masks=masks, top_percent=top_percent, force=force),
                "t_schedule": None}
    if masks is not None:
        raise CrossrouteError(f"--mask applies to {TRANSPLANT} only.")
    mergekit_method(method)
    if not others:
        raise CrossrouteError(f"merge {method}: pass at least one model to merge into the base.")
    glob, per_model, base_p, applied = interpolation_params(method, len(others), t, params, model_params, base_params)
    stats = merge_with_mergekit(method, base, others, out, glob, per_model, base_p, seed=seed, force=force)
    return {**stats, "t_schedule": applied}


def run_merge(method: str | Path | None, base: str | Path | None, models: Sequence[str | Path], out: str | Path, *,
              t_schedule_yaml: str | Path | None = None, t: float | None = None, mask: str | Path | None = None,
              top_percent: float = 1.0, params: Mapping[str, Any] | None = None,
              model_params: Mapping[int, Mapping[str, Any]] | None = None, config: str | Path | None = None,
              seed: int | None = MERGE_SEED, force: bool = False) -> Path:
    """CLI entry: `crossroute merge METHOD BASE MODEL... --out DIR`, or a mergekit YAML (as METHOD, or `config`).

    METHOD: transplant (a core mask file of one donor, or the donors' top-`top_percent` % cores) or a mergekit
    method with `params` ({NAME: setting}) and `model_params` ({input index: {NAME: setting}}; 0 the base, 1..
    the models); slerp / linear also take `t` or a t schedule file (transplant ignores them). Writes
    OUT/merge.json with the statistics next to the weights. An existing OUT is replaced only when crossroute
    wrote it (its .crossroute marker) or `force`; an input checkpoint as OUT is refused.
    """
    from crossroute.core.atomic import atomic_write_json
    from crossroute.model.load import check_checkpoint_dir

    if config is not None:
        if method is not None:
            raise CrossrouteError(f"--config {config}: pass either a METHOD or a mergekit YAML, not both.")
        method = config
    if method is None:
        raise CrossrouteError(f"merge: pass a METHOD ({TRANSPLANT} or a mergekit method) or a mergekit YAML file.")
    if is_yaml_path(method):
        if t is not None or t_schedule_yaml is not None or mask is not None or model_params:
            raise CrossrouteError(f"{method}: a mergekit YAML holds its own models and parameters; pass no --t, "
                                  "--t-schedule, --mask or --param with it.")
        stats = merge_with_mergekit(method, base, models, out, params, seed=seed, force=force)
        atomic_write_json(Path(out) / "merge.json", {**stats, "t_schedule": None})
        return Path(out)
    method = str(method)
    if method != TRANSPLANT:
        mergekit_method(method)
    if t_schedule_yaml is not None and t is not None:
        raise CrossrouteError("--t and --t-schedule both given; pass one of them.")
    setting: Any = load_t_schedule(t_schedule_yaml) if t_schedule_yaml is not None else t
    if setting is not None:
        check_setting(setting, "--t", check_t_value)
    if method == TRANSPLANT:
        setting = None  # --t / --t-schedule are slerp's and linear's; transplant ignores them, as it always did
    if base is None or not models:  # typer's wording: the CLI leaves BASE and MODELS optional for a YAML
        missing = "'BASE'" if base is None else "'MODELS...'"
        raise CrossrouteError(f"merge {method}: Missing argument {missing}: pass the base checkpoint and at least "
                              "one model to merge into it (or a mergekit YAML as METHOD).")
    base_p = check_checkpoint_dir(base)
    model_ps = [check_checkpoint_dir(m, need_tokenizer=False) for m in models]
    check_merge_out(out, [base_p, *model_ps], force)
    per_input = dict(model_params or {})
    bad = sorted(i for i in per_input if not 0 <= i <= len(model_ps))
    if bad:
        raise CrossrouteError(f"--param {bad[0]}:{next(iter(per_input[bad[0]]), 'NAME')}: there is no input {bad[0]}; "
                              f"0 is the base and 1..{len(model_ps)} the models, in the order given.")
    masks = None
    if mask is not None:
        if method != TRANSPLANT:
            raise CrossrouteError(f"--mask applies to {TRANSPLANT} only.")
        if len(model_ps) != 1:
            raise CrossrouteError("--mask gives one donor's core; pass exactly one donor model with it.")
        masks = [load_index_masks(mask)]
    per_model = [per_input.get(i, {}) for i in range(1, len(model_ps) + 1)] if per_input else None
    stats = merge_checkpoints(method, base_p, model_ps, out, t=setting, masks=masks, top_percent=top_percent,
                              params=params, model_params=per_model, base_params=per_input.get(0), seed=seed,
                              force=force)
    atomic_write_json(Path(out) / "merge.json", stats)
    return Path(out)
