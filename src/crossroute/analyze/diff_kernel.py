"""Numba kernel of the streaming diff (DESIGN.md §2.2): one call per block of raw bf16/fp16/fp32 bytes of both
checkpoints computes what the torch path of `diff._Streamer.run_piece` computes, without the GIL, so worker threads
run in parallel.

Per tile of TILE entries (in L1): pass 1 decodes both blocks (bf16 by a shift, fp16 on its bits), forms
δ = fp32(ckpt) − fp32(base) and sums θ² and δ² (vectorized; row by row where δ² is summed along axis 0, so those
per-position sums come free); pass 2 scatters the keys of |δ| (top 16 bits of its fp32 pattern) into two
interleaved count copies, in a sparse tile only the nonzero keys (found through 64-bit masks); τ's own key bucket,
when hit, is recounted by a direct comparison; then the other per-position δ² sums and the median sample.

What "identical" means here (tested against kernel="torch" and against float64 recomputations):
- δ is rounded to fp32 exactly as on the torch path, so key counts (histogram), threshold counts (|δ| < fp32(τ),
  compared bit pattern to bit pattern), zeros, max|δ| and the median sample (resolution) are the same to the last
  count and bit; so are the 1-D per-position sums (exact squares) and the sums the torch path keeps (POS_DELTA).
- base_sq, delta_sq and the per-position sums along axis 0 / axis 1 of 2-D are float64 sums of exact squares (an
  fp32 square is exact in float64): equal to a float64 recomputation to 1e-12 relative, and more accurate than
  the torch path's fp32 accumulation, from which they differ by its rounding (2.2e-5 relative measured on 1 M-entry
  blocks). A block whose float64 sum exceeds the fp32 range counts as inf, as the torch path's fp32 sums do, so a
  tensor whose update overflows fp32 is refused alike.

numba is imported with this module (about 0.3 s) and the kernel compiled on its first call: one signature serves
every storage dtype; it is cached on disk (`cache=True`: the package's __pycache__, else numba's user cache dir);
where neither is writable (a read-only install and home) it compiles uncached and CACHE_NOTES says why.
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from crossroute.core.errors import CrossrouteError

KERNELS: tuple[str, ...] = ("numba", "torch")
DEFAULT_KERNEL = "numba"
STORAGE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ITEMSIZE: tuple[int, ...] = (4, 2, 2)  # bytes per entry of each storage code
POS_NONE, POS_ROW, POS_COL, POS_DELTA = 0, 1, 2, 3  # per-position sums: none, along axis 0, axis 1 of 2-D, by torch
KEY_SHIFT = 16  # key = top 16 bits of |δ| as fp32 (as diff._Binner)
N_KEYS = 1 << (31 - KEY_SHIFT)
TILE = 2048  # entries per inner tile: the decoded tiles of a worker stay in L1
FLT_MAX = float(np.finfo(np.float32).max)

try:
    import numba
    from numba.cpython.unsafe.numbers import trailing_zeros

    NUMBA_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - numba is a dependency; this keeps diff usable without it
    numba = trailing_zeros = None
    NUMBA_ERROR = f"numba is not importable ({exc}); diff uses the slower torch kernel: pip install numba"

CACHE_NOTES: list[str] = []  # functions compiled without a disk cache (no writable cache directory)


def _jit(fastmath: bool | set[str] = False, inline: str = "never") -> Callable[[Callable[..., Any]], Any]:
    """njit(nogil, cache) where numba imports, else the plain function (never called: the torch path runs)."""

    def wrap(fn: Callable[..., Any]) -> Any:
        if numba is None:
            return fn
        try:
            return numba.njit(nogil=True, cache=True, fastmath=fastmath, inline=inline)(fn)
        except RuntimeError as exc:  # "cannot cache function ...: no locator available"
            CACHE_NOTES.append(f"{fn.__name__}: {exc}")
            return numba.njit(nogil=True, cache=False, fastmath=fastmath, inline=inline)(fn)

    return wrap


def resolve_kernel(kernel: str) -> tuple[str, str | None]:
    """The kernel that will run for `kernel` ("numba" or "torch") and the warning when numba falls back."""
    if kernel not in KERNELS:
        raise CrossrouteError(f"unknown diff kernel {kernel!r}; use one of {', '.join(KERNELS)}")
    if kernel == "numba" and NUMBA_ERROR is not None:
        warnings.warn(NUMBA_ERROR, RuntimeWarning, stacklevel=2)
        return "torch", NUMBA_ERROR
    return kernel, None


def f32_bits(x: float) -> int:
    """The IEEE bit pattern of fp32(x)."""
    return struct.unpack("<I", struct.pack("<f", x))[0]


# ----------------------------------------------------------------------------- jitted pieces


@_jit()
def _decode_half(s: np.ndarray, t: int, out_bits: np.ndarray) -> None:
    """fp16 bit patterns to fp32 bit patterns without branches (normal; subnormal through an exact int-to-float
    product; inf/NaN), so the loop vectorizes and no denormals-are-zero mode can change it."""
    for i in range(t):
        h = np.int32(s[i])
        em = np.int32(h & np.int32(0x7FFF))
        normal = np.int32((em << np.int32(13)) + np.int32(112 << 23))
        special = np.int32(np.int32(0x7F800000) | ((em & np.int32(0x3FF)) << np.int32(13)))
        sub = np.float32(np.float32(em) * np.float32(2.0**-24)).view(np.int32)
        r = normal if em >= np.int32(0x400) else sub
        r = special if em >= np.int32(0x7C00) else r
        out_bits[i] = np.int32(r | np.int32((h & np.int32(0x8000)) << np.int32(16)))


@_jit()
def _decode(raw: np.ndarray, code: int, t0: int, t: int, out: np.ndarray, out_bits: np.ndarray) -> None:
    """Entries [t0, t0 + t) of a raw block (uint8 bytes of `code`'s storage) as fp32 into `out` (`out_bits`: the
    same memory as int32). One compiled signature serves every storage dtype."""
    if code == 0:
        s32 = raw.view(np.float32)[t0:t0 + t]
        for i in range(t):
            out[i] = s32[i]
    elif code == 1:
        s16 = raw.view(np.uint16)[t0:t0 + t]
        for i in range(t):
            out_bits[i] = np.int32(np.int32(s16[i]) << np.int32(16))
    else:
        _decode_half(raw.view(np.uint16)[t0:t0 + t], t, out_bits)


@_jit(inline="always")
def _delta_step(xi: float, yi: float, bs: float, ds: float, mx: int, nz: int) -> tuple[int, float, float, int, int]:
    """One entry: (bits of |fp32(y − x)|, Σ x², Σ δ² in float64 of exact squares, max bits, entries of key > 0).

    For |δ| the bit order is the value order; callers reassociate only these float64 sums (vectorized; a fused
    multiply-add of an exact square changes nothing)."""
    d = np.float32(yi - xi)
    xf = np.float64(xi)
    df = np.float64(d)
    ui = np.int32(d.view(np.int32) & np.int32(0x7FFFFFFF))
    mx = ui if ui > mx else mx
    return ui, bs + xf * xf, ds + df * df, mx, np.int32(nz + (ui >= np.int32(1 << KEY_SHIFT)))


@_jit(fastmath={"reassoc", "contract"})
def _delta_tile(x: np.ndarray, y: np.ndarray, u: np.ndarray, t: int) -> tuple[float, float, int, int]:
    """_delta_step over decoded tiles x (base) and y (ckpt): u = bits of |δ|; (Σ x², Σ δ², max u, key > 0)."""
    bs = 0.0
    ds = 0.0
    mx = np.int32(0)
    nz = np.int32(0)
    for i in range(t):
        ui, bs, ds, mx, nz = _delta_step(x[i], y[i], bs, ds, mx, nz)
        u[i] = ui
    return bs, ds, mx, nz


@_jit(fastmath={"reassoc", "contract"})
def _delta_tile_bf16(a: np.ndarray, b: np.ndarray, t0: int, t: int, x: np.ndarray,
                     u: np.ndarray) -> tuple[float, float, int, int]:
    """_delta_tile for two bf16 blocks, decoding as it goes (the common case: no tile of y; x kept for samples)."""
    sa = a.view(np.uint16)[t0:t0 + t]
    sb = b.view(np.uint16)[t0:t0 + t]
    bs = 0.0
    ds = 0.0
    mx = np.int32(0)
    nz = np.int32(0)
    for i in range(t):
        xi = np.int32(np.int32(sa[i]) << np.int32(16)).view(np.float32)
        x[i] = xi
        ui, bs, ds, mx, nz = _delta_step(xi, np.int32(np.int32(sb[i]) << np.int32(16)).view(np.float32),
                                         bs, ds, mx, nz)
        u[i] = ui
    return bs, ds, mx, nz


@_jit()
def _scatter_keys(u: np.ndarray, t: int, nz: int, counts: np.ndarray, masks: np.ndarray) -> None:
    """counts[2 key + (i & 1)] += 1 per entry (two interleaved copies: no store chain on one hot key).

    A sparse tile scatters only its entries of key > 0: byte flags (vectorized) packed eight at a time into
    64-bit masks by one multiply each, whose set bits are walked; the other entries are key 0."""
    if nz * 3 > t:
        for i in range(t):
            idx = np.uint64(((u[i] >> KEY_SHIFT) << 1) | (i & 1))  # unsigned: no negative-index fix-up
            counts[idx] += 1
        return
    counts[0] += t - nz
    if nz == 0:
        return
    nw = (t + 63) >> 6
    words = masks[nw:nw + (nw << 3)]  # 8 flags per word after the nw masks
    flags = words.view(np.uint8)
    for i in range(t):
        flags[i] = np.uint8(u[i] >= np.int32(1 << KEY_SHIFT))
    for i in range(t, nw << 6):
        flags[i] = 0
    for w in range(nw):
        m = np.uint64(0)
        for k in range(8):  # byte j of a word holds 0 or 1: the multiply gathers the 8 flags into its top byte
            m |= ((words[(w << 3) + k] * np.uint64(0x0102040810204080)) >> np.uint64(56)) << np.uint64(k << 3)
        masks[w] = m
    for w in range(nw):
        m = masks[w]
        uw = u[w << 6:]
        while m:
            j = np.uint64(trailing_zeros(m))
            idx = np.uint64(((uw[j] >> KEY_SHIFT) << 1) | (j & np.uint64(1)))
            counts[idx] += 1
            m &= m - np.uint64(1)


@_jit()
def _count_range(u: np.ndarray, t: int, lo: int, hi: int) -> int:
    """Entries with lo <= u < hi (bit patterns of |δ|: a value range)."""
    c = np.int32(0)
    for i in range(t):
        ui = u[i]
        c = np.int32(c + ((ui >= lo) & (ui < hi)))
    return c


@_jit()
def _pos_entries(uf: np.ndarray, t: int, g: int, pos_sq: np.ndarray) -> None:
    """pos_sq[g + i] += δ² (float64, exact) for a 1-D tensor's tile entries: every entry its own position.

    Slices, not offset indices, inside the loops: numba then omits its negative-index fix-up and vectorizes."""
    p = pos_sq[g:g + t]
    for i in range(t):
        df = np.float64(uf[i])
        p[i] += df * df


@_jit()
def _pos_cols(uf: np.ndarray, t: int, g: int, row: int, pos_sq: np.ndarray) -> None:
    """pos_sq[flat % row] += δ² (float64) for tile entries at flat indices g, g + 1, ... (axis 1 of 2-D)."""
    i = 0
    while i < t:
        c0 = (g + i) % row
        end = min(t, i + row - c0)
        p = pos_sq[c0:c0 + end - i]
        seg = uf[i:end]
        for j in range(seg.size):
            df = np.float64(seg[j])
            p[j] += df * df
        i = end


@_jit()
def _diff_block(a: np.ndarray, a_code: int, b: np.ndarray, b_code: int, n: int, g0: int, row: int,
                pos_mode: int, pos_sq: np.ndarray, delta_out: np.ndarray, thr_key: np.ndarray,
                thr_lo: np.ndarray, thr_bits: np.ndarray, fixes: np.ndarray, counts: np.ndarray, stride: int,
                samples: np.ndarray, n_samples: int) -> tuple[float, float, int, int]:
    """Statistics of one block of n entries at flat index g0: (Σ base², Σ δ², max |δ| bits, samples taken).

    Adds to counts (keys, two interleaved copies), fixes (entries of τ's key bucket below τ, as diff._Binner),
    pos_sq (by pos_mode; POS_DELTA writes |δ| to delta_out) and appends |base| at flat indices divisible by
    `stride` to samples."""
    x = np.empty(TILE, np.float32)
    y = np.empty(TILE, np.float32)
    u = np.empty(TILE, np.int32)
    masks = np.empty(9 * (TILE // 64 + 1), np.uint64)  # 64-bit masks, then byte flags
    xb = x.view(np.int32)
    yb = y.view(np.int32)
    uf = u.view(np.float32)
    n_thr = thr_key.size
    before = np.empty(n_thr, np.int64)
    bs = 0.0
    ds = 0.0
    mx = 0
    nxt = (-g0) % stride  # next sampled entry, relative to the block
    bf16 = a_code == 1 and b_code == 1
    rows = pos_mode == POS_ROW and row > 1
    for t0 in range(0, n, TILE):
        t = min(TILE, n - t0)
        if not bf16:
            _decode(a, a_code, t0, t, x, xb)
            _decode(b, b_code, t0, t, y, yb)
        nz = 0
        s0 = 0
        while s0 < t:  # one segment per row where δ² is summed along axis 0 (its Σ δ² is the row's), else the tile
            r = (g0 + t0 + s0) // row
            s1 = min(t, (r + 1) * row - g0 - t0) if rows else t
            if bf16:
                sb, sd, sm, snz = _delta_tile_bf16(a, b, t0 + s0, s1 - s0, x[s0:], u[s0:])
            else:
                sb, sd, sm, snz = _delta_tile(x[s0:], y[s0:], u[s0:], s1 - s0)
            if rows:
                pos_sq[r] += sd
            bs += sb
            ds += sd
            mx = max(mx, sm)
            nz += snz
            s0 = s1
        for j in range(n_thr):
            before[j] = counts[2 * thr_key[j]] + counts[2 * thr_key[j] + 1]
        _scatter_keys(u, t, nz, counts, masks)
        for j in range(n_thr):  # τ's own key bucket was hit: count its entries below τ directly
            if counts[2 * thr_key[j]] + counts[2 * thr_key[j] + 1] != before[j] and thr_lo[j] != thr_bits[j]:
                fixes[j] += _count_range(u, t, thr_lo[j], thr_bits[j])
        if pos_mode == POS_ROW and not rows:
            _pos_entries(uf, t, g0 + t0, pos_sq)
        elif pos_mode == POS_COL:
            _pos_cols(uf, t, g0 + t0, row, pos_sq)
        elif pos_mode == POS_DELTA:
            delta_out[t0:t0 + t] = uf[:t]
        while nxt < t0 + t:
            samples[n_samples] = abs(x[nxt - t0])
            n_samples += 1
            nxt += stride
    return bs, ds, mx, n_samples


# ----------------------------------------------------------------------------- Python side


def bits_to_f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def storage_view(raw: memoryview, dtype: torch.dtype, n: int) -> np.ndarray:
    """The raw bytes of n entries of a storage dtype (STORAGE_CODES), as the kernel takes them: uint8."""
    return np.frombuffer(raw, dtype=np.uint8, count=n * dtype.itemsize)


class PieceStats:
    """One piece's statistics, accumulated block by block by the numba kernel.

    Thresholds are the fp32 values diff._Binner compares against; results are handed over in its layout
    (key counts, per-threshold fixes)."""

    def __init__(self, thresholds: list[float], piece_numel: int, stride: int, pos_sq: torch.Tensor | None) -> None:
        bits = [f32_bits(t) for t in thresholds]
        self.thr_bits = np.array(bits, dtype=np.int32)
        self.thr_key = np.array([b >> KEY_SHIFT for b in bits], dtype=np.int64)
        self.thr_lo = np.array([(b >> KEY_SHIFT) << KEY_SHIFT for b in bits], dtype=np.int32)
        self.fixes_acc = np.zeros(len(bits), dtype=np.int64)
        # two interleaved copies of the key counts; int32 suffices below 2**31 entries per piece
        self.counts2 = np.zeros(2 * N_KEYS, dtype=np.int32 if piece_numel < 2**31 else np.int64)
        self.pos_sq = pos_sq
        self._pos = pos_sq.numpy() if pos_sq is not None else np.zeros(0)
        self.stride = stride
        self.samples = np.empty(piece_numel // stride + 2, dtype=np.float32)
        self.n_samples = 0
        self.base_sq = 0.0
        self.delta_sq = 0.0
        self.max_bits = 0

    def block(self, a: np.ndarray, a_code: int, b: np.ndarray, b_code: int, g0: int, row: int, pos_mode: int,
              delta_out: np.ndarray | None = None) -> None:
        """Add one block: raw bytes (uint8, storage_view) of the entries at flat indices [g0, g0 + n) of both."""
        n = a.size // ITEMSIZE[a_code]
        if n == 0:
            return
        if b.size != n * ITEMSIZE[b_code] or self.n_samples + n // self.stride + 1 > self.samples.size or (
                pos_mode == POS_DELTA and (delta_out is None or delta_out.size < n)):
            raise ValueError("diff kernel: block sizes do not match the piece's buffers")
        out = delta_out if delta_out is not None else np.zeros(0, dtype=np.float32)
        bs, ds, mx, self.n_samples = _diff_block(
            a, a_code, b, b_code, n, g0, row, pos_mode, self._pos, out, self.thr_key, self.thr_lo, self.thr_bits,
            self.fixes_acc, self.counts2, self.stride, self.samples, self.n_samples)
        # as the torch path, whose per-block fp32 sums overflow to inf: the tensor is then refused as non-finite
        self.base_sq += bs if bs <= FLT_MAX else math.inf
        self.delta_sq += ds if ds <= FLT_MAX or math.isnan(ds) else math.inf
        self.max_bits = max(self.max_bits, int(mx))

    @property
    def max_abs(self) -> float:
        return bits_to_f32(self.max_bits)

    def key_counts(self) -> torch.Tensor:
        """Entries per key (int64 [N_KEYS]), the two interleaved copies summed."""
        return torch.from_numpy(np.add(self.counts2[0::2], self.counts2[1::2], dtype=np.int64))

    def fixes(self) -> list[int]:
        return [int(f) for f in self.fixes_acc]

    def sample_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.samples[:self.n_samples].copy())
