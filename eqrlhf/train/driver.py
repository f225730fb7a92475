"""Driver-side pieces offline training (eqrlhf.train) and PPO (eqrlhf.train.ppo) share: the output layout,
which checkpoint a run resumes from, and how Ray Train places and configures its workers."""

from __future__ import annotations

import os
from pathlib import Path

from eqrlhf.config import Config, ConfigError
from eqrlhf.train.checkpoint import latest_checkpoint, read_trainer_state

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
FINAL = "final"
FORWARDED_ENV_PREFIXES = ("EQRLHF_", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def train_dir(cfg: Config) -> Path:
    return cfg.stage_dir(cfg.train.output, "train")


def resume_checkpoint(cfg: Config, out: Path) -> Path | None:
    if cfg.train.resume_from:
        path = cfg.resolve_path(cfg.train.resume_from).resolve()
        if path.is_relative_to(out.resolve()):
            raise ConfigError(
                f"train.resume_from={path} lies inside this run's own output {out}: "
                "use train.resume=true to continue its newest checkpoint, or set train.output elsewhere"
            )
        read_trainer_state(path)  # raises with a clear message when it is not a complete checkpoint
        return path
    if cfg.train.resume:
        latest = latest_checkpoint(out / CHECKPOINTS)
        if latest is None:
            raise ConfigError(f"train.resume=true but there is no complete checkpoint under {out / CHECKPOINTS}")
        return latest
    return None


def worker_env() -> dict:
    # cache locations, offline switches and test hooks must reach the worker processes
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def scaling_config(train):
    """Ray Train workers: ``train.cpus_per_worker`` CPUs each and, with ``use_gpu``, ``gpus_per_worker`` GPUs."""
    from ray.train import ScalingConfig

    resources = {"CPU": train.cpus_per_worker, **({"GPU": train.gpus_per_worker} if train.use_gpu else {})}
    return ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker=resources)


def link_final(out: Path, checkpoint: str | None) -> str | None:
    """``<train dir>/final``: a stable path to the newest checkpoint, for configs of later stages."""
    if checkpoint is None:
        return None
    final = out / FINAL
    if final.is_symlink():
        final.unlink()
    final.symlink_to(os.path.relpath(checkpoint, out))
    return str(final)
