"""The built-in report sections; importing this package registers each of them."""

from crossroute.report.sections import (  # noqa: F401
    circuits,
    conflict,
    cpift,
    damage,
    diff,
    domains,
    eval,
    forgetting,
    protected,
    rl_vs_sft,
    rollback,
    routes,
    seeds,
    summary,
)
