"""torch's CPU thread count, set deliberately: processes sharing one machine must not oversubscribe its cores.

Measured (issue 16): GRPO on the embedded default slowed from 1.5 s to 22 s per step when two
2-thread processes shared two cores. Under a multi-process launch (LOCAL_WORLD_SIZE > 1) each process gets
cores / processes threads; a config's `threads:` overrides.
"""

from __future__ import annotations

import os

import torch


def threads_for(requested: int | None, local_world: int | None = None, cores: int | None = None) -> int:
    """The thread count to use: `requested`, else the machine's cores shared evenly by the local processes."""
    if requested:
        return int(requested)
    world = local_world if local_world is not None else int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    n = cores if cores is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                         else os.cpu_count() or 1)
    return max(1, n // max(1, world))


def configure_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads (see threads_for) and return the number set."""
    n = threads_for(requested)
    torch.set_num_threads(n)
    return n
