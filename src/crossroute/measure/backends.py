"""Generation backends for evaluation: HF `generate` (any machine) or vLLM's offline engine (GPU, when installed).

Both take the same tokenised prompts (`Domain.prompt_ids`, TRL's tokenisation), so a domain is scored on the same
token ids whichever backend generates; vLLM gets them as `TokensPrompt`s and never re-tokenises.
"""

from __future__ import annotations

import gc
import importlib.util
import sys
from pathlib import Path
from typing import Any, Protocol

from crossroute.core.errors import CrossrouteError

BACKENDS = ("auto", "hf", "vllm")


class Generator(Protocol):
    """Completions for tokenised prompts: greedy (one each) or k samples each."""

    name: str

    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[str]: ...

    def sample(self, prompt_ids: list[list[int]], max_new_tokens: int, k: int, temperature: float, top_p: float,
               seed: int) -> list[list[str]]: ...


def vllm_installed() -> bool:
    """vLLM can be imported (an already imported module counts, even one without a spec)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except ValueError:
        return "vllm" in sys.modules


def vllm_available() -> bool:
    """vLLM is importable and a CUDA device is present (its offline engine needs one)."""
    if not vllm_installed():
        return False
    import torch

    return torch.cuda.is_available()


def resolve_backend(backend: str) -> str:
    """The backend an eval runs on: `auto` is vLLM where it is installed with a GPU, else HF; `vllm` without
    vLLM is refused (exit 2) rather than silently replaced."""
    if backend not in BACKENDS:
        raise CrossrouteError(f"eval.backend {backend!r} unknown; use one of {', '.join(BACKENDS)}.")
    if backend == "auto":
        return "vllm" if vllm_available() else "hf"
    if backend == "vllm" and not vllm_installed():
        raise CrossrouteError("eval.backend vllm: vLLM is not installed; `pip install vllm` on a GPU machine, or set "
                              "eval.backend to hf.")
    return backend


class VllmGenerator:
    """vLLM's offline `LLM` on one checkpoint directory; `close()` frees the GPU for the next checkpoint."""

    name = "vllm"

    def __init__(self, path: str | Path, dtype: str = "auto", seed: int = 0, gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None) -> None:
        from vllm import LLM

        kwargs: dict[str, Any] = {"model": str(path), "dtype": dtype, "seed": seed,
                                  "gpu_memory_utilization": gpu_memory_utilization}
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.llm = LLM(**kwargs)

    def _run(self, prompt_ids: list[list[int]], params: Any) -> list[list[str]]:
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids], params,
                                 use_tqdm=False)
        return [[c.text for c in o.outputs] for o in outs]

    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens, skip_special_tokens=True)
        return [cs[0] for cs in self._run(prompt_ids, params)]

    def sample(self, prompt_ids: list[list[int]], max_new_tokens: int, k: int, temperature: float, top_p: float,
               seed: int) -> list[list[str]]:
        from vllm import SamplingParams

        params = SamplingParams(n=k, temperature=temperature, top_p=top_p, top_k=-1, max_tokens=max_new_tokens,
                                seed=seed, skip_special_tokens=True)
        return self._run(prompt_ids, params)

    def close(self) -> None:
        """Drop the engine and return its GPU memory (the next checkpoint starts its own)."""
        del self.llm
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
