"""Config files: read a YAML mapping and validate it with pydantic, errors naming the file and the field."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError

from crossroute.core.errors import CrossrouteError

M = TypeVar("M", bound=BaseModel)

# The most held-out prompts per domain one evaluation draws: a generated domain's draw must exhaust its strata to
# give more (minutes to hours), and more than this is a typo far more often than a plan.
MAX_EVAL_N = 10_000
# The most training prompts per stage (a generated domain's train draw stalls near its pool size).
MAX_TRAIN_PROMPTS = 100_000

EvalN = Annotated[int, Field(gt=0, le=MAX_EVAL_N, description=f"held-out prompts per domain (1..{MAX_EVAL_N})")]


def load_yaml_mapping(path: str | Path, example: str, top_level: str) -> dict[str, Any]:
    """The YAML file at `path` as a mapping; `example` names a shipped config to copy from."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CrossrouteError(f"{path}: no such config file; see {example} for an example.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise CrossrouteError(f"{path}: invalid YAML ({str(e).splitlines()[0]}).") from None
    except UnicodeDecodeError:
        raise CrossrouteError(f"{path}: not UTF-8 text; a config is a YAML file.") from None
    except RecursionError:
        raise CrossrouteError(f"{path}: nested too deeply to read; flatten the YAML.") from None
    if not isinstance(raw, dict):
        raise CrossrouteError(f"{path}: expected a mapping ({top_level}, ...) at the top level.")
    return raw


def yaml_number(number: float) -> str:
    """`number` as YAML 1.1 reads it as a number: an integer, or a float with a dot and a signed exponent."""
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    text = repr(number)
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    return f"{mantissa if '.' in mantissa else mantissa + '.0'}e{int(exponent):+03d}"


def yaml_number_hint(value: Any) -> str:
    """'; YAML reads ... as text, write 1.0e-05' when `value` is text that reads as a number (YAML 1.1 takes
    1e-5, without a dot, as a string)."""
    if not isinstance(value, str):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    if not math.isfinite(number):
        return ""
    return f"; YAML reads {value!r} as text, write {yaml_number(number)}"


def _error_line(err: Mapping[str, Any]) -> str:
    """One pydantic error as 'field LOC: what is wrong (got VALUE)[; the fix]'."""
    loc = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        msg = "unknown field (typo?); see the shipped example config for the fields"
    elif err["type"] == "missing":
        msg = "required; add it"
    elif isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 60):
        msg += f" (got {value!r}){yaml_number_hint(value)}"
    return f"field {loc}: {msg}" if loc else msg


def validate_config(cls: type[M], raw: dict[str, Any], where: str, domains_field: str) -> M:
    """`cls` validated from `raw`; the first error becomes one line naming `where`, the field and the value."""
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise CrossrouteError(f"{where}: {_error_line(e.errors()[0])}") from None
    except CrossrouteError as e:  # a domain spec that does not resolve
        raise CrossrouteError(f"{where}: field {domains_field}: {e}") from None
    except RecursionError:
        raise CrossrouteError(f"{where}: nested too deeply to validate; flatten the config.") from None


def check_count(value: int, where: str, most: int, what: str) -> None:
    """Refuse a count above `most` (a size that would run for hours or exhaust memory), naming `where`."""
    if value > most:
        raise CrossrouteError(f"{where}: {value} {what} is more than the {most} crossroute draws; give at most "
                              f"{most}.")


def _numeric_kind(annotation: Any) -> type | None:
    """int or float when a dataclass field is annotated as that number (or it or None), else None (unchecked)."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (
        annotation,)
    numbers = [a for a in args if a is not type(None)]
    return numbers[0] if len(numbers) == 1 and numbers[0] in (int, float) else None


def check_numeric_fields(cls: type, values: Mapping[str, Any], where: str, positive: Collection[str] = (),
                         nonnegative: Collection[str] = ()) -> None:
    """Refuse a value for a numeric field of dataclass `cls` (e.g. TRL's GRPOConfig, which checks no types) that is
    not a finite number of the field's kind, or not > 0 (`positive`) / >= 0 (`nonnegative`); `where` names the
    mapping, e.g. 'train.yaml: field grpo'."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        f = fields.get(key)
        kind = _numeric_kind(f.type) if f is not None else None
        if kind is None or value is None:
            continue
        default = f.default if isinstance(f.default, int | float) and not isinstance(f.default, bool) else 1
        fix = yaml_number_hint(value) or f"; write a number like {yaml_number(float(default))}"
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not is_number or (kind is int and not isinstance(value, int)):
            raise CrossrouteError(f"{where}.{key}: {value!r} is not {'an integer' if kind is int else 'a number'}"
                                  f"{fix}.")
        if not math.isfinite(value):
            raise CrossrouteError(f"{where}.{key}: {value!r} is not a finite number{fix}.")
        if key in positive and value <= 0:
            raise CrossrouteError(f"{where}.{key}: {value!r} must be greater than 0{fix}.")
        if key in nonnegative and value < 0:
            raise CrossrouteError(f"{where}.{key}: {value!r} must not be negative{fix}.")


def parse_numbers(text: str, flag: str, cast: Callable[[str], Any], what: str, example: str) -> list[Any]:
    """'1,2,4' as [cast('1'), ...] (blanks skipped); a one-line error naming `flag`, `what` it takes and an
    `example` otherwise."""
    try:
        return [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CrossrouteError(f"{flag} {text!r}: give {what} separated by commas, e.g. {example}.") from None


def parse_layers(spec: str, flag: str = "--layers") -> list[int]:
    """'28-35,40' -> [28, ..., 35, 40]: decoder-layer indices (sorted, unique) from a CLI range list."""
    out: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise CrossrouteError(f"{flag} {spec!r}: {part!r} is not a layer index or range; write e.g. "
                                  "28-35 or 0,4,8.") from None
        if a < 0 or b < a:
            raise CrossrouteError(f"{flag} {spec!r}: range {part!r} is empty or negative; write LOW-HIGH with "
                                  "0 <= LOW <= HIGH.")
        out.update(range(a, b + 1))
    return sorted(out)


def build_dataclass_config(cls: type, kw: dict[str, Any], where: str, hint: str) -> Any:
    """`cls(**kw)` for a library's dataclass config (TRL's GRPOConfig/SFTConfig, PEFT's LoraConfig): an unknown field
    or the library's own validation error becomes one line naming `where.field` (`hint` follows an unknown field)."""
    unknown = sorted(set(kw) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise CrossrouteError(f"{where}.{unknown[0]}: not a field of {cls.__name__} ({hint}).")
    try:
        return cls(**kw)
    except (ValueError, TypeError) as e:
        raise CrossrouteError(f"{where}: {str(e).splitlines()[0]}") from None
