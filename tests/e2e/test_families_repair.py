"""damage, rollback and protect on a tiny random checkpoint of every architecture family (tests/zoo.py):
each works with unit counts that match the config, or refuses with one line (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crossroute.analyze.damage import damage
from crossroute.domains.files import get_domain
from crossroute.model.load import load_model
from crossroute.model.units import UnitMap
from crossroute.repair.protect import select_protected
from crossroute.repair.rollback import Swapper, all_units
from zoo import FAMILIES, zoo_checkpoint


def _perturbed(src: Path, dst: Path, scale: float = 1e-2, seed: int = 1) -> Path:
    """A copy of `src` with small Gaussian noise on every parameter (a planted later update)."""
    loaded = load_model(src, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    from crossroute.model.load import save_model

    save_model(loaded.model, loaded.tokenizer, dst)
    return dst


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    out = {}
    for fam in FAMILIES:
        a = zoo_checkpoint(fam, tmp_path_factory)
        out[fam] = (a, _perturbed(a, tmp_path_factory.mktemp(f"later_{fam}") / "ckpt"))
    return out


def _expected(cfg: dict) -> dict[str, int]:
    """Units per model, computed from config.json by hand (not through the unit table)."""
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    kv = cfg.get("num_key_value_heads") or heads
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    if experts:
        dense = set(cfg.get("mlp_only_layers") or [])
        step = cfg.get("decoder_sparse_step", 1)
        sparse = [ly for ly in range(layers) if ly not in dense and (ly + 1) % step == 0]
        neurons = len(sparse) * experts * cfg["moe_intermediate_size"] + (layers - len(sparse)) * cfg[
            "intermediate_size"]
        return {"neuron": neurons, "head": layers * heads, "kv": layers * kv, "router": len(sparse) * experts}
    inter = cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * cfg["n_embd"]
    return {"neuron": layers * inter, "head": layers * heads, "kv": layers * kv, "router": 0}


@pytest.mark.parametrize("family", FAMILIES)
def test_damage_attribution_sums_and_counts(family: str, pairs: dict[str, tuple[Path, Path]]) -> None:
    a, b = pairs[family]
    res = damage(a, b, "math", n=4, batch_size=4, later="qa", k=3, routes_n=4)
    cfg = json.loads((a / "config.json").read_text())
    want = _expected(cfg)
    got = {k: sum(len(r) for r in res.units.get(k, [])) for k in want}
    assert got == want
    assert res.attribution_sum() == pytest.approx(res.first_order + res.second_order, rel=1e-8, abs=1e-12)
    assert res.meta["units"]["arch"] is not None and res.meta["units"]["warning"] is None


@pytest.mark.parametrize("family", FAMILIES)
def test_rollback_of_every_unit_restores_theta_a_exactly(family: str, pairs: dict[str, tuple[Path, Path]]) -> None:
    a, b = pairs[family]
    la, lb = load_model(a, device="cpu"), load_model(b, device="cpu")
    umap = UnitMap.of_model(lb.model)
    now = {n: p.detach().clone() for n, p in lb.model.named_parameters()}
    swapper = Swapper(lb.model, dict(la.model.named_parameters()), umap)
    units = all_units(umap)
    assert len(units) == umap.n_units()
    with swapper.rolled_back(units):
        for n, p in lb.model.named_parameters():
            assert torch.equal(p, dict(la.model.named_parameters())[n]), n
    for n, p in lb.model.named_parameters():
        assert torch.equal(p, now[n]), n


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt_neox", "gpt2", "qwen3_moe"])
def test_protect_selects_units_of_the_family(family: str, pairs: dict[str, tuple[Path, Path]]) -> None:
    a, _ = pairs[family]
    loaded = load_model(a, device="cpu", double_backward=True)
    prot, _, _ = select_protected(loaded.model, loaded.tokenizer, [get_domain("qa")], get_domain("math"),
                                  budget=0.2, delta_norm=0.1, n=4, batch_size=4, q=60.0)
    umap = UnitMap.of_model(loaded.model)
    assert prot.units and all(u in set(all_units(umap)) for u in prot.units)
    for name, m in prot.masks.items():
        assert m.shape == umap.shapes[name] and bool(m.any())


def test_damage_refuses_an_unknown_architecture(tmp_path: Path, pairs: dict[str, tuple[Path, Path]]) -> None:
    """A model the unit table does not know: one line, exit 2, naming the architecture and the fix."""
    import shutil

    a, b = pairs["llama"]
    for src, name in ((a, "a"), (b, "b")):
        shutil.copytree(src, tmp_path / name)
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        cfg["model_type"] = "mistral"  # transformers still loads it; then unregister below
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    code = ("import sys; from crossroute.model import units; units.ARCHITECTURES.pop('mistral'); "
            "from crossroute.cli.main import main; sys.argv = ['crossroute', 'damage', '--before', sys.argv[1], "
            "'--after', sys.argv[2], '--domain', 'math', '--later', 'qa', '--out', sys.argv[3]]; main()")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin"})
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert "Traceback" not in r.stderr and len(errors) == 1, r.stderr
    assert "mistral" in errors[0] and "register_architecture" in errors[0], r.stderr
    assert all("warning:" in ln or "error:" in ln for ln in lines), r.stderr  # one line each, no source context
