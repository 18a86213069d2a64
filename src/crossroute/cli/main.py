"""The `crossroute` command line (typer + rich) under one exit-code contract (crossroute.core.errors): 0 success;
2 bad input, one line `crossroute: error: ...` on stderr (click's usage errors too); 130 interrupted (Ctrl-C or
SIGTERM), one line; 1 with a traceback for anything unexpected (a bug to report)."""

from __future__ import annotations

import errno
import math
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from crossroute.core.config import MAX_EVAL_N, MAX_TRAIN_PROMPTS, check_count, check_numeric_fields, parse_numbers
from crossroute.core.console import console
from crossroute.core.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK, INTERRUPTED_MESSAGE, CrossrouteError
from crossroute.core.rundir import RunDir
from crossroute.report.console import print_forgetting, scores_table

if TYPE_CHECKING:
    from crossroute.domains.domain import Domain

DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}
PATH_ERRORS = {errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}
MAX_K = 1024  # completions per prompt: more is a typo (and k x batch rows of memory)
# TRL config fields whose value must be > 0 / >= 0 (TRL checks neither, and fails deep inside training).
GRPO_POSITIVE = ("max_completion_length", "max_prompt_length", "num_generations", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "generation_batch_size", "steps_per_generation", "num_iterations",
                 "temperature", "top_p", "repetition_penalty", "logging_steps")
SFT_POSITIVE = ("max_length", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps")
TRAINER_NONNEGATIVE = ("learning_rate", "beta", "weight_decay", "max_grad_norm", "warmup_steps", "top_k")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Measure, explain and repair cross-domain forgetting in sequential multi-domain RL post-training.",
)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="checkpoint directory, or 'default' (embedded)")]
DomainsOpt = Annotated[str, typer.Option("--domains", "-d", help="comma list: built-in names, domain spec files "
                                         "(.yaml), data files, NAME=PATH")]
ThreadsOpt = Annotated[int | None, typer.Option(min=1, help="torch CPU threads (1 avoids oversubscription)")]


@app.callback()
def start(threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads of this process "
                                                      "(default: CROSSROUTE_THREADS, OMP_NUM_THREADS, else the "
                                                      "cores / local processes)")] = None) -> None:
    """Decide the thread policy before any command imports torch (crossroute.core.threads)."""
    from crossroute.core.threads import apply_policy

    apply_policy(threads)


# ----------------------------------------------------------------------------- checks at the CLI boundary

def check_range(flag: str, value: float, lo: float, hi: float, lo_open: bool = True) -> None:
    """Refuse a float option outside (lo, hi] (or [lo, hi] when not `lo_open`), naming the option."""
    low_ok = value > lo if lo_open else value >= lo
    if not (math.isfinite(value) and low_ok and value <= hi):
        opening = "(" if lo_open else "["
        bound = f"{'>' if lo_open else '>='} {lo:g}" if math.isinf(hi) else f"in {opening}{lo:g}, {hi:g}]"
        raise CrossrouteError(f"{flag} {value:g}: must be {bound}.")


def same_checkpoint(a: str, b: str) -> bool:
    """Whether two checkpoint arguments name one checkpoint ('default' is the shipped one, without loading torch)."""
    shipped = Path(__file__).resolve().parents[1] / "assets" / "default"

    def key(s: str) -> Path:
        return shipped if s == "default" else Path(s).expanduser().resolve()

    return key(a) == key(b)


def check_distinct(flag_a: str, a: str, flag_b: str, b: str) -> None:
    """Refuse two options that must name different checkpoints but name the same one (a zero update)."""
    if same_checkpoint(a, b):
        raise CrossrouteError(f"{flag_a} and {flag_b} name the same checkpoint ({a}), so the update between them is "
                              "zero; pass the checkpoint right after domain A's stage and a later one.")


def check_eval_rows(doms: Sequence[Domain], n: int) -> dict[str, int]:
    """Refuse a domain whose eval split is empty; returns {domain: prompts} for those with fewer than n (all of
    them are evaluated). The draw is the one evaluation uses (Domain caches it)."""
    from crossroute.measure.evaluate import EVAL_SEED

    short: dict[str, int] = {}
    for d in doms:
        have = len(d.examples("eval", n, seed=EVAL_SEED))
        if have == 0:
            raise CrossrouteError(f"domain {d.name}: no eval rows to score; give it an eval file (or file: to split "
                                  "one), or drop it from --domains.")
        if have < n:
            short[d.name] = have
    return short


def warn_short(short: dict[str, int], n: int, flag: str) -> None:
    """Say which domains have fewer eval prompts than asked for (each is evaluated on all it has)."""
    for name, have in short.items():
        warnings.warn(f"domain {name}: only {have} eval prompt{'s' if have > 1 else ''} ({flag} {n}); evaluating all "
                      f"{have}.", UserWarning, stacklevel=2)


def model_context(path: Path) -> int | None:
    """The checkpoint's context length in tokens from config.json (None when it declares none)."""
    import json

    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = (cfg.get("text_config") or cfg) if isinstance(cfg, dict) else {}
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def prompt_chars(d: Domain, example: Any) -> int:
    """Characters of an example's prompt as shown (every message of a conversation)."""
    if example.messages:
        return sum(len(m.get("content", "")) for m in example.messages)
    return len(d.plain_prompt(example))


def check_prompt_lengths(path: Path, doms: Sequence[Domain], n: int) -> None:
    """Refuse eval prompts that fill the model's whole context (a 10 MB prompt would allocate gigabytes); far
    longer ones are refused from their length in characters, before tokenising them."""
    from crossroute.measure.evaluate import EVAL_SEED
    from crossroute.model.load import check_checkpoint_dir, load_tokenizer

    context = model_context(check_checkpoint_dir(path))
    if context is None:
        return
    tok = load_tokenizer(path)
    for d in doms:
        for i, e in enumerate(d.examples("eval", n, seed=EVAL_SEED), 1):
            chars = prompt_chars(d, e)
            tokens = None if chars > 64 * context else len(d.prompt_ids(e, tok))
            if tokens is None or tokens >= context:
                size, where = f"{chars} characters" if tokens is None else f"{tokens} tokens", e.where or f"prompt {i}"
                raise CrossrouteError(f"domain {d.name}: {where}: the prompt is {size}, which fills {path.name}'s "
                                      f"context of {context} tokens; shorten or drop that row, or use a model with a "
                                      "longer context.")


def check_train_sizes(where: str, eval_n: int, train_prompts: int) -> None:
    """Refuse a config's eval_n / train_prompts beyond what crossroute draws (a huge count would run for hours)."""
    check_count(eval_n, f"{where}: field eval_n", MAX_EVAL_N, "eval prompts per domain")
    check_count(train_prompts, f"{where}: field train_prompts", MAX_TRAIN_PROMPTS, "train prompts")


def check_grpo_numbers(cfg: Any, where: str) -> None:
    """Refuse GRPOConfig numbers TRL accepts unchecked (learning_rate: fast, max_completion_length: 0), naming the
    field, before anything trains."""
    from trl import GRPOConfig

    blocks = [("grpo", cfg.grpo)] + [(f"stages.{i}.grpo", st.grpo) for i, st in enumerate(cfg.stages)]
    if cfg.refresh is not None:
        blocks.append(("refresh.grpo", cfg.refresh.grpo))
    for label, values in blocks:
        check_numeric_fields(GRPOConfig, values, f"{where}: field {label}", GRPO_POSITIVE, TRAINER_NONNEGATIVE)


def report_section(e: BaseException) -> str | None:
    """The report section (crossroute/report/sections/NAME.py) an exception was raised in, innermost first."""
    for frame, _ in reversed(list(traceback.walk_tb(e.__traceback__))):
        file = Path(frame.f_code.co_filename)
        if file.parent.name == "sections" and file.parent.parent.name == "report":
            return file.stem
    return None


def write_report(root: Path) -> Path:
    """build_report, where a results file a section cannot read (missing keys, wrong types) becomes one line
    naming the section instead of a traceback."""
    from crossroute.report.build import build_report

    try:
        return build_report(root)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:
        section = report_section(e)
        if section is None:
            raise
        detail = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        raise CrossrouteError(f"{root / 'results'}: the report's {section} section cannot read its results ({detail});"
                              " a results file is incomplete or was edited: rerun the command that wrote it, or "
                              "delete that file.") from None


@app.command()
def pretrain(
    out: Annotated[Path, typer.Option(file_okay=False, help="where to save the checkpoint")] = Path("runs/pretrained"),
    seed: Annotated[int, typer.Option(help="random seed; the shipped default uses 0")] = 0,
    steps: Annotated[int | None, typer.Option(min=1, help="override the number of training steps")] = None,
    eval_n: Annotated[int, typer.Option(min=1, max=MAX_EVAL_N, help="held-out prompts per domain for the final "
                                        "eval")] = 100,
    preset: Annotated[str, typer.Option(help="model size: default (~0.8 M, CPU) or gpu (~69 M, one GPU)")] = "default",
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out that crossroute did not write "
                                        "(deletes it)")] = False,
) -> None:
    """Pretrain an embedded model (Qwen3 architecture, char tokenizer) by SFT on the built-in domains.

    Example: crossroute pretrain --out runs/pretrained --seed 0   (--preset gpu for the ~69 M model)
    """
    from crossroute.core.atomic import atomic_write_json
    from crossroute.domains.builtin import BUILTIN, DEFAULT_DOMAINS
    from crossroute.measure.evaluate import evaluate_all
    from crossroute.model.presets import get_preset, require_device
    from crossroute.train.pretrain import PretrainConfig
    from crossroute.train.pretrain import pretrain as run_pretrain

    require_device(get_preset(preset))
    cfg = PretrainConfig.for_preset(preset, seed=seed, **({"steps": steps} if steps is not None else {}))
    model, tok, stats = run_pretrain(cfg, out=out, force=force)
    scores = evaluate_all(model, tok, [BUILTIN[d] for d in DEFAULT_DOMAINS], n=eval_n, show_progress=True)
    atomic_write_json(out / "scores.json", {"config": cfg.model_dump(), **stats, "eval_n": eval_n,
                                            "scores": {k: v.score for k, v in scores.items()}})
    console.print(scores_table(f"pretrained ({stats['seconds']} s)", {"held-out": {k: v.score for k, v in
                                                                                  scores.items()}},
                               list(scores)))
    console.print(f"saved {out}")


@app.command("eval")
def eval_cmd(
    model: ModelOpt = "default",
    domains: DomainsOpt = "math,code,qa,cw",
    n: Annotated[int, typer.Option(min=1, max=MAX_EVAL_N, help="held-out prompts per domain (a domain with fewer: "
                                   "all of them)")] = 100,
    out: Annotated[Path, typer.Option(file_okay=False, help="run directory for results/eval.json")] = Path("runs/eval"),
    p_ref: Annotated[bool, typer.Option("--p-ref", help="also the teacher-forced probability of each reference "
                                        "answer (the exact expected accuracy of sampling at T=1; one forward "
                                        "pass)")] = False,
    k: Annotated[int, typer.Option(min=1, max=MAX_K, help="completions per prompt (sampling; score = avg@k)")] = 1,
    temperature: Annotated[float, typer.Option(help="sampling temperature (0: greedy)")] = 0.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling")] = 1.0,
    pass_at: Annotated[str, typer.Option(help="comma list of j for unbiased pass@j (j <= k)")] = "",
    eval_set: Annotated[Path | None, typer.Option(file_okay=False, help="score the prompts pinned in this run "
                                                  "directory (RUN/eval_sets/), e.g. to compare a new checkpoint with "
                                                  "a run's on the same prompts")] = None,
) -> None:
    """Score a checkpoint on each domain's held-out split (greedy decoding), print a table, write JSON.

    Example: crossroute eval --model default --domains math,code,qa,cw --out runs/eval
    """
    from pydantic import ValidationError

    from crossroute.core.rundir import open_run
    from crossroute.domains.files import parse_domains
    from crossroute.measure.evaluate import EvalProtocol, evaluate_checkpoint, scores_json, write_records
    from crossroute.model.load import resolve_model_path

    js = parse_numbers(pass_at, "--pass-at", int, "whole numbers j <= --k", "1,4")
    try:
        proto = EvalProtocol(k=k, temperature=temperature, top_p=top_p, p_ref=p_ref, pass_at=js)
    except ValidationError as e:
        err = e.errors()[0]
        flag = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "--k/--temperature/--pass-at"
        raise CrossrouteError(f"{flag}: {err['msg'].removeprefix('Value error, ')}.") from None
    doms = parse_domains(domains)
    if eval_set is not None:
        from crossroute.domains.evalset import EVAL_SETS, with_eval_sets

        doms = with_eval_sets(eval_set, doms)
        unpinned = [d.name for d in doms if d.eval_fixed is None]
        if unpinned:
            raise CrossrouteError(f"--eval-set {eval_set}: no {EVAL_SETS}/{unpinned[0]}.jsonl there; pass a run "
                                  "directory written by train, cpift or rollback, or drop the domain.")
    short = check_eval_rows(doms, n)
    path = resolve_model_path(model)
    from crossroute.io.integrity import check_weights
    from crossroute.model.load import check_checkpoint_dir

    check_weights(check_checkpoint_dir(path))  # NaN/inf or corrupt weights fail before the run directory exists
    check_prompt_lengths(path, doms, n)
    warn_short(short, n, "--n")
    run = open_run(out, {"model": str(path), "domains": [d.name for d in doms], "n": n,
                         "eval": proto.model_dump(), **({"eval_set": str(eval_set)} if eval_set else {})},
                   kind="eval")
    scores, backend = evaluate_checkpoint(path, doms, n, proto, show_progress=True)
    records = write_records(run.results / f"eval_{path.name}.jsonl", scores)
    run.write_result("eval", {"model": str(path), "backend": backend, "records": str(records),
                              **scores_json(scores)})
    console.print(scores_table("held-out scores [0-100], 95% bootstrap CI over prompts",
                               {path.name: {k: v.score for k, v in scores.items()}},
                               [d.name for d in doms], ci={path.name: {k: (v.lo, v.hi) for k, v in scores.items()}}))
    for name, v in scores.items():
        extra = ({"P(ref)": v.p_ref} if v.p_ref is not None else {}) | v.pass_at
        for label, e in extra.items():
            console.print(f"{label} {name}: {e['value']:.2f} [{e['lo']:.2f}, {e['hi']:.2f}]")
    console.print(f"wrote {run.results / 'eval.json'} and {records}")


@app.command()
def rescore(
    records: Annotated[Path, typer.Argument(dir_okay=False, help="eval records: RUN/results/eval_<name>.jsonl")],
    domain: Annotated[str, typer.Option("--domain", help="the domain whose scorer to use: a built-in name, a domain "
                                        "spec (.yaml), a data file or NAME=SPEC")],
    out: Annotated[Path | None, typer.Option(dir_okay=False, help="where to write the re-scored records "
                                             "(default: RECORDS with .rescored.jsonl)")] = None,
) -> None:
    """Score saved completions again (a changed verifier needs no new generations); prints the new mean.

    Example: crossroute rescore runs/seq/results/eval_01_gsm8k.jsonl --domain gsm8k=configs/domains/gsm8k.yaml
    """
    from crossroute.domains.files import get_domain
    from crossroute.measure.rescore import read_records, write_rescored
    from crossroute.measure.rescore import rescore as run_rescore

    dom = get_domain(domain)
    scored = run_rescore(read_records(records), dom, str(records))
    dest = write_rescored(out or records.with_name(records.name.removesuffix(".jsonl") + ".rescored.jsonl"), scored)
    old = [r["previous_score"] for r in scored if isinstance(r.get("previous_score"), int | float)]
    new = 100.0 * sum(r["score"] for r in scored) / len(scored)
    line = f"{dom.name}: {new:.2f} on {len(scored)} records (scorer {dom.kind})"
    if len(old) == len(scored):
        line += f"; was {100.0 * sum(old) / len(old):.2f}"
    console.print(line)
    console.print(f"wrote {dest}")


@app.command()
def train(
    config: Annotated[Path, typer.Argument(dir_okay=False, help="YAML config: model, domains, grpo defaults, stages, "
                                           "refresh")],
    out: Annotated[Path, typer.Option(file_okay=False, help="run directory (rerun the same command to resume)")] = Path(
        "runs/train"),
) -> None:
    """Sequential single-domain RL (TRL GRPOTrainer), eval after every stage, forgetting matrix, refresh.

    Example: crossroute train configs/default_sequence.yaml --out runs/sequence
    (GPU: accelerate launch -m crossroute.cli train CONFIG --out DIR)
    """
    from crossroute.experiments.sequence import is_main_process, load_train_config, run_training

    cfg = load_train_config(config)
    check_train_sizes(str(config), cfg.eval_n, cfg.train_prompts)
    check_grpo_numbers(cfg, str(config))
    result = run_training(cfg, out)
    if is_main_process():  # under torchrun/accelerate the other processes only train
        print_forgetting(result)
        console.print(f"report: {write_report(out)}")


@app.command()
def diff(
    paths: Annotated[list[Path], typer.Argument(help="BASE CKPT... (checkpoint dirs), or one run directory")],
    out: Annotated[Path | None, typer.Option(file_okay=False, help="run directory for results/diff.json (default: "
                                             "the run)")] = None,
    top_k: Annotated[float, typer.Option(help="top-k % changed units per kind, in (0, 100]")] = 1.0,
    base: Annotated[str | None, typer.Option(help="with a trajectory folder: the checkpoint before its first step "
                                             "(or 'default')")] = None,
    kernel: Annotated[str, typer.Option(help="block kernel: numba (default) or torch (the reference path)")] = "numba",
    as_dtype: Annotated[str | None, typer.Option("--as-dtype", help="diff both checkpoints as they would be stored "
                                                 "in this dtype (bfloat16, float16, float32): results/"
                                                 "diff_<dtype>.json")] = None,
) -> None:
    """Update anatomy of each checkpoint against its predecessor, streamed tensor by tensor (fp32).

    Example: crossroute diff runs/demo/seeds/0    or    crossroute diff BASE STAGE1 STAGE2 --out runs/diff
    A folder of checkpoint-N/ (or global_step_N/, step_N/) folders is a trajectory: one interval per step.
    --as-dtype bfloat16 rounds every weight of both to bf16 first: how much of "unchanged" is bf16's resolution.
    """
    check_range("--top-k", top_k, 0, 100)
    from crossroute.analyze.diff import diff_sequence, resolve_storage, write_diff_results
    from crossroute.core.rundir import load_run, open_run
    from crossroute.experiments.sequence import run_checkpoints
    from crossroute.model.load import resolve_model_path
    from crossroute.model.trajectory import is_trajectory, trajectory

    resolve_storage(as_dtype)  # a bad name fails before any run directory is made
    if base is not None and not (len(paths) == 1 and is_trajectory(paths[0])):
        raise CrossrouteError("--base: only with one trajectory folder (checkpoint-N/ folders); otherwise pass the "
                              "base as the first checkpoint.")
    if len(paths) == 1 and is_trajectory(paths[0]):
        steps = trajectory(paths[0])
        ckpts = ([resolve_model_path(base)] if base else []) + [p for _, p in steps]
        names = (["base"] if base else []) + [f"step_{s}" for s, _ in steps]
        if len(ckpts) < 2:
            raise CrossrouteError(f"{paths[0]}: one step folder only; pass --base BASE to diff it against its start.")
        run = open_run(out or Path("runs/diff"), {"checkpoints": [str(c) for c in ckpts]}, kind="diff")
    elif len(paths) == 1:
        run = load_run(paths[0])
        ckpts, names = run_checkpoints(run)
        if out is not None:
            run = open_run(out, {"checkpoints": [str(c) for c in ckpts]}, kind="diff")
    else:
        ckpts, names = list(paths), [p.name for p in paths]
        run = open_run(out or Path("runs/diff"), {"checkpoints": [str(c) for c in ckpts]}, kind="diff")
    result = diff_sequence(ckpts, top_k_percent=top_k, progress=True, kernel=kernel, storage=as_dtype)
    data = result.to_json()
    data["stage_names"] = names[1:]
    if names[-1].startswith("step_"):
        data["steps"] = [int(n.removeprefix("step_")) if n.startswith("step_") else None for n in names]
    path = write_diff_results(data, run.root, name=f"diff_{as_dtype}" if as_dtype else "diff")
    for name, st in zip(names[1:], data["stages"], strict=True):
        below = ", ".join(f"<{t:g}: {100 * f:.1f}%" for t, f in zip(st["thresholds"], st["below_fraction"],
                                                                     strict=True))
        console.print(f"{name}: {below}; rel. change {st['rel_change']:.2e}")
    console.print(f"wrote {path}; report: {write_report(run.root)}")


def analysis_run(out: Path, config: dict, kind: str) -> RunDir:
    """An existing run directory (results are added to it), or a new one for this analysis."""
    from crossroute.core.rundir import RunDir, open_run

    if (out / "run.yaml").exists():
        return RunDir(out)
    return open_run(out, config, kind=kind)


@app.command()
def routes(
    model: Annotated[str, typer.Argument(help="checkpoint directory, or 'default'")],
    domains: DomainsOpt = "math,code,qa,cw",
    n: Annotated[int, typer.Option(min=1, max=MAX_EVAL_N, help="probe prompts (with reference answers) per "
                                   "domain")] = 64,
    q: Annotated[float, typer.Option(help="active set = per-layer top-q % of units, in (0, 100]")] = 10.0,
    batch_size: Annotated[int, typer.Option(min=1, help="micro-batch size")] = 16,
    out: Annotated[Path, typer.Option(file_okay=False, help="run directory (an existing run gains "
                                      "results/routes.json)")] = Path("runs/routes"),
) -> None:
    """Active routes: per-unit activity per domain (hooks at the unit table's sites: down-projection and
    attention-output inputs, MoE routers), active-set overlaps.

    Example: crossroute routes default --domains math,code,qa,cw --out runs/demo
    """
    check_range("--q", q, 0, 100)
    from crossroute.analyze.routes import run_routes

    run = analysis_run(out, {"model": model, "domains": domains, "n": n, "q": q}, kind="routes")
    res = run_routes(model, domains, n=n, q=q, run_dir=run.root, batch_size=batch_size, show_progress=True)
    for kind, m in res.jaccard.items():
        console.print(scores_table(f"Jaccard of active {kind} sets (top {q:g} %)",
                                   {a: dict(zip(res.domains, row, strict=True)) for a, row in
                                    zip(res.domains, m, strict=True)}, res.domains))
    console.print(f"wrote {run.results / 'routes.json'}; report: {write_report(run.root)}")


@app.command()
def conflict(
    model: Annotated[str, typer.Argument(help="checkpoint directory, or 'default'")],
    domains: Annotated[str, typer.Option("--domains", "-d", help="two domains A,B")] = "math,qa",
    n: Annotated[int, typer.Option(min=1, max=MAX_EVAL_N, help="examples per domain for each gradient")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="micro-batch size (memory bound)")] = 16,
    layers: Annotated[str | None, typer.Option(help="differentiate only these decoder layers, e.g. 28-35 (memory "
                                               "of large models); default: all")] = None,
    out: Annotated[Path, typer.Option(file_okay=False, help="run directory (an existing run gains "
                                      "results/conflict_A_B.json)")] = Path("runs/conflict"),
) -> None:
    """Module-level gradient conflict between two domains: global cosine vs per-module cosines.

    Example: crossroute conflict runs/demo/seeds/0/checkpoints/02_math --domains math,qa --out runs/demo/seeds/0
    """
    from crossroute.core.config import parse_layers

    layer_list = parse_layers(layers) if layers is not None else None
    if len([d for d in domains.split(",") if d.strip()]) != 2:
        raise CrossrouteError(f"--domains {domains!r}: conflict compares exactly two domains, e.g. math,qa.")
    from crossroute.analyze.conflict import run_conflict
    from crossroute.domains.files import parse_domains

    doms = parse_domains(domains)
    run = analysis_run(out, {"model": model, "domains": domains, "n": n}, kind="conflict")
    res = run_conflict(model, doms[0], doms[1], n=n, batch_size=batch_size, run_dir=run.root, show_progress=True,
                       layers=layer_list)
    j = res.to_json()
    worst, best = j["most_conflicting"] or {}, j["most_synergistic"] or {}
    console.print(f"global cosine {res.global_cosine:+.4f}; most conflicting {worst.get('module')} "
                  f"({worst.get('cosine', 0):+.3f}); most synergistic {best.get('module')} "
                  f"({best.get('cosine', 0):+.3f})")
    console.print(f"report: {write_report(run.root)}")


@app.command()
def damage(
    before: Annotated[str, typer.Option(help="checkpoint right after domain A's stage (theta_A)")],
    after: Annotated[str, typer.Option(help="a later checkpoint (theta_A + delta)")],
    domain: Annotated[str, typer.Option(help="the earlier domain A whose loss is expanded")],
    later: Annotated[str | None, typer.Option(help="later domain(s) B,...: conflict subspace on shared routes")] = None,
    n: Annotated[int, typer.Option(min=1, max=MAX_EVAL_N, help="examples for the proxy loss (answer NLL)")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="micro-batch size (memory bound)")] = 64,
    k: Annotated[int, typer.Option(min=1, max=MAX_K, help="conflict subspace: top eigenpairs (k // 2 bottom "
                                   "ones)")] = 20,
    threads: ThreadsOpt = None,
    layers: Annotated[str | None, typer.Option(help="restrict delta, gradients and HVPs to these decoder layers, "
                                               "e.g. 28-35 (memory of large models); default: all")] = None,
    out: Annotated[Path, typer.Option(file_okay=False, help="run directory (an existing run gains "
                                      "results/damage_A.json)")] = Path("runs/damage"),
) -> None:
    """Second-order damage of a later update to domain A: measured vs g.d + 1/2 d.H.d, per-unit attribution.

    Example: crossroute damage --before runs/demo/seeds/0/checkpoints/02_math
             --after runs/demo/seeds/0/checkpoints/04_cw
             --domain math --later qa,cw --out runs/demo/seeds/0   (--layers 28-35: a large model's last layers)
    """
    from crossroute.core.config import parse_layers

    check_distinct("--before", before, "--after", after)
    layer_list = parse_layers(layers) if layers is not None else None
    from crossroute.analyze.damage import run_damage
    from crossroute.report.console import conflict_line

    run = analysis_run(out, {"before": before, "after": after, "domain": domain}, kind="damage")
    res = run_damage(before, after, domain, later=later, n=n, batch_size=batch_size, run_dir=run.root, k=k,
                     threads=threads, layers=layer_list)
    j = res.to_json()
    console.print(f"{domain}: measured {j['measured']:+.4f} = first order {j['first_order']:+.4f} + second order "
                  f"{j['second_order']:+.4f} + error {j['error']:+.4f}; top 1/2/5/10 % of units carry "
                  + "/".join(f"{100 * j['top_share'][p]:.0f}%" for p in ("1", "2", "5", "10")))
    for c in j["conflict"]:
        console.print(conflict_line(c))
    console.print(f"report: {write_report(run.root)}")


@app.command()
def rollback(
    now: Annotated[str, typer.Option("--from", help="the current checkpoint (after the later stages)")],
    to: Annotated[str, typer.Option(help="checkpoint right after domain A's stage (theta_A)")],
    domain: Annotated[str, typer.Option(help="the domain A to repair")],
    others: Annotated[str, typer.Option(help="later domain(s) whose scores must not pay, comma list")],
    fractions: Annotated[str, typer.Option(help="unit fractions in % to sweep")] = "0.5,1,2,4,8,16,32",
    eval_n: Annotated[int, typer.Option(min=1, max=MAX_EVAL_N, help="held-out prompts per domain at each "
                                        "point")] = 100,
    save_best: Annotated[Path | None, typer.Option(file_okay=False, help="save the best repaired checkpoint "
                                                   "here")] = None,
    threads: ThreadsOpt = None,
    out: Annotated[Path, typer.Option(file_okay=False, help="run directory (an existing run gains "
                                      "results/rollback_A.json)")] = Path("runs/rollback"),
    full_at: Annotated[str, typer.Option(help="points to evaluate greedily besides the screen's picks, "
                                         "VARIANT/SELECTOR/FRACTION comma list, e.g. mlp/conflict/2")] = "",
    full_all: Annotated[bool, typer.Option(help="greedy evaluation at every point (the unscreened sweep)")] = False,
) -> None:
    """Training-free rollback of the units a route-conflict score picks, vs random and largest-|delta| units.

    Example: crossroute rollback --from runs/demo/seeds/0/checkpoints/04_cw
             --to runs/demo/seeds/0/checkpoints/02_math
             --domain math --others qa --out runs/demo/seeds/0
    """
    fr = parse_numbers(fractions, "--fractions", float, "percentages", "1,2,4")
    if not fr or any(not 0 < f <= 100 for f in fr):
        raise CrossrouteError(f"--fractions {fractions!r}: each fraction must be in (0, 100] percent.")
    check_distinct("--from", now, "--to", to)
    from crossroute.repair.rollback import parse_full_points, run_rollback

    points = parse_full_points(full_at)
    run = analysis_run(out, {"from": now, "to": to, "domain": domain, "others": others}, kind="rollback")
    res = run_rollback(now, to, domain, others, fractions=fr, run_dir=run.root, save_best=save_best,
                       eval_n=eval_n, threads=threads, full_at=points, full_all=full_all)
    best = res.to_json().get("best") or {}
    console.print(f"{res.n_full_evals} greedy evaluations; every point screened by P(ref)")
    console.print(f"best: {best.get('variant')}/{best.get('selector')} at {best.get('fraction')} % "
                  f"({best.get('n_units')} units): recovery {best.get('recovery')}")
    console.print(f"report: {write_report(run.root)}")


@app.command()
def circuits(
    base: Annotated[str, typer.Option(help="base checkpoint (or 'default')")],
    models: Annotated[str, typer.Option(help="fine-tuned models as NAME=PATH,...; rl= and sft= enable the "
                                        "differential vulnerability")],
    domain: Annotated[str, typer.Option(help="built-in domain, or a JSONL of clean/corrupted pairs")] = "math",
    n: Annotated[int, typer.Option(min=1, max=MAX_EVAL_N, help="clean/corrupted prompt pairs")] = 64,
    target: Annotated[float, typer.Option(help="faithfulness the circuit should reach, as a share of the base "
                                          "model's clean-corrupted gap")] = 0.8,
    max_fraction: Annotated[float, typer.Option(help="circuit-size cap: at most this share of all heads (the "
                                                "cap binds when the target is not reached within it)")] = 0.25,
    delta: Annotated[float, typer.Option(help="vulnerable head: s_h(SFT) < s_h(RL) - delta (base scale)")] = 0.1,
    batch_size: Annotated[int, typer.Option(min=1, help="rows per forward pass")] = 32,
    out: Annotated[Path, typer.Option(file_okay=False, help="run directory (an existing run gains "
                                      "results/circuits_D.json)")] = Path("runs/circuits"),
    full_curve: Annotated[bool, typer.Option("--full-curve", help="evaluate the faithfulness curve at every "
                                             "prefix size (default: until the circuit is decided)")] = False,
) -> None:
    """Head-level circuits (attribution patching, confirmed by activation patching) on the base model's scale,
    their retention and the RL - SFT differential vulnerability, with 95 % CIs over prompts.

    Example: crossroute circuits --base default --domain math
             --models rl=runs/demo/seeds/0/checkpoints/02_math,sft=runs/sft
    """
    check_range("--target", target, 0, 1)
    check_range("--max-fraction", max_fraction, 0, 1)
    check_range("--delta", delta, 0, math.inf, lo_open=False)
    from crossroute.analyze.circuits import run_circuits
    from crossroute.report.console import print_circuits

    run = analysis_run(out, {"base": base, "models": models, "domain": domain, "n": n, "target": target,
                             "max_fraction": max_fraction, "delta": delta, "full_curve": full_curve}, kind="circuits")
    res = run_circuits(base, models, domain, n=n, target=target, delta=delta, run_dir=run.root, show_progress=True,
                       max_fraction=max_fraction, batch_size=batch_size, passes={"full_curve": full_curve})
    print_circuits(res.to_json())
    console.print(f"report: {write_report(run.root)}")


@app.command()
def cpift(
    config: Annotated[Path, typer.Argument(dir_okay=False, help="YAML config (see configs/cpift_default.yaml)")],
    out: Annotated[Path, typer.Option(file_okay=False, help="run directory (rerun to resume)")] = Path("runs/cpift"),
) -> None:
    """CPI-FT: core-parameter isolation fine-tuning, against mixed and sequential SFT (same total steps).

    Example: crossroute cpift configs/cpift_default.yaml --out runs/cpift
    """
    from crossroute.repair.cpift import load_cpift_config, run_cpift_config

    cfg = load_cpift_config(config)
    from trl import SFTConfig

    check_train_sizes(str(config), cfg.eval_n, cfg.train_prompts)
    check_numeric_fields(SFTConfig, cfg.sft, f"{config}: field sft", SFT_POSITIVE, TRAINER_NONNEGATIVE)
    res = run_cpift_config(cfg, out)
    console.print(scores_table("held-out scores per method", {m: res["scores"][m] for m in res["methods"]},
                               res["domains"]))
    console.print(f"report: {write_report(out)}")


@app.command()
def merge(
    method: Annotated[str | None, typer.Argument(help="transplant (crossroute's core transplant), a mergekit method "
                                                 "(linear, slerp, nuslerp, task_arithmetic, ties, dare_ties, "
                                                 "dare_linear, della, model_stock, ram, ...) or a mergekit YAML "
                                                 "file")] = None,
    base: Annotated[str | None, typer.Argument(help="base checkpoint directory (or 'default'); none with a "
                                               "YAML")] = None,
    models: Annotated[list[str] | None, typer.Argument(help="one or more checkpoints to merge into the base")] = None,
    out: Annotated[Path, typer.Option(file_okay=False, help="output checkpoint directory")] = Path("runs/merged"),
    param: Annotated[list[str] | None, typer.Option("--param", help="a mergekit parameter, repeatable: NAME=VALUE "
                                                    "for the whole merge, I:NAME=VALUE for input I only (0: BASE, "
                                                    "1..: the MODELs in order); VALUE is YAML: 0.5, true, a "
                                                    "gradient [0, 0.5, 1], or filter entries [{filter: mlp, value: "
                                                    "0.3}, {value: 0.5}]")] = None,
    config: Annotated[Path | None, typer.Option(dir_okay=False, help="a mergekit YAML file (as mergekit-yaml reads "
                                                "it) instead of METHOD BASE MODEL...")] = None,
    t: Annotated[float | None, typer.Option(help="slerp/linear: the other model's weight, 0 keeps the base "
                                            "[default: 0.5]")] = None,
    t_schedule: Annotated[Path | None, typer.Option(help="slerp/linear: a mergekit-style per-layer t schedule "
                                                    "YAML")] = None,
    mask: Annotated[Path | None, typer.Option(help="transplant: core mask (safetensors of flat indices)")] = None,
    top_percent: Annotated[float, typer.Option(help="transplant: donor's top-p % |update| as core, in (0, "
                                               "100]")] = 1.0,
    seed: Annotated[int, typer.Option(help="seed of mergekit's random methods (DARE, DELLA), as mergekit-yaml's "
                                      "--random-seed")] = 0,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out that crossroute did not write "
                                        "(deletes it)")] = False,
) -> None:
    """Merge checkpoints: any mergekit method (or a mergekit YAML) run by mergekit, or crossroute's core transplant.

    Example: crossroute merge ties default runs/demo/seeds/0/checkpoints/01_code
             runs/demo/seeds/0/checkpoints/02_math
    --param weight=0.5 --param density=0.5 --out runs/ties   (see docs/merge.md)
    """
    check_range("--top-percent", top_percent, 0, 100)
    from crossroute.repair.merge import parse_param_options, run_merge

    params, per_input = parse_param_options(param or [])
    path = run_merge(method, base, models or [], out, t_schedule_yaml=t_schedule, t=t, mask=mask,
                     top_percent=top_percent, params=params or None, model_params=per_input or None,
                     config=config, seed=seed, force=force)
    console.print(f"wrote {path}")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(file_okay=False, help="a run directory")]) -> None:
    """Write RUN_DIR/report.html: one self-contained HTML file with every section that has results.

    Example: crossroute report runs/demo
    """
    console.print(f"wrote {write_report(run_dir)}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(file_okay=False, help="run directory of the demo (rerun to resume)")] = Path(
        "runs/demo"),
    eval_n: Annotated[int | None, typer.Option(min=1, max=MAX_EVAL_N, help="held-out prompts per domain (default: "
                                               "the config's)")] = None,
    preset: Annotated[str, typer.Option(help="default: the shipped ~0.8 M model on CPU; gpu: a ~69 M model "
                                        "pretrained on one GPU (pretrain, sequence, refresh, diagnosis, "
                                        "rollback, report)")] = "default",
    quick: Annotated[bool, typer.Option("--quick", help="a first look: one seed, the sequence and its diagnosis "
                                        "(a few minutes)")] = False,
    seeds: Annotated[str | None, typer.Option(help="training seeds, e.g. 0,1,2 (the default; --quick: 0)")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="processes running the seeds' parts, one thread each "
                                                "(default: one per core)")] = None,
) -> None:
    """The end-to-end pipeline on an embedded model over 3 training seeds: RL sequence + refresh, mixed RL,
    diagnosis, repairs, prevention, CPI-FT, RL vs SFT; the report's summary gives every figure across seeds.

    Example: crossroute demo --out runs/demo   (--quick for one seed; on a GPU: crossroute demo --preset gpu)
    """
    from crossroute.experiments.demo import run_demo

    run_demo(out, eval_n=eval_n, preset=preset, quick=quick, seeds=parse_seeds(seeds), workers=workers)


def parse_seeds(text: str | None) -> list[int] | None:
    """'0,1,2' as [0, 1, 2]; a one-line error naming --seeds otherwise."""
    if text is None:
        return None
    seeds = parse_numbers(text, "--seeds", int, "integers", "--seeds 0,1,2")
    if not seeds:
        raise CrossrouteError("--seeds: give at least one seed, e.g. --seeds 0,1,2.")
    return seeds


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: object = None, line: str | None = None) -> None:
    """crossroute's own warnings (e.g. an unknown architecture) as one line, without source context."""
    console.print(f"[yellow]crossroute: warning:[/yellow] {escape(str(message))}", highlight=False, soft_wrap=True,
                  emoji=False)


# ----------------------------------------------------------------------------- the exit-code contract

def usage_error_line(e: typer.TyperException) -> str:
    """A click/typer usage error (unknown option, missing argument, bad type or range) as one line with the
    command's help to look at."""
    ctx = getattr(e, "ctx", None)
    command = ctx.command_path if ctx is not None else "crossroute"
    where = f"{command.removeprefix('crossroute').strip()}: " if command != "crossroute" else ""
    message = " ".join(e.format_message().split()).rstrip(".")
    return f"{where}{message}{' ' if message.endswith('?') else '; '}see '{command} --help'."


def _parsed_file(e: RecursionError) -> str | None:
    """'FILE:LINE' of the input a RecursionError arose parsing (JSON or YAML), from the innermost crossroute frame
    with a `where` ('file:line') or `path` (and `lineno`) local; None when no parser recursed (a bug, not input)."""
    frames = [f for f, _ in traceback.walk_tb(e.__traceback__)]
    names = [Path(f.f_code.co_filename).as_posix() for f in frames]
    if not any(n.endswith(("/json/decoder.py", "/json/__init__.py")) or "/yaml/" in n for n in names):
        return None
    for f in reversed([f for f, n in zip(frames, names, strict=True) if "/crossroute/" in n]):
        where, path, line = f.f_locals.get("where"), f.f_locals.get("path"), f.f_locals.get("lineno")
        if isinstance(where, str) and where:
            return where
        if isinstance(path, str | Path):
            return f"{path}:{line}" if isinstance(line, int) else str(path)
    return "an input file"


def _memory_error(e: BaseException) -> bool:
    """Whether `e` is running out of host or GPU memory (torch's OutOfMemoryError, without importing torch)."""
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"


def user_error_line(e: BaseException) -> str | None:
    """The one-line message of an error the user can fix (bad input, full disk, a path that is a file, too little
    memory); None for anything else, which stays a traceback (a bug)."""
    if isinstance(e, CrossrouteError):
        return str(e)
    if isinstance(e, typer.TyperException):
        return usage_error_line(e)
    if isinstance(e, OSError) and e.errno in DISK_ERRORS:
        where = f" writing {e.filename}" if e.filename else ""
        return (f"{os.strerror(e.errno)}{where}; nothing partial was kept (writes are atomic): free space or fix "
                "permissions, then run the same command again to resume.")
    if isinstance(e, OSError) and e.errno in PATH_ERRORS:
        return f"{e.filename or 'a path'}: {os.strerror(e.errno)}; pass a directory for --out and files for inputs."
    if isinstance(e, RecursionError) and (parsed := _parsed_file(e)) is not None:
        return f"{parsed}: nested too deeply to read (JSON/YAML); flatten that row or drop it."
    if _memory_error(e):
        first = (str(e).splitlines() or [""])[0][:160]
        return (f"out of memory ({type(e).__name__}: {first}); lower --batch-size or --n (or the config's batch "
                "sizes), or use a machine with more memory.")
    return None


def _say(line: str, error: bool) -> None:
    """Print one `crossroute: ...` line on stderr, never wrapped, markup in `line` shown literally."""
    label = "[red]crossroute: error:[/red] " if error else "crossroute: "
    console.print(label + escape(line), highlight=False, soft_wrap=True, emoji=False)


def _interrupted() -> int:
    """The interrupted line; returns the exit code 130."""
    _say(INTERRUPTED_MESSAGE, error=False)
    return EXIT_INTERRUPTED


def _sigterm_as_interrupt() -> Any:
    """Make SIGTERM raise KeyboardInterrupt in this process, so a killed run ends like Ctrl-C (one line, 130); a
    forked child (data loader, sandbox) that inherits the handler takes the default action instead. Returns the
    previous handler (None where none could be set: not the main thread)."""
    owner = os.getpid()

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # ValueError: not the main thread (crossroute embedded in another program)
        return None


def run_app(args: Sequence[str]) -> int:
    """Run one command; returns its exit code after printing at most one line for bad input or an interrupt.
    Unexpected errors propagate (a traceback, exit 1). No arguments shows the help."""
    try:
        rc: Any = app(args=list(args) or ["--help"], prog_name="crossroute", standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        return _interrupted()
    except typer.Exit as e:
        rc = e.exit_code
    except Exception as e:
        line = user_error_line(e)
        if line is None:
            raise
        _say(line, error=True)
        return getattr(e, "exit_code", EXIT_BAD_INPUT) if isinstance(e, CrossrouteError) else EXIT_BAD_INPUT
    if rc == EXIT_INTERRUPTED:  # typer turns a KeyboardInterrupt inside a command into Exit(130) and returns it
        return _interrupted()
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else EXIT_OK


def main() -> None:
    """Entry point (`crossroute`, `python -m crossroute[.cli]`): returns on success, else exits 2 (bad input), 130
    (interrupted) or 1 with a traceback (a bug)."""
    warnings.showwarning = _one_line_warning
    previous = _sigterm_as_interrupt()
    try:
        code = run_app(sys.argv[1:])
    except KeyboardInterrupt:  # a second Ctrl-C while the first was being handled
        code = _interrupted()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if code != EXIT_OK:
        sys.exit(code)


if __name__ == "__main__":
    main()
