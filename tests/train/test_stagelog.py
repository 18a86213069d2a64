"""A stage's log (crossroute.train.stagelog): no raw log dictionaries on the terminal, TRL's full log in
RUN/logs/<stage>.jsonl, and a local tracker (tensorboard via tensorboardX) receiving every logged metric."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from crossroute.experiments.sequence import parse_train_config, run_training


def _tfrecords(path: Path) -> list[bytes]:
    """The records of a TFRecord file (u64 length, u32 crc, data, u32 crc), read without tensorflow."""
    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        out.append(data[i + 12:i + 12 + n])
        i += 12 + n + 4
    return out


def _scalars(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for f in sorted(logdir.rglob("events.out.tfevents.*")):
        for rec in _tfrecords(f):
            ev = event_pb2.Event.FromString(rec)
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


def test_a_stage_logs_to_jsonl_and_tensorboard_and_prints_no_dicts(tmp_path: Path, tiny_ckpt: Path,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tensorboardX")
    raw = {"model": str(tiny_ckpt), "domains": ["math"], "eval_n": 4, "train_prompts": 16,
           "grpo": {"num_generations": 4, "per_device_train_batch_size": 8, "max_completion_length": 4,
                    "learning_rate": 1e-2, "logging_steps": 1, "report_to": ["tensorboard"]},
           "stages": [{"domain": "math", "steps": 3}]}
    out = tmp_path / "run"
    run_training(parse_train_config(raw), out)
    printed = capfd.readouterr()
    for stream in (printed.out, printed.err):
        assert "{'loss'" not in stream and "'reward':" not in stream and "'train_runtime'" not in stream
    assert "GRPO 01_math" in printed.err  # the stage's one progress line

    rows = [json.loads(line) for line in (out / "logs" / "01_math.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "reward" in r]
    assert [r["step"] for r in logged] == [1, 2, 3]
    train_log = json.loads((out / "results" / "train_01_math.json").read_text())["log"]
    assert [r["reward"] for r in logged] == [h["reward"] for h in train_log]
    assert any("train_runtime" in r for r in rows)  # the end-of-training summary too

    tb = _scalars(out / "logs" / "tensorboard" / "01_math")
    assert tb["train/reward"] == pytest.approx({r["step"]: r["reward"] for r in logged}, rel=1e-6)
    assert set(tb) >= {"train/reward", "train/loss", "train/learning_rate"}


def test_sft_logs_to_jsonl_and_prints_no_dicts(tmp_path: Path, tiny_ckpt: Path,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    from crossroute.domains.builtin import BUILTIN
    from crossroute.train.sft import sft_train

    stats = sft_train(tiny_ckpt, [BUILTIN["math"]], 3, 1e-3, 4, tmp_path / "sft_3", train_prompts=16,
                      sft={"logging_steps": 1}, log_dir=tmp_path / "logs")
    printed = capfd.readouterr()
    for stream in (printed.out, printed.err):
        assert "{'loss'" not in stream and "'train_runtime'" not in stream
    assert "SFT sft_3" in printed.err
    rows = [json.loads(line) for line in (tmp_path / "logs" / "sft_3.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == [h["loss"] for h in stats["log"]]
