"""Driver-side pieces offline training (eqrlhf.train) and PPO (eqrlhf.train.ppo) share: the output layout,
which checkpoint a run resumes from, and how Ray Train places and configures its workers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from eqrlhf.algorithms.catalog import loss_info
from eqrlhf.config import Config, ConfigError
from eqrlhf.tracking import check_tracking
from eqrlhf.train.checkpoint import newest_verified, read_trainer_state, verify_checkpoint

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
FINAL = "final"
FORWARDED_ENV_PREFIXES = ("EQRLHF_", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def train_dir(cfg: Config) -> Path:
    return cfg.stage_dir(cfg.train.output, "train")


def check_settings(cfg: Config) -> None:
    """The training settings that need no data (the loss name itself is checked when the config loads)."""
    loss = cfg.algorithm.loss
    if loss_info(loss).kind == "scalar" and cfg.train.lora.r > 0:
        raise ConfigError(f"train.lora.r={cfg.train.lora.r}: LoRA is supported for causal-LM losses, not '{loss}'")
    if cfg.train.compile and cfg.train.zero_stage == 3:
        # ZeRO-3 gathers each layer's weights in module hooks, which would split every compiled graph
        raise ConfigError("train.compile=true needs train.zero_stage 0, 1 or 2 (ZeRO-3 is not supported)")
    check_tracking(cfg)


def resume_checkpoint(cfg: Config, out: Path) -> Path | None:
    """The checkpoint ``train.resume_from`` / ``train.resume`` continues from, verified against its manifest
    (a skipped newer checkpoint is printed with the reason); None for a fresh start."""
    if cfg.train.resume_from:
        path = cfg.resolve_path(cfg.train.resume_from).resolve()
        if path.is_relative_to(out.resolve()):
            raise ConfigError(
                f"train.resume_from={path} lies inside this run's own output {out}: "
                "use train.resume=true to continue its newest checkpoint, or set train.output elsewhere"
            )
        read_trainer_state(path)  # raises with a clear message when it is not a complete checkpoint
        reason = verify_checkpoint(path)
        if reason:
            raise ConfigError(f"train.resume_from={path} cannot be trusted: {reason}; resume from another checkpoint")
        return path
    if cfg.train.resume:
        latest, skipped = newest_verified(out / CHECKPOINTS)
        for line in skipped:
            print(f"[train] {line}")
        if latest is None:
            why = f" ({'; '.join(skipped)})" if skipped else ""
            raise ConfigError(f"train.resume=true but no checkpoint under {out / CHECKPOINTS} verifies{why}")
        return latest
    return None


def worker_env() -> dict:
    # cache locations, offline switches and test hooks must reach the worker processes
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    # Ray Train replaces print() in its workers with a call to its logger, which writes the line to the worker's
    # output, and also prints it there itself when sys.stdout is not the original stream: each line reached
    # the driver twice, the progress bar's states included (a closed bar drawn again). Unpatched, print()
    # writes once to the worker's output, which Ray keeps in logs/worker-*.out and streams to the driver.
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    return env


def scaling_config(train):
    """Ray Train workers: ``train.cpus_per_worker`` CPUs each and, with ``use_gpu``, ``gpus_per_worker`` GPUs."""
    from ray.train import ScalingConfig

    resources = {"CPU": train.cpus_per_worker, **({"GPU": train.gpus_per_worker} if train.use_gpu else {})}
    return ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker=resources)


def finish_manifest(out: Path, manifest: dict, record) -> dict:
    """The ``final`` link, its model card (config, data mixture and licence; the pipeline adds the evaluation)
    and ``<train dir>/manifest.json``: the end of a DPO-family and a PPO run alike."""
    from eqrlhf.model_card import write_model_card

    manifest["final"] = link_final(out, manifest["final_checkpoint"])
    if manifest["final"]:
        manifest["model_card"] = str(write_model_card(manifest["final"], record, train_manifest=manifest))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def link_final(out: Path, checkpoint: str | None) -> str | None:
    """``<train dir>/final``: a stable path to the newest checkpoint, for configs of later stages."""
    if checkpoint is None:
        return None
    final = out / FINAL
    if final.is_symlink():
        final.unlink()
    final.symlink_to(os.path.relpath(checkpoint, out))
    return str(final)
