"""Forgetting matrix summaries (DESIGN.md §2.1): peak, forgetting, backward transfer, refresh recovery.

`forgetting_summary` reads the matrix of mean scores (its `forgetting` is the max-based peak - final, biased
upward by the max over noisy rows); `paired_summary` gives every difference between named rows as a paired
estimate over the same prompts, with a bootstrap CI and a p-value (McNemar for 0/1 outcomes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from crossroute.measure.stats import linear_fit, paired_by_key, paired_diff

Trained = Sequence[str | Sequence[str]]  # per stage: its domain, or a mixed stage's domains


def stage_domains(trained: Trained) -> list[list[str]]:
    """Each stage's domains as a list (a single-domain stage has one)."""
    return [[t] if isinstance(t, str) else list(t) for t in trained]


def _gain_key(row: str, d: str, doms: list[str]) -> str:
    """A stage's own-gain key: the stage's name, or `stage:domain` for each domain of a mixed stage."""
    return row if len(doms) == 1 else f"{row}:{d}"


def forgetting_summary(rows: list[str], matrix: list[list[float]], domains: list[str],
                       trained: Trained, refresh_row: int | None) -> dict[str, Any]:
    """Peak, forgetting, backward transfer and averages of E[stage, domain] (DESIGN.md 2.1).

    rows[0] is the base model; rows[1..T] the sequence stages (trained[i] is stage i+1's domain, or a mixed
    stage's list of domains); refresh_row, if given, indexes the refresh row (excluded from peak/forgetting/BWT).
    """
    per_stage = stage_domains(trained)
    seq_end = refresh_row if refresh_row is not None else len(rows)
    seq = matrix[:seq_end]
    final = seq[-1]
    peak = {d: max(r[j] for r in seq) for j, d in enumerate(domains)}
    forgetting = {d: peak[d] - final[j] for j, d in enumerate(domains)}
    # BWT over trained domains but the last: score at the end minus score right after its own stage.
    bwt_terms = [final[domains.index(d)] - seq[i + 1][domains.index(d)]
                 for i, doms in enumerate(per_stage[:-1]) for d in doms]
    out: dict[str, Any] = {
        "peak": peak,
        "forgetting": forgetting,
        "backward_transfer": sum(bwt_terms) / len(bwt_terms) if bwt_terms else 0.0,
        "average_base": sum(matrix[0]) / len(domains),
        "average_final": sum(final) / len(domains),
        "own_stage_gain": {_gain_key(rows[i + 1], d, doms): seq[i + 1][domains.index(d)] - seq[i][domains.index(d)]
                           for i, doms in enumerate(per_stage) for d in doms},
    }
    if refresh_row is not None:
        ref = matrix[refresh_row]
        a = rows[refresh_row].removeprefix("refresh_")
        j = domains.index(a)
        lost = peak[a] - final[j]
        out["refresh"] = {
            "domain": a,
            "before": final[j],
            "after": ref[j],
            "peak": peak[a],
            "recovered_points": ref[j] - final[j],
            "recovery_share": (ref[j] - final[j]) / lost if lost > 0 else None,
            "others_change": {d: ref[k] - final[k] for k, d in enumerate(domains) if d != a},
            "average_after": sum(ref) / len(domains),
        }
    return out


# ----------------------------------------------------------------------------- paired, from per-example records

PerExample = dict[str, dict[str, float]]  # domain -> example key -> score in [0, 1]


def per_example_scores(records: list[dict[str, Any]]) -> PerExample:
    """Eval records grouped by domain and keyed by prompt, so two checkpoints pair on the same examples."""
    out: PerExample = {}
    for r in records:
        key = f"{r.get('id') or ''}\x00{r['prompt']}"
        out.setdefault(str(r["domain"]), {})[key] = float(r["score"])
    return out


def _diff(a: dict[str, float], b: dict[str, float], sign: float = 1.0) -> dict[str, Any]:
    """paired_diff(b - a) (sign -1: a - b) as JSON."""
    x, y = paired_by_key(a, b)
    d = paired_diff(x, y) if sign > 0 else paired_diff(y, x)
    return d.to_json()


def paired_summary(rows: list[str], per_row: list[PerExample], domains: list[str], trained: Trained,
                   refresh_row: int | None) -> dict[str, Any]:
    """Every difference of the summary as a paired estimate over the same prompts: CI and p-value.

    Forgetting of a trained domain is defined between named rows: the score right after its own (last) stage
    minus the score at the end of the sequence; of an untrained domain, the base minus the end. Own-stage gain:
    the stage's row minus the row before. Refresh: its row minus the end of the sequence, for every domain."""
    seq_end = refresh_row if refresh_row is not None else len(rows)
    end = seq_end - 1
    per_stage = stage_domains(trained)
    forgetting: dict[str, Any] = {}
    for d in domains:
        own = max((i + 1 for i, t in enumerate(per_stage) if d in t), default=0)
        forgetting[d] = {"from": rows[own], "to": rows[end],
                         **_diff(per_row[own].get(d, {}), per_row[end].get(d, {}), sign=-1.0)}
    gains = {_gain_key(rows[i + 1], t, doms): {"domain": t, **_diff(per_row[i].get(t, {}), per_row[i + 1].get(t, {}))}
             for i, doms in enumerate(per_stage) for t in doms}
    out: dict[str, Any] = {"forgetting": forgetting, "own_stage_gain": gains}
    if refresh_row is not None:
        out["refresh"] = {d: _diff(per_row[end].get(d, {}), per_row[refresh_row].get(d, {})) for d in domains}
    return out


def compare_runs(rows: list[str], per_row_a: list[PerExample], per_row_b: list[PerExample],
                 domains: list[str]) -> dict[str, dict[str, Any]]:
    """Run b minus run a at every row both have (e.g. protected minus unprotected), per domain, paired over the
    same eval prompts: bootstrap CI and p-value."""
    return {row: {d: _diff(a.get(d, {}), b.get(d, {})) for d in domains}
            for row, a, b in zip(rows, per_row_a, per_row_b, strict=True)}


KL_FORGETTING_DEFINITION = (
    "one point per sequence stage s and domain d other than the stage's own domain t: drop = score(d) at the row "
    "before s minus score(d) after s, paired over the same prompts (points, with its CI); kl_new_task = forward "
    "KL(row before s || s) per token on t's prompts (RL's Razor predictor); kl_on_domain = the same KL on d's "
    "prompts. The fits are least squares of drop on each KL over all points (stages, domains and seeds), with a "
    "pairs-bootstrap CI of the slope and R² and a permutation p-value of the slope")


def forgetting_points(rows: list[str], per_row: list[PerExample], domains: list[str], trained: Trained,
                      kl_previous: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The (KL, drop) points of KL_FORGETTING_DEFINITION for one run; `kl_previous[row][domain]` is the KL of that
    stage to the row before it (measure.kl.stage_kl). A mixed stage's new-task KL is the mean over its domains."""
    points = []
    for i, own in enumerate(stage_domains(trained)):
        row = rows[i + 1]
        kl = kl_previous.get(row)
        if not kl or any(t not in kl for t in own):
            continue
        new_task = sum(kl[t]["kl_token"] for t in own) / len(own)
        for d in domains:
            if d in own or d not in kl:
                continue
            drop = _diff(per_row[i].get(d, {}), per_row[i + 1].get(d, {}), sign=-1.0)
            points.append({"stage": row, "stage_domain": "+".join(own), "domain": d, "drop": drop,
                           "kl_new_task": new_task, "kl_on_domain": kl[d]["kl_token"]})
    return points


def forgetting_vs_kl(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Drop against each KL over `points` (from one run or several seeds), with the fits."""
    y = [p["drop"]["value"] for p in points]
    return {"definition": KL_FORGETTING_DEFINITION, "points": points,
            "fit_new_task": linear_fit([p["kl_new_task"] for p in points], y),
            "fit_on_domain": linear_fit([p["kl_on_domain"] for p in points], y)}
