"""Protect earlier domains' conflict units during a later RL stage (DESIGN.md §2.5, §3.2).

At the start of a stage on domain B, from probe batches of each earlier domain A (at the stage's
initial weights θ_0):

* pool_A  = units active for both A and B (shared routes, `damage.shared_units`: MLP neurons,
  attention heads, KV groups; "other" tensors such as norms and embeddings are never protected);
* a predicted damage attribution. No later update exists yet, so the update is predicted as one
  gradient step of B's proxy loss: δ_pred = −g_B · s, with s chosen so that ‖δ_pred‖ equals an
  Adam-like displacement lr · steps · sqrt(N) (N = number of trainable entries; each Adam step
  moves every entry by about lr). attribution_u(A) = δ_u · (g_A + ½ H_A δ)_u (`damage.attribution`,
  one gradient + HVP of A's proxy loss, `hvp.grad_and_hvp`);
* score_u = Σ_A [u ∈ pool_A] · attribution_u(A); the protected set is the units with score > 0,
  largest first, at most ceil(budget · U) of them (U = all neuron/head/KV units of the model).

Modes (one per stage, `protect:` in the stage's YAML):

* freeze: the protected slices' gradients are zeroed before each optimizer step and their values
  are restored after it, so weight decay and Adam moments cannot move them: bit-identical.
* project: an orthonormal basis U of the top-`rank` Ritz directions of H_A restricted to the
  protected entries (Lanczos started from δ_pred restricted there, per earlier domain, then
  stacked and orthonormalised) is computed at the start, and again every `refresh_every` steps
  (0: never; a refresh starts Lanczos from θ − θ_0 restricted, or δ_pred while that is zero).
  The gradient's component along U is removed before the step, and the actual update of the
  protected entries is projected after the step (Adam rescales entries, so only the second makes
  the update exactly orthogonal to U).
* anchor: grad += strength · w_u · (θ − θ_0) on the protected entries before each step, the
  gradient of ½ · strength · Σ_u w_u ‖θ_u − θ0_u‖²; w_u = score_u / mean(score over the set).
  It is added after TRL's gradient clipping, so it is not clipped.

The callback keeps a reference to the (unwrapped) model it was built for: one process (CPU or one GPU), or
data-parallel processes that each hold the whole model (DDP, ZeRO-1/2), where every process selects the same units
from the same weights and probes and edits its own replica after the gradients were averaged. Sharded parameters
(ZeRO-3, FSDP) are refused when the stage starts (`check_whole_parameters`).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from crossroute.analyze.damage import attribution
from crossroute.analyze.subspace import lanczos, shared_units
from crossroute.core.errors import CrossrouteError
from crossroute.domains.domain import Domain
from crossroute.domains.files import get_domain
from crossroute.measure.hvp import Packing, grad_and_hvp, packed_hvp
from crossroute.measure.proxy import domain_examples, gradient_and_loss, make_batches
from crossroute.model.units import UnitMap

PROTECT_KINDS: tuple[str, ...] = ("neuron", "head", "kv", "router")


class ProtectConfig(BaseModel):
    """A stage's `protect:` block (see the module docstring and configs/protected_sequence.yaml)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["freeze", "project", "anchor"]
    budget: float = Field(0.05, gt=0, le=1)  # fraction of the model's neuron/head/KV units
    domains: list[str] = Field(min_length=1)  # earlier domains to protect
    rank: int = Field(8, ge=1)  # project: Ritz directions per earlier domain
    refresh_every: int = Field(0, ge=0)  # project: recompute the subspace every N steps (0: never)
    strength: float = Field(1.0, ge=0)  # anchor: λ
    n: int = Field(32, gt=0)  # probe examples per domain (gradients, HVP, routes)
    batch_size: int = Field(16, gt=0)
    q: float = Field(10.0, gt=0, le=100)  # routes: top-q % most active units per layer are active
    lanczos_k: int = Field(0, ge=0)  # project: Lanczos steps (0: 2 · rank)



# ----------------------------------------------------------------------------- selection


@dataclass
class Protected:
    """The protected units with their scores, and per parameter the entries they cover."""

    units: list[str]
    scores: list[float]
    masks: dict[str, torch.Tensor]  # parameter -> bool mask (CPU)
    weights: dict[str, torch.Tensor]  # parameter -> per-entry w_u (0 outside the set; CPU, fp32)
    pool_sizes: dict[str, int] = field(default_factory=dict)  # shared units per earlier domain
    n_units_total: int = 0
    delta_scale: float = 0.0

    @property
    def n_entries(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))


def unit_weights(umap: UnitMap, units: Sequence[str], values: Sequence[float]
                 ) -> dict[str, torch.Tensor]:
    """Per parameter touched by `units`, a fp32 tensor holding each unit's value on its entries."""
    out: dict[str, torch.Tensor] = {}
    for u, v in zip(units, values, strict=True):
        for name, sel in umap.select([u]).items():
            w = out.setdefault(name, torch.zeros(umap.shapes[name], dtype=torch.float32))
            if sel is None:
                w[...] = v
            else:
                sel.put(w, v)
    return out


def _flat_scores(umap: UnitMap, attr: dict[str, torch.Tensor]) -> dict[str, float]:
    return {u: float(v) for k in umap.partition_kinds if k in PROTECT_KINDS
            for u, v in zip(umap.ids(k), umap.flat(attr, k).tolist(), strict=True)}


def predicted_delta(g_b: dict[str, torch.Tensor], norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """δ_pred = −g_B · s with ‖δ_pred‖ = `norm`; returns (δ_pred, s)."""
    gn = math.sqrt(sum(float(t.double().square().sum()) for t in g_b.values()))
    s = norm / gn if gn > 0 else 0.0
    return {k: -t * s for k, t in g_b.items()}, s


def select_protected(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     earlier: Sequence[Domain], current: Domain, budget: float,
                     delta_norm: float, n: int = 32, batch_size: int = 16, q: float = 10.0,
                     seed: int = 0) -> tuple[Protected, dict[str, torch.Tensor], list[list]]:
    """The protected set (module docstring); also δ_pred and A's probe batches per earlier domain."""
    umap = UnitMap.of_model(model).require(("neuron", "head"))
    g_b, _ = gradient_and_loss(model, tokenizer, current, n, batch_size, seed, split="train")
    delta, s = predicted_delta(g_b, delta_norm)
    shared = shared_units(model, tokenizer, current, list(earlier), n=n, q=q,
                          batch_size=batch_size, seed=seed)
    score: dict[str, float] = {}
    pool_sizes: dict[str, int] = {}
    all_batches = []
    for a in earlier:
        batches = make_batches(tokenizer, domain_examples(a, n, seed, "train"), batch_size,
                               a if isinstance(a, Domain) else None)
        all_batches.append(batches)
        _, g_a, hd = grad_and_hvp(model, batches, delta)
        flat = _flat_scores(umap, attribution(umap, delta, g_a, hd))
        pool = {u for k in PROTECT_KINDS for u in shared[a.name].get(k, set())}
        pool_sizes[a.name] = len(pool)
        for u in pool:
            score[u] = score.get(u, 0.0) + flat[u]
    total = sum(umap.n_units(k) for k in umap.partition_kinds if k in PROTECT_KINDS)
    k = min(total, max(1, math.ceil(round(total * budget, 9))))
    ranked = sorted(((v, u) for u, v in score.items() if v > 0), key=lambda t: (-t[0], t[1]))[:k]
    units = [u for _, u in ranked]
    vals = [v for v, _ in ranked]
    mean = sum(vals) / len(vals) if vals else 1.0
    masks = umap.mask(units) if units else {}
    weights = unit_weights(umap, units, [v / mean for v in vals])
    return (Protected(units, vals, masks, weights, pool_sizes, total, s), delta, all_batches)


# ----------------------------------------------------------------------------- the three operations


def project_out(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """v − U Uᵀ v for an orthonormal basis U (n × r): the part of v orthogonal to span(U)."""
    if basis.numel() == 0:
        return v
    b = basis.to(v.device, torch.float64)
    vd = v.to(torch.float64)
    return (vd - b @ (b.T @ vd)).to(v.dtype)


def orthonormal_basis(vectors: torch.Tensor, tol: float = 1e-8) -> torch.Tensor:
    """Orthonormal basis (float64, n × r') of the columns' span; near-dependent columns dropped."""
    if vectors.numel() == 0 or vectors.shape[1] == 0:
        return vectors.to(torch.float64)
    qm, r = torch.linalg.qr(vectors.to(torch.float64))
    keep = r.diagonal().abs() > tol * max(1.0, float(r.diagonal().abs().max()))
    qm = qm[:, keep]
    # a second pass for numerical orthogonality
    q2, _ = torch.linalg.qr(qm)
    return q2


def anchor_penalty(params: dict[str, torch.Tensor], theta0: dict[str, torch.Tensor],
                   weights: dict[str, torch.Tensor], strength: float) -> torch.Tensor:
    """½ · strength · Σ w ⊙ (θ − θ0)², summed over the weighted entries (differentiable)."""
    terms = [(weights[n].to(p.device, p.dtype) * (p - theta0[n].to(p.device, p.dtype)).square()).sum()
             for n, p in params.items() if n in weights]
    return 0.5 * strength * torch.stack(terms).sum() if terms else torch.zeros(())


def anchor_grad(params: dict[str, torch.Tensor], theta0: dict[str, torch.Tensor],
                weights: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    """The gradient of `anchor_penalty`: strength · w ⊙ (θ − θ0)."""
    return {n: strength * weights[n].to(p.device, p.dtype) * (p.detach() - theta0[n].to(p.device, p.dtype))
            for n, p in params.items() if n in weights}


# ----------------------------------------------------------------------------- the callback


def check_whole_parameters(model: torch.nn.Module) -> None:
    """Refuse a model whose parameters are sharded across processes (DeepSpeed ZeRO-3, FSDP): protect edits slices
    of whole parameters, which a process holding a shard does not have."""
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id") or (p.requires_grad and p.numel() == 0) or type(p.data).__name__ == "DTensor":
            raise CrossrouteError(f"protect: parameter {name!r} is sharded across processes (ZeRO-3 or FSDP); "
                                  "protect needs whole parameters on every process: train this stage with ZeRO-2, "
                                  "DDP or one process.")


class Protector:
    """Applies a ProtectConfig to `model` during a Trainer/GRPOTrainer run (module docstring), through the
    TrainerCallback events it defines; `protect_callback` makes one a TrainerCallback."""

    def __init__(self, cfg: ProtectConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 current: Domain | str, learning_rate: float, steps: int, seed: int = 0,
                 earlier: list[Domain] | None = None) -> None:
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.current = get_domain(current) if isinstance(current, str) else current
        self.earlier = earlier if earlier is not None else [get_domain(d) for d in cfg.domains]
        if self.current.name in cfg.domains:
            raise CrossrouteError(f"protect.domains lists the stage's own domain {self.current.name!r}.")
        self.lr = float(learning_rate)
        self.steps = int(steps)
        self.seed = seed
        self.protected: Protected | None = None
        self.basis: torch.Tensor | None = None  # project: n_entries × r, float64
        self.params: dict[str, torch.nn.Parameter] = {}
        self.masks: dict[str, torch.Tensor] = {}  # on the parameters' devices
        self.theta0: dict[str, torch.Tensor] = {}  # protected parameters at the stage start
        self.before: dict[str, torch.Tensor] = {}  # project: protected entries before the step
        self.delta: dict[str, torch.Tensor] = {}
        self.batches: list[list] = []
        self.eigenvalues: list[list[float]] = []
        self.seconds = {"select": 0.0, "subspace": 0.0, "steps": 0.0}
        self.refreshes = 0

    # -- setup
    def setup(self) -> None:
        t0 = time.perf_counter()
        check_whole_parameters(self.model)
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        norm = self.lr * self.steps * math.sqrt(n_train)
        self.protected, self.delta, self.batches = select_protected(
            self.model, self.tokenizer, self.earlier, self.current, self.cfg.budget, norm,
            self.cfg.n, self.cfg.batch_size, self.cfg.q, self.seed)
        named = dict(self.model.named_parameters())
        self.params = {n: named[n] for n in self.protected.masks}
        self.masks = {n: m.to(named[n].device) for n, m in self.protected.masks.items()}
        self.theta0 = {n: p.detach().clone() for n, p in self.params.items()}
        self.seconds["select"] = time.perf_counter() - t0
        if self.cfg.mode == "project":
            self.compute_subspace(self.delta)

    def pack(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.masks:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([t[n].detach().to(torch.float64).cpu()[self.masks[n].cpu()]
                          for n in self.masks])

    def unpack(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        out, off = {}, 0
        for n, m in self.masks.items():
            s = int(m.sum())
            t = torch.zeros(m.shape, dtype=torch.float64)
            t[m.cpu()] = v[off: off + s].cpu()
            out[n] = t
            off += s
        return out

    def compute_subspace(self, start: dict[str, torch.Tensor]) -> None:
        """Top-`rank` Ritz directions of each H_A on the protected entries, orthonormalised."""
        t0 = time.perf_counter()
        v0 = self.pack(start)
        cols, self.eigenvalues = [], []
        if v0.numel() and float(v0.norm()) > 0:
            k = self.cfg.lanczos_k or 2 * self.cfg.rank
            packing = Packing(self.model, self.masks, dtype=torch.float64)  # the order of pack(): masks' order
            for batches in self.batches:
                def matvec(v: torch.Tensor, batches: list = batches) -> torch.Tensor:
                    return packed_hvp(self.model, batches, packing, v.to(packing.device)).cpu()

                lz = lanczos(matvec, v0, k)
                r = min(self.cfg.rank, lz.vectors.shape[1])
                cols.append(lz.vectors[:, :r])
                self.eigenvalues.append(lz.eigenvalues[:r].tolist())
        self.basis = orthonormal_basis(torch.cat(cols, 1)) if cols else torch.zeros(v0.numel(), 0,
                                                                                     dtype=torch.float64)
        self.seconds["subspace"] += time.perf_counter() - t0

    def _project_dict(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.unpack(project_out(self.pack(tensors), self.basis))

    # -- Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.protected is None:
            self.setup()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        n = self.cfg.refresh_every
        if self.cfg.mode == "project" and n and state.global_step and state.global_step % n == 0:
            moved = {k: (p.detach() - self.theta0[k]) for k, p in self.params.items()}
            start = moved if float(self.pack(moved).norm()) > 0 else self.delta
            self.compute_subspace(start)
            self.refreshes += 1

    @torch.no_grad()
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        mode = self.cfg.mode
        if mode == "freeze":
            for n, p in self.params.items():
                if p.grad is not None:
                    p.grad[self.masks[n]] = 0
        elif mode == "anchor":
            for n, g in anchor_grad(self.params, self.theta0, self.protected.weights, self.cfg.strength).items():
                p = self.params[n]
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(g.to(p.grad.dtype))
        elif mode == "project" and self.basis is not None and self.basis.numel():
            grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in self.params.items()}
            proj = self._project_dict(grads)
            for n, p in self.params.items():
                if p.grad is not None:
                    m = self.masks[n]
                    p.grad[m] = proj[n].to(p.device, p.grad.dtype)[m]
            self.before = {n: p.detach().clone() for n, p in self.params.items()}
        self.seconds["steps"] += time.perf_counter() - t0

    @torch.no_grad()
    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        if self.cfg.mode == "freeze":
            for n, p in self.params.items():
                m = self.masks[n]
                p[m] = self.theta0[n][m]
        elif self.cfg.mode == "project" and self.before:
            upd = {n: p.detach() - self.before[n] for n, p in self.params.items()}
            proj = self._project_dict(upd)
            for n, p in self.params.items():
                m = self.masks[n]
                p[m] = (self.before[n].to(torch.float64) + proj[n].to(p.device))[m].to(p.dtype)
            self.before = {}
        self.seconds["steps"] += time.perf_counter() - t0

    # -- report
    def summary(self) -> dict[str, Any]:
        pr = self.protected
        out: dict[str, Any] = {**self.cfg.model_dump(), "stage_domain": self.current.name,
                               "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}
        if pr is not None:
            out.update({"n_units": len(pr.units), "n_units_total": pr.n_units_total,
                        "n_entries": pr.n_entries, "pool_sizes": pr.pool_sizes,
                        "delta_scale": pr.delta_scale,
                        "units": [{"unit": u, "score": s} for u, s in zip(pr.units, pr.scores, strict=True)]})
        if self.cfg.mode == "project":
            out["subspace_dim"] = int(self.basis.shape[1]) if self.basis is not None else 0
            out["eigenvalues"] = self.eigenvalues
            out["refreshes"] = self.refreshes
        return out


@functools.cache
def _callback_class() -> type:
    from transformers import TrainerCallback  # the trainer stack: imported only when a protected stage trains

    return type("ProtectCallback", (Protector, TrainerCallback), {"__doc__": Protector.__doc__})


def protect_callback(cfg: ProtectConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     current: Domain | str, learning_rate: float, steps: int, seed: int = 0,
                     earlier: list[Domain] | None = None) -> Protector:
    """A TrainerCallback (a Protector) for one protected stage; transformers' trainer stack is imported here, so
    that reading a run's config (diff, report) does not import it."""
    return _callback_class()(cfg, model, tokenizer, current, learning_rate, steps, seed=seed, earlier=earlier)
