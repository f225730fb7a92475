"""One sweep trial: mix -> pairs -> (score) -> train -> evaluate, through the same library functions as the
pipeline, in the trial's own run dir, reporting to Tune after every evaluation. When no swept key changes
the data (a threshold sweep), the sweep driver runs mix, pairs and score once and every trial trains on them.

With ``sweep.evaluations > 1`` the trial trains in chunks (``train.max_steps`` raised chunk by chunk,
``train.resume`` continuing the newest checkpoint) and evaluates after each, so a scheduler can stop a
trial that is already behind, before its remaining training is spent. A restarted trial (an interrupted
sweep resumed) skips every stage, chunk and evaluation already on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

from eqrlhf.config import Config, ConfigError

TRIALS_DIR = "trials"


def objective(metrics: dict, weights: dict[str, float]) -> float | None:
    """The scalar ASHA compares: sum of weight x metric (weights < 0 for metrics that should grow)."""
    total = 0.0
    for name, weight in weights.items():
        if not weight:
            continue
        if metrics.get(name) is None:
            return None
        total += weight * metrics[name]
    return total


def trial_metrics(summary: dict, cfg: Config, step: int, total_steps: int, planned: int) -> dict:
    """What the trial reports: the three objectives, the scalarised one, and the per-category refusal rates."""
    sweep = cfg.sweep
    metrics = {
        "harmful_compliance": summary.get("harmful_compliance"),
        "over_refusal": summary.get("over_refusal"),
        "helpfulness": summary.get(sweep.helpfulness),
        "likelihood_retention": summary.get("likelihood_retention"),
        "reward": summary.get("reward"),
        "step": step,
        "total_steps": total_steps,
        "planned_evaluations": planned,
    }
    missing = [m for m in sweep.objectives if metrics[m] is None]
    if missing:
        raise ConfigError(
            f"sweep trial {cfg.run.name}: objective(s) {missing} were not measured at step {step} "
            f"(sweep.helpfulness={sweep.helpfulness}); check eval.suites and eval.reward_model"
        )
    metrics["objective"] = objective(metrics, sweep.weights)
    metrics.update({k: v for k, v in summary.items() if k.startswith("refusal/")})
    return metrics


def trained_steps(cfg: Config) -> int:
    """Step of the newest complete checkpoint in the trial's train dir (0 when there is none)."""
    from eqrlhf.train.checkpoint import latest_checkpoint, read_trainer_state
    from eqrlhf.train.driver import train_dir

    latest = latest_checkpoint(train_dir(cfg) / "checkpoints")
    return read_trainer_state(latest)["step"] if latest else 0


def _with(cfg: Config, section: str, **fields) -> Config:
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=fields)})


def data_stages(cfg: Config) -> list[str]:
    from eqrlhf.data.score import scoring_needed

    return ["mix", "pairs"] + (["score"] if scoring_needed(cfg) else [])


def evaluate_checkpoint(cfg: Config, step: int) -> dict:
    """The evaluation after ``step`` steps, reusing one already written by an earlier attempt of this trial."""
    from eqrlhf.evaluate import evaluate_model
    from eqrlhf.pipeline_report import flat_summary
    from eqrlhf.restricted_config import restrict
    from eqrlhf.stages import STAGES
    from eqrlhf.train.checkpoint import checkpoint_dir_name
    from eqrlhf.train.driver import train_dir

    tag = checkpoint_dir_name(step)
    done = cfg.stage_dir(cfg.eval.output, "eval") / tag / "eval.json"
    if done.is_file():
        return flat_summary(json.loads(done.read_text()))
    checkpoint = train_dir(cfg) / "checkpoints" / tag
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"sweep trial {cfg.run.name}: no checkpoint {checkpoint} to evaluate")
    # what the pipeline's evaluate stage may read (eqrlhf.stages), as there
    restricted = restrict(cfg, STAGES["evaluate"].reads(cfg), "evaluate")
    return flat_summary(evaluate_model(restricted, str(checkpoint), tag))


def run_trial(params: dict, base: dict, sweep_dir: str, shared: dict) -> None:
    """Tune function trainable (called with the sampled ``params``; the rest bound by ``tune.with_parameters``)."""
    from ray import tune

    from eqrlhf.pipeline import run_pipeline
    from eqrlhf.restricted_config import restrict
    from eqrlhf.stages import STAGES
    from eqrlhf.train import prepare_train, run_train
    from eqrlhf.tune.space import eval_points, trial_config

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, params, Path(sweep_dir) / TRIALS_DIR / trial_id, shared)
    # no data stages when the sweep driver ran them once for every trial (still writes the trial's config.json)
    run_pipeline(_with(cfg, "run", stages=[] if "train.input" in shared else data_stages(cfg)))
    total = prepare_train(_with(cfg, "train", resume=False, resume_from=None))["total_steps"]
    points = eval_points(total, cfg.sweep.evaluations)
    for index, step in enumerate(points):
        if trained_steps(cfg) < step:
            # the first chunk starts fresh (a half-written first chunk is discarded); later ones resume
            chunk = _with(cfg, "train", max_steps=step, resume=index > 0 and trained_steps(cfg) > 0)
            run_train(restrict(chunk, STAGES["train"].reads(chunk), "train"))  # as the pipeline runs it
        summary = evaluate_checkpoint(cfg, step)
        tune.report(trial_metrics(summary, cfg, step, total, len(points)))
