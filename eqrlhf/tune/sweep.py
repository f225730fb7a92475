"""`eqrlhf sweep -c configs/sweep_*.yaml`: Ray Tune over data mixture, scale and AMA settings.

How Ray Train runs inside Tune here (Ray 2.60, Train V2 is the default): each trial is a Tune *function
trainable* that calls :func:`eqrlhf.train.run_train`, which builds and fits a ``TorchTrainer`` - the pattern
of the Ray Train user guide "Hyperparameter Tuning with Ray Tune"
(https://docs.ray.io/en/latest/train/user-guides/hyperparameter-optimization.html): Tune runs a driver
function per trial, the driver launches Ray Train, and Ray Train places its own workers (Tune does not
reserve them), so trial concurrency is bounded by the search algorithm (a concurrency limit on Optuna, the
grid / random generator's own ``max_concurrent``), computed here from the cluster's resources and one trial's
peak need (:func:`eqrlhf.tune.space.max_concurrent`).
Metrics reach Tune through ``tune.report`` from the trial after each evaluation (no checkpoint needed).

Search: Optuna's multi-objective TPE sampler through ``OptunaSearch(metric=[...], mode=[...])`` (or random /
grid). Early stopping: ASHA on the scalar ``objective`` (a weighted sum of the same metrics) compared at the
same fraction of training; Tune's schedulers take one metric, and a weighted sum is the documented way to
stop clearly dominated trials early while the searcher keeps the full Pareto front. Resumption:
``Tuner.can_restore`` / ``Tuner.restore`` on the sweep dir; a restarted trial skips work already on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from eqrlhf.algorithms.catalog import ama_on
from eqrlhf.atomic import write_json
from eqrlhf.config import Config, ConfigError
from eqrlhf.tracking import check_tracking, tune_callbacks, untracked
from eqrlhf.tune.space import (
    DIRECTIONS,
    max_concurrent,
    param_space,
    sweep_hash,
    trial_resources,
    validate_objectives,
    validate_space,
)
from eqrlhf.tune.trial import TRIALS_DIR

TUNE_DIR = "tune"
SHARED_RUN = "shared"
SWEEP_CONFIG = "sweep_config.json"


def sweep_dir(cfg: Config) -> Path:
    default = cfg.run.dir / "sweep" / cfg.sweep.name
    return (cfg.resolve_path(cfg.sweep.output) if cfg.sweep.output else default).resolve()


def validate_sweep(cfg: Config) -> None:
    """Every check that needs no Ray: search space, objectives, evaluation suites, engine, models."""
    from eqrlhf.evaluate.suites import validate_suites
    from eqrlhf.rollout import check_engine

    validate_space(cfg)
    validate_objectives(cfg)
    check_tracking(cfg)
    validate_suites(cfg)
    check_engine(cfg)
    if cfg.sweep.search == "optuna":
        import optuna  # noqa: F401  (fail here, not inside Tune, when it is missing)


def check_resumable(cfg: Config, root: Path) -> bool:
    """True when ``root`` holds this sweep, interrupted, to resume; refuse a different sweep in the same dir."""
    from ray import tune

    tune_path = root / TUNE_DIR
    if not cfg.sweep.resume:  # a fresh start: the old experiment and its trials go
        shutil.rmtree(tune_path, ignore_errors=True)
        shutil.rmtree(root / TRIALS_DIR, ignore_errors=True)
        return False
    saved = root / SWEEP_CONFIG
    if saved.is_file() and json.loads(saved.read_text())["sweep_hash"] != sweep_hash(cfg):
        raise ConfigError(
            f"{root} holds a sweep with a different config: set sweep.name (or sweep.output) for a new sweep, "
            "or sweep.resume=false to discard the old one"
        )
    return tune.Tuner.can_restore(str(tune_path))


# sweep.space keys that change only training or evaluation, never what the mix, pairs or score stages write
TRAIN_TIME_KEYS = (
    "train.",
    "eval.",
    "ama.rule",
    "ama.tau",
    "ama.baseline",
    "algorithm.label_smoothing",
    "algorithm.bfpo_",
)


def data_shared(cfg: Config) -> bool:
    """True when every swept key is train-time: the trials then train on one copy of the data stages."""

    def train_time(name: str) -> bool:
        if name == "algorithm.beta":  # the implicit-reward scorer scales by beta unless a z-score removes it
            return not (ama_on(cfg) and cfg.ama.scorer == "dpo_implicit" and cfg.ama.normalize != "zscore")
        return name.startswith(TRAIN_TIME_KEYS)

    return all(train_time(name) for name in cfg.sweep.space)


def prepare_shared(cfg: Config, root: Path) -> dict:
    """Work every trial shares, done once: categorize, the reward model when AMA needs one, and the mix,
    pairs and score stages when no swept key changes them (a threshold sweep).

    Returns the config values trials take from it (only where their config leaves them unset).
    """
    from eqrlhf.data.score import scoring_needed
    from eqrlhf.pipeline import run_pipeline
    from eqrlhf.stages import effective_config, reward_stage_needed

    stages = [] if cfg.mix.input else ["categorize"]
    if reward_stage_needed(cfg):
        stages += ["mix", "pairs", "reward"]  # one reward model, on the base mixture, scores every trial
    share_data = data_shared(cfg)
    if share_data:
        stages += [s for s in ("mix", "pairs") if s not in stages] + (["score"] if scoring_needed(cfg) else [])
    if not stages:
        return {}
    shared_cfg = cfg.model_copy(
        update={"run": cfg.run.model_copy(update={"output_dir": str(root), "name": SHARED_RUN, "stages": stages})}
    )
    run_pipeline(shared_cfg)
    shared = {}
    if "categorize" in stages:
        shared["mix.input"] = str(shared_cfg.stage_dir(cfg.categorize.output, "categorized").resolve())
    if reward_stage_needed(cfg):
        eff = effective_config(shared_cfg)
        shared["ama.scorer_model"] = str(Path(eff.ama.scorer_model).resolve())
        shared["eval.reward_model"] = str(Path(eff.eval.reward_model).resolve())
    if share_data:
        pairs = shared_cfg.stage_dir(cfg.pairs.output, "pairs").resolve()
        scored = shared_cfg.stage_dir(cfg.ama.output, "scored").resolve()
        shared["train.input"] = str(scored if "score" in stages else pairs)
        shared["eval.training_data"] = [str(pairs)]  # what the evaluator checks its prompts against
    return shared


def search_algorithm(cfg: Config, concurrency: int):
    """Tune's search algorithm, holding the concurrency limit itself: Tune's ``max_concurrent_trials`` is
    ignored beside a grid or random search generator (every trial that fits the cluster then starts at once)."""
    sweep = cfg.sweep
    seed = sweep.seed if sweep.seed is not None else cfg.run.seed
    if sweep.search != "optuna":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed, max_concurrent=concurrency)
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    metrics = list(sweep.objectives)
    modes = [DIRECTIONS[m] for m in metrics]
    if len(metrics) == 1:
        metrics, modes = metrics[0], modes[0]
    return ConcurrencyLimiter(OptunaSearch(metric=metrics, mode=modes, seed=seed), max_concurrent=concurrency)


def scheduler(cfg: Config):
    sweep = cfg.sweep
    if sweep.scheduler == "none" or sweep.evaluations == 1:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",  # evaluations so far: the same fraction of training in every trial
        metric="objective",
        mode="min",
        max_t=sweep.evaluations,
        grace_period=min(sweep.grace_period, sweep.evaluations),
        reduction_factor=sweep.reduction_factor,
    )


def build_tuner(cfg: Config, root: Path, shared: dict, concurrency: int, restore: bool):
    import ray
    from ray import tune

    from eqrlhf.tune.trial import run_trial

    own, _ = trial_resources(cfg)
    trainable = tune.with_resources(
        # the trials' own pipeline and training runs stay untracked: the callbacks make each trial one run
        tune.with_parameters(
            run_trial, base=untracked(cfg).model_dump(mode="json"), sweep_dir=str(root), shared=shared
        ),
        {"CPU": own["CPU"], "GPU": own["GPU"]},
    )
    if restore:
        print(f"[sweep] resuming the interrupted sweep in {root / TUNE_DIR}")
        return tune.Tuner.restore(str(root / TUNE_DIR), trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            search_alg=search_algorithm(cfg, concurrency),
            scheduler=scheduler(cfg),
            num_samples=cfg.sweep.num_samples,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=ray.tune.RunConfig(
            name=TUNE_DIR,
            storage_path=str(root),
            failure_config=tune.FailureConfig(0),
            callbacks=tune_callbacks(cfg),
        ),
    )


def run_sweep(cfg: Config) -> dict:
    """Validate, prepare shared stages, run (or resume) the Tune experiment, write the results table,
    Pareto front and plot to the sweep dir; return the sweep manifest."""
    import ray

    from eqrlhf.ray_utils import init_ray
    from eqrlhf.tune.results import collect_trials, write_results

    validate_sweep(cfg)
    root = sweep_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    # Trials read the same relative paths as the driver (configs, bundled data): keep the driver's working
    # directory instead of Tune's per-trial one. Propagated to trial processes by Tune.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    init_ray()
    concurrency = max_concurrent(cfg, ray.cluster_resources())
    restore = check_resumable(cfg, root)
    write_json(root / SWEEP_CONFIG, {"sweep_hash": sweep_hash(cfg), **cfg.model_dump(mode="json")}, indent=1)
    shared = prepare_shared(untracked(cfg), root)
    print(f"[sweep] {cfg.sweep.name}: {cfg.sweep.num_samples} trial(s), up to {concurrency} at once -> {root}")
    started = time.time()
    grid = build_tuner(cfg, root, shared, concurrency, restore).fit()
    trials = collect_trials(grid, cfg)
    manifest = write_results(cfg, root, trials, seconds=time.time() - started, resumed=restore)
    print(manifest["summary"])
    return manifest
