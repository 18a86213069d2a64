"""Sequential GRPO training: config validation, a 2-stage tiny run, resume after an injected failure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crossroute.experiments.sequence as train
from crossroute.analyze.forgetting import forgetting_summary
from crossroute.core.errors import CrossrouteError
from crossroute.experiments.sequence import load_train_config, parse_train_config, run_training


def tiny_config(model: Path, steps: int = 2) -> dict[str, Any]:
    return {
        "model": str(model),
        "domains": ["math", "qa"],
        "eval_n": 8,
        "train_prompts": 40,
        "grpo": {"num_generations": 4, "per_device_train_batch_size": 8, "max_completion_length": 6,
                 "learning_rate": 1e-2, "logging_steps": 1, "temperature": 1.0},
        "stages": [{"domain": "math", "steps": steps}, {"domain": "qa", "steps": steps}],
        "refresh": {"domain": "math", "steps": 1},
    }


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"stagez": []}, "field stagez: unknown field"),
        ({"stages": [{"domain": "chess", "steps": 1}]},
         "cfg.yaml: stages[0].domain 'chess' is not declared in domains"),
        ({"domains": ["math", "chess"]}, "field domains: unknown domain 'chess'"),
        ({"stages": [{"domain": "math", "steps": 0}]}, "field stages.0.steps"),
        ({"stages": [{"domain": "math", "steps": 1, "lr": 1}]}, "field stages.0.lr: unknown field"),
        ({"stages": []}, "field stages"),
        ({"grpo": {"num_generations": 3, "per_device_train_batch_size": 8}},
         "stages[0].grpo: generation_batch_size (8) must be divisible by num_generations (3)"),
        ({"grpo": {"num_generations": 1, "per_device_train_batch_size": 8}}, "stages[0].grpo"),
        ({"grpo": {"learning_rat": 1e-3}}, "stages[0].grpo.learning_rat: not a field of GRPOConfig"),
        ({"refresh": {"domain": "cw", "steps": 1}}, "refresh.domain 'cw' is not declared in domains"),
    ],
)
def test_config_errors_name_the_field(tiny_ckpt: Path, patch: dict[str, Any], needle: str) -> None:
    raw = {**tiny_config(tiny_ckpt), **patch}
    with pytest.raises(CrossrouteError) as e:
        parse_train_config(raw, "cfg.yaml")
    assert needle in str(e.value), str(e.value)
    assert str(e.value).startswith("cfg.yaml")


def test_yaml_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CrossrouteError, match="no such config file"):
        load_train_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(CrossrouteError, match="bad.yaml: invalid YAML"):
        load_train_config(bad)


def test_shipped_configs_validate() -> None:
    root = Path(__file__).parents[2] / "configs"
    cfg = load_train_config(root / "default_sequence.yaml")
    assert [s.domain for s in cfg.stages] == ["code", "math", "qa", "cw"] and cfg.refresh is not None
    assert cfg.refresh.domain == "math"
    from crossroute.experiments.demo import CPIFT_CONFIG, DEMO_CONFIG, PROTECT_CONFIG

    assert PROTECT_CONFIG.read_text() == (root / "protected_sequence.yaml").read_text()

    assert DEMO_CONFIG.read_text() == (root / "default_sequence.yaml").read_text()  # the demo runs this config
    assert CPIFT_CONFIG.read_text() == (root / "cpift_default.yaml").read_text()
    from crossroute.model.presets import get_preset

    gpu = get_preset("gpu").sequence
    assert gpu.read_text() == (root / "gpu_sequence.yaml").read_text()
    assert [s.domain for s in load_train_config(gpu).stages] == [s.domain for s in cfg.stages]
    mixed = load_train_config(root / "mixed_vs_sequential.yaml")
    stage = mixed.mixed.stage(mixed.stages)
    assert (stage.steps, stage.mixture) == (240, {"code": 60.0, "math": 60.0, "qa": 60.0, "cw": 60.0})
    raw = yaml.safe_load((root / "qwen3_real.yaml").read_text())
    assert raw["grpo"]["use_vllm"] is True  # documented real-checkpoint example
    from crossroute.domains.judge import JudgeConfig

    assert JudgeConfig.model_validate(raw["judge"]).url == "http://127.0.0.1:8000/v1/chat/completions"


def test_forgetting_summary_hand_computed() -> None:
    rows = ["base", "01_math", "02_qa", "refresh_math"]
    m = [[10.0, 50.0], [30.0, 45.0], [20.0, 60.0], [28.0, 59.0]]
    s = forgetting_summary(rows, m, ["math", "qa"], ["math", "qa"], refresh_row=3)
    assert s["peak"] == {"math": 30.0, "qa": 60.0}
    assert s["forgetting"] == {"math": 10.0, "qa": 0.0}
    assert s["backward_transfer"] == -10.0
    assert s["average_final"] == 40.0 and s["average_base"] == 30.0
    assert s["own_stage_gain"] == {"01_math": 20.0, "02_qa": 15.0}
    r = s["refresh"]
    assert r["recovered_points"] == 8.0 and r["recovery_share"] == pytest.approx(0.8)
    assert r["others_change"] == {"qa": -1.0}


@pytest.mark.slow
def test_two_stage_run_then_resume_after_failure(tmp_path: Path, tiny_ckpt: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_train_config(tiny_config(tiny_ckpt))
    real = train._run_stage
    calls: list[str] = []

    def failing(cfg_: Any, stage: Any, name: str, *a: Any) -> None:
        calls.append(name)
        if name == "02_qa":
            raise RuntimeError("injected failure")
        real(cfg_, stage, name, *a)

    monkeypatch.setattr(train, "_run_stage", failing)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected"):
        run_training(cfg, out)
    assert (out / "checkpoints" / "01_math" / "model.safetensors").exists()
    assert not (out / "checkpoints" / "02_qa").exists()
    mtime = (out / "checkpoints" / "01_math" / "model.safetensors").stat().st_mtime_ns

    calls.clear()
    monkeypatch.setattr(train, "_run_stage", lambda *a: (calls.append(a[2]), real(*a)))
    result = run_training(cfg, out)
    assert calls == ["02_qa", "refresh_math"]  # the finished stage was not redone
    assert (out / "checkpoints" / "01_math" / "model.safetensors").stat().st_mtime_ns == mtime
    assert result["rows"] == ["base", "01_math", "02_qa", "refresh_math"]
    assert len(result["matrix"]) == 4 and all(len(r) == 2 for r in result["matrix"])
    assert (out / "results" / "forgetting.json").exists()

    calls.clear()
    run_training(cfg, out)  # a finished run is not retrained
    assert calls == []

    other = parse_train_config({**tiny_config(tiny_ckpt), "seed": 1})
    with pytest.raises(CrossrouteError, match="different config"):
        run_training(other, out)


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def reference_run(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Any, dict]:
    """An uninterrupted run of the kill/resume config, and the number of atomic renames it makes."""
    import crossroute.core.atomic as atomic

    raw = {**tiny_config(tiny_ckpt), "domains": ["cw", "qa"],
           "stages": [{"domain": "cw", "steps": 2}, {"domain": "qa", "steps": 2}],
           "refresh": {"domain": "cw", "steps": 1}}
    calls = {"n": 0}
    real = atomic.os.replace

    def counting(*a: Any) -> None:
        calls["n"] += 1
        real(*a)

    atomic.os.replace = counting  # type: ignore[assignment]
    try:
        out = tmp_path_factory.mktemp("reference") / "run"
        result = run_training(parse_train_config(raw), out)
    finally:
        atomic.os.replace = real  # type: ignore[assignment]
    return raw, {"result": result, "weights": _weights(out / "checkpoints" / "refresh_cw")}, calls


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_killed_anywhere_then_resumed_equals_uninterrupted(data: st.DataObject, reference_run: tuple) -> None:
    """A crash at any atomic write (checkpoint or result) and a rerun give the uninterrupted run's
    forgetting matrix and final weights, bit for bit."""
    import tempfile

    import torch

    import crossroute.core.atomic as atomic

    raw, ref, calls = reference_run
    kill_at = data.draw(st.integers(1, calls["n"]), label="kill at atomic rename #")
    real = atomic.os.replace
    seen = {"n": 0}

    def dying(*a: Any) -> None:
        seen["n"] += 1
        if seen["n"] == kill_at:
            raise KeyboardInterrupt("killed")
        real(*a)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        atomic.os.replace = dying  # type: ignore[assignment]
        try:
            with pytest.raises(KeyboardInterrupt):
                run_training(parse_train_config(raw), out)
        finally:
            atomic.os.replace = real  # type: ignore[assignment]
        result = run_training(parse_train_config(raw), out)
        assert result["matrix"] == ref["result"]["matrix"]
        got = _weights(out / "checkpoints" / "refresh_cw")
        assert all(torch.equal(got[k], v) for k, v in ref["weights"].items())


def test_unreachable_judge_is_refused_before_training(tiny_ckpt: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw = {**tiny_config(tiny_ckpt), "domains": ["cw"], "stages": [{"domain": "cw", "steps": 1}], "refresh": None,
           "judge": {"base_url": f"http://127.0.0.1:{port}/v1", "model": "judge", "retries": 1, "backoff_s": 0.01}}
    with pytest.raises(CrossrouteError, match=rf"judge endpoint http://127.0.0.1:{port}/v1 unreachable"):
        run_training(parse_train_config(raw), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_judge_without_a_score_is_refused_before_training(tiny_ckpt: Path, tmp_path: Path) -> None:
    """A judge that answers "banana" would train every judged stage on reward 0: the preflight's real scoring
    request needs a readable score, so the run stops before anything is created."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Banana(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "banana"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Banana)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        raw = {**tiny_config(tiny_ckpt), "domains": ["cw"], "stages": [{"domain": "cw", "steps": 1}], "refresh": None,
               "judge": {"base_url": url, "model": "judge", "retries": 1}}
        with pytest.raises(CrossrouteError, match=rf"judge endpoint {url}/chat/completions \(model judge\) "
                                                  r"answered a test scoring request with no 0-10 score: 'banana'"):
            run_training(parse_train_config(raw), tmp_path / "run")
    finally:
        server.shutdown()
        server.server_close()
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_seeds_run_the_sequence_per_seed_and_aggregate(tmp_path: Path, tiny_ckpt: Path) -> None:
    raw = {**tiny_config(tiny_ckpt, steps=1), "seeds": [0, 1], "refresh": None}
    cfg = parse_train_config(raw)
    res = train.run_training(cfg, tmp_path / "run")
    per = [json.loads((tmp_path / "run" / "seeds" / str(k) / "results" / "forgetting.json").read_text())
           for k in (0, 1)]
    assert [p["seed"] for p in res["seeds"]["per_seed"]] == [0, 1]
    # the aggregate is computed from the per-seed paired figures: recompute one by hand
    vals = [p["paired"]["forgetting"]["math"]["value"] for p in per]
    agg = res["seeds"]["aggregate"]["forgetting:math"]
    assert agg["values"] == vals and agg["mean"] == pytest.approx(sum(vals) / 2, abs=1e-4)
    sd = abs(vals[0] - vals[1]) / 2 ** 0.5
    assert agg["sd"] == pytest.approx(sd, abs=1e-4)
    assert agg["hi"] - agg["mean"] == pytest.approx(12.706 * sd / 2 ** 0.5, abs=1e-3)
    assert res["matrix"][0] == per[0]["matrix"][0] == per[1]["matrix"][0]  # the base row: eval never seeded
    saved = json.loads((tmp_path / "run" / "results" / "forgetting.json").read_text())
    assert saved["seeds"]["aggregate"]["forgetting:math"]["values"] == vals


class _Rank:
    """A stand-in for accelerate's PartialState on process `index` of a launch (barriers recorded, not run)."""

    def __init__(self, index: int, barrier_error: Exception | None = None) -> None:
        self.process_index, self.is_main_process = index, index == 0
        self.barriers, self.error = 0, barrier_error

    def wait_for_everyone(self) -> None:
        self.barriers += 1
        if self.error is not None:
            raise self.error


def test_only_the_main_process_opens_the_run(tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The main process opens (locks, writes run.yaml); another rank meets it at a barrier, then joins the directory
    without calling open_run, so it never contends for the run's lock (a deadlock or a refusal)."""
    cfg = parse_train_config(tiny_config(tiny_ckpt))
    opened: list[Path] = []
    real = train.open_run
    monkeypatch.setattr(train, "open_run", lambda out, *a, **k: (opened.append(Path(out)), real(out, *a, **k))[1])
    main = _Rank(0)
    monkeypatch.setattr(train, "_dist_state", lambda cfg=None: main)
    run = train.open_train_run(cfg, tmp_path / "run", tiny_ckpt)
    assert opened == [tmp_path / "run"] and main.barriers == 1 and run.config_path.exists()

    other = _Rank(1)
    monkeypatch.setattr(train, "_dist_state", lambda cfg=None: other)
    joined = train.open_train_run(cfg, tmp_path / "run", tiny_ckpt)
    assert opened == [tmp_path / "run"] and other.barriers == 1 and joined.root == run.root
    with pytest.raises(CrossrouteError, match="no run.yaml after the main process opened the run; --out must be on a "
                                              "filesystem every node shares"):
        train.open_train_run(cfg, tmp_path / "elsewhere", tiny_ckpt)
    assert opened == [tmp_path / "run"]


def test_a_rank_whose_main_process_died_ends_with_one_line(tiny_ckpt: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_train_config(tiny_config(tiny_ckpt))
    gone = _Rank(1, RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:38075.\nx"))
    monkeypatch.setattr(train, "_dist_state", lambda cfg=None: gone)
    with pytest.raises(CrossrouteError) as e:
        train.open_train_run(cfg, tmp_path / "run", tiny_ckpt)
    assert str(e.value).startswith("process 1: the main process stopped while the others waited for it to open the "
                                   "run directory ([gloo/transport/tcp/pair.cc:553] Connection closed by peer")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_stage_scratch_is_removed(tmp_path: Path, tiny_ckpt: Path) -> None:
    """RUN/.work/<stage> (TRL's output_dir) does not outlive its stage; nothing hidden is left but crossroute's
    lasting markers."""
    raw = {**tiny_config(tiny_ckpt, steps=1), "refresh": None, "stages": [{"domain": "math", "steps": 1}]}
    out = tmp_path / "run"
    run_training(parse_train_config(raw), out)
    assert not (out / ".work").exists()
    assert sorted(p.name for p in out.rglob(".*") if p.name not in (".lock", ".crossroute")) == []


def _length_reward(completions: list, **kwargs: object) -> list[float]:
    return [float(len(c)) for c in completions]  # the tiny model scores 0 everywhere: length moves its weights


def test_every_stage_records_its_kl_and_forgetting_is_fitted_against_it(tmp_path: Path, tiny_ckpt: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from crossroute.domains.domain import Domain

    monkeypatch.setattr(Domain, "reward_func", lambda self: _length_reward)
    raw = {**tiny_config(tiny_ckpt, steps=1), "domains": ["math", "qa", "cw"], "kl_n": 3,
           "stages": [{"domain": "math", "steps": 1}, {"domain": "qa", "steps": 1}]}
    result = run_training(parse_train_config(raw), tmp_path / "run")
    kl = result["kl"]
    assert kl["to_previous"]["01_math"] == kl["to_base"]["01_math"]  # the first stage's previous is the base
    assert kl["to_previous"]["02_qa"] != kl["to_base"]["02_qa"]
    assert all(v["kl_token"] > 0 for v in kl["to_base"]["02_qa"].values())  # the stages moved the weights
    assert set(kl["to_base"]["refresh_math"]) == {"math", "qa", "cw"}
    assert all(v["n_prompts"] == 3 and v["kl_token"] >= 0 for r in kl["to_base"].values() for v in r.values())
    pts = result["forgetting_vs_kl"]["points"]
    assert [(p["stage"], p["domain"]) for p in pts] == [("01_math", "qa"), ("01_math", "cw"), ("02_qa", "math"),
                                                        ("02_qa", "cw")]
    m, rows, doms = result["matrix"], result["rows"], result["domains"]
    for p in pts:  # the paired drop's mean is the matrix's difference between the row before and the stage
        i, j = rows.index(p["stage"]), doms.index(p["domain"])
        assert p["drop"]["value"] == pytest.approx(m[i - 1][j] - m[i][j], abs=1e-6)
        assert p["kl_new_task"] == kl["to_previous"][p["stage"]][p["stage_domain"]]["kl_token"]
    assert result["forgetting_vs_kl"]["fit_new_task"]["n"] == 4
    from crossroute.report.build import build_report

    page = build_report(tmp_path / "run").read_text()
    assert "Forgetting against KL (RL&#x27;s Razor)" in page or "Forgetting against KL (RL's Razor)" in page
    assert "<th>KL new task</th>" in page and "<td>on the new task</td>" in page


def test_a_shared_prefix_is_reused_and_equals_retraining_it(tmp_path: Path, tiny_ckpt: Path) -> None:
    """reuse_prefix links the stages two configs share; resuming after them gives what training all of it gives."""
    from safetensors.torch import load_file

    plain = parse_train_config({**tiny_config(tiny_ckpt), "refresh": None})
    other_raw = {**tiny_config(tiny_ckpt), "refresh": None}
    other_raw["stages"] = [other_raw["stages"][0], {"domain": "qa", "steps": 3}]  # stage 2 differs
    other = parse_train_config(other_raw)
    assert train.shared_prefix(plain, other) == 1
    assert train.shared_prefix(plain, plain.model_copy(update={"seed": 1})) == 0  # another seed shares nothing
    run_training(plain, tmp_path / "plain")
    assert train.reuse_prefix(tmp_path / "plain", plain, other, tmp_path / "reused") == ["01_math"]
    reused = run_training(other, tmp_path / "reused")
    fresh = run_training(other, tmp_path / "fresh")
    assert reused["matrix"] == fresh["matrix"] and reused["paired"] == fresh["paired"]
    for name in ("01_math", "02_qa"):
        a = load_file(tmp_path / "reused" / "checkpoints" / name / "model.safetensors")
        b = load_file(tmp_path / "fresh" / "checkpoints" / name / "model.safetensors")
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name
    src = tmp_path / "plain" / "checkpoints" / "01_math" / "model.safetensors"
    assert (tmp_path / "reused" / "checkpoints" / "01_math" / "model.safetensors").stat().st_ino == src.stat().st_ino
    assert train.reuse_prefix(tmp_path / "plain", plain, other, tmp_path / "reused") == []  # already there
