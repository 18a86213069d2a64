"""Module-level gradient conflict (DESIGN.md §2.4): global cosine vs cosine per layer x module.

Modules come from the unit table (crossroute.model.units): every parameter inside a decoder layer whose
module label is a projection (q, k, v, o, gate, up, down; fused qkv, gate_up; MoE router, experts_gate_up,
experts_down) joins the module (layer, label). Norms and everything outside the layers are "other" tensors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from crossroute.core.rundir import RunDir, result_name
from crossroute.domains.domain import Domain
from crossroute.domains.files import get_domain
from crossroute.measure.proxy import gradient_and_loss
from crossroute.model.load import load_model, params_in_layers
from crossroute.model.units import UnitMap

# Column order of the layer x module matrix (module labels of crossroute.model.units); a label of a newly
# registered architecture that is not listed here follows, in order of appearance.
MODULE_KINDS: tuple[str, ...] = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "router",
                                 "experts_gate_up", "experts_down")
# Module labels that are not modules of the matrix: their tensors are reported one by one under "other".
NON_MODULE_LABELS: frozenset[str] = frozenset({"norm", "qk_norm", "other"})

ModuleOf = Callable[[str], tuple[int, str] | None]


@dataclass
class ModuleCosine:
    """Cosine of g_A and g_B restricted to one module (its weight and bias, if any)."""

    module: str
    layer: int
    kind: str
    cosine: float | None
    dot: float
    norm_a: float
    norm_b: float
    numel: int


@dataclass
class ConflictResult:
    """Global and per-module cosines of two gradients; the most conflicting/synergistic modules."""

    global_cosine: float | None
    norm_a: float
    norm_b: float
    modules: list[ModuleCosine]
    other: list[ModuleCosine]  # tensors outside the layer × module grid: norms, embeddings
    num_layers: int
    most_conflicting: str | None
    most_synergistic: str | None
    module_kinds: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    domain_a: str = ""
    domain_b: str = ""
    model: str = ""
    n: int = 0
    batch_size: int = 0
    loss_a: float | None = None
    loss_b: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def matrix(self) -> list[list[float | None]]:
        """Cosine per layer (rows) × module kind (columns, `module_kinds`); None where absent."""
        m: list[list[float | None]] = [[None] * len(self.module_kinds) for _ in range(self.num_layers)]
        for mc in self.modules:
            m[mc.layer][self.module_kinds.index(mc.kind)] = mc.cosine
        return m

    def dot_split(self) -> dict[str, float]:
        """Sum of positive and of negative per-module dot products (cancellation in g_A·g_B)."""
        dots = [m.dot for m in self.modules + self.other]
        return {"positive": sum(d for d in dots if d > 0),
                "negative": sum(d for d in dots if d < 0)}

    def to_json(self) -> dict[str, Any]:
        def pick(name: str | None) -> dict[str, Any] | None:
            mc = next((m for m in self.modules if m.module == name), None)
            return None if mc is None else {"module": mc.module, "layer": mc.layer, "kind": mc.kind,
                                             "cosine": mc.cosine}

        return {
            "domain_a": self.domain_a, "domain_b": self.domain_b, "model": self.model,
            "n": self.n, "batch_size": self.batch_size,
            "loss_a": self.loss_a, "loss_b": self.loss_b,
            "global_cosine": self.global_cosine, "norm_a": self.norm_a, "norm_b": self.norm_b,
            "dot_split": self.dot_split(), "module_kinds": list(self.module_kinds),
            "num_layers": self.num_layers, "matrix": self.matrix(),
            "most_conflicting": pick(self.most_conflicting),
            "most_synergistic": pick(self.most_synergistic),
            "modules": [asdict(m) for m in self.modules],
            "other": [asdict(m) for m in self.other],
            **({"meta": self.meta} if self.meta else {}),
        }


def _cos(dot: float, na2: float, nb2: float) -> float | None:
    if na2 <= 0 or nb2 <= 0:
        return None
    return max(-1.0, min(1.0, dot / math.sqrt(na2 * nb2)))


def module_cosines(gA: dict[str, torch.Tensor], gB: dict[str, torch.Tensor], module_of: ModuleOf,
                   num_layers: int | None = None) -> ConflictResult:
    """Global cosine over all shared parameters, and per module (layer, module label).

    `module_of(name)`: (layer, module label) of a parameter inside a decoder layer, else None; normally
    `UnitMap.of_model(model).module_of`. `num_layers`: rows of the matrix (default: up to the last module's)."""
    missing = sorted(set(gA) ^ set(gB))
    if missing:
        raise ValueError(f"gradients cover different parameters, e.g. {missing[0]!r}")
    sums: dict[tuple[int, str] | str, list[float]] = {}  # (layer, label) or "other" tensor -> [dot, |a|², |b|², n]
    stems: dict[tuple[int, str], list[str]] = {}
    for name in gA:
        a, b = gA[name].double().flatten(), gB[name].to(gA[name].device).double().flatten()
        where = module_of(name)
        key: tuple[int, str] | str = name
        if where is not None and where[1] not in NON_MODULE_LABELS:
            key = (int(where[0]), where[1])
            stem = name.removesuffix(".weight").removesuffix(".bias")
            if stem not in stems.setdefault(key, []):
                stems[key].append(stem)
        s = sums.setdefault(key, [0.0, 0.0, 0.0, 0])
        s[0] += float(a @ b)
        s[1] += float(a @ a)
        s[2] += float(b @ b)
        s[3] += a.numel()
    present = {k[1] for k in stems}
    kinds = [k for k in MODULE_KINDS if k in present] + sorted(present - set(MODULE_KINDS))
    modules, other = [], []
    for key, (dot, na2, nb2, numel) in sums.items():
        if isinstance(key, tuple):
            layer, kind = key
            names = stems[key]  # one tensor stem (weight + bias) per module, else the (layer, label) id
            module = names[0] if len(names) == 1 else f"L{layer}.{kind}"
        else:
            layer, kind, module = -1, "other", key
        mc = ModuleCosine(module, layer, kind, _cos(dot, na2, nb2), dot, math.sqrt(na2), math.sqrt(nb2), int(numel))
        (modules if isinstance(key, tuple) else other).append(mc)
    modules.sort(key=lambda m: (m.layer, kinds.index(m.kind)))
    dot = sum(s[0] for s in sums.values())
    na2 = sum(s[1] for s in sums.values())
    nb2 = sum(s[2] for s in sums.values())
    scored = [m for m in modules if m.cosine is not None]
    worst = min(scored, key=lambda m: m.cosine, default=None)  # type: ignore[arg-type, return-value]
    best = max(scored, key=lambda m: m.cosine, default=None)  # type: ignore[arg-type, return-value]
    layers = 1 + max((m.layer for m in modules), default=-1)
    return ConflictResult(
        global_cosine=_cos(dot, na2, nb2), norm_a=math.sqrt(na2), norm_b=math.sqrt(nb2),
        modules=modules, other=other,
        num_layers=max(layers, num_layers or 0),
        most_conflicting=worst.module if worst is not None else None,
        most_synergistic=best.module if best is not None else None,
        module_kinds=kinds,
    )


def unit_map(model: torch.nn.Module) -> UnitMap:
    """The model's UnitMap; an architecture the unit table does not know is refused (one-line CrossrouteError
    naming it and how to add it)."""
    with warnings.catch_warnings():  # the unknown-architecture warning becomes require()'s error
        warnings.simplefilter("ignore", UserWarning)
        umap = UnitMap.of_model(model)
    return umap.require(("neuron", "head"))


def run_conflict(
    model_path: str | Path,
    domain_a: Domain | str,
    domain_b: Domain | str,
    n: int = 64,
    batch_size: int = 16,
    run_dir: str | Path | None = None,
    seed: int = 0,
    split: str = "train",
    device: str | None = None,
    show_progress: bool = False,
    layers: Sequence[int] | None = None,
) -> ConflictResult:
    """g_A, g_B at `model_path` (fp32) and their cosines; writes results/conflict_{A}_{B}.json.

    `layers`: differentiate only these decoder layers' parameters (the rest are constants): the
    per-module cosines of those layers, and a global cosine over them, at a fraction of the memory."""
    da = get_domain(domain_a) if isinstance(domain_a, str) else domain_a
    db = get_domain(domain_b) if isinstance(domain_b, str) else domain_b
    loaded = load_model(model_path, dtype=torch.float32, device=device)
    model, tok = loaded.model, loaded.tokenizer
    umap = unit_map(model)
    from crossroute.measure.hvp import only_requires_grad

    names = params_in_layers(model, layers) if layers is not None else [n for n, _ in model.named_parameters()]
    with only_requires_grad(model, names):
        gA, loss_a = gradient_and_loss(model, tok, da, n, batch_size, seed, split, show_progress)
        gB, loss_b = gradient_and_loss(model, tok, db, n, batch_size, seed, split, show_progress)
    res = module_cosines(gA, gB, umap.module_of, umap.num_layers)
    res.domain_a, res.domain_b, res.model = da.name, db.name, str(loaded.path)
    res.n, res.batch_size, res.loss_a, res.loss_b = n, batch_size, loss_a, loss_b
    res.meta = {"split": split, "seed": seed, "loss": "mean NLL of reference answer tokens (+eos)",
                "layers": list(layers) if layers is not None else "all"}
    if run_dir is not None:
        RunDir(Path(run_dir)).write_result(conflict_result_name(da.name, db.name), res.to_json())
    return res


def conflict_result_name(a: str, b: str) -> str:
    """Result name (results/<name>.json) of a conflict run between domains a and b."""
    return result_name("conflict", a, b)
