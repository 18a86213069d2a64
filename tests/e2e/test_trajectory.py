"""`crossroute diff DIR` on a folder of intermediate checkpoints (checkpoint-N/, global_step_N/): one interval per
saved step in step order, each interval's anatomy equal to the update planted in it, and a sparsity curve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny
from crossroute.cli.main import run_app

TENSOR = "model.layers.0.mlp.down_proj.weight"


def _step(prev: Path, out: Path, changed: int) -> Path:
    """A copy of `prev` with the first `changed` entries of one tensor moved by 0.5."""
    shutil.copytree(prev, out)
    w = load_file(str(out / "model.safetensors"))
    flat = w[TENSOR].flatten().clone()
    flat[:changed] += 0.5
    w[TENSOR] = flat.view_as(w[TENSOR]).contiguous()
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def traj(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[int, int]]:
    root = tmp_path_factory.mktemp("traj")
    base = make_tiny(root / "base")
    folder = root / "trainer_out"
    folder.mkdir()
    planted = {5: 3, 10: 7, 20: 1}  # step -> entries changed since the previous saved step
    prev = base
    for step, k in planted.items():
        prev = _step(prev, folder / f"checkpoint-{step}", k)
    (folder / "runs").mkdir()  # other folders (tensorboard logs) are ignored
    return base, folder, planted


def test_a_trajectory_diffs_each_interval_in_step_order(traj: tuple[Path, Path, dict[int, int]],
                                                        tmp_path: Path) -> None:
    base, folder, planted = traj
    out = tmp_path / "d"
    assert run_app(["diff", str(folder), "--base", str(base), "--out", str(out)]) == 0
    res = json.loads((out / "results" / "diff.json").read_text())
    assert res["stage_names"] == ["step_5", "step_10", "step_20"] and res["steps"] == [None, 5, 10, 20]
    total = sum(t["numel"] for t in res["stages"][0]["tensors"])
    for st, k in zip(res["stages"], planted.values(), strict=True):
        assert round((1 - st["zero_fraction"]) * total) == k  # exactly the planted entries changed
        moved = [t["name"] for t in st["tensors"] if t["zero_fraction"] < 1]
        assert moved == [TENSOR]
    assert "Sparsity over the trajectory" in (out / "report.html").read_text()
    without_base = tmp_path / "d2"
    assert run_app(["diff", str(folder), "--out", str(without_base)]) == 0
    assert json.loads((without_base / "results" / "diff.json").read_text())["stage_names"] == ["step_10", "step_20"]


def test_a_step_folder_without_a_hf_checkpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "verl_out"
    (folder / "global_step_3" / "actor").mkdir(parents=True)
    torch.save({}, folder / "global_step_3" / "actor" / "model_world_size_1_rank_0.pt")
    assert run_app(["diff", str(folder), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "global_step_3: a step folder without config.json" in err[0]
    assert "docs/checkpoints.md" in err[0]
