"""RL vs SFT from one base on one domain: forgetting, KL to the base (RL's Razor), circuit retention.

RL = one GRPO stage (crossroute.train.run_training, the demo's settings: 8 prompts x 8 samples,
lr 1e-4, beta 0, loss dapo, 60 steps). SFT = crossroute.sft.sft_train on the same domain's reference
answers, with the step count picked from a small grid (plus bisection) so that its held-out score on
the domain matches the RL model's as closely as possible (ties: fewer steps).

KL on the domain's held-out prompts, both directions, named in the result. The RL's Razor quantity (Shenfeld et
al. 2025) is the forward KL(base || model): completions sampled from the *base* (temperature 1, no top-k/top-p,
up to the domain's max_new_tokens, stopped at eos), and at every sampled position (eos included) the exact
full-vocabulary Σ_v p_base(v)(log p_base(v) − log p_M(v)) of the next-token distributions given the same prefix.
The reverse KL(model || base) samples from the model instead. Each is reported as the mean over all sampled
tokens (kl_token) and the mean over prompts of the per-completion sum (kl_seq, with a 95 % bootstrap CI).
Prompts are tokenised as in GRPO and eval (`Domain.prompt_ids`) and left-padded for generation.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from crossroute.analyze.circuits import SEED_REFERENCE, run_circuits
from crossroute.core.console import console
from crossroute.core.rundir import RunDir
from crossroute.domains.builtin import DEFAULT_DOMAINS
from crossroute.domains.files import get_domain
from crossroute.experiments.sequence import StageConfig, TrainConfig, run_training
from crossroute.measure.evaluate import EVAL_SEED, evaluate_all, evaluate_domain
from crossroute.measure.kl import KL_DEFINITION, kl_to_base, zero_kl
from crossroute.model.load import load_model, resolve_model_path
from crossroute.train.sft import sft_train

# The demo's RL stage settings (configs/default_sequence.yaml, its first stage).
DEFAULT_GRPO: dict[str, Any] = {"num_generations": 8, "per_device_train_batch_size": 64, "max_completion_length": 24,
                                "learning_rate": 1e-4, "beta": 0.0, "loss_type": "dapo", "temperature": 1.0,
                                "logging_steps": 10}
def _sft_search(base: Path, domain: str, work: Path, steps_grid: list[int], target: float, lr: float, batch: int,
                eval_n: int, seed: int, refine: int) -> list[dict[str, Any]]:
    """Train SFT candidates (cached on disk), each scored on the domain; bisect between bracketing counts."""
    dom = get_domain(domain)
    tried: dict[int, dict[str, Any]] = {}

    def attempt(steps: int) -> None:
        ckpt = work / f"sft_{steps}"
        secs = None
        if not (ckpt / "config.json").exists():
            t0 = time.perf_counter()
            sft_train(base, [dom], steps, lr, batch, ckpt, seed=seed, log_dir=work / "logs")
            secs = round(time.perf_counter() - t0, 2)
        loaded = load_model(ckpt)
        score = evaluate_domain(loaded.model, loaded.tokenizer, dom, n=eval_n).score
        tried[steps] = {"steps": steps, "score": score, "seconds": secs, "checkpoint": str(ckpt)}
        console.print(f"[dim]sft {domain} {steps} steps: {score:.2f} (RL {target:.2f})[/dim]")

    for s in steps_grid:
        attempt(s)
    for _ in range(refine):
        order = sorted(tried)
        best = min(tried.values(), key=lambda r: (abs(r["score"] - target), r["steps"]))
        if best["score"] == target:
            break
        mids = [(a + b) // 2 for a, b in zip(order, order[1:], strict=False)
                if (tried[a]["score"] - target) * (tried[b]["score"] - target) < 0 and b - a > 1
                and (a == best["steps"] or b == best["steps"])]
        if not mids:
            break
        attempt(mids[0])
    return [tried[s] for s in sorted(tried)]


def run_rl_vs_sft(
    base: str | Path = "default",
    domain: str = "math",
    run_dir: str | Path = "runs/rl_vs_sft",
    domains: list[str] | tuple[str, ...] = DEFAULT_DOMAINS,
    rl_steps: int = 60,
    grpo: dict[str, Any] | None = None,
    sft_steps: tuple[int, ...] = (5, 10, 20, 40),
    sft_lr: float = 1e-4,
    sft_batch_size: int = 32,
    refine: int = 2,
    eval_n: int = 100,
    kl_n: int = 64,
    circuit_n: int = 64,
    target: float = 0.8,
    delta: float = 0.1,
    seed: int = 0,
) -> dict[str, Any]:
    """The RL-vs-SFT comparison; writes RUN_DIR/results/rl_vs_sft.json (and caches models under RUN_DIR)."""
    t_all = time.perf_counter()
    domains = list(domains)
    if domain not in domains:
        domains = [domain, *domains]
    for d in domains:
        get_domain(d)
    base_path = resolve_model_path(base)
    run = RunDir(Path(run_dir).expanduser())
    work = run.root / f"rl_vs_sft_{domain}"
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    # RL: one GRPO stage (resumable: run_training skips a finished stage)
    t0 = time.perf_counter()
    rl_cfg = {**DEFAULT_GRPO, **(grpo or {})}
    cfg = TrainConfig(model=str(base_path), domains=domains, eval_n=eval_n, seed=seed, grpo=rl_cfg,
                      stages=[StageConfig(domain=domain, steps=rl_steps)])
    forgetting = run_training(cfg, work / "rl")
    rl_ckpt = work / "rl" / "checkpoints" / f"01_{domain}"
    timings["rl"] = round(time.perf_counter() - t0, 2)
    scores = {"base": dict(zip(domains, forgetting["matrix"][0], strict=True)),
              "rl": dict(zip(domains, forgetting["matrix"][1], strict=True))}

    # SFT: match the RL model's held-out score on the domain
    t0 = time.perf_counter()
    search = _sft_search(base_path, domain, work, list(sft_steps), scores["rl"][domain], sft_lr, sft_batch_size,
                         eval_n, seed, refine)
    chosen = min(search, key=lambda r: (abs(r["score"] - scores["rl"][domain]), r["steps"]))
    sft_ckpt = Path(chosen["checkpoint"])
    sft_loaded = load_model(sft_ckpt)
    scores["sft"] = {k: v.score for k, v in evaluate_all(sft_loaded.model, sft_loaded.tokenizer,
                                                         [get_domain(d) for d in domains], n=eval_n).items()}
    timings["sft_search"] = round(time.perf_counter() - t0, 2)

    # KL to the base on the domain's held-out prompts
    t0 = time.perf_counter()
    dom = get_domain(domain)
    base_loaded = load_model(base_path)
    prompt_ids = [dom.prompt_ids(e, base_loaded.tokenizer) for e in dom.examples("eval", kl_n, seed=EVAL_SEED)]
    zero = zero_kl(len(prompt_ids))
    kl = {"base": {**zero, "reverse": dict(zero)}}
    for name, path in (("rl", rl_ckpt), ("sft", sft_ckpt)):
        m = load_model(path)
        kl[name] = kl_to_base(m.model, base_loaded.model, m.tokenizer, prompt_ids, dom.max_new_tokens, seed)
    timings["kl"] = round(time.perf_counter() - t0, 2)

    # circuits of every domain: base vs RL vs SFT
    t0 = time.perf_counter()
    circuits = {}
    for d in domains:
        circuits[d] = run_circuits(base_path, {"rl": str(rl_ckpt), "sft": str(sft_ckpt)}, d, n=circuit_n,
                                   target=target, delta=delta, seed=seed).to_json()
    timings["circuits"] = round(time.perf_counter() - t0, 2)

    others = [d for d in domains if d != domain]
    rows = []
    for name in ("base", "rl", "sft"):
        s = scores[name]
        change = {d: s[d] - scores["base"][d] for d in others}
        rows.append({
            "model": name, "own": s[domain], "own_gain": s[domain] - scores["base"][domain],
            "others_change": change,
            "forgetting_mean": 0.0 - sum(change.values()) / len(change) if change else 0.0,
            "kl_token": kl[name]["kl_token"], "kl_seq": kl[name]["kl_seq"], "kl_seq_ci": kl[name]["kl_seq_ci"],
            "kl_reverse_token": kl[name]["reverse"]["kl_token"],
            **circuit_columns(circuits, domains, domain, name),
        })
    timings["total"] = round(time.perf_counter() - t_all, 2)
    result = {
        "base": str(base_path), "domain": domain, "domains": domains, "eval_n": eval_n, "seed": seed,
        "rl": {"checkpoint": str(rl_ckpt), "steps": rl_steps, "grpo": rl_cfg},
        "sft": {"checkpoint": str(sft_ckpt), "steps": chosen["steps"], "learning_rate": sft_lr,
                "batch_size": sft_batch_size, "search": search},
        "scores": scores, "rows": rows, "kl": kl, "kl_definition": KL_DEFINITION,
        "circuits": circuits, "seed_reference": SEED_REFERENCE, "seconds": timings,
        # retention(RL) - retention(SFT) per domain, paired over the same prompts (CI, p)
        "retention_difference": {d: circuits[d]["retention_difference"] for d in domains},
    }
    if abs(chosen["score"] - scores["rl"][domain]) > 5:
        result["warning"] = (f"SFT could not match RL's {domain} score within 5 points (best {chosen['score']:.2f} at "
                             f"{chosen['steps']} steps vs RL {scores['rl'][domain]:.2f}); compare with care.")
    run.write_result("rl_vs_sft", result)
    return result


def circuit_columns(circuits: dict[str, dict[str, Any]], domains: list[str], domain: str, name: str
                    ) -> dict[str, Any]:
    """One model's circuit figures per domain (circuits_{d}.json dicts): retention on the base scale with its CI,
    set overlap, capability left (own gap / base gap), base-circuit faithfulness, mean |score shift|."""
    ret = {d: circuits[d]["retention"][name] for d in domains}
    others = [ret[d]["value"] for d in domains if d != domain and ret[d]["value"] is not None]
    return {
        # retention on the base model's scale (crossroute.analyze.circuits.RETENTION_DEFINITION), 95 % CI
        "retention_own": ret[domain]["value"], "retention_own_ci": [ret[domain]["lo"], ret[domain]["hi"]],
        "retention_others_mean": sum(others) / len(others) if others else None,
        "retention": {d: r["value"] for d, r in ret.items()},
        "retention_ci": {d: [r["lo"], r["hi"]] for d, r in ret.items()},
        "overlap": {d: circuits[d]["overlap"][name] for d in domains},
        "capability": {d: circuits[d]["models"][name]["capability"]["value"] for d in domains},
        "base_circuit_faithfulness": {d: circuits[d]["base_circuit_faithfulness"][name]["value"] for d in domains},
        # mean |s_h(model) - s_h(base)| over all heads: a graded circuit shift the set retention cannot show
        "mean_abs_score_shift": {d: _mean_abs(circuits[d]["score_shift"].get(name)) for d in domains},
        "n_vulnerable": {d: len(circuits[d]["vulnerable"]) for d in domains} if name == "base" else None,
    }


def _mean_abs(m: list[list[float | None]] | None) -> float:
    vals = [abs(v) for row in (m or []) for v in row if v is not None]
    return sum(vals) / len(vals) if vals else 0.0


