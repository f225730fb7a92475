"""Ray Tune sweeps: the search space and resources checked before Ray starts, hand-checked helpers, and tiny
versions of both shipped sweep configs run for real (a random 2-layer Llama, 1-2 training steps, 2 trials,
the rule refusal judge, the bundled suites): the scaling sweep interrupted with SIGINT and resumed, the
mask-threshold sweep with its shared reward model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eqrlhf.config import ConfigError, load_config
from eqrlhf.tune.results import mark_front
from eqrlhf.tune.space import eval_points, max_concurrent, sweep_hash, trial_config, validate_space
from eqrlhf.tune.trial import objective

REPO = Path(__file__).resolve().parents[1]
SCALING = "configs/sweep_scaling.yaml"
THRESHOLDS = "configs/sweep_thresholds.yaml"


def tiny_overrides(model_dir: Path, out: Path) -> list[str]:
    """Shrink a shipped sweep to seconds per step: tiny model, 2 trials, few prompts, short generations."""
    return [
        f"model.name_or_path={model_dir}",
        f"run.output_dir={out}",
        "generation.max_new_tokens=4",
        "eval.limit=2",
        "eval.batch_size=8",
        "train.micro_batch_size=1",
        "train.grad_accum=1",
        "train.zero_stage=0",
        "train.max_steps=2",
        "mix.counts={EHD: 3, IHD: 2, MHD: 1}",
        "sweep.num_samples=2",
        "sweep.max_concurrent_trials=1",
    ]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer Llama with the real SmolLM2 tokenizer and chat template, saved in HF format."""
    from eqrlhf.models.loading import load_tokenizer, tiny_llama

    path = tmp_path_factory.mktemp("model") / "tiny"
    tokenizer = load_tokenizer("smollm2-135m")
    tiny_llama(vocab_size=len(tokenizer), seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---- checks before Ray -------------------------------------------------------------------------------------


def test_shipped_sweep_configs_validate():
    for path in (SCALING, THRESHOLDS):
        validate_space(load_config(path))


def test_data_stages_are_shared_only_when_no_swept_key_changes_the_data():
    from eqrlhf.tune.sweep import data_shared

    assert data_shared(load_config(THRESHOLDS))  # rule, tau, baseline, beta: all train-time
    assert not data_shared(load_config(SCALING))  # mix counts change the mixture
    implicit = ["ama.scorer=dpo_implicit", "ama.scorer_model=m", "ama.scorer_ref_model=r"]
    assert data_shared(load_config(THRESHOLDS, implicit))  # z-scored scores do not depend on beta
    assert not data_shared(load_config(THRESHOLDS, [*implicit, "ama.normalize=none"]))  # beta scales them


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sweep.space={mix.countz.EHD: {type: int, low: 1, high: 3}}", "unknown key 'mix.countz'"),
        ("sweep.space={train.output: {type: choice, values: [a, b]}}", "set per trial"),
        ("sweep.space={algorithm.beta: {type: float, low: 0.5, high: 0.1}}", "low 0.5 is above high 0.1"),
        ("sweep.space={algorithm.beta: {type: float, low: 0.0, high: 0.1, log: true}}", "log range needs low > 0"),
        ("sweep.space={ama.rule: {type: choice, values: [sign, nope]}}", "ama.rule"),
        ("sweep.space={}", "sweep.space is empty"),
    ],
)
def test_bad_search_space_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate_space(load_config(SCALING, [override]))


def test_grid_search_needs_choices_and_chunks_need_a_constant_schedule():
    from eqrlhf.tune.space import validate_objectives

    with pytest.raises(ConfigError, match="sweep.search=grid needs type choice"):
        validate_space(load_config(SCALING, ["sweep.search=grid"]))
    with pytest.raises(ConfigError, match="set train.lr_schedule=constant"):
        validate_objectives(load_config(SCALING, ["train.lr_schedule=cosine"]))
    no_helpful = "eval.suites=[{name: h, kind: harmful, sources: [{name: h, path: x.jsonl}]}]"
    with pytest.raises(ConfigError, match="no suite of kind 'benign'"):
        validate_objectives(load_config(SCALING, [no_helpful]))


def test_eval_points_are_even_fractions_of_each_trials_training():
    assert eval_points(13, 2) == [6, 13]  # round(6.5) is 6 (banker's rounding), then the end
    assert eval_points(12, 3) == [4, 8, 12]
    assert eval_points(1, 3) == [1]  # fewer steps than evaluations: one evaluation, at the end
    assert eval_points(5, 1) == [5]


def test_concurrency_is_what_the_cluster_holds():
    cfg = load_config(SCALING, ["train.num_workers=2", "train.cpus_per_worker=3"])  # peak 1 + 2 x 3 = 7 CPUs
    assert max_concurrent(cfg, {"CPU": 16}) == 2
    assert max_concurrent(cfg, {"CPU": 14}) == 2
    gpu = load_config(
        SCALING, ["train.num_workers=4", "train.use_gpu=true", "train.cpus_per_worker=1", "generation.num_gpus=1"]
    )  # peak 5 CPUs and 1 + 4 = 5 GPUs
    assert max_concurrent(gpu, {"CPU": 64, "GPU": 16}) == 3
    assert (
        max_concurrent(
            gpu.model_copy(update={"sweep": gpu.sweep.model_copy(update={"gpus_per_trial": 8})}), {"CPU": 64, "GPU": 16}
        )
        == 2
    )
    capped = load_config(SCALING, ["sweep.max_concurrent_trials=1"])
    assert max_concurrent(capped, {"CPU": 64}) == 1
    with pytest.raises(ConfigError, match="needs 9 CPU and 0 GPU"):
        max_concurrent(load_config(SCALING, ["train.num_workers=8"]), {"CPU": 8})


def test_objective_and_pareto_front_by_hand():
    weights = {"harmful_compliance": 1.0, "over_refusal": 1.0, "helpfulness": -1.0}
    assert objective({"harmful_compliance": 0.5, "over_refusal": 0.25, "helpfulness": -0.1}, weights) == pytest.approx(
        0.85
    )
    assert objective({"harmful_compliance": 0.5, "over_refusal": None, "helpfulness": 0.0}, weights) is None
    rows = [
        {"status": "completed", "harmful_compliance": 0.2, "over_refusal": 0.3, "helpfulness": -0.1},  # front
        {"status": "completed", "harmful_compliance": 0.3, "over_refusal": 0.4, "helpfulness": -0.2},  # dominated by 0
        {"status": "stopped early", "harmful_compliance": 0.1, "over_refusal": 0.9, "helpfulness": -0.5},  # front
        {"status": "error", "harmful_compliance": 0.0, "over_refusal": 0.0, "helpfulness": 1.0},  # failed: excluded
        {"status": "completed", "harmful_compliance": 0.2, "over_refusal": 0.3, "helpfulness": 0.0},  # dominates 0
    ]
    front = mark_front(rows, ["harmful_compliance", "over_refusal", "helpfulness"])
    assert front == [2, 4]
    assert [r["front"] for r in rows] == [False, False, True, False, True]


def test_trial_config_gets_its_own_run_dir_and_the_shared_paths(tmp_path):
    cfg = load_config(THRESHOLDS, ["pairs.output=/somewhere/shared"])
    shared = {"mix.input": "/s/categorized", "ama.scorer_model": "/s/rm/final", "eval.reward_model": "/s/rm/final"}
    trial = trial_config(
        cfg.model_dump(mode="json"), {"ama.tau": 0.7, "ama.rule": "sign"}, tmp_path / "trials" / "t1", shared
    )
    assert (trial.run.output_dir, trial.run.name) == (str(tmp_path / "trials"), "t1")
    assert (trial.ama.tau, trial.ama.rule, trial.ama.scorer_model) == (0.7, "sign", "/s/rm/final")
    assert trial.pairs.output is None and trial.mix.input == "/s/categorized"  # per-trial paths are never shared
    # resources and the resume flag may change when a sweep is resumed; anything else is another sweep
    assert sweep_hash(cfg) == sweep_hash(
        load_config(THRESHOLDS, ["pairs.output=/somewhere/shared", "sweep.max_concurrent_trials=3"])
    )
    assert sweep_hash(cfg) != sweep_hash(
        load_config(THRESHOLDS, ["pairs.output=/somewhere/shared", "sweep.num_samples=3"])
    )


# ---- real sweeps -------------------------------------------------------------------------------------------


def _wait_for(pattern: str, root: Path, proc: subprocess.Popen, timeout: float) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) before {pattern} appeared")
        time.sleep(1)
    raise AssertionError(f"{pattern} did not appear under {root} within {timeout}s")


@pytest.mark.slow
def test_scaling_sweep_is_interrupted_and_resumes(tiny_model, tmp_path, ray_local):
    """SIGINT after the first trial's first evaluation; the rerun resumes: nothing already done is redone."""
    from ray import tune

    from eqrlhf.tune import run_sweep
    from eqrlhf.tune.sweep import sweep_dir

    overrides = [
        *tiny_overrides(tiny_model, tmp_path),
        "algorithm.reference=in_trainer",  # no score stage here; the threshold sweep covers scoring
        "sweep.space={mix.counts.EHD: {type: int, low: 2, high: 6}, mix.general_ratio: {type: choice, values: [0.5, 1.0]}}",
    ]
    root = sweep_dir(load_config(SCALING, overrides))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "first_run.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "eqrlhf.cli", "sweep", "-c", SCALING, *overrides],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        first_eval = _wait_for("trials/*/eval/step_1/eval.json", root, proc, timeout=900)
        proc.send_signal(signal.SIGINT)  # Tune saves the experiment state and stops
        assert proc.wait(timeout=180) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert tune.Tuner.can_restore(str(root / "tune")), (tmp_path / "first_run.log").read_text()[-3000:]
    first_trial = first_eval.parents[2]
    stamps = {p: p.stat().st_mtime_ns for p in (first_eval, first_trial / "train" / "checkpoints" / "step_1")}

    manifest = run_sweep(load_config(SCALING, overrides))

    assert manifest["resumed"] is True
    trials = {t["trial"]: t for t in manifest["trials"]}
    assert len(trials) == 2 and first_trial.name in trials
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the first evaluation and chunk were not redone
    for trial in trials.values():
        assert trial["status"] in ("completed", "stopped early"), trial
        assert trial["evaluations"] == (2 if trial["status"] == "completed" else 1)
        assert trial["step"] == trial["evaluations"]  # 2 steps, evaluated after 1 and 2
        assert 2 <= trial["params"]["mix.counts.EHD"] <= 6 and trial["params"]["mix.general_ratio"] in (0.5, 1.0)
        mixture = json.loads(Path(trial["run_dir"], "mixture", "manifest.json").read_text())
        assert mixture["per_category"]["EHD"] == trial["params"]["mix.counts.EHD"]
        assert (mixture["per_category"]["IHD"], mixture["per_category"]["MHD"]) == (2, 1)
        assert 0.0 <= trial["harmful_compliance"] <= 1.0 and 0.0 <= trial["over_refusal"] <= 1.0
        # per-category numbers for the scaling study (which categories appear depends on the 2 sampled prompts)
        assert (
            any(k.startswith("refusal/harmful/") for k in trial["refusal"])
            and "refusal/benign/none" in trial["refusal"]
        )
    assert trials[first_trial.name]["evaluations"] >= 1
    assert manifest["pareto_front"] and set(manifest["pareto_front"]) <= set(trials)
    csv_lines = (root / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("trial,mix.counts.EHD,mix.general_ratio,harmful_compliance")
    assert "| trial |" in (root / "results.md").read_text()
    assert (root / "pareto.png").stat().st_size > 10_000


def test_threshold_sweep_shares_one_reward_model_and_one_scored_set(tiny_model, tmp_path, ray_local):
    from eqrlhf.tune import run_sweep

    overrides = [
        *tiny_overrides(tiny_model, tmp_path),
        "sweep.evaluations=1",
        "pipeline.reward_train.max_steps=1",
        "pipeline.reward_train.micro_batch_size=1",
        "pipeline.reward_train.grad_accum=1",
        "pipeline.reward_train.zero_stage=0",
        "tracking.backend=mlflow",  # each trial one run in one experiment, in the default local store
    ]
    manifest = run_sweep(load_config(THRESHOLDS, overrides))
    root = Path(manifest["dir"])
    shared = root / "shared"
    reward = shared / "reward_model" / "final"
    assert (reward / "config.json").is_file()
    assert manifest["counts"] == {"completed": 2}
    # only train-time keys are swept, so the data stages ran once, in the shared run
    pairs = json.loads((shared / "pairs" / "manifest.json").read_text())
    assert pairs["rows_written"] + pairs["filtered"].get("no pair", 0) == 6 + 6  # 3 + 2 + 1 safety, 6 general
    scored = json.loads((shared / "scored" / "manifest.json").read_text())
    assert scored["rows_written"] == pairs["rows_written"]  # every pair scored, by the one shared reward model
    for trial in manifest["trials"]:
        run = Path(trial["run_dir"])
        config = json.loads((run / "config.json").read_text())
        assert config["train"]["input"] == str((shared / "scored").resolve())
        assert config["eval"]["training_data"] == [str((shared / "pairs").resolve())]
        assert not (run / "pairs").exists() and not (run / "scored").exists()
        assert (config["ama"]["rule"], config["ama"]["tau"]) == (
            trial["params"]["ama.rule"],
            trial["params"]["ama.tau"],
        )
        train = json.loads((run / "train" / "manifest.json").read_text())
        assert train["loss"] == "ama_dpo" and train["steps_run"] == 2
        assert "ama/kept_fraction" in train["final_metrics"]
        assert trial["step"] == 2 and trial["evaluations"] == 1
    tracked_in_mlflow(load_config(THRESHOLDS, overrides), manifest)


def tracked_in_mlflow(cfg, manifest: dict) -> None:
    """MLflowLoggerCallback made each Tune trial one run, with its sampled params and reported metrics; the
    trials' own training and the shared stages stay out of it."""
    from test_tracking_on_cpu import metric_history, mlflow_runs

    client, runs = mlflow_runs(f"sqlite:///{(cfg.run.dir / 'mlflow.db').resolve()}", f"{cfg.run.name}-{cfg.sweep.name}")
    assert len(runs) == 2 == len(manifest["trials"])
    for trial in manifest["trials"]:
        (tracked,) = [r for r in runs if trial["trial"] in r.data.tags["trial_name"]]
        assert tracked.info.status == "FINISHED" and tracked.data.tags["eqrlhf.kind"] == "sweep_trial"
        assert tracked.data.params["ama.rule"] == trial["params"]["ama.rule"]
        assert float(tracked.data.params["ama.tau"]) == pytest.approx(trial["params"]["ama.tau"])
        for metric in ("harmful_compliance", "over_refusal", "objective"):
            assert [v for _, v in metric_history(client, tracked.info.run_id, metric)] == [pytest.approx(trial[metric])]


def test_wandb_logs_each_trial_of_a_sweep_as_one_offline_run(tmp_path, ray_local):
    """The W&B twin of the threshold sweep's MLflow check above: the sweep's search space, search algorithm and
    Tune callbacks (eqrlhf.tracking.tune_callbacks, what run_sweep hands Tune), with a trainable that reports
    made-up evaluations instead of training, to keep CI short: everything else run_sweep does is the same for
    both backends and runs end to end above."""
    from ray import tune
    from test_tracking_on_cpu import wandb_offline_runs

    from eqrlhf.tracking import sweep_experiment, tune_callbacks
    from eqrlhf.tune.space import param_space
    from eqrlhf.tune.sweep import search_algorithm
    from eqrlhf.tune.trial import trial_metrics

    cfg = load_config(THRESHOLDS, [f"run.output_dir={tmp_path}", "sweep.num_samples=2", "tracking.backend=wandb"])

    def made_up(params: dict, step: int) -> dict:
        summary = {
            "harmful_compliance": params["ama.tau"] / step,
            "over_refusal": 0.25 * step,
            "likelihood_retention": 0.5,
        }
        return trial_metrics(summary, cfg, step, total_steps=2, planned=2)

    def trainable(params: dict) -> None:
        for step in (1, 2):
            tune.report(made_up(params, step))

    grid = tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(search_alg=search_algorithm(cfg, 1), num_samples=2),
        run_config=tune.RunConfig(name="tune", storage_path=str(tmp_path / "tune"), callbacks=tune_callbacks(cfg)),
    ).fit()
    assert len(grid) == 2 and not grid.errors
    runs = wandb_offline_runs(cfg.run.dir)  # every trial's run in the run folder, as the training runs are
    assert sorted(r["folder"].name.rsplit("-", 1)[1] for r in runs) == sorted(r.metrics["trial_id"] for r in grid)
    for result in grid:
        (run,) = [r for r in runs if r["folder"].name.endswith(result.metrics["trial_id"])]
        assert run["group"] == sweep_experiment(cfg) == "thresholds-thresholds" and run["exit_code"] == 0
        assert {k: run["config"][k] for k in cfg.sweep.space} == result.config  # the sampled values as params
        assert [row["_step"] for row in run["history"]] == [1, 2]  # one point per report
        for row, step in zip(run["history"], (1, 2)):
            for metric in ("harmful_compliance", "over_refusal", "objective"):
                assert row[metric] == pytest.approx(made_up(result.config, step)[metric]), metric


@pytest.mark.parametrize("search", ["grid", "random", "optuna"])
def test_the_search_algorithm_runs_one_trial_at_a_time_when_the_limit_is_one(tmp_path, ray_local, search):
    """Tune ignores ``max_concurrent_trials`` beside a grid or random generator; a scaling sweep whose trials
    all started at once would need three trials' memory. Each trial here records when it ran."""
    import time

    from ray import tune

    from eqrlhf.tune.space import param_space
    from eqrlhf.tune.sweep import search_algorithm

    cfg = load_config(THRESHOLDS, [f"run.output_dir={tmp_path}", f"sweep.search={search}", "sweep.num_samples=3"])
    # a grid needs choices only: three values of one key, as the scaling sweeps search mix.safety_scale
    space = {"ama.tau": tune.grid_search([0.1, 0.2, 0.3])} if search == "grid" else param_space(cfg)

    def trainable(params: dict) -> None:
        start = time.time()
        time.sleep(1.0)
        metrics = {"harmful_compliance": 0.5, "over_refusal": 0.5, "helpfulness": 0.5}
        tune.report({"start": start, "end": time.time(), **metrics})

    grid = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(search_alg=search_algorithm(cfg, 1), num_samples=1 if search == "grid" else 3),
        run_config=tune.RunConfig(name="tune", storage_path=str(tmp_path / "tune")),
    ).fit()
    windows = sorted((r.metrics["start"], r.metrics["end"]) for r in grid)
    assert len(windows) == 3 and not grid.errors
    assert all(later[0] >= earlier[1] for earlier, later in zip(windows, windows[1:]))  # no overlap
