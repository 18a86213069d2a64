"""The `crossroute` command line (typer + rich). Errors print as one line and exit 2, never a traceback."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from crossroute.core.console import console
from crossroute.core.errors import CrossrouteError
from crossroute.core.rundir import RunDir
from crossroute.report.console import print_forgetting, scores_table

DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Measure, explain and repair cross-domain forgetting in sequential multi-domain RL post-training.",
)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="checkpoint directory, or 'default' (embedded)")]
DomainsOpt = Annotated[str, typer.Option("--domains", "-d", help="comma list: built-in names, domain spec files "
                                         "(.yaml), data files, NAME=PATH")]




@app.command()
def pretrain(
    out: Annotated[Path, typer.Option(help="where to save the checkpoint")] = Path("runs/pretrained"),
    seed: Annotated[int, typer.Option(help="random seed; the shipped default uses 0")] = 0,
    steps: Annotated[int | None, typer.Option(help="override the number of training steps")] = None,
    eval_n: Annotated[int, typer.Option(help="held-out prompts per domain for the final eval")] = 100,
    preset: Annotated[str, typer.Option(help="model size: default (~0.8 M, CPU) or gpu (~69 M, one GPU)")] = "default",
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
    model, tok, stats = run_pretrain(cfg, out=out)
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
    n: Annotated[int, typer.Option(help="held-out prompts per domain")] = 100,
    out: Annotated[Path, typer.Option(help="run directory for results/eval.json")] = Path("runs/eval"),
    p_ref: Annotated[bool, typer.Option("--p-ref", help="also the teacher-forced probability of each reference "
                                        "answer (the exact expected accuracy of sampling at T=1; one forward "
                                        "pass)")] = False,
    k: Annotated[int, typer.Option(help="completions per prompt (sampling; score = avg@k)")] = 1,
    temperature: Annotated[float, typer.Option(help="sampling temperature (0: greedy)")] = 0.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling")] = 1.0,
    pass_at: Annotated[str, typer.Option(help="comma list of j for unbiased pass@j (j <= k)")] = "",
    eval_set: Annotated[Path | None, typer.Option(help="score the prompts pinned in this run directory "
                                                  "(RUN/eval_sets/), e.g. to compare a new checkpoint with a run's "
                                                  "on the same prompts")] = None,
) -> None:
    """Score a checkpoint on each domain's held-out split (greedy decoding), print a table, write JSON.

    Example: crossroute eval --model default --domains math,code,qa,cw --out runs/eval
    """
    from pydantic import ValidationError

    from crossroute.core.rundir import open_run
    from crossroute.domains.files import parse_domains
    from crossroute.measure.evaluate import EvalProtocol, evaluate_checkpoint, scores_json, write_records
    from crossroute.model.load import resolve_model_path

    try:
        proto = EvalProtocol(k=k, temperature=temperature, top_p=top_p, p_ref=p_ref,
                             pass_at=[int(x) for x in pass_at.split(",") if x.strip()])
    except (ValueError, ValidationError) as e:
        msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
        raise CrossrouteError(f"--k/--temperature/--top-p/--pass-at: {msg.removeprefix('Value error, ')}") from None
    doms = parse_domains(domains)
    if eval_set is not None:
        from crossroute.domains.evalset import EVAL_SETS, with_eval_sets

        doms = with_eval_sets(eval_set, doms)
        unpinned = [d.name for d in doms if d.eval_fixed is None]
        if unpinned:
            raise CrossrouteError(f"--eval-set {eval_set}: no {EVAL_SETS}/{unpinned[0]}.jsonl there; pass a run "
                                  "directory written by train, cpift or rollback, or drop the domain.")
    path = resolve_model_path(model)
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
    records: Annotated[Path, typer.Argument(help="eval records: RUN/results/eval_<name>.jsonl")],
    domain: Annotated[str, typer.Option("--domain", help="the domain whose scorer to use: a built-in name, a domain "
                                        "spec (.yaml), a data file or NAME=SPEC")],
    out: Annotated[Path | None, typer.Option(help="where to write the re-scored records "
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
    config: Annotated[Path, typer.Argument(help="YAML config: model, domains, grpo defaults, stages, refresh")],
    out: Annotated[Path, typer.Option(help="run directory (rerun the same command to resume)")] = Path("runs/train"),
) -> None:
    """Sequential single-domain RL (TRL GRPOTrainer), eval after every stage, forgetting matrix, refresh.

    Example: crossroute train configs/default_sequence.yaml --out runs/sequence
    (GPU: accelerate launch -m crossroute.cli train CONFIG --out DIR)
    """
    from crossroute.experiments.sequence import load_train_config, run_training
    from crossroute.report.build import build_report

    cfg = load_train_config(config)
    result = run_training(cfg, out)
    print_forgetting(result)
    console.print(f"report: {build_report(out)}")




@app.command()
def diff(
    paths: Annotated[list[Path], typer.Argument(help="BASE CKPT... (checkpoint dirs), or one run directory")],
    out: Annotated[Path | None, typer.Option(help="run directory for results/diff.json (default: the run)")] = None,
    top_k: Annotated[float, typer.Option(help="top-k % changed units per kind")] = 1.0,
) -> None:
    """Update anatomy of each checkpoint against its predecessor, streamed tensor by tensor (fp32).

    Example: crossroute diff runs/demo    or    crossroute diff BASE STAGE1 STAGE2 --out runs/diff
    """
    from crossroute.analyze.diff import diff_sequence, write_diff_results
    from crossroute.core.rundir import load_run, open_run
    from crossroute.experiments.sequence import run_checkpoints
    from crossroute.report.build import build_report

    if len(paths) == 1:
        run = load_run(paths[0])
        ckpts, names = run_checkpoints(run)
        if out is not None:
            run = open_run(out, {"checkpoints": [str(c) for c in ckpts]}, kind="diff")
    else:
        ckpts, names = list(paths), [p.name for p in paths]
        run = open_run(out or Path("runs/diff"), {"checkpoints": [str(c) for c in ckpts]}, kind="diff")
    result = diff_sequence(ckpts, top_k_percent=top_k, progress=True)
    data = result.to_json()
    data["stage_names"] = names[1:]
    write_diff_results(data, run.root)
    for name, st in zip(names[1:], data["stages"], strict=True):
        below = ", ".join(f"<{t:g}: {100 * f:.1f}%" for t, f in zip(st["thresholds"], st["below_fraction"],
                                                                     strict=True))
        console.print(f"{name}: {below}; rel. change {st['rel_change']:.2e}")
    console.print(f"wrote {run.results / 'diff.json'}; report: {build_report(run.root)}")


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
    n: Annotated[int, typer.Option(help="probe prompts (with reference answers) per domain")] = 64,
    q: Annotated[float, typer.Option(help="active set = per-layer top-q % of units")] = 10.0,
    batch_size: Annotated[int, typer.Option(help="micro-batch size")] = 16,
    out: Annotated[Path, typer.Option(help="run directory (an existing run gains results/routes.json)")] = Path(
        "runs/routes"),
) -> None:
    """Active routes: per-unit activity per domain (hooks at the unit table's sites: down-projection and
    attention-output inputs, MoE routers), active-set overlaps.

    Example: crossroute routes default --domains math,code,qa,cw --out runs/demo
    """
    from crossroute.analyze.routes import run_routes
    from crossroute.report.build import build_report

    run = analysis_run(out, {"model": model, "domains": domains, "n": n, "q": q}, kind="routes")
    res = run_routes(model, domains, n=n, q=q, run_dir=run.root, batch_size=batch_size, show_progress=True)
    for kind, m in res.jaccard.items():
        console.print(scores_table(f"Jaccard of active {kind} sets (top {q:g} %)",
                                   {a: dict(zip(res.domains, row, strict=True)) for a, row in
                                    zip(res.domains, m, strict=True)}, res.domains))
    console.print(f"wrote {run.results / 'routes.json'}; report: {build_report(run.root)}")


@app.command()
def conflict(
    model: Annotated[str, typer.Argument(help="checkpoint directory, or 'default'")],
    domains: Annotated[str, typer.Option("--domains", "-d", help="two domains A,B")] = "math,qa",
    n: Annotated[int, typer.Option(help="examples per domain for each gradient")] = 64,
    batch_size: Annotated[int, typer.Option(help="micro-batch size (memory bound)")] = 16,
    layers: Annotated[str | None, typer.Option(help="differentiate only these decoder layers, e.g. 28-35 (memory "
                                               "of large models); default: all")] = None,
    out: Annotated[Path, typer.Option(help="run directory (an existing run gains results/conflict_A_B.json)")] = Path(
        "runs/conflict"),
) -> None:
    """Module-level gradient conflict between two domains: global cosine vs per-module cosines.

    Example: crossroute conflict runs/demo/checkpoints/02_math --domains math,qa --out runs/demo
    """
    from crossroute.analyze.conflict import run_conflict
    from crossroute.core.config import parse_layers
    from crossroute.domains.files import parse_domains
    from crossroute.report.build import build_report

    doms = parse_domains(domains)
    if len(doms) != 2:
        raise CrossrouteError(f"--domains {domains!r}: conflict compares exactly two domains, e.g. math,qa.")
    layer_list = parse_layers(layers) if layers is not None else None
    run = analysis_run(out, {"model": model, "domains": domains, "n": n}, kind="conflict")
    res = run_conflict(model, doms[0], doms[1], n=n, batch_size=batch_size, run_dir=run.root, show_progress=True,
                       layers=layer_list)
    j = res.to_json()
    worst, best = j["most_conflicting"] or {}, j["most_synergistic"] or {}
    console.print(f"global cosine {res.global_cosine:+.4f}; most conflicting {worst.get('module')} "
                  f"({worst.get('cosine', 0):+.3f}); most synergistic {best.get('module')} "
                  f"({best.get('cosine', 0):+.3f})")
    console.print(f"report: {build_report(run.root)}")


@app.command()
def damage(
    before: Annotated[str, typer.Option(help="checkpoint right after domain A's stage (theta_A)")],
    after: Annotated[str, typer.Option(help="a later checkpoint (theta_A + delta)")],
    domain: Annotated[str, typer.Option(help="the earlier domain A whose loss is expanded")],
    later: Annotated[str | None, typer.Option(help="later domain(s) B,...: conflict subspace on shared routes")] = None,
    n: Annotated[int, typer.Option(help="examples for the proxy loss (answer NLL)")] = 64,
    batch_size: Annotated[int, typer.Option(help="micro-batch size (memory bound)")] = 64,
    k: Annotated[int, typer.Option(help="conflict subspace: top eigenpairs (k // 2 bottom ones)")] = 20,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (1 avoids oversubscription)")] = None,
    layers: Annotated[str | None, typer.Option(help="restrict delta, gradients and HVPs to these decoder layers, "
                                               "e.g. 28-35 (memory of large models); default: all")] = None,
    out: Annotated[Path, typer.Option(help="run directory (an existing run gains results/damage_A.json)")] = Path(
        "runs/damage"),
) -> None:
    """Second-order damage of a later update to domain A: measured vs g.d + 1/2 d.H.d, per-unit attribution.

    Example: crossroute damage --before runs/demo/checkpoints/02_math --after runs/demo/checkpoints/04_cw
             --domain math --later qa,cw --out runs/demo   (--layers 28-35: a large model's last layers)
    """
    from crossroute.analyze.damage import run_damage
    from crossroute.core.config import parse_layers
    from crossroute.report.build import build_report
    from crossroute.report.console import conflict_line

    layer_list = parse_layers(layers) if layers is not None else None
    run = analysis_run(out, {"before": before, "after": after, "domain": domain}, kind="damage")
    res = run_damage(before, after, domain, later=later, n=n, batch_size=batch_size, run_dir=run.root, k=k,
                     threads=threads, layers=layer_list)
    j = res.to_json()
    console.print(f"{domain}: measured {j['measured']:+.4f} = first order {j['first_order']:+.4f} + second order "
                  f"{j['second_order']:+.4f} + error {j['error']:+.4f}; top 1/2/5/10 % of units carry "
                  + "/".join(f"{100 * j['top_share'][p]:.0f}%" for p in ("1", "2", "5", "10")))
    for c in j["conflict"]:
        console.print(conflict_line(c))
    console.print(f"report: {build_report(run.root)}")


@app.command()
def rollback(
    now: Annotated[str, typer.Option("--from", help="the current checkpoint (after the later stages)")],
    to: Annotated[str, typer.Option(help="checkpoint right after domain A's stage (theta_A)")],
    domain: Annotated[str, typer.Option(help="the domain A to repair")],
    others: Annotated[str, typer.Option(help="later domain(s) whose scores must not pay, comma list")],
    fractions: Annotated[str, typer.Option(help="unit fractions in % to sweep")] = "0.5,1,2,4,8,16,32",
    eval_n: Annotated[int, typer.Option(help="held-out prompts per domain at each point")] = 100,
    save_best: Annotated[Path | None, typer.Option(help="save the best repaired checkpoint here")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (1 avoids oversubscription)")] = None,
    out: Annotated[Path, typer.Option(help="run directory (an existing run gains results/rollback_A.json)")] = Path(
        "runs/rollback"),
) -> None:
    """Training-free rollback of the units a route-conflict score picks, vs random and largest-|delta| units.

    Example: crossroute rollback --from runs/demo/checkpoints/04_cw --to runs/demo/checkpoints/02_math
             --domain math --others qa --out runs/demo
    """
    from crossroute.repair.rollback import run_rollback
    from crossroute.report.build import build_report

    try:
        fr = [float(x) for x in fractions.split(",") if x.strip()]
    except ValueError:
        raise CrossrouteError(f"--fractions {fractions!r}: give percentages separated by commas, e.g. 1,2,4.") from None
    if not fr or any(not 0 < f <= 100 for f in fr):
        raise CrossrouteError(f"--fractions {fractions!r}: each fraction must be in (0, 100] percent.")
    run = analysis_run(out, {"from": now, "to": to, "domain": domain, "others": others}, kind="rollback")
    res = run_rollback(now, to, domain, others, fractions=fr, run_dir=run.root, save_best=save_best,
                       eval_n=eval_n, threads=threads)
    best = res.to_json().get("best") or {}
    console.print(f"best: {best.get('variant')}/{best.get('selector')} at {best.get('fraction')} % "
                  f"({best.get('n_units')} units): recovery {best.get('recovery')}")
    console.print(f"report: {build_report(run.root)}")


@app.command()
def circuits(
    base: Annotated[str, typer.Option(help="base checkpoint (or 'default')")],
    models: Annotated[str, typer.Option(help="fine-tuned models as NAME=PATH,...; rl= and sft= enable the "
                                        "differential vulnerability")],
    domain: Annotated[str, typer.Option(help="built-in domain, or a JSONL of clean/corrupted pairs")] = "math",
    n: Annotated[int, typer.Option(help="clean/corrupted prompt pairs")] = 64,
    target: Annotated[float, typer.Option(help="faithfulness the circuit should reach, as a share of the base "
                                          "model's clean-corrupted gap")] = 0.8,
    max_fraction: Annotated[float, typer.Option(help="circuit-size cap: at most this share of all heads (the "
                                                "cap binds when the target is not reached within it)")] = 0.25,
    delta: Annotated[float, typer.Option(help="vulnerable head: s_h(SFT) < s_h(RL) - delta (base scale)")] = 0.1,
    batch_size: Annotated[int, typer.Option(help="rows per forward pass")] = 32,
    out: Annotated[Path, typer.Option(help="run directory (an existing run gains results/circuits_D.json)")] = Path(
        "runs/circuits"),
) -> None:
    """Head-level circuits (attribution patching, confirmed by activation patching) on the base model's scale,
    their retention and the RL - SFT differential vulnerability, with 95 % CIs over prompts.

    Example: crossroute circuits --base default --models rl=runs/demo/checkpoints/02_math,sft=runs/sft --domain math
    """
    from crossroute.analyze.circuits import run_circuits
    from crossroute.report.build import build_report
    from crossroute.report.console import print_circuits

    run = analysis_run(out, {"base": base, "models": models, "domain": domain, "n": n, "target": target,
                             "max_fraction": max_fraction, "delta": delta}, kind="circuits")
    res = run_circuits(base, models, domain, n=n, target=target, delta=delta, run_dir=run.root, show_progress=True,
                       max_fraction=max_fraction, batch_size=batch_size)
    print_circuits(res.to_json())
    console.print(f"report: {build_report(run.root)}")


@app.command()
def cpift(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/cpift_default.yaml)")],
    out: Annotated[Path, typer.Option(help="run directory (rerun to resume)")] = Path("runs/cpift"),
) -> None:
    """CPI-FT: core-parameter isolation fine-tuning, against mixed and sequential SFT (same total steps).

    Example: crossroute cpift configs/cpift_default.yaml --out runs/cpift
    """
    from crossroute.repair.cpift import run_cpift
    from crossroute.report.build import build_report

    res = run_cpift(config, out)
    console.print(scores_table("held-out scores per method", {m: res["scores"][m] for m in res["methods"]},
                               res["domains"]))
    console.print(f"report: {build_report(out)}")


@app.command()
def merge(
    method: Annotated[str, typer.Argument(help="slerp | linear | transplant")],
    base: Annotated[str, typer.Argument(help="base checkpoint directory (or 'default')")],
    models: Annotated[list[str], typer.Argument(help="one or more checkpoints to merge into the base")],
    out: Annotated[Path, typer.Option(help="output checkpoint directory")] = Path("runs/merged"),
    t: Annotated[float, typer.Option(help="interpolation factor (slerp/linear)")] = 0.5,
    t_schedule: Annotated[Path | None, typer.Option(help="mergekit-style per-layer t schedule YAML")] = None,
    mask: Annotated[Path | None, typer.Option(help="transplant: core mask (safetensors of flat indices)")] = None,
    top_percent: Annotated[float, typer.Option(help="transplant: donor's top-p % |update| as core")] = 1.0,
) -> None:
    """Merge checkpoints tensor by tensor (safetensors in, safetensors out): SLERP, linear, or core transplant.

    Example: crossroute merge slerp default runs/demo/checkpoints/02_math --t 0.5 --out runs/merged
    """
    from crossroute.repair.merge import run_merge

    if method not in ("slerp", "linear", "transplant"):
        raise CrossrouteError(f"merge method {method!r} unknown; use slerp, linear or transplant.")
    path = run_merge(method, base, models, out, t_schedule_yaml=t_schedule, t=t, mask=mask, top_percent=top_percent)
    console.print(f"wrote {path}")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Write RUN_DIR/report.html: one self-contained HTML file with every section that has results.

    Example: crossroute report runs/demo
    """
    from crossroute.report.build import build_report

    console.print(f"wrote {build_report(run_dir)}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="run directory of the demo (rerun to resume)")] = Path("runs/demo"),
    eval_n: Annotated[int | None, typer.Option(help="held-out prompts per domain (default: the config's)")] = None,
    preset: Annotated[str, typer.Option(help="default: the shipped ~0.8 M model on CPU; gpu: a ~69 M model "
                                        "pretrained on one GPU (pretrain, sequence, refresh, diagnosis, "
                                        "rollback, report)")] = "default",
) -> None:
    """The end-to-end pipeline on an embedded model: RL sequence + refresh, diagnosis, repairs, the report.

    Example: crossroute demo --out runs/demo   (on a GPU: crossroute demo --preset gpu --out runs/gpu)
    """
    from crossroute.experiments.demo import run_demo

    run_demo(out, eval_n=eval_n, preset=preset)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: object = None, line: str | None = None) -> None:
    """crossroute's own warnings (e.g. an unknown architecture) as one line, without source context."""
    console.print(f"[yellow]crossroute: warning:[/yellow] {message}", highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point: run the app; user errors become one line on stderr and exit code 2."""
    import warnings

    warnings.showwarning = _one_line_warning
    try:
        app(standalone_mode=False)
    except CrossrouteError as e:
        console.print(f"[red]crossroute: error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("crossroute: interrupted; run the same command again to resume.")
        sys.exit(130)
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        console.print(f"[red]crossroute: error:[/red] {os.strerror(e.errno)}{where}; nothing partial was kept (writes "
                      "are atomic): free space or fix permissions, then run the same command again to resume.",
                      highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, typer.Exit) as e:
        sys.exit(getattr(e, "exit_code", 1))
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
