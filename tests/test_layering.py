"""The package's layering, checked on its source (AST): imports point down only, no import cycles, and no
module imports another module's private (underscore) names. Lazy imports inside functions count too."""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "crossroute"

# Bottom to top: a module may import its own layer and the layers below it.
LAYERS: tuple[str, ...] = ("core", "io", "model", "domains", "measure", "train", "analyze", "repair", "report",
                           "experiments", "cli")
TOP = len(LAYERS)  # crossroute/__init__.py and __main__.py sit above every layer


@dataclass(frozen=True)
class Violation:
    """One broken rule: `kind` is 'upward', 'cycle', 'private' or 'unlayered'."""

    kind: str
    module: str
    detail: str


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str, pkg: str) -> int | None:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__main__",):
        return TOP
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def imports_of(path: Path, module: str, pkg: str) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) for every import of `pkg`, at any depth of the file."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == pkg]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == pkg:
                out.append((target, [a.name for a in node.names]))
    return out


def check_layering(root: Path) -> list[Violation]:
    """All violations of the three rules in the package at `root`."""
    pkg = root.name
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in files}
    found: list[Violation] = []
    for mod, path in files.items():
        here = layer_of(mod, pkg)
        if here is None:
            found.append(Violation("unlayered", mod, f"{mod} is in no layer of {LAYERS}"))
            continue
        for target, names in imports_of(path, mod, pkg):
            # `from pkg.sub import mod` imports a module; `from pkg.mod import name` imports a name
            mods = [f"{target}.{n}" for n in names if f"{target}.{n}" in files] or [target]
            for t in mods:
                if t not in files and t + ".__init__" not in files:
                    continue
                there = layer_of(t, pkg)
                if there is not None and there > here:
                    found.append(Violation("upward", mod, f"{mod} (layer {LAYERS[here] if here < TOP else 'top'}) "
                                                          f"imports {t} (layer {LAYERS[there]})"))
                if t != mod:
                    graph[mod].add(t)
            if target in files and target != mod:
                for n in names:
                    if n.startswith("_") and not n.startswith("__"):
                        found.append(Violation("private", mod, f"{mod} imports private {n} from {target}"))
    found += [Violation("cycle", c[0], " -> ".join(c)) for c in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One representative cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_package_is_layered() -> None:
    found = check_layering(PACKAGE)
    assert not found, "\n".join(f"{v.kind}: {v.detail}" for v in found)


@pytest.fixture()
def copy(tmp_path: Path) -> Path:
    dest = tmp_path / "crossroute"
    shutil.copytree(PACKAGE, dest, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    assert check_layering(dest) == []
    return dest


def plant(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {line}\n")


def test_planted_upward_import_fails(copy: Path) -> None:
    plant(copy / "core" / "errors.py", "from crossroute.report.build import build_report")
    kinds = {(v.kind, v.module) for v in check_layering(copy)}
    assert ("upward", "crossroute.core.errors") in kinds


def test_planted_relative_upward_import_fails(copy: Path) -> None:
    plant(copy / "model" / "load.py", "from ..analyze import diff")
    found = check_layering(copy)
    assert any(v.kind == "upward" and "crossroute.analyze.diff" in v.detail for v in found)


def test_planted_cycle_fails(copy: Path) -> None:
    plant(copy / "core" / "atomic.py", "from crossroute.core import rundir")  # rundir imports atomic
    found = check_layering(copy)
    assert [v for v in found if v.kind == "cycle"] == [
        Violation("cycle", "crossroute.core.atomic", "crossroute.core.atomic -> crossroute.core.rundir")]


def test_planted_private_import_fails(copy: Path) -> None:
    (copy / "core" / "secret.py").write_text("_hidden = 1\n")
    plant(copy / "core" / "rundir.py", "from crossroute.core.secret import _hidden")
    assert [v.kind for v in check_layering(copy)] == ["private"]


def test_unlayered_subpackage_fails(copy: Path) -> None:
    (copy / "misc").mkdir()
    (copy / "misc" / "__init__.py").write_text("")
    assert [v.kind for v in check_layering(copy)] == ["unlayered"]
