"""Sampled KL between checkpoints (crossroute.measure.kl): zero to itself, the exact next-token sum with one new
token, and the per-domain stage KL on each domain's own prompts."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY
from crossroute.domains.builtin import BUILTIN
from crossroute.measure.evaluate import EVAL_SEED
from crossroute.measure.kl import kl_to_base, sampled_kl, stage_kl
from crossroute.model.default import build_default_model


def _tiny(seed: int = 0):
    model, tok = build_default_model(seed, **TINY)
    return model.eval(), tok


def _prompts(tok, domain: str, n: int) -> list[list[int]]:
    dom = BUILTIN[domain]
    return [dom.prompt_ids(e, tok) for e in dom.examples("eval", n, seed=EVAL_SEED)]


def test_kl_of_a_model_to_itself_is_zero_and_positive_to_another() -> None:
    model, tok = _tiny(6)
    other, _ = _tiny(7)
    prompts = _prompts(tok, "math", 6)
    same = kl_to_base(model, model, tok, prompts, max_new_tokens=4, seed=0)
    assert same["kl_token"] == 0.0 and same["n_tokens"] > 0 and same["reverse"]["kl_token"] == 0.0
    diff = kl_to_base(model, other, tok, prompts, max_new_tokens=4, seed=0)
    assert diff["kl_token"] > 0 and diff["reverse"]["kl_token"] > 0 and "forward" in diff["direction"]
    assert diff["kl_seq_ci"][0] <= diff["kl_seq"] <= diff["kl_seq_ci"][1]


def test_forward_kl_samples_from_the_base_and_matches_an_exact_sum() -> None:
    # With one new token, the sampled estimate of KL(p || q) averages the exact next-token KL at the prompt's end
    # over prompts: it equals sum_v p(v)(log p(v) - log q(v)) computed directly, whichever token was sampled.
    p_model, tok = _tiny(6)
    q_model, _ = _tiny(7)
    ids = _prompts(tok, "math", 4)
    got = sampled_kl(p_model, p_model, q_model, tok, ids, max_new_tokens=1, seed=0, batch_size=1)
    want = []
    with torch.no_grad():
        for row in ids:
            x = torch.tensor([row])
            lp = torch.log_softmax(p_model(x).logits[0, -1].float(), -1)
            lq = torch.log_softmax(q_model(x).logits[0, -1].float(), -1)
            want.append(float((lp.exp() * (lp - lq)).sum()))
    assert got["kl_seq"] == pytest.approx(sum(want) / len(want), rel=1e-4)


def test_stage_kl_is_per_domain_on_that_domains_prompts() -> None:
    ref, tok = _tiny(6)
    model, _ = _tiny(7)
    doms = [BUILTIN["math"], BUILTIN["qa"]]
    got = stage_kl(ref, model, tok, doms, n=3, seed=0)
    assert set(got) == {"math", "qa"} and all(v["n_prompts"] == 3 for v in got.values())
    want = sampled_kl(ref, ref, model, tok, _prompts(tok, "qa", 3), BUILTIN["qa"].max_new_tokens, 0)
    assert got["qa"]["kl_token"] == pytest.approx(want["kl_token"], rel=1e-6)
    assert stage_kl(ref, ref, tok, doms, n=3)["math"]["kl_token"] == 0.0
