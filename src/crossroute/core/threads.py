"""The CPU thread policy, decided once at start-up before torch is imported, and recorded in every result.

Measured (issue 19, 2 cores, loaded): with torch's default threads and OpenMP's default (active) wait policy a
GRPO step took 1.65 s against 0.33 s with one thread, and an eval 8.2 s against 0.93 s; a waiting OpenMP thread
spins on a core another process needs. The policy: intra-op threads = the cores this process may use, shared
evenly by the processes of a distributed launch (LOCAL_WORLD_SIZE), and OMP_WAIT_POLICY=PASSIVE (waiting threads
sleep). Overrides, strongest first: `--threads` / a config's `threads:`, CROSSROUTE_THREADS, OMP_NUM_THREADS;
an OMP_WAIT_POLICY already in the environment is kept. OpenMP reads its variables once, when torch loads it, so
`apply_policy` must run before torch is imported to set the wait policy (the CLI does); afterwards only the
thread count can change, and the record says so.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass

THREADS_ENV = "CROSSROUTE_THREADS"
WAIT_POLICY = "PASSIVE"
# OpenMP / BLAS thread variables set to the policy's count, so that libraries loaded after torch agree with it.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class ThreadPolicy:
    """The threads this process uses and why: `source` is flag, CROSSROUTE_THREADS, OMP_NUM_THREADS or cores."""

    threads: int
    source: str
    cores: int
    local_world: int
    wait_policy: str | None  # OMP_WAIT_POLICY in effect, None when OpenMP had started before it could be set
    before_torch: bool  # whether the policy was applied before torch was imported

    def to_json(self) -> dict[str, object]:
        return asdict(self)


_POLICY: ThreadPolicy | None = None


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _positive(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        from crossroute.core.errors import CrossrouteError

        raise CrossrouteError(f"{name}={raw!r}: must be a whole number >= 1 (or unset).")
    return value


def decide(requested: int | None = None, local_world: int | None = None, cores: int | None = None,
           env: Mapping[str, str] | None = None) -> ThreadPolicy:
    """The policy for `requested` threads (None: CROSSROUTE_THREADS, else OMP_NUM_THREADS, else the cores shared
    evenly by the local processes of a distributed launch); sets nothing."""
    env = os.environ if env is None else env
    world = local_world if local_world is not None else (_positive(env, "LOCAL_WORLD_SIZE") or 1)
    n_cores = cores if cores is not None else available_cores()
    overrides = (("flag", requested), (THREADS_ENV, _positive(env, THREADS_ENV)),
                 ("OMP_NUM_THREADS", _positive(env, "OMP_NUM_THREADS")))
    source, threads = next(((s, int(v)) for s, v in overrides if v), ("cores", max(1, n_cores // max(1, world))))
    return ThreadPolicy(threads, source, n_cores, world, env.get("OMP_WAIT_POLICY") or WAIT_POLICY,
                        "torch" not in sys.modules)


def apply_policy(requested: int | None = None) -> ThreadPolicy:
    """Decide the policy and put it in effect: the environment before torch loads, torch's threads after."""
    global _POLICY
    pol = decide(requested)
    if pol.before_torch:
        os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
        for var in THREAD_VARS:
            os.environ[var] = str(pol.threads)
    else:
        import torch

        torch.set_num_threads(pol.threads)
        if _POLICY is not None and _POLICY.before_torch:  # set at start-up: that wait policy holds
            pol = ThreadPolicy(pol.threads, pol.source, pol.cores, pol.local_world, _POLICY.wait_policy, True)
        elif os.environ.get("OMP_WAIT_POLICY") is None:
            pol = ThreadPolicy(pol.threads, pol.source, pol.cores, pol.local_world, None, False)
    _POLICY = pol
    return pol


def current_policy() -> dict[str, object]:
    """The policy in effect, for a result's envelope (torch's thread count as it is now, when torch is loaded)."""
    pol = _POLICY or decide()
    out = pol.to_json()
    if "torch" in sys.modules:
        out["torch_threads"] = sys.modules["torch"].get_num_threads()
    return out


def configure_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads: `requested` (a config's `threads:`), else the policy decided at start-up (some
    libraries reset torch's count, e.g. accelerate on CPU), else a fresh one; returns the number set."""
    if requested or _POLICY is None:
        return apply_policy(requested).threads
    import torch

    torch.set_num_threads(_POLICY.threads)
    return _POLICY.threads


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the body with `threads` torch intra-op threads (None: unchanged), then restore."""
    if threads is None:
        yield
        return
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(prev)
