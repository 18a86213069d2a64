"""Merges: mergekit's methods run by mergekit (equal to its own mergekit-yaml CLI, and to hand computations),
parameter checking, crossroute's output conventions, and crossroute's own SLERP math, core masks and transplant."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import make_tiny
from crossroute.core.atomic import MARKER
from crossroute.core.errors import CrossrouteError
from crossroute.repair.merge import (
    check_setting,
    check_t_value,
    core_masks,
    load_index_masks,
    load_t_schedule,
    mask_jaccard,
    merge_checkpoints,
    mergekit_methods,
    parse_param_options,
    run_merge,
    save_index_masks,
    slerp,
    slerp_flagged,
    transplant_cores,
)

MERGEKIT_YAML_CLI = """import sys
from mergekit.scripts.run_yaml import main  # the `mergekit-yaml` console script's entry point
for config, out in zip(sys.argv[1::2], sys.argv[2::2]):
    main([config, out, "--random-seed", "0", "--quiet"], standalone_mode=False)
"""


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Three tiny Qwen3 checkpoints (fp32, tied embeddings): a base and two fine-tunes of it."""
    root = tmp_path_factory.mktemp("merge")
    return make_tiny(root / "a", 0), make_tiny(root / "b", 1), make_tiny(root / "c", 2)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


# ----------------------------------------------------------------------------- crossroute's SLERP math (CPI-FT)

def test_slerp_orthogonal_unit_vectors_by_hand() -> None:
    out = slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    assert torch.allclose(out, torch.tensor([1 / math.sqrt(2), 1 / math.sqrt(2)]), atol=1e-7)
    # t = 1/3 of a right angle: (cos 30°, sin 30°)
    out = slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 1 / 3)
    assert torch.allclose(out, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-6)


def test_slerp_colinear_falls_back_to_linear() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])
    out, lin = slerp_flagged(a, b, 0.25)
    assert lin and torch.allclose(out, torch.tensor([1.5, 0.0]))
    assert torch.allclose(slerp(a, -b, 0.5), torch.tensor([-1.0, 0.0]))  # antipodal: linear too
    out, lin = slerp_flagged(torch.zeros(2), b, 0.5)  # a zero task vector: linear, t·b (mergekit: sin(tπ/2)·b)
    assert lin and torch.equal(out, 0.5 * b)
    assert not slerp_flagged(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.1]), 0.5)[1]


vec = st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=2, max_size=8)


@settings(max_examples=60, deadline=None)
@given(vec, vec)
def test_slerp_endpoints(xa: list[float], xb: list[float]) -> None:
    n = min(len(xa), len(xb))
    a, b = torch.tensor(xa[:n]), torch.tensor(xb[:n])
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-4, rtol=1e-4)


@settings(max_examples=60, deadline=None)
@given(vec, vec, st.floats(0, 1))
def test_slerp_keeps_unit_norm(xa: list[float], xb: list[float], t: float) -> None:
    n = min(len(xa), len(xb))
    a, b = torch.tensor(xa[:n]), torch.tensor(xb[:n])
    if a.norm() < 1e-3 or b.norm() < 1e-3:
        return
    a, b = a / a.norm(), b / b.norm()
    out, lin = slerp_flagged(a, b, t)
    if not lin:
        assert abs(float(out.norm()) - 1.0) < 1e-4
    else:  # colinear: linear interpolation never leaves the unit ball
        assert float(out.norm()) <= 1.0 + 1e-5


def test_transplant_collision_rule() -> None:
    base = torch.zeros(4)
    d1, d2 = torch.tensor([1.0, 0, 3, 5]), torch.tensor([-2.0, 7, -1, 5])
    out, collisions, moved = transplant_cores(base, [d1, d2], [torch.tensor([0, 2, 3]), torch.tensor([0, 1, 2, 3])])
    # entry 0: |-2| > |1| -> d2; entry 2: |3| > |-1| -> d1; entry 3: tie -> the earlier donor (d1)
    assert torch.equal(out, torch.tensor([-2.0, 7, 3, 5]))
    assert (collisions, moved) == (3, 4)
    assert torch.equal(transplant_cores(base, [d1], [None])[0], base)


# ----------------------------------------------------------------------------- core masks

def _ckpt(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    return path


def test_core_mask_exact_top_p_with_deterministic_ties(tmp_path: Path) -> None:
    zero = {"a": torch.zeros(10), "b": torch.zeros(2, 5)}
    base = _ckpt(tmp_path / "base", zero)
    da = torch.tensor([5.0, -4, 3, 3, -3, 0, 0, 0, 0, 0])
    db = torch.zeros(2, 5)
    db[0, 0] = 3.0
    other = _ckpt(tmp_path / "other", {"a": da, "b": db})
    masks, stats = core_masks(base, other, 25.0)  # k = ceil(20 * 0.25) = 5: 5, 4 and three of four 3s
    assert stats["k"] == 5 and stats["numel"] == 20
    assert masks["a"].tolist() == [0, 1, 2, 3, 4] and masks["b"].numel() == 0
    masks, _ = core_masks(base, other, 30.0)  # k = 6: every 3 is in
    assert masks["a"].tolist() == [0, 1, 2, 3, 4] and masks["b"].tolist() == [0]
    path = save_index_masks(masks, tmp_path / "m.safetensors")
    back = load_index_masks(path)
    assert back["a"].dtype == torch.int64 and mask_jaccard(back, masks) == 1.0
    assert mask_jaccard(back, {"a": torch.tensor([0, 9])}) == pytest.approx(1 / 7)


def test_core_mask_matches_topk_on_random_update(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base_t = {"x": torch.randn(40, 30, generator=g), "y": torch.randn(500, generator=g)}
    other_t = {k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in base_t.items()}
    base, other = _ckpt(tmp_path / "b", base_t), _ckpt(tmp_path / "o", other_t)
    masks, stats = core_masks(base, other, 2.0)
    delta = torch.cat([(other_t[k] - base_t[k]).reshape(-1) for k in ("x", "y")]).abs()
    k = math.ceil(delta.numel() * 0.02)
    picked = torch.cat([masks["x"], masks["y"] + 1200])
    assert picked.numel() == k == stats["k"]
    assert set(picked.tolist()) == set(torch.topk(delta, k).indices.tolist())


def test_transplant_merge_streams_the_cores(ckpts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    a, b, _ = ckpts
    out = run_merge("transplant", a, [b], tmp_path / "tr", top_percent=1.0)
    masks, _ = core_masks(a, b, 1.0)
    wa, wb, wo = _weights(a), _weights(b), _weights(out)
    for name, idx in masks.items():
        want = wa[name].clone().reshape(-1)
        want[idx] = wb[name].reshape(-1)[idx]
        assert torch.equal(wo[name].reshape(-1), want)
    stats = json.loads((out / "merge.json").read_text())
    assert stats["engine"] == "crossroute" and stats["transplanted"] == sum(int(m.numel()) for m in masks.values())


# ----------------------------------------------------------------------------- settings and --param

def test_settings_and_param_options_are_checked() -> None:
    grad = load_t_schedule("t: [{filter: self_attn, value: [0, 1]}, {filter: mlp, value: 0.2}, {value: 0.5}]")
    assert grad[0] == {"filter": "self_attn", "value": [0, 1]} and grad[2] == {"value": 0.5}
    assert load_t_schedule({"merge_method": "slerp", "parameters": {"t": [0.1, 0.9]}}) == [0.1, 0.9]
    assert load_t_schedule(None) == 0.5
    for bad, where in (([{"filtr": "mlp", "value": 1}], r"t\[0\]: expected"), ([], "empty list"),
                       ([0.0, 2.0], r"t\[1\]: 2.0 is outside"), ([{"value": [0, {"value": 1}]}], r"t\[0\]\.value"),
                       ([{"filter": "mlp", "value": math.nan}], r"t\[0\]\.value: nan is outside")):
        with pytest.raises(CrossrouteError, match=where):
            check_setting(bad, "t", check_t_value)
    shared, per_input = parse_param_options(["density=0.5", "t=[0, 0.5, 1]", "1:weight=0.7", "0:weight=1e-1",
                                             "lambda=1e-5", "t2=[{filter: mlp, value: 1e-2}]", "normalize=true"])
    assert shared == {"density": 0.5, "t": [0, 0.5, 1], "lambda": 1e-5, "t2": [{"filter": "mlp", "value": 0.01}],
                      "normalize": True}
    assert per_input == {1: {"weight": 0.7}, 0: {"weight": 0.1}}
    for bad, needle in (("density", "expected NAME=VALUE"), ("density=", "no value"), ("x=[1", "not a YAML value"),
                        ("a:weight=1", "expected NAME=VALUE")):
        with pytest.raises(CrossrouteError, match=needle):
            parse_param_options([bad])
    with pytest.raises(CrossrouteError, match="given twice for input 1"):
        parse_param_options(["1:weight=1", "1:weight=2"])


# ----------------------------------------------------------------------------- mergekit: slerp and linear

def test_slerp_and_linear_run_mergekit_and_match_crossroutes_math(ckpts: tuple[Path, Path, Path],
                                                                 tmp_path: Path) -> None:
    """crossroute's slerp/linear now run mergekit's; on tiny Qwen3 they equal crossroute's own formulas (SLERP:
    slerp_flagged, the math of the removed streamed path; linear: (1 - t)·a + t·b) up to fp32 rounding."""
    a, b, _ = ckpts
    wa, wb = _weights(a), _weights(b)
    out = run_merge("slerp", a, [b], tmp_path / "s", t=0.3)
    ws = _weights(out)
    assert set(ws) == set(wa)
    for name in wa:
        assert torch.allclose(ws[name], slerp_flagged(wa[name], wb[name], 0.3)[0], rtol=1e-6, atol=1e-7), name
    assert not all(torch.equal(ws[n], wa[n]) for n in wa)
    stats = json.loads((out / "merge.json").read_text())
    assert stats["engine"] == "mergekit" and stats["t_schedule"] == 0.3 and stats["config"]["parameters"] == {"t": 0.3}
    assert (out / MARKER).exists() and (out / "tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes()
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == "slerp"
    assert all(torch.equal(v, wa[k]) for k, v in _weights(run_merge("slerp", a, [b], tmp_path / "s0", t=0.0)).items())

    out = run_merge("linear", a, [b], tmp_path / "l", t=0.25)  # dyadic weights: exact in fp32, bit for bit
    assert all(torch.equal(v, 0.75 * wa[k] + 0.25 * wb[k]) for k, v in _weights(out).items())
    sched = tmp_path / "t.yaml"
    sched.write_text("parameters:\n  t:\n    - {filter: self_attn, value: 1}\n    - {value: 0.5}\n")
    wl = _weights(run_merge("linear", a, [b], tmp_path / "lin", t_schedule_yaml=sched))
    q1, up = "model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(wl[q1], wb[q1]) and torch.equal(wl[up], 0.5 * wa[up] + 0.5 * wb[up])


def test_gradient_t_follows_mergekits_planner(ckpts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A gradient spreads over the layers (layer i of N at i/(N-1)); in mergekit 0.1.5 the tensors after the layers
    (final norm, an untied lm_head) sit at its start, x = 0, as the embeddings do (the removed path put them at 1)."""
    a, b, _ = ckpts
    other = tmp_path / "b3"
    shutil.copytree(b, other)
    wb = _weights(other)
    wb["model.norm.weight"] = wb["model.norm.weight"] * 3  # the random init leaves every norm at 1: plant a change
    save_file(wb, other / "model.safetensors", metadata={"format": "pt"})
    wa = _weights(a)
    wo = _weights(run_merge("linear", a, [other], tmp_path / "g", t_schedule_yaml=_yaml(tmp_path, {"t": [0.0, 1.0]})))
    for name in wa:
        first = ".layers.0." in name or name in ("model.embed_tokens.weight", "model.norm.weight")
        assert torch.equal(wo[name], wa[name] if first else wb[name]), name


def _yaml(folder: Path, obj: object, name: str = "t.yaml") -> Path:
    (folder / name).write_text(yaml.safe_dump(obj, sort_keys=False))
    return folder / name


# ----------------------------------------------------------------------------- mergekit: the bar

def test_ties_dare_and_task_arithmetic_equal_mergekit_yaml(ckpts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """crossroute's merge of ties, dare_ties (seed 0) and task_arithmetic equals, tensor for tensor, what mergekit's
    own mergekit-yaml CLI writes for the same configurations written by hand (no dtype: the models are fp32), and
    for the OUT/mergekit_config.yml crossroute keeps."""
    a, b, c = (str(p) for p in ckpts)
    hand = {
        "ties": {"merge_method": "ties", "base_model": a, "parameters": {"normalize": True},
                 "models": [{"model": a}, {"model": b, "parameters": {"weight": 0.6, "density": 0.5}},
                            {"model": c, "parameters": {"weight": 0.4, "density": 0.7}}]},
        "dare_ties": {"merge_method": "dare_ties", "base_model": a, "parameters": {"density": 0.5},
                      "models": [{"model": a}, {"model": b, "parameters": {"weight": 0.6}},
                                 {"model": c, "parameters": {"weight": 0.4}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": a, "parameters": {"lambda": 0.9},
                            "models": [{"model": a}, {"model": b, "parameters": {"weight": 0.7}},
                                       {"model": c, "parameters": {"weight": 0.4}}]},
    }
    ours = {
        "ties": run_merge("ties", a, [b, c], tmp_path / "ties", params={"normalize": True},
                          model_params={1: {"weight": 0.6, "density": 0.5}, 2: {"weight": 0.4, "density": 0.7}}),
        "dare_ties": run_merge("dare_ties", a, [b, c], tmp_path / "dare", params={"density": 0.5},
                               model_params={1: {"weight": 0.6}, 2: {"weight": 0.4}}, seed=0),
        "task_arithmetic": run_merge("task_arithmetic", a, [b, c], tmp_path / "ta", params={"lambda": 0.9},
                                     model_params={1: {"weight": 0.7}, 2: {"weight": 0.4}}),
    }
    configs = {m: _yaml(tmp_path, cfg, f"{m}.yaml") for m, cfg in hand.items()}
    configs["kept"] = ours["dare_ties"] / "mergekit_config.yml"  # the configuration crossroute ran, as it kept it
    argv = [str(x) for m, cfg in configs.items() for x in (cfg, tmp_path / f"cli_{m}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cli = subprocess.Popen([sys.executable, "-c", MERGEKIT_YAML_CLI, *argv], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:  # the seed-1 merge runs while mergekit-yaml imports
        wd = _weights(ours["dare_ties"])
        other_seed = _weights(run_merge("dare_ties", a, [b, c], tmp_path / "dare1", params={"density": 0.5},
                                        model_params={1: {"weight": 0.6}, 2: {"weight": 0.4}}, seed=1))
        assert not all(torch.equal(wd[n], other_seed[n]) for n in wd)  # DARE is random; the seed fixes it
        _, err = cli.communicate(timeout=240)
    finally:
        cli.kill()
    assert cli.returncode == 0, err[-2000:]
    wa = _weights(Path(a))
    for method, out in (*ours.items(), ("kept", ours["dare_ties"])):
        mine, theirs = _weights(out), _weights(tmp_path / f"cli_{method}")
        assert set(mine) == set(theirs) == set(wa)
        for name in mine:
            assert mine[name].dtype == theirs[name].dtype and torch.equal(mine[name], theirs[name]), (method, name)
        assert not all(torch.equal(mine[n], wa[n]) for n in wa), method


def test_task_arithmetic_by_hand(ckpts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    a, b, c = ckpts
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    out = run_merge("task_arithmetic", a, [b, c], tmp_path / "ta", params={"lambda": 0.9},
                    model_params={1: {"weight": 0.7}, 2: {"weight": -0.4}})
    for name, got in _weights(out).items():
        want = wa[name].double() + 0.9 * (0.7 * (wb[name].double() - wa[name]) - 0.4 * (wc[name].double() - wa[name]))
        assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-7), name


def test_mergekit_yaml_as_method_or_config(ckpts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    a, b, c = (str(p) for p in ckpts)
    cfg = _yaml(tmp_path, {"merge_method": "model_stock", "base_model": a,
                           "models": [{"model": a}, {"model": b}, {"model": c}]}, "stock.yaml")
    out = run_merge(str(cfg), None, [], tmp_path / "m1")
    again = run_merge(None, None, [], tmp_path / "m2", config=cfg)
    w1, w2 = _weights(out), _weights(again)
    assert all(torch.equal(w1[n], w2[n]) for n in w1)
    stats = json.loads((out / "merge.json").read_text())
    assert stats["method"] == "model_stock" and stats["config_file"] == str(cfg)
    assert (out / "mergekit_config.yml").read_text() == cfg.read_text()
    with pytest.raises(CrossrouteError, match="names its own models"):
        run_merge(str(cfg), a, [b], tmp_path / "x")
    with pytest.raises(CrossrouteError, match="not both"):
        run_merge("ties", None, [], tmp_path / "x", config=cfg)
    bad = {"merge_method": "ties", "base_model": a,
           "models": [{"model": a}, {"model": b, "parameters": {"weight": 1, "densty": 0.5}}]}
    with pytest.raises(CrossrouteError, match=r"bad.yaml: models\[1\]\.parameters\.densty: ties has no parameter"):
        run_merge(str(_yaml(tmp_path, bad, "bad.yaml")), None, [], tmp_path / "x")
    bad = {"merge_method": "ties", "base_model": a, "models": [{"model": a}, {"model": str(tmp_path / "nope")}]}
    with pytest.raises(CrossrouteError, match="is not a local checkpoint directory"):
        run_merge(str(_yaml(tmp_path, bad, "bad.yaml")), None, [], tmp_path / "x")
    bad = {"merge_method": "ties", "base_model": a, "models": "oops"}
    with pytest.raises(CrossrouteError, match="not a valid mergekit configuration"):
        run_merge(str(_yaml(tmp_path, bad, "bad.yaml")), None, [], tmp_path / "x")
    with pytest.raises(CrossrouteError, match="no such mergekit YAML"):
        run_merge(str(tmp_path / "absent.yaml"), None, [], tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- mergekit: refusals and conventions

def test_bad_methods_and_parameters_are_one_line_errors(ckpts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    a, b, c = ckpts
    out = tmp_path / "m"
    with pytest.raises(CrossrouteError) as ei:
        run_merge("bogus", a, [b], out)
    assert "merge method 'bogus' unknown" in str(ei.value)
    assert all(m in str(ei.value) for m in ("transplant", *mergekit_methods()))
    assert {"linear", "slerp", "nuslerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "della",
            "model_stock", "ram"} <= set(mergekit_methods())
    cases = [
        (dict(method="ties", params={"densty": 0.5, "weight": 1.0}), r"--param densty: ties has no parameter 'densty'"),
        (dict(method="ties", params={"density": "half", "weight": 1.0}),
         r"--param density: 'half' is not a valid float"),
        (dict(method="ties", params={"weight": 1.0}, model_params={1: {"normalize": False}}),
         r"--param 1:normalize: normalize is one setting for all"),
        (dict(method="ties", params={"weight": 1.0}, model_params={0: {"density": 0.5}}),
         r"--param 0:density: ties applies density to the other models"),
        (dict(method="ties", model_params={1: {"weight": 1.0}}), r"parameter weight is required for input 2"),
        (dict(method="ties", params={"weight": 1.0}, model_params={3: {"weight": 1.0}}), r"--param 3:weight: there is"),
        (dict(method="ties", params={"weight": [0.5, math.inf]}), r"--param weight\[1\]: inf is not finite"),
        (dict(method="slerp"), r"exactly 2 inputs.*got 3"),
        (dict(method="slerp", params={"t": 1.5}, models=[b]), r"--param t: 1.5 is outside \[0, 1\]"),
        (dict(method="ties", t=0.5, params={"weight": 1.0}), r"--t applies to slerp and linear"),
        (dict(method="linear", t=0.5), r"--t is the weight of one other model"),
        (dict(method="della", params={"weight": 1.0, "density": 0.9, "epsilon": 0.2}),
         r"mergekit refused the merge: Epsilon must be chosen"),
        (dict(method="ties", params={"weight": 1.0}, mask=tmp_path / "m.safetensors"), r"--mask applies to transplant"),
    ]
    for kw, needle in cases:
        kw = {"models": [b, c], **kw}
        with pytest.raises(CrossrouteError, match=needle) as ei:
            run_merge(kw.pop("method"), a, kw.pop("models"), out, **kw)
        assert "\n" not in str(ei.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_output_conventions_and_nan_refusal(ckpts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    a, b, c = ckpts
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    kw = dict(params={"weight": 0.5})
    with pytest.raises(CrossrouteError, match="not written by crossroute"):
        run_merge("task_arithmetic", a, [b], foreign, **kw)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(CrossrouteError, match="is an input checkpoint"):
        run_merge("task_arithmetic", a, [b], b, **kw)
    run_merge("task_arithmetic", a, [b], foreign, force=True, **kw)
    assert not (foreign / "notes.txt").exists() and (foreign / MARKER).exists()
    run_merge("task_arithmetic", a, [c], foreign, **kw)  # its own output: replaced
    assert json.loads((foreign / "merge.json").read_text())["models"] == [str(c)]
    bad = tmp_path / "nan"
    shutil.copytree(b, bad)
    wb = _weights(bad)
    name = "model.layers.0.mlp.up_proj.weight"
    wb[name].view(-1)[0] = float("nan")
    save_file(wb, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CrossrouteError, match=f"merged tensor '{name}' has 1 NaN or inf values"):
        merge_checkpoints("task_arithmetic", a, [bad], tmp_path / "n", params={"weight": 0.5})
    assert not (tmp_path / "n").exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_rewritten_input_is_read_anew_and_callers_rng_kept(ckpts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """mergekit caches one open loader per model path for the whole process: a checkpoint rewritten at the same
    path must not be read stale; mergekit's seeding must not move the caller's RNG."""
    a, b, _ = ckpts
    other = tmp_path / "other"
    shutil.copytree(b, other)
    first = _weights(run_merge("linear", a, [other], tmp_path / "o1", t=1.0))
    doubled = {k: v * 2 for k, v in _weights(other).items()}
    fresh = tmp_path / "fresh"
    shutil.copytree(other, fresh)
    save_file(doubled, fresh / "model.safetensors", metadata={"format": "pt"})
    shutil.rmtree(other)
    fresh.rename(other)
    second = _weights(run_merge("linear", a, [other], tmp_path / "o2", t=1.0))
    assert all(torch.equal(second[k], doubled[k]) for k in doubled)  # t = 1: the other model, bit for bit
    assert all(torch.equal(first[k], doubled[k] / 2) for k in first)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    run_merge("dare_linear", a, [other], tmp_path / "o3", params={"weight": 1.0, "density": 0.5})
    assert torch.equal(torch.get_rng_state(), state)
