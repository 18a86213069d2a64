"""Rollback: exact in-place swaps, 100 % rollback = θ_A, selector budgets, the sweep's JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny
from crossroute.model.load import load_model
from crossroute.model.units import UnitMap
from crossroute.repair.rollback import SELECTORS, Swapper, all_units, budget, rankings, run_rollback
from crossroute.report.sections.rollback import render_rollback_section


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("rb")
    return make_tiny(root / "a", seed=0), make_tiny(root / "now", seed=1)


def test_full_rollback_is_theta_a_and_swap_restores(pair: tuple[Path, Path]) -> None:
    la, ln = load_model(pair[0]), load_model(pair[1])
    before, target = _state(ln.model), _state(la.model)
    assert not _identical(before, target)
    swapper = Swapper(ln.model, dict(la.model.named_parameters()))
    with swapper.rolled_back([]):
        assert _identical(_state(ln.model), before)  # 0 % rolled back: CKPT_NOW unchanged
    with swapper.rolled_back(all_units(swapper.umap)):
        assert _identical(_state(ln.model), target)  # bit-identical θ_A (tied head included)
    assert _identical(_state(ln.model), before)
    units = ["L0.mlp.3", "L1.mlp.0", "L1.head.1", "L0.kv.0", "model.norm.weight"]
    with swapper.rolled_back(units):
        now = _state(ln.model)
        up = "model.layers.1.mlp.up_proj.weight"
        assert torch.equal(now[up][0], target[up][0]) and torch.equal(now[up][1], before[up][1])
        down = "model.layers.0.mlp.down_proj.weight"
        assert torch.equal(now[down][:, 3], target[down][:, 3])
        assert torch.equal(now[down][:, 2], before[down][:, 2])
        o = "model.layers.1.self_attn.o_proj.weight"
        assert torch.equal(now[o][:, 8:16], target[o][:, 8:16])  # head 1, head_dim 8
        assert torch.equal(now[o][:, :8], before[o][:, :8])
    assert _identical(_state(ln.model), before)


def test_selectors_return_the_budget() -> None:
    from conftest import TINY
    from crossroute.model.default import build_default_model

    model, _ = build_default_model(0, **TINY)
    umap = UnitMap.of_model(model)
    gen = torch.Generator().manual_seed(0)
    attr = {k: list(torch.randn(umap.num_layers, max(umap.counts[k]), generator=gen, dtype=torch.float64))
            for k in umap.partition_kinds}
    mag = {k: [x.abs() for x in v] for k, v in attr.items()}
    shared = {"L0.mlp.1", "L0.mlp.2", "L1.mlp.5", "L1.head.0"}
    for kinds in (("neuron",), ("neuron", "head", "kv")):
        ranks = rankings(umap, attr, mag, shared, kinds, seed=0)
        pool = sum(umap.n_units(k) for k in kinds)
        for sel in SELECTORS:
            order, sh = ranks[sel]
            assert len(order) == pool == len(set(order))
            for frac in (0.5, 2.0, 32.0, 100.0):
                assert len(order[: budget(pool, frac)]) == budget(pool, frac)
        order, sh = ranks["conflict"]
        pos = [u for u in shared if _attr(attr, u) > 0 and (len(kinds) > 1 or ".mlp." in u)]
        assert set(order[: len(pos)]) == set(pos) and all(sh[: len(pos)])
    assert budget(64, 0.5) == 1 and budget(64, 32) == 21 and budget(64, 100) == 64


def _attr(attr: dict[str, list[torch.Tensor]], u: str) -> float:
    layer, tag, j = u.split(".")
    kind = {"mlp": "neuron", "head": "head", "kv": "kv"}[tag]
    return float(attr[kind][int(layer[1:])][int(j)])


def test_sweep_writes_json_and_saves_best(pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, now = pair
    res = run_rollback(now, a, "math", "qa", fractions=(10, 100), run_dir=tmp_path / "run",
                       save_best=tmp_path / "best", eval_n=4, n=4, batch_size=4, routes_n=4)
    out = json.loads((tmp_path / "run" / "results" / "rollback_math.json").read_text())
    assert len(out["points"]) == 2 * 3 * 2
    pools = out["pool_sizes"]
    for p in out["points"]:
        assert p["n_units"] == budget(pools[p["variant"]], p["fraction"])
        assert set(p["collateral"]) == {"qa"}
        # the paired change vs theta_now is the difference of the two means, with a CI around it and a p-value
        for d in ("math", "qa"):
            c = p["change"][d]
            assert c["value"] == pytest.approx(p["scores"][d] - out["score_now"][d], abs=1e-3)
            assert c["lo"] - 1e-9 <= c["value"] <= c["hi"] + 1e-9 and 0 < c["p"] <= 1 and c["n"] == 4
    assert out["best"]["saved_to"] == str(tmp_path / "best")
    assert load_model(tmp_path / "best").model is not None
    assert res.score_peak == out["score_peak"]
    html = render_rollback_section(out)
    assert "<img" in html and "recovery" in html


def test_the_whole_joint_pool_is_theta_a_bitwise_and_scores_as_theta_a(pair: tuple[Path, Path]) -> None:
    # 100 % of the joint pool includes the tensors outside units (norms, embeddings): the model is theta_A exactly,
    # so every domain scores exactly theta_A's score on the same prompts.
    from crossroute.measure.evaluate import evaluate_domain
    from crossroute.repair.rollback import VARIANT_KINDS, rollback_sweep

    a, now = pair
    la, ln = load_model(a), load_model(now)
    umap = UnitMap.of_model(ln.model)
    ids = [u for k in VARIANT_KINDS["joint"] for u in umap.ids(k)]
    assert sorted(ids) == sorted(all_units(umap)) and "model.norm.weight" in ids
    swapper = Swapper(ln.model, dict(la.model.named_parameters()))
    with swapper.rolled_back(ids):
        assert _identical(_state(ln.model), _state(la.model))
    res = rollback_sweep(now, a, "math", "qa", fractions=(100,), selectors=("random",), eval_n=8, n=4,
                         batch_size=4, routes_n=4)
    joint = next(p for p in res.points if p.variant == "joint")
    for d in ("math", "qa"):
        from crossroute.domains.files import get_domain

        assert joint.scores[d] == evaluate_domain(la.model, la.tokenizer, get_domain(d), n=8).score
    assert "nothing" in res.pool_excludes["joint"] and "embeddings" in res.pool_excludes["mlp"]
