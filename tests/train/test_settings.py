"""No ignored settings: every GRPOConfig/SFTConfig field crossroute sets itself is refused in a user's `grpo:` or
`sft:` mapping by name, protect names only earlier-trained domains, and CPU-forced values are warned about."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from crossroute.core.errors import CrossrouteError
from crossroute.experiments.sequence import parse_train_config
from crossroute.repair.cpift import parse_cpift_config
from crossroute.train.grpo import RESERVED_GRPO, RUN_ONLY_GRPO, grpo_kwargs, warn_cpu_overrides
from crossroute.train.sft import RESERVED_SFT, sft_kwargs

# A value of the right type for every reserved field, so the refusal, not TRL's own type check, is what fires.
VALUES: dict[str, Any] = {"output_dir": "/tmp/x", "max_steps": 5, "num_train_epochs": 2, "seed": 3,
                          "save_strategy": "steps", "save_steps": 10, "save_total_limit": 1,
                          "save_only_model": True, "use_cpu": True, "resume_from_checkpoint": "ckpt",
                          "push_to_hub": True, "ddp_backend": "gloo", "ddp_timeout": 60}


def raw_config(model: Path) -> dict[str, Any]:
    return {"model": str(model), "domains": ["math", "qa", "cw"], "eval_n": 4, "train_prompts": 16,
            "grpo": {"num_generations": 4, "per_device_train_batch_size": 8, "max_completion_length": 6},
            "stages": [{"domain": "math", "steps": 2}, {"domain": "qa", "steps": 2}],
            "refresh": {"domain": "math", "steps": 1}}


def refusal(raw: dict[str, Any]) -> str:
    with pytest.raises(CrossrouteError) as e:
        parse_train_config(raw, "cfg.yaml")
    return str(e.value)


def test_reserved_set_is_what_grpo_kwargs_sets() -> None:
    """Every field grpo_kwargs always overwrites is reserved (a new overwrite must be reserved too)."""
    kw = grpo_kwargs({}, {}, 7, 1, "/tmp/out")
    set_by_crossroute = {"output_dir", "max_steps", "seed", "save_strategy"}
    assert set_by_crossroute <= set(RESERVED_GRPO)
    assert {k: kw[k] for k in ("output_dir", "max_steps", "seed")} == {"output_dir": "/tmp/out", "max_steps": 7,
                                                                       "seed": 1}
    assert set(VALUES) == set(RESERVED_GRPO) | set(RUN_ONLY_GRPO)


@pytest.mark.parametrize("field", sorted(RESERVED_GRPO))
def test_stage_grpo_reserved_field_refused_by_name(tiny_ckpt: Path, field: str) -> None:
    raw = raw_config(tiny_ckpt)
    raw["stages"][1]["grpo"] = {field: VALUES[field]}
    msg = refusal(raw)
    assert msg.startswith(f"cfg.yaml: stages[1].grpo.{field}: {RESERVED_GRPO[field]}; remove it"), msg


@pytest.mark.parametrize(("value", "needle"), [
    (["nosuch"], "'nosuch' is not a tracker crossroute passes through; use one of tensorboard, trackio"),
    ("all", "'all' would report to every tracker installed; name them"),
    (["wandb"], "'wandb' is not installed; pip install wandb (or remove it)"),
])
def test_report_to_names_an_installed_tracker(tiny_ckpt: Path, value: Any, needle: str) -> None:
    raw = raw_config(tiny_ckpt)
    raw["stages"][1]["grpo"] = {"report_to": value}
    assert refusal(raw).startswith(f"cfg.yaml: stages[1].grpo.report_to: {needle}")
    raw = raw_config(tiny_ckpt)
    raw["grpo"] = {**raw["grpo"], "report_to": "none"}
    assert parse_train_config(raw, "cfg.yaml").grpo["report_to"] == "none"
    assert grpo_kwargs({"report_to": "none"}, {}, 1, 0, "/tmp/o")["report_to"] == []


def test_max_steps_message_is_the_documented_one(tiny_ckpt: Path) -> None:
    raw = raw_config(tiny_ckpt)
    raw["stages"][1]["grpo"] = {"max_steps": 50}
    assert refusal(raw) == "cfg.yaml: stages[1].grpo.max_steps: set by crossroute from the stage's steps; remove it"


@pytest.mark.parametrize("field", ["max_steps", "seed", "output_dir"])
def test_run_and_refresh_grpo_reserved_fields_refused(tiny_ckpt: Path, field: str) -> None:
    raw = raw_config(tiny_ckpt)
    raw["grpo"] = {**raw["grpo"], field: VALUES[field]}
    assert refusal(raw).startswith(f"cfg.yaml: grpo.{field}: "), refusal(raw)
    raw = raw_config(tiny_ckpt)
    raw["refresh"]["grpo"] = {field: VALUES[field]}
    assert refusal(raw).startswith(f"cfg.yaml: refresh.grpo.{field}: "), refusal(raw)


@pytest.mark.parametrize("field", sorted(RUN_ONLY_GRPO))
def test_process_group_fields_only_at_run_level(tiny_ckpt: Path, field: str) -> None:
    """The run's one process group is created before the first stage: a stage's ddp_* value would be ignored."""
    raw = raw_config(tiny_ckpt)
    raw["stages"][0]["grpo"] = {field: VALUES[field]}
    msg = refusal(raw)
    assert msg.startswith(f"cfg.yaml: stages[0].grpo.{field}: one process group serves every stage"), msg
    assert "run's top-level grpo:" in msg


def test_ddp_timeout_accepted_at_run_level(tiny_ckpt: Path) -> None:
    raw = raw_config(tiny_ckpt)
    raw["grpo"] = {**raw["grpo"], "ddp_timeout": 60}
    assert parse_train_config(raw, "cfg.yaml").grpo["ddp_timeout"] == 60  # accepted where it takes effect


def test_grpo_kwargs_refuses_reserved_fields_for_direct_callers() -> None:
    with pytest.raises(CrossrouteError, match=r"^grpo.max_steps: set by crossroute"):
        grpo_kwargs({"max_steps": 3}, {}, 2, 0, "/tmp/out")
    with pytest.raises(CrossrouteError, match=r"^stage grpo.ddp_timeout: one process group"):
        grpo_kwargs({}, {"ddp_timeout": 5}, 2, 0, "/tmp/out")
    assert grpo_kwargs({"ddp_timeout": 5}, {}, 2, 0, "/tmp/out")["ddp_timeout"] == 5


def test_cpu_forced_values_are_warned_about_by_name() -> None:
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        lines = warn_cpu_overrides({"bf16": True, "gradient_checkpointing": True, "learning_rate": 1.0},
                                   "cfg.yaml: stages[2].grpo", cuda=False)
    assert [str(w.message) for w in got] == lines and len(lines) == 2
    assert lines[0].startswith("cfg.yaml: stages[2].grpo.bf16: True has no effect here: no CUDA device")
    assert lines[1].startswith("cfg.yaml: stages[2].grpo.gradient_checkpointing: True")
    assert warn_cpu_overrides({"bf16": True}, "grpo", cuda=True) == []  # honoured on a GPU
    assert warn_cpu_overrides({"bf16": False}, "grpo", cuda=False) == []


def test_seed_beside_seeds_refused(tiny_ckpt: Path) -> None:
    raw = {**raw_config(tiny_ckpt), "seed": 4, "seeds": [0, 1]}
    assert refusal(raw).startswith("cfg.yaml: seed: is not used when seeds: is given"), refusal(raw)
    raw.pop("seed")
    assert parse_train_config(raw, "cfg.yaml").seeds == [0, 1]


# ----------------------------------------------------------------------------- protect


@pytest.mark.parametrize(("stage", "domains", "needle"), [
    (0, ["qa"], "stages[0].protect.domains: 'qa' is not trained by an earlier stage (earlier stages train [])"),
    (1, ["cw"], "stages[1].protect.domains: 'cw' is not trained by an earlier stage (earlier stages train ['math'])"),
    (1, ["math", "cw"], "'cw' is not trained by an earlier stage"),
])
def test_protect_only_domains_trained_earlier(tiny_ckpt: Path, stage: int, domains: list[str], needle: str) -> None:
    raw = raw_config(tiny_ckpt)
    raw["stages"][stage]["protect"] = {"mode": "freeze", "domains": domains}
    msg = refusal(raw)
    assert needle in msg and "protect only domains trained before this stage" in msg, msg


def test_protect_earlier_domain_accepted_and_refresh_sees_the_whole_sequence(tiny_ckpt: Path) -> None:
    raw = raw_config(tiny_ckpt)
    raw["stages"][1]["protect"] = {"mode": "freeze", "domains": ["math"]}
    raw["refresh"] = {"domain": "cw", "steps": 1, "protect": {"mode": "anchor", "domains": ["math", "qa"]}}
    cfg = parse_train_config(raw, "cfg.yaml")
    assert cfg.refresh is not None and cfg.refresh.protect is not None
    raw["refresh"]["protect"]["domains"] = ["cw"]
    assert "refresh.protect.domains lists the stage's own domain 'cw'" in refusal(raw)


# ----------------------------------------------------------------------------- sft (CPI-FT's `sft:`)


@pytest.mark.parametrize("field", sorted(RESERVED_SFT))
def test_cpift_sft_reserved_field_refused_by_name(field: str) -> None:
    with pytest.raises(CrossrouteError) as e:
        parse_cpift_config({"sft": {field: VALUES[field]}})
    # parse_cpift_config's `where` (the file, here the default "config") names where the mapping is
    assert str(e.value).startswith(f"config: sft.{field}: {RESERVED_SFT[field]}; remove it"), str(e.value)


@pytest.mark.parametrize(("field", "own"), [("learning_rate", "learning_rate"),
                                            ("per_device_train_batch_size", "batch_size")])
def test_cpift_sft_field_with_its_own_config_field_refused(field: str, own: str) -> None:
    """CPI-FT's learning_rate / batch_size always set these: an `sft:` value would be silently replaced."""
    with pytest.raises(CrossrouteError) as e:
        parse_cpift_config({"sft": {field: 1}})
    assert str(e.value) == (f"config: sft.{field}: set by the config's own {own}: field; set it there and remove it "
                            "here")


def test_sft_kwargs_explicit_arguments_and_where() -> None:
    kw = sft_kwargs({"learning_rate": 3e-3, "weight_decay": 0.1}, 4, "/tmp/o", 0)  # no lr given: the override holds
    assert kw["learning_rate"] == 3e-3 and kw["weight_decay"] == 0.1 and kw["max_steps"] == 4
    with pytest.raises(CrossrouteError, match=r"^cfg.yaml: sft.seed: set by crossroute from the config's seed"):
        sft_kwargs({"seed": 1}, 4, "/tmp/o", 0, where="cfg.yaml: sft")


def test_protect_refuses_sharded_parameters() -> None:
    """ZeRO-3 / FSDP leave each process a shard (DeepSpeed: an empty tensor tagged ds_id): protect cannot edit it."""
    import torch

    from crossroute.repair.protect import check_whole_parameters

    whole = torch.nn.Linear(3, 2)
    check_whole_parameters(whole)
    sharded = torch.nn.Linear(3, 2)
    sharded.weight = torch.nn.Parameter(torch.empty(0))
    with pytest.raises(CrossrouteError, match=r"protect: parameter 'weight' is sharded across processes"):
        check_whole_parameters(sharded)
    tagged = torch.nn.Linear(3, 2)
    tagged.bias.ds_id = 7  # type: ignore[attr-defined]
    with pytest.raises(CrossrouteError, match=r"parameter 'bias' is sharded .* ZeRO-2, DDP or one process"):
        check_whole_parameters(tagged)
