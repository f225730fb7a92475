"""Offline training (SFT, the DPO family with or without AMA, BFPO, reward and cost models) on Ray Train.

``run_train(cfg)`` checks everything it can before Ray starts (input stage, columns and rows, loss name,
AMA scores, the checkpoint to resume), then fits a ``TorchTrainer`` whose workers run DeepSpeed
(:mod:`eqrlhf.train.loop`), and writes ``<run>/train/manifest.json``.

Output layout (``train.output``, default ``<run>/train``): ``metrics.jsonl``, ``tb/`` (TensorBoard),
``checkpoints/step_N/`` (see :mod:`eqrlhf.train.checkpoint`; Ray Train's run snapshot lives there too),
``final`` (a relative symlink to the newest checkpoint: a stable path for later stages' configs),
``train_config.json`` and ``manifest.json``. Multi-node runs need this directory on shared storage. A fresh run
writes it as ``<output>.tmp-<pid>`` beside the previous one and renames it into place when training finished
(``eqrlhf.train.driver.train_output``), so a failed or interrupted run leaves the previous output as it was.
"""

from __future__ import annotations

import time
from pathlib import Path

from eqrlhf.algorithms.catalog import ama_on, loss_info
from eqrlhf.atomic import write_json
from eqrlhf.config import Config, ConfigError
from eqrlhf.data.score import training_input_dir
from eqrlhf.errors import tried
from eqrlhf.restricted_config import whole_config_for_records
from eqrlhf.tracking import training_plan
from eqrlhf.train.batching import (
    TrainInputError,
    check_input_table,
    input_columns,
    required_columns,
    steps_per_epoch,
)
from eqrlhf.train.checkpoint import list_checkpoints, read_trainer_state
from eqrlhf.train.deepspeed_config import global_batch_pairs
from eqrlhf.train.driver import (
    CHECKPOINTS,
    check_settings,
    check_worker_resources,
    finish_manifest,
    fit_interruptibly,
    read_placement,
    resume_checkpoint,
    scaling_config,
    train_dir,
    train_output,
    with_absolute_model_path,
    worker_env,
)
from eqrlhf.train.metrics import METRICS_FILE, TB_DIR, read_metrics

__all__ = ["ConfigError", "TrainInputError", "prepare_train", "run_train"]


def prepare_train(cfg: Config) -> dict:
    """Validate config and inputs without Ray; return the plan every worker receives (plain JSON data; the
    trainer adds its ``tracking`` entry once it has dumped the config)."""
    from eqrlhf.models.loading import resolve_model

    check_settings(cfg)
    loss = cfg.algorithm.loss
    ama = ama_on(cfg)
    precomputed = loss_info(loss).uses_reference and cfg.algorithm.reference == "precomputed"
    input_dir = training_input_dir(cfg)
    if not input_dir.exists():
        raise TrainInputError(
            f"training input {tried(input_dir)} does not exist: set train.input, or run the pairs stage "
            "(and the score stage for AMA losses or algorithm.reference=precomputed) first"
        )
    rows = check_input_table(input_dir, loss, ama, precomputed)
    # also converts the bundled model once, before the workers race to
    resolve_model("model.name_or_path", cfg.model.name_or_path)
    global_batch = global_batch_pairs(cfg.train, cfg.train.num_workers)
    per_epoch = steps_per_epoch(rows, global_batch)
    if per_epoch == 0:
        raise TrainInputError(
            f"training input {input_dir} has {rows} rows, fewer than one global batch of {global_batch} "
            "(train.micro_batch_size x train.grad_accum x train.num_workers)"
        )
    total = cfg.train.max_steps or cfg.train.epochs * per_epoch
    out = train_dir(cfg)
    resume_from = resume_checkpoint(cfg, out)
    start = 0
    if resume_from is not None:
        state = read_trainer_state(resume_from)
        start = state["step"]
        if state["global_batch"] != global_batch:
            raise ConfigError(
                f"checkpoint {resume_from} was trained with a global batch of {state['global_batch']} pairs; "
                f"this config gives {global_batch}, so the data position would not carry over"
            )
        if start >= total:
            raise ConfigError(f"checkpoint {resume_from} is at step {start}, already at the total of {total} steps")
    available = input_columns(input_dir)
    extra = [c for c in ("truncated", "prompt_ids", "chosen_ids", "rejected_ids") if c in available]
    return {
        "input_dir": str(input_dir.resolve()),
        "columns": list(dict.fromkeys(required_columns(loss, ama, precomputed) + extra)),
        "rows": rows,
        "train_dir": str(out.resolve()),
        "global_batch": global_batch,
        "steps_per_epoch": per_epoch,
        "unused_rows_per_epoch": rows % global_batch,
        "total_steps": total,
        "start_step": start,
        "resume_from": str(resume_from) if resume_from else None,
        "config_hash": cfg.hash(),
    }


def build_trainer(cfg: Config, plan: dict):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from eqrlhf.train.loop import train_loop_per_worker

    train = cfg.train
    check_worker_resources(train)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "plan": plan},
        scaling_config=scaling_config(train),
        run_config=RunConfig(
            name=CHECKPOINTS,  # checkpoints land in <train dir>/checkpoints/step_N
            storage_path=plan["train_dir"],
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env()},
        ),
    )


def _median(values: list[float]) -> float | None:
    return round(sorted(values)[len(values) // 2], 4) if values else None


def summary_text(manifest: dict) -> str:
    final = manifest["final_metrics"]
    keys = ("loss", "rewards/accuracy", "rewards/margin", "accuracy", "ama/kept_fraction", "ama/fallback_fraction")
    shown = "  ".join(f"{k}={final[k]:.4f}" for k in keys if k in final)
    return "\n".join(
        [
            f"train [{manifest['loss']}] {manifest['steps_run']} steps ({manifest['start_step']} -> "
            f"{manifest['total_steps']}) in {manifest['seconds']:.1f}s, {manifest['seconds_per_step']:.2f}s/step with start-up "
            f"(median step {manifest['step_seconds_median']}s), "
            f"{manifest['num_workers']} worker(s), ZeRO-{manifest['zero_stage']}",
            f"  data: {manifest['rows']} rows from {manifest['input_dir']}, global batch {manifest['global_batch']}, "
            f"{manifest['unused_rows_per_epoch']} rows unused per epoch",
            f"  final: {shown}",
            f"  checkpoint: {manifest['final_checkpoint']}",
            f"  metrics: {manifest['metrics_file']} (TensorBoard: {manifest['tensorboard']})",
        ]
    )


def run_train(cfg: Config) -> dict:
    """Validate, train on Ray Train + DeepSpeed, write and return ``<run>/train/manifest.json``."""

    if loss_info(cfg.algorithm.loss).kind == "online":  # online RL: rollouts from the engine pool (eqrlhf.train.ppo)
        from eqrlhf.train.ppo import run_ppo

        return run_ppo(cfg)
    cfg = with_absolute_model_path(cfg)
    plan = prepare_train(cfg)
    out = Path(plan["train_dir"])
    # written beside the previous output and swapped in at the end (see train_output); paths in the
    # manifest name where the files will be
    with train_output(cfg, out) as target:
        plan["train_dir"] = str(target.path)
        manifest = _train(cfg, plan, out, target)
        target.commit()
    print(summary_text(manifest), flush=True)
    return manifest


def _train(cfg: Config, plan: dict, out: Path, target) -> dict:
    """Fit in ``target.path`` and write the manifest there (its paths name ``out``, where it will be)."""
    work = target.path
    record = whole_config_for_records(cfg)  # the whole run's config, also where the stage holds part of it
    dump = record.model_dump(mode="json")  # one dump: train_config.json and the tracked run's params
    write_json(work / "train_config.json", dump)
    plan["tracking"] = training_plan(cfg, out, dump)  # MLflow / W&B run of rank 0; None when off

    from eqrlhf.ray_utils import init_ray

    init_ray()
    started = time.time()
    result = fit_interruptibly(build_trainer(cfg, plan))
    seconds = time.time() - started
    history = read_metrics(work / METRICS_FILE)
    checkpoints = [target.final_path(p) for p in list_checkpoints(work / CHECKPOINTS)]
    steps_run = plan["total_steps"] - plan["start_step"]
    manifest = {
        "stage": "train",
        "config_hash": plan["config_hash"],
        "loss": cfg.algorithm.loss,
        "input_dir": plan["input_dir"],
        "rows": plan["rows"],
        "global_batch": plan["global_batch"],
        "steps_per_epoch": plan["steps_per_epoch"],
        "unused_rows_per_epoch": plan["unused_rows_per_epoch"],
        "num_workers": cfg.train.num_workers,
        "zero_stage": cfg.train.zero_stage,
        "placement": {"trainer_nodes": read_placement(work)},  # Ray node id of each rank
        "start_step": plan["start_step"],
        "total_steps": plan["total_steps"],
        "steps_run": steps_run,
        "seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / max(steps_run, 1), 3),  # with start-up
        "step_seconds_median": _median([row["time/step_s"] for row in history[-steps_run:]]),
        "final_metrics": history[-1] if history else dict(result.metrics or {}),
        "checkpoints": checkpoints,
        "final_checkpoint": target.final_path(result.checkpoint.path) if result.checkpoint else None,
        "metrics_file": str(out / METRICS_FILE),
        "tensorboard": str(out / TB_DIR),
    }
    return finish_manifest(manifest, result, record, target)
