"""Sections of a run as a whole: its name and stages, the pipeline's extra stages, sweeps, tracking."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from eqrlhf.config.base import Section
from eqrlhf.config.training import TrainSection

# the pipeline's stages, in order (declared in eqrlhf.stages)
StageName = Literal["categorize", "mix", "pairs", "warm_start", "on_policy", "reward", "score", "train", "evaluate"]


class RunSection(Section):
    name: str = Field("run", min_length=1)
    output_dir: str = "runs"
    seed: int = 0
    # stages `eqrlhf pipeline` runs, in pipeline order; None = every stage that applies to the config
    stages: list[StageName] | None = None

    @property
    def dir(self) -> Path:
        return Path(self.output_dir) / self.name


class SweepParam(Section):
    """One searched config key. ``int``/``float`` sample from [low, high] (``log`` for log-uniform);
    ``choice`` picks from ``values`` (with ``sweep.search: grid`` every value is run)."""

    type: Literal["int", "float", "choice"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    values: list[Any] | None = None


class SweepSection(Section):
    """`eqrlhf sweep`: Ray Tune over data mixture, scale and AMA settings; each trial runs
    mix -> pairs -> (reward) -> (score) -> train -> evaluate with its own run dir."""

    name: str = "sweep"
    output: str | None = None  # default: <run>/sweep/<sweep.name>
    space: dict[str, SweepParam] = Field(default_factory=dict)  # dotted config key -> what to sample
    search: Literal["optuna", "random", "grid"] = "optuna"
    num_samples: int = Field(8, ge=1)  # trials (grid: repeats of the whole grid)
    # objectives of the multi-objective search (and the Pareto front); direction fixed per metric
    objectives: list[Literal["harmful_compliance", "over_refusal", "helpfulness"]] = Field(
        default_factory=lambda: ["harmful_compliance", "over_refusal", "helpfulness"]
    )
    helpfulness: Literal["likelihood_retention", "reward"] = "likelihood_retention"  # reward needs eval.reward_model
    # evaluations per trial, evenly spaced over its training (1 = only at the end). With more than one, ASHA
    # stops trials early on ``objective`` = sum(weights[m] * metric m) compared at the same fraction of training
    evaluations: int = Field(1, ge=1)
    scheduler: Literal["asha", "none"] = "asha"
    weights: dict[str, float] = Field(
        default_factory=lambda: {"harmful_compliance": 1.0, "over_refusal": 1.0, "helpfulness": -1.0}
    )
    grace_period: int = Field(1, ge=1)  # evaluations before ASHA may stop a trial
    reduction_factor: int = Field(2, ge=2)
    # resources of one trial at its peak (Ray Train workers + the trial's own evaluation process);
    # None = derived from train.* and generation.num_gpus. Concurrency = what the cluster holds.
    cpus_per_trial: float | None = Field(None, gt=0)
    gpus_per_trial: float | None = Field(None, ge=0)
    max_concurrent_trials: int | None = Field(None, ge=1)
    resume: bool = True  # continue an interrupted sweep found in the output dir
    seed: int | None = None  # sampler seed; None = run.seed


class PipelineSection(Section):
    """Extra stages of `eqrlhf pipeline`."""

    # the reward stage trains a Bradley-Terry reward model on the pairs with these settings (loss: reward);
    # it runs when AMA scores come from a reward model (ama.scorer: reward_prefix) and ama.scorer_model is unset
    reward_train: TrainSection = Field(default_factory=TrainSection)
    # a warm start: supervised fine-tuning on the pairs' chosen answers with these settings (loss: sft), after
    # the pairs stage; the score and train stages then start from <run>/warm_start/final (it is also DPO's
    # reference), while the evaluate stage's "before" stays model.name_or_path. None: no warm start.
    warm_start: TrainSection | None = None
    evaluate_base: bool = True  # evaluate model.name_or_path too: the "before" of the summary


class TrackingSection(Section):
    """Experiment tracking (eqrlhf.tracking). The trainer writes TensorBoard logs to <train dir>/tb whatever the
    backend (``tensorboard`` is just those); ``mlflow`` and ``wandb`` need ``pip install 'eqrlhf[tracking]'``."""

    backend: Literal["none", "tensorboard", "mlflow", "wandb"] = "none"
    # None: sqlite:///<run>/mlflow.db, artifacts in <run>/mlartifacts (no server; MLflow's file store is deprecated)
    mlflow_uri: str | None = None
    experiment: str | None = None  # MLflow experiment, W&B group; None = run.name (a sweep: <run.name>-<sweep.name>)
    wandb_project: str = "eqrlhf"
    wandb_mode: Literal["offline", "online"] = "offline"  # offline needs no account; `wandb sync` uploads later
