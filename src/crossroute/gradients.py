"""Module-level gradient conflict between two domains at one checkpoint (DESIGN.md §2.4).

g_A, g_B are gradients of each domain's proxy loss (mean NLL of the reference answer tokens given
the prompt), accumulated over micro-batches in fp32. The global cosine can sit near 0 while single
modules conflict (cos < 0) or synergise (cos > 0) and cancel in the aggregate.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .batching import collate, encode_pair
from .domains import Domain, Example, get_domain
from .errors import CrossrouteError
from .model import load_model, params_in_layers
from .progress import progress_bar
from .rundir import RunDir, result_name

Batch = dict[str, torch.Tensor]
MODULE_KINDS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
_MODULE_RE = re.compile(
    r"^(?P<module>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<kind>q|k|v|o|gate|up|down)_proj)"
    r"\.(?:weight|bias)$"
)


# ----------------------------------------------------------------------------- proxy loss


def make_batches(
    tokenizer: PreTrainedTokenizerBase, examples: list[Example], batch_size: int
) -> list[Batch]:
    """Tokenise prompt+answer+eos, right-padded into batches; labels are -100 on prompt and pad.

    Right padding keeps every real token at its unpadded position and never masks a whole row, so
    results do not depend on how examples are grouped. Examples are grouped by length (stable).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs = sorted((encode_pair(tokenizer, ex.prompt, ex.answer) for ex in examples), key=lambda s: len(s[0]))
    return [collate(seqs[i : i + batch_size], pad or 0) for i in range(0, len(seqs), batch_size)]


def n_label_tokens(batches: list[Batch]) -> int:
    """Number of predicted (answer) tokens over all batches: the proxy loss's normaliser."""
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def proxy_loss(
    model: PreTrainedModel, batch: Batch, normalizer: float | None = None
) -> torch.Tensor:
    """Summed NLL of the batch's label tokens divided by `normalizer` (default: their count).

    Logits are computed only at label positions (hidden states × output head), in >= fp32.
    """
    device = next(model.parameters()).device
    batch = _to(batch, device)
    labels = batch["labels"]
    target = labels[:, 1:]
    sel = target != -100
    base = getattr(model, "model", None)
    head = model.get_output_embeddings()
    cfg = model.config
    special_logits = any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale"))
    if base is None or head is None or special_logits:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1][sel]
    else:
        hidden = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        logits = head(hidden[:, :-1][sel])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = torch.nn.functional.cross_entropy(logits, target[sel], reduction="sum")
    denom = float(sel.sum()) if normalizer is None else float(normalizer)
    return nll / max(denom, 1.0)


@torch.no_grad()
def mean_proxy_loss(model: PreTrainedModel, batches: list[Batch]) -> float:
    """The proxy loss over all batches (token-weighted mean NLL of the answers), no gradient."""
    total = n_label_tokens(batches)
    return float(sum(float(proxy_loss(model, b, total)) for b in batches))


def domain_examples(
    domain: Domain | str, n: int, seed: int = 0, split: str = "train", need_answer: bool = True
) -> list[Example]:
    """`n` examples of a domain (name or Domain); refuses domains without reference answers.

    A JSONL rubric domain has no reference completion: with need_answer=False its examples come
    back with an empty answer (prompt only); with need_answer=True it is an error.
    """
    dom = get_domain(domain) if isinstance(domain, str) else domain
    examples = dom.examples(split, n, seed=seed)
    if not examples:
        raise CrossrouteError(f"domain {dom.name!r} has no {split!r} examples; add some or use the "
                              "other split.")
    if dom.kind == "rubric" and dom.fixed is not None:
        if need_answer:
            raise CrossrouteError(
                f"domain {dom.name!r} ({dom.source}) has rubrics but no reference answers; the "
                "proxy loss needs a JSONL domain with 'answer' fields.")
        examples = [Example(e.prompt, "", e.rubric, e.split) for e in examples]
    return examples


def domain_gradient(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    domain: Domain | str,
    n: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    split: str = "train",
    show_progress: bool = False,
) -> dict[str, torch.Tensor]:
    """∇ of the domain's proxy loss (mean answer NLL over `n` examples) per parameter, fp32, CPU.

    Micro-batches of `batch_size` bound memory; the token-weighted sum makes the result independent
    of `batch_size`. The model's own `.grad` fields are not touched.
    """
    return gradient_and_loss(model, tokenizer, domain, n, batch_size, seed, split,
                             show_progress)[0]


def gradient_and_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    domain: Domain | str,
    n: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    split: str = "train",
    show_progress: bool = False,
) -> tuple[dict[str, torch.Tensor], float]:
    """`domain_gradient` and the proxy loss value it differentiates, from the same passes."""
    examples = domain_examples(domain, n, seed, split)
    batches = make_batches(tokenizer, examples, batch_size)
    total = n_label_tokens(batches)
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    acc = [torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
           for p in params]
    was_training = model.training
    loss_sum = 0.0
    model.eval()
    label = domain if isinstance(domain, str) else domain.name
    try:
        with progress_bar(show_progress) as bar:
            task = bar.add_task(f"gradient {label}", total=len(batches))
            for b in batches:
                loss = proxy_loss(model, b, total)
                loss_sum += float(loss.detach())
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for a, g in zip(acc, grads, strict=True):
                    if g is not None:
                        a.add_(g.to(a.dtype))
                bar.update(task, advance=1)
    finally:
        model.train(was_training)
    return {k: a.cpu() for (k, _), a in zip(named, acc, strict=True)}, loss_sum


# ----------------------------------------------------------------------------- cosines


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
    other: list[ModuleCosine]  # tensors outside layer × {q,k,v,o,gate,up,down}: norms, embeddings
    num_layers: int
    most_conflicting: str | None
    most_synergistic: str | None
    domain_a: str = ""
    domain_b: str = ""
    model: str = ""
    n: int = 0
    batch_size: int = 0
    loss_a: float | None = None
    loss_b: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def matrix(self) -> list[list[float | None]]:
        """Cosine per layer (rows) × module kind (columns, MODULE_KINDS); None where absent."""
        m: list[list[float | None]] = [[None] * len(MODULE_KINDS) for _ in range(self.num_layers)]
        for mc in self.modules:
            m[mc.layer][MODULE_KINDS.index(mc.kind)] = mc.cosine
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
            "dot_split": self.dot_split(), "module_kinds": list(MODULE_KINDS),
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


def module_cosines(gA: dict[str, torch.Tensor], gB: dict[str, torch.Tensor]) -> ConflictResult:
    """Global cosine over all shared parameters, and per module (layer × q,k,v,o,gate,up,down)."""
    missing = sorted(set(gA) ^ set(gB))
    if missing:
        raise ValueError(f"gradients cover different parameters, e.g. {missing[0]!r}")
    sums: dict[str, list[float]] = {}  # module -> [dot, |a|², |b|², numel]
    where: dict[str, tuple[int, str]] = {}
    for name in gA:
        a, b = gA[name].double().flatten(), gB[name].to(gA[name].device).double().flatten()
        m = _MODULE_RE.match(name)
        key = m.group("module") if m else name
        if m:
            where[key] = (int(m.group("layer")), m.group("kind"))
        s = sums.setdefault(key, [0.0, 0.0, 0.0, 0])
        s[0] += float(a @ b)
        s[1] += float(a @ a)
        s[2] += float(b @ b)
        s[3] += a.numel()
    modules, other = [], []
    for key, (dot, na2, nb2, numel) in sums.items():
        layer, kind = where.get(key, (-1, "other"))
        mc = ModuleCosine(key, layer, kind, _cos(dot, na2, nb2), dot, math.sqrt(na2),
                          math.sqrt(nb2), int(numel))
        (modules if key in where else other).append(mc)
    modules.sort(key=lambda m: (m.layer, MODULE_KINDS.index(m.kind)))
    dot = sum(s[0] for s in sums.values())
    na2 = sum(s[1] for s in sums.values())
    nb2 = sum(s[2] for s in sums.values())
    scored = [m for m in modules if m.cosine is not None]
    worst = min(scored, key=lambda m: m.cosine, default=None)  # type: ignore[arg-type, return-value]
    best = max(scored, key=lambda m: m.cosine, default=None)  # type: ignore[arg-type, return-value]
    return ConflictResult(
        global_cosine=_cos(dot, na2, nb2), norm_a=math.sqrt(na2), norm_b=math.sqrt(nb2),
        modules=modules, other=other,
        num_layers=1 + max((m.layer for m in modules), default=-1),
        most_conflicting=worst.module if worst is not None else None,
        most_synergistic=best.module if best is not None else None,
    )


# ----------------------------------------------------------------------------- run + render


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
    from .hvp import only_requires_grad

    names = params_in_layers(model, layers) if layers is not None else [n for n, _ in model.named_parameters()]
    with only_requires_grad(model, names):
        gA, loss_a = gradient_and_loss(model, tok, da, n, batch_size, seed, split, show_progress)
        gB, loss_b = gradient_and_loss(model, tok, db, n, batch_size, seed, split, show_progress)
    res = module_cosines(gA, gB)
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


def _short(module: str | None) -> str:
    if not module:
        return "–"
    m = re.search(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)_proj$", module)
    return f"L{m.group(1)}.{m.group(2)}" if m else module


def render_conflict_section(results: list[dict]) -> str:
    """HTML <section>: per pair the global cosine, named extremes, a layer × module heat map."""
    from .plots import heatmap

    parts = ["<section class=\"conflict\"><h2>Module-level gradient conflict</h2>",
             "<p>Gradients of each domain's proxy loss (mean NLL of the reference answers) at one "
             "checkpoint, in fp32. cos &lt; 0: the module is pulled in opposite directions "
             "(conflict); cos &gt; 0: synergy. Per-module conflicts and synergies can cancel in "
             "the global cosine.</p>"]
    rows = []
    for r in results:
        worst, best = r.get("most_conflicting") or {}, r.get("most_synergistic") or {}
        dots = r.get("dot_split") or {}
        rows.append(
            f"<tr><td>{html.escape(r['domain_a'])} vs {html.escape(r['domain_b'])}</td>"
            f"<td>{_num(r.get('global_cosine'))}</td>"
            f"<td>{html.escape(_short(worst.get('module')))} ({_num(worst.get('cosine'))})</td>"
            f"<td>{html.escape(_short(best.get('module')))} ({_num(best.get('cosine'))})</td>"
            f"<td>{_num(dots.get('positive'), '.3g')} / {_num(dots.get('negative'), '.3g')}</td>"
            "</tr>")
    parts.append("<table><thead><tr><th>pair</th><th>global cos</th><th>most conflicting</th>"
                 "<th>most synergistic</th><th>Σ dot + / −</th></tr></thead><tbody>"
                 + "".join(rows) + "</tbody></table>")
    for r in results:
        kinds = r.get("module_kinds") or list(MODULE_KINDS)
        matrix = r.get("matrix") or []
        if not matrix:
            continue
        parts.append(heatmap(matrix, [f"L{i}" for i in range(len(matrix))], kinds,
                             f"cos(g_{r['domain_a']}, g_{r['domain_b']}) per module "
                             f"(global {_num(r.get('global_cosine'))})",
                             vmin=-1.0, vmax=1.0, cmap="RdBu"))
    parts.append("</section>")
    return "\n".join(parts)


def _num(v: Any, fmt: str = ".3f") -> str:
    return "–" if v is None else format(float(v), fmt)
