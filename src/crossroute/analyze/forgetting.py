"""Forgetting matrix summaries (DESIGN.md §2.1): peak, forgetting, backward transfer, refresh recovery."""

from __future__ import annotations

from typing import Any


def forgetting_summary(rows: list[str], matrix: list[list[float]], domains: list[str],
                       trained: list[str], refresh_row: int | None) -> dict[str, Any]:
    """Peak, forgetting, backward transfer and averages of E[stage, domain] (DESIGN.md 2.1).

    rows[0] is the base model; rows[1..T] the sequence stages (trained[i] is stage i+1's domain);
    refresh_row, if given, indexes the refresh row (excluded from peak/forgetting/BWT).
    """
    seq_end = refresh_row if refresh_row is not None else len(rows)
    seq = matrix[:seq_end]
    final = seq[-1]
    peak = {d: max(r[j] for r in seq) for j, d in enumerate(domains)}
    forgetting = {d: peak[d] - final[j] for j, d in enumerate(domains)}
    # BWT over trained domains but the last: score at the end minus score right after its own stage.
    bwt_terms = []
    for i, d in enumerate(trained[:-1]):
        j = domains.index(d)
        bwt_terms.append(final[j] - seq[i + 1][j])
    out: dict[str, Any] = {
        "peak": peak,
        "forgetting": forgetting,
        "backward_transfer": sum(bwt_terms) / len(bwt_terms) if bwt_terms else 0.0,
        "average_base": sum(matrix[0]) / len(domains),
        "average_final": sum(final) / len(domains),
        "own_stage_gain": {f"{i + 1:02d}_{d}": seq[i + 1][domains.index(d)] - seq[i][domains.index(d)]
                           for i, d in enumerate(trained)},
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
