"""diff --as-dtype: the same two checkpoints diffed as stored and as they would be stored in another dtype.

Every statistic under `storage` is held to a direct computation on `(b.to(dtype).float() - a.to(dtype).float())`
per tensor, and the cast of an fp32 pair to bf16 to the same pair actually stored in bf16."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from conftest import assert_close
from crossroute.analyze import diff as diff_mod
from crossroute.analyze.diff import THRESHOLDS, diff_checkpoints, diff_sequence
from crossroute.cli.main import run_app
from crossroute.core.errors import CrossrouteError
from crossroute.core.rundir import RunDir
from crossroute.report.sections.diff import render, render_diff_section

TINY = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=4, vocab_size=32, tie_word_embeddings=False)
NEURON = (1, 5)  # the planted most-changed neuron (layer, index)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200"}
Tensors = dict[str, torch.Tensor]


def _save(path: Path, tensors: Tensors, config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config, default=str))
    return path


def _planted(state: Tensors) -> Tensors:
    """Every entry moved by 2^-12 of itself (far below bf16's relative spacing 2^-8, so bf16 mostly rounds it
    away), every 7th by ±0.05 (far above it), and neuron L1.mlp.5's gate row by 0.2 (the top unit)."""
    gen = torch.Generator().manual_seed(1)
    out = {}
    for k, v in state.items():
        sign = torch.randn(v.shape, generator=gen).sign()
        big = (torch.arange(v.numel()).view(v.shape) % 7 == 0) * 0.05 * sign
        out[k] = v + v * 2.0**-12 + big
    out[f"model.layers.{NEURON[0]}.mlp.gate_proj.weight"][NEURON[1]] += 0.2
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """An fp32 pair (base, planted ckpt) and the same pair stored in bf16."""
    root = tmp_path_factory.mktemp("storage")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**TINY))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    ckpt = _planted(state)
    cfg = model.config.to_dict()
    out = {}
    for tag, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        out[tag] = (_save(root / tag / "base", {k: v.to(dtype) for k, v in state.items()}, cfg),
                    _save(root / tag / "ckpt", {k: v.to(dtype) for k, v in ckpt.items()}, cfg))
    return out


def _load(path: Path) -> Tensors:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _direct(base: Path, ckpt: Path, dtype: torch.dtype | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per tensor (θ_base, δ) in fp32, each checkpoint's whole tensor rounded to `dtype` first (None: as stored)."""
    a, b = _load(base), _load(ckpt)
    cast = (lambda t: t.to(dtype).float()) if dtype is not None else (lambda t: t.float())
    return {k: (cast(a[k]), cast(b[k]) - cast(a[k])) for k in a}


def _lower_median(x: torch.Tensor) -> float:
    flat = x.abs().flatten().sort().values
    return float(flat[(flat.numel() - 1) // 2])


@pytest.mark.parametrize("kernel", ["numba", "torch"])
@pytest.mark.parametrize("storage", ["bfloat16", "float16", None])
def test_counts_and_norms_equal_a_direct_computation_on_cast_tensors(pairs: dict, kernel: str,
                                                                     storage: str | None) -> None:
    base, ckpt = pairs["fp32"]
    dtype = getattr(torch, storage) if storage else None
    truth = _direct(base, ckpt, dtype)
    res = diff_checkpoints(base, ckpt, kernel=kernel, storage=storage)
    assert {t.name for t in res.tensors} == set(truth)
    taus = [torch.tensor(t, dtype=torch.float32) for t in THRESHOLDS]
    n_zero = 0
    for t in res.tensors:
        x, d = truth[t.name]
        d = d.abs()
        assert t.below == [int((d < tau).sum()) for tau in taus], t.name
        assert t.zero == int((d == 0).sum()), t.name
        assert t.max_abs == float(d.max()), t.name
        assert t.dtype == (storage or "float32"), t.name
        assert t.rel_change == pytest.approx(math.sqrt(float(d.double().square().sum() / x.double().square().sum())),
                                             rel=1e-6), t.name
        eps = torch.finfo(dtype or torch.float32).eps
        assert t.resolution == 0.5 * eps * _lower_median(x), t.name  # every entry is sampled (< 65 536)
        n_zero += t.zero
    n = res.numel
    if storage is None:
        assert n_zero == 0  # fp32 storage keeps every planted move
    else:
        assert n_zero > n // 2  # most 2^-12 moves round away in 16-bit storage
    js = res.to_json()
    assert (js["storage"], js["stored_dtype"], js["dtype"]) == (storage, "float32", storage or "float32")
    assert js["zero_fraction"] == n_zero / n
    assert js["histogram"]["zero"] == n_zero
    assert js["below_resolution_share"] == [sum(t.numel for t in res.tensors if tau < t.resolution) / n
                                            for tau in THRESHOLDS]
    num = sum(float(d.double().square().sum()) for _, d in truth.values())
    den = sum(float(x.double().square().sum()) for x, _ in truth.values())
    assert js["rel_change"] == pytest.approx(math.sqrt(num / den), rel=1e-6)
    # per-unit sums: neuron j of layer l is gate row j, up row j and down column j
    layer, idx = NEURON
    for ly in range(TINY["num_hidden_layers"]):
        p = f"model.layers.{ly}.mlp.{{}}.weight"
        g, u, dn = (truth[p.format(m)][1].double() for m in ("gate_proj", "up_proj", "down_proj"))
        want = (g.square().sum(1) + u.square().sum(1) + dn.square().sum(0)).sqrt()
        assert res.unit_scores["neuron"][ly] == pytest.approx(want.tolist(), rel=1e-6)
    assert res.top_units["neuron"] == [f"L{layer}.mlp.{idx}"]


def test_streamed_in_small_blocks_and_pieces_equals_one_block(pairs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cast is per block: blocks of 7 entries over 3 workers give the counts of whole-tensor blocks."""
    base, ckpt = pairs["fp32"]
    ref = diff_checkpoints(base, ckpt, storage="bfloat16").to_json()
    monkeypatch.setattr(diff_mod, "PIECE_ELEMS", 40)
    for kernel in ("numba", "torch"):
        js = diff_checkpoints(base, ckpt, chunk_elems=7, workers=3, kernel=kernel, storage="bfloat16").to_json()
        js["kernel"] = ref["kernel"]
        assert js["histogram"] == ref["histogram"] and js["below_fraction"] == ref["below_fraction"]
        assert_close(js, ref, rel=1e-5, abs_=1e-12)


@pytest.mark.parametrize(("tag", "storage"), [("bf16", "bfloat16"), ("fp32", "float32")])
@pytest.mark.parametrize("kernel", ["numba", "torch"])
def test_a_pair_stored_in_the_dtype_is_unchanged_by_the_cast(pairs: dict, tag: str, storage: str,
                                                             kernel: str) -> None:
    base, ckpt = pairs[tag]
    cast = diff_checkpoints(base, ckpt, kernel=kernel, storage=storage).to_json()
    plain = diff_checkpoints(base, ckpt, kernel=kernel).to_json()
    assert (cast.pop("storage"), plain.pop("storage")) == (storage, None)
    assert cast == plain
    assert plain["stored_dtype"] == plain["dtype"] == storage


@pytest.mark.parametrize("kernel", ["numba", "torch"])
def test_fp32_diffed_as_bf16_equals_the_pair_stored_in_bf16(pairs: dict, kernel: str) -> None:
    """Casting on the fly (block by block, in diff) and storing in bf16 (whole tensors, Tensor.to) agree exactly."""
    cast = diff_checkpoints(*pairs["fp32"], kernel=kernel, storage="bfloat16").to_json()
    stored = diff_checkpoints(*pairs["bf16"], kernel=kernel).to_json()
    assert (cast["storage"], cast["stored_dtype"], stored["storage"], stored["stored_dtype"]) == (
        "bfloat16", "float32", None, "bfloat16")
    for key in ("storage", "stored_dtype", "base", "ckpt"):
        cast.pop(key), stored.pop(key)
    assert cast == stored


def test_integer_tensors_stay_as_stored_and_overflow_is_refused(tmp_path: Path) -> None:
    w = torch.linspace(-1, 1, 12).view(3, 4)
    steps = torch.arange(5, dtype=torch.int64)
    a = _save(tmp_path / "a", {"model.norm.weight": w, "model.steps": steps})
    b = _save(tmp_path / "b", {"model.norm.weight": w + 1e-4, "model.steps": steps + 1})
    res = diff_checkpoints(a, b, storage="bfloat16")
    by = {t.name: t for t in res.tensors}
    assert by["model.steps"].dtype == "int64" and by["model.steps"].zero == 0
    wd = (w + 1e-4).to(torch.bfloat16).float() - w.to(torch.bfloat16).float()
    assert by["model.norm.weight"].dtype == "bfloat16" and by["model.norm.weight"].zero == int((wd == 0).sum())
    assert res.to_json()["stored_dtype"] == "float32"  # 12 fp32 entries against 5 int64
    big = _save(tmp_path / "big", {"model.norm.weight": w * 1e5, "model.steps": steps})
    with pytest.raises(CrossrouteError, match=r"'model\.norm\.weight' holds NaN or inf values as float16 "
                                              r"\(entries beyond ±65504 overflow it\)"):
        diff_checkpoints(a, big, storage="float16")
    assert diff_checkpoints(a, big, storage="bfloat16").numel == 17  # bf16 has fp32's range


@pytest.mark.parametrize("bad", ["int8", "bf16", "torch.bfloat16", ""])
def test_unknown_storage_names_are_refused(pairs: dict, bad: str) -> None:
    with pytest.raises(CrossrouteError, match="use one of bfloat16, float16, float32$"):
        diff_checkpoints(*pairs["fp32"], storage=bad)
    with pytest.raises(CrossrouteError, match="use one of bfloat16, float16, float32$"):
        diff_sequence(list(pairs["fp32"]), storage=bad)


def test_cli_as_dtype_writes_its_own_file_and_the_report_compares(pairs: dict, tmp_path: Path) -> None:
    base, ckpt = pairs["fp32"]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "crossroute", "diff", str(base), str(ckpt), "--out"]
    p = subprocess.run([*cmd, str(out), "--as-dtype", "bfloat16"], capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not (out / "results" / "diff.json").exists()
    cast = json.loads((out / "results" / "diff_bfloat16.json").read_text())
    assert (cast["storage"], cast["stored_dtype"]) == ("bfloat16", "float32")
    direct = diff_checkpoints(base, ckpt, storage="bfloat16").to_json()
    assert cast["stages"][0]["below_fraction"] == direct["below_fraction"]

    bad = subprocess.run([*cmd, str(tmp_path / "bad"), "--as-dtype", "int8"], capture_output=True, text=True,
                         env=ENV, timeout=300)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert lines == ["crossroute: error: unknown storage dtype 'int8' to diff as (--as-dtype); use one of "
                     "bfloat16, float16, float32"], bad.stderr
    assert not (tmp_path / "bad").exists()

    assert run_app(["diff", str(base), str(ckpt), "--out", str(out)]) == 0  # as stored, into the same run
    plain = json.loads((out / "results" / "diff.json").read_text())
    assert (plain["storage"], plain["stored_dtype"]) == (None, "float32")
    html = render(RunDir(out))
    assert html is not None and "Unchanged entries as stored and as bfloat16" in html
    start, end = html.index("<h3>Unchanged entries"), html.index("</table>", html.index("<h3>Unchanged entries"))
    assert html[:start] + html[end + len("</table>\n"):] == render_diff_section(plain)  # otherwise as before
    taus = plain["stages"][0]["thresholds"]
    (s,), (c,) = plain["stages"], cast["stages"]
    i = taus.index(1e-7)
    cells = [(s["below_fraction"][i], c["below_fraction"][i]), (s["zero_fraction"], c["zero_fraction"])]
    row = "".join(f"<td>{100 * x:.2f}%</td><td>{100 * y:.2f}%</td><td>{100 * (y - x):+.2f}%</td>" for x, y in cells)
    assert f"<tr><td>{ckpt.name}</td><td>float32</td>{row}</tr>" in html
    assert c["zero_fraction"] > 0.5 and s["zero_fraction"] == 0.0  # the difference is bf16's resolution
