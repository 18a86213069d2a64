"""Real data and chat models: file domains through field mappings, chat-template parity with TRL, eval records,
`crossroute rescore`, the shipped real configs, and bad input as one line before any training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from crossroute.core.errors import CrossrouteError
from crossroute.domains.files import get_domain, rebase_domains
from crossroute.domains.spec import DomainSpec, build_domain
from crossroute.experiments.sequence import load_train_config, parse_train_config, run_training
from crossroute.measure.evaluate import evaluate_domain
from crossroute.model.load import load_model
from zoo import zoo_checkpoint

ROOT = Path(__file__).parents[2]
DATA = ROOT / "examples" / "data"
EXAMPLES = ROOT / "configs" / "examples_local.yaml"


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return zoo_checkpoint("qwen3", tmp_path_factory)


def _examples_raw(model: Path) -> dict[str, Any]:
    """configs/examples_local.yaml with its relative paths resolved as load_train_config does, on `model`."""
    raw = yaml.safe_load(EXAMPLES.read_text())
    raw["domains"] = rebase_domains(raw["domains"], EXAMPLES.parent)
    raw["model"] = str(model)
    return raw


# ----------------------------------------------------------------------------- every native format

def test_reference_answers_of_every_example_dataset_score_one() -> None:
    """Each native-format file's own reference solution, fed back as the completion, scores 1 under its scorer."""
    cfg = load_train_config(EXAMPLES)
    checked = 0
    for name, dom in cfg.built_domains().items():
        if dom.kind == "rubric":
            continue
        rows = dom.examples("train") + dom.examples("eval")
        scores = dom.score_batch(rows, [e.answer for e in rows])
        assert scores == [1.0] * len(rows), (name, scores)
        checked += len(rows)
    assert checked >= 40


def test_field_mapping_reads_nested_aliases_and_test_lists() -> None:
    cfg = load_train_config(EXAMPLES)
    doms = cfg.built_domains()
    tqa = doms["triviaqa"].examples("eval")[0]
    assert tqa.answers and tqa.answer == tqa.answers[0] and tqa.id.startswith("tqa_")
    mbpp = doms["mbpp"].examples("eval")
    assert all(e.tests.count("assert") >= 1 for e in mbpp)
    he = doms["humaneval"].examples("eval")[0]
    assert he.entry_point and "def check(candidate)" in he.tests
    w = doms["writing"].examples("eval")
    assert any(e.messages and e.messages[0]["role"] == "system" for e in w)


def test_parquet_and_csv_read_through_datasets(tmp_path: Path) -> None:
    from datasets import Dataset

    rows = [{"question": f"What is {i} plus 1?", "answer": f"so #### {i + 1}"} for i in range(20)]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "g.parquet"))
    Dataset.from_list(rows).to_csv(str(tmp_path / "g.csv"), index=False)
    for ext in ("parquet", "csv"):
        d = build_domain(DomainSpec(file=str(tmp_path / f"g.{ext}"), fields={"prompt": "question"}, scorer="math"),
                         f"g_{ext}")
        ex = d.examples("train") + d.examples("eval")
        assert len(ex) == 20
        e = next(x for x in ex if x.prompt == "What is 4 plus 1?")
        assert d.score(e, "The answer is 5.") == 1.0 and d.score(e, "6") == 0.0


# ----------------------------------------------------------------------------- chat template parity

def test_eval_and_grpo_tokenise_a_prompt_to_the_same_ids(chat_ckpt: Path, tmp_path: Path) -> None:
    """The ids eval generates from are the ids TRL's GRPOTrainer builds from the same dataset row."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    loaded = load_model(chat_ckpt)
    tok = loaded.tokenizer
    cfg = load_train_config(EXAMPLES)
    for name in ("gsm8k", "writing", "humaneval"):  # chat template with a system prompt, messages, raw text
        dom = cfg.built_domains()[name]
        ex = dom.examples("eval")[:2]
        rows = dom.train_rows(ex, tok)
        args = GRPOConfig(output_dir=str(tmp_path / name), max_steps=1, num_generations=2,
                          per_device_train_batch_size=2, use_cpu=True, report_to=[], save_strategy="no")
        trainer = GRPOTrainer(model=loaded.model, reward_funcs=dom.reward_func(), args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=tok)
        trl_ids = trainer._tokenize_prompts([r["prompt"] for r in rows])[0]
        ours = [dom.prompt_ids(e, tok) for e in ex]
        assert [list(x) for x in trl_ids] == ours, name
        if name != "humaneval":
            assert isinstance(rows[0]["prompt"], list)  # conversational: TRL applies the template
            assert tok.decode(ours[0]).endswith("<|im_start|>assistant\n")
        else:
            assert isinstance(rows[0]["prompt"], str) and "<|im_start|>" not in tok.decode(ours[0])


# ----------------------------------------------------------------------------- the 2-stage bar

@pytest.mark.slow
def test_two_stage_train_on_file_domains_with_a_chat_model(chat_ckpt: Path, tmp_path: Path) -> None:
    raw = _examples_raw(chat_ckpt)
    raw["eval_n"] = 4
    cfg = parse_train_config(raw, str(EXAMPLES))
    out = tmp_path / "run"
    result = run_training(cfg, out)
    assert result["rows"] == ["base", "01_gsm8k", "02_triviaqa"]
    assert result["domains"] == list(raw["domains"])
    saved = json.loads((out / "results" / "forgetting.json").read_text())
    assert saved["matrix"] == result["matrix"] and len(saved["matrix"]) == 3
    records = [json.loads(x) for x in (out / "results" / "eval_02_triviaqa.jsonl").read_text().splitlines()]
    by_dom = {r["domain"] for r in records}
    assert by_dom == set(raw["domains"])
    gsm = [r for r in records if r["domain"] == "gsm8k"]
    assert gsm and all(r["prompt"].endswith("<|im_start|>assistant\n") for r in gsm)
    assert all("Solve the problem" in r["prompt"] for r in gsm)  # the system prompt reached the template
    # every score in the matrix is the mean of its records
    row = result["matrix"][2]
    for j, d in enumerate(result["domains"]):
        rs = [r["score"] for r in records if r["domain"] == d]
        assert row[j] == pytest.approx(100 * sum(rs) / len(rs), abs=1e-3)


# ----------------------------------------------------------------------------- rescore

def _record(domain: str, completion: str, answer: str, **extra: Any) -> dict[str, Any]:
    return {"domain": domain, "index": 0, "prompt": "p", "completion": completion, "score": 0.0, "answer": answer,
            **extra}


RESCORE_CASES = [
    ("math", r"The answer is \boxed{30}.", "30", {}, 1.0),
    ("math", "Natalia sold 48/2 = 24 clips in May.\n#### 30", "30", {}, 1.0),
    ("math", "<think>maybe 29</think>30", "30", {}, 1.0),
    ("math", r"\frac12", r"\frac{1}{2}", {}, 1.0),
    ("math", "0.5", r"\frac{1}{2}", {}, 1.0),
    ("qa", "The capital is Rome.", "Rome", {"answers": ["Rome"]}, 1.0),
    ("math", "<think>30</think>29", "30", {}, 0.0),
]


def test_rescore_cli_meets_the_bar(tmp_path: Path) -> None:
    specs = {"math": {"name": "math", "file": str(DATA / "gsm8k_train.jsonl"),
                      "fields": {"prompt": "question"}, "scorer": "math"},
             "qa": {"name": "qa", "file": str(DATA / "triviaqa_train.json"),
                    "fields": {"prompt": "question", "answer": "answer.value", "answers": "answer.aliases"},
                    "scorer": {"name": "qa", "match": "contains"}}}
    for kind, spec in specs.items():
        (tmp_path / f"{kind}.yaml").write_text(yaml.safe_dump(spec))
    for kind in specs:  # one records file per scorer, one CLI call each
        cases = [c for c in RESCORE_CASES if c[0] == kind]
        rec = tmp_path / f"{kind}_records.jsonl"
        rec.write_text("".join(json.dumps({**_record(k, c, a, **x), "index": i}) + "\n"
                               for i, (k, c, a, x, _) in enumerate(cases)))
        p = subprocess.run([sys.executable, "-m", "crossroute.cli", "rescore", str(rec), "--domain",
                            str(tmp_path / f"{kind}.yaml")], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        got = [json.loads(x) for x in (tmp_path / f"{kind}_records.rescored.jsonl").read_text().splitlines()]
        assert [(g["completion"], g["score"]) for g in got] == [(c, want) for _, c, _, _, want in cases]
        assert all(g["previous_score"] == 0.0 for g in got)


def test_rescore_reproduces_eval_scores(tmp_path: Path) -> None:
    """Re-scoring an eval's own records with the same domain gives back the same per-example scores."""
    from crossroute.measure.rescore import read_records, rescore

    loaded = load_model("default")
    dom = get_domain("math")
    s = evaluate_domain(loaded.model, loaded.tokenizer, dom, n=30)
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in s.records))
    again = rescore(read_records(path), dom)
    assert [r["score"] for r in again] == [r["score"] for r in s.records]
    assert 100 * sum(r["score"] for r in again) / len(again) == pytest.approx(s.score, abs=1e-4)


# ----------------------------------------------------------------------------- the shipped real config

def test_qwen3_real_runs_as_written_once_its_paths_exist(tmp_path: Path, chat_ckpt: Path) -> None:
    """Every path of configs/qwen3_real.yaml mapped to a local file of the same format: the config validates,
    every domain builds and every reference answer scores 1."""
    from datasets import Dataset

    raw = yaml.safe_load((ROOT / "configs" / "qwen3_real.yaml").read_text())
    sources = {"math": "gsm8k_train.jsonl", "code": "mbpp.jsonl", "qa": "triviaqa_train.json",
               "cw": "writing.jsonl", "humaneval": "humaneval.jsonl"}
    for name, spec in raw["domains"].items():
        rows = json.loads((DATA / sources[name]).read_text()) if sources[name].endswith(".json") else [
            json.loads(x) for x in (DATA / sources[name]).read_text().splitlines()]
        half = max(1, len(rows) // 2)
        for key, part in (("train", rows[:half]), ("eval", rows[half:] or rows[:1])):
            if key not in spec:
                continue
            dest = tmp_path / Path(spec[key]).name.replace("/", "_")
            dest = dest.with_name(f"{name}_{key}{dest.suffix}")
            if dest.suffix == ".parquet":
                Dataset.from_list(part).to_parquet(str(dest))
            else:
                dest.write_text("".join(json.dumps(r) + "\n" for r in part))
            spec[key] = str(dest)
    raw["model"] = str(chat_ckpt)
    raw["domains"]["cw"]["scorer"] = "rubric"  # no judge endpoint here; the judge scorer is tested on a fake one
    raw["domains"]["cw"]["fields"]["rubric"] = "rubric"
    raw.pop("judge")
    raw["grpo"] = {k: v for k, v in raw["grpo"].items() if k not in ("use_vllm", "vllm_mode",
                                                                       "vllm_gpu_memory_utilization", "bf16",
                                                                       "gradient_checkpointing")}
    cfg = parse_train_config(raw, "qwen3_real.yaml")
    assert [s.domain for s in cfg.stages] == ["code", "math", "qa", "cw"] and cfg.refresh.domain == "math"
    for name, dom in cfg.built_domains().items():
        assert dom.chat_template == ("false" if name == "humaneval" else "true")
        if dom.kind in ("rubric",):
            continue
        rows = dom.examples("train") + dom.examples("eval")
        assert dom.score_batch(rows, [e.answer for e in rows]) == [1.0] * len(rows), name


# ----------------------------------------------------------------------------- bad input, one line, before training

def _spec_error(tmp_path: Path, rows: list[dict[str, Any]], spec: dict[str, Any]) -> str:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {"model": "default", "domains": {"mine": {"file": str(data), **spec}},
           "stages": [{"domain": "mine", "steps": 1}]}
    with pytest.raises(CrossrouteError) as e:
        parse_train_config(raw, "cfg.yaml")
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_mapped_field_names_file_line_and_field(tmp_path: Path) -> None:
    msg = _spec_error(tmp_path, [{"question": "q1", "answer": "1"}, {"q": "q2", "answer": "2"}],
                      {"fields": {"prompt": "question"}})
    assert "d.jsonl:2" in msg and "'question'" in msg and "fields.prompt" in msg


def test_unparsable_math_reference_fails_before_training(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "answer": "7"} for i in range(8)] + [{"prompt": "bad", "answer": "seven-ish"}]
    msg = _spec_error(tmp_path, rows, {"scorer": "math"})
    assert "d.jsonl:9" in msg and "'answer'" in msg and "math-verify" in msg


def test_unknown_scorer_and_spec_field(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "answer": "7"} for i in range(8)]
    assert "chess" in _spec_error(tmp_path, rows, {"scorer": "chess"})
    assert "feilds" in _spec_error(tmp_path, rows, {"feilds": {}})


def test_judge_down_fails_before_training(tmp_path: Path) -> None:
    data = tmp_path / "w.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"write {i}"}) + "\n" for i in range(10)))
    raw = {"model": "default", "domains": {"w": {"file": str(data), "scorer": "judge"}},
           "stages": [{"domain": "w", "steps": 1}],
           "judge": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "retries": 1, "timeout_s": 1}}
    cfg = parse_train_config(raw, "cfg.yaml")  # the spec is valid ...
    with pytest.raises(CrossrouteError) as e:  # ... and the endpoint is checked before any training
        run_training(cfg, tmp_path / "run")
    assert "127.0.0.1:9" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_judge_scorer_without_a_judge_section(tmp_path: Path) -> None:
    msg = _spec_error(tmp_path, [{"prompt": f"write {i}"} for i in range(8)], {"scorer": "judge"})
    assert "judge" in msg


def test_eval_only_domain_cannot_be_a_stage(tmp_path: Path) -> None:
    data = tmp_path / "e.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "1"}) + "\n" for i in range(4)))
    raw = {"model": "default", "domains": {"e": {"eval": str(data)}}, "stages": [{"domain": "e", "steps": 1}]}
    with pytest.raises(CrossrouteError, match="no train rows"):
        parse_train_config(raw, "cfg.yaml")


def test_eval_prompt_also_in_train_file_is_refused(tmp_path: Path) -> None:
    tr, ev = tmp_path / "tr.jsonl", tmp_path / "ev.jsonl"
    tr.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "1"}) + "\n" for i in range(4)))
    ev.write_text(json.dumps({"prompt": "q2", "answer": "1"}) + "\n")
    with pytest.raises(CrossrouteError, match="ev.jsonl:1.*also in the train file"):
        build_domain(DomainSpec(train=str(tr), eval=str(ev)), "x")


def test_stage_refers_to_undeclared_domain() -> None:
    raw = {"model": "default", "domains": ["math"], "stages": [{"domain": "qa", "steps": 1}]}
    with pytest.raises(CrossrouteError, match="'qa' is not declared"):
        parse_train_config(raw, "cfg.yaml")


def test_spec_file_resolves_by_path_and_cli_errors_exit_2(tmp_path: Path) -> None:
    spec = ROOT / "examples" / "domains" / "gsm8k.yaml"
    d = get_domain(str(spec))
    assert d.name == "gsm8k" and d.kind == "math" and len(d.examples("eval")) == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "file": str(DATA / "gsm8k_train.jsonl"), "scorer": "math"}))
    p = subprocess.run([sys.executable, "-m", "crossroute.cli", "eval", "--domains", str(bad), "--out",
                        str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip() or p.stdout.strip()
    assert len(err.splitlines()) == 1 and "gsm8k_train.jsonl:1" in err and "'prompt'" in err, err
