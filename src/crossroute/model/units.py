"""One declarative architecture table: which tensor entries belong to which analysis unit.

Units (ids are parsed elsewhere; keep the format):

* ``L{l}.mlp.{j}``    "neuron": row j of gate/up (+ bias entries), column j of down. In MoE expert layers
  the index is flat, j = e * moe_intermediate_size + i for expert e's neuron i.
* ``L{l}.head.{h}``   "head":   q rows of head h (+ q bias), input columns of the attention output projection.
* ``L{l}.kv.{g}``     "kv":     k and v rows of KV group g (+ biases).
* ``L{l}.router.{e}`` "router": row e of the MoE router weight.
* ``L{l}.expert.{e}`` "expert": aggregate = router.{e} ∪ all neurons of expert e (overlaps the partition kinds).
* every other tensor is one "other" unit named by the full tensor name.

The table (``ARCHITECTURES``) maps a config's ``model_type`` to an :class:`Arch`: a layer-prefix regex and a
list of :class:`TensorRule`. A rule's ``pattern`` is ``re.fullmatch``-ed against the tensor name AFTER the
layer prefix (e.g. ``self_attn.q_proj.weight``); the first matching rule wins. A per-expert on-disk tensor
names its expert with the named group ``(?P<expert>\\d+)``. Each :class:`SliceSpec` of a rule places
``count`` units along ``axis``: unit j covers ``offset + j*stride + [0, group)``. All slices of one tensor
share one axis (and expert axis) and must cover every position along it exactly once; anything else is a
shape mismatch (CrossrouteError naming the tensor, the sizes and the config keys).

Only stdlib + torch are used: a map is built from a config dict and (name, shape) pairs, so it works on
in-memory ``named_parameters`` and on safetensors headers alike. An unknown architecture gives a map with
whole-tensor units only, ``arch=None`` and a one-line ``warning`` that is also emitted once per model_type via
``warnings.warn`` (UserWarning).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from crossroute.core.errors import CrossrouteError

UNIT_KINDS: tuple[str, ...] = ("neuron", "head", "kv", "router", "expert")
PARTITION_KINDS: tuple[str, ...] = ("neuron", "head", "kv", "router")
TAG: dict[str, str] = {"neuron": "mlp", "head": "head", "kv": "kv", "router": "router", "expert": "expert"}
KIND_OF_TAG: dict[str, str] = {v: k for k, v in TAG.items()}
UNIT_ID_RE = re.compile(r"^L(\d+)\.(mlp|head|kv|router|expert)\.(\d+)$")
HOOK_SITES: tuple[str, ...] = ("mlp_act", "head_out", "router")


def unit_id(layer: int, kind: str, index: int) -> str:
    """``L{layer}.{tag}.{index}`` for a unit kind ("neuron" -> "mlp")."""
    if kind not in TAG:
        raise CrossrouteError(f"unknown unit kind {kind!r}; expected one of {', '.join(UNIT_KINDS)}")
    return f"L{int(layer)}.{TAG[kind]}.{int(index)}"


def parse_unit_id(s: str) -> tuple[int, str, int] | None:
    """(layer, kind, index) of a unit id, or None for anything else (e.g. an "other" tensor name)."""
    m = UNIT_ID_RE.match(s)
    if m is None:
        return None
    return int(m.group(1)), KIND_OF_TAG[m.group(2)], int(m.group(3))


# ----------------------------------------------------------------------------- dimensions


@dataclass(frozen=True)
class Dims:
    """The sizes a unit table needs, read from a HF config dict by :func:`dims_from_config`."""

    hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    num_experts: int = 0
    moe_intermediate: int = 0
    sparse_layers: frozenset[int] = frozenset()  # layers whose MLP is a mixture of experts

    def is_sparse(self, layer: int) -> bool:
        return layer in self.sparse_layers


def text_config(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    """The text model's config: `text_config` when the top level lacks the size keys (multimodal wrappers)."""
    sub = cfg.get("text_config")
    if isinstance(sub, Mapping) and not any(k in cfg for k in ("num_attention_heads", "n_head")):
        return sub
    return cfg


def _key(cfg: Mapping[str, Any], *names: str) -> int:
    for n in names:
        if cfg.get(n) is not None:
            return int(cfg[n])
    raise CrossrouteError(f"config.json has no {names[0]!r}"
                          + (f" (or {', '.join(repr(n) for n in names[1:])})" if names[1:] else "")
                          + "; the unit table needs it")


def dims_from_config(cfg: Mapping[str, Any]) -> Dims:
    """Dims from a HF config dict (GPT-2 style n_embd/n_layer/n_head/n_inner keys accepted)."""
    c = text_config(cfg)
    hidden = _key(c, "hidden_size", "n_embd")
    layers = _key(c, "num_hidden_layers", "n_layer")
    heads = _key(c, "num_attention_heads", "n_head")
    if heads <= 0:
        raise CrossrouteError(f"config.json num_attention_heads={heads}; expected a positive number")
    kv = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or hidden // heads)
    if "n_embd" in c and "hidden_size" not in c:  # GPT-2: n_inner or 4 * n_embd
        inter = int(c.get("n_inner") or 4 * hidden)
    else:
        inter = _key(c, "intermediate_size")
    experts = int(c.get("num_experts") or c.get("num_local_experts") or 0)
    moe_inter, sparse = 0, frozenset()
    if experts > 0:
        moe_inter = _key(c, "moe_intermediate_size")
        if "decoder_sparse_step" in c or "mlp_only_layers" in c:  # Qwen2/3-MoE (modeling_qwen3_moe)
            only = {int(x) for x in (c.get("mlp_only_layers") or [])}
            step = int(c.get("decoder_sparse_step") or 1)
            sparse = frozenset(ly for ly in range(layers) if ly not in only and (ly + 1) % step == 0)
        else:
            sparse = frozenset(range(layers))
    return Dims(hidden, layers, heads, kv, head_dim, inter, experts, moe_inter, sparse)


# ----------------------------------------------------------------------------- the table

Size = int | Callable[[Dims], int]


@dataclass(frozen=True)
class SliceSpec:
    """`count` units of `kind` along `axis`: unit j covers ``offset + j*stride + [0, group)``.

    With `expert_axis` (fused 3-D expert tensors) the tensor holds experts along that axis and expert e's
    unit j is number ``e*count + j``. Sizes are ints or callables of :class:`Dims`.
    """

    kind: str
    axis: int
    offset: Size
    stride: Size
    group: Size
    count: Size
    expert_axis: int | None = None

    def resolve(self, d: Dims) -> tuple[int, int, int, int]:
        return tuple(int(v(d) if callable(v) else v) for v in (self.offset, self.stride, self.group, self.count))


@dataclass(frozen=True)
class TensorRule:
    """`pattern` is re.fullmatch-ed against the name after the layer prefix; `module` labels per-module stats.

    Empty `slices`: a known module without unit structure (the tensor is one "other" unit).
    """

    pattern: str
    module: str
    slices: tuple[SliceSpec, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_re", re.compile(self.pattern))
        if len({(s.axis, s.expert_axis) for s in self.slices}) > 1:
            raise ValueError(f"rule {self.pattern!r}: all slices of a tensor must share axis and expert_axis")
        for s in self.slices:
            if s.kind not in PARTITION_KINDS:
                raise ValueError(f"rule {self.pattern!r}: slice kind {s.kind!r} not in {PARTITION_KINDS}")

    def match(self, rest: str) -> re.Match[str] | None:
        return self._re.fullmatch(rest)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class HookSites:
    """Module-name suffixes within a layer (None where the site does not exist).

    mlp_act: forward PRE-hook input = MLP activation (input of the down projection, one value per neuron).
    head_out: forward PRE-hook input = concatenated head outputs (head h = [h*head_dim, (h+1)*head_dim)).
    router: forward hook on the MoE router; in transformers 5.23 Qwen3MoeTopKRouter returns
        (router_logits [tokens, E], top-k scores, top-k indices). Only in sparse layers.
    sparse_mlp_act: replaces mlp_act in sparse (MoE) layers; None for Qwen3-MoE, whose fused experts have no
        per-expert down-projection module.
    """

    mlp_act: str | None = None
    head_out: str | None = None
    router: str | None = None
    sparse_mlp_act: str | None = None


@dataclass(frozen=True)
class Arch:
    """One architecture: `layer_re` matches a layer's name prefix with the layer index as group 1."""

    name: str
    model_types: tuple[str, ...]
    layer_re: str
    rules: tuple[TensorRule, ...]
    hooks: HookSites = field(default_factory=HookSites)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_layer", re.compile(self.layer_re))

    def split(self, name: str) -> tuple[int, str, str] | None:
        """(layer, prefix, rest) of a tensor name inside a layer, else None."""
        m = self._layer.match(name)  # type: ignore[attr-defined]
        if m is None:
            return None
        return int(m.group(1)), name[: m.end()], name[m.end():]


def _hd(d: Dims) -> int:
    return d.head_dim


def _heads(d: Dims) -> int:
    return d.num_heads


def _kv(d: Dims) -> int:
    return d.num_kv_heads


def _q_width(d: Dims) -> int:
    return d.num_heads * d.head_dim


def _qk_width(d: Dims) -> int:
    return (d.num_heads + d.num_kv_heads) * d.head_dim


def _hd2(d: Dims) -> int:
    return 2 * d.head_dim


def _hd3(d: Dims) -> int:
    return 3 * d.head_dim


def _inter(d: Dims) -> int:
    return d.intermediate


def _experts(d: Dims) -> int:
    return d.num_experts


def _moe_inter(d: Dims) -> int:
    return d.moe_intermediate


def _heads_on(axis: int) -> SliceSpec:
    return SliceSpec("head", axis, 0, _hd, _hd, _heads)


def _kv_on(axis: int) -> SliceSpec:
    return SliceSpec("kv", axis, 0, _hd, _hd, _kv)


def _neurons_on(axis: int, count: Size = _inter, offset: Size = 0, expert_axis: int | None = None) -> SliceSpec:
    return SliceSpec("neuron", axis, offset, 1, 1, count, expert_axis)


_WB = r"\.(?:weight|bias)"
NORM_RULE = TensorRule(r"(?:.*\.)?[\w]*(?:norm|ln)[\w]*" + _WB, "norm")

ATTN_SEPARATE: tuple[TensorRule, ...] = (  # llama-style q/k/v/o_proj under self_attn (qwen2: q/k/v biases)
    TensorRule(r"self_attn\.q_proj" + _WB, "q", (_heads_on(0),)),
    TensorRule(r"self_attn\.k_proj" + _WB, "k", (_kv_on(0),)),
    TensorRule(r"self_attn\.v_proj" + _WB, "v", (_kv_on(0),)),
    TensorRule(r"self_attn\.o_proj\.weight", "o", (_heads_on(1),)),
    TensorRule(r"self_attn\.o_proj\.bias", "o"),
    TensorRule(r"self_attn\.[qk]_norm\.weight", "qk_norm"),
)
ATTN_FUSED_QKV: tuple[TensorRule, ...] = (  # phi3: qkv_proj rows = [q heads | k groups | v groups]
    TensorRule(r"self_attn\.qkv_proj" + _WB, "qkv", (
        _heads_on(0), SliceSpec("kv", 0, _q_width, _hd, _hd, _kv), SliceSpec("kv", 0, _qk_width, _hd, _hd, _kv))),
    TensorRule(r"self_attn\.o_proj\.weight", "o", (_heads_on(1),)),
    TensorRule(r"self_attn\.o_proj\.bias", "o"),
)
MLP_GATED: tuple[TensorRule, ...] = (
    TensorRule(r"mlp\.gate_proj" + _WB, "gate", (_neurons_on(0),)),
    TensorRule(r"mlp\.up_proj" + _WB, "up", (_neurons_on(0),)),
    TensorRule(r"mlp\.down_proj\.weight", "down", (_neurons_on(1),)),
    TensorRule(r"mlp\.down_proj\.bias", "down"),
)
MLP_FUSED_GATE_UP: tuple[TensorRule, ...] = (  # phi3: gate_up_proj rows = [gate | up] (forward: .chunk(2, -1))
    TensorRule(r"mlp\.gate_up_proj" + _WB, "gate_up", (_neurons_on(0), _neurons_on(0, offset=_inter))),
    TensorRule(r"mlp\.down_proj\.weight", "down", (_neurons_on(1),)),
    TensorRule(r"mlp\.down_proj\.bias", "down"),
)
MOE_QWEN3: tuple[TensorRule, ...] = (
    TensorRule(r"mlp\.gate\.weight", "router", (SliceSpec("router", 0, 0, 1, 1, _experts),)),
    # in memory (transformers >= 5): fused [E, 2I, H] (gate rows first: .chunk(2, dim=-1)) and [E, H, I]
    TensorRule(r"mlp\.experts\.gate_up_proj", "experts_gate_up", (
        _neurons_on(1, _moe_inter, expert_axis=0), _neurons_on(1, _moe_inter, _moe_inter, expert_axis=0))),
    TensorRule(r"mlp\.experts\.down_proj", "experts_down", (_neurons_on(2, _moe_inter, expert_axis=0),)),
    # on disk: one 2-D tensor per expert and projection
    TensorRule(r"mlp\.experts\.(?P<expert>\d+)\.(?:gate|up)_proj\.weight", "experts_gate_up",
               (_neurons_on(0, _moe_inter),)),
    TensorRule(r"mlp\.experts\.(?P<expert>\d+)\.down_proj\.weight", "experts_down", (_neurons_on(1, _moe_inter),)),
)

_LLAMA_LAYER = r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)\."
_LLAMA_HOOKS = HookSites(mlp_act="mlp.down_proj", head_out="self_attn.o_proj")
_LLAMA_RULES = ATTN_SEPARATE + MLP_GATED + (NORM_RULE,)

ARCHITECTURES: dict[str, Arch] = {}
_BY_MODEL_TYPE: dict[str, str] = {}


def register_architecture(arch: Arch) -> Arch:
    """Add (or replace) an architecture; later registrations win for a shared model_type."""
    ARCHITECTURES[arch.name] = arch
    for mt in arch.model_types:
        _BY_MODEL_TYPE[mt] = arch.name
    return arch


for _name, _types in (("llama", ("llama",)), ("mistral", ("mistral",)), ("qwen2", ("qwen2",)),
                      ("qwen3", ("qwen3",)), ("gemma2", ("gemma2",)), ("gemma3", ("gemma3_text", "gemma3")),
                      ("olmo2", ("olmo2",))):
    register_architecture(Arch(_name, _types, _LLAMA_LAYER, _LLAMA_RULES, _LLAMA_HOOKS))
register_architecture(Arch("phi3", ("phi3",), _LLAMA_LAYER, ATTN_FUSED_QKV + MLP_FUSED_GATE_UP + (NORM_RULE,),
                           _LLAMA_HOOKS))
register_architecture(Arch(
    "gpt_neox", ("gpt_neox",), r"^(?:gpt_neox\.)?layers\.(\d+)\.",
    (  # query_key_value rows are [head, (q|k|v), head_dim] (view(..., -1, 3*head_size).chunk(3, -1))
        TensorRule(r"attention\.query_key_value" + _WB, "qkv", (
            SliceSpec("head", 0, 0, _hd3, _hd, _heads), SliceSpec("kv", 0, _hd, _hd3, _hd, _kv),
            SliceSpec("kv", 0, _hd2, _hd3, _hd, _kv))),
        TensorRule(r"attention\.dense\.weight", "o", (_heads_on(1),)),
        TensorRule(r"attention\.dense\.bias", "o"),
        TensorRule(r"mlp\.dense_h_to_4h" + _WB, "up", (_neurons_on(0),)),
        TensorRule(r"mlp\.dense_4h_to_h\.weight", "down", (_neurons_on(1),)),
        TensorRule(r"mlp\.dense_4h_to_h\.bias", "down"),
        NORM_RULE,
    ),
    HookSites(mlp_act="mlp.dense_4h_to_h", head_out="attention.dense")))
register_architecture(Arch(
    "gpt2", ("gpt2",), r"^(?:transformer\.)?h\.(\d+)\.",
    (  # Conv1D stores weight as [in, out]; c_attn output columns = [q | k | v], heads contiguous in each
        TensorRule(r"attn\.c_attn\.weight", "qkv", (
            _heads_on(1), SliceSpec("kv", 1, _q_width, _hd, _hd, _kv), SliceSpec("kv", 1, _qk_width, _hd, _hd, _kv))),
        TensorRule(r"attn\.c_attn\.bias", "qkv", (
            _heads_on(0), SliceSpec("kv", 0, _q_width, _hd, _hd, _kv), SliceSpec("kv", 0, _qk_width, _hd, _hd, _kv))),
        TensorRule(r"attn\.c_proj\.weight", "o", (_heads_on(0),)),
        TensorRule(r"attn\.c_proj\.bias", "o"),
        TensorRule(r"mlp\.c_fc\.weight", "up", (_neurons_on(1),)),
        TensorRule(r"mlp\.c_fc\.bias", "up", (_neurons_on(0),)),
        TensorRule(r"mlp\.c_proj\.weight", "down", (_neurons_on(0),)),
        TensorRule(r"mlp\.c_proj\.bias", "down"),
        NORM_RULE,
    ),
    HookSites(mlp_act="mlp.c_proj", head_out="attn.c_proj")))
register_architecture(Arch(
    "qwen3_moe", ("qwen3_moe",), _LLAMA_LAYER, ATTN_SEPARATE + MLP_GATED + MOE_QWEN3 + (NORM_RULE,),
    HookSites(mlp_act="mlp.down_proj", head_out="self_attn.o_proj", router="mlp.gate", sparse_mlp_act=None)))


def arch_for(cfg: Mapping[str, Any]) -> Arch | None:
    """The registered architecture of a config dict (its model_type, else text_config's), or None."""
    types = [cfg.get("model_type")]
    if isinstance(cfg.get("text_config"), Mapping):
        types.append(cfg["text_config"].get("model_type"))
    for mt in types:
        arch = ARCHITECTURES.get(_BY_MODEL_TYPE.get(mt, ""))
        if arch is not None:  # an entry removed from ARCHITECTURES is unknown again
            return arch
    return None


# ----------------------------------------------------------------------------- selections


@dataclass(frozen=True)
class HeadLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def to_json(self) -> dict[str, int]:
        return {"num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                "head_dim": self.head_dim}


@dataclass(frozen=True)
class Selection:
    """Entries of one tensor covered by some units: positions `index` along the (expert-flattened) unit axis.

    With `expert_axis`, position p means expert p // shape[axis], index p % shape[axis] along `axis`.
    take/put/mask use the same advanced index, so ``put(t, take(t))`` is the identity.
    """

    shape: tuple[int, ...]
    axis: int
    expert_axis: int | None
    index: torch.Tensor  # sorted LongTensor of positions

    def _ix(self, device: torch.device) -> tuple[Any, ...]:
        ix: list[Any] = [slice(None)] * len(self.shape)
        idx = self.index.to(device)
        if self.expert_axis is None:
            ix[self.axis] = idx
        else:
            n = self.shape[self.axis]
            ix[self.expert_axis], ix[self.axis] = idx // n, idx % n
        return tuple(ix)

    def _check(self, shape: Sequence[int]) -> None:
        if tuple(shape) != self.shape:
            raise CrossrouteError(f"tensor of shape {tuple(shape)} given to a selection of shape {self.shape}")

    @property
    def numel(self) -> int:
        other = 1
        for d, s in enumerate(self.shape):
            if d != self.axis and d != self.expert_axis:
                other *= s
        return int(self.index.numel()) * other

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The covered entries, stacked along the unit axis (a copy)."""
        self._check(t.shape)
        return t.detach()[self._ix(t.device)]

    def put(self, t: torch.Tensor, values: torch.Tensor | float) -> torch.Tensor:
        """Write `values` (shaped like take(t), or a scalar) into the covered entries of `t` in place."""
        self._check(t.shape)
        with torch.no_grad():
            v = values.to(t.device, t.dtype) if isinstance(values, torch.Tensor) else values
            t[self._ix(t.device)] = v
        return t

    def mask(self, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Boolean mask of the covered entries."""
        if shape is not None:
            self._check(shape)
        m = torch.zeros(self.shape, dtype=torch.bool)
        m[self._ix(m.device)] = True
        return m


# ----------------------------------------------------------------------------- the map

_KIND_KEYS = {"head": "num_attention_heads/head_dim/hidden_size", "kv": "num_key_value_heads/head_dim",
              "neuron": "intermediate_size (n_inner for GPT-2, moe_intermediate_size for experts)",
              "router": "num_experts"}


@dataclass(frozen=True)
class _Placement:
    kind: str
    axis: int
    expert_axis: int | None
    unit_of_position: torch.Tensor  # LongTensor over the (expert-flattened) axis, -1 = not this kind
    pos: torch.Tensor  # positions with a unit of this kind
    units: torch.Tensor  # their unit indices


@dataclass
class _Entry:
    layer: int
    module: str
    placements: tuple[_Placement, ...]
    experts: bool  # an expert-structured MLP tensor (fused 3-D or per-expert 2-D)


def _describe(kind: str, d: Dims, spec: SliceSpec) -> str:
    off, stride, group, count = spec.resolve(d)
    return f"{count} {kind} units x {group} (offset {off}, stride {stride})"


class UnitMap:
    """Partition of a model's tensors into units (see the module docstring); build with :meth:`build`."""

    def __init__(self, cfg: Mapping[str, Any], shapes: dict[str, tuple[int, ...]], arch: Arch | None,
                 dims: Dims | None, entries: dict[str, _Entry], others: list[str], counts: dict[str, list[int]],
                 expert_layers: dict[int, int], prefixes: dict[int, str], warning: str | None) -> None:
        self.config = cfg
        self.shapes = shapes
        self.arch = arch.name if arch is not None else None
        self.architecture = arch
        self.dims = dims
        self._entries = entries
        self.others = others
        self._other_pos = {n: i for i, n in enumerate(others)}
        self.counts = counts
        self.num_layers = len(next(iter(counts.values()))) if counts else 0
        self._expert_layers = expert_layers  # layer -> moe_intermediate for layers whose neurons are experts'
        self._prefixes = prefixes
        self.warning = warning
        tc = text_config(cfg)
        self.model_type = tc.get("model_type") or cfg.get("model_type")
        self.architectures = list(cfg.get("architectures") or [])

    # -- construction

    @classmethod
    def of_model(cls, model: Any) -> UnitMap:
        """Map of a loaded model (duck-typed: `model.config.to_dict()` and `named_parameters()`)."""
        return cls.build(model.config.to_dict(), ((n, tuple(p.shape)) for n, p in model.named_parameters()))

    @classmethod
    def build(cls, cfg: Mapping[str, Any], params: Iterable[tuple[str, Sequence[int]]]) -> UnitMap:
        shapes = {str(n): tuple(int(s) for s in shape) for n, shape in params}
        arch = arch_for(cfg)
        if arch is None:
            return cls._unknown(cfg, shapes)
        d = dims_from_config(cfg)
        L = d.num_layers
        entries: dict[str, _Entry] = {}
        others: list[str] = []
        totals: dict[tuple[int, str], tuple[int, str]] = {}
        expert_layers: dict[int, int] = {}
        dense_neuron_layers: set[int] = set()
        prefixes: dict[int, str] = {}
        cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for name, shape in shapes.items():
            sp = arch.split(name)
            if sp is None:
                others.append(name)
                continue
            layer, prefix, rest = sp
            if layer >= L:
                raise CrossrouteError(f"{name}: layer {layer} but config.json num_hidden_layers={L}")
            prefixes.setdefault(layer, prefix)
            rule = m = None
            for r in arch.rules:
                m = r.match(rest)
                if m is not None:
                    rule = r
                    break
            if rule is None or not rule.slices:
                entries[name] = _Entry(layer, rule.module if rule else "other", (), False)
                others.append(name)
                continue
            e_name = m.groupdict().get("expert") if m is not None else None
            expert = e_name is not None or rule.slices[0].expert_axis is not None
            placements = cls._place(name, shape, rule, d, None if e_name is None else int(e_name), cache)
            entries[name] = _Entry(layer, rule.module, placements, expert)
            for s, pl in zip(_first_per_kind(rule.slices), placements, strict=True):
                n_units = s.resolve(d)[3] * (d.num_experts if expert else 1)
                prev = totals.setdefault((layer, pl.kind), (n_units, name))
                if prev[0] != n_units:
                    raise CrossrouteError(f"{name}: {n_units} {pl.kind} units in layer {layer}, but {prev[1]} has "
                                          f"{prev[0]}; check config.json {_KIND_KEYS[pl.kind]}")
            if expert or rule.slices[0].kind == "router":
                if not d.is_sparse(layer):
                    raise CrossrouteError(f"{name}: expert/router tensor in layer {layer}, which config.json "
                                          "(num_experts, mlp_only_layers, decoder_sparse_step) makes a dense layer")
                if expert:
                    expert_layers[layer] = d.moe_intermediate
                else:
                    expert_layers.setdefault(layer, 0)
            elif any(pl.kind == "neuron" for pl in placements):
                dense_neuron_layers.add(layer)
        both = dense_neuron_layers & {ly for ly, i in expert_layers.items() if i}
        if both:
            raise CrossrouteError(f"layer {min(both)} has both dense-MLP and expert tensors; a shared expert needs "
                                  "its own unit kind in the architecture table (not supported)")
        counts = {k: [0] * L for k in UNIT_KINDS}
        for (layer, kind), (n, _) in totals.items():
            counts[kind][layer] = n
        for layer in expert_layers:
            counts["expert"][layer] = d.num_experts
        return cls(cfg, shapes, arch, d, entries, others, counts, expert_layers, prefixes, None)

    @classmethod
    def _unknown(cls, cfg: Mapping[str, Any], shapes: dict[str, tuple[int, ...]]) -> UnitMap:
        tc = text_config(cfg)
        mt = tc.get("model_type") or cfg.get("model_type")
        archs = ", ".join(cfg.get("architectures") or []) or "no architectures listed"
        warning = (f"unknown architecture {mt!r} ({archs}): whole-tensor units only; add it with "
                   "crossroute.model.units.register_architecture(...)")
        if mt not in _WARNED:
            _WARNED.add(mt)
            warnings.warn(warning, UserWarning, stacklevel=3)
        try:
            d: Dims | None = dims_from_config(cfg)
        except CrossrouteError:
            d = None
        L = d.num_layers if d is not None else 0
        counts = {k: [0] * L for k in UNIT_KINDS}
        return cls(cfg, shapes, None, d, {}, list(shapes), counts, {}, {}, warning)

    @staticmethod
    def _place(name: str, shape: tuple[int, ...], rule: TensorRule, d: Dims, expert: int | None,
               cache: dict) -> tuple[_Placement, ...]:
        s0 = rule.slices[0]
        axis, eaxis = s0.axis, s0.expert_axis
        nd = len(shape)
        if axis >= nd or (eaxis is not None and eaxis >= nd):
            raise CrossrouteError(f"{name}: shape {shape} has no axis {axis}"
                                  + (f"/{eaxis}" if eaxis is not None else "") + " for its units (unexpected layout)")
        size = shape[axis]
        n_exp = 1
        if eaxis is not None:
            n_exp = shape[eaxis]
            if n_exp != d.num_experts:
                raise CrossrouteError(f"{name}: {n_exp} experts along axis {eaxis}, but config.json num_experts="
                                      f"{d.num_experts}")
        if expert is not None and expert >= d.num_experts:
            raise CrossrouteError(f"{name}: expert {expert}, but config.json num_experts={d.num_experts}")
        specs = tuple((s.kind, *s.resolve(d)) for s in rule.slices)
        key = (specs, size, n_exp, expert)
        if key not in cache:
            covered = torch.zeros(size, dtype=torch.long)
            by_kind: dict[str, torch.Tensor] = {}
            for s, (kind, off, stride, group, count) in zip(rule.slices, specs, strict=True):
                end = off + (count - 1) * stride + group if count > 0 else off
                if count < 0 or group <= 0 or off < 0 or end > size:
                    raise CrossrouteError(f"{name}: size {size} along axis {axis} (shape {shape}) does not fit "
                                          f"{_describe(kind, d, s)}; check config.json {_KIND_KEYS[kind]}")
                pos = (off + torch.arange(count)[:, None] * stride + torch.arange(group)[None, :]).flatten()
                units = torch.arange(count).repeat_interleave(group)
                covered.index_add_(0, pos, torch.ones_like(pos))
                u = by_kind.setdefault(kind, torch.full((size,), -1, dtype=torch.long))
                u[pos] = units
            if not bool((covered == 1).all()):
                desc = "; ".join(_describe(s.kind, d, s) for s in rule.slices)
                raise CrossrouteError(f"{name}: size {size} along axis {axis} (shape {shape}) does not match "
                                      f"{desc}; check config.json "
                                      f"{', '.join(sorted({_KIND_KEYS[s.kind] for s in rule.slices}))}")
            base = {s.kind: s.resolve(d)[3] for s in rule.slices}
            out = []
            for kind, u in by_kind.items():
                if eaxis is not None:  # expert-flattened: position e*size + i -> unit e*count + j
                    e = torch.arange(n_exp)[:, None]
                    u = torch.where(u[None, :] >= 0, u[None, :] + e * base[kind], -1).flatten()
                elif expert is not None:
                    u = torch.where(u >= 0, u + expert * base[kind], -1)
                pos = (u >= 0).nonzero().flatten()
                out.append((kind, u, pos, u[pos]))
            cache[key] = tuple(out)
        return tuple(_Placement(kind, axis, eaxis, u, pos, units) for kind, u, pos, units in cache[key])

    # -- queries

    @property
    def kinds(self) -> list[str]:
        """Unit kinds present in this model (including the aggregate "expert")."""
        return [k for k in UNIT_KINDS if sum(self.counts.get(k, ())) > 0]

    @property
    def partition_kinds(self) -> list[str]:
        """Present unit kinds that partition the unit-structured entries (no aggregate "expert")."""
        return [k for k in PARTITION_KINDS if sum(self.counts.get(k, ())) > 0]

    def flat(self, reduced: Mapping[str, Any], kind: str) -> torch.Tensor:
        """One kind of a `reduce` result as one float64 vector aligned with `ids(kind)`."""
        if kind == "other":
            return reduced["other"]
        parts = reduced[kind]
        return torch.cat(list(parts)) if len(parts) else torch.zeros(0, dtype=torch.float64)

    @property
    def head_layout(self) -> HeadLayout | None:
        d = self.dims
        return None if d is None else HeadLayout(d.num_heads, d.num_kv_heads, d.head_dim)

    def kv_of_head(self, h: int) -> int:
        lay = self._layout()
        return int(h) // max(lay.num_heads // max(lay.num_kv_heads, 1), 1)

    def with_kv_groups(self, active: dict[str, set[str]]) -> dict[str, set[str]]:
        """Add "kv" to route sets: a KV group is active when one of its query heads is."""
        kv = set()
        for u in active.get("head", set()):
            p = parse_unit_id(u)
            if p is not None and p[1] == "head":
                kv.add(unit_id(p[0], "kv", self.kv_of_head(p[2])))
        return {**active, "kv": kv}

    def _layout(self) -> HeadLayout:
        lay = self.head_layout
        if lay is None:
            raise CrossrouteError(f"no head layout for model_type {self.model_type!r}: config.json needs "
                                  "num_attention_heads and hidden_size")
        return lay

    def n_units(self, kind: str | None = None) -> int:
        """Units of a kind ("other" = whole tensors); None = the partition total (expert aggregates excluded)."""
        if kind == "other":
            return len(self.others)
        if kind is not None:
            return sum(self.counts.get(kind, ()))
        return sum(self.n_units(k) for k in PARTITION_KINDS) + len(self.others)

    def ids(self, kind: str) -> list[str]:
        """Unit ids of a kind, layer-major (the tensor names for "other")."""
        if kind == "other":
            return list(self.others)
        if kind not in TAG:
            raise CrossrouteError(f"unknown unit kind {kind!r}; expected one of {', '.join(UNIT_KINDS)} or other")
        return [f"L{ly}.{TAG[kind]}.{j}" for ly, n in enumerate(self.counts[kind]) for j in range(n)]

    def layer_of(self, name: str) -> int | None:
        e = self._entries.get(name)
        return e.layer if e is not None else None

    def module_of(self, name: str) -> tuple[int, str] | None:
        """(layer, module label) of a tensor inside a layer ("other" for unlisted in-layer tensors), else None."""
        e = self._entries.get(name)
        return (e.layer, e.module) if e is not None else None

    def is_expert_layer(self, layer: int) -> bool:
        return layer in self._expert_layers

    def hook_module(self, layer: int, site: str) -> str | None:
        """Full module name of a hook site ("mlp_act", "head_out", "router") in a layer, or None."""
        if site not in HOOK_SITES:
            raise CrossrouteError(f"unknown hook site {site!r}; expected one of {', '.join(HOOK_SITES)}")
        a = self.architecture
        if a is None or layer not in self._prefixes:
            return None
        sparse = self.dims is not None and self.dims.is_sparse(layer) and self.dims.num_experts > 0
        if site == "mlp_act":
            suffix = a.hooks.sparse_mlp_act if sparse else a.hooks.mlp_act
        elif site == "router":
            suffix = a.hooks.router if sparse else None
        else:
            suffix = a.hooks.head_out
        return None if suffix is None else self._prefixes[layer] + suffix

    def require(self, kinds: Sequence[str] = ("neuron", "head")) -> UnitMap:
        """Raise CrossrouteError (one line) unless the map has units of at least one of `kinds`."""
        if any(self.n_units(k) > 0 for k in kinds):
            return self
        archs = ", ".join(self.architectures) or "no architectures listed"
        why = "is not in crossroute's architecture table" if self.arch is None else \
            f"(table entry {self.arch!r}) has none of them"
        raise CrossrouteError(f"this command needs {'/'.join(kinds)} units, but model_type {self.model_type!r} "
                              f"({archs}) {why}; add it with crossroute.model.units.register_architecture(Arch(...))")

    # -- positions and sums

    def positions(self, name: str) -> list[tuple[str, int, int | None, torch.Tensor]]:
        """Per unit kind of a tensor: (kind, axis, expert_axis, unit_of_position).

        unit_of_position maps each position along `axis` (with expert_axis: along the flattened
        (expert, axis) pair, position e*shape[axis] + i) to a unit index of `kind`, or -1. Empty for "other".
        """
        self._known(name)
        e = self._entries.get(name)
        return [] if e is None else [(p.kind, p.axis, p.expert_axis, p.unit_of_position) for p in e.placements]

    def unit_sums_from_positions(self, name: str, kind: str, pos_sums: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Per-unit float64 sums [counts[kind][layer]] from per-position sums pos_sums[i] at position start+i."""
        e = self._entries.get(name)
        pl = next((p for p in e.placements if p.kind == kind), None) if e is not None else None
        if pl is None:
            raise CrossrouteError(f"{name} has no {kind} units")
        uop = pl.unit_of_position[start:start + pos_sums.numel()]
        if uop.numel() != pos_sums.numel():
            raise CrossrouteError(f"{name}: {pos_sums.numel()} position sums from {start}, but only "
                                  f"{pl.unit_of_position.numel()} positions")
        out = torch.zeros(self.counts[kind][e.layer], dtype=torch.float64)
        ok = uop >= 0
        out.index_add_(0, uop[ok], pos_sums.detach().reshape(-1).to("cpu", torch.float64)[ok])
        return out

    @staticmethod
    def _pos_sums(t: torch.Tensor, axis: int, eaxis: int | None) -> torch.Tensor:
        if eaxis is None:
            dims = [d for d in range(t.dim()) if d != axis]
            return t.sum(dim=dims) if dims else t
        t2 = t.movedim((eaxis, axis), (0, 1))
        return t2.reshape(t2.shape[0] * t2.shape[1], -1).sum(1)

    def reduce(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Per-unit sums of entries: {kind: [float64 [counts[kind][l]] per layer]} for every UNIT_KIND (the
        aggregate "expert" = its router row + its neurons) and {"other": float64 [len(others)]}."""
        out: dict[str, Any] = {k: [torch.zeros(n, dtype=torch.float64) for n in self.counts[k]] for k in UNIT_KINDS}
        other = torch.zeros(len(self.others), dtype=torch.float64)
        for name, t in tensors.items():
            self._known(name)
            if tuple(t.shape) != self.shapes[name]:
                raise CrossrouteError(f"{name}: got shape {tuple(t.shape)}, the model has {self.shapes[name]}")
            e = self._entries.get(name)
            t = t.detach()
            if e is None or not e.placements:
                other[self._other_pos[name]] += float(t.double().sum())
                continue
            per = self._pos_sums(t.double(), e.placements[0].axis, e.placements[0].expert_axis).cpu()
            for p in e.placements:
                out[p.kind][e.layer].index_add_(0, p.units, per[p.pos])
        for layer, inter in self._expert_layers.items():
            ex = out["expert"][layer]
            if self.counts["router"][layer]:
                ex += out["router"][layer]
            if inter:
                ex += out["neuron"][layer].view(-1, inter).sum(1)
        out["other"] = other
        return out

    # -- selection

    def _known(self, name: str) -> None:
        if name not in self.shapes:
            raise CrossrouteError(f"tensor {name!r} is not in this model's unit map")

    def _expand(self, units: Sequence[str]) -> tuple[dict[tuple[int, str], set[int]], set[str]]:
        want: dict[tuple[int, str], set[int]] = {}
        whole: set[str] = set()
        for u in units:
            p = parse_unit_id(u)
            if p is None:
                if u not in self._other_pos:
                    hint = " (a unit-structured tensor: select its units)" if u in self.shapes else ""
                    raise CrossrouteError(f"unknown unit {u!r}{hint}; ids look like L0.mlp.3, L0.head.1, L0.kv.0, "
                                          "L1.router.2, L1.expert.2 or an 'other' tensor name")
                whole.add(u)
                continue
            layer, kind, j = p
            n = self.counts[kind][layer] if layer < self.num_layers else 0
            if j >= n:
                per_layer = ", ".join(str(c) for c in self.counts[kind]) or "none"
                raise CrossrouteError(f"unit {u!r} is outside the model: {self.num_layers} layers, {kind} units "
                                      f"per layer [{per_layer}]")
            if kind == "expert":
                if self.counts["router"][layer]:
                    want.setdefault((layer, "router"), set()).add(j)
                inter = self._expert_layers.get(layer, 0)
                if inter:
                    want.setdefault((layer, "neuron"), set()).update(range(j * inter, (j + 1) * inter))
            else:
                want.setdefault((layer, kind), set()).add(j)
        return want, whole

    def select(self, units: Sequence[str]) -> dict[str, Selection | None]:
        """Per touched tensor, the entries of `units` (None = the whole tensor, for "other" units)."""
        want, whole = self._expand(units)
        out: dict[str, Selection | None] = {n: None for n in self.others if n in whole}
        layers = {ly for ly, _ in want}
        for name, e in self._entries.items():
            if e.layer not in layers or not e.placements:
                continue
            hit = []
            for p in e.placements:
                js = want.get((e.layer, p.kind))
                if js:
                    sel = torch.isin(p.units, torch.tensor(sorted(js), dtype=torch.long))
                    hit.append(p.pos[sel])
            if hit:
                idx = torch.cat(hit).unique(sorted=True)
                if idx.numel():
                    p0 = e.placements[0]
                    out[name] = Selection(self.shapes[name], p0.axis, p0.expert_axis, idx)
        return out

    def mask(self, units: Sequence[str]) -> dict[str, torch.Tensor]:
        """Boolean masks (per touched tensor) of the entries belonging to `units`."""
        return {n: (torch.ones(self.shapes[n], dtype=torch.bool) if s is None else s.mask())
                for n, s in self.select(units).items()}

    # -- summary

    def to_json(self) -> dict[str, Any]:
        lay = self.head_layout
        return {
            "arch": self.arch,
            "model_type": self.model_type,
            "warning": self.warning,
            "num_layers": self.num_layers,
            "counts": {k: {"total": sum(self.counts[k]), "per_layer": list(self.counts[k])} for k in UNIT_KINDS},
            "other": len(self.others),
            "head_layout": lay.to_json() if lay is not None else None,
            "num_experts": self.dims.num_experts if self.dims is not None else 0,
        }


_WARNED: set[Any] = set()


def _first_per_kind(slices: Sequence[SliceSpec]) -> list[SliceSpec]:
    """One slice per kind, in first-appearance order (matches the order of a tensor's placements)."""
    seen: dict[str, SliceSpec] = {}
    for s in slices:
        seen.setdefault(s.kind, s)
    return list(seen.values())
