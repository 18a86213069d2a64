"""Hessian-vector products: finite differences in float64, symmetry, batching, restriction."""

from __future__ import annotations

import weakref

import pytest
import torch
from transformers.models.qwen3 import modeling_qwen3

from conftest import TINY
from crossroute.core.errors import CrossrouteError
from crossroute.domains.builtin import BUILTIN
from crossroute.measure.hvp import Packing, grad_and_hvp, hvp, hvp_pass_bytes, packed_hvp
from crossroute.measure.proxy import make_batches
from crossroute.model.default import build_default_model


def _tiny64(seed: int = 0):
    model, tok = build_default_model(seed, **TINY)
    return model.double().eval(), tok


def _rand(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=gen, dtype=p.dtype)
            for k, p in model.named_parameters()}


def _dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k].double() * b[k].double()).sum() for k in a))


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    diff = {k: a[k] - b[k] for k in a}
    return (_dot(diff, diff) / _dot(b, b)) ** 0.5


@pytest.fixture
def float64_qwen3(monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen3 computes RMSNorm and the attention softmax in fp32 even in a float64 model, which
    caps any finite difference at ~1e-7; these patches keep float64 inputs in float64 (rotary
    cos/sin stay fp32 constants, which does not matter: they do not depend on the parameters)."""

    def norm64(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))

    softmax = torch.nn.functional.softmax

    def softmax64(x, dim=None, _stacklevel=3, dtype=None):  # type: ignore[no-untyped-def]
        return softmax(x, dim=dim, dtype=x.dtype if x.dtype == torch.float64 else dtype)

    monkeypatch.setattr(modeling_qwen3.Qwen3RMSNorm, "forward", norm64)
    monkeypatch.setattr(torch.nn.functional, "softmax", softmax64)


def _unit(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    norm = _dot(v, v) ** 0.5
    return {k: x / norm for k, x in v.items()}


def _central_difference(model: torch.nn.Module, batches: list, v: dict[str, torch.Tensor],
                        h: float) -> dict[str, torch.Tensor]:
    """(∇L(θ+hv) − ∇L(θ−hv)) / 2h, restoring θ afterwards."""
    params = dict(model.named_parameters())
    old = {k: p.detach().clone() for k, p in params.items()}

    def grad_at(t: float) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(old[k] + t * v[k])
        g = grad_and_hvp(model, batches, {})[1]
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(old[k])
        return g

    gp, gm = grad_at(h), grad_at(-h)
    return {k: (gp[k] - gm[k]) / (2 * h) for k in gp}


def test_hvp_matches_central_difference_of_gradient(float64_qwen3: None) -> None:
    """(∇L(θ+hv) − ∇L(θ−hv)) / 2h ≈ H v along a random unit direction, float64 end to end."""
    model, tok = _tiny64(2)
    batches = make_batches(tok, BUILTIN["math"].examples("train", 5, seed=0), 3)
    v = _unit(_rand(model, 0))
    hv = hvp(model, batches, v)
    fd = _central_difference(model, batches, v, 1e-4)
    assert hv[next(iter(hv))].dtype == torch.float64
    assert _rel(hv, fd) < 1e-6
    # forward-over-reverse gives the same product
    assert _rel(hvp(model, batches, v, method="fwd_rev"), hv) < 1e-9


def test_hvp_finite_difference_stock_qwen3() -> None:
    """Without the float64 patches (fp32 norms/softmax inside): still within 1e-3."""
    model, tok = _tiny64(3)
    batches = make_batches(tok, BUILTIN["code"].examples("train", 4, seed=0), 4)
    v = _unit(_rand(model, 1))
    hv = hvp(model, batches, v)
    assert _rel(hv, _central_difference(model, batches, v, 1e-3)) < 1e-3


def test_symmetry_batching_and_restriction(float64_qwen3: None) -> None:
    model, tok = _tiny64(1)
    examples = BUILTIN["qa"].examples("train", 6, seed=0)
    b6, b1 = make_batches(tok, examples, 6), make_batches(tok, examples, 1)
    u, v = _rand(model, 10), _rand(model, 11)
    hv, hu = hvp(model, b6, v), hvp(model, b6, u)
    assert _dot(u, hv) == pytest.approx(_dot(v, hu), rel=1e-9)
    assert _rel(hvp(model, b1, v), hv) < 1e-10  # micro-batching does not change the product
    # restricted to some tensors: H_SS v_S == (H v')_S with v' = v on S, zero elsewhere
    names = [k for k in v if "layers.1." in k and "mlp" in k]
    sub = hvp(model, b6, v, params=names)
    full = hvp(model, b6, {k: v[k] for k in names})
    assert set(sub) == set(names)
    assert _rel(sub, {k: full[k] for k in names}) < 1e-10
    assert _rel(hvp(model, b6, v, params=names, method="fwd_rev"), sub) < 1e-9
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert model.config._attn_implementation == "sdpa"  # switched to eager only during the pass
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(CrossrouteError):
        hvp(model, b6, v, params=["nope"])


def test_memory_options_hvp_only_and_narrow_accumulators() -> None:
    """hvp() keeps no gradient; bf16 accumulators on a bf16 model agree with fp32 ones to bf16 precision."""
    model, tok = build_default_model(4, **TINY)
    batches = make_batches(tok, BUILTIN["math"].examples("train", 6, seed=0), 2)
    v = _rand(model, 5)
    loss, g, hv = grad_and_hvp(model, batches, v, with_grad=False)
    assert g == {} and _rel(hv, grad_and_hvp(model, batches, v)[2]) == 0.0
    assert loss == pytest.approx(grad_and_hvp(model, batches, v)[0])
    bf = model.to(torch.bfloat16)
    wide = hvp(bf, batches, v)  # default: fp32 accumulators on a bf16 model
    narrow = hvp(bf, batches, v, acc_dtype=torch.bfloat16)
    assert wide[next(iter(wide))].dtype == torch.float32 and narrow[next(iter(narrow))].dtype == torch.bfloat16
    assert 0 < _rel({k: x.double() for k, x in narrow.items()}, {k: x.double() for k, x in wide.items()}) < 2e-2


def _some_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Bool masks on three tensors of layer 1 (rows of the MLP, a column block of o_proj): ~1/4 of their entries."""
    params = dict(model.named_parameters())
    out = {}
    for name, sl in (("model.layers.1.mlp.up_proj.weight", (slice(0, 8), slice(None))),
                     ("model.layers.1.mlp.down_proj.weight", (slice(None), slice(3, 11))),
                     ("model.layers.1.self_attn.o_proj.weight", (slice(None), slice(0, 4)))):
        m = torch.zeros(params[name].shape, dtype=torch.bool)
        m[sl] = True
        out[name] = m
    return out


def test_packed_hvp_is_the_gathered_full_size_product(float64_qwen3: None) -> None:
    """packed_hvp(v) == hvp(unpack(v), params=names) gathered to the masks, for both methods and any micro-batching;
    pack/unpack round-trip; bad input names the thing."""
    model, tok = _tiny64(5)
    examples = BUILTIN["math"].examples("train", 6, seed=0)
    b3, b1 = make_batches(tok, examples, 3), make_batches(tok, examples, 1)
    masks = _some_masks(model)
    packing = Packing(model, masks)
    assert packing.dtype == torch.float64 and packing.n == sum(int(m.sum()) for m in masks.values())
    full = _rand(model, 7)
    v = packing.pack(full)
    assert torch.equal(v, torch.cat([full[k][m] for k, m in masks.items()]))
    assert all(torch.equal(packing.unpack(v, k)[m], full[k][m]) and not packing.unpack(v, k)[~m].any()
               for k, m in masks.items())
    ref = hvp(model, b3, {k: packing.unpack(v, k) for k in masks}, params=list(masks))
    expected = torch.cat([ref[k][m] for k, m in masks.items()])
    got = packed_hvp(model, b3, packing, v)
    assert got.dtype == torch.float64 and got.shape == (packing.n,)
    assert float((got - expected).norm() / expected.norm()) < 1e-12
    assert float((packed_hvp(model, b1, packing, v) - expected).norm() / expected.norm()) < 1e-10
    assert float((packed_hvp(model, b3, packing, v, method="fwd_rev") - expected).norm() / expected.norm()) < 1e-9
    fp32 = Packing(build_default_model(5, **TINY)[0], masks)
    assert fp32.dtype == torch.float32
    with pytest.raises(CrossrouteError, match="no parameter named"):
        Packing(model, {"nope": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(CrossrouteError, match="has shape"):
        Packing(model, {"model.layers.1.mlp.up_proj.weight": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(CrossrouteError, match="packed vector"):
        packed_hvp(model, b3, packing, v[:-1])


def test_packed_matvec_writes_no_grad_and_keeps_no_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """The matvec differentiates only the touched tensors (two autograd.grad calls per micro-batch, inputs exactly
    those), leaves every .grad None and requires_grad as it was, and no ∇L outlives the call."""
    model, tok = build_default_model(6, **TINY)
    batches = make_batches(tok, BUILTIN["qa"].examples("train", 6, seed=0), 2)
    masks = _some_masks(model)
    packing = Packing(model, masks)
    params = dict(model.named_parameters())
    touched = [params[k] for k in masks]
    model.get_input_embeddings().weight.requires_grad_(False)  # a frozen tensor stays frozen
    flags = {k: p.requires_grad for k, p in params.items()}
    calls: list[list[torch.Tensor]] = []
    first_order: list[weakref.ref] = []
    real = torch.autograd.grad

    def spy(outputs, inputs, *a, **kw):  # type: ignore[no-untyped-def]
        calls.append(list(inputs))
        out = real(outputs, inputs, *a, **kw)
        if kw.get("create_graph"):
            first_order.extend(weakref.ref(g) for g in out if g is not None)
        return out

    monkeypatch.setattr(torch.autograd, "grad", spy)
    v = torch.randn(packing.n, generator=torch.Generator().manual_seed(8))
    hv = packed_hvp(model, batches, packing, v)
    monkeypatch.undo()
    assert len(calls) == 2 * len(batches)
    assert all(len(c) == len(touched) and all(a is b for a, b in zip(c, touched, strict=True)) for c in calls)
    assert first_order and all(r() is None for r in first_order)  # ∇L (and its graph) freed with the call
    assert all(p.grad is None for p in model.parameters())
    assert {k: p.requires_grad for k, p in params.items()} == flags
    assert hv.dtype == torch.float32 and bool(torch.isfinite(hv).all()) and float(hv.norm()) > 0


def test_hvp_pass_bytes_counts_the_touched_tensors() -> None:
    """touched = 3 full-size copies (v, ∇L, H v) in the parameters' dtype + 1 mask byte per entry of each tensor;
    the activation estimate grows with the micro-batch."""
    model, tok = build_default_model(7, **TINY)
    masks = _some_masks(model)
    packing = Packing(model, masks)
    params = dict(model.named_parameters())
    examples = BUILTIN["math"].examples("train", 8, seed=0)
    touched, act2 = hvp_pass_bytes(model, make_batches(tok, examples, 2), packing)
    assert touched == sum(params[k].numel() * (3 * 4 + 1) for k in masks)
    _, act8 = hvp_pass_bytes(model, make_batches(tok, examples, 8), packing)
    assert act2 is not None and act8 is not None and act8 > 2 * act2
    assert hvp_pass_bytes(torch.nn.Linear(2, 2), [], Packing(torch.nn.Linear(2, 2), {}))[1] is None
