"""Active routes (DESIGN.md §2.3): which units a domain's prompts actually use.

Hook sites come from the unit table (crossroute.model.units, `UnitMap.hook_module`), never from module-name
guesses. Streaming sums over non-pad tokens (never the activations themselves), per layer:

* "mlp_act" site, forward PRE-hook: its input is the MLP activation (one value per neuron) -> "L{l}.mlp",
  mean |activation| per neuron;
* "head_out" site, forward PRE-hook: its input is the concatenated head outputs (head h = columns
  [h*head_dim, (h+1)*head_dim), head_dim from the map's head layout) -> "L{l}.head", mean L2 norm per head;
* "router" site (MoE sparse layers, which have no per-neuron site), forward hook: softmax of its router
  logits -> "L{l}.router", mean routing probability per expert.

Unit ids are the table's: "L3.mlp.17" (neuron), "L0.head.2" (head), "L1.router.3" (router); KV groups
("L0.kv.1") are derived from the active heads (UnitMap.with_kv_groups).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from crossroute.analyze.diff import jaccard
from crossroute.core.console import progress_bar
from crossroute.core.errors import CrossrouteError
from crossroute.core.rundir import RunDir
from crossroute.domains.domain import Domain
from crossroute.domains.files import as_domains
from crossroute.measure.proxy import Batch, domain_examples, make_batches
from crossroute.model.load import default_device, load_model
from crossroute.model.units import KIND_OF_TAG, TAG, UnitMap, unit_id

KINDS: tuple[str, ...] = ("neuron", "head", "router")  # measured kinds (hook sites)
SET_KINDS: tuple[str, ...] = ("neuron", "head", "kv", "router")  # route-set kinds (kv derived from heads)
SITE_OF_KIND: dict[str, str] = {"neuron": "mlp_act", "head": "head_out", "router": "router"}
_KEY_RE = re.compile(r"^L(\d+)\.(mlp|head|router)$")
_STAGE_RE = re.compile(r"^\d+_(.+)$")

# ----------------------------------------------------------------------------- hook sites


def unit_map(model: PreTrainedModel) -> UnitMap:
    """The model's UnitMap, refusing (one-line CrossrouteError) an architecture the table does not know.

    The table's "unknown architecture" warning is not repeated: the error says the same and how to add it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        umap = UnitMap.of_model(model)
    return umap.require(("neuron", "head"))


def hook_plan(umap: UnitMap) -> list[tuple[int, str, str]]:
    """(layer, kind, module name) of every hook site, layer-major: per-neuron ("mlp_act") and per-head
    ("head_out") pre-hooks, and in MoE sparse layers the "router" forward hook (Qwen3-MoE's sparse layers have
    no mlp_act site: their fused experts have no per-expert down-projection module)."""
    plan: list[tuple[int, str, str]] = []
    for layer in range(umap.num_layers):
        for kind in KINDS:
            name = umap.hook_module(layer, SITE_OF_KIND[kind])
            if name is not None:
                plan.append((layer, kind, name))
    if not plan:
        raise CrossrouteError(f"model_type {umap.model_type!r} (table entry {umap.arch!r}) has no hook sites "
                              "(mlp_act, head_out, router) in crossroute's architecture table; add them with "
                              "crossroute.model.units.register_architecture(Arch(..., hooks=HookSites(...)))")
    return plan


def measured_kinds(umap: UnitMap, plan: list[tuple[int, str, str]] | None = None) -> dict[str, list[str]]:
    """Per layer "L{l}", the kinds measured there (in KINDS order); sparse MoE layers: head and router."""
    plan = hook_plan(umap) if plan is None else plan
    out: dict[str, list[str]] = {f"L{ly}": [] for ly in range(umap.num_layers)}
    for layer, kind, _ in plan:
        out[f"L{layer}"].append(kind)
    return out


def _expected_width(umap: UnitMap, layer: int, kind: str) -> int:
    lay = umap.head_layout
    if kind == "head":
        return lay.num_heads * lay.head_dim if lay is not None else 0
    return umap.counts["neuron" if kind == "neuron" else "router"][layer]


def _width_error(umap: UnitMap, name: str, kind: str, got: tuple[int, ...], want: int) -> CrossrouteError:
    what = {"neuron": f"{want} neurons (config.json intermediate_size / n_inner)",
            "head": "num_attention_heads x head_dim = " + (
                f"{umap.head_layout.num_heads} x {umap.head_layout.head_dim}" if umap.head_layout else "?"),
            "router": f"{want} experts (config.json num_experts)"}[kind]
    return CrossrouteError(f"{name}: hook tensor of shape {got}, but the unit table expects {what} for "
                           f"model_type {umap.model_type!r}; check config.json or the table entry {umap.arch!r}")


# ----------------------------------------------------------------------------- measurement


def activity_from_batches(
    model: PreTrainedModel, batches: list[Batch], show_progress: bool = False,
    label: str = "activity", umap: UnitMap | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Per-unit mean |activation| (neurons), mean L2 norm (heads), mean routing probability (MoE router,
    sparse layers) over non-pad tokens; and the token count.

    Keys "L{l}.mlp" [neurons of layer l], "L{l}.head" [num_heads], "L{l}.router" [num_experts], float32 on
    CPU, layer-major. Hook sites and head layout come from `umap` (default: UnitMap.of_model(model)).
    """
    umap = unit_map(model) if umap is None else umap.require(("neuron", "head"))
    plan = hook_plan(umap)
    head_dim = umap.head_layout.head_dim if umap.head_layout is not None else 0
    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor | None] = {"mask": None}
    sums: dict[str, torch.Tensor] = {}

    def add(key: str, s: torch.Tensor) -> None:
        sums[key] = sums[key] + s.double() if key in sums else s.double()

    def pre_hook(key: str, name: str, kind: str, want: int):
        def fn(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x, m = args[0], state["mask"]
            assert m is not None
            if x.shape[-1] != want or x.shape[:-1] != m.shape:
                raise _width_error(umap, name, kind, tuple(x.shape), want)
            x = x.detach().float()
            if kind == "neuron":
                add(key, torch.einsum("bl,bld->d", m, x.abs()))
            else:
                add(key, torch.einsum("bl,blh->h", m, x.unflatten(-1, (-1, head_dim)).norm(dim=-1)))

        return fn

    def router_hook(key: str, name: str, want: int):
        def fn(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            logits, m = (output[0] if isinstance(output, (tuple, list)) else output), state["mask"]
            assert m is not None
            logits = logits.detach().float().reshape(-1, logits.shape[-1])
            if logits.shape[-1] != want or logits.shape[0] != m.numel():
                raise _width_error(umap, name, "router", tuple(logits.shape), want)
            add(key, m.reshape(-1) @ torch.softmax(logits, dim=-1))

        return fn

    handles = []
    keys: list[str] = []
    try:
        for layer, kind, name in plan:
            module = modules.get(name)
            if module is None:
                raise CrossrouteError(f"hook site {name!r} ({SITE_OF_KIND[kind]}) of the unit table entry "
                                      f"{umap.arch!r} is not a module of this model; fix its HookSites")
            key = f"L{layer}.{TAG[kind]}"
            want = _expected_width(umap, layer, kind)
            if kind == "router":
                handles.append(module.register_forward_hook(router_hook(key, name, want)))
            else:
                handles.append(module.register_forward_pre_hook(pre_hook(key, name, kind, want)))
            keys.append(key)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        tokens = 0
        try:
            with torch.no_grad(), progress_bar(show_progress) as bar:
                task = bar.add_task(label, total=len(batches))
                for b in batches:
                    mask = b["attention_mask"].to(device)
                    state["mask"] = mask.float()
                    tokens += int(mask.sum())
                    model(input_ids=b["input_ids"].to(device), attention_mask=mask)
                    bar.update(task, advance=1)
        finally:
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    denom = max(tokens, 1)
    return {key: (sums[key] / denom).float().cpu() for key in keys if key in sums}, tokens


def measure_activity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    domain: Domain | str,
    n: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    split: str = "eval",
    show_progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Mean activity per unit on `n` prompt+reference-answer sequences of `domain` (see above)."""
    examples = domain_examples(domain, n, seed, split, need_answer=False)
    batches = make_batches(tokenizer, examples, batch_size, domain if isinstance(domain, Domain) else None)
    name = domain if isinstance(domain, str) else domain.name
    return activity_from_batches(model, batches, show_progress, f"routes {name}")[0]


# ----------------------------------------------------------------------------- sets and overlaps


def top_count(size: int, q: float) -> int:
    """How many of `size` units form the top-q %: ceil(size·q/100), at least 1, at most size."""
    return min(size, max(1, math.ceil(round(size * q / 100.0, 9))))


def active_sets(activity: dict[str, torch.Tensor], q: float = 10.0) -> dict[str, set[str]]:
    """Per layer, the top-q % units by activity (at least one; ties go to the lower index).

    Keys "neuron" and "head" always, "router" when router activity was measured."""
    out: dict[str, set[str]] = {"neuron": set(), "head": set()}
    for key, values in activity.items():
        m = _KEY_RE.match(key)
        if m is None:
            continue
        layer, kind = int(m.group(1)), KIND_OF_TAG[m.group(2)]
        v = torch.as_tensor(values, dtype=torch.float64).flatten()
        if v.numel() == 0:
            continue
        idx = torch.sort(v, descending=True, stable=True).indices[: top_count(v.numel(), q)]
        out.setdefault(kind, set()).update(unit_id(layer, kind, int(j)) for j in idx)
    return out


def set_kinds(sets: dict[str, dict[str, set[str]]]) -> list[str]:
    """The kinds (SET_KINDS order) with a non-empty set in some domain: the kinds that were measured."""
    return [k for k in SET_KINDS if any(s.get(k) for s in sets.values())]


def overlap_matrix(sets: dict[str, dict[str, set[str]]]) -> dict[str, list[list[float]]]:
    """Jaccard matrix across domains (in the dict's order) of their active sets, per measured kind."""
    names = list(sets)
    return {kind: [[jaccard(sets[a].get(kind, set()), sets[b].get(kind, set())) for b in names] for a in names]
            for kind in set_kinds(sets)}


def route_overlap(
    activities: dict[str, dict[str, torch.Tensor]], q: float = 10.0
) -> dict[str, list[list[float]]]:
    """Jaccard matrix across domains of their top-q % active sets, per measured kind."""
    return overlap_matrix({d: active_sets(a, q) for d, a in activities.items()})


def layer_overlap(sets: dict[str, dict[str, set[str]]], num_layers: int
                  ) -> dict[str, dict[str, list[float | None]]]:
    """Per kind and domain pair "A|B", the Jaccard of the active sets within each layer (None where the kind
    was not measured in that layer, e.g. neurons of a sparse MoE layer)."""
    out: dict[str, dict[str, list[float | None]]] = {}
    for kind in set_kinds(sets):
        per = {d: _by_layer(s.get(kind, set()), num_layers) for d, s in sets.items()}
        present = [any(per[d][i] for d in per) for i in range(num_layers)]
        out[kind] = {f"{a}|{b}": [jaccard(per[a][i], per[b][i]) if present[i] else None
                                  for i in range(num_layers)] for a, b in combinations(sets, 2)}
    return out


def _by_layer(ids: set[str], num_layers: int) -> list[set[str]]:
    out: list[set[str]] = [set() for _ in range(num_layers)]
    for u in ids:
        layer = int(u[1:u.index(".")])
        if layer < num_layers:
            out[layer].add(u)
    return out


@dataclass
class ChangedActiveOverlap:
    """Overlap of a top-changed unit set with an active set."""

    jaccard: float
    intersection: int
    n_changed: int
    n_active: int
    share_of_changed: float | None  # |changed ∩ active| / |changed|


def changed_vs_active(top_changed: set[str], active: set[str]) -> ChangedActiveOverlap:
    """Jaccard and |changed ∩ active| / |changed| of a top-changed set and an active set."""
    inter = len(top_changed & active)
    share = inter / len(top_changed) if top_changed else None
    return ChangedActiveOverlap(jaccard(top_changed, active), inter, len(top_changed), len(active),
                                share)


def top_changed_sets(diff_json: dict[str, Any]) -> dict[str, dict[str, set[str]]]:
    """Per stage name, the top-changed unit sets of a results/diff.json (sequence or single)."""
    stages = diff_json.get("stages")
    if stages is None:
        stages, names = [diff_json], [Path(str(diff_json.get("ckpt", "update"))).name]
    else:
        names = diff_json.get("stage_names") or [Path(str(s.get("ckpt", i))).name
                                                 for i, s in enumerate(stages)]
    return {name: {k: set(v) for k, v in (s.get("top_units") or {}).items()}
            for name, s in zip(names, stages, strict=True)}


def stage_domain(stage: str) -> str:
    """The domain a stage name refers to ("01_math" -> "math"); the name itself otherwise."""
    m = _STAGE_RE.match(stage)
    return m.group(1) if m else stage


def changed_vs_active_table(
    changed: dict[str, dict[str, set[str]]], active: dict[str, dict[str, set[str]]]
) -> list[dict[str, Any]]:
    """One row per (stage, domain, kind) with both a top-changed and a measured active set of that kind."""
    kinds = set_kinds(active)
    rows = []
    for stage, by_kind in changed.items():
        for dom, sets in active.items():
            for kind in kinds:
                if kind not in by_kind:
                    continue
                ov = changed_vs_active(by_kind[kind], sets.get(kind, set()))
                rows.append({"stage": stage, "domain": dom, "kind": kind,
                             "own": stage_domain(stage) == dom, **asdict(ov)})
    return rows


# ----------------------------------------------------------------------------- run


@dataclass
class RoutesResult:
    """Active routes of several domains at one checkpoint; `to_json()` is results/routes.json.

    `measured`: per layer "L{l}", the kinds measured there (sparse MoE layers: "head", "router"; no
    per-neuron activity). `kinds`: the route-set kinds in `active`/`jaccard` ("kv" = groups of active
    heads). `units`: the UnitMap summary (UnitMap.to_json()).
    """

    model: str
    domains: list[str]
    n: int
    q: float
    split: str
    seed: int
    batch_size: int
    layout: dict[str, int]
    tokens: dict[str, int]
    activity: dict[str, dict[str, list[float]]]
    active: dict[str, dict[str, list[str]]]
    jaccard: dict[str, list[list[float]]]
    layer_jaccard: dict[str, dict[str, list[float | None]]]
    changed_vs_active: list[dict[str, Any]] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    measured: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    units: dict[str, Any] = field(default_factory=dict)

    def active_sets(self) -> dict[str, dict[str, set[str]]]:
        """Per domain and kind, the active unit ids as sets."""
        return {d: {k: set(v) for k, v in s.items()} for d, s in self.active.items()}

    def to_json(self, include_activity: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not include_activity:
            out.pop("activity")
        return out


def _natural(u: str) -> tuple[int, str, int]:
    layer, tag, idx = u.split(".")
    return int(layer[1:]), tag, int(idx)


def _nonempty(domains: list[Domain]) -> list[Domain]:
    if not domains:
        raise CrossrouteError("no domains given; pass e.g. --domains math,code,qa,cw.")
    return domains


def _layout(umap: UnitMap, measured: dict[str, list[str]]) -> dict[str, int]:
    lay = umap.head_layout
    neurons = [n for i, n in enumerate(umap.counts["neuron"]) if "neuron" in measured.get(f"L{i}", [])]
    experts = [n for i, n in enumerate(umap.counts["router"]) if "router" in measured.get(f"L{i}", [])]
    return {"num_layers": umap.num_layers, "intermediate_size": neurons[0] if neurons else 0,
            "num_heads": lay.num_heads if lay else 0, "num_kv_heads": lay.num_kv_heads if lay else 0,
            "head_dim": lay.head_dim if lay else 0, "num_experts": experts[0] if experts else 0}


def _notes(measured: dict[str, list[str]]) -> list[str]:
    sparse = [lay for lay, kinds in measured.items() if "router" in kinds and "neuron" not in kinds]
    missing = {k: [lay for lay, kinds in measured.items() if k not in kinds] for k in ("neuron", "head")}
    out = []
    if sparse:
        out.append(f"{', '.join(sparse)}: MoE sparse layers without a per-neuron hook site: no per-neuron "
                   "activity; expert activity = mean routing probability (router kind)")
    for kind, layers in missing.items():
        other = [x for x in layers if x not in sparse]
        if other:
            out.append(f"{', '.join(other)}: no {SITE_OF_KIND[kind]} hook site in the unit table: no {kind} activity")
    return out


def run_routes(
    model_path: str | Path,
    domains: str | Sequence[str | Domain],
    n: int = 64,
    q: float = 10.0,
    run_dir: str | Path | None = None,
    batch_size: int = 16,
    seed: int = 0,
    split: str = "eval",
    device: str | None = None,
    show_progress: bool = False,
) -> RoutesResult:
    """Measure every domain's activity at one checkpoint; active sets, overlaps -> routes.json.

    When RUN_DIR/results/diff.json exists, each stage's top-changed units are compared with the
    active sets (changed_vs_active rows).
    """
    if not 0 < q <= 100:
        raise CrossrouteError(f"--q {q}: the active share must be in (0, 100] percent.")
    doms = _nonempty(as_domains(domains))
    dev = default_device(device)
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    loaded = load_model(model_path, dtype=dtype, device=dev)
    umap = unit_map(loaded.model)
    measured = measured_kinds(umap)
    activity: dict[str, dict[str, torch.Tensor]] = {}
    tokens: dict[str, int] = {}
    for d in doms:
        ex = domain_examples(d, n, seed, split, need_answer=False)
        batches = make_batches(loaded.tokenizer, ex, batch_size, d)
        activity[d.name], tokens[d.name] = activity_from_batches(
            loaded.model, batches, show_progress, f"routes {d.name}", umap=umap)
    sets = {d: umap.with_kv_groups(active_sets(a, q)) for d, a in activity.items()}
    kinds = set_kinds(sets)
    res = RoutesResult(
        model=str(loaded.path), domains=[d.name for d in doms], n=n, q=q, split=split, seed=seed,
        batch_size=batch_size, layout=_layout(umap, measured), tokens=tokens,
        activity={d: {k: v.tolist() for k, v in a.items()} for d, a in activity.items()},
        active={d: {k: sorted(s.get(k, set()), key=_natural) for k in kinds} for d, s in sets.items()},
        jaccard=overlap_matrix(sets), layer_jaccard=layer_overlap(sets, umap.num_layers),
        kinds=kinds, measured=measured, notes=_notes(measured), units=umap.to_json())
    if run_dir is not None:
        run = RunDir(Path(run_dir))
        diff_json = run.read_result("diff")
        if diff_json is not None:
            res.changed_vs_active = changed_vs_active_table(top_changed_sets(diff_json), sets)
        run.write_result("routes", res.to_json())
    return res
