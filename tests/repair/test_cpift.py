"""CPI-FT: grouping, fusion, frozen SFT (bit-identical frozen entries), config errors, a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny
from crossroute.core.errors import CrossrouteError
from crossroute.domains.files import get_domain
from crossroute.repair.cpift import freeze_mask_for, fuse, group_tasks, parse_cpift_config, run_cpift_config
from crossroute.repair.merge import core_masks
from crossroute.report.sections.cpift import render_cpift_section
from crossroute.train.sft import sft_train


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_group_tasks_connected_components() -> None:
    j = [[1.0, 0.3, 0.0, 0.0],
         [0.3, 1.0, 0.0, 0.12],
         [0.0, 0.0, 1.0, 0.05],
         [0.0, 0.12, 0.05, 1.0]]
    assert group_tasks(j, 0.1) == [[0, 1, 3], [2]]  # 0-1 and 1-3 linked: one component through 1
    assert group_tasks(j, 0.5) == [[0], [1], [2], [3]]
    assert group_tasks(j, 0.0) == [[0, 1, 2, 3]]


def test_config_errors_name_the_field() -> None:
    with pytest.raises(CrossrouteError, match="field omgea: unknown field"):
        parse_cpift_config({"omgea": 0.5})
    with pytest.raises(CrossrouteError, match="field tau"):
        parse_cpift_config({"tau": 2})
    with pytest.raises(CrossrouteError, match="field tasks"):
        parse_cpift_config({"tasks": ["math"]})
    with pytest.raises(CrossrouteError, match="sft.warmup_stepz"):
        parse_cpift_config({"sft": {"warmup_stepz": 1}})
    assert parse_cpift_config({}).core_percent == 1.0


def test_frozen_entries_bit_identical_after_sft(tmp_path: Path) -> None:
    base = make_tiny(tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    from crossroute.model.load import load_model

    params = dict(load_model(base).model.named_parameters())
    names = ["model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight", "model.norm.weight"]
    mask = {n: torch.rand(params[n].shape, generator=g) < 0.5 for n in names}
    out = tmp_path / "frozen"
    stats = sft_train(base, [get_domain("math")], steps=3, lr=1e-2, batch_size=8, out=out, seed=0,
                      freeze_mask=mask, train_prompts=32, sft={"weight_decay": 0.1})
    assert stats["frozen_entries"] == sum(int(m.sum()) for m in mask.values())
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for n in names:
        assert torch.equal(after[n][mask[n]], before[n][mask[n]])  # frozen: bit-identical
        assert not torch.equal(after[n][~mask[n]], before[n][~mask[n]])  # the rest moved


def test_fuse_transplants_cores_and_slerps_rest(tmp_path: Path) -> None:
    base, t1, t2 = (make_tiny(tmp_path / n, s) for n, s in (("b", 0), ("t1", 1), ("t2", 2)))
    c1, _ = core_masks(base, t1, 1.0)
    c2, _ = core_masks(base, t2, 1.0)
    stats = fuse(base, [t1, t2], [c1, c2], tmp_path / "fused", omega=0.0, fusion="raw_slerp")
    b, a1 = load_file(str(base / "model.safetensors")), load_file(str(t1 / "model.safetensors"))
    f = load_file(str(tmp_path / "fused" / "model.safetensors"))
    name = max(c1, key=lambda k: c1[k].numel() - (c2[k].numel() if k in c2 else 0))
    only1 = c1[name][~torch.isin(c1[name], c2.get(name, torch.empty(0, dtype=torch.int64)))]
    assert torch.equal(f[name].reshape(-1)[only1], a1[name].reshape(-1)[only1])
    keep = torch.ones(b[name].numel(), dtype=torch.bool)
    keep[c1[name]] = False
    if name in c2:
        keep[c2[name]] = False
    assert torch.equal(f[name].reshape(-1)[keep], b[name].reshape(-1)[keep])  # omega 0: non-core = base
    assert stats["transplanted"] > 0 and stats["collisions"] >= 0
    assert stats["fusion"] == "raw_slerp" and stats["angles_deg"]["n"] > 0
    fm = freeze_mask_for(base, [c1])
    assert sum(int(m.sum()) for m in fm.values()) == sum(int(v.numel()) for v in c1.values())


def _mergekit_slerp(t: float, v0: np.ndarray, v1: np.ndarray, dot_threshold: float = 0.9995,
                    eps: float = 1e-8) -> np.ndarray:
    """mergekit's slerp formula (merge_methods/slerp.py), written out again in numpy for comparison."""
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    dot = float(np.sum(u0 * u1))
    if abs(dot) > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta0 = np.arccos(dot)
    return np.sin(theta0 - theta0 * t) / np.sin(theta0) * v0 + np.sin(theta0 * t) / np.sin(theta0) * v1


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.9])
def test_slerp_matches_mergekits_formula(t: float) -> None:
    from crossroute.repair.merge import slerp

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=300).astype(np.float32), rng.normal(size=300).astype(np.float32)
    got = slerp(torch.from_numpy(a), torch.from_numpy(b), t).numpy()
    assert np.allclose(got, _mergekit_slerp(t, a.astype(np.float64), b.astype(np.float64)), atol=1e-5)
    near = a + 1e-3 * b  # colinear beyond the threshold: both fall back to linear interpolation
    assert np.allclose(slerp(torch.from_numpy(a), torch.from_numpy(near), t).numpy(),
                       _mergekit_slerp(t, a.astype(np.float64), near.astype(np.float64)), atol=1e-5)


def test_task_vector_fusion_slerps_the_updates_not_the_weights(tmp_path: Path) -> None:
    base, t1, t2 = (make_tiny(tmp_path / n, s) for n, s in (("b", 0), ("t1", 1), ("t2", 2)))
    empty = [{}, {}]  # no cores: every entry is fused
    stats = fuse(base, [t1, t2], empty, tmp_path / "fused", omega=0.5)
    b, a1, a2 = (load_file(str(p / "model.safetensors")) for p in (base, t1, t2))
    f = load_file(str(tmp_path / "fused" / "model.safetensors"))
    for name in b:
        tau1 = (a1[name] - b[name]).reshape(-1).double().numpy()
        tau2 = (a2[name] - b[name]).reshape(-1).double().numpy()
        want = b[name].reshape(-1).double().numpy() + _mergekit_slerp(0.5, tau1, tau2)
        assert np.allclose(f[name].reshape(-1).double().numpy(), want, atol=1e-5), name
    # independent random models: their updates are near-orthogonal, far from raw weights' colinearity
    assert stats["fusion"] == "task_vector_slerp" and 60 < stats["angles_deg"]["mean"] < 120
    zero = sum(1 for n in b if torch.equal(a1[n], b[n]) or torch.equal(a2[n], b[n]))  # norms: both at 1
    assert stats["slerp_pairs_linear_fallback"] == zero and stats["fuse_from"] == "base"
    fuse(base, [t1, t2], empty, tmp_path / "from_t1", omega=0.5, start=t1)  # start = t1: its update SLERPed in
    g = load_file(str(tmp_path / "from_t1" / "model.safetensors"))
    name = next(iter(b))
    tau_s = (a1[name] - b[name]).reshape(-1).double().numpy()
    fused_tau = (f[name] - b[name]).reshape(-1).double().numpy()
    want = b[name].reshape(-1).double().numpy() + _mergekit_slerp(0.5, tau_s, fused_tau)
    assert np.allclose(g[name].reshape(-1).double().numpy(), want, atol=1e-4)


def test_tiny_end_to_end_and_section(tmp_path: Path) -> None:
    base = make_tiny(tmp_path / "base")
    cfg = parse_cpift_config({"model": str(base), "tasks": ["math", "code"], "eval_n": 4, "train_prompts": 16,
                              "steps": 2, "pipeline_steps": 1, "batch_size": 8, "learning_rate": 1e-2,
                              "threads": 1})
    res = run_cpift_config(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results" / "cpift.json").read_text())
    assert saved["methods"] == ["base", "mixed_sft", "sequential_sft", "cpift"]
    assert set(saved["scores"]["cpift"]) == {"math", "code"}
    assert saved["steps"]["mixed_sft"] == saved["steps"]["sequential_sft"] == 4
    assert len(saved["core"]["jaccard"]) == 2 and saved["core"]["groups"]
    assert (tmp_path / "run" / "cores" / "math.safetensors").exists()
    for m in ("base", "mixed_sft", "sequential_sft"):  # paired CPI-FT - baseline = difference of the means
        for t in ("math", "code"):
            d = saved["cpift_vs"][m][t]
            want = saved["scores"]["cpift"][t] - saved["scores"][m][t]
            assert d["value"] == pytest.approx(want, abs=1e-3) and d["n"] == 4 and 0 < d["p"] <= 1
    html = render_cpift_section(res)
    assert "CPI-FT" in html and "mixed_sft" in html and "<table>" in html
