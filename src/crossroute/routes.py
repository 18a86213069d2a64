"""Active routes (DESIGN.md §2.3): which units a domain's prompts actually use.

Forward pre-hooks on every layer's `mlp.down_proj` (input = act(gate)·up, one value per neuron)
and `self_attn.o_proj` (input = concatenated head outputs) keep streaming sums over non-pad
tokens, never the activations themselves. Unit ids match crossroute.diff: "L3.mlp.17" (neuron),
"L0.head.2" (head).
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .diff import jaccard
from .domains import Domain, parse_domains
from .errors import CrossrouteError
from .gradients import Batch, domain_examples, make_batches
from .model import default_device, load_model
from .progress import progress_bar
from .rundir import RunDir

KINDS: tuple[str, ...] = ("neuron", "head")
_TAG = {"neuron": "mlp", "head": "head"}
_KIND_OF_TAG = {v: k for k, v in _TAG.items()}
_DOWN_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.down_proj$")
_O_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.o_proj$")
_KEY_RE = re.compile(r"^L(\d+)\.(mlp|head)$")
_STAGE_RE = re.compile(r"^\d+_(.+)$")


# ----------------------------------------------------------------------------- measurement


def head_dim_of(config: Any) -> int:
    """Attention head dimension from a (text) config: head_dim, else hidden_size / num_heads."""
    cfg = getattr(config, "text_config", None) or config
    hd = getattr(cfg, "head_dim", None)
    return int(hd) if hd else int(cfg.hidden_size) // int(cfg.num_attention_heads)


def activity_from_batches(
    model: PreTrainedModel, batches: list[Batch], show_progress: bool = False,
    label: str = "activity",
) -> tuple[dict[str, torch.Tensor], int]:
    """Per-unit mean |activation| (neurons) / mean L2 norm (heads) over non-pad tokens; token count.

    Keys "L{l}.mlp" (shape [intermediate]) and "L{l}.head" (shape [num_heads]), float32 on CPU.
    """
    head_dim = head_dim_of(model.config)
    state: dict[str, torch.Tensor | None] = {"mask": None}
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def mlp_hook(key: str):
        def fn(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x, m = args[0], state["mask"]
            assert m is not None
            s = torch.einsum("bl,bld->d", m, x.detach().float().abs())
            sums[key] = sums[key] + s.double() if key in sums else s.double()

        return fn

    def head_hook(key: str):
        def fn(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x, m = args[0], state["mask"]
            assert m is not None
            if x.shape[-1] % head_dim:
                raise CrossrouteError(f"{key}: o_proj input width {x.shape[-1]} is not a multiple "
                                      f"of head_dim {head_dim}; check head_dim in config.json.")
            norms = x.detach().float().unflatten(-1, (-1, head_dim)).norm(dim=-1)
            s = torch.einsum("bl,blh->h", m, norms)
            sums[key] = sums[key] + s.double() if key in sums else s.double()

        return fn

    order: list[tuple[int, int, str]] = []
    for name, module in model.named_modules():
        if md := _DOWN_RE.search(name):
            key = f"L{md.group(1)}.mlp"
            handles.append(module.register_forward_pre_hook(mlp_hook(key)))
            order.append((int(md.group(1)), 0, key))
        elif mo := _O_RE.search(name):
            key = f"L{mo.group(1)}.head"
            handles.append(module.register_forward_pre_hook(head_hook(key)))
            order.append((int(mo.group(1)), 1, key))
    if not handles:
        raise CrossrouteError("no layers.N.mlp.down_proj / layers.N.self_attn.o_proj modules "
                              "found; routes need a Qwen/Llama-style decoder.")
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
        for h in handles:
            h.remove()
        model.train(was_training)
    denom = max(tokens, 1)
    return {key: (sums[key] / denom).float().cpu() for _, _, key in sorted(order)
            if key in sums}, tokens


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
    batches = make_batches(tokenizer, examples, batch_size)
    name = domain if isinstance(domain, str) else domain.name
    return activity_from_batches(model, batches, show_progress, f"routes {name}")[0]


# ----------------------------------------------------------------------------- sets and overlaps


def unit_id(layer: int, kind: str, index: int) -> str:
    """Unit id as crossroute.diff names it: L{layer}.mlp.{j} or L{layer}.head.{h}."""
    return f"L{layer}.{_TAG[kind]}.{index}"


def top_count(size: int, q: float) -> int:
    """How many of `size` units form the top-q %: ceil(size·q/100), at least 1, at most size."""
    return min(size, max(1, math.ceil(round(size * q / 100.0, 9))))


def active_sets(activity: dict[str, torch.Tensor], q: float = 10.0) -> dict[str, set[str]]:
    """Per layer, the top-q % units by activity (at least one; ties go to the lower index)."""
    out: dict[str, set[str]] = {k: set() for k in KINDS}
    for key, values in activity.items():
        m = _KEY_RE.match(key)
        if m is None:
            continue
        layer, kind = int(m.group(1)), _KIND_OF_TAG[m.group(2)]
        v = torch.as_tensor(values, dtype=torch.float64).flatten()
        if v.numel() == 0:
            continue
        idx = torch.sort(v, descending=True, stable=True).indices[: top_count(v.numel(), q)]
        out[kind].update(unit_id(layer, kind, int(j)) for j in idx)
    return out


def overlap_matrix(sets: dict[str, dict[str, set[str]]]) -> dict[str, list[list[float]]]:
    """Jaccard matrix across domains (in the dict's order) of their active sets, per kind."""
    names = list(sets)
    return {kind: [[jaccard(sets[a][kind], sets[b][kind]) for b in names] for a in names]
            for kind in KINDS}


def route_overlap(
    activities: dict[str, dict[str, torch.Tensor]], q: float = 10.0
) -> dict[str, list[list[float]]]:
    """Jaccard matrix across domains of their top-q % active sets, per kind ("neuron", "head")."""
    return overlap_matrix({d: active_sets(a, q) for d, a in activities.items()})


def layer_overlap(sets: dict[str, dict[str, set[str]]], num_layers: int
                  ) -> dict[str, dict[str, list[float]]]:
    """Per kind and domain pair "A|B", the Jaccard of the active sets within each layer."""
    out: dict[str, dict[str, list[float]]] = {k: {} for k in KINDS}
    for kind in KINDS:
        per = {d: _by_layer(s[kind], num_layers) for d, s in sets.items()}
        for a, b in combinations(sets, 2):
            out[kind][f"{a}|{b}"] = [jaccard(per[a][i], per[b][i]) for i in range(num_layers)]
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
    """One row per (stage, domain, kind): overlap of the stage's top-changed set with the routes."""
    rows = []
    for stage, kinds in changed.items():
        for dom, sets in active.items():
            for kind in KINDS:
                if kind not in kinds:
                    continue
                ov = changed_vs_active(kinds[kind], sets[kind])
                rows.append({"stage": stage, "domain": dom, "kind": kind,
                             "own": stage_domain(stage) == dom, **asdict(ov)})
    return rows


# ----------------------------------------------------------------------------- run


@dataclass
class RoutesResult:
    """Active routes of several domains at one checkpoint; `to_json()` is results/routes.json."""

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
    layer_jaccard: dict[str, dict[str, list[float]]]
    changed_vs_active: list[dict[str, Any]] = field(default_factory=list)

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


def _resolve_domains(domains: str | Sequence[str | Domain]) -> list[Domain]:
    if isinstance(domains, str):
        return parse_domains(domains)
    out = [d if isinstance(d, Domain) else parse_domains([d])[0] for d in domains]
    if not out:
        raise CrossrouteError("no domains given; pass e.g. --domains math,code,qa,cw.")
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
    doms = _resolve_domains(domains)
    dev = default_device(device)
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    loaded = load_model(model_path, dtype=dtype, device=dev)
    activity: dict[str, dict[str, torch.Tensor]] = {}
    tokens: dict[str, int] = {}
    for d in doms:
        ex = domain_examples(d, n, seed, split, need_answer=False)
        batches = make_batches(loaded.tokenizer, ex, batch_size)
        activity[d.name], tokens[d.name] = activity_from_batches(
            loaded.model, batches, show_progress, f"routes {d.name}")
    sets = {d: active_sets(a, q) for d, a in activity.items()}
    first = next(iter(activity.values()))
    num_layers = 1 + max(int(_KEY_RE.match(k).group(1)) for k in first)  # type: ignore[union-attr]
    mlp = [v for k, v in first.items() if k.endswith(".mlp")]
    heads = [v for k, v in first.items() if k.endswith(".head")]
    layout = {"num_layers": num_layers, "intermediate_size": int(mlp[0].numel()) if mlp else 0,
              "num_heads": int(heads[0].numel()) if heads else 0,
              "head_dim": head_dim_of(loaded.model.config)}
    res = RoutesResult(
        model=str(loaded.path), domains=[d.name for d in doms], n=n, q=q, split=split, seed=seed,
        batch_size=batch_size, layout=layout, tokens=tokens,
        activity={d: {k: v.tolist() for k, v in a.items()} for d, a in activity.items()},
        active={d: {k: sorted(s[k], key=_natural) for k in KINDS} for d, s in sets.items()},
        jaccard=overlap_matrix(sets), layer_jaccard=layer_overlap(sets, num_layers))
    if run_dir is not None:
        run = RunDir(Path(run_dir))
        diff_json = run.read_result("diff")
        if diff_json is not None:
            res.changed_vs_active = changed_vs_active_table(top_changed_sets(diff_json), sets)
        run.write_result("routes", res.to_json())
    return res


# ----------------------------------------------------------------------------- render


def _mean_off_diagonal(m: list[list[float]]) -> float | None:
    vals = [m[i][j] for i in range(len(m)) for j in range(len(m)) if i != j]
    return sum(vals) / len(vals) if vals else None


def render_routes_section(results: dict, diff: dict | None = None) -> str:
    """HTML <section>: active-set Jaccard across domains, per layer, and changed-vs-active."""
    from .plots import heatmap

    doms: list[str] = results["domains"]
    q = results.get("q", 10.0)
    tokens = results.get("tokens", {})
    n, split = html.escape(str(results.get("n", ""))), html.escape(str(results.get("split", "")))
    parts = ["<section class=\"routes\"><h2>Active routes</h2>",
             f"<p>A unit is <i>active</i> for a domain when it is in the top {q:g} % of its layer "
             "by mean |activation| (MLP neuron: input of <code>down_proj</code>) or mean output "
             "norm (attention head: its <code>o_proj</code> input slice), over "
             f"{n} {split} prompts followed by their reference answers (tokens: "
             + ", ".join(f"{html.escape(d)} {tokens.get(d, 0)}" for d in doms) + ").</p>"]
    jac = results.get("jaccard", {})
    summary = []
    for kind in KINDS:
        if kind in jac and len(doms) > 1:
            mean = _mean_off_diagonal(jac[kind])
            summary.append(f"{kind}s {mean:.2f}" if mean is not None else kind)
    if summary:
        base = [f"{kind}s {p / (2 - p):.2f}" for kind in KINDS
                if (p := _active_share(results, kind)) is not None]
        parts.append("<p>Mean active-set Jaccard across domain pairs: " + ", ".join(summary)
                     + " (two random sets of the same sizes: " + ", ".join(base) + ").</p>")
    for kind in KINDS:
        if kind in jac:
            parts.append(heatmap(jac[kind], doms, doms,
                                 f"Jaccard of active {kind} sets (top {q:g} %)"))
    lj = results.get("layer_jaccard", {})
    for kind in KINDS:
        pairs = lj.get(kind) or {}
        if pairs:
            names = list(pairs)
            n_layers = len(next(iter(pairs.values())))
            matrix = [[pairs[p][i] for p in names] for i in range(n_layers)]
            parts.append(heatmap(matrix, [f"L{i}" for i in range(n_layers)],
                                 [p.replace("|", " / ") for p in names],
                                 f"per-layer Jaccard of active {kind} sets"))
    rows = results.get("changed_vs_active") or []
    if not rows and diff is not None:
        active = {d: {k: set(v) for k, v in s.items()} for d, s in results["active"].items()}
        rows = changed_vs_active_table(top_changed_sets(diff), active)
    if rows:
        parts.append(_changed_table(rows, {k: _active_share(results, k) for k in KINDS}))
    parts.append("</section>")
    return "\n".join(parts)


def _active_share(results: dict, kind: str) -> float | None:
    """Share of a layer's units that are active (top_count / size), from the stored layout."""
    layout = results.get("layout") or {}
    size = layout.get("intermediate_size" if kind == "neuron" else "num_heads") or 0
    return top_count(size, results.get("q", 10.0)) / size if size else None


def _changed_table(rows: list[dict[str, Any]], share: dict[str, float | None]) -> str:
    def f(v: Any) -> str:
        return "–" if v is None else f"{v:.3f}"

    body = "".join(
        ("<tr style=\"font-weight:bold\">" if r["own"] else "<tr>")
        + f"<td>{html.escape(r['stage'])}</td><td>{html.escape(r['domain'])}</td>"
        f"<td>{r['kind']}</td><td>{r['n_changed']}</td><td>{r['n_active']}</td>"
        f"<td>{r['intersection']}</td><td>{f(r['share_of_changed'])}</td>"
        f"<td>{f(r['jaccard'])}</td></tr>" for r in rows)
    return ("<h3>Top-changed units vs active routes</h3>"
            "<p>For each stage's top-changed units (from the update anatomy) and each domain's "
            "active set: |changed ∩ active| / |changed| (for random units: "
            + ", ".join(f"{k}s {v:.2f}" for k, v in share.items() if v is not None)
            + ") and the Jaccard. Bold: the stage's own domain.</p>"
            "<table><thead><tr><th>stage</th><th>domain</th><th>kind</th><th>|changed|</th>"
            "<th>|active|</th><th>|∩|</th><th>|∩|/|changed|</th><th>Jaccard</th></tr></thead>"
            f"<tbody>{body}</tbody></table>")
