"""Token batches of (prompt, answer) pairs: loss on the answer and eos only, right-padded."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

Pair = tuple[list[int], list[int]]


def encode_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> Pair:
    """Ids of prompt (with the tokenizer's special tokens) + answer + eos, and labels that are -100 on
    the prompt, so only the answer and eos are trained or scored."""
    return encode_answer(tokenizer, list(tokenizer(prompt, add_special_tokens=True)["input_ids"]), answer)


def encode_answer(tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], answer: str) -> Pair:
    """Already tokenised prompt + answer + eos, labels -100 on the prompt."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    a = list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + eos
    return list(prompt_ids) + a, [-100] * len(prompt_ids) + a


def collate(batch: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of (ids, labels) into tensors with an attention mask (labels -100 on pads)."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
