"""Circuits and differential circuit vulnerability at head level (DESIGN.md §2.6).

A capability is probed by clean/corrupted prompt pairs of equal token length (position-aligned).
Metric m(x): log-probability of the clean answer tokens plus the eos token, teacher-forced after
prompt x, summed over the answer; when a pair names a `wrong` answer, minus the same log-prob of
that answer (a logit-difference-style metric). The corrupted run keeps the *clean* answer as its
teacher-forced continuation, so every position lines up.

A head's output is its slice of the attention output projection's input (the unit table's "head_out" hook
site, crossroute.model.units; head h = columns [h*head_dim, (h+1)*head_dim) of the map's head layout; one
forward pre-hook per layer reads and can replace it). Per model:
- attribution patching (fast estimate, one corrupted forward + one clean forward/backward per
  batch): effect_h ≈ Σ_positions (a_corr − a_clean) · ∂m/∂a at the clean run, the total
  derivative (through every later layer);
- activation patching (confirmation) for the top `confirm_top` heads by |attribution|: the clean
  run with head h's output replaced by its corrupted-run output; effect_h = m_patched − m_clean;
- head score s_h = −effect_h / (m_clean − m_corrupted): the share of the clean–corrupted gap that
  corrupting head h alone removes (activation-patching value where measured, attribution else);
- faithfulness of a head set S (patching variant, not mean ablation): F(S) = (m(S) − m_corr) /
  (m_clean − m_corr), where m(S) is the clean run with every head outside S patched to its
  corrupted output (embeddings and MLPs run clean; F(∅) need not be 0, F(all) = 1 exactly);
- the circuit: the smallest prefix of the heads ranked by s_h (descending) with F >= target.
Across models: retention |C_M ∩ C_base| / |C_base|, score shift Δ_h = s_h(M) − s_h(base),
vulnerable heads s_h(SFT) < s_h(RL) − delta, differential vulnerability s_h(RL) − s_h(SFT).
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from crossroute.analyze.routes import unit_map
from crossroute.core.console import progress_bar
from crossroute.core.errors import CrossrouteError
from crossroute.core.rundir import RunDir, result_name
from crossroute.domains.builtin import BUILTIN, BY_LETTER, CW_LETTERS, ENTITIES, KB, QA_TEMPLATES
from crossroute.domains.domain import Domain
from crossroute.domains.jsonl import iter_jsonl
from crossroute.model.load import default_device, load_model
from crossroute.model.units import UnitMap

CURVE_EXACT = 64  # faithfulness is evaluated at every prefix size up to this, geometrically beyond


# ----------------------------------------------------------------------------- prompt pairs

# The seed abstract's figure: share of the base head circuit retained after RL vs after SFT.
SEED_REFERENCE = {"rl_retained": 0.68, "sft_retained": 0.52, "model": "Qwen2.5-3B-Instruct",
                  "task": "scientific question answering"}


@dataclass(frozen=True)
class Pair:
    """A clean prompt, a corrupted prompt of the same token length, the clean answer (and a wrong one)."""

    clean: str
    corrupted: str
    answer: str
    wrong: str | None = None
    where: str = ""  # "file:line" of a JSONL pair, for error messages


def _corrupt_math(prompt: str, rng: random.Random) -> Pair | None:
    expr = prompt.removeprefix("M:").removesuffix("=")
    parts = re.split(r"([+-])", expr)
    idx = rng.randrange(0, len(parts), 2)
    old = parts[idx]
    choices = [str(v) for v in (range(0, 10) if len(old) == 1 else range(10, 30)) if str(v) != old]
    parts[idx] = rng.choice(choices)
    new = "".join(parts)
    return Pair(prompt, f"M:{new}=", str(eval(expr)), str(eval(new)))  # digits and +/- only


def _code_output(stmts: list[str], out: str) -> int:
    env: dict[str, int] = {}
    for s in stmts:
        target, rhs = s.split("=", 1)
        if rhs.isdigit():
            env[target] = int(rhs)
        else:
            src, op, k = rhs[0], rhs[1], int(rhs[2:])
            env[target] = env[src] + k if op == "+" else env[src] - k if op == "-" else env[src] * k
    return env[out]


def _corrupt_code(prompt: str, rng: random.Random) -> Pair | None:
    body = prompt.removeprefix("C:")
    *stmts, last = body.split(";")
    out = last.removeprefix("print(").removesuffix(")")
    target, value = stmts[0].split("=", 1)
    clean = _code_output(stmts, out)
    for v in rng.sample([d for d in "0123456789" if d != value], 9):
        new = [f"{target}={v}", *stmts[1:]]
        if (wrong := _code_output(new, out)) != clean:
            return Pair(prompt, "C:" + ";".join(new) + f";{last}", f"{clean};", f"{wrong};")
    return None


def _corrupt_qa(prompt: str, rng: random.Random) -> Pair | None:
    for attr, templates in QA_TEMPLATES.items():
        for tpl in templates:
            for e in ENTITIES:
                if tpl.format(e=e) != prompt:
                    continue
                others = [o for o in ENTITIES if len(o) == len(e) and KB[o][attr] != KB[e][attr]]
                if not others:
                    return None
                o = rng.choice(others)
                return Pair(prompt, tpl.format(e=o), f"a {KB[e][attr]}", f"a {KB[o][attr]}")
    return None


def _corrupt_cw(prompt: str, answer: str, rng: random.Random) -> Pair | None:
    m = re.fullmatch(r"W:(\d+) words,([a-z])(?:,with (\w+))?", prompt)
    if m is None:
        return None
    n, letter, must = m.group(1), m.group(2), m.group(3)
    for new in rng.sample([c for c in CW_LETTERS if c != letter], len(CW_LETTERS) - 1):
        if must is None:
            return Pair(prompt, f"W:{n} words,{new}", answer)
        same = [w for w in BY_LETTER[new] if len(w) == len(must)]
        if same:
            return Pair(prompt, f"W:{n} words,{new},with {rng.choice(same)}", answer)
    return None


PAIR_RULES = {
    "math": "one operand replaced by another with as many digits; wrong = the corrupted sum",
    "code": "the first assignment's literal replaced by another digit that changes the output; "
            "wrong = the corrupted output",
    "qa": "the entity swapped for another of the same length with a different attribute value; "
          "wrong = that entity's value",
    "cw": "the required first letter (and the required word, by one of the same length) swapped; "
          "no wrong answer (metric = log-prob of the reference)",
}


def pairs_for(domain: str | Domain, n: int = 64, seed: int = 0, split: str = "eval") -> list[Pair]:
    """`n` clean/corrupted pairs of a built-in domain (rules in PAIR_RULES), deterministic."""
    name = domain if isinstance(domain, str) else domain.name
    if name not in BUILTIN or (isinstance(domain, Domain) and domain.source != "builtin"):
        raise CrossrouteError(f"no pair generator for domain {name!r}; built-in: {', '.join(BUILTIN)}; "
                              "give a JSONL file of {\"clean\", \"corrupted\", \"answer\"} lines.")
    rng = random.Random(f"pairs:{name}:{split}:{seed}")
    out: list[Pair] = []
    for ex in BUILTIN[name].examples(split, 2 * n + 16, seed=seed):
        if name == "math":
            p = _corrupt_math(ex.prompt, rng)
        elif name == "code":
            p = _corrupt_code(ex.prompt, rng)
        elif name == "qa":
            p = _corrupt_qa(ex.prompt, rng)
        else:
            p = _corrupt_cw(ex.prompt, ex.answer, rng)
        if p is not None:
            out.append(p)
        if len(out) == n:
            break
    return out


PAIR_FIELDS = ("clean", "corrupted", "answer", "wrong", "id")


def load_pairs_jsonl(path: str | Path) -> list[Pair]:
    """Pairs from a JSONL file of {"clean", "corrupted", "answer", optional "wrong"} lines, validated."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CrossrouteError(f"{path}: no such JSONL file of prompt pairs.")
    out: list[Pair] = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        unknown = sorted(set(obj) - set(PAIR_FIELDS))
        if unknown:
            raise CrossrouteError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(PAIR_FIELDS)}.")
        for key in ("clean", "corrupted", "answer"):
            if key not in obj:
                raise CrossrouteError(f"{where}: field {key!r} missing; a pair line needs clean, corrupted "
                                      "and answer.")
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise CrossrouteError(f"{where}: field {key!r} must be a non-empty string.")
        wrong = obj.get("wrong")
        if wrong is not None and (not isinstance(wrong, str) or not wrong.strip()):
            raise CrossrouteError(f"{where}: field 'wrong' must be a non-empty string when given.")
        if obj["clean"] == obj["corrupted"]:
            raise CrossrouteError(f"{where}: fields 'clean' and 'corrupted' are identical; a pair must differ.")
        if wrong is not None and wrong == obj["answer"]:
            raise CrossrouteError(f"{where}: field 'wrong' equals 'answer'; the logit difference would be 0.")
        out.append(Pair(obj["clean"], obj["corrupted"], obj["answer"], wrong, where))
    if not out:
        raise CrossrouteError(f"{path}: empty; give at least one pair line.")
    return out


def resolve_pairs(domain: str | Domain, n: int, seed: int = 0, split: str = "eval") -> tuple[str, list[Pair]]:
    """A domain spec -> (name, pairs): a built-in name, a JSONL path, or NAME=PATH (first n lines)."""
    if isinstance(domain, Domain):
        return domain.name, pairs_for(domain, n, seed, split)
    spec = domain.strip()
    if spec in BUILTIN:
        return spec, pairs_for(spec, n, seed, split)
    name, _, p = spec.partition("=") if "=" in spec else ("", "", spec)
    if p.endswith(".jsonl") or "/" in p or Path(p).is_file():
        return (name.strip() or Path(p).stem), load_pairs_jsonl(p)[:n]
    raise CrossrouteError(f"unknown domain {spec!r}; use one of {', '.join(BUILTIN)}, a pairs .jsonl path, "
                          "or NAME=PATH.")


# ----------------------------------------------------------------------------- batching


PairBatch = dict[str, torch.Tensor]


def make_pair_batches(tokenizer: PreTrainedTokenizerBase, pairs: list[Pair], batch_size: int
                      ) -> list[PairBatch]:
    """Rows (clean, +1) per pair and (wrong, −1) when given; right-padded, clean/corrupted aligned.

    Each batch: clean_ids, corrupted_ids, attention_mask, labels (−100 except the answer and eos
    tokens), sign (per row). Σ_rows sign · log p(labels) is the batch's summed metric.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    rows: list[tuple[list[int], list[int], int, float]] = []
    for i, p in enumerate(pairs):
        c = list(tokenizer(p.clean, add_special_tokens=True)["input_ids"])
        k = list(tokenizer(p.corrupted, add_special_tokens=True)["input_ids"])
        if len(c) != len(k):
            where = p.where or f"pair {i}"
            raise CrossrouteError(f"{where}: clean and corrupted prompts are {len(c)} and {len(k)} tokens; "
                                  "patching needs position-aligned prompts of equal token length.")
        for ans, sign in ((p.answer, 1.0), (p.wrong, -1.0)):
            if ans is None:
                continue
            a = list(tokenizer(ans, add_special_tokens=False)["input_ids"]) + eos
            rows.append((c + a, k + a, len(c), sign))
    rows.sort(key=lambda r: len(r[0]))
    batches: list[PairBatch] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        width = max(len(r[0]) for r in chunk)
        clean = torch.full((len(chunk), width), pad, dtype=torch.long)
        corr = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (x, y, plen, _) in enumerate(chunk):
            clean[j, : len(x)] = torch.tensor(x)
            corr[j, : len(y)] = torch.tensor(y)
            labels[j, plen: len(x)] = torch.tensor(x[plen:])
            mask[j, : len(x)] = 1
        batches.append({"clean_ids": clean, "corrupted_ids": corr, "attention_mask": mask, "labels": labels,
                        "sign": torch.tensor([r[3] for r in chunk])})
    return batches


# ----------------------------------------------------------------------------- hooks and metric


class HeadHooks:
    """Forward pre-hooks on every layer's head-out module (the unit table's "head_out" site, e.g. o_proj):
    record, replace (per head) or open a gradient tap.

    Set before a forward pass: `record` (dict, filled layer -> head-out input), `patch`
    (layer -> (bool[num_heads], source tensor): masked heads take the source's slice), `taps`
    (dict, filled layer -> zero leaf added to the input, so ∂m/∂tap = ∂m/∂(head outputs)).
    num_heads/head_dim come from the map's head layout; `units` is its UnitMap.to_json().
    """

    def __init__(self, model: PreTrainedModel, umap: UnitMap | None = None) -> None:
        umap = (unit_map(model) if umap is None else umap).require(("head",))
        lay = umap.head_layout
        assert lay is not None  # require(("head",)) passed
        self.head_dim, self.num_heads = lay.head_dim, lay.num_heads
        self.width = lay.num_heads * lay.head_dim
        self.units = umap.to_json()
        self.layers: list[int] = []
        self.record: dict[int, torch.Tensor] | None = None
        self.patch: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.taps: dict[int, torch.Tensor] | None = None
        self.handles = []
        modules = dict(model.named_modules())
        for layer in range(umap.num_layers):
            name = umap.hook_module(layer, "head_out")
            if name is None:
                continue
            module = modules.get(name)
            if module is None:
                self.remove()
                raise CrossrouteError(f"hook site {name!r} (head_out) of the unit table entry {umap.arch!r} is not a "
                                      "module of this model; fix its HookSites")
            width = getattr(module, "in_features", None)
            if width is not None and width != self.width:
                self.remove()
                raise CrossrouteError(f"{name}: input width {width}, but num_attention_heads x head_dim = "
                                      f"{self.num_heads} x {self.head_dim}; check head_dim in config.json.")
            self.layers.append(layer)
            self.handles.append(module.register_forward_pre_hook(self._hook(layer, name)))
        if not self.layers:
            raise CrossrouteError(f"model_type {umap.model_type!r} (table entry {umap.arch!r}) has no head_out hook "
                                  "site in crossroute's architecture table; add it with crossroute.model.units."
                                  "register_architecture(Arch(..., hooks=HookSites(head_out=...)))")

    def _hook(self, layer: int, name: str):
        def fn(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            if x.shape[-1] != self.width:
                raise CrossrouteError(f"{name}: head-out input of shape {tuple(x.shape)}, but num_attention_heads x "
                                      f"head_dim = {self.num_heads} x {self.head_dim}; check head_dim in config.json.")
            if self.patch is not None and layer in self.patch:
                heads, src = self.patch[layer]
                cols = heads.to(x.device).repeat_interleave(self.head_dim)
                x = torch.where(cols, src.to(x.dtype), x)
            if self.record is not None:
                self.record[layer] = x.detach()
            if self.taps is not None:
                tap = torch.zeros_like(x, requires_grad=True)
                self.taps[layer] = tap
                x = x + tap
            return (x, *args[1:])

        return fn

    def reset(self) -> None:
        self.record = self.patch = self.taps = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def batch_metric(model: PreTrainedModel, ids: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """Σ_rows sign · (summed log-prob of the row's label tokens), computed in >= fp32."""
    mask = batch["attention_mask"]
    target = batch["labels"][:, 1:]
    sel = target != -100
    base, head = getattr(model, "model", None), model.get_output_embeddings()
    if base is None or head is None:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][sel]
    else:
        hidden = base(input_ids=ids, attention_mask=mask)[0]
        logits = head(hidden[:, :-1][sel])
        cfg = getattr(model.config, "text_config", None) or model.config
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:  # what Gemma2/3ForCausalLM.forward applies after lm_head
            logits = torch.tanh(logits / cap) * cap
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    tok = logp.gather(-1, target[sel].unsqueeze(-1)).squeeze(-1)
    rows = sel.nonzero()[:, 0]
    return (batch["sign"].to(tok.dtype)[rows] * tok).sum()


def _to(batch: PairBatch, device: torch.device) -> PairBatch:
    return {k: v.to(device) for k, v in batch.items()}


def head_ids(num_layers: int, num_heads: int) -> list[str]:
    return [f"L{layer}.head.{h}" for layer in range(num_layers) for h in range(num_heads)]


def prefix_sizes(total: int, exact: int = CURVE_EXACT) -> list[int]:
    """Prefix sizes where faithfulness is evaluated: 0..exact, then ×1.25 steps, always `total`."""
    ks = list(range(0, min(total, exact) + 1))
    k = ks[-1]
    while k < total:
        k = min(total, max(k + 1, int(k * 1.25)))
        ks.append(k)
    return ks


def _spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 2:
        return None
    ra = torch.tensor(a, dtype=torch.float64).argsort().argsort().double()
    rb = torch.tensor(b, dtype=torch.float64).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den else None


# ----------------------------------------------------------------------------- one model


@dataclass
class ModelCircuit:
    """One model's head scores, faithfulness curve and circuit on one pair set."""

    path: str
    n_pairs: int
    metric_clean: float  # mean over pairs
    metric_corrupted: float
    gap: float  # metric_clean − metric_corrupted
    attribution: list[list[float]]  # [layer][head]: estimated m_patched − m_clean (mean over pairs)
    activation: list[list[float | None]]  # measured m_patched − m_clean for the confirmed heads
    score: list[list[float]]  # s_h = −effect / gap
    ranking: list[str]  # heads by s_h, descending
    curve_k: list[int]
    curve_faithfulness: list[float]
    circuit: list[str]
    faithfulness: float
    target: float
    attribution_vs_activation: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    units: dict[str, Any] = field(default_factory=dict)  # UnitMap.to_json() of the model

    def score_of(self) -> dict[str, float]:
        nh = len(self.score[0]) if self.score else 0
        return {f"L{i}.head.{h}": self.score[i][h] for i in range(len(self.score)) for h in range(nh)}


def _keep_patch(hooks: HeadHooks, keep: set[tuple[int, int]], corr: dict[int, torch.Tensor]
                ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Patch every head outside `keep` to its corrupted output (layers with nothing to patch skipped)."""
    out = {}
    for layer in hooks.layers:
        heads = torch.tensor([(layer, h) not in keep for h in range(hooks.num_heads)])
        if bool(heads.any()):
            out[layer] = (heads, corr[layer])
    return out


def circuit_of_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[Pair],
    target: float = 0.8,
    confirm_top: int = 16,
    batch_size: int = 32,
    show_progress: bool = False,
    label: str = "circuits",
) -> ModelCircuit:
    """Attribution patching for every head, activation patching for the top heads, the circuit."""
    if not pairs:
        raise CrossrouteError("circuits: no prompt pairs.")
    if not 0 < target <= 1:
        raise CrossrouteError(f"--target {target}: the faithfulness target must be in (0, 1].")
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    batches = make_pair_batches(tokenizer, pairs, batch_size)
    hooks = HeadHooks(model)
    L, H = len(hooks.layers), hooks.num_heads
    if hooks.layers != list(range(L)):
        hooks.remove()
        raise CrossrouteError(f"head-out layers {hooks.layers} are not numbered 0..{L - 1}.")
    n = len(pairs)
    was_training = model.training
    model.eval()
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    m_clean = m_corr = 0.0
    attr = torch.zeros(L, H, dtype=torch.float64)
    try:
        for p, _ in grad_flags:
            p.requires_grad_(False)
        with progress_bar(show_progress) as bar:
            task = bar.add_task(f"{label}: attribution", total=len(batches))
            for b in batches:  # pass 1: attribution patching
                b = _to(b, device)
                hooks.record = corr = {}
                with torch.no_grad():
                    m_corr += float(batch_metric(model, b["corrupted_ids"], b))
                hooks.record, hooks.taps = (clean := {}), (taps := {})
                m = batch_metric(model, b["clean_ids"], b)
                hooks.reset()
                m_clean += float(m.detach())
                grads = torch.autograd.grad(m, [taps[layer] for layer in hooks.layers])
                for layer, g in zip(hooks.layers, grads, strict=True):
                    d = (corr[layer] - clean[layer]).double() * g.double()
                    attr[layer] += d.unflatten(-1, (H, hooks.head_dim)).sum(dim=(0, 1, 3)).cpu()
                bar.advance(task)
            attr /= n
            m_clean, m_corr = m_clean / n, m_corr / n
            gap = m_clean - m_corr
            warnings = []
            if not gap > 0:
                warnings.append(f"clean - corrupted metric gap is {gap:.4g} <= 0: the pairs do not probe "
                                "this capability on this model; scores are fractions of a non-positive gap.")
            if gap == 0:
                gap = float("nan")
            flat = [(layer, h) for layer in range(L) for h in range(H)]
            top = sorted(flat, key=lambda lh: -abs(float(attr[lh])))[: max(0, min(confirm_top, L * H))]
            act = torch.full((L, H), float("nan"), dtype=torch.float64)
            act_sum = {lh: 0.0 for lh in top}
            task = bar.add_task(f"{label}: activation patching", total=len(batches))
            with torch.no_grad():
                for b in batches:  # pass 2: activation patching of the top heads
                    b = _to(b, device)
                    hooks.record = corr = {}
                    batch_metric(model, b["corrupted_ids"], b)
                    hooks.record = None
                    base_m = float(batch_metric(model, b["clean_ids"], b))
                    for layer, h in top:
                        heads = torch.zeros(H, dtype=torch.bool)
                        heads[h] = True
                        hooks.patch = {layer: (heads, corr[layer])}
                        act_sum[(layer, h)] += float(batch_metric(model, b["clean_ids"], b)) - base_m
                    hooks.reset()
                    bar.advance(task)
            for lh, v in act_sum.items():
                act[lh] = v / n
            effect = torch.where(torch.isnan(act), attr, act)
            score = -effect / gap
            ranking = sorted(flat, key=lambda lh: (-float(score[lh]), lh))
            ks = prefix_sizes(L * H)
            keep_m = [0.0] * len(ks)
            task = bar.add_task(f"{label}: faithfulness", total=len(batches))
            with torch.no_grad():
                for b in batches:  # pass 3: faithfulness of every ranked prefix
                    b = _to(b, device)
                    hooks.record = corr = {}
                    batch_metric(model, b["corrupted_ids"], b)
                    hooks.record = None
                    for i, k in enumerate(ks):
                        hooks.patch = _keep_patch(hooks, set(ranking[:k]), corr)
                        keep_m[i] += float(batch_metric(model, b["clean_ids"], b))
                    hooks.reset()
                    bar.advance(task)
    finally:
        hooks.remove()
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        model.train(was_training)
    faith = [(v / n - m_corr) / gap for v in keep_m]
    k_star = next((k for k, f in zip(ks, faith, strict=True) if f >= target), ks[-1])
    names = [f"L{layer}.head.{h}" for layer, h in ranking]
    conf = [(float(attr[lh]), float(act[lh])) for lh in top]
    agree = {
        "confirmed": len(conf),
        "sign_agreement": (sum((a > 0) == (b > 0) for a, b in conf if a != 0 and b != 0)
                           / max(1, sum(1 for a, b in conf if a != 0 and b != 0))) if conf else None,
        "spearman": _spearman([a for a, _ in conf], [b for _, b in conf]),
    }

    def _clean(v: float) -> float | None:
        return None if math.isnan(v) else v

    return ModelCircuit(
        path="", n_pairs=n, metric_clean=m_clean, metric_corrupted=m_corr, gap=m_clean - m_corr,
        attribution=attr.tolist(), activation=[[_clean(v) for v in row] for row in act.tolist()],
        score=score.tolist(), ranking=names, curve_k=ks, curve_faithfulness=faith,
        circuit=names[:k_star], faithfulness=faith[ks.index(k_star)], target=target,
        attribution_vs_activation=agree, warnings=warnings, seconds=round(time.perf_counter() - t0, 3),
        units=hooks.units)


def faithfulness_of(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[Pair],
                    heads: list[str], batch_size: int = 32) -> float:
    """F(S) for an explicit head set S (e.g. the base circuit inside a fine-tuned model)."""
    device = next(model.parameters()).device
    batches = make_pair_batches(tokenizer, pairs, batch_size)
    hooks = HeadHooks(model)
    keep = {(int(u[1:u.index(".")]), int(u.rsplit(".", 1)[1])) for u in heads}
    m_clean = m_corr = m_keep = 0.0
    try:
        with torch.no_grad():
            for b in batches:
                b = _to(b, device)
                hooks.record = corr = {}
                m_corr += float(batch_metric(model, b["corrupted_ids"], b))
                hooks.record = None
                m_clean += float(batch_metric(model, b["clean_ids"], b))
                hooks.patch = _keep_patch(hooks, keep, corr)
                m_keep += float(batch_metric(model, b["clean_ids"], b))
                hooks.reset()
    finally:
        hooks.remove()
    gap = m_clean - m_corr
    return (m_keep - m_corr) / gap if gap else float("nan")


# ----------------------------------------------------------------------------- across models


def retention(circuit: list[str], base_circuit: list[str]) -> float | None:
    """|C ∩ C_base| / |C_base| (None when the base circuit is empty)."""
    base = set(base_circuit)
    return len(set(circuit) & base) / len(base) if base else None


def parse_models(spec: str | dict[str, str | Path]) -> dict[str, str]:
    """--models "rl=PATH,sft=PATH" (or a dict) -> {name: path}; names unique and not 'base'."""
    if isinstance(spec, dict):
        items = [(str(k), str(v)) for k, v in spec.items()]
    else:
        items = []
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            if "=" not in part:
                raise CrossrouteError(f"--models {part!r}: write NAME=PATH, e.g. rl=runs/rl/checkpoints/01_math.")
            name, path = part.split("=", 1)
            items.append((name.strip(), path.strip()))
    out: dict[str, str] = {}
    for name, path in items:
        if not name or not path:
            raise CrossrouteError(f"--models {name}={path}: empty name or path.")
        if name == "base" or name in out:
            raise CrossrouteError(f"--models: model name {name!r} is reserved or repeated.")
        out[name] = path
    return out


@dataclass
class CircuitsResult:
    """Circuits of a base and fine-tuned models on one domain; `to_json()` is circuits_{domain}.json."""

    domain: str
    pairs: dict[str, Any]
    metric: str
    faithfulness_definition: str
    target: float
    delta: float
    layout: dict[str, int]
    models: dict[str, dict[str, Any]]  # "base" first; each a ModelCircuit as a dict
    retention: dict[str, float | None]
    base_circuit_faithfulness: dict[str, float]
    score_shift: dict[str, list[list[float]]]
    rl: str | None = None
    sft: str | None = None
    differential_vulnerability: list[list[float]] | None = None
    vulnerable: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    units: dict[str, Any] = field(default_factory=dict)  # UnitMap.to_json() of the base

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_circuits(
    base: str | Path,
    models: str | dict[str, str | Path],
    domain: str | Domain,
    n: int = 64,
    target: float = 0.8,
    delta: float = 0.1,
    run_dir: str | Path | None = None,
    batch_size: int = 32,
    confirm_top: int = 16,
    seed: int = 0,
    split: str = "eval",
    rl_name: str = "rl",
    sft_name: str = "sft",
    device: str | None = None,
    show_progress: bool = False,
) -> CircuitsResult:
    """Circuits of `base` and every model in `models` (NAME=PATH list or dict) on `domain`'s pairs.

    Writes RUN_DIR/results/circuits_{domain}.json when run_dir is given. Vulnerable heads and
    differential vulnerability need models named `rl_name` and `sft_name` (default rl, sft).
    """
    t0 = time.perf_counter()
    named = parse_models(models) if models else {}
    name, pairs = resolve_pairs(domain, n, seed, split)
    if not pairs:
        raise CrossrouteError(f"domain {name!r}: no prompt pairs could be built.")
    if not delta >= 0:
        raise CrossrouteError(f"--delta {delta}: the vulnerability margin must be >= 0.")
    dev = default_device(device)
    results: dict[str, ModelCircuit] = {}
    layout: dict[str, int] = {}
    base_f: dict[str, float] = {}
    for mname, path in {"base": str(base), **named}.items():
        loaded = None  # free the previous model before loading the next (peak: one model, not two)
        loaded = load_model(path, dtype=torch.float32, device=dev)
        res = circuit_of_model(loaded.model, loaded.tokenizer, pairs, target, confirm_top, batch_size,
                               show_progress, f"circuits {mname}")
        res.path = str(loaded.path)
        this = {"num_layers": len(res.score), "num_heads": len(res.score[0]),
                "head_dim": int(res.units["head_layout"]["head_dim"])}
        if layout and this != layout:
            raise CrossrouteError(f"{path}: head layout {this} differs from the base's {layout}; circuits compare "
                                  "fine-tunes of one base.")
        layout = this
        results[mname] = res
        if mname != "base":
            base_f[mname] = faithfulness_of(loaded.model, loaded.tokenizer, pairs, results["base"].circuit, batch_size)
    base_res = results["base"]
    bscore = torch.tensor(base_res.score, dtype=torch.float64)
    shift = {m: (torch.tensor(r.score, dtype=torch.float64) - bscore).tolist() for m, r in results.items()
             if m != "base"}
    ret = {m: retention(r.circuit, base_res.circuit) for m, r in results.items()}
    bcf = {"base": base_res.faithfulness, **base_f}
    out = CircuitsResult(
        domain=name,
        pairs={"n": len(pairs), "split": split, "seed": seed,
               "rule": PAIR_RULES.get(name, "from a JSONL file"),
               "with_wrong": sum(p.wrong is not None for p in pairs),
               "examples": [asdict(p) for p in pairs[:3]]},
        metric=("log p(clean answer + eos | prompt), teacher-forced, summed over answer tokens; minus log p(wrong "
                "answer + eos | prompt) for pairs that give one; mean over pairs"),
        faithfulness_definition=("patching variant: F(S) = (m(clean run, heads outside S patched to their corrupted "
                                 "outputs) - m(corrupted)) / (m(clean) - m(corrupted)); not mean ablation"),
        target=target, delta=delta, layout=layout,
        models={m: asdict(r) for m, r in results.items()},
        retention=ret, base_circuit_faithfulness=bcf, score_shift=shift, units=base_res.units)
    if rl_name in results and sft_name in results:
        s_rl = torch.tensor(results[rl_name].score, dtype=torch.float64)
        s_sft = torch.tensor(results[sft_name].score, dtype=torch.float64)
        dv = s_rl - s_sft
        out.rl, out.sft = rl_name, sft_name
        out.differential_vulnerability = dv.tolist()
        in_base = set(base_res.circuit)
        vul = []
        for layer in range(layout["num_layers"]):
            for h in range(layout["num_heads"]):
                if float(s_sft[layer, h]) < float(s_rl[layer, h]) - delta:
                    u = f"L{layer}.head.{h}"
                    vul.append({"head": u, "s_base": float(bscore[layer, h]), "s_rl": float(s_rl[layer, h]),
                                "s_sft": float(s_sft[layer, h]), "differential_vulnerability": float(dv[layer, h]),
                                "in_base_circuit": u in in_base})
        out.vulnerable = sorted(vul, key=lambda v: -v["differential_vulnerability"])
    out.seconds = round(time.perf_counter() - t0, 3)
    if run_dir is not None:
        RunDir(Path(run_dir)).write_result(result_name("circuits", name), out.to_json())
    return out


# ----------------------------------------------------------------------------- render




