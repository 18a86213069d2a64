"""Print a multi-seed demo's summary as Markdown for RESULTS.md: every claim's figures per seed, mean, 95 % t-interval
and verdict, then the cost of each part.  Usage: python benchmarks/demo_summary.py runs/demo"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:+.3g}"


def main(run: Path) -> None:
    demo = json.loads((run / "results" / "demo.json").read_text())
    seeds = demo["seeds"]
    rows = demo.get("summary") or demo["per_seed"][str(seeds[0])]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    print(", ".join(f"{n} {v}" for v, n in counts.items()))
    print()
    print("| claim | figure | " + " | ".join(f"seed {k}" for k in seeds) + " | mean [95 % t-interval] | verdict |")
    print("|---|---|" + "---|" * len(seeds) + "---|---|")
    for r in rows:
        if not r["estimates"]:
            print(f"| {r['key']} | – |" + " – |" * len(seeds) + f" – | {r['verdict']} |")
        for e in r["estimates"]:
            per = dict(zip(r.get("seeds") or seeds, e.get("per_seed") or [e["value"]], strict=False))
            cells = " | ".join(fmt(per.get(k)) for k in seeds)
            print(f"| {r['key']} | {e['label']} | {cells} | {fmt(e['value'])} [{fmt(e['lo'])}, {fmt(e['hi'])}] | "
                  f"{e['verdict']} |")
    print()
    print(f"Wall time {demo['wall_seconds']:.0f} s on {demo['workers']} one-thread processes.")
    print()
    print("| part | seconds, all seeds | per seed |")
    print("|---|---|---|")
    for p, s in demo["cost_per_part"].items():
        per = ", ".join(f"{c['seconds']:.0f}" for c in sorted(demo["costs"], key=lambda c: c["seed"])
                        if c["part"] == p)
        print(f"| {p} | {s:.0f} | {per} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
