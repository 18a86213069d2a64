"""The report's section registry: each section renders one part of a run's results, or None when absent.

Users add sections with `@register_section("name", order)`; the report draws them in ascending order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from crossroute.core.rundir import RunDir

SectionFn = Callable[[RunDir], str | None]


@dataclass(frozen=True)
class Section:
    """A named renderer with its place in the page."""

    name: str
    order: int
    render: SectionFn


SECTIONS: dict[str, Section] = {}


def register_section(name: str, order: int) -> Callable[[SectionFn], SectionFn]:
    """Decorator: register `fn(run) -> html | None` as section `name` (a later registration replaces it)."""

    def deco(fn: SectionFn) -> SectionFn:
        SECTIONS[name] = Section(name, order, fn)
        return fn

    return deco


def ordered() -> list[Section]:
    return sorted(SECTIONS.values(), key=lambda s: (s.order, s.name))


def result_files(run: RunDir, prefix: str) -> Iterable[Path]:
    """results/<prefix>_*.json of a run, sorted."""
    return sorted(run.results.glob(f"{prefix}_*.json")) if run.results.exists() else []


def per_result(run: RunDir, prefix: str, render: Callable[[dict], str]) -> str | None:
    """Concatenated renderings of every results/<prefix>_*.json (one per domain), None when there is none."""
    parts = [render(r) for p in result_files(run, prefix) if (r := run.read_result(p.stem)) is not None]
    return "".join(parts) if parts else None
