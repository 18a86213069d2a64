"""Hessian-vector products of a domain's proxy loss (DESIGN.md §2.5).

H v for L = Σ_batches proxy_loss(batch, total) (summed answer-token NLL / total answer tokens over
all micro-batches, the normalisation of crossroute.gradients), accumulated micro-batch by
micro-batch, so the result does not depend on the batch size.

Methods:
- ``"double_backward"`` (default): g = ∂L/∂θ with create_graph=True, then ∂(g·v)/∂θ.
- ``"fwd_rev"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` through
  ``torch.func.functional_call``; works with transformers' Qwen3 in eager attention (agrees with
  double backward to 1e-9 in float64) but was ~6x slower on CPU for the embedded default (13.5 s
  vs 2.4 s per product over 64 examples), so it is the alternative, not the default.

Attention must be twice differentiable: fused SDPA / flash kernels have no double backward (seen
on CPU flash and GPU cuDNN). Load models with ``attn_implementation="eager"`` for HVPs; the
functions here also switch a model to eager attention for the duration of the pass (and back) when
transformers allows it, and refuse otherwise.

`params` restricts the product to a subset of parameter names (say, some layers or module types
of a large model): every other parameter is a constant (requires_grad False during the pass,
restored after), so the result is the corresponding block of H times v's block.

`packed_hvp` restricts further, to some entries of those tensors (`Packing`: one bool mask per
tensor, e.g. the conflict subspace's shared-route units): v and H v are one flat vector over the
selected entries, on the model's device, fp32 (or the parameters' dtype if wider), and the product
is gathered micro-batch by micro-batch, so no full-size accumulator, CPU copy or ∇L outlives a
pass. `hvp_pass_bytes` estimates what one such pass holds (memory checks before long runs).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from transformers import PreTrainedModel

from crossroute.core.errors import CrossrouteError
from crossroute.measure.proxy import Batch, n_label_tokens, proxy_loss

LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
METHODS: tuple[str, ...] = ("double_backward", "fwd_rev")


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run the body with eager (twice-differentiable) attention; restore the previous mode after."""
    cfg = getattr(model, "config", None)
    current = getattr(cfg, "_attn_implementation", None) if cfg is not None else None
    if current in (None, "eager"):
        yield
        return
    setter = getattr(model, "set_attn_implementation", None)
    can = getattr(model, "_can_set_attn_implementation", lambda: setter is not None)
    if setter is None or not can():
        raise CrossrouteError(
            f"the model runs attention as {current!r}, which has no double backward; load it "
            "with attn_implementation='eager' for Hessian-vector products.")
    setter("eager")
    try:
        yield
    finally:
        setter(current)


@contextlib.contextmanager
def only_requires_grad(model: torch.nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Within the body only `names` require grad; every flag is restored afterwards."""
    keep = set(names)
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in keep)
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])


def _select(model: torch.nn.Module, params: Sequence[str] | None) -> list[tuple[str, torch.nn.Parameter]]:
    named = dict(model.named_parameters())
    if params is None:
        return [(n, p) for n, p in named.items() if p.requires_grad]
    unknown = [n for n in params if n not in named]
    if unknown:
        raise CrossrouteError(f"no parameter named {unknown[0]!r} in the model; pass names as "
                              "model.named_parameters() spells them.")
    return [(n, named[n]) for n in dict.fromkeys(params)]


def _loss_fn(batches: list[Batch], loss_fn: LossFn | None) -> LossFn:
    if loss_fn is not None:
        return loss_fn
    total = n_label_tokens(batches)
    return lambda m, b: proxy_loss(m, b, total)  # type: ignore[arg-type]


def _acc_dtype(p: torch.Tensor, acc_dtype: torch.dtype | None = None) -> torch.dtype:
    """Accumulator dtype: `acc_dtype` when given, else the parameter's dtype widened to at least fp32."""
    return acc_dtype if acc_dtype is not None else torch.promote_types(p.dtype, torch.float32)


def grad_and_hvp(
    model: PreTrainedModel | torch.nn.Module,
    batches: list[Batch],
    vector: dict[str, torch.Tensor],
    params: Sequence[str] | None = None,
    method: str = "double_backward",
    loss_fn: LossFn | None = None,
    out_device: str | torch.device | None = "cpu",
    with_grad: bool = True,
    acc_dtype: torch.dtype | None = None,
) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(L, ∇L, H v) over `params` (default: all trainable) from the same passes, fp32 or wider.

    Memory beyond the model and the pass itself: the vector, ∇L and H v, each at `acc_dtype` (default:
    the parameter dtype widened to fp32, i.e. 4+4+4 bytes per bf16 parameter). For models near the
    device's size, `with_grad=False` drops the ∇L accumulator (∇L comes back empty) and
    `acc_dtype=torch.bfloat16` keeps vector and H v in the parameters' own 2 bytes (H v summed over
    micro-batches in bf16: about 3 significant digits).

    `vector` maps parameter names to tensors of their shapes; names of `params` it lacks are zero.
    `loss_fn(model, batch)` replaces the proxy loss (then each batch's value is summed as is).
    Results live on `out_device` (None: the parameters' device). The model's .grad fields are not
    touched; its train/eval mode, requires_grad flags and attention mode are restored.
    """
    if method not in METHODS:
        raise CrossrouteError(f"unknown HVP method {method!r}; use one of {', '.join(METHODS)}.")
    named = _select(model, params)
    if not named:
        raise CrossrouteError("no parameters to differentiate: `params` is empty or nothing "
                              "requires grad.")
    fn = _loss_fn(batches, loss_fn)
    vecs = [vector[n].to(device=p.device, dtype=_acc_dtype(p, acc_dtype)) if n in vector
            else torch.zeros(p.shape, dtype=_acc_dtype(p, acc_dtype), device=p.device) for n, p in named]
    for (n, p), v in zip(named, vecs, strict=True):
        if v.shape != p.shape:
            raise CrossrouteError(f"vector[{n!r}] has shape {tuple(v.shape)}, parameter "
                                  f"{tuple(p.shape)}.")
    g_acc = [torch.zeros_like(v) for v in vecs] if with_grad else []
    h_acc = [torch.zeros_like(v) for v in vecs]
    loss_sum = 0.0
    with contextlib.closing(_passes(model, batches, fn, named, vecs, method, with_grad)) as passes:
        for loss, gs, hs in passes:
            loss_sum += loss
            for a, g in zip(g_acc, gs or [], strict=False):  # gs is None without with_grad
                if g is not None:
                    a.add_(g)  # in place, cast into the accumulator: no full-size temporary
            for a, h in zip(h_acc, hs, strict=True):
                if h is not None:
                    a.add_(h)
            del gs, hs
    names = [n for n, _ in named]
    dev = out_device
    return (loss_sum,
            {n: (a if dev is None else a.to(dev)) for n, a in zip(names, g_acc, strict=False)},
            {n: (a if dev is None else a.to(dev)) for n, a in zip(names, h_acc, strict=True)})


def hvp(
    model: PreTrainedModel | torch.nn.Module,
    batches: list[Batch],
    vector: dict[str, torch.Tensor],
    params: Sequence[str] | None = None,
    method: str = "double_backward",
    loss_fn: LossFn | None = None,
    out_device: str | torch.device | None = "cpu",
    acc_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """H v of the proxy loss over `batches` (see module docstring and `grad_and_hvp`); no ∇L is kept."""
    return grad_and_hvp(model, batches, vector, params, method, loss_fn, out_device, with_grad=False,
                        acc_dtype=acc_dtype)[2]


# ----------------------------------------------------------------------------- packed, entry-restricted products

# The double-backward graph of one micro-batch, as a multiple of the forward's saved activations (eager attention).
# Calibrated on benchmarks/bench_gpu.py's Qwen3-0.6B rows (RESULTS.md: peaks 22.1 GiB at 4 x 2 x 512 tokens and
# 54.8 GiB at 1 x 8 x 512, less the model and the full-size v, g, Hv): 2.8-3.1.
DOUBLE_BACKWARD_FACTOR = 3.0


class Packing:
    """A fixed order over selected entries of named parameters (one bool mask each): flat vectors over them.

    Vectors live on the parameters' device in `dtype` (default: the parameters' dtype widened to at least fp32).
    """

    def __init__(self, model: torch.nn.Module, masks: Mapping[str, torch.Tensor],
                 dtype: torch.dtype | None = None) -> None:
        named = dict(model.named_parameters())
        for name, m in masks.items():
            if name not in named:
                raise CrossrouteError(f"no parameter named {name!r} in the model; pass mask names as "
                                      "model.named_parameters() spells them.")
            if tuple(m.shape) != tuple(named[name].shape):
                raise CrossrouteError(f"mask for {name!r} has shape {tuple(m.shape)}, parameter "
                                      f"{tuple(named[name].shape)}.")
        self.names = list(masks)
        first = named[self.names[0]] if self.names else next(iter(named.values()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.masks = {n: m.to(device=self.device, dtype=torch.bool) for n, m in masks.items()}
        self._other_masks: dict[tuple[str, torch.device], torch.Tensor] = {}
        self.sizes = [int(m.sum()) for m in self.masks.values()]
        self.n = sum(self.sizes)
        ends = torch.tensor(self.sizes, dtype=torch.long).cumsum(0).tolist() if self.names else []
        self.bounds = {n: (e - s, e) for n, s, e in zip(self.names, self.sizes, ends, strict=True)}
        self.dtype = dtype or functools.reduce(torch.promote_types, [_acc_dtype(named[n]) for n in self.names],
                                               torch.float32)

    def _mask_on(self, name: str, device: torch.device) -> torch.Tensor:
        if device == self.device:
            return self.masks[name]
        key = (name, device)
        if key not in self._other_masks:  # tensors on another device (say, δ on the CPU): one copy, kept
            self._other_masks[key] = self.masks[name].to(device)
        return self._other_masks[key]

    def pack(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The selected entries of `tensors[name]` (full parameter shapes), in order: one flat vector."""
        out = torch.empty(self.n, dtype=self.dtype, device=self.device)
        for name, (a, b) in self.bounds.items():
            t = tensors[name].detach()
            out[a:b].copy_(t[self._mask_on(name, t.device)])
        return out

    def unpack(self, v: torch.Tensor, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Parameter `name`'s full-size tensor holding v's entries on its mask and zeros elsewhere."""
        a, b = self.bounds[name]
        out = torch.zeros(self.masks[name].shape, dtype=dtype or self.dtype, device=self.device)
        return out.masked_scatter_(self.masks[name], v[a:b].to(device=self.device, dtype=out.dtype))


def packed_hvp(
    model: PreTrainedModel | torch.nn.Module,
    batches: list[Batch],
    packing: Packing,
    v: torch.Tensor,
    method: str = "double_backward",
    loss_fn: LossFn | None = None,
) -> torch.Tensor:
    """H v over `packing`'s entries (v and the result: flat, `packing.dtype`, on the model's device).

    The product `hvp` gives for v scattered onto the touched tensors (`params=packing.names`), gathered to the
    entries; but no ∇L is returned or kept, no .grad is written, only the touched tensors require grad, and
    H v is gathered per micro-batch (no full-size accumulators, no CPU copies).
    """
    if method not in METHODS:
        raise CrossrouteError(f"unknown HVP method {method!r}; use one of {', '.join(METHODS)}.")
    if tuple(v.shape) != (packing.n,):
        raise CrossrouteError(f"packed vector has shape {tuple(v.shape)}; the packing holds {packing.n} entries.")
    if not packing.names:
        return torch.zeros(0, dtype=packing.dtype, device=packing.device)
    named = _select(model, packing.names)
    fn = _loss_fn(batches, loss_fn)
    vecs = [packing.unpack(v, n, p.dtype) for n, p in named]  # in the parameters' dtype: grad_outputs as is
    out = torch.zeros(packing.n, dtype=packing.dtype, device=packing.device)
    with contextlib.closing(_passes(model, batches, fn, named, vecs, method, False)) as passes:
        for _, _, hs in passes:
            for (name, _), h in zip(named, hs, strict=True):
                if h is not None:
                    a, b = packing.bounds[name]
                    out[a:b].add_(h[packing.masks[name]])
            del hs
    return out


def hvp_pass_bytes(model: torch.nn.Module, batches: list[Batch], packing: Packing) -> tuple[int, int | None]:
    """(touched, activations): bytes one `packed_hvp` pass holds beyond the model and the packed vectors.

    touched: v, ∇L (with its graph) and H v over the touched tensors in their dtype, plus the masks. activations:
    a rough estimate of the largest micro-batch's double-backward graph, DOUBLE_BACKWARD_FACTOR × the forward's
    saved activations of a dense decoder (eager attention's S² scores, logits at the answer tokens); None when
    the model's config does not say its shape.
    """
    named = dict(model.named_parameters())
    touched = sum(named[n].numel() * (3 * named[n].element_size() + 1) for n in packing.names)
    cfg = getattr(model, "config", None)
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
    shape = [getattr(cfg, k, None) for k in keys]
    if not batches or any(not isinstance(x, int) for x in shape):
        return touched, None
    layers, d, f, heads, vocab = shape  # type: ignore[misc]
    e = next(iter(named.values())).element_size()
    worst = 0.0
    for b in batches:
        bsz, seq = b["input_ids"].shape
        answer = int((b["labels"][:, 1:] != -100).sum()) if "labels" in b else bsz * seq
        fwd = (layers * bsz * seq * (16 * d + 4 * f) * e + layers * bsz * heads * seq * seq * (4 + e)
               + answer * vocab * (e + 8))
        worst = max(worst, fwd)
    return touched, int(DOUBLE_BACKWARD_FACTOR * worst)


def _passes(model: torch.nn.Module, batches: list[Batch], fn: LossFn, named: list[tuple[str, torch.nn.Parameter]],
            vecs: list[torch.Tensor], method: str, with_grad: bool
            ) -> Iterator[tuple[float, list[torch.Tensor | None] | None, list[torch.Tensor | None]]]:
    """Per micro-batch (loss, ∇L or None, H v) in eval mode with eager attention, only `named` requiring grad.

    The generator holds no pass's tensors while suspended, so a pass's products are freed when the caller drops
    them; the model's mode, flags and attention are restored when it is exhausted or closed.
    """
    one = _double_backward if method == "double_backward" else _fwd_rev
    was_training = model.training
    model.eval()
    try:
        with eager_attention(model), only_requires_grad(model, [n for n, _ in named]):
            for b in batches:
                yield one(model, b, fn, named, vecs, with_grad)
    finally:
        model.train(was_training)


def _double_backward(model, batch, fn, named, vecs, with_grad):  # type: ignore[no-untyped-def]
    """∂(g·v)/∂θ for g = ∂L/∂θ (create_graph), both by torch.autograd.grad over `named` only (no .grad).

    g is returned (detached) only `with_grad`; otherwise it is dropped as soon as H v exists.
    """
    ps = [p for _, p in named]
    loss = fn(model, batch)
    value = float(loss.detach())
    gs = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
    del loss
    # H v = d(g . v)/d theta, as one vector-Jacobian product of g with v (no explicit dot graph).
    pairs = [(g, v.to(g.dtype), p) for g, v, p in zip(gs, vecs, ps, strict=True)
             if g is not None and g.requires_grad]
    hs: list[torch.Tensor | None] = [None] * len(ps)
    if pairs:  # else the loss is linear (or constant) in every parameter
        hs = list(torch.autograd.grad([g for g, _, _ in pairs], ps, grad_outputs=[v for _, v, _ in pairs],
                                      allow_unused=True))
    del pairs
    grads = [g.detach() if g is not None else None for g in gs] if with_grad else None
    return value, grads, hs


class _LossModule(torch.nn.Module):
    """Wraps (model, loss_fn, batch) so torch.func.functional_call can swap the parameters."""

    def __init__(self, model: torch.nn.Module, fn: LossFn, batch: Batch) -> None:
        super().__init__()
        self.model = model
        self._fn = fn
        self._batch = batch

    def forward(self) -> torch.Tensor:
        return self._fn(self.model, self._batch)


def _fwd_rev(model, batch, fn, named, vecs, with_grad):  # type: ignore[no-untyped-def]
    from torch.func import functional_call, grad_and_value, jvp

    wrapper = _LossModule(model, fn, batch)
    keys = [f"model.{n}" for n, _ in named]
    primals = {k: p.detach() for k, (_, p) in zip(keys, named, strict=True)}
    tangents = {k: v.to(p.dtype) for k, (_, p), v in zip(keys, named, vecs, strict=True)}

    def loss_of(ps: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(wrapper, ps, (), strict=False)

    def grad_of(ps: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return grad_and_value(loss_of)(ps)

    g, hv, loss = jvp(grad_of, (primals,), (tangents,), has_aux=True)
    return float(loss.detach()), [g[k] for k in keys] if with_grad else None, [hv[k] for k in keys]
