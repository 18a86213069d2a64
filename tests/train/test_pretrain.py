"""Pretraining of the embedded default: deterministic from a seed; the shipped checkpoint is reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crossroute.domains.builtin import BUILTIN, DEFAULT_DOMAINS
from crossroute.measure.batches import collate, encode_pair
from crossroute.measure.evaluate import evaluate_all
from crossroute.model.default import DEFAULT_CHECKPOINT
from crossroute.model.load import load_model
from crossroute.model.tokenizer import build_char_tokenizer
from crossroute.train.pretrain import PretrainConfig, pretrain


def test_collate_masks_prompt_and_padding() -> None:
    tok = build_char_tokenizer()
    ids, labels = encode_pair(tok, "M:1+2=", "3")
    assert labels == [-100] * 6 + [tok.convert_tokens_to_ids("3"), tok.eos_token_id]
    batch = collate([(ids, labels), ([5, 6], [5, 6])], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert batch["labels"][1, 2:].eq(-100).all()


def test_same_seed_same_weights_different_seed_different() -> None:
    cfg = PretrainConfig(steps=3, batch_size=8, pool_per_domain=50)
    a, _, _ = pretrain(cfg, show_progress=False)
    b, _, _ = pretrain(cfg, show_progress=False)
    c, _, _ = pretrain(cfg.model_copy(update={"seed": 1}), show_progress=False)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), n
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


def test_shipped_default_scores_are_recorded() -> None:
    scores = json.loads((DEFAULT_CHECKPOINT / "scores.json").read_text())
    loaded = load_model(DEFAULT_CHECKPOINT)
    got = evaluate_all(loaded.model, loaded.tokenizer, [BUILTIN[d] for d in DEFAULT_DOMAINS], n=100)
    for d in DEFAULT_DOMAINS:
        assert got[d].score == pytest.approx(scores["scores"][d], abs=1e-6)
        assert 15.0 <= got[d].score <= 85.0  # learned, with headroom for RL


@pytest.mark.slow
def test_regenerated_default_matches_the_shipped_one(tmp_path: Path) -> None:
    """Regenerating the default from its recipe gives the shipped model where the float kernels match, and a model
    as good as it elsewhere.

    On one machine and thread count pretraining is bit-identical (test above). Across CPUs the matmul kernels
    round differently and 3000 steps grow that into a seed's worth of difference (measured on an earlier default of
    the same recipe: single domains at n=100 moved by up to 16 points between such runs, the mean over domains by at
    most 1.4), so single domains are no reproducibility criterion. Hence: identical weights give identical scores;
    otherwise every domain is learned and the mean is within 4 points."""
    shipped = json.loads((DEFAULT_CHECKPOINT / "scores.json").read_text())["scores"]
    model, tok, _ = pretrain(PretrainConfig(), out=tmp_path / "regen", show_progress=False)
    got = evaluate_all(model, tok, [BUILTIN[d] for d in DEFAULT_DOMAINS], n=100)
    ref = load_model(DEFAULT_CHECKPOINT).model.state_dict()
    same = all(torch.equal(v.to(ref[k].dtype), ref[k]) for k, v in model.state_dict().items() if k in ref)
    if same:
        for d in DEFAULT_DOMAINS:
            assert got[d].score == pytest.approx(shipped[d], abs=1e-6), d
    for d in DEFAULT_DOMAINS:
        assert 15.0 <= got[d].score <= 85.0, (d, got[d].score)
    mean_got = sum(got[d].score for d in DEFAULT_DOMAINS) / len(DEFAULT_DOMAINS)
    mean_shipped = sum(shipped[d] for d in DEFAULT_DOMAINS) / len(DEFAULT_DOMAINS)
    assert abs(mean_got - mean_shipped) <= 4.0, ({d: got[d].score for d in DEFAULT_DOMAINS}, shipped)
