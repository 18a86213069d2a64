"""Protection of earlier domains' conflict units during a later GRPO stage (crossroute.protect)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_tiny
from crossroute.core.errors import CrossrouteError
from crossroute.experiments.sequence import TrainConfig, parse_train_config
from crossroute.measure.proxy import gradient_and_loss
from crossroute.model.load import load_model, load_tokenizer
from crossroute.repair.protect import (
    Protector,
    anchor_grad,
    anchor_penalty,
    orthonormal_basis,
    project_out,
    protect_callback,
)
from crossroute.train.grpo import grpo_kwargs, make_grpo_config


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_project_out_explicit_vectors() -> None:
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    raw[:, 5] = raw[:, 0] + 2 * raw[:, 1]  # a dependent column is dropped
    u = orthonormal_basis(raw)
    assert u.shape == (50, 5)
    assert torch.allclose(u.T @ u, torch.eye(5, dtype=torch.float64), atol=1e-12)
    v = torch.randn(50, generator=gen, dtype=torch.float64)
    p = project_out(v, u)
    assert float((u.T @ p).abs().max()) < 1e-12
    assert torch.allclose(project_out(p, u), p, atol=1e-12)  # idempotent
    assert float(project_out(u @ torch.randn(5, generator=gen, dtype=torch.float64), u).norm()) < 1e-12
    # the removed part lies in the span: v = p + U Uᵀ v
    assert torch.allclose(p + u @ (u.T @ v), v, atol=1e-12)
    assert torch.equal(project_out(v, torch.zeros(50, 0, dtype=torch.float64)), v)


def test_anchor_gradient_matches_autograd() -> None:
    gen = torch.Generator().manual_seed(1)
    params = {"a": torch.randn(4, 3, generator=gen, requires_grad=True),
              "b": torch.randn(5, generator=gen, requires_grad=True),
              "c": torch.randn(2, generator=gen, requires_grad=True)}
    theta0 = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    weights = {"a": torch.zeros(4, 3), "b": torch.rand(5, generator=gen)}
    weights["a"][1] = 2.5
    weights["a"][:, 2] = 0.7
    pen = anchor_penalty(params, theta0, weights, 0.3)
    grads = torch.autograd.grad(pen, [params["a"], params["b"]])
    mine = anchor_grad(params, theta0, weights, 0.3)
    assert set(mine) == {"a", "b"}
    torch.testing.assert_close(mine["a"], grads[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mine["b"], grads[1], rtol=1e-6, atol=1e-7)


def _tiny_raw(model: Path) -> dict:
    return {"model": str(model), "domains": ["qa", "cw"], "eval_n": 4, "train_prompts": 24,
            "grpo": {"num_generations": 4, "per_device_train_batch_size": 8, "max_completion_length": 6,
                     "learning_rate": 1e-2, "logging_steps": 1, "temperature": 1.0,
                     "weight_decay": 0.1},  # AdamW decay must not move frozen slices either
            "stages": [{"domain": "qa", "steps": 2}, {"domain": "cw", "steps": 2}]}


def test_config_field(tiny_ckpt: Path) -> None:
    raw = _tiny_raw(tiny_ckpt)
    raw["stages"][1]["protect"] = {"mode": "project", "budget": 0.1, "domains": ["qa"], "rank": 2}
    cfg = parse_train_config(raw, "cfg.yaml")
    assert cfg.stages[1].protect is not None and cfg.stages[1].protect.rank == 2
    assert cfg.stages[0].protect is None
    for bad, needle in [({"mode": "melt", "domains": ["qa"]}, "protect.mode"),
                        ({"mode": "freeze", "domains": ["chess"]}, "chess"),
                        ({"mode": "freeze", "domains": ["qa"], "budget": 0}, "protect.budget"),
                        ({"mode": "freeze", "domains": ["cw"]}, "own domain")]:
        raw["stages"][1]["protect"] = bad
        with pytest.raises(CrossrouteError) as e:
            parse_train_config(raw, "cfg.yaml")
        assert needle in str(e.value), str(e.value)


def _length_reward(completions: list, **kwargs: object) -> list[float]:
    # the random tiny model scores 0 on every domain; completion length varies, so GRPO moves weights
    return [float(len(c)) for c in completions]


def _run(tmp: Path, mode: str, **extra: object) -> tuple[Protector, dict, dict]:
    from datasets import Dataset
    from trl import GRPOTrainer

    from crossroute.domains.files import get_domain

    ckpt = make_tiny(tmp / "ckpt", seed=3)
    raw = _tiny_raw(ckpt)
    raw["stages"][1]["protect"] = {"mode": mode, "budget": 0.2, "domains": ["qa"], "n": 8,
                                   "batch_size": 8, **extra}
    cfg = TrainConfig.model_validate(raw)
    st = cfg.stages[1]
    args = make_grpo_config(grpo_kwargs(cfg.grpo, st.grpo, st.steps, cfg.seed, str(tmp / "work")), "test")
    dom = get_domain("cw")
    model = load_model(ckpt).model
    model.train()
    tok = load_tokenizer(ckpt)
    cb = protect_callback(st.protect, model, tok, dom, args.learning_rate, st.steps, seed=0)
    rows = [e.row() for e in dom.examples("train", cfg.train_prompts, seed=0)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = GRPOTrainer(model=model, reward_funcs=_length_reward, args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[cb])
    trainer.train()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    return cb, before, after


def test_freeze_keeps_protected_slices_bit_identical(tmp_path: Path) -> None:
    cb, before, after = _run(tmp_path, "freeze")
    pr = cb.protected
    assert pr is not None and pr.units and pr.n_entries > 0
    assert all(not u.startswith("model.") for u in pr.units)  # units only, no "other" tensors
    moved_outside = 0.0
    for n, m in pr.masks.items():
        assert torch.equal(after[n][m], before[n][m]), n
        moved_outside += float((after[n][~m] - before[n][~m]).abs().sum())
    moved = sum(float((after[n] - before[n]).abs().sum()) for n in before)
    assert moved > 0 and moved_outside > 0  # the stage did train the rest
    s = cb.summary()
    assert s["mode"] == "freeze" and s["n_units"] == len(pr.units) and s["units"][0]["score"] > 0


def test_project_update_orthogonal_to_subspace(tmp_path: Path) -> None:
    cb, before, after = _run(tmp_path, "project", rank=3, refresh_every=0)
    assert cb.basis is not None and cb.basis.shape[1] >= 1
    u = cb.basis
    assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64), atol=1e-10)
    # total update of the protected entries over the stage: orthogonal to U (float32 weights)
    upd = cb.pack({n: after[n] - before[n] for n in cb.masks})
    assert float(upd.norm()) > 0  # protected entries do move (only along the complement)
    print("project", u.shape, float((u.T @ upd).abs().max()), float(upd.norm()))
    assert float((u.T @ upd).abs().max()) <= 1e-5 * float(upd.norm()) + 1e-7
    # a real gradient (the stage domain's proxy loss at the final weights), projected
    g, _ = gradient_and_loss(cb.model, cb.tokenizer, "cw", n=8, batch_size=8)
    gp = project_out(cb.pack(g), u)
    assert float(cb.pack(g).norm()) > 0
    assert float((u.T @ gp).abs().max()) < 1e-10 * max(1.0, float(cb.pack(g).norm()))


def test_anchor_runs_with_unit_weights(tmp_path: Path) -> None:
    cb, before, after = _run(tmp_path, "anchor", strength=1.0)
    pr = cb.protected
    assert pr is not None and pr.units
    w = torch.tensor(pr.scores) / (sum(pr.scores) / len(pr.scores))
    assert abs(float(w.mean()) - 1.0) < 1e-6
    for n, wt in pr.weights.items():
        assert float(wt[~pr.masks[n]].abs().max() if (~pr.masks[n]).any() else 0.0) == 0.0
        assert float(wt[pr.masks[n]].min()) > 0


def test_run_training_records_protection(tmp_path: Path, tiny_ckpt: Path) -> None:
    from crossroute.core.rundir import open_run
    from crossroute.experiments.sequence import run_training

    raw = _tiny_raw(tiny_ckpt)
    raw.update(eval_n=2, train_prompts=16)
    raw["stages"] = [{"domain": "qa", "steps": 1},
                     {"domain": "cw", "steps": 1,
                      "protect": {"mode": "freeze", "budget": 0.1, "domains": ["qa"], "n": 4, "batch_size": 4}}]
    cfg = parse_train_config(raw, "cfg.yaml")
    run_training(cfg, tmp_path / "run")
    run = open_run(tmp_path / "run", {**cfg.model_dump(), "model": str(tiny_ckpt)}, kind="train")
    res = run.read_result("train_02_cw")
    assert res["protect"]["mode"] == "freeze" and res["protect"]["stage_domain"] == "cw"
    assert "protect" not in run.read_result("train_01_qa")


def test_shipped_protected_config() -> None:
    from crossroute.experiments.sequence import load_train_config

    root = Path(__file__).parents[2] / "configs"
    cfg = load_train_config(root / "protected_sequence.yaml")
    base = load_train_config(root / "default_sequence.yaml")
    assert [s.domain for s in cfg.stages] == [s.domain for s in base.stages]
    math_at = [s.domain for s in cfg.stages].index("math")
    assert all(s.protect is None for s in cfg.stages[: math_at + 1]) and cfg.refresh is not None
    assert cfg.refresh.protect is None
    assert all(s.protect is not None and s.protect.mode == "freeze" and s.protect.domains == ["math"]
               and s.protect.budget == 0.05 for s in cfg.stages[math_at + 1:])
