"""Generation backends: HF generate and vLLM's offline engine (exercised through a stand-in module on CPU)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from crossroute.core.errors import CrossrouteError
from crossroute.domains.builtin import BUILTIN
from crossroute.measure.backends import VllmGenerator, resolve_backend
from crossroute.measure.evaluate import EvalProtocol, evaluate_checkpoint, evaluate_domain
from crossroute.model.load import load_model

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_auto_is_hf_without_a_gpu_engine() -> None:
    import torch

    if HAS_VLLM and torch.cuda.is_available():
        pytest.skip("vLLM with a GPU present")
    assert resolve_backend("auto") == "hf"


@pytest.mark.skipif(HAS_VLLM, reason="vLLM installed")
def test_vllm_without_vllm_is_refused_in_one_line() -> None:
    with pytest.raises(CrossrouteError, match="eval.backend vllm: vLLM is not installed"):
        resolve_backend("vllm")


class _Completion:
    def __init__(self, text: str) -> None:
        self.text = text


class _Output:
    def __init__(self, texts: list[str]) -> None:
        self.outputs = [_Completion(t) for t in texts]


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A stand-in `vllm` whose LLM answers every prompt with the reference it was built for (recording calls)."""
    seen: dict[str, Any] = {"prompts": [], "params": [], "init": None}
    answers: dict[tuple[int, ...], str] = {}

    class LLM:
        def __init__(self, **kwargs: Any) -> None:
            seen["init"] = kwargs

        def generate(self, prompts: list[dict[str, Any]], params: Any, use_tqdm: bool = True) -> list[_Output]:
            seen["prompts"].append([p["prompt_token_ids"] for p in prompts])
            seen["params"].append(params)
            return [_Output([answers.get(tuple(p["prompt_token_ids"]), "?")] * params.n) for p in prompts]

    class SamplingParams:
        def __init__(self, **kwargs: Any) -> None:
            self.__dict__.update(kwargs)

    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = LLM, SamplingParams  # type: ignore[attr-defined]
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    seen["answers"] = answers
    return seen


def test_vllm_backend_gets_trl_token_ids_and_its_completions_are_scored(fake_vllm: dict[str, Any],
                                                                        tiny_ckpt: Path) -> None:
    dom = BUILTIN["math"]
    tok = load_model(tiny_ckpt).tokenizer
    exs = dom.examples("eval", 12)
    for i, e in enumerate(exs):  # right on even examples, wrong on odd ones
        fake_vllm["answers"][tuple(dom.prompt_ids(e, tok))] = e.answer if i % 2 == 0 else "x"
    gen = VllmGenerator(tiny_ckpt, dtype="float32", seed=3)
    res = evaluate_domain(None, tok, dom, n=12, generator=gen)
    assert res.score == pytest.approx(50.0)
    assert fake_vllm["prompts"][0] == [dom.prompt_ids(e, tok) for e in exs]
    p = fake_vllm["params"][0]
    assert (p.n, p.temperature, p.max_tokens) == (1, 0.0, dom.max_new_tokens)
    assert fake_vllm["init"]["model"] == str(tiny_ckpt) and fake_vllm["init"]["seed"] == 3


def test_vllm_sampling_passes_k_temperature_and_seed(fake_vllm: dict[str, Any], tiny_ckpt: Path) -> None:
    proto = EvalProtocol(backend="vllm", k=4, temperature=0.7, top_p=0.9, sample_seed=11, pass_at=[1, 4])
    scores, backend = evaluate_checkpoint(tiny_ckpt, [BUILTIN["code"]], 6, proto)
    assert backend == "vllm"
    p = fake_vllm["params"][0]
    assert (p.n, p.temperature, p.top_p, p.seed) == (4, 0.7, 0.9, 11)
    assert scores["code"].records[0]["completions"] == ["?"] * 4 and scores["code"].score == 0.0


def test_hf_backend_of_evaluate_checkpoint_matches_evaluate_domain(tiny_ckpt: Path) -> None:
    loaded = load_model(tiny_ckpt)
    direct = evaluate_domain(loaded.model, loaded.tokenizer, BUILTIN["qa"], n=20)
    scores, backend = evaluate_checkpoint(tiny_ckpt, [BUILTIN["qa"]], 20, EvalProtocol(backend="hf"))
    assert backend == "hf"
    assert [r["completion"] for r in scores["qa"].records] == [r["completion"] for r in direct.records]
