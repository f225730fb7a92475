"""The stage registry: each stage re-runs when a key it declares or a file it reads changes, and only then.

The cases the registry was built for (stale skips of the old hand-kept list): pairs with a vLLM engine reads
``rollout``; PPO training reads ``ppo`` and ``rollout``; offline training reads ``control.clm_weight``;
evaluate reads ``rollout``, ``data`` and ``train.output``; the judged pairs path reads the refusal judge's
``eval`` keys; an input file edited in place; a new package version; a scored folder left by another config.
"""

from __future__ import annotations

import json
import shutil

import pytest

from eqrlhf.cli import main
from eqrlhf.config import load_config
from eqrlhf.data.score import training_input_dir
from eqrlhf.fingerprint import fingerprint, write_state
from eqrlhf.pipeline import plan, selected_stages
from eqrlhf.stages import PIPELINE, STAGES, effective_config

CONFIG = "configs/quickstart.yaml"


def _settle(cfg) -> None:
    """Every selected stage's state as a finished run leaves it: manifest.json, then stage_state.json."""
    for stage in selected_stages(cfg):  # the raw config decides whether the reward stage applies
        seen = effective_config(cfg, stage.name)  # the config the stage sees (the warm start's model)
        out = stage.output(seen)
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_text(json.dumps({"stage": stage.name}))
        write_state(out, stage.name, fingerprint(seen.model_dump(mode="json"), stage.reads(seen), stage.inputs(seen)))


def _runs(cfg) -> dict[str, list[str]]:
    return {d.stage.name: d.reasons for d in plan(cfg) if d.run}


@pytest.fixture
def base(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    shutil.copy("eqrlhf/data/demo_corpus.jsonl", corpus)
    return [f"run.output_dir={tmp_path / 'runs'}", f"data.sources.0.path={corpus}"], corpus


def test_an_unchanged_config_plans_no_work_and_a_first_run_plans_everything(base):
    overrides, _ = base
    cfg = load_config(CONFIG, overrides)
    assert set(_runs(cfg)) == {s.name for s in selected_stages(cfg)}
    assert all(r[0] == "never ran" for r in _runs(cfg).values())
    _settle(cfg)
    assert _runs(load_config(CONFIG, overrides)) == {}


@pytest.mark.parametrize(
    ("change", "first", "reason"),
    [
        ("mix.counts.EHD=31", "mix", "config mix"),
        # (pairs.rejected=on_policy with a warm start moves the sampling to the on_policy stage: test_pipeline)
        ("pairs.missing=skip", "pairs", "config pairs"),
        ("eval.refusal_judge=embedding", "pairs", "config eval.refusal_judge"),  # the judged path's judge
        ("rollout.kv_cache_gb=3", "pairs", "config rollout"),  # a vLLM engine in the pairs actors
        ("control.clm_weight=0.5", "train", "config control.clm_weight"),
        ("data.max_prompt_chars=999", "categorize", "config data"),
        ("train.lr=3e-5", "train", "config train"),
    ],
)
def test_a_changed_key_reruns_its_stage_and_everything_after(base, change, first, reason):
    overrides, _ = base
    judged_vllm = ["pairs.judge=true", "generation.engine=vllm"]
    _settle(load_config(CONFIG, [*overrides, *judged_vllm]))
    runs = _runs(load_config(CONFIG, [*overrides, *judged_vllm, change]))
    order = [s.name for s in PIPELINE if s.name in {s.name for s in selected_stages(load_config(CONFIG, overrides))}]
    assert list(runs) == order[order.index(first) :], runs
    assert any(r.startswith(reason) for r in runs[first]), runs[first]
    assert all(any("rewritten by an earlier stage" in r for r in runs[s]) for s in list(runs)[1:] if s != "evaluate")


def test_ppo_training_and_evaluation_read_their_own_keys(base):
    overrides, _ = base
    ppo = [*overrides, "algorithm.loss=ppo", "train.autocast=false", "run.stages=[mix, train, evaluate]"]
    _settle(load_config(CONFIG, ppo))
    assert set(_runs(load_config(CONFIG, [*ppo, "ppo.iterations=3"]))) == {"train", "evaluate"}
    assert "config rollout changed" in _runs(load_config(CONFIG, [*ppo, "rollout.num_engines=3"]))["train"]
    evaluated = _runs(load_config(CONFIG, [*ppo, "data.error_budget=0.5"]))
    assert list(evaluated) == ["evaluate"] and evaluated["evaluate"] == ["config data changed"]
    moved = _runs(load_config(CONFIG, [*ppo, "train.output=elsewhere"]))
    assert "config train.output changed" in moved["evaluate"]
    # a key no selected stage reads changes nothing
    assert _runs(load_config(CONFIG, [*ppo, "pairs.samples=7"])) == {}


def test_the_ama_mask_settings_are_training_keys_only_for_a_loss_that_masks(base):
    overrides, _ = base
    _settle(load_config(CONFIG, overrides))  # the quickstart's ama_dpo: the mask's settings are train keys
    masked = _runs(load_config(CONFIG, [*overrides, "ama.tau=0.5"]))
    assert list(masked) == ["score", "train", "evaluate"] and "config ama.tau changed" in masked["train"]
    # plain DPO with its reference in the trainer: no score stage, and neither the mask nor the scored folder
    dpo = [*overrides, "algorithm.loss=dpo", "algorithm.reference=in_trainer"]
    _settle(load_config(CONFIG, dpo))
    assert not {"ama.rule", "ama.tau", "ama.output"} & set(STAGES["train"].reads(load_config(CONFIG, dpo)))
    assert _runs(load_config(CONFIG, [*dpo, "ama.tau=0.5", "ama.rule=sign", "ama.output=elsewhere"])) == {}
    # with precomputed reference log-probs the scored folder is the training input again
    precomputed = load_config(CONFIG, [*dpo, "algorithm.reference=precomputed"])
    assert "ama.output" in STAGES["train"].reads(precomputed) and "ama.tau" not in STAGES["train"].reads(precomputed)


def test_an_input_file_edited_in_place_and_a_new_version_rerun(base):
    overrides, corpus = base
    _settle(load_config(CONFIG, overrides))
    with corpus.open("a") as f:
        f.write(json.dumps({"id": "new", "prompt": "How do I boil an egg?", "category": "none"}) + "\n")
    runs = _runs(load_config(CONFIG, overrides))
    assert runs["categorize"] == [f"input {corpus} changed"]
    assert set(runs) == {s.name for s in selected_stages(load_config(CONFIG, overrides))}
    _settle(load_config(CONFIG, overrides))
    cfg = effective_config(load_config(CONFIG, overrides))
    state = STAGES["mix"].output(cfg) / "stage_state.json"
    doc = json.loads(state.read_text())
    doc["parts"]["code"] = "0.0.1"
    state.write_text(json.dumps(doc))
    assert _runs(load_config(CONFIG, overrides))["mix"] == ["eqrlhf version changed"]


def test_training_never_reads_a_scored_folder_its_config_does_not_produce(tmp_path):
    plain = load_config(CONFIG, [f"run.output_dir={tmp_path}", "algorithm.loss=dpo", "algorithm.reference=in_trainer"])
    (plain.run.dir / "scored").mkdir(parents=True)
    (plain.run.dir / "scored" / "manifest.json").write_text("{}")  # left by an AMA run of another config
    assert training_input_dir(plain) == plain.run.dir / "pairs"
    ama = load_config(CONFIG, [f"run.output_dir={tmp_path}", "ama.output=somewhere/scored"])
    assert training_input_dir(ama).as_posix().endswith("somewhere/scored")


def test_pipeline_plan_prints_and_a_single_stage_run_twice_skips(base, ray_local, capsys):
    overrides, _ = base
    args = [*overrides, "mix.counts={EHD: 5, IHD: 3, MHD: 2}", "mix.general_ratio=1.0"]
    assert main(["pipeline", "-c", CONFIG, *args, "run.stages=[categorize, mix]", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "[plan] categorize: run (never ran)" in out and "[plan] mix: run (never ran" in out
    assert not (load_config(CONFIG, overrides).run.dir / "categorized").exists()  # --plan ran nothing
    assert main(["categorize", "-c", CONFIG, *args]) == 0
    assert main(["mix", "-c", CONFIG, *args]) == 0
    capsys.readouterr()
    assert main(["mix", "-c", CONFIG, *args]) == 0
    assert "mix: unchanged since the last run, skipped" in capsys.readouterr().out
    # the same state is what the pipeline reads: its plan now skips both
    main(["pipeline", "-c", CONFIG, *args, "run.stages=[categorize, mix]", "--plan"])
    assert "[plan] categorize: skip" in (out := capsys.readouterr().out) and "[plan] mix: skip" in out
    # an edit re-runs for real; --force runs an unchanged stage
    assert main(["mix", "-c", CONFIG, *args, "mix.counts.EHD=6"]) == 0
    assert "mix: running (config mix changed)" in capsys.readouterr().out
    assert main(["mix", "-c", CONFIG, *args, "mix.counts.EHD=6", "--force"]) == 0
    assert "mix: running (forced)" in capsys.readouterr().out
    manifest = json.loads((load_config(CONFIG, overrides).run.dir / "mixture" / "manifest.json").read_text())
    assert manifest["rows_written"] == 22


def test_the_pipeline_reports_every_stage_problem_before_any_stage_runs(base):
    from eqrlhf.config import ConfigError
    from eqrlhf.pipeline import run_pipeline

    overrides, _ = base
    bad = [
        *overrides,
        "mix.counts={}",
        "train.compile=true",
        "train.zero_stage=3",
        "data.sources.0.path=/nowhere/x.jsonl",
    ]
    with pytest.raises(ConfigError) as err:
        run_pipeline(load_config(CONFIG, bad))
    text = str(err.value)
    assert "3 problem(s)" in text, text
    assert "categorize: " in text and "/nowhere/x.jsonl" in text
    assert "mix: the mix asks for no rows" in text
    assert "train: train.compile=true needs train.zero_stage 0, 1 or 2" in text
    assert not load_config(CONFIG, overrides).run.dir.exists()  # nothing was written


def test_every_declared_stage_can_be_selected_by_name():
    """run.stages lists the stage names the config accepts: a stage declared in eqrlhf.stages is one of them."""
    for name in STAGES:
        assert [s.name for s in selected_stages(load_config(CONFIG, [f"run.stages=[{name}]"]))] == [name]
