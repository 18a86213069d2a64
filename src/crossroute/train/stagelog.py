"""What a training stage shows and keeps: one rich progress line on the terminal (step, reward mean, KL, seconds)
instead of TRL's raw log dictionaries, TRL's full log in RUN/logs/<stage>.jsonl, and the trackers named in
`report_to` (transformers' own integrations; tensorboard logs go to RUN/logs/tensorboard/<stage>)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crossroute.core.console import console
from crossroute.core.errors import CrossrouteError

# report_to names crossroute passes through, with the module each needs (transformers checks only some of them).
TRACKERS: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard", "tensorboardX"), "trackio": ("trackio",), "wandb": ("wandb",),
    "mlflow": ("mlflow",), "comet_ml": ("comet_ml",), "clearml": ("clearml",), "aim": ("aim",),
    "swanlab": ("swanlab",), "dvclive": ("dvclive",),
}
SHOWN = ("reward", "kl", "loss")  # TRL log keys shown on the progress line


def check_report_to(value: Any, where: str) -> list[str]:
    """`report_to` as a list of installed trackers ([] for none); an unknown or missing tracker is refused."""
    names = [value] if isinstance(value, str) else list(value or [])
    if names == ["all"]:
        raise CrossrouteError(f"{where}.report_to: 'all' would report to every tracker installed; name them, "
                              f"e.g. [tensorboard] (one of {', '.join(TRACKERS)})")
    if names == ["none"]:
        return []
    for name in names:
        if name not in TRACKERS:
            raise CrossrouteError(f"{where}.report_to: {name!r} is not a tracker crossroute passes through; use "
                                  f"one of {', '.join(TRACKERS)} (or none)")
        if not any(importlib.util.find_spec(m) is not None for m in TRACKERS[name]):
            raise CrossrouteError(f"{where}.report_to: {name!r} is not installed; pip install "
                                  f"{TRACKERS[name][-1]} (or remove it)")
    return names


def report_to_error(given: dict[str, Any], where: str) -> str | None:
    """The one-line refusal of a `report_to` in a grpo:/sft: mapping (`where`), or None when it is fine or absent."""
    if "report_to" not in given:
        return None
    try:
        check_report_to(given["report_to"], where)
    except CrossrouteError as e:
        return str(e)
    return None


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def _callback_class() -> type:
    from transformers import TrainerCallback

    class StageLog(TrainerCallback):
        """TRL's log to a JSONL file (every process-zero `on_log`), and one progress line per stage."""

        def __init__(self, label: str, total: int, log_path: Path | None, show: bool = True) -> None:
            self.label, self.total, self.log_path, self.show = label, total, log_path, show
            self.fields: dict[str, str] = {}
            self._file: Any = None
            self._bar: Any = None
            self._task: Any = None
            self._t0 = time.perf_counter()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not state.is_world_process_zero:
                return
            self._t0 = time.perf_counter()
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.log_path.open("w", encoding="utf-8")  # a rerun retrains the stage from its start
            if self.show:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), console=console)
                self._bar.start()
                self._task = self._bar.add_task(self.label, total=self.total, metrics="")

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self._bar is not None:
                self._bar.update(self._task, completed=state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kw: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            if self._file is not None:
                row = {"step": state.global_step, "seconds": round(time.perf_counter() - self._t0, 3),
                       **{k: _json_value(v) for k, v in logs.items()}}
                self._file.write(json.dumps(row, default=str, allow_nan=False) + "\n")
                self._file.flush()
            for col in SHOWN:
                v = _number(logs.get(col))
                if v is not None:
                    self.fields[col] = f"{col} {v:.3g}"
            if self._bar is not None:
                self._bar.update(self._task, metrics="  ".join(self.fields.values()))

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self._bar is not None:
                self._bar.update(self._task, completed=state.global_step)
                self._bar.stop()
                self._bar = None
            if self._file is not None:
                self._file.close()
                self._file = None

    return StageLog


def _json_value(v: Any) -> Any:
    """Strict JSON: a non-finite float is null (crossroute's result convention)."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def stage_log(label: str, total_steps: int, log_path: Path | None, show: bool = True) -> Any:
    """The TrainerCallback for one stage (see module docstring)."""
    return _callback_class()(label, total_steps, log_path, show)


def quiet(trainer: Any) -> None:
    """Remove transformers' printers of raw log dictionaries (and its tqdm bar): StageLog shows the stage."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


@contextlib.contextmanager
def tracker_dirs(report_to: list[str], logs_dir: Path | None, label: str) -> Iterator[None]:
    """While a trainer is built, point tensorboard at RUN/logs/tensorboard/<label> (not the stage's scratch dir,
    which is removed once the stage is saved)."""
    if "tensorboard" not in report_to or logs_dir is None or "TENSORBOARD_LOGGING_DIR" in os.environ:
        yield
        return
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(logs_dir / "tensorboard" / label)
    try:
        yield
    finally:
        os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
