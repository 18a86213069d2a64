"""PEFT LoRA adapter directories as checkpoints: the streamed merge equals PEFT's merge_and_unload, every analysis
(load_model, eval, diff) sees the merged weights, effective ranks are right, unsupported adapters are one line."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file

import crossroute.analyze.diff as diff_module
from conftest import make_tiny
from crossroute.cli.main import run_app
from crossroute.core.errors import CrossrouteError
from crossroute.model import adapters
from crossroute.model.adapters import adapter_base, adapter_info, effective_rank, is_adapter, merged_checkpoint
from crossroute.model.default import DEFAULT_CHECKPOINT
from crossroute.model.load import load_model, resolve_model_path, save_model
from zoo import build_zoo_checkpoint

QKV_DOWN = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test merges into its own cache and sees an empty Hugging Face hub cache (no network, no user files)."""
    monkeypatch.setenv("CROSSROUTE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CROSSROUTE_ADAPTER_BASE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    yield tmp_path / "cache"


@pytest.fixture(scope="module")
def qwen_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("qwen") / "base", seed=1)


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_zoo_checkpoint("gpt2", tmp_path_factory.mktemp("gpt2") / "base", seed=2)


def base_model(base: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=dtype)


def make_adapter(base: Path, out: Path, seed: int = 0, plant: Any = None, **lora: Any) -> Path:
    """Save a PEFT LoRA adapter of `base` with random (non-zero) A and B; `plant(peft_model)` edits it first."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base_model(base), LoraConfig(init_lora_weights=False, **lora))
        if plant is not None:
            with torch.no_grad():
                plant(model)
        model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The reference: PEFT's own load and merge_and_unload."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base_model(base, dtype), adapter).merge_and_unload()


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def perturb_norm(model: torch.nn.Module) -> None:
    """modules_to_save: give the saved copy of the final norm new values (it must replace the base's)."""
    for name, p in model.named_parameters():
        if "modules_to_save" in name and "model.norm" in name:
            p.add_(0.25)


QWEN_CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=QKV_DOWN, modules_to_save=["model.norm"]),
    # embed_tokens and the tied lm_head: both deltas land on the one embedding tensor
    "rslora_patterns_embedding": dict(r=4, lora_alpha=6, use_rslora=True,
                                      target_modules=[*QKV_DOWN, "embed_tokens", "lm_head"],
                                      rank_pattern={"down_proj": 2, "layers.1.self_attn.q_proj": 3},
                                      alpha_pattern={"v_proj": 3}),
}


@pytest.mark.parametrize("case", sorted(QWEN_CASES))
def test_merge_equals_peft_merge_and_unload(case: str, qwen_base: Path, tmp_path: Path) -> None:
    lora = QWEN_CASES[case]
    adapter = make_adapter(qwen_base, tmp_path / "adapter", plant=perturb_norm, **lora)
    assert is_adapter(adapter) and not is_adapter(qwen_base)
    merged = merged_checkpoint(adapter)
    got = load_file(merged / "model.safetensors")
    base = load_file(qwen_base / "model.safetensors")
    ref = peft_merged(qwen_base, adapter).state_dict()
    assert set(got) == set(base)
    for name in got:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-6, msg=name)
    targets = {f"model.layers.{i}.{m}.weight" for i in range(2)
               for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    extra = {"model.norm.weight"} if lora.get("modules_to_save") else {"model.embed_tokens.weight"}
    assert changed(got, base) == targets | extra
    info = adapter_info(adapter)
    mods = info["modules"]
    if case == "rslora_patterns_embedding":  # per-module r and alpha; rslora scaling alpha / sqrt(r)
        assert mods["model.layers.0.mlp.down_proj"]["r"] == 2
        assert mods["model.layers.1.self_attn.q_proj"]["r"] == 3 and mods["model.layers.0.self_attn.q_proj"]["r"] == 4
        assert mods["model.layers.0.self_attn.v_proj"]["scaling"] == pytest.approx(3 / 2)
        assert mods["model.layers.0.mlp.down_proj"]["scaling"] == pytest.approx(6 / 2 ** 0.5)
        assert mods["model.embed_tokens"]["embedding"] is True
    else:
        assert info["scaling"] == 2.0 and info["replaced_tensors"] == ["model.norm.weight"]


def test_gpt2_conv1d_fan_in_fan_out_and_lora_bias(gpt2_base: Path, tmp_path: Path) -> None:
    """GPT-2's Conv1D stores W as (in, out): δ is transposed (fan_in_fan_out); lora_bias adds scaling · b."""
    adapter = make_adapter(gpt2_base, tmp_path / "adapter", r=2, lora_alpha=5, target_modules=["c_attn", "c_proj"],
                           lora_bias=True, plant=lambda m: [p.normal_() for n, p in m.named_parameters()
                                                            if "lora_B" in n and n.endswith("bias")])
    got = load_file(merged_checkpoint(adapter) / "model.safetensors")
    base = load_file(gpt2_base / "model.safetensors")
    ref = peft_merged(gpt2_base, adapter).state_dict()
    for name in got:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-6, msg=name)
    want = {f"transformer.h.{i}.{m}.{p}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")
            for p in ("weight", "bias")}
    assert changed(got, base) == want


def test_bf16_base_merges_in_fp32_and_keeps_dtype(qwen_base: Path, tmp_path: Path) -> None:
    """An explicit recomputation from the adapter file: (θ.float() + s · B A).to(bf16), for a bf16 base."""
    loaded = load_model(qwen_base)
    save_model(loaded.model.to(torch.bfloat16), loaded.tokenizer, tmp_path / "bf16")
    adapter = make_adapter(tmp_path / "bf16", tmp_path / "adapter", r=3, lora_alpha=7, target_modules=["q_proj"])
    got = load_file(merged_checkpoint(adapter) / "model.safetensors")
    base = load_file(tmp_path / "bf16" / "model.safetensors")
    factors = load_file(adapter / "adapter_model.safetensors")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    for name, value in got.items():
        mod = name.removesuffix(".weight")
        a = factors.get(f"base_model.model.{mod}.lora_A.weight")
        if a is None:
            assert torch.equal(value, base[name]), name
            continue
        b = factors[f"base_model.model.{mod}.lora_B.weight"].float()
        want = (base[name].float() + (b @ a.float()) * (7 / 3)).to(torch.bfloat16)
        assert torch.equal(value, want), name


def test_load_model_of_adapter_gives_merged_logits(qwen_base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(qwen_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=QKV_DOWN)
    loaded = load_model(adapter, device="cpu")
    ref = peft_merged(qwen_base, adapter)
    plain = load_model(qwen_base, device="cpu")
    ids = loaded.tokenizer(["M:12+7=", "Q:pet of Zorbin?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got, want, before = loaded.model(**ids).logits, ref(**ids).logits, plain.model(**ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, before)  # the adapter does change the model
    assert loaded.path == resolve_model_path(adapter) != adapter


def test_merge_is_cached_and_keyed_by_the_adapter(qwen_base: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    adapter = make_adapter(qwen_base, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj"])
    first = merged_checkpoint(adapter)
    assert "merging LoRA adapter" in capsys.readouterr().err
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path(adapter) == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert capsys.readouterr().err == ""  # reused: no second merge, no line
    assert json.loads((first / "adapter_merge.json").read_text())["base"] == str(qwen_base.resolve())
    make_adapter(qwen_base, adapter, seed=5, r=2, lora_alpha=4, target_modules=["q_proj"])  # re-trained in place
    second = merged_checkpoint(adapter)
    assert second != first
    assert not torch.equal(load_file(second / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"],
                           load_file(first / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"])


def write_config(adapter: Path, **fields: Any) -> None:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(cfg | fields))


def test_base_resolution(qwen_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Absolute, adapter-relative, 'default', a hub id in the local cache, the env override and the argument."""
    adapter = make_adapter(qwen_base, tmp_path / "adapters" / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    assert adapter_base(adapter) == qwen_base.resolve()
    shutil.copytree(qwen_base, tmp_path / "adapters" / "base")
    write_config(adapter, base_model_name_or_path="../base")
    assert adapter_base(adapter) == (tmp_path / "adapters" / "base").resolve()
    write_config(adapter, base_model_name_or_path="default")
    assert adapter_base(adapter) == DEFAULT_CHECKPOINT
    snap = tmp_path / "hub" / "models--someorg--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(qwen_base, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    write_config(adapter, base_model_name_or_path="someorg/tiny")
    assert adapter_base(adapter) == snap
    monkeypatch.setenv("CROSSROUTE_ADAPTER_BASE", str(qwen_base))
    assert adapter_base(adapter) == qwen_base.resolve()
    assert adapter_base(adapter, tmp_path / "adapters" / "base") == (tmp_path / "adapters" / "base").resolve()


def test_effective_rank(qwen_base: Path, tmp_path: Path) -> None:
    """r for random factors, 1 for a planted rank-1 B, 0 for B = 0; checked against the full δ's matrix rank."""
    def plant(model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            if "layers.0.self_attn.q_proj.lora_B" in name:
                p.copy_(torch.randn(p.shape[0], 1) @ torch.randn(1, p.shape[1]))
            if "layers.1.self_attn.q_proj.lora_B" in name:
                p.zero_()

    adapter = make_adapter(qwen_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=QKV_DOWN, plant=plant)
    mods = adapter_info(adapter)["modules"]
    factors = load_file(adapter / "adapter_model.safetensors")
    for name, m in mods.items():
        a, b = (factors[f"base_model.model.{name}.lora_{x}.weight"].double() for x in "AB")
        full = torch.linalg.svdvals(m["scaling"] * b @ a)
        explicit = int((full > 1e-6 * full.max()).sum()) if full.max() > 0 else 0
        assert m["effective_rank"] == explicit, name
        assert m["top_singular_value"] == pytest.approx(float(full.max()), rel=1e-9, abs=1e-12)
    assert mods["model.layers.0.self_attn.q_proj"]["effective_rank"] == 1
    assert mods["model.layers.1.self_attn.q_proj"]["effective_rank"] == 0
    assert {m["effective_rank"] for n, m in mods.items() if "q_proj" not in n} == {4}
    assert effective_rank(torch.randn(3, 50), torch.randn(40, 3), 2.0)[0] == 3


def test_cli_eval_and_diff_of_an_adapter(qwen_base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(qwen_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=QKV_DOWN)
    ref = peft_merged(qwen_base, adapter)
    save_model(ref, load_model(qwen_base, device="cpu").tokenizer, tmp_path / "peft_merged")
    for name, model in (("a", adapter), ("p", tmp_path / "peft_merged")):
        argv = ["eval", "--model", str(model), "--domains", "math", "--n", "3", "--out", str(tmp_path / name)]
        assert run_app(argv) == 0
    runs = {n: json.loads((tmp_path / n / "results" / "eval.json").read_text()) for n in "ap"}
    assert runs["a"]["model"] == str(merged_checkpoint(adapter))
    recs = {n: [json.loads(ln) for ln in Path(runs[n]["records"]).read_text().splitlines()] for n in "ap"}
    assert [r["completion"] for r in recs["a"]] == [r["completion"] for r in recs["p"]]
    assert runs["a"]["scores"] == runs["p"]["scores"]

    targets = {f"model.layers.{i}.{m}.weight" for i in range(2)
               for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    anatomy = diff_module.diff_checkpoints(qwen_base, resolve_model_path(adapter))
    assert {t.name for t in anatomy.tensors if t.delta_sq > 0} == targets


def test_cli_diff_base_adapter(qwen_base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(qwen_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=QKV_DOWN)
    assert run_app(["diff", str(qwen_base), str(adapter), "--out", str(tmp_path / "d")]) == 0
    stage = json.loads((tmp_path / "d" / "results" / "diff.json").read_text())["stages"][0]
    targets = {f"model.layers.{i}.{m}.weight" for i in range(2)
               for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert {t["name"] for t in stage["tensors"] if t["delta_norm"] > 0} == targets
    info = stage["adapter"]  # the adapter's rank and each update's effective rank, beside the anatomy
    assert info["r"] == 4 and {m["tensor"] for m in info["modules"].values()} == targets
    assert all(m["effective_rank"] == 4 for m in info["modules"].values())


def one_line_error(fn: Any, *args: Any) -> str:
    with pytest.raises(CrossrouteError) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_refusals_are_one_line(qwen_base: Path, tmp_path: Path) -> None:
    dora = make_adapter(qwen_base, tmp_path / "dora", r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)
    assert "use_dora" in one_line_error(merged_checkpoint, dora)
    ok = make_adapter(qwen_base, tmp_path / "ok", r=2, lora_alpha=4, target_modules=["q_proj"])

    hub = tmp_path / "hub_id"
    shutil.copytree(ok, hub)
    write_config(hub, base_model_name_or_path="someorg/never-downloaded")
    msg = one_line_error(merged_checkpoint, hub)
    assert "base_model_name_or_path" in msg and "local checkpoint directory" in msg and "Hugging Face cache" in msg

    ia3 = tmp_path / "ia3"
    shutil.copytree(ok, ia3)
    write_config(ia3, peft_type="IA3")
    assert "peft_type is 'IA3'" in one_line_error(merged_checkpoint, ia3)

    several = tmp_path / "several"
    shutil.copytree(ok, several)
    shutil.copytree(ok, several / "second")
    assert "several named adapters" in one_line_error(merged_checkpoint, several)

    norm = tmp_path / "norm"  # LoRA factors on a layer PEFT has no plain delta for (an RMSNorm)
    shutil.copytree(ok, norm)
    save_file({"base_model.model.model.norm.lora_A.weight": torch.ones(2, 16),
               "base_model.model.model.norm.lora_B.weight": torch.ones(16, 2)}, norm / "adapter_model.safetensors")
    assert "Qwen3RMSNorm" in one_line_error(merged_checkpoint, norm)

    wrong = tmp_path / "wrong_rank"  # adapter_config.json's rank_pattern disagrees with the saved factors
    shutil.copytree(ok, wrong)
    write_config(wrong, rank_pattern={"q_proj": 3})
    assert "rank_pattern" in one_line_error(merged_checkpoint, wrong)
    tied = make_adapter(qwen_base, tmp_path / "tied", r=2, lora_alpha=4, target_modules=["q_proj"],
                        modules_to_save=["lm_head"])  # PEFT unties lm_head from embed_tokens: no tied checkpoint
    assert "tie_word_embeddings" in one_line_error(merged_checkpoint, tied)
    assert run_app(["eval", "--model", str(dora), "--domains", "math", "--n", "2", "--out", str(tmp_path / "e")]) == 2
    assert not (tmp_path / "e").exists()
    assert not any((tmp_path / "cache").rglob("*.safetensors"))  # nothing merged for any refused adapter
    assert adapters.is_adapter(ok) and not adapters.is_adapter(tmp_path / "missing")


def test_routes_damage_and_rollback_take_an_adapter(qwen_base: Path, tmp_path: Path) -> None:
    """Every analysis resolves an adapter directory to its merged weights (routes, damage, rollback via load_model)."""
    adapter = make_adapter(qwen_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=QKV_DOWN)
    out = tmp_path / "run"
    assert run_app(["routes", str(adapter), "--domains", "math,qa", "--n", "4", "--out", str(out)]) == 0
    assert run_app(["damage", "--before", str(qwen_base), "--after", str(adapter), "--domain", "math", "--later",
                    "qa", "--n", "4", "--k", "2", "--out", str(out)]) == 0
    damage = json.loads((out / "results" / "damage_math.json").read_text())
    assert damage["measured"] != 0  # the adapter's update moved the proxy loss
    assert run_app(["rollback", "--from", str(adapter), "--to", str(qwen_base), "--domain", "math", "--others",
                    "qa", "--fractions", "50,100", "--eval-n", "4", "--out", str(out)]) == 0
    assert (out / "results" / "rollback_math.json").exists()
