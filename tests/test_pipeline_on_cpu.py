"""The pipeline runs stages in order and skips the ones whose config did not change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eqrlhf.config import load_config
from eqrlhf.pipeline import plan, run_pipeline, selected_stages
from eqrlhf.pipeline_report import flat_summary
from eqrlhf.stages import effective_config, on_policy_config, reward_config, warm_start_config

DEMO_ONLY_DATA = ["run.stages=[categorize, mix]", "mix.counts={EHD: 5, IHD: 3, MHD: 2}", "mix.general_ratio=1.0"]


def test_stage_selection_follows_the_config():
    everything = ["categorize", "mix", "pairs", "warm_start", "on_policy", "score", "train", "evaluate"]
    # warm start, rejected answers sampled from it, then AMA-DPO scored by the warm start
    cfg = load_config("configs/quickstart.yaml")
    assert [s.name for s in selected_stages(cfg)] == everything
    rm = load_config("configs/quickstart.yaml", ["ama.scorer=reward_prefix", "pipeline.warm_start=null"])
    with_rm = ["categorize", "mix", "pairs", "reward", "score", "train", "evaluate"]
    assert [s.name for s in selected_stages(rm)] == with_rm  # a reward model the pipeline trains
    given = load_config(
        "configs/quickstart.yaml", ["ama.scorer=reward_prefix", "ama.scorer_model=runs/elsewhere/final"]
    )
    assert [s.name for s in selected_stages(given)] == everything
    plain = load_config("configs/quickstart.yaml", ["algorithm.loss=dpo", "algorithm.reference=in_trainer"])
    plain_stages = ["categorize", "mix", "pairs", "warm_start", "on_policy", "train", "evaluate"]
    assert [s.name for s in selected_stages(plain)] == plain_stages
    written = load_config("configs/quickstart.yaml", ["pairs.rejected=instructed"])  # no sampling stage
    assert "on_policy" not in [s.name for s in selected_stages(written)]
    cfg = load_config("configs/quickstart.yaml", ["run.stages=[mix]"])
    assert [s.name for s in selected_stages(cfg)] == ["mix"]


def test_the_reward_model_path_is_filled_in_only_where_the_config_leaves_it_open():
    cfg = load_config("configs/quickstart.yaml", ["run.output_dir=/r", "ama.scorer=reward_prefix"])
    eff = effective_config(cfg)
    assert eff.ama.scorer_model == eff.eval.reward_model == "/r/quickstart/reward_model/final"
    reward = reward_config(cfg)
    assert (reward.algorithm.loss, reward.train.input, reward.train.output) == (
        "reward",
        "/r/quickstart/pairs",
        "/r/quickstart/reward_model",
    )
    paths = {"input", "output"}
    assert reward.train.model_dump(exclude=paths) == cfg.pipeline.reward_train.model_dump(exclude=paths)
    own = load_config("configs/quickstart.yaml", ["ama.scorer_model=/m/rm", "eval.reward_model=/m/other"])
    assert (effective_config(own).ama.scorer_model, effective_config(own).eval.reward_model) == ("/m/rm", "/m/other")


def test_a_warm_start_feeds_the_score_and_train_stages_but_not_the_before_model():
    warm = [
        "run.output_dir=/r",
        "pipeline.warm_start={epochs: 1, lr: 2.0e-5}",
        "ama.scorer=dpo_implicit",
        "pairs.rejected=instructed",  # the pairs stage's answers go straight to score: no on_policy stage
    ]
    cfg = load_config("configs/quickstart.yaml", warm)
    names = [s.name for s in selected_stages(cfg)]
    assert names == ["categorize", "mix", "pairs", "warm_start", "score", "train", "evaluate"]  # no reward model
    final = "/r/quickstart/warm_start/final"
    for stage in ("score", "train"):
        assert effective_config(cfg, stage).model.name_or_path == final
    for stage in ("pairs", "warm_start", "evaluate", None):
        assert effective_config(cfg, stage).model.name_or_path == "smollm2-135m"
    # the token scorer is what the warm start learned: log pi_warm - log pi_base
    assert (effective_config(cfg).ama.scorer_model, effective_config(cfg).ama.scorer_ref_model) == (
        final,
        "smollm2-135m",
    )
    sft = warm_start_config(cfg)
    assert (sft.algorithm.loss, sft.train.input, sft.train.output, sft.train.lr) == (
        "sft",
        "/r/quickstart/pairs",
        "/r/quickstart/warm_start",
        2.0e-5,
    )
    # the plan: a warm start that runs rewrites what the score and train stages start from
    reasons = {d.stage.name: d.reasons for d in plan(cfg)}
    assert any("warm_start/final is rewritten by an earlier stage" in r for r in reasons["score"])
    assert any("warm_start/final is rewritten by an earlier stage" in r for r in reasons["train"])


def test_on_policy_rejected_answers_come_from_the_warm_start_when_there_is_one():
    cfg = load_config("configs/quickstart.yaml", ["run.output_dir=/r", "pairs.rejected=on_policy"])
    names = [s.name for s in selected_stages(cfg)]
    assert names == ["categorize", "mix", "pairs", "warm_start", "on_policy", "score", "train", "evaluate"]
    # the pairs stage writes the fallback answers; the on_policy stage samples the warm start over its pairs
    assert effective_config(cfg, "pairs").pairs.rejected == "instructed"
    assert effective_config(cfg, "pairs").model.name_or_path == "smollm2-135m"
    sampler = on_policy_config(effective_config(cfg, "on_policy"))
    assert (sampler.model.name_or_path, sampler.pairs.rejected) == ("/r/quickstart/warm_start/final", "on_policy")
    assert (sampler.pairs.input, sampler.pairs.output) == ("/r/quickstart/pairs", "/r/quickstart/on_policy")
    for stage in ("score", "train"):  # DPO trains on the sampled pairs; the warm start on the chosen answers
        assert effective_config(cfg, stage).ama.input == "/r/quickstart/on_policy"
    assert warm_start_config(effective_config(cfg, "warm_start")).train.input == "/r/quickstart/pairs"
    reasons = {d.stage.name: d.reasons for d in plan(cfg)}
    assert any("warm_start/final is rewritten by an earlier stage" in r for r in reasons["on_policy"])
    assert any("on_policy is rewritten by an earlier stage" in r for r in reasons["score"])
    # without a warm start the pairs stage samples the base model itself, as before
    base = load_config("configs/quickstart.yaml", ["pairs.rejected=on_policy", "pipeline.warm_start=null"])
    assert "on_policy" not in [s.name for s in selected_stages(base)]
    assert effective_config(base, "pairs").pairs.rejected == "on_policy"


def test_flat_summary_reads_rates_means_and_categories():
    doc = {
        "headline": {
            "harmful_compliance": {"rate": 0.25, "count": 1, "n": 4},
            "over_refusal": {"rate": 0.5, "count": 2, "n": 4},
            "likelihood_retention": {"mean": -0.125, "n": 3},
        },
        "helpfulness": {"reward": {"mean": 1.5, "n": 3}},
        "metrics": {"by_kind_category": {"harmful": {"EHD": {"refusal": {"rate": 0.75}}}}},
    }
    assert flat_summary(doc) == {
        "harmful_compliance": 0.25,
        "over_refusal": 0.5,
        "likelihood_retention": -0.125,
        "reward": 1.5,
        "refusal/harmful/EHD": 0.75,
    }
    assert flat_summary({**doc, "summary": {"harmful_compliance": 0.0}})["harmful_compliance"] == 0.0


def test_rerun_skips_unchanged_stages_and_reruns_downstream(tmp_path, ray_local, capsys):
    overrides = [f"run.output_dir={tmp_path}", *DEMO_ONLY_DATA]
    first = run_pipeline(load_config("configs/quickstart.yaml", overrides))
    assert first["mix"]["rows_written"] == 20  # 5 + 3 + 2 safety rows and 10 general rows
    again = run_pipeline(load_config("configs/quickstart.yaml", overrides))
    assert again["categorize"]["skipped"] and again["mix"]["skipped"]
    # Changing the mix re-runs mix only; categorize's inputs did not change.
    changed = run_pipeline(load_config("configs/quickstart.yaml", [*overrides, "mix.counts.EHD=6"]))
    assert changed["categorize"].get("skipped") and not changed["mix"].get("skipped")
    assert changed["mix"]["rows_written"] == 22
    for stage, folder in (("categorize", "categorized"), ("mix", "mixture")):
        assert json.loads((tmp_path / "quickstart" / folder / "stage_state.json").read_text())["stage"] == stage
    assert "unchanged since the last run, skipped" in capsys.readouterr().out


def test_whole_pipeline_with_a_tiny_model_reports_before_and_after(tmp_path, ray_local, capsys):
    """categorize -> mix -> pairs -> warm start -> on-policy rejected answers from the warm start -> score ->
    AMA-DPO -> evaluate -> report, tracked in MLflow; then a rerun skips all, and one tracked in W&B (offline)
    with a new learning rate re-runs only training and the trained model's evaluation. (The reward stage runs
    end to end in the threshold sweep's test.)"""
    from eqrlhf.models.loading import load_tokenizer, tiny_llama

    model = tmp_path / "tiny"
    tokenizer = load_tokenizer("smollm2-135m")
    tiny_llama(vocab_size=len(tokenizer), seed=0).save_pretrained(model)
    tokenizer.save_pretrained(model)
    one_step = ["num_workers=1", "zero_stage=0", "micro_batch_size=1", "grad_accum=1", "max_steps=1"]
    overrides = [
        f"run.output_dir={tmp_path}",
        f"model.name_or_path={model}",
        "mix.counts={EHD: 3, IHD: 2, MHD: 1}",
        "mix.general_ratio=1.0",
        "pairs.missing=skip",
        "pairs.rejected=on_policy",
        "pairs.samples=2",
        "generation.max_new_tokens=4",
        "eval.limit=2",
        "tracking.backend=mlflow",  # the default local store: sqlite:///<run>/mlflow.db, no server
        *[f"train.{o}" for o in one_step],
        *[f"pipeline.warm_start.{o}" for o in one_step],
    ]
    report = run_pipeline(load_config("configs/quickstart.yaml", overrides))
    run = tmp_path / "quickstart"
    assert report["train"]["loss"] == "ama_dpo" and report["train"]["steps_run"] == 1
    assert report["warm_start"]["loss"] == "sft" and "reward" not in report
    scored = json.loads((run / "scored" / "manifest.json").read_text())
    warm = str(run / "warm_start" / "final")
    sampled = json.loads((run / "on_policy" / "manifest.json").read_text())
    assert sampled["pairs"]["generator"]["model"] == warm and sampled["pairs"]["generator"]["rejected"] == "on_policy"
    judged = sampled["pairs"]["judged"]  # every pair went through the sampler: 2 samples each, counted
    assert sum(c["prompts"] for c in judged.values()) == sampled["rows_read"] == report["pairs"]["rows_written"]
    assert sum(c["samples"] for c in judged.values()) == 2 * sampled["rows_read"]
    # DPO's reference is the warm start; the token scores compare the warm start with the base
    assert scored["models"] == {"scorer_model": warm, "scorer_ref_model": str(model), "ref_model": warm}
    accuracy = scored["scorer_accuracy"]  # the warm start's implicit reward, ranking every pair
    assert accuracy["n"] == scored["rows_written"] and 0 <= accuracy["count"] <= accuracy["n"]
    ev = report["evaluate"]
    assert ev["base"]["model"] == str(model) and ev["trained"]["model"].endswith("train/final")
    for entry in (ev["base"], ev["trained"]):
        assert Path(entry["eval_json"]).is_file()
        # 2 prompts per bundled suite: every rate is a count out of 2
        assert entry["summary"]["harmful_compliance"] in (0.0, 0.5, 1.0)
        assert entry["summary"]["over_refusal"] in (0.0, 0.5, 1.0)
    assert ev["base"]["summary"]["likelihood_retention"] == pytest.approx(0.0, abs=1e-6)  # base vs itself
    text = (run / "report.md").read_text()
    assert "| harmful compliance |" in text and "| over-refusal |" in text and "trained" in text
    shown = capsys.readouterr().out
    assert "report: " + str(run / "report.md") in shown and "harmful compliance" in shown
    # each number with its interval and count, and the paired test on the same prompts
    assert "  base     " in shown and "  trained  " in shown and "/2)" in shown and "paired p=" in shown
    assert f"scorer ranks {accuracy['rate']:.0%} of pairs right" in shown
    # model cards: every final checkpoint gets one from the train stage; the trained model's is rewritten
    # with its evaluation at the end (and does not make the rerun below re-run a stage)
    from huggingface_hub import ModelCard

    assert report["model_card"] == str((run / "train" / "final").resolve() / "README.md")
    card = ModelCard.load(run / "train" / "final" / "README.md")
    assert card.data.license == "apache-2.0" and card.data.datasets == ["demo"] and "ama-dpo" in card.data.tags
    assert "| category | categorized | mixture | pairs | trained on |" in card.text and "| EHD | 120 | 3 |" in card.text
    assert (
        "| harmful compliance (lower is better) |" in card.text and "| metric | this model | base model |" in card.text
    )
    warm = ModelCard.load(run / "warm_start" / "final" / "README.md")
    assert "sft" in warm.data.tags and "Not evaluated by its run" in warm.text
    tracked_in_mlflow(run, ev)

    again = run_pipeline(load_config("configs/quickstart.yaml", overrides))
    stages = ["categorize", "mix", "pairs", "warm_start", "on_policy", "score", "train", "evaluate"]
    assert [s for s in stages if not again[s].get("skipped")] == []
    assert "report" in again

    # W&B offline: the tracker is in no fingerprint, so only the new learning rate re-runs anything (training,
    # and the trained model's evaluation; the base model's is reused)
    wandb = run_pipeline(
        load_config("configs/quickstart.yaml", [*overrides, "tracking.backend=wandb", "train.lr=1e-5"])
    )
    assert [s for s in stages if not wandb[s].get("skipped")] == ["train", "evaluate"]
    assert wandb["evaluate"]["base"]["reused"] and not wandb["evaluate"]["trained"]["reused"]
    tracked_in_wandb(run, wandb)


def tracked_in_mlflow(run: Path, evaluate: dict) -> None:
    """The pipeline's MLflow parent run and its two training runs, read back with the MLflow client."""
    from test_tracking_on_cpu import metric_history, mlflow_runs

    from eqrlhf.train.metrics import read_metrics

    client, runs = mlflow_runs(f"sqlite:///{run / 'mlflow.db'}", "quickstart")
    by_name = {r.info.run_name: r for r in runs}
    assert sorted(by_name) == ["quickstart", "train", "warm_start"]
    parent = by_name["quickstart"]
    assert parent.info.status == "FINISHED" and parent.info.artifact_uri.startswith((run / "mlartifacts").as_uri())
    config = json.loads((run / "config.json").read_text())
    assert parent.data.params["train.max_steps"] == "1" == str(config["train"]["max_steps"])
    assert parent.data.params["model.name_or_path"] == config["model"]["name_or_path"]
    for stage, folder in (("categorize", "categorized"), ("mix", "mixture"), ("pairs", "pairs")):
        manifest = json.loads((run / folder / "manifest.json").read_text())
        assert parent.data.metrics[f"{stage}/rows_written"] == manifest["rows_written"]
        for category, count in manifest["per_category"].items():
            assert parent.data.metrics[f"{stage}/per_category/{category}"] == count
        for reason, count in manifest["filtered"].items():
            assert parent.data.metrics[f"{stage}/filtered/{reason}"] == count
    for tag in ("base", "trained"):  # the evaluation's headline numbers with their intervals
        headline = json.loads(Path(evaluate[tag]["eval_json"]).read_text())["headline"]
        stat = headline["harmful_compliance"]
        assert parent.data.metrics[f"eval/{tag}/harmful_compliance"] == stat["rate"]
        low, high = stat["ci95"]
        assert parent.data.metrics[f"eval/{tag}/harmful_compliance_ci_low"] == pytest.approx(low)
        assert parent.data.metrics[f"eval/{tag}/harmful_compliance_ci_high"] == pytest.approx(high)
        files = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, f"eval/{tag}")}
        assert {"eval.json", "report.md", "safety_plane.png", "refusal_by_category.png"} <= files
    assert "report.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "manifests/mix")] == [
        "manifests/mix/manifest.json"
    ]
    for stage in ("warm_start", "train"):  # nested under the pipeline run; every point of metrics.jsonl
        child = by_name[stage]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.info.status == "FINISHED"
        assert child.data.params["algorithm.loss"] == ("sft" if stage == "warm_start" else "ama_dpo")
        rows = read_metrics(run / stage / "metrics.jsonl")
        assert rows and {"loss", "throughput/tokens_per_s", "memory/rss_gib"} <= set(rows[0])
        for key in rows[0]:
            if key != "step":
                want = [(r["step"], pytest.approx(r[key])) for r in rows]
                assert metric_history(client, child.info.run_id, key) == want, key


def tracked_in_wandb(run: Path, report: dict) -> None:
    """The pipeline's W&B parent run and the training run it started, read back from the offline run files:
    one group (the run's name), told apart by job type, as the MLflow runs are by nesting."""
    from test_tracking_on_cpu import wandb_offline_runs

    from eqrlhf.train.metrics import read_metrics

    runs = {r["job_type"]: r for r in wandb_offline_runs(run)}
    assert sorted(runs) == ["pipeline", "train"] and {r["group"] for r in runs.values()} == {"quickstart"}
    parent, train = runs["pipeline"], runs["train"]
    assert (parent["name"], train["name"]) == ("quickstart", "train")
    assert parent["exit_code"] == 0 == train["exit_code"]
    config = json.loads((run / "config.json").read_text())
    assert parent["config"]["train.lr"] == "1e-05" == json.dumps(config["train"]["lr"])
    assert parent["config"]["model.name_or_path"] == config["model"]["name_or_path"]
    summary = parent["summary"]
    for stage, folder in (("categorize", "categorized"), ("mix", "mixture"), ("pairs", "pairs")):  # skipped ones too
        manifest = json.loads((run / folder / "manifest.json").read_text())
        assert summary[f"{stage}/rows_written"] == manifest["rows_written"]
        for category, count in manifest["per_category"].items():
            assert summary[f"{stage}/per_category/{category}"] == count
    evaluate = report["evaluate"]
    for tag in ("base", "trained"):  # the evaluation's headline numbers with their intervals, and its files
        headline = json.loads(Path(evaluate[tag]["eval_json"]).read_text())["headline"]
        stat = headline["harmful_compliance"]
        assert summary[f"eval/{tag}/harmful_compliance"] == stat["rate"]
        assert [summary[f"eval/{tag}/harmful_compliance_ci_{e}"] for e in ("low", "high")] == pytest.approx(
            stat["ci95"]
        )
        for name in ("eval.json", "report.md", "safety_plane.png", "refusal_by_category.png"):
            assert f"eval/{tag}/{name}" in parent["files"], (name, parent["files"])
    assert {"report.md", "manifests/mix/manifest.json", "manifests/train/manifest.json"} <= set(parent["files"])
    # copies taken when logged (a link would show a later rerun's file once synced)
    saved = parent["folder"] / "files" / "eval" / "trained" / "eval.json"
    assert not saved.is_symlink() and saved.read_text() == Path(evaluate["trained"]["eval_json"]).read_text()
    # the training run: the whole config as params, every point of metrics.jsonl
    assert train["config"]["algorithm.loss"] == "ama_dpo" and train["config"]["train.lr"] == "1e-05"
    rows = read_metrics(run / "train" / "metrics.jsonl")
    assert [row["_step"] for row in train["history"]] == [r["step"] for r in rows]
    assert [{k: row[k] for k in r if k != "step"} for row, r in zip(train["history"], rows)] == [
        {k: pytest.approx(v) for k, v in r.items() if k != "step"} for r in rows
    ]
