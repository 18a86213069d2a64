"""The numba diff kernel against the torch reference path (kernel="torch") and explicit float64 recomputations.

Counts, threshold counts, zeros, histogram, max|δ| and the resolution (median sample) must be identical; the
sums of squares are float64 sums of exact squares: equal to a float64 recomputation (1e-12 relative) and to the
torch path's fp32 accumulation within its rounding. Per-position sums: 1-D and torch-handled axes identical."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import (
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from conftest import assert_close
from crossroute.analyze import diff as diff_mod
from crossroute.analyze import diff_kernel
from crossroute.analyze.diff import THRESHOLDS, diff_checkpoints
from crossroute.core.errors import CrossrouteError
from crossroute.io.safetensors import load_checkpoint

TINY = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=4, vocab_size=32, tie_word_embeddings=False)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _state(family: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """fp32 weights and config of a tiny model: qwen3 (2-D axes 0 and 1), qwen2 (1-D q/k/v biases with head
    units), qwen3_moe with fused 3-D expert tensors (expert axis: per-position sums left to torch)."""
    torch.manual_seed(seed)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**TINY))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**TINY))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**TINY, moe_intermediate_size=8, num_experts=4,
                                                   num_experts_per_tok=2, mlp_only_layers=[0]))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return state, model.config.to_dict()


def _save(path: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config, default=str))
    return path


def _planted(state: dict[str, torch.Tensor], kind: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A sparse update (a few rows, columns, experts and tiny entries) or a dense one (every entry moves)."""
    gen = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in state.items()}
    if kind == "dense":
        return {k: v + torch.randn(v.shape, generator=gen) * 1e-3 for k, v in out.items()}
    for i, (_, t) in enumerate(sorted(out.items())):
        if i % 3:
            continue
        flat = t.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=gen)
        flat[idx] += torch.randn(idx.numel(), generator=gen) * 10.0 ** torch.randint(-9, -1, (idx.numel(),),
                                                                                       generator=gen)
        if t.dim() >= 2:
            t[min(1, t.shape[0] - 1)] += 0.01  # a whole row (axis 0) ...
            t[..., 0] += 0.02  # ... and a whole column / last-axis slice
    return out


def _pair(root: Path, family: str, kind: str, dtype: str) -> tuple[Path, Path]:
    state, cfg = _state(family)
    ckpt = _planted(state, kind)
    d = DTYPES[dtype]
    cfg["torch_dtype"] = str(d).removeprefix("torch.")
    return (_save(root / "a", {k: v.to(d) for k, v in state.items()}, cfg),
            _save(root / "b", {k: v.to(d) for k, v in ckpt.items()}, cfg))


def _stream(base: Path, ckpt: Path, kernel: str, chunk: int, thresholds: tuple[float, ...] = THRESHOLDS
            ) -> dict[str, tuple[diff_mod._TensorResult, diff_mod._Partial]]:
    """Every tensor through _Streamer.run_piece (all its pieces) and finish: (result, merged partial)."""
    a, b = load_checkpoint(base), load_checkpoint(ckpt)
    umap = diff_mod.unit_map(a)
    out = {}
    with diff_mod._Streamer(a, b, umap, thresholds, chunk, kernel) as s:
        for name in a.tensors:
            parts = [s.run_piece(name, r0, r1) for r0, r1 in s.pieces(name)]
            if parts:
                out[name] = (s.finish(name, parts), parts[0])
    return out


def _float64_sums(base: Path, ckpt: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(θ_base, δ) in float64 per tensor, δ rounded to fp32 first as both kernels do."""
    a, b = load_file(str(base / "model.safetensors")), load_file(str(ckpt / "model.safetensors"))
    return {k: (a[k].double(), (b[k].float() - a[k].float()).double()) for k in a}


def _assert_same(numba: dict, ref: dict, truth: dict, umap_modes: dict[str, int]) -> None:
    assert numba.keys() == ref.keys()
    for name, (rn, pn) in numba.items():
        rt, pt = ref[name]
        sn, st_ = rn.stats, rt.stats
        assert (sn.below, sn.zero, sn.numel, sn.max_abs, sn.resolution) == (
            st_.below, st_.zero, st_.numel, st_.max_abs, st_.resolution), name
        assert rn.hist == rt.hist, name
        x, d = truth[name]
        assert sn.base_sq == pytest.approx(float(x.square().sum()), rel=1e-12, abs=1e-300), name
        assert sn.delta_sq == pytest.approx(float(d.square().sum()), rel=1e-12, abs=1e-300), name
        assert st_.delta_sq == pytest.approx(sn.delta_sq, rel=1e-4, abs=1e-30), name  # torch: fp32 accumulation
        assert st_.base_sq == pytest.approx(sn.base_sq, rel=1e-4), name
        assert (pn.pos_sq is None) == (pt.pos_sq is None), name
        if pn.pos_sq is None:
            continue
        mode = umap_modes[name]
        if mode in (diff_kernel.POS_DELTA, -1):  # torch's own sums of the same δ (1-D: exact squares): identical
            assert torch.equal(pn.pos_sq, pt.pos_sq), name
        else:
            axis = 0 if mode == diff_kernel.POS_ROW else 1
            dims = [i for i in range(d.dim()) if i != axis]
            want = d.square().sum(dim=dims)
            assert torch.allclose(pn.pos_sq, want, rtol=1e-12, atol=0), name
            assert torch.allclose(pt.pos_sq, pn.pos_sq, rtol=1e-5, atol=1e-30), name
        assert rn.unit_sq.keys() == rt.unit_sq.keys(), name
        for kind in rn.unit_sq:
            assert torch.allclose(rn.unit_sq[kind], rt.unit_sq[kind], rtol=1e-5, atol=1e-30), (name, kind)


def _modes(base: Path) -> dict[str, int]:
    """diff's POS_* mode per tensor (-1: a 1-D tensor, the kernel's exact per-entry squares)."""
    a = load_checkpoint(base)
    umap = diff_mod.unit_map(a)
    out = {}
    for name, info in a.tensors.items():
        plan = diff_mod._pos_plan(umap, name)
        mode = diff_mod._pos_mode(plan, info.shape)[0]
        out[name] = -1 if mode == diff_kernel.POS_ROW and len(info.shape) == 1 else mode
    return out


@pytest.mark.parametrize(("family", "kind", "dtype"), [
    ("qwen3", "sparse", "fp32"), ("qwen3", "dense", "fp32"), ("qwen3", "sparse", "bf16"), ("qwen3", "dense", "bf16"),
    ("qwen3", "dense", "fp16"), ("qwen2", "sparse", "bf16"), ("qwen2", "dense", "fp32"),
    ("qwen3_moe", "sparse", "fp32"), ("qwen3_moe", "dense", "bf16"),
])
def test_numba_equals_torch_on_planted_updates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              family: str, kind: str, dtype: str) -> None:
    base, ckpt = _pair(tmp_path, family, kind, dtype)
    modes = _modes(base)
    want = {diff_kernel.POS_NONE, diff_kernel.POS_ROW, diff_kernel.POS_COL}
    want |= {-1} if family == "qwen2" else set()
    want |= {diff_kernel.POS_DELTA} if family == "qwen3_moe" else set()
    assert want <= set(modes.values())  # every per-position case of this family is exercised
    truth = _float64_sums(base, ckpt)
    monkeypatch.setattr(diff_mod, "PIECE_ELEMS", 100)  # several pieces per tensor, several blocks per piece
    for chunk in (37, 1 << 20):
        _assert_same(_stream(base, ckpt, "numba", chunk), _stream(base, ckpt, "torch", chunk), truth, modes)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_diff_json_numba_equals_torch(tmp_path: Path, dtype: str) -> None:
    """Whole diffs (2 workers): every count identical, floats within the torch path's fp32 rounding."""
    base, ckpt = _pair(tmp_path, "qwen3", "sparse", dtype)
    a = diff_checkpoints(base, ckpt, workers=2).to_json()
    b = diff_checkpoints(base, ckpt, workers=2, kernel="torch").to_json()
    assert (a.pop("kernel"), b.pop("kernel")) == ("numba", "torch")
    _assert_close(a, b)
    assert a["histogram"] == b["histogram"]
    assert [t["below_fraction"] for t in a["tensors"]] == [t["below_fraction"] for t in b["tensors"]]


def _assert_close(a: object, b: object) -> None:
    assert_close(a, b, rel=1e-4, abs_=1e-15)


# ----------------------------------------------------------------------------- property test on random blocks

_SPECIAL = np.array([0.0, 1e-45, 1e-40, 1.2e-38, 1e-30, 1e-12, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-3, 0.5, 3e4],
                    dtype=np.float32)


def _block(seed: int, n: int, zero_share: float, storage: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Base and ckpt of n entries: normal and subnormal bases, deltas of every magnitude, exact thresholds
    (base 0 and ckpt = τ), values one ulp either side of them, and zeros."""
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 1, n)).astype(np.float32)
    base[rng.random(n) < 0.05] = 1e-40  # subnormal weights
    delta = (rng.standard_normal(n) * 10.0 ** rng.uniform(-14, 0, n)).astype(np.float32)
    pick = rng.random(n) < 0.3
    special = _SPECIAL[rng.integers(0, _SPECIAL.size, n)]
    ulp = rng.integers(-1, 2, n).astype(np.int32)  # exactly at a special value, or one ulp either side
    special = np.where(special > 0, (special.view(np.int32) + ulp).view(np.float32), special)
    delta = np.where(pick, special, delta)
    base = np.where(pick & (rng.random(n) < 0.5), np.float32(0), base)  # base 0: ckpt - base is exactly δ
    ckpt = (base + delta).astype(np.float32)
    same = rng.random(n) < zero_share
    ckpt = np.where(same, base, ckpt)
    tb, tc = torch.from_numpy(base), torch.from_numpy(ckpt)
    return tb.to(DTYPES[storage[0]]), tc.to(DTYPES[storage[1]])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 3000), zero_share=st.floats(0.0, 1.0),
       storage=st.sampled_from([("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32"),
                                ("fp32", "fp16")]),
       cols=st.sampled_from([1, 3, 64]), chunk=st.sampled_from([5, 64, 1 << 20]), n_data_thr=st.integers(0, 3))
def test_kernel_matches_torch_on_random_blocks(seed: int, n: int, zero_share: float, storage: tuple[str, str],
                                               cols: int, chunk: int, n_data_thr: int) -> None:
    base, ckpt = _block(seed, n - n % cols or cols, zero_share, storage)
    shape = (base.numel() // cols, cols) if cols > 1 else (base.numel(),)
    absd = (ckpt.float() - base.float()).abs()
    # thresholds: the defaults, a subnormal one (key 0, the zeros' bucket), an exact bucket start, and |δ| values
    # of this block itself (entries exactly at τ)
    data_thr = [float(v) for v in absd[torch.randperm(absd.numel(), generator=torch.Generator().manual_seed(seed % 997)
                                                      )[:n_data_thr]] if v > 0]
    thresholds = (*THRESHOLDS, 1e-44, 2.0**-20, *data_thr)
    with tempfile.TemporaryDirectory() as tmp:
        a = _save(Path(tmp) / "a", {"w": base.view(shape)})
        b = _save(Path(tmp) / "b", {"w": ckpt.view(shape)})
        got = _stream(a, b, "numba", chunk, thresholds)
        ref = _stream(a, b, "torch", chunk, thresholds)
    (rn, _), (rt, _) = got["w"], ref["w"]
    assert rn.stats.below == rt.stats.below == [int((absd < np.float32(t)).sum()) for t in thresholds]
    assert rn.hist == rt.hist
    assert (rn.stats.zero, rn.stats.max_abs, rn.stats.resolution) == (rt.stats.zero, rt.stats.max_abs,
                                                                      rt.stats.resolution)
    assert rn.stats.max_abs == float(absd.max())
    assert rn.stats.delta_sq == pytest.approx(float(absd.double().square().sum()), rel=1e-12, abs=1e-300)
    assert rn.stats.base_sq == pytest.approx(float(base.double().square().sum()), rel=1e-12, abs=1e-300)
    assert math.isclose(rt.stats.delta_sq, rn.stats.delta_sq, rel_tol=1e-4, abs_tol=1e-30)


# ----------------------------------------------------------------------------- edge cases


def _single(tmp_path: Path, base: torch.Tensor, ckpt: torch.Tensor, name: str = "model.norm.weight") -> tuple:
    return _save(tmp_path / "a", {name: base}), _save(tmp_path / "b", {name: ckpt})


@pytest.mark.parametrize("where", ["base_nan", "ckpt_nan", "ckpt_inf", "base_overflow", "overflow"])
def test_non_finite_refused_alike(tmp_path: Path, where: str) -> None:
    base = torch.linspace(-1, 1, 300)
    ckpt = base.clone()
    if where == "base_nan":
        base[17] = float("nan")
    elif where == "ckpt_nan":
        ckpt[250] = float("nan")
    elif where == "ckpt_inf":
        ckpt[3] = float("inf")
    elif where == "base_overflow":  # θ² = 9e38 is past the fp32 range: refused as the base's fault
        base[5] = ckpt[5] = -3e19
    else:  # |δ| = 3e19 is a finite fp32, δ² is not: the torch path's fp32 sums overflow, so numba's do too
        base[5], ckpt[5] = 1.5e19, -1.5e19
    a, b = _single(tmp_path, base, ckpt)
    which = "holds NaN or inf values" + ("; diff" if where.startswith("base") else r" \(or its update overflows")
    for kernel in ("numba", "torch"):
        with pytest.raises(CrossrouteError, match=which):
            diff_checkpoints(a, b, kernel=kernel, chunk_elems=64)


def test_zeros_exactly_at_a_thresholds_bucket(tmp_path: Path) -> None:
    """τ in key bucket 0 (the zeros' bucket: subnormal τ) and τ exactly at a bucket start: zeros, subnormal δ
    just below and above τ, and δ = τ exactly are counted as a direct comparison counts them."""
    tiny = torch.tensor(1e-44, dtype=torch.float32)
    start = torch.tensor(2.0**-20, dtype=torch.float32)
    below_t, above_t = torch.nextafter(tiny, torch.tensor(0.0)), torch.nextafter(tiny, torch.tensor(1.0))
    deltas = torch.stack([torch.tensor(0.0), torch.tensor(-0.0), tiny, below_t, above_t, -below_t,
                          start, torch.nextafter(start, torch.tensor(0.0)), torch.nextafter(start, torch.tensor(1.0))])
    d = deltas.repeat(40)
    base = torch.zeros_like(d)
    a, b = _single(tmp_path, base, base + d)
    thresholds = (float(tiny), float(start))
    want = [int((d.abs() < t).sum()) for t in thresholds]
    res = {k: diff_checkpoints(a, b, thresholds=thresholds, kernel=k, chunk_elems=7) for k in ("numba", "torch")}
    assert res["numba"].tensors[0].below == res["torch"].tensors[0].below == want
    assert res["numba"].histogram == res["torch"].histogram
    assert res["numba"].histogram.zero == int((d.abs() < 2.0**-133).sum())


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_median_sample_is_every_strided_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    """Above 65 536 entries the resolution's median runs over |θ_base| at flat indices divisible by the stride,
    across pieces and blocks that do not start on a multiple of it."""
    base = torch.randn(7 * 28_100, generator=torch.Generator().manual_seed(3)).to(DTYPES[dtype])
    a, b = _single(tmp_path, base.view(-1, 7), (base.float() + 1e-3).to(DTYPES[dtype]).view(-1, 7))
    monkeypatch.setattr(diff_mod, "PIECE_ELEMS", 50_001)
    stride = base.numel() // 65_536
    eps = torch.finfo(DTYPES[dtype]).eps
    want = 0.5 * eps * float(base.float()[::stride].abs().median())
    for kernel in ("numba", "torch"):
        assert diff_checkpoints(a, b, kernel=kernel, chunk_elems=999).tensors[0].resolution == want, kernel


@given(st.lists(st.sampled_from([0.0, 1e-40, 0.5, 0.5, 1.0, 2.0, 3.0e30]), min_size=1, max_size=40), st.integers(0, 99))
def test_lower_median_is_torch_median(values: list[float], seed: int) -> None:
    """The resolution's median by partial sort equals torch.median (the lower middle entry), ties and even sizes
    included."""
    order = torch.randperm(len(values), generator=torch.Generator().manual_seed(seed))
    x = torch.tensor(values, dtype=torch.float32)[order]
    assert diff_mod._lower_median(x) == float(x.median())


def test_other_dtypes_take_the_torch_path(tmp_path: Path) -> None:
    """fp64 storage is not the kernel's: those tensors run the torch path, with the same results."""
    base = torch.randn(500, dtype=torch.float64)
    a, b = _single(tmp_path, base, base + 1e-3)
    x = diff_checkpoints(a, b).to_json()
    y = diff_checkpoints(a, b, kernel="torch").to_json()
    assert x.pop("kernel") == "numba" and y.pop("kernel") == "torch"
    assert x == y


def test_numba_missing_falls_back_to_torch_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, ckpt = _pair(tmp_path, "qwen3", "sparse", "bf16")
    msg = "numba is not importable (test); diff uses the slower torch kernel: pip install numba"
    monkeypatch.setattr(diff_kernel, "NUMBA_ERROR", msg)
    with pytest.warns(RuntimeWarning, match="numba is not importable"):
        res = diff_checkpoints(base, ckpt)
    assert res.kernel == "torch" and res.kernel_warning == msg
    js = res.to_json()
    assert js["kernel"] == "torch" and js["kernel_warning"] == msg
    ref = diff_checkpoints(base, ckpt, kernel="torch").to_json()
    assert js.pop("kernel_warning") == msg and ref.pop("kernel_warning") is None
    assert js == ref


def test_unknown_kernel_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CrossrouteError, match="unknown diff kernel 'cuda'; use one of numba, torch"):
        diff_checkpoints(tmp_path, tmp_path, kernel="cuda")


@pytest.mark.parametrize("tau", [-1e-5, 0.0, math.nan, math.inf])
def test_bad_thresholds_are_refused(tmp_path: Path, tau: float) -> None:
    a, b = _single(tmp_path, torch.zeros(8), torch.ones(8))
    with pytest.raises(CrossrouteError, match="diff thresholds must be positive finite numbers"):
        diff_checkpoints(a, b, thresholds=(1e-6, tau))


def test_uncachable_kernel_compiles_without_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where numba finds no writable cache directory (cache=True raises), the kernel is compiled uncached."""
    numba = pytest.importorskip("numba")
    real = numba.njit
    calls = []

    def njit(**kw: object) -> object:
        calls.append(kw["cache"])
        if kw["cache"]:
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x.py'")
        return real(**kw)

    monkeypatch.setattr(numba, "njit", njit)
    monkeypatch.setattr(diff_kernel, "CACHE_NOTES", [])

    def f(x: int) -> int:
        return x + 1

    g = diff_kernel._jit()(f)
    assert g(41) == 42 and calls == [True, False]
    assert diff_kernel.CACHE_NOTES == ["f: cannot cache function 'f': no locator available for file 'x.py'"]
