"""Safetensors reading without pickle or mmap: validated JSON headers, byte ranges, pread into reusable buffers."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crossroute.core.errors import CrossrouteError

CHUNK_ELEMS = 1 << 20  # fp32 entries per streamed block (4 MiB)


ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


@dataclass
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: list[int]
    start: int  # absolute byte offset of the data in `file`
    nbytes: int


@dataclass
class Checkpoint:
    root: Path
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] | None


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start, JSON header) of a safetensors file: 8-byte little-endian length, then JSON."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (OSError, struct.error, ValueError, MemoryError) as exc:
        raise CrossrouteError(f"cannot read safetensors header of {path}: {exc}; "
                              "re-save the checkpoint with save_pretrained") from exc
    if not isinstance(header, dict):
        raise CrossrouteError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object "
                              "of tensor entries); re-download or re-save the checkpoint")
    header.pop("__metadata__", None)
    return 8 + n, header


def tensor_infos(path: Path) -> dict[str, TensorInfo]:
    """Validated tensor locations of one safetensors file (dtype, shape, byte range)."""
    base, header = read_header(path)
    size = path.stat().st_size
    out = {}
    for name, meta in header.items():
        try:
            dtype = ST_DTYPES[meta["dtype"]]
            shape = [int(x) for x in meta["shape"]]
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CrossrouteError(f"tensor '{name}' in {path} has an unsupported or malformed "
                                  f"header entry ({exc}); re-save the checkpoint") from exc
        if any(d < 0 for d in shape):
            raise CrossrouteError(f"tensor '{name}' in {path} has a negative dimension in its shape {shape} "
                                  "(corrupt header); re-download or re-save the checkpoint")
        if end - begin != math.prod(shape) * dtype.itemsize or base + end > size or begin < 0:
            raise CrossrouteError(f"tensor '{name}' in {path} has inconsistent data offsets "
                                  "(truncated or corrupt file); re-download or re-save it")
        out[name] = TensorInfo(path, dtype, shape, base + begin, end - begin)
    check_contiguous(path, out, base, size)
    return out


def check_contiguous(path: Path, tensors: dict[str, TensorInfo], base: int, size: int) -> None:
    """Tensors must tile the data section back to back, as the safetensors format requires: an overlap or a hole
    means a corrupt header (transformers' loader would fail with a traceback later)."""
    pos = base
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].nbytes)):
        if info.start != pos:
            what = "overlaps the previous tensor" if info.start < pos else f"leaves a gap of {info.start - pos} bytes"
            raise CrossrouteError(f"tensor '{name}' in {path} {what} (data offsets; corrupt safetensors header); "
                                  "re-download or re-save the checkpoint")
        pos += info.nbytes
    if pos != size:
        raise CrossrouteError(f"{path}: {size - pos} bytes after the last tensor's data (corrupt or mis-sized "
                              "safetensors file); re-download or re-save the checkpoint")


def check_readable(path: Path) -> Path:
    """`path` itself, refusing a symlink loop or a dangling symlink with one line (open() would raise ELOOP)."""
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise CrossrouteError(f"{path}: a symlink loop or a dangling symlink; replace it with the real file "
                                  "(or a link to it)") from None
    return path


def weight_files(root: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (index shards, model.safetensors or *.safetensors)."""
    check_readable(root)
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
            weight_map = json.loads(check_readable(index).read_text())["weight_map"]
            shard_names = [str(f) for f in dict.fromkeys(weight_map.values())]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CrossrouteError(f"cannot read {index}: {exc}; re-save the checkpoint with "
                                  "save_pretrained") from exc
        files = [check_readable(root / f) for f in shard_names]
        for f in files:
            if not f.exists():
                raise CrossrouteError(f"{index} lists shard {f.name}, which is missing; copy the "
                                      "missing shard or re-save the checkpoint")
        return files
    if check_readable(root / "model.safetensors").exists():
        return [root / "model.safetensors"]
    files = [check_readable(f) for f in sorted(root.glob("*.safetensors"))]
    if files:
        return files
    if any(root.glob("pytorch_model*.bin")) or any(root.glob("*.pt")) or any(root.glob("*.pth")):
        raise CrossrouteError(
            f"{root} holds only pickle weights (pytorch_model.bin), which crossroute never loads; "
            "convert them once, for a source you trust, with transformers: AutoModelForCausalLM"
            ".from_pretrained(dir).save_pretrained(out, safe_serialization=True)")
    raise CrossrouteError(f"no model.safetensors or model.safetensors.index.json in {root}; pass a "
                          "checkpoint directory written by save_pretrained")


def load_checkpoint(path: str | Path) -> Checkpoint:
    root = Path(path)
    files = weight_files(root)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        tensors.update(tensor_infos(f))
    cfg_path = (root if root.is_dir() else root.parent) / "config.json"
    config = None
    if cfg_path.exists():
        try:
            config = json.loads(check_readable(cfg_path).read_text())
        except (OSError, ValueError) as exc:
            raise CrossrouteError(f"cannot parse {cfg_path}: {exc}; fix or re-save it") from exc
        if not isinstance(config, dict):
            raise CrossrouteError(f"{cfg_path}: a JSON {type(config).__name__}, not an object of config fields; "
                                  "use the config.json saved with the model")
    return Checkpoint(root, tensors, config)


def check_same_architecture(a: Checkpoint, b: Checkpoint) -> None:
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


def row_blocks(shape: list[int], chunk: int) -> Iterator[tuple[int, int]]:
    """Row ranges (first-axis slices) of about `chunk` entries; 1-D tensors are cut flat."""
    if not shape:
        yield 0, 1
        return
    row = math.prod(shape[1:])
    step = max(1, chunk // max(row, 1))
    for r0 in range(0, shape[0], step):
        yield r0, min(shape[0], r0 + step)


def max_block(shape: list[int], chunk: int) -> int:
    row = math.prod(shape[1:]) if shape else 1
    rows = shape[0] if shape else 1
    return row * min(rows, max(1, chunk // max(row, 1)))


def pread_into(fd: int, buf: bytearray, nbytes: int, offset: int) -> memoryview:
    view = memoryview(buf)[:nbytes]
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise CrossrouteError(f"unexpected end of file at byte {offset + done}; the "
                                  "checkpoint is truncated, re-download or re-save it")
        done += got
    return view


def prefetch(fd: int, info: TensorInfo) -> None:
    """Ask the kernel to start reading a tensor's bytes (overlaps disk reads with compute)."""
    with contextlib.suppress(AttributeError, OSError):
        os.posix_fadvise(fd, info.start, info.nbytes, os.POSIX_FADV_WILLNEED)


@contextlib.contextmanager
def open_shards(*tensor_maps: dict[str, TensorInfo]) -> Iterator[dict[Path, int]]:
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


def natural_key(name: str) -> list[Any]:
    """Sort key that orders layers.2 before layers.10."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


ST_CODES = {v: k for k, v in ST_DTYPES.items()}


class TensorReader:
    """Reads whole tensors of one checkpoint by byte offset (no mmap, no pickle)."""

    def __init__(self, ck: Checkpoint) -> None:
        self.ck = ck
        self.fds: dict[Path, int] = {}

    def __enter__(self) -> TensorReader:
        self._shards = open_shards(self.ck.tensors)
        self.fds = self._shards.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._shards.__exit__(None, None, None)
        self.fds = {}

    def read(self, name: str) -> torch.Tensor:
        info = self.ck.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        buf = bytearray(info.nbytes)
        pread_into(self.fds[info.file], buf, info.nbytes, info.start)
        return torch.frombuffer(buf, dtype=info.dtype).view(info.shape)


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor: the header first (from known specs), then the data."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, list[int]]]) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in specs:
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.specs = specs
        self.next = 0
        self.fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.fh.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, dtype, shape = self.specs[self.next]
        if name != want or tensor.dtype != dtype or list(tensor.shape) != list(shape):
            raise CrossrouteError(f"internal: wrote {name} {tensor.dtype} {list(tensor.shape)}, expected "
                                  f"{want} {dtype} {shape}.")
        if tensor.numel():
            self.fh.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.next += 1

    def close(self) -> None:
        """Flush and fsync the file (a full disk raises its OSError here), then check every tensor was written."""
        try:
            self.fh.flush()
            os.fsync(self.fh.fileno())
        finally:
            self.abort()
        if self.next != len(self.specs):
            raise CrossrouteError(f"internal: {len(self.specs) - self.next} tensors were never written.")

    def abort(self) -> None:
        """Close the file after a failed write without masking that error (the caller removes the file)."""
        with contextlib.suppress(OSError):
            self.fh.close()
