"""A zoo of tiny random HF checkpoints, one per supported architecture family, for unit-table tests.

    from zoo import FAMILIES, build_zoo_checkpoint, zoo_checkpoint

    build_zoo_checkpoint("phi3", tmp_path / "phi3", seed=0)   # -> the directory (config, safetensors, tokenizer)
    zoo_checkpoint("phi3", tmp_path_factory)                  # same, built once per pytest session (seed 0)

Every checkpoint: hidden 32, 2 layers, 4 heads x head_dim 8 (2 KV groups where the family has GQA;
GPT-2 / GPT-NeoX are MHA), random seeded init, saved with safetensors, plus one shared byte-level BPE
tokenizer (vocab ~320, trained once on a built-in corpus) with ChatML chat template and
eos/pad/bos = <|im_end|> / <|endoftext|> / <|im_start|>. Qwen3-MoE: 4 experts, top-2,
moe_intermediate 8, layer 0 dense via mlp_only_layers=[0], layer 1 sparse.
Everything loads offline with AutoModelForCausalLM / AutoTokenizer.from_pretrained(path).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

FAMILIES: list[str] = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "olmo2", "phi3", "gpt_neox", "gpt2",
                       "qwen3_moe"]
MODEL_TYPE: dict[str, str] = {f: f for f in FAMILIES} | {"gemma3": "gemma3_text"}

EOS, PAD, BOS = "<|im_end|>", "<|endoftext|>", "<|im_start|>"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
VOCAB = 320  # trained BPE size; the model vocab is this rounded up to a multiple of 8

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 32, 2, 4, 2, 8, 48
EXPERTS, TOP_K, MOE_INTERMEDIATE = 4, 2, 8

_TOKENIZER: PreTrainedTokenizerFast | None = None
_SESSION: dict[tuple[str, int], Path] = {}


def _corpus() -> list[str]:
    lines = [f"{a} + {b} = {a + b}" for a in range(0, 30, 3) for b in range(0, 30, 7)]
    lines += [f"{a} * {b} = {a * b}" for a in range(2, 12) for b in range(2, 12, 3)]
    lines += [f"{a} - {b} = {a - b}" for a in range(10, 40, 5) for b in range(0, 10, 4)]
    lines += ["The cat sat on the mat.", "What is the answer?", "The answer is 42.", "Please add the numbers.",
              "Hello, how are you today?", "I am fine, thank you.", "Solve the problem step by step.",
              "Write a short story about a dog.", "The quick brown fox jumps over the lazy dog.",
              "user", "assistant", "system", "You are a helpful assistant."]
    return lines * 3


def zoo_tokenizer() -> PreTrainedTokenizerFast:
    """The shared byte-level BPE tokenizer (trained once per process)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_corpus(), trainer)
        _TOKENIZER = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=BOS,
                                             chat_template=CHATML, model_max_length=512)
    return _TOKENIZER


def zoo_config_kwargs(family: str, vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    """Config kwargs for AutoConfig.for_model(MODEL_TYPE[family], **kwargs)."""
    if family not in MODEL_TYPE:
        raise ValueError(f"unknown zoo family {family!r}; expected one of {FAMILIES}")
    if family == "gpt2":
        return dict(vocab_size=vocab_size, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                    initializer_range=0.1, **ids)
    kw: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                              num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                              head_dim=HEAD_DIM, max_position_embeddings=512, initializer_range=0.1, **ids)
    if family == "gpt_neox":
        del kw["num_key_value_heads"], kw["head_dim"]
    elif family == "phi3":
        del kw["head_dim"]
    elif family == "qwen3_moe":
        kw.update(num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=MOE_INTERMEDIATE,
                  mlp_only_layers=[0], decoder_sparse_step=1)
    return kw


def build_zoo_checkpoint(family: str, path: Path, seed: int = 0) -> Path:
    """Save a tiny random `family` model + the zoo tokenizer to `path`; returns `path`."""
    tok = zoo_tokenizer()
    vocab = -(-len(tok) // 8) * 8
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    cfg = AutoConfig.for_model(MODEL_TYPE[family], **zoo_config_kwargs(family, vocab, ids))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def zoo_checkpoint(family: str, tmp_path_factory: Any, seed: int = 0) -> Path:
    """`build_zoo_checkpoint` cached per pytest session (pass the `tmp_path_factory` fixture)."""
    key = (family, seed)
    if key not in _SESSION or not (_SESSION[key] / "config.json").exists():
        _SESSION[key] = build_zoo_checkpoint(family, tmp_path_factory.mktemp(f"zoo_{family}") / "ckpt", seed)
    return _SESSION[key]
