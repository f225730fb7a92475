"""Experiment tracking through Ray's MLflow and W&B integrations (``tracking.backend``).

- ``none`` and ``tensorboard``: nothing beyond what the trainer always writes (``<train dir>/metrics.jsonl`` and
  TensorBoard logs in ``<train dir>/tb``); ``tensorboard`` only names that choice.
- ``mlflow``: a local store, no server (default ``sqlite:///<run>/mlflow.db``, artifacts in ``<run>/mlartifacts``:
  MLflow 3 refuses its old file store). One pipeline run is one parent run (config as params, each stage's
  manifest counts as metrics and files, the evaluation summary with its intervals, the plots and reports as
  artifacts); each training stage (warm start, reward model, train) is a child run, named after its output
  folder and linked by MLflow's ``mlflow.parentRunId`` tag, so the UI shows it nested under the pipeline run.
  Nesting by tag needs nothing from the worker but the parent's id, which travels in the training plan.
- ``wandb``: the same through W&B, offline unless ``tracking.wandb_mode=online``; training runs share the
  pipeline run's group. No API key is read or needed offline.

Training runs are opened on Ray Train rank 0 with ``setup_mlflow`` / ``setup_wandb`` (Ray Train V2's
``RunConfig`` takes no logger callbacks); a Tune sweep logs each trial as one run through
``MLflowLoggerCallback`` / ``WandbLoggerCallback``. A missing package is a ConfigError before Ray starts;
any later tracking failure prints a warning and training goes on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

from eqrlhf.config import Config, ConfigError

EXTRA = "pip install 'eqrlhf[tracking]'"
PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}  # backend -> module it imports
PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests child runs by
NOT_IN_NAMES = re.compile(r"[^\w\-. :/]")  # MLflow metric names allow letters, digits, _ - . space : /
PARENT_ENV = "EQRLHF_TRACKING_PARENT_RUN"  # the open pipeline run, read by training_plan in this process


def enabled(cfg: Config) -> bool:
    return cfg.tracking.backend in PACKAGES


def check_tracking(cfg: Config) -> None:
    """Before Ray starts: the backend's package must be importable."""
    backend = cfg.tracking.backend
    if backend in PACKAGES and importlib.util.find_spec(PACKAGES[backend]) is None:
        raise ConfigError(
            f"tracking.backend={backend} needs the '{PACKAGES[backend]}' package, which is not installed: {EXTRA}",
            field="tracking.backend",
        )


def warn(what: str, err: BaseException) -> None:
    warnings.warn(f"[tracking] {what} failed, training goes on without it: {type(err).__name__}: {err}", stacklevel=2)


def untracked(cfg: Config) -> Config:
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"backend": "none"})})


# ---- where runs go ----------------------------------------------------------------------------------------


def mlflow_uri(cfg: Config) -> str:
    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri
    return f"sqlite:///{(cfg.run.dir / 'mlflow.db').resolve()}"


def experiment_name(cfg: Config) -> str:
    return cfg.tracking.experiment or cfg.run.name


def ensure_experiment(cfg: Config, name: str | None = None) -> str:
    """Create the MLflow experiment (with the local artifact folder when the store is the default one) before
    any worker or callback looks it up by name; returns its id."""
    from mlflow.tracking import MlflowClient

    name = name or experiment_name(cfg)
    cfg.run.dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(mlflow_uri(cfg))
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # left to MLflow, artifacts of a local store would land in ./mlruns of whatever the working directory is
    artifacts = None if cfg.tracking.mlflow_uri else (cfg.run.dir / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"train.lr": "5e-06", ...}``; lists as JSON, cut to MLflow's 6000-character limit."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = (value if isinstance(value, str) else json.dumps(value))[:6000]
    return out


def wandb_settings(cfg: Config) -> dict:
    """``wandb.init`` arguments shared by every W&B run of this config (absolute paths: workers run elsewhere)."""
    # setup_wandb and WandbLoggerCallback skip their API-key lookup only when the environment says offline
    os.environ["WANDB_MODE"] = cfg.tracking.wandb_mode
    cfg.run.dir.mkdir(parents=True, exist_ok=True)
    return {
        "project": cfg.tracking.wandb_project,
        "group": experiment_name(cfg),
        "dir": str(cfg.run.dir.resolve()),
        "mode": cfg.tracking.wandb_mode,
    }


# ---- training runs, on Ray Train rank 0 -------------------------------------------------------------------


def training_plan(cfg: Config, train_dir: Path, record: dict) -> dict | None:
    """What rank 0 needs to open its run (JSON, in the training plan); None when tracking is off or fails here.
    ``record`` is the dump of the whole run's config the trainer writes to ``train_config.json``
    (``whole_config_for_records``: a stage's restricted copy refuses dumps), logged as the run's params."""
    if not enabled(cfg):
        return None
    plan = {"backend": cfg.tracking.backend, "run_name": Path(train_dir).name, "params": flatten(record)}
    try:
        if cfg.tracking.backend == "mlflow":
            ensure_experiment(cfg)
            plan.update(uri=mlflow_uri(cfg), experiment=experiment_name(cfg), parent=os.environ.get(PARENT_ENV))
        else:
            plan["wandb"] = wandb_settings(cfg)
    except Exception as err:  # noqa: BLE001 - tracking must never stop training
        warn("opening the experiment", err)
        return None
    return plan


class TrainingRun:
    """Rank 0's run: per-step metrics as they are written to metrics.jsonl; every call swallows its failures."""

    def __init__(self, plan: dict | None):
        self.backend, self.run = None, None
        if not plan:
            return
        try:
            if plan["backend"] == "mlflow":
                from ray.air.integrations.mlflow import setup_mlflow

                tags = {PARENT_TAG: plan["parent"]} if plan.get("parent") else None
                # the params go in one batch below: setup_mlflow would log them one request each
                self.run = setup_mlflow(
                    None,
                    tracking_uri=plan["uri"],
                    experiment_name=plan["experiment"],
                    run_name=plan["run_name"],
                    tags=tags,
                )
                self.run.log_params(plan["params"])
            else:
                from ray.air.integrations.wandb import setup_wandb

                os.environ["WANDB_MODE"] = plan["wandb"]["mode"]
                self.run = setup_wandb(plan["params"], name=plan["run_name"], job_type="train", **plan["wandb"])
            self.backend = plan["backend"]
        except Exception as err:  # noqa: BLE001
            warn("starting the training run", err)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.run is None:
            return
        try:
            if self.backend == "mlflow":
                self.run.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
            else:
                self.run.log(dict(metrics), step=step)
        except Exception as err:  # noqa: BLE001
            warn(f"logging step {step}", err)
            self.run = None

    def close(self) -> None:
        if self.run is None:
            return
        try:
            if self.backend == "mlflow":
                self.run.end_run()
            else:
                self.run.finish()
                _flush_wandb()
        except Exception as err:  # noqa: BLE001
            warn("closing the training run", err)


# ---- the pipeline's parent run, on the driver -------------------------------------------------------------


def _numbers(tree: dict, prefix: str) -> dict[str, float]:
    """Every number in a manifest block, flattened: ``categorize/per_category/EHD`` -> 80."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{NOT_IN_NAMES.sub('_', str(key))}"  # a filter reason may hold any character
        if isinstance(value, dict):
            out.update(_numbers(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def stage_metrics(name: str, manifest: dict) -> dict[str, float]:
    """A stage manifest's counts: rows read and written, per category and source, filtered and failed reasons."""
    keys = ("rows_read", "rows_written", "per_category", "per_source", "filtered", "failed", "seconds", "steps_run")
    return _numbers({k: manifest[k] for k in keys if k in manifest}, name)


def evaluation_metrics(evaluate: dict) -> dict[str, float]:
    """Each evaluated model's headline numbers with their 95% interval: ``eval/trained/harmful_compliance``,
    ``..._ci_low``, ``..._ci_high``, ``..._n``."""
    out = {}
    for tag, entry in evaluate.items():
        if not isinstance(entry, dict) or "eval_json" not in entry:
            continue
        headline = json.loads(Path(entry["eval_json"]).read_text()).get("headline", {})
        for metric, stat in headline.items():
            value = stat.get("rate", stat.get("mean")) if isinstance(stat, dict) else None
            if value is None:
                continue
            name = f"eval/{tag}/{metric}"
            out[name] = float(value)
            if stat.get("ci95"):
                out[name + "_ci_low"], out[name + "_ci_high"] = map(float, stat["ci95"])
            out[name + "_n"] = float(stat.get("n", 0))
    return out


def evaluation_files(evaluate: dict) -> list[tuple[Path, str]]:
    """(file, artifact folder) for each evaluated model's eval.json, report.md and PNG plots."""
    files = []
    for tag, entry in evaluate.items():
        if isinstance(entry, dict) and "eval_json" in entry:
            folder = Path(entry["eval_json"]).parent
            files += [(p, f"eval/{tag}") for p in [folder / "eval.json", folder / "report.md", *folder.glob("*.png")]]
    return [(p, where) for p, where in files if p.is_file()]


class PipelineRun:
    """The parent run of one ``eqrlhf pipeline``; a no-op when tracking is off, a warning when it fails."""

    def __init__(self, cfg: Config):
        self.cfg, self.backend, self.client, self.run_id, self.wandb = cfg, None, None, None, None
        if not enabled(cfg):
            return
        try:
            params = flatten(cfg.model_dump(mode="json"))
            if cfg.tracking.backend == "mlflow":
                from mlflow.tracking import MlflowClient

                self.client = MlflowClient(mlflow_uri(cfg))
                run = self.client.create_run(
                    ensure_experiment(cfg), run_name=cfg.run.name, tags={"eqrlhf.kind": "pipeline"}
                )
                self.run_id = run.info.run_id
                self.client.log_batch(self.run_id, params=_params(params))
                os.environ[PARENT_ENV] = self.run_id  # training stages started from here nest under it
            else:
                import wandb

                self.wandb = wandb.init(config=params, name=cfg.run.name, job_type="pipeline", **wandb_settings(cfg))
            self.backend = cfg.tracking.backend
        except Exception as err:  # noqa: BLE001
            warn("starting the pipeline run", err)

    def metrics(self, values: dict[str, float]) -> None:
        if not values or self.backend is None:
            return
        try:
            if self.backend == "mlflow":
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                batch = [Metric(k, v, now, 0) for k, v in values.items()]
                for i in range(0, len(batch), 1000):  # MLflow's batch limit
                    self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])
            else:
                self.wandb.summary.update(values)
        except Exception as err:  # noqa: BLE001
            warn("logging metrics", err)

    def files(self, files: list[tuple[Path, str]]) -> None:
        if self.backend is None:
            return
        for path, folder in files:
            try:
                if self.backend == "mlflow":
                    self.client.log_artifact(self.run_id, str(path), folder)
                else:
                    # a copy at <folder>/<name> of the run's files, the layout MLflow's artifacts have: a link
                    # (what wandb.save makes of an outside file) would show a rerun's file once synced
                    copy = Path(self.wandb.dir) / folder / Path(path).name
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, copy)
                    self.wandb.save(str(copy), base_path=self.wandb.dir, policy="now")
            except Exception as err:  # noqa: BLE001
                warn(f"saving {path}", err)

    def stage(self, name: str, manifest: dict, output: Path) -> None:
        self.metrics(stage_metrics(name, manifest))
        self.files([(output / "manifest.json", "manifests/" + name)] if (output / "manifest.json").is_file() else [])

    def finish(self, report: dict | None) -> None:
        """Log the evaluation and the reports, then close the run (failed when ``report`` is None)."""
        if self.backend is None:
            return
        os.environ.pop(PARENT_ENV, None)
        if report and "evaluate" in report:
            try:
                self.metrics(evaluation_metrics(report["evaluate"]))
                files = evaluation_files(report["evaluate"])
                self.files(files + ([(Path(report["report"]), "")] if report.get("report") else []))
            except Exception as err:  # noqa: BLE001
                warn("logging the evaluation", err)
        try:
            if self.backend == "mlflow":
                self.client.set_terminated(self.run_id, "FINISHED" if report is not None else "FAILED")
            else:
                self.wandb.finish(exit_code=0 if report is not None else 1)
                _flush_wandb()
        except Exception as err:  # noqa: BLE001
            warn("closing the pipeline run", err)


def _flush_wandb() -> None:
    """Wait until W&B's service has written every record of the finished run to disk. ``finish()`` returns once
    the exit record is handled but only *tells* the service to close the run's stream; the last records reach
    the run's ``.wandb`` file when the stream closes. A Ray worker may be killed before that and the driver's
    caller may read the file at once (seen under load: a run without its exit record), so shut the service down
    now and wait for it; the next run starts a new one."""
    import wandb

    wandb.teardown()


def _params(params: dict[str, str]):
    from mlflow.entities import Param

    return [Param(k, v) for k, v in params.items()]


# ---- Tune sweeps -------------------------------------------------------------------------------------------


def sweep_experiment(cfg: Config) -> str:
    return cfg.tracking.experiment or f"{cfg.run.name}-{cfg.sweep.name}"


def tune_callbacks(cfg: Config) -> list:
    """Tune logger callbacks: each trial one run (its sampled params, the metrics it reports) in one experiment."""
    if not enabled(cfg):
        return []
    try:
        if cfg.tracking.backend == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            ensure_experiment(cfg, sweep_experiment(cfg))
            tags = {"eqrlhf.kind": "sweep_trial", "eqrlhf.sweep": cfg.sweep.name}
            return [MLflowLoggerCallback(mlflow_uri(cfg), experiment_name=sweep_experiment(cfg), tags=tags)]
        from ray.air.integrations.wandb import WandbLoggerCallback

        settings = {**wandb_settings(cfg), "group": sweep_experiment(cfg)}
        return [WandbLoggerCallback(log_config=True, **settings)]
    except Exception as err:  # noqa: BLE001
        warn("setting up the sweep's tracking", err)
        return []
