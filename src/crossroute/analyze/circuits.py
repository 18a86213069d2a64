"""Circuits and differential circuit vulnerability at head level (DESIGN.md §2.6).

A capability is probed by clean/corrupted prompt pairs of equal token length (position-aligned).
Metric m(x): log-probability of the clean answer tokens plus the eos token, teacher-forced after
prompt x, summed over the answer; when a pair names a `wrong` answer, minus the same log-prob of
that answer (a logit-difference-style metric). The corrupted run keeps the *clean* answer as its
teacher-forced continuation, so every position lines up. Every quantity is kept per prompt.

A head's output is its slice of the attention output projection's input (the unit table's "head_out" hook
site, crossroute.model.units; head h = columns [h*head_dim, (h+1)*head_dim) of the map's head layout; one
forward pre-hook per layer reads and can replace it). Per model M:
- attribution patching (fast estimate, one corrupted forward + one clean forward/backward per
  batch): effect_h ≈ Σ_positions (a_corr − a_clean) · ∂m/∂a at the clean run, the total
  derivative (through every later layer);
- activation patching (confirmation) for the top `confirm_top` heads by |attribution|: the clean
  run with head h's output replaced by its corrupted-run output; effect_h = m_patched − m_clean;
- the scale G = the BASE model's clean − corrupted gap on the same pairs, for every model (a model's own
  gap shrinks when its capability collapses, so dividing by it would inflate its heads); own gaps are
  reported beside, as the capability ratio gap_M / G;
- head score s_h = −effect_h / G (activation-patching value where measured, attribution else);
- faithfulness of a head set S (patching variant, not mean ablation): F(S) = (m(S) − m_corr) / G, where
  m(S) is the clean run with every head outside S patched to its corrupted output (embeddings and MLPs
  run clean; for the base F(all) = 1 exactly, for M F(all) = gap_M / G);
- the circuit: the smallest prefix of the heads ranked by s_h with F >= target, at most max_fraction of
  all heads; when the target is not reached within that cap the circuit is the cap and `cap_binds`.
How the patching forwards are batched (PatchPasses: stacked copies, kept runs, layers not recomputed, a curve
that stops once the circuit is decided) changes their cost, not these numbers; stack=1 is the one-forward-per-
head reference. Across models: retention (RETENTION_DEFINITION), set overlap |C_M ∩ C_base| / |C_base|, score shift
Δ_h = s_h(M) − s_h(base), vulnerable heads s_h(SFT) < s_h(RL) − delta, differential vulnerability
s_h(RL) − s_h(SFT). CIs: CI_METHOD (bootstrap over prompts; paired where two models share the prompts).
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from crossroute.analyze.routes import unit_map
from crossroute.core.config import validate_config
from crossroute.core.console import progress_bar
from crossroute.core.errors import CrossrouteError
from crossroute.core.rundir import RunDir, result_name
from crossroute.domains.builtin import BUILTIN, BY_LETTER, CW_LETTERS, ENTITIES, KB, QA_TEMPLATES
from crossroute.domains.domain import Domain
from crossroute.domains.jsonl import iter_jsonl
from crossroute.measure.stats import mean_ci, paired_diff
from crossroute.model.load import default_device, load_model
from crossroute.model.units import UnitMap

CURVE_EXACT = 64  # faithfulness is evaluated at every prefix size up to this, geometrically beyond
DEFAULT_TARGET = 0.8  # faithfulness the circuit should reach, as a share of the base gap
DEFAULT_MAX_FRACTION = 0.25  # the circuit holds at most this share of all heads


class PatchPasses(BaseModel):
    """How the patching forwards are batched (never what they compute): copies per forward, memory caps, curve end.

    stack=1 is the reference path, today's sequence of forwards: one forward per patched head and per prefix set,
    the corrupted run recorded again in every pass, every layer computed. Otherwise up to `stack` copies of a batch
    run as one forward (each copy patching its own heads), at most `max_stack_tokens` rows x padded width per
    forward (peak activation memory); the corrupted head outputs and the clean layer outputs of the attribution
    pass are kept for the later passes while they fit in `max_cache_mb` (else recorded again); a forward whose
    copies patch heads of layer l and above only computes those layers (the layers below are the clean run's);
    and the faithfulness curve stops once the circuit is decided (full_curve evaluates every prefix size; a stopped
    curve keeps the k = all-heads point, the clean run, and says `curve_truncated`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    stack: int | None = Field(None, ge=1)  # copies per forward (None: as many as max_stack_tokens allows)
    max_stack_tokens: int = Field(4096, ge=1)  # rows x width of one stacked forward, at least one copy
    max_cache_mb: float = Field(1024.0, ge=0)  # corrupted head and clean layer outputs kept across passes
    full_curve: bool = False  # evaluate the faithfulness curve at every prefix size

    @property
    def reference(self) -> bool:
        """One forward per copy, nothing cached or skipped: today's path."""
        return self.stack == 1


def patch_passes(spec: PatchPasses | dict[str, Any] | None) -> PatchPasses:
    """A PatchPasses from itself, a mapping of its fields (validated, errors as CrossrouteError) or None (defaults)."""
    if isinstance(spec, PatchPasses):
        return spec
    return validate_config(PatchPasses, dict(spec or {}), "circuit patch passes", "passes")


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
    """Swap the first letter, and each required word for a distinct one of the same length with the new letter."""
    m = re.fullmatch(r"W:(\d+) words,([a-z])(?:,with ([a-z]+(?:,[a-z]+)*))?", prompt)
    if m is None:
        return None
    n, letter, musts = m.group(1), m.group(2), (m.group(3) or "").split(",") if m.group(3) else []
    for new in rng.sample([c for c in CW_LETTERS if c != letter], len(CW_LETTERS) - 1):
        if not musts:
            return Pair(prompt, f"W:{n} words,{new}", answer)
        swapped: list[str] = []
        for w in musts:
            same = [x for x in BY_LETTER[new] if len(x) == len(w) and x not in swapped]
            if not same:
                break
            swapped.append(rng.choice(same))
        if len(swapped) == len(musts):
            return Pair(prompt, f"W:{n} words,{new},with {','.join(swapped)}", answer)
    return None


PAIR_RULES = {
    "math": "one operand replaced by another with as many digits; wrong = the corrupted sum",
    "code": "the first assignment's literal replaced by another digit that changes the output; "
            "wrong = the corrupted output",
    "qa": "the entity swapped for another of the same length with a different attribute value; "
          "wrong = that entity's value",
    "cw": "the required first letter (and each required word, by a distinct one of the same length) swapped; "
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
    tokens), sign (per row), pair (the row's index in `pairs`, so per-prompt metrics can be summed
    back). Σ_rows sign · log p(labels) is the batch's summed metric.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    rows: list[tuple[list[int], list[int], int, float, int]] = []
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
            rows.append((c + a, k + a, len(c), sign, i))
    rows.sort(key=lambda r: len(r[0]))
    batches: list[PairBatch] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        width = max(len(r[0]) for r in chunk)
        clean = torch.full((len(chunk), width), pad, dtype=torch.long)
        corr = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (x, y, plen, _, _) in enumerate(chunk):
            clean[j, : len(x)] = torch.tensor(x)
            corr[j, : len(y)] = torch.tensor(y)
            labels[j, plen: len(x)] = torch.tensor(x[plen:])
            mask[j, : len(x)] = 1
        batches.append({"clean_ids": clean, "corrupted_ids": corr, "attention_mask": mask, "labels": labels,
                        "sign": torch.tensor([r[3] for r in chunk]),
                        "pair": torch.tensor([r[4] for r in chunk], dtype=torch.long)})
    return batches


# ----------------------------------------------------------------------------- hooks and metric


class HeadHooks:
    """Forward pre-hooks on every layer's head-out module (the unit table's "head_out" site, e.g. o_proj):
    record, replace (per head) or open a gradient tap.

    Set before a forward pass: `record` (dict, filled layer -> head-out input), `patch`
    (layer -> (bool[num_heads], source tensor): masked heads take the source's slice; with a mask
    bool[copies, num_heads] the input is `copies` stacked copies of the source's batch and copy i's masked heads
    take the source's slice), `taps` (dict, filled layer -> zero leaf added to the input, so ∂m/∂tap =
    ∂m/∂(head outputs)). num_heads/head_dim come from the map's head layout; `units` is its UnitMap.to_json();
    `blocks` maps a layer to the decoder-layer module holding its head-out site (None when that is not a module).
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
        self.blocks: dict[int, torch.nn.Module | None] = {}
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
            suffix = umap.architecture.hooks.head_out if umap.architecture is not None else None
            block = modules.get(name[: -len(suffix)].rstrip(".")) if suffix and name.endswith(suffix) else None
            self.blocks[layer] = block if block is not None and block is not model else None
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
                if heads.dim() == 1:
                    cols = heads.to(x.device).repeat_interleave(self.head_dim)
                    x = torch.where(cols, src.to(x.dtype), x)
                else:  # copy i = rows [i*B, (i+1)*B) takes the source at its own masked heads
                    n = heads.shape[0]
                    cols = heads.to(x.device).repeat_interleave(self.head_dim, dim=1)
                    cols = cols.reshape(n, *([1] * (x.dim() - 1)), x.shape[-1])
                    x = torch.where(cols, src.to(x.dtype).unsqueeze(0),
                                    x.reshape(n, -1, *x.shape[1:])).reshape(x.shape)
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
    return row_metric(model, ids, batch).sum()


def row_metric(model: PreTrainedModel, ids: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """Per row: sign · (summed log-prob of the row's label tokens), in >= fp32 (rows are independent)."""
    mask = batch["attention_mask"]
    target = batch["labels"][:, 1:]
    sel = target != -100
    base, head = getattr(model, "model", None), model.get_output_embeddings()
    if base is None or head is None:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][sel]
    else:
        hidden = base(input_ids=ids, attention_mask=mask, use_cache=False)[0]
        logits = head(hidden[:, :-1][sel])
        cfg = getattr(model.config, "text_config", None) or model.config
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:  # what Gemma2/3ForCausalLM.forward applies after lm_head
            logits = torch.tanh(logits / cap) * cap
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    tok = logp.gather(-1, target[sel].unsqueeze(-1)).squeeze(-1)
    rows = sel.nonzero()[:, 0]
    out = torch.zeros(ids.shape[0], dtype=tok.dtype, device=tok.device)
    return out.index_add(0, rows, batch["sign"].to(tok.device, tok.dtype)[rows] * tok)


def _add_by_pair(acc: torch.Tensor, rows: torch.Tensor, batch: PairBatch) -> None:
    """acc[pair] += rows (first dimension = rows of the batch): per-row values summed back to their prompts."""
    acc.index_add_(0, batch["pair"].cpu(), rows.detach().double().cpu())


def _to(batch: PairBatch, device: torch.device) -> PairBatch:
    return {k: v.to(device) for k, v in batch.items()}


def head_ids(num_layers: int, num_heads: int) -> list[str]:
    return [f"L{layer}.head.{h}" for layer in range(num_layers) for h in range(num_heads)]


def prefix_sizes(total: int, exact: int = CURVE_EXACT, include: tuple[int, ...] = ()) -> list[int]:
    """Prefix sizes where faithfulness is evaluated: 0..exact, then ×1.25 steps, always `total` and `include`."""
    ks = list(range(0, min(total, exact) + 1))
    k = ks[-1]
    while k < total:
        k = min(total, max(k + 1, int(k * 1.25)))
        ks.append(k)
    return sorted(set(ks) | {i for i in include if 0 <= i <= total})


def max_heads_of(total: int, max_fraction: float) -> int:
    """The circuit-size cap: floor(max_fraction × all heads), at least one head."""
    if not 0 < max_fraction <= 1:
        raise CrossrouteError(f"--max-fraction {max_fraction}: the circuit-size cap must be a fraction of all "
                              "heads in (0, 1].")
    return max(1, math.floor(max_fraction * total + 1e-9))


def _spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 2:
        return None
    ra = torch.tensor(a, dtype=torch.float64).argsort().argsort().double()
    rb = torch.tensor(b, dtype=torch.float64).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den else None


def parse_head(name: str) -> tuple[int, int]:
    """'L3.head.1' -> (3, 1)."""
    m = re.fullmatch(r"L(\d+)\.head\.(\d+)", name)
    if m is None:
        raise CrossrouteError(f"head {name!r}: write heads as L<layer>.head.<index>, e.g. L3.head.1.")
    return int(m.group(1)), int(m.group(2))


# ----------------------------------------------------------------------------- uncertainty over prompts

CI_METHOD = ("95 % percentile bootstrap over prompts (crossroute.measure.stats.mean_ci) of each ratio's per-prompt "
             "delta-method linearisation r + (num_i - r den_i) / mean(den), so the sampling error of the scale "
             "counts too; a difference of two models on the same prompts: stats.paired_diff of their "
             "linearisations (paired bootstrap CI, sign-flip permutation p-value)")


def linearised_ratio(num: Any, den: Any) -> np.ndarray:
    """Per-prompt values whose mean is r = mean(num)/mean(den) and whose spread is r's (first-order delta method).

    num: [n, ...] (e.g. per-prompt head effects), den: [n]; all NaN when mean(den) is 0 or NaN.
    """
    a, d = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if d.ndim != 1 or a.shape[:1] != d.shape:
        raise CrossrouteError(f"ratio over prompts: numerator shape {a.shape} and denominator shape {d.shape} "
                              "do not share the prompt axis.")
    scale = float(d.mean()) if d.size else float("nan")
    if scale == 0 or math.isnan(scale):
        return np.full(a.shape, np.nan)
    r = a.mean(axis=0) / scale
    return r + (a - r * d.reshape(-1, *([1] * (a.ndim - 1)))) / scale


def _none(v: float) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


def ratio_ci(num: Any, den: Any, seed: int = 0) -> dict[str, Any]:
    """mean(num)/mean(den) over prompts with its 95 % CI (CI_METHOD); value/lo/hi None when undefined."""
    z = linearised_ratio(num, den)
    if z.ndim != 1:
        raise CrossrouteError(f"ratio_ci: one value per prompt expected, got shape {z.shape}.")
    if z.size == 0 or bool(np.isnan(z).any()):
        return {"value": None, "lo": None, "hi": None, "n": int(z.size)}
    e = mean_ci(z, seed=seed)
    value = float(np.mean(num)) / float(np.mean(den))
    return {"value": value, "lo": e.lo / 100, "hi": e.hi / 100, "n": e.n}


def mean_ci_of(x: Any, seed: int = 0) -> dict[str, Any]:
    """The mean of per-prompt values (any unit) with its 95 % bootstrap CI (stats.mean_ci, undoing its x100)."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.size == 0:
        return {"value": None, "lo": None, "hi": None, "n": 0}
    e = mean_ci(arr, seed=seed)
    return {"value": float(arr.mean()), "lo": e.lo / 100, "hi": e.hi / 100, "n": e.n}


def paired_ratio_diff(num_a: Any, den_a: Any, num_b: Any, den_b: Any, seed: int = 0) -> dict[str, Any]:
    """r_b − r_a of two ratios over the same prompts: paired CI and p (stats.paired_diff of the linearisations)."""
    za, zb = linearised_ratio(num_a, den_a), linearised_ratio(num_b, den_b)
    if za.shape != zb.shape or za.ndim != 1:
        raise CrossrouteError(f"paired ratios need one value per prompt each, got shapes {za.shape} and {zb.shape}.")
    if za.size == 0 or bool(np.isnan(za).any() or np.isnan(zb).any()):
        return {"value": None, "lo": None, "hi": None, "p": None, "n": int(za.size), "test": "none",
                "significant": False}
    d = paired_diff(za, zb, seed=seed)
    value = float(np.mean(num_b)) / float(np.mean(den_b)) - float(np.mean(num_a)) / float(np.mean(den_a))
    return {"value": value, "lo": d.lo / 100, "hi": d.hi / 100, "p": d.p, "n": d.n, "test": d.test,
            "significant": d.significant}


def _grid(num: np.ndarray, fn: Any) -> dict[str, list[list[Any]]]:
    """Apply fn(layer, head) -> dict to every head of an [n, L, H] array; one [L][H] matrix per key."""
    _, L, H = num.shape
    cells = [[fn(layer, h) for h in range(H)] for layer in range(L)]
    return {k: [[c[k] for c in row] for row in cells] for k in cells[0][0]} if L and H else {}


def score_grid(neg_effect: np.ndarray, scale: np.ndarray, seed: int = 0) -> dict[str, list[list[Any]]]:
    """Per head: mean(−effect)/mean(scale) with its CI; `neg_effect` is [n, L, H], `scale` the per-prompt gaps."""
    return _grid(neg_effect, lambda layer, h: ratio_ci(neg_effect[:, layer, h], scale, seed))


def shift_grid(neg_a: np.ndarray, neg_b: np.ndarray, scale: np.ndarray, seed: int = 0) -> dict[str, list[list[Any]]]:
    """Per head: s_h(b) − s_h(a) on one scale, paired over prompts (CI, p); inputs [n, L, H] and [n]."""
    return _grid(neg_a, lambda layer, h: paired_ratio_diff(neg_a[:, layer, h], scale, neg_b[:, layer, h], scale,
                                                           seed))


# ----------------------------------------------------------------------------- circuit selection


@dataclass(frozen=True)
class Selection:
    """The circuit picked from a faithfulness curve: its size and F, and whether the target or the cap decided."""

    size: int
    faithfulness: float
    target_reached: bool
    cap_binds: bool  # the size was set by the cap, not by the target
    smallest_reaching: int | None  # smallest evaluated prefix (>= 1 head) with F >= target, cap ignored


def select_circuit(ks: list[int], faith: list[float], target: float, max_heads: int, total: int | None = None
                   ) -> Selection:
    """Smallest prefix k in 1..max_heads with F(k) >= target; when there is none, the cap itself (the cap binds when
    it is below `total`, all heads, default max(ks)). `ks` ascending; they may stop once that is decided."""
    if len(ks) != len(faith):
        raise CrossrouteError(f"select_circuit: {len(ks)} prefix sizes but {len(faith)} faithfulness values.")
    at = dict(zip(ks, faith, strict=True))
    reach = next((k for k in ks if k >= 1 and at[k] >= target), None)  # NaN never reaches
    if reach is not None and reach <= max_heads:
        return Selection(reach, at[reach], True, False, reach)
    if max_heads not in at:
        raise CrossrouteError(f"select_circuit: the cap {max_heads} is not an evaluated prefix size.")
    return Selection(max_heads, at[max_heads], False, max_heads < (max(ks) if total is None else total), reach)


# ----------------------------------------------------------------------------- one model


@dataclass
class ModelCircuit:
    """One model's head effects and scores (base scale), faithfulness curve and circuit on one pair set.

    Metric values are means over prompts; `scale_gap` is the base model's clean−corrupted gap (the unit of
    every score and faithfulness); `per_prompt` keeps the per-prompt values every CI is drawn from.
    """

    path: str
    n_pairs: int
    metric_clean: float
    metric_corrupted: float
    gap: float  # this model's own metric_clean − metric_corrupted
    gap_ci: dict[str, Any]
    scale_gap: float  # the base model's gap
    capability: dict[str, Any]  # gap / scale_gap with CI: the capability left, on the base scale
    attribution: list[list[float]]  # [layer][head]: estimated m_patched − m_clean (mean over pairs)
    activation: list[list[float | None]]  # measured m_patched − m_clean for the confirmed heads
    effect: list[list[float]]  # raw effect used: activation where measured, attribution else
    effect_lo: list[list[float | None]]
    effect_hi: list[list[float | None]]
    score: list[list[float | None]]  # s_h = −effect / base gap
    score_lo: list[list[float | None]]
    score_hi: list[list[float | None]]
    score_own_gap: list[list[float | None]]  # −effect / own gap: shown for contrast only, not used
    ranking: list[str]  # heads by s_h, descending (by −effect when the base gap is 0)
    curve_k: list[int]
    curve_faithfulness: list[float | None]  # base scale
    curve_faithfulness_own_gap: list[float | None]
    circuit: list[str]
    faithfulness: float | None  # base scale, of the circuit
    faithfulness_ci: dict[str, Any]
    target: float
    max_fraction: float
    max_heads: int
    target_reached: bool
    cap_binds: bool
    smallest_reaching_target: int | None  # None: not reached (up to the cap when the curve is truncated)
    curve_truncated: bool = False  # the curve stopped once the circuit was decided; its last point is k = all heads
    attribution_vs_activation: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    units: dict[str, Any] = field(default_factory=dict)  # UnitMap.to_json() of the model
    per_prompt: dict[str, Any] = field(default_factory=dict)  # metric_clean, metric_corrupted, effect, circuit

    def score_of(self) -> dict[str, float | None]:
        nh = len(self.score[0]) if self.score else 0
        return {f"L{i}.head.{h}": self.score[i][h] for i in range(len(self.score)) for h in range(nh)}


Copy = dict[int, torch.Tensor]  # one stacked copy: layer -> bool[num_heads], heads patched to their corrupted output


def _keep_masks(hooks: HeadHooks, keep: set[tuple[int, int]]) -> Copy:
    """Patch every head outside `keep` to its corrupted output (layers with nothing to patch skipped)."""
    out = {}
    for layer in hooks.layers:
        heads = torch.tensor([(layer, h) not in keep for h in range(hooks.num_heads)])
        if bool(heads.any()):
            out[layer] = heads
    return out


def _record_corrupted(model: PreTrainedModel, hooks: HeadHooks, b: PairBatch) -> tuple[dict[int, torch.Tensor],
                                                                                         torch.Tensor]:
    """One corrupted forward: every layer's head-out input, and the per-row metric."""
    hooks.record = corr = {}
    m = row_metric(model, b["corrupted_ids"], b)
    hooks.record = None
    return corr, m


class _Budget:
    """Bytes the cross-pass caches may still hold (PatchPasses.max_cache_mb); a cache that does not fit recomputes."""

    def __init__(self, nbytes: float) -> None:
        self.left = nbytes

    def take(self, tensors: Iterable[torch.Tensor]) -> bool:
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size > self.left:
            return False
        self.left -= size
        return True


class _Corrupted:
    """Each batch's corrupted head-out inputs: recorded when asked, kept across passes while the budget lasts."""

    def __init__(self, model: PreTrainedModel, hooks: HeadHooks, budget: _Budget) -> None:
        self.model, self.hooks, self.budget = model, hooks, budget
        self.kept: dict[int, dict[int, torch.Tensor]] = {}

    def keep(self, i: int, corr: dict[int, torch.Tensor]) -> None:
        if self.budget.take(corr.values()):
            self.kept[i] = corr

    def __call__(self, i: int, b: PairBatch) -> dict[int, torch.Tensor]:
        """Batch i's corrupted head-out inputs (call under no_grad)."""
        if i not in self.kept:
            corr, _ = _record_corrupted(self.model, self.hooks, b)
            self.keep(i, corr)
            return corr
        return self.kept[i]


class _CleanBlocks:
    """A batch's clean decoder-layer outputs and row metric, recorded in the attribution pass's clean forward (kept
    while the budget lasts, else recorded again); they stand in for the layers below a stacked forward's first
    patched layer (those layers compute exactly the clean run there), so only the layers above are computed."""

    def __init__(self, hooks: HeadHooks, budget: _Budget) -> None:
        blocks = [hooks.blocks.get(layer) for layer in hooks.layers]
        self.blocks, self.budget = blocks, budget
        self.usable = all(b is not None for b in blocks) and len({id(b) for b in blocks}) == len(blocks)
        self.out: dict[int, torch.Tensor] = {}
        self.kept: dict[int, tuple[dict[int, torch.Tensor], torch.Tensor]] = {}

    def keep(self, i: int, rows: torch.Tensor) -> None:
        """Keep the outputs just recorded, and the rows' metric, as batch i's."""
        rows = rows.detach()
        if self.usable and len(self.out) == len(self.blocks) and self.budget.take([*self.out.values(), rows]):
            self.kept[i] = (self.out, rows)

    def use(self, i: int) -> torch.Tensor | None:
        """Batch i's kept outputs become the current ones (the cache lets go of them); its rows' metric, else None."""
        if i not in self.kept:
            return None
        self.out, rows = self.kept.pop(i)
        return rows

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Keep every layer's output of the forward run inside (a layer returning no plain tensor: never skip)."""
        self.out = {}
        handles = [b.register_forward_hook(self._keep(layer)) for layer, b in enumerate(self.blocks)
                   if b is not None] if self.usable else []
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _keep(self, layer: int) -> Callable[..., None]:
        def fn(module: torch.nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                self.out[layer] = out.detach()
            else:
                self.usable = False

        return fn

    @contextmanager
    def skipping(self, depth: int, copies: int) -> Iterator[None]:
        """Layers < depth return their recorded clean output, repeated for `copies` stacked copies, uncomputed."""
        saved: list[tuple[torch.nn.Module, Any]] = []
        if self.usable and all(layer in self.out for layer in range(depth)):
            for layer in range(depth):
                block, out = self.blocks[layer], self.out[layer]
                assert block is not None  # usable
                saved.append((block, block.__dict__.get("forward")))
                block.forward = partial(_stand_in, out.repeat(copies, *([1] * (out.dim() - 1))))
        try:
            yield
        finally:
            for block, forward in saved:
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward


def _stand_in(out: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return out


def _stacked(b: PairBatch, copies: int) -> PairBatch:
    """The batch repeated `copies` times along the batch dimension (copy i = rows [i*B, (i+1)*B))."""
    return b if copies == 1 else {k: v.repeat(copies, *([1] * (v.dim() - 1))) for k, v in b.items()}


def _per_forward(b: PairBatch, passes: PatchPasses) -> int:
    """Copies of batch `b` one forward holds: `stack` (all that fit when None), at most max_stack_tokens, >= 1."""
    rows, width = b["clean_ids"].shape
    fit = max(1, passes.max_stack_tokens // max(1, rows * width))
    return fit if passes.stack is None else min(passes.stack, fit)


def _patched_rows(model: PreTrainedModel, hooks: HeadHooks, b: PairBatch, corr: dict[int, torch.Tensor],
                  copies: list[Copy], per_forward: int, blocks: _CleanBlocks | None = None) -> torch.Tensor:
    """Per copy and row: m(clean run with the copy's heads patched to corrupted) [len(copies), B], `per_forward`
    copies stacked per forward; with `blocks` (recorded on this batch) the layers below each forward's first
    patched layer are not computed."""
    out = []
    for start in range(0, len(copies), per_forward):
        group = copies[start: start + per_forward]
        s = len(group)
        patch = {}
        for layer in sorted({layer for c in group for layer in c}):
            none = torch.zeros(hooks.num_heads, dtype=torch.bool)
            mask = group[0][layer] if s == 1 else torch.stack([c.get(layer, none) for c in group])
            patch[layer] = (mask, corr[layer])
        depth = min(min(c, default=0) for c in group)
        sb = _stacked(b, s)
        hooks.patch = patch
        with blocks.skipping(depth, s) if blocks is not None else nullcontext():
            rows = row_metric(model, sb["clean_ids"], sb)
        hooks.patch = None
        out.append(rows.view(s, -1))
    return torch.cat(out) if out else torch.zeros(0, b["clean_ids"].shape[0], dtype=torch.float64)


def _attribution_pass(model: PreTrainedModel, hooks: HeadHooks, batches: list[PairBatch], n: int,
                      device: torch.device, tick: Callable[[], None], corrupted: _Corrupted | None = None,
                      blocks: _CleanBlocks | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per prompt: clean and corrupted metric, and attribution Σ_pos (a_corr − a_clean)·∂m/∂a per head [n, L, H];
    the corrupted head outputs and clean layer outputs are offered to `corrupted` and `blocks` for later passes."""
    L, H = len(hooks.layers), hooks.num_heads
    clean_p, corr_p = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    attr_p = torch.zeros(n, L, H, dtype=torch.float64)
    for i, b in enumerate(batches):
        b = _to(b, device)
        with torch.no_grad():
            corr, mc = _record_corrupted(model, hooks, b)
        if corrupted is not None:
            corrupted.keep(i, corr)
        _add_by_pair(corr_p, mc, b)
        hooks.record, hooks.taps = (clean := {}), (taps := {})
        with blocks.recording() if blocks is not None else nullcontext():
            rows = row_metric(model, b["clean_ids"], b)  # taps are 0: the clean run's values
        if blocks is not None:
            blocks.keep(i, rows)
        hooks.reset()
        _add_by_pair(clean_p, rows, b)
        grads = torch.autograd.grad(rows.sum(), [taps[layer] for layer in hooks.layers])  # rows independent
        for layer, g in zip(hooks.layers, grads, strict=True):
            d = (corr[layer] - clean[layer]).double() * g.double()
            per_row = d.unflatten(-1, (H, hooks.head_dim)).sum(dim=(1, 3))  # [B, H]
            acc = torch.zeros(n, H, dtype=torch.float64)
            _add_by_pair(acc, per_row, b)
            attr_p[:, layer] += acc
        tick()
    return clean_p, corr_p, attr_p


def _activation_pass(model: PreTrainedModel, hooks: HeadHooks, batches: list[PairBatch], n: int,
                     device: torch.device, top: list[tuple[int, int]], tick: Callable[[], None],
                     passes: PatchPasses, corrupted: _Corrupted, blocks: _CleanBlocks | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt: m(clean, head h alone patched to corrupted) − m(clean) for each head in `top` [n, L, H], and
    m(clean) [n] of the clean run subtracted. Heads of one layer share stacked forwards (with `blocks`, computing
    only that layer and those above it)."""
    act_p = torch.zeros(n, len(hooks.layers), hooks.num_heads, dtype=torch.float64)
    clean_p = torch.zeros(n, dtype=torch.float64)
    by_layer: dict[int, list[int]] = {}
    for layer, h in top:
        by_layer.setdefault(layer, []).append(h)
    with torch.no_grad():
        for i, b in enumerate(batches):
            b = _to(b, device)
            corr = corrupted(i, b)
            base_rows = blocks.use(i) if blocks is not None else None
            if base_rows is None:
                with blocks.recording() if blocks is not None else nullcontext():
                    base_rows = row_metric(model, b["clean_ids"], b)
            _add_by_pair(clean_p, base_rows, b)
            for layer in sorted(by_layer):
                heads = by_layer[layer]
                copies = [{layer: torch.arange(hooks.num_heads) == h} for h in heads]
                rows = _patched_rows(model, hooks, b, corr, copies, _per_forward(b, passes), blocks)
                for h, r in zip(heads, rows, strict=True):
                    acc = torch.zeros(n, dtype=torch.float64)
                    _add_by_pair(acc, r - base_rows, b)
                    act_p[:, layer, h] += acc
            hooks.reset()
            tick()
    return act_p, clean_p


def _keep_pass(model: PreTrainedModel, hooks: HeadHooks, batches: list[PairBatch], n: int, device: torch.device,
               keeps: list[set[tuple[int, int]]], tick: Callable[[], None], passes: PatchPasses,
               corrupted: _Corrupted) -> torch.Tensor:
    """Per prompt: m(clean run with every head outside keeps[i] patched to corrupted) [n, len(keeps)]."""
    keep_p = torch.zeros(n, len(keeps), dtype=torch.float64)
    copies = [_keep_masks(hooks, keep) for keep in keeps]
    with torch.no_grad():
        for i, b in enumerate(batches):
            b = _to(b, device)
            rows = _patched_rows(model, hooks, b, corrupted(i, b), copies, _per_forward(b, passes))
            for j, r in enumerate(rows):
                acc = torch.zeros(n, dtype=torch.float64)
                _add_by_pair(acc, r, b)
                keep_p[:, j] = keep_p[:, j] + acc
            hooks.reset()
            tick()
    return keep_p


def curve_rounds(ks: list[int], max_heads: int, per_round: int, full: bool, first: int | None = None
                 ) -> list[list[int]]:
    """The prefix sizes in evaluation rounds: all of them in one (full curve), else those up to the cap, where the
    circuit is decided, `per_round` at a time (`first` in the first round; the curve stops after the round that
    reaches the target)."""
    if full:
        return [list(ks)]
    head = [k for k in ks if k <= max_heads]
    cut = max(1, per_round if first is None else first)
    step = max(1, per_round)
    return [head[:cut], *(head[i: i + step] for i in range(cut, len(head), step))]


def _reaches(ks: list[int], keep_p: torch.Tensor, corr_p: torch.Tensor, scale: float, target: float) -> bool:
    """Whether some prefix of >= 1 head has F >= target (F as the result reports it; an undefined F never reaches)."""
    rec = (keep_p - corr_p[:, None]).mean(0)
    return any(k >= 1 and (f := _ratio_or_none(float(v), scale)) is not None and f >= target
               for k, v in zip(ks, rec, strict=True))


def _agreement(attr: torch.Tensor, act: torch.Tensor, top: list[tuple[int, int]]) -> dict[str, Any]:
    """Attribution vs activation patching over the confirmed heads: sign agreement and Spearman."""
    conf = [(float(attr[lh]), float(act[lh])) for lh in top]
    nz = [(a, b) for a, b in conf if a != 0 and b != 0]
    return {"confirmed": len(conf),
            "sign_agreement": (sum((a > 0) == (b > 0) for a, b in nz) / max(1, len(nz))) if conf else None,
            "spearman": _spearman([a for a, _ in conf], [b for _, b in conf])}


def _ratio_or_none(num: float, den: float) -> float | None:
    return None if den == 0 or math.isnan(den) else num / den


class _Frozen:
    """Context: eval mode, no parameter gradients, hooks removed on exit; the model's state restored."""

    def __init__(self, model: PreTrainedModel, hooks: HeadHooks) -> None:
        self.model, self.hooks = model, hooks
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.was_training = model.training

    def __enter__(self) -> _Frozen:
        self.model.eval()
        for p, _ in self.flags:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.remove()
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.model.train(self.was_training)


def _gap_warnings(gap: float, scale: float, is_base: bool) -> list[str]:
    out = []
    if not gap > 0:
        out.append(f"own clean - corrupted metric gap is {gap:.4g} <= 0: the pairs do not probe this capability on "
                   "this model (on the base scale its head scores and faithfulness are then near 0).")
    if not is_base and not scale > 0:
        out.append(f"the base model's gap is {scale:.4g} <= 0: scores and faithfulness on the base scale are "
                   "fractions of a non-positive gap.")
    return out


def _curve(model: PreTrainedModel, hooks: HeadHooks, batches: list[PairBatch], n: int, device: torch.device,
           ranking: list[tuple[int, int]], ks: list[int], rule: tuple[float, float, int], passes: PatchPasses,
           corrupted: _Corrupted, clean_p: torch.Tensor, corr_p: torch.Tensor,
           extra: list[set[tuple[int, int]]], tick: Callable[[], None]
           ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Per-prompt m(top-k heads kept) [n, len(evaluated ks)] in rounds (curve_rounds), stopping once the circuit is
    decided; `rule` = (scale, target, max_heads). Off the reference path the k = all-heads point is the clean run
    `clean_p` (nothing patched), not computed again. `extra` head sets ride along in the first round (in place of
    as many prefix sizes) [n, len(extra)].
    """
    scale, target, max_heads = rule
    total = ks[-1]
    per_round = min(_per_forward(b, passes) for b in batches)
    done: list[int] = []
    cols: list[torch.Tensor] = []
    extra_p = torch.zeros(n, 0, dtype=torch.float64)
    for r, rnd in enumerate(curve_rounds(ks, max_heads, per_round, passes.full_curve, per_round - len(extra))):
        run = [k for k in rnd if passes.reference or k != total]
        sets = [set(ranking[:k]) for k in run] + (extra if r == 0 else [])
        got = _keep_pass(model, hooks, batches, n, device, sets, tick if r == 0 else lambda: None, passes, corrupted)
        if r == 0:
            extra_p = got[:, len(run):]
        by_k = dict(zip(run, got[:, : len(run)].unbind(1), strict=True))
        cols += [by_k.get(k, clean_p) for k in rnd]
        done += rnd
        if not passes.full_curve and _reaches(done, torch.stack(cols, 1), corr_p, scale, target):
            break
    if done[-1] != total:  # stopped early: the all-heads end point is the clean run
        done, cols = [*done, total], [*cols, clean_p]
    return done, torch.stack(cols, 1), extra_p


def circuit_of_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[Pair],
    target: float = DEFAULT_TARGET,
    confirm_top: int = 16,
    batch_size: int = 32,
    show_progress: bool = False,
    label: str = "circuits",
    max_fraction: float = DEFAULT_MAX_FRACTION,
    base_gap: Any = None,
    seed: int = 0,
    passes: PatchPasses | dict[str, Any] | None = None,
) -> ModelCircuit:
    """Attribution patching for every head, activation patching for the top heads, the capped circuit.

    `base_gap`: the base model's per-prompt clean−corrupted gaps (same pairs, same order), the scale of every
    score and faithfulness; None for the base model itself (its own gaps). `passes`: how the patching forwards
    are batched (PatchPasses; the results do not depend on it beyond float rounding, except where the curve stops).
    """
    return _circuit(model, tokenizer, pairs, target, confirm_top, batch_size, show_progress, label, max_fraction,
                    base_gap, seed, patch_passes(passes))[0]


def _circuit(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[Pair], target: float,
             confirm_top: int, batch_size: int, show_progress: bool, label: str, max_fraction: float, base_gap: Any,
             seed: int, passes: PatchPasses, also_keep: list[str] | None = None
             ) -> tuple[ModelCircuit, HeadSetRun | None]:
    """circuit_of_model, and the head set `also_keep` measured in the same passes (head_set_metrics' values)."""
    if not pairs:
        raise CrossrouteError("circuits: no prompt pairs.")
    if not 0 < target <= 1:
        raise CrossrouteError(f"--target {target}: the faithfulness target must be in (0, 1].")
    extra = [] if also_keep is None else [{parse_head(u) for u in also_keep}]
    t0 = time.perf_counter()
    n = len(pairs)
    device = next(model.parameters()).device
    batches = make_pair_batches(tokenizer, pairs, batch_size)
    hooks = HeadHooks(model)
    L, H = len(hooks.layers), hooks.num_heads
    if hooks.layers != list(range(L)):
        hooks.remove()
        raise CrossrouteError(f"head-out layers {hooks.layers} are not numbered 0..{L - 1}.")
    max_heads = max_heads_of(L * H, max_fraction)
    if base_gap is not None and len(base_gap) != n:
        hooks.remove()
        raise CrossrouteError(f"circuits: {len(base_gap)} base gaps for {n} prompt pairs; give the base's per-prompt "
                              "gaps on the same pairs.")
    flat = [(layer, h) for layer in range(L) for h in range(H)]
    budget = _Budget(0 if passes.reference else passes.max_cache_mb * 2 ** 20)
    corrupted = _Corrupted(model, hooks, budget)
    blocks = None if passes.reference else _CleanBlocks(hooks, budget)
    with _Frozen(model, hooks), progress_bar(show_progress) as bar:
        task = bar.add_task(f"{label}: attribution, activation patching, faithfulness", total=3 * len(batches))

        def tick() -> None:
            bar.advance(task)

        clean_p, corr_p, attr_p = _attribution_pass(model, hooks, batches, n, device, tick, corrupted, blocks)
        attr = attr_p.mean(0)
        top = sorted(flat, key=lambda lh: -abs(float(attr[lh])))[: max(0, min(confirm_top, L * H))]
        act_p, clean_run_p = _activation_pass(model, hooks, batches, n, device, top, tick, passes, corrupted, blocks)
        confirmed = torch.zeros(L, H, dtype=torch.bool)
        for lh in top:
            confirmed[lh] = True
        effect_p = torch.where(confirmed, act_p, attr_p)
        effect = effect_p.mean(0)
        gap_p = clean_p - corr_p
        scale_p = gap_p if base_gap is None else torch.as_tensor(np.asarray(base_gap, dtype=np.float64))
        sign = -1.0 if float(scale_p.mean()) < 0 else 1.0  # rank by s_h = −effect / G (by −effect when G = 0)
        ranking = sorted(flat, key=lambda lh: (sign * float(effect[lh]), lh))
        all_ks = prefix_sizes(L * H, include=(max_heads,))
        ks, keep_p, extra_p = _curve(model, hooks, batches, n, device, ranking, all_ks,
                                     (float(scale_p.mean()), target, max_heads), passes, corrupted, clean_run_p, corr_p,
                                     extra, tick)
    truncated = ks != all_ks
    scale, gap = float(scale_p.mean()), float(gap_p.mean())
    rec = (keep_p - corr_p[:, None]).mean(0)
    faith = [_ratio_or_none(float(v), scale) for v in rec]
    upto = len(ks) - 1 if truncated else len(ks)  # the evaluated run of prefix sizes, without a stopped curve's end
    sel = select_circuit(ks[:upto], [math.nan if f is None else f for f in faith[:upto]], target, max_heads,
                         total=L * H)
    i_star = ks.index(sel.size)
    neg = (-effect_p).numpy()
    scores = score_grid(neg, scale_p.numpy(), seed)
    eff_ci = _grid(effect_p.numpy(), lambda layer, h: mean_ci_of(effect_p[:, layer, h].numpy(), seed))
    warnings = _gap_warnings(gap, scale, base_gap is None)
    if faith[0] is not None and faith[0] >= target:
        warnings.append(f"with every head patched F = {faith[0]:.3f} >= target {target:g}: the heads are not needed "
                        "for this capability; the circuit still holds at least one head.")
    if sel.cap_binds:
        need = (f"reached first at {sel.smallest_reaching} heads" if sel.smallest_reaching is not None else
                "not reached up to the cap, where the curve stops; PatchPasses(full_curve=True) evaluates beyond it"
                if truncated else "reached not within any evaluated prefix")
        warnings.append(f"the size cap binds: {max_heads} heads ({max_fraction:.0%} of {L * H}) reach "
                        f"F = {sel.faithfulness:.3f} < target {target:g} ({need}).")
    act = torch.where(confirmed, act_p.mean(0), torch.tensor(float("nan"), dtype=torch.float64))
    names = [f"L{layer}.head.{h}" for layer, h in ranking]
    res = ModelCircuit(
        path="", n_pairs=n, metric_clean=float(clean_p.mean()), metric_corrupted=float(corr_p.mean()), gap=gap,
        gap_ci=mean_ci_of(gap_p.numpy(), seed), scale_gap=scale, capability=ratio_ci(gap_p.numpy(), scale_p.numpy(),
                                                                                    seed),
        attribution=attr.tolist(), activation=[[_none(v) for v in row] for row in act.tolist()],
        effect=effect.tolist(), effect_lo=eff_ci.get("lo", []), effect_hi=eff_ci.get("hi", []),
        score=scores.get("value", []), score_lo=scores.get("lo", []), score_hi=scores.get("hi", []),
        score_own_gap=[[_ratio_or_none(-v, gap) for v in row] for row in effect.tolist()],
        ranking=names, curve_k=ks, curve_faithfulness=faith,
        curve_faithfulness_own_gap=[_ratio_or_none(float(v), gap) for v in rec],
        circuit=names[: sel.size], faithfulness=_none(sel.faithfulness),
        faithfulness_ci=ratio_ci((keep_p[:, i_star] - corr_p).numpy(), scale_p.numpy(), seed),
        target=target, max_fraction=max_fraction, max_heads=max_heads, target_reached=sel.target_reached,
        cap_binds=sel.cap_binds, smallest_reaching_target=sel.smallest_reaching, curve_truncated=truncated,
        attribution_vs_activation=_agreement(attr, act, top), warnings=warnings,
        seconds=round(time.perf_counter() - t0, 3), units=hooks.units,
        per_prompt={"metric_clean": clean_p.tolist(), "metric_corrupted": corr_p.tolist(),
                    "effect": effect_p.tolist(), "circuit_metric": keep_p[:, i_star].tolist()})
    kept = HeadSetRun(clean_run_p.numpy(), corr_p.numpy(), extra_p[:, 0].numpy()) if extra else None
    return res, kept


@dataclass(frozen=True)
class HeadSetRun:
    """Per-prompt metrics of one model for an explicit head set S: clean, corrupted, and clean with S kept."""

    clean: np.ndarray
    corrupted: np.ndarray
    kept: np.ndarray

    def faithfulness(self, scale: np.ndarray | None = None) -> float:
        """F(S) = mean(kept − corrupted) / mean(scale) (scale: the base's per-prompt gaps; default own gap)."""
        den = self.clean - self.corrupted if scale is None else np.asarray(scale, dtype=np.float64)
        return float(np.mean(self.kept - self.corrupted) / np.mean(den)) if np.mean(den) else float("nan")


def head_set_metrics(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[Pair],
                     heads: list[str], batch_size: int = 32, passes: PatchPasses | dict[str, Any] | None = None
                     ) -> HeadSetRun:
    """Per-prompt metrics for an explicit head set S (e.g. the base circuit inside a fine-tuned model): per batch one
    corrupted forward, then the clean run and the run with S kept (two copies, stacked off the reference path)."""
    passes = patch_passes(passes)
    keep = {parse_head(u) for u in heads}
    device = next(model.parameters()).device
    batches = make_pair_batches(tokenizer, pairs, batch_size)
    hooks = HeadHooks(model)
    n = len(pairs)
    clean_p, corr_p, kept_p = (torch.zeros(n, dtype=torch.float64) for _ in range(3))
    with _Frozen(model, hooks), torch.no_grad():
        copies = [{}, _keep_masks(hooks, keep)]
        for b in batches:
            b = _to(b, device)
            corr, mc = _record_corrupted(model, hooks, b)
            _add_by_pair(corr_p, mc, b)
            clean, kept = _patched_rows(model, hooks, b, corr, copies, _per_forward(b, passes))
            _add_by_pair(clean_p, clean, b)
            _add_by_pair(kept_p, kept, b)
            hooks.reset()
    return HeadSetRun(clean_p.numpy(), corr_p.numpy(), kept_p.numpy())


# ----------------------------------------------------------------------------- across models


def overlap(circuit: list[str], base_circuit: list[str]) -> float | None:
    """|C ∩ C_base| / |C_base| (None when the base circuit is empty): the set overlap, no CI."""
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


NORMALISATION = ("every model's head effects and faithfulness are divided by the BASE model's clean - corrupted "
                 "gap on the same pairs (normalising by a model's own gap makes a collapsed capability look like "
                 "a stronger head); raw effects and each model's own gap are reported beside them")
RETENTION_DEFINITION = ("retention(M) = mean over prompts of [m_M(base circuit kept) - m_M(corrupted)] / mean of "
                        "[m_base(base circuit kept) - m_base(corrupted)]: the share of what the base circuit "
                        "recovers in the base that the same heads still recover in M, both on the base's metric "
                        "scale (1 = all of it, 0 = none; a lost capability lowers it); overlap = |C_M & C_base| / "
                        "|C_base| of the capped circuits, a set statistic without CI")


@dataclass
class CircuitsResult:
    """Circuits of a base and fine-tuned models on one domain; `to_json()` is circuits_{domain}.json."""

    domain: str
    pairs: dict[str, Any]
    metric: str
    faithfulness_definition: str
    normalisation: str
    retention_definition: str
    ci_method: str
    target: float
    max_fraction: float
    delta: float
    layout: dict[str, int]
    models: dict[str, dict[str, Any]]  # "base" first; each a ModelCircuit as a dict
    retention: dict[str, dict[str, Any]]  # name -> {value, lo, hi, n}
    overlap: dict[str, float | None]
    base_circuit_faithfulness: dict[str, dict[str, Any]]  # base scale, with CI; own_gap beside
    score_shift: dict[str, list[list[float | None]]]  # s_h(M) − s_h(base), base scale
    score_shift_ci: dict[str, dict[str, list[list[Any]]]]  # name -> {lo, hi, p}
    rl: str | None = None
    sft: str | None = None
    differential_vulnerability: list[list[float | None]] | None = None  # s_h(RL) − s_h(SFT)
    differential_vulnerability_ci: dict[str, list[list[Any]]] | None = None  # {lo, hi, p}
    retention_difference: dict[str, Any] | None = None  # retention(RL) − retention(SFT), paired
    vulnerable: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    units: dict[str, Any] = field(default_factory=dict)  # UnitMap.to_json() of the base

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _prompt_arrays(res: ModelCircuit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(−effect [n, L, H], gap [n], circuit recovery m(circuit kept) − m(corrupted) [n]) of one model."""
    pp = res.per_prompt
    clean, corr = np.asarray(pp["metric_clean"]), np.asarray(pp["metric_corrupted"])
    return -np.asarray(pp["effect"]), clean - corr, np.asarray(pp["circuit_metric"]) - corr


def _sub(grid: dict[str, list[list[Any]]], keys: tuple[str, ...] = ("lo", "hi", "p")) -> dict[str, list[list[Any]]]:
    return {k: grid[k] for k in keys if k in grid}


def compare_to_base(base: ModelCircuit, model: ModelCircuit, in_model: HeadSetRun, seed: int = 0
                    ) -> dict[str, Any]:
    """Retention (CI), base-circuit faithfulness on the base scale (CI) and per-head score shifts (paired)."""
    neg_b, gap_b, rec_b = _prompt_arrays(base)
    neg_m, _, _ = _prompt_arrays(model)
    rec_m = in_model.kept - in_model.corrupted
    shift = shift_grid(neg_b, neg_m, gap_b, seed)
    bcf = ratio_ci(rec_m, gap_b, seed)
    bcf["own_gap"] = _none(in_model.faithfulness())
    return {"retention": ratio_ci(rec_m, rec_b, seed), "overlap": overlap(model.circuit, base.circuit),
            "base_circuit_faithfulness": bcf, "score_shift": shift.get("value", []), "score_shift_ci": _sub(shift),
            "recovery": rec_m}


def rl_vs_sft(base: ModelCircuit, rl: ModelCircuit, sft: ModelCircuit, rec_rl: np.ndarray, rec_sft: np.ndarray,
              delta: float, seed: int = 0) -> dict[str, Any]:
    """Differential vulnerability s_h(RL) − s_h(SFT) per head and retention(RL) − retention(SFT), paired."""
    neg_b, gap_b, rec_b = _prompt_arrays(base)
    neg_rl, neg_sft = _prompt_arrays(rl)[0], _prompt_arrays(sft)[0]
    dv = shift_grid(neg_sft, neg_rl, gap_b, seed)
    in_base = set(base.circuit)
    vul = []
    for layer, row in enumerate(dv.get("value", [])):
        for h, v in enumerate(row):
            s_rl, s_sft = rl.score[layer][h], sft.score[layer][h]
            if v is None or s_rl is None or s_sft is None or not s_sft < s_rl - delta:
                continue
            u = f"L{layer}.head.{h}"
            vul.append({"head": u, "s_base": base.score[layer][h], "s_rl": s_rl, "s_sft": s_sft,
                        "differential_vulnerability": v, "lo": dv["lo"][layer][h], "hi": dv["hi"][layer][h],
                        "p": dv["p"][layer][h], "significant": dv["significant"][layer][h],
                        "raw_effect_rl": rl.effect[layer][h], "raw_effect_sft": sft.effect[layer][h],
                        "in_base_circuit": u in in_base})
    return {"differential_vulnerability": dv.get("value", []), "differential_vulnerability_ci": _sub(dv),
            "retention_difference": paired_ratio_diff(rec_sft, rec_b, rec_rl, rec_b, seed),
            "vulnerable": sorted(vul, key=lambda x: -x["differential_vulnerability"])}


def _layout(res: ModelCircuit) -> dict[str, int]:
    return {"num_layers": len(res.effect), "num_heads": len(res.effect[0]),
            "head_dim": int(res.units["head_layout"]["head_dim"])}


def run_circuits(
    base: str | Path,
    models: str | dict[str, str | Path],
    domain: str | Domain,
    n: int = 64,
    target: float = DEFAULT_TARGET,
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
    max_fraction: float = DEFAULT_MAX_FRACTION,
    passes: PatchPasses | dict[str, Any] | None = None,
) -> CircuitsResult:
    """Circuits of `base` and every model in `models` (NAME=PATH list or dict) on `domain`'s pairs, base scale.

    Writes RUN_DIR/results/circuits_{domain}.json when run_dir is given. Vulnerable heads and
    differential vulnerability need models named `rl_name` and `sft_name` (default rl, sft). `passes`: how the
    patching forwards are batched (PatchPasses); the base circuit inside each model is measured in its passes.
    """
    t0 = time.perf_counter()
    plan = patch_passes(passes)
    named = parse_models(models) if models else {}
    name, pairs = resolve_pairs(domain, n, seed, split)
    if not pairs:
        raise CrossrouteError(f"domain {name!r}: no prompt pairs could be built.")
    if not delta >= 0:
        raise CrossrouteError(f"--delta {delta}: the vulnerability margin must be >= 0.")
    max_heads_of(1, max_fraction)  # validate before loading anything
    dev = default_device(device)
    results: dict[str, ModelCircuit] = {}
    compared: dict[str, dict[str, Any]] = {}
    layout: dict[str, int] = {}
    for mname, path in {"base": str(base), **named}.items():
        loaded = None  # free the previous model before loading the next (peak: one model, not two)
        loaded = load_model(path, dtype=torch.float32, device=dev)
        base_gap = None if mname == "base" else _prompt_arrays(results["base"])[1]
        res, inside = _circuit(loaded.model, loaded.tokenizer, pairs, target, confirm_top, batch_size, show_progress,
                               f"circuits {mname}", max_fraction, base_gap, seed, plan,
                               None if mname == "base" else results["base"].circuit)
        res.path = str(loaded.path)
        if layout and _layout(res) != layout:
            raise CrossrouteError(f"{path}: head layout {_layout(res)} differs from the base's {layout}; circuits "
                                  "compare fine-tunes of one base.")
        layout = _layout(res)
        results[mname] = res
        if inside is not None:
            compared[mname] = compare_to_base(results["base"], res, inside, seed)
    base_res = results["base"]
    _, gap_b, rec_b = _prompt_arrays(base_res)
    bcf_base = ratio_ci(rec_b, gap_b, seed)
    bcf_base["own_gap"] = base_res.faithfulness
    out = CircuitsResult(
        domain=name,
        pairs={"n": len(pairs), "split": split, "seed": seed,
               "rule": PAIR_RULES.get(name, "from a JSONL file"),
               "with_wrong": sum(p.wrong is not None for p in pairs),
               "examples": [asdict(p) for p in pairs[:3]]},
        metric=("log p(clean answer + eos | prompt), teacher-forced, summed over answer tokens; minus log p(wrong "
                "answer + eos | prompt) for pairs that give one; mean over pairs"),
        faithfulness_definition=("patching variant: F(S) = (m(clean run, heads outside S patched to their corrupted "
                                 "outputs) - m(corrupted)) / (base model's m(clean) - m(corrupted)); not mean "
                                 "ablation; circuit = smallest top-ranked prefix with F >= target, at most "
                                 "max_fraction of all heads (the cap binds when the target is not reached within it)"),
        normalisation=NORMALISATION, retention_definition=RETENTION_DEFINITION, ci_method=CI_METHOD,
        target=target, max_fraction=max_fraction, delta=delta, layout=layout,
        models={m: asdict(r) for m, r in results.items()},
        retention={"base": ratio_ci(rec_b, rec_b, seed), **{m: c["retention"] for m, c in compared.items()}},
        overlap={"base": overlap(base_res.circuit, base_res.circuit),
                 **{m: c["overlap"] for m, c in compared.items()}},
        base_circuit_faithfulness={"base": bcf_base,
                                   **{m: c["base_circuit_faithfulness"] for m, c in compared.items()}},
        score_shift={m: c["score_shift"] for m, c in compared.items()},
        score_shift_ci={m: c["score_shift_ci"] for m, c in compared.items()}, units=base_res.units)
    if rl_name in compared and sft_name in compared:
        vs = rl_vs_sft(base_res, results[rl_name], results[sft_name], compared[rl_name]["recovery"],
                       compared[sft_name]["recovery"], delta, seed)
        out.rl, out.sft = rl_name, sft_name
        out.differential_vulnerability = vs["differential_vulnerability"]
        out.differential_vulnerability_ci = vs["differential_vulnerability_ci"]
        out.retention_difference = vs["retention_difference"]
        out.vulnerable = vs["vulnerable"]
    out.seconds = round(time.perf_counter() - t0, 3)
    if run_dir is not None:
        RunDir(Path(run_dir)).write_result(result_name("circuits", name), out.to_json())
    return out
