"""Driver-side pieces offline training (eqrlhf.train) and PPO (eqrlhf.train.ppo) share: the output layout,
which checkpoint a run resumes from, and how Ray Train places and configures its workers."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from pathlib import Path

from eqrlhf.algorithms.catalog import loss_info
from eqrlhf.atomic import InPlaceDir, StagedDir, write_json
from eqrlhf.config import Config, ConfigError
from eqrlhf.tracking import check_tracking
from eqrlhf.train.checkpoint import newest_verified, read_trainer_state, verify_checkpoint

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
FINAL = "final"
FORWARDED_ENV_PREFIXES = ("EQRLHF_", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def train_dir(cfg: Config) -> Path:
    return cfg.stage_dir(cfg.train.output, "train")


def with_absolute_model_path(cfg: Config) -> Config:
    """``cfg`` with a local model directory made absolute: Ray Train workers run in another directory, where a
    relative path would be taken for a hub id. A copy, not an edit: the caller writes the stage's fingerprint
    from its own config afterwards."""
    if not Path(cfg.model.name_or_path).is_dir():
        return cfg
    model = cfg.model.model_copy(update={"name_or_path": str(Path(cfg.model.name_or_path).resolve())})
    return cfg.model_copy(update={"model": model})


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
    env.setdefault("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR") or torch_extensions_dir())
    return env


def worker_resources(train) -> dict[str, float]:
    """What one Ray Train worker asks for: ``train.cpus_per_worker`` CPUs, with ``use_gpu`` ``gpus_per_worker``
    GPUs, and the node labels in ``train.resources_per_worker``."""
    gpus = {"GPU": train.gpus_per_worker} if train.use_gpu else {}
    return {"CPU": train.cpus_per_worker, **gpus, **train.resources_per_worker}


def torch_extensions_dir() -> str:
    """Where the workers' DeepSpeed builds its C++ ops (the CPU shared-memory collective on every run), one
    folder per Python environment. torch's default, ``~/.cache/torch_extensions/py311_cpu``, is shared by every
    environment of the user: each one's headers make a different build, so a run from another environment (a
    second clone, CI's fresh one) rebuilt the op there, 30-55 s on 2 cores and longer under load, and every
    other run's worker waited on that build's lock file (torch waits on it without a limit) before it could
    train. On the 2-core development machine deepspeed_shm_comm was built 26 times in 10 hours, alternating
    between 7 different build commands (its .ninja_log). ``TORCH_EXTENSIONS_DIR`` set by the user wins."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    prefix = os.path.realpath(sys.prefix)
    tag = hashlib.sha256(prefix.encode()).hexdigest()[:12]
    return os.path.join(cache, "torch_extensions", f"eqrlhf-{os.path.basename(prefix)}-{tag}")


def scaling_config(train):
    from ray.train import ScalingConfig

    resources = worker_resources(train)
    return ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker=resources)


def check_worker_resources(train) -> None:
    """Fail now when the connected cluster has fewer of a label than the workers need: Ray Train would wait
    for them forever (a misspelt label, or trainer nodes that never joined)."""
    import ray

    total = ray.cluster_resources()
    for name, need in train.resources_per_worker.items():
        if need * train.num_workers > total.get(name, 0):
            raise ConfigError(
                f"train.num_workers={train.num_workers} x {need} {name} exceeds the cluster's {total.get(name, 0)} "
                f"{name} (train.resources_per_worker; nodes: {', '.join(sorted(total)) or 'none'})"
            )


PLACEMENT = "placement.json"


def record_placement(worker) -> None:
    """Rank 0 writes ``<train dir>/placement.json``: the Ray node id of every rank, gathered over the training
    process group (one small collective at start-up). The manifest repeats it: which nodes a run used is what
    a multi-node failure report needs first."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    nodes = [None] * worker.world
    if dist.is_available() and dist.is_initialized() and worker.world > 1:
        dist.all_gather_object(nodes, node)
    else:
        nodes = [node]
    if worker.rank == 0:
        Path(worker.plan["train_dir"], PLACEMENT).write_text(json.dumps({"trainer_nodes": nodes}, indent=2))


def read_placement(out: Path) -> list[str] | None:
    """The node id of each rank of the last start of the run in ``out`` (None when it was not recorded)."""
    path = Path(out) / PLACEMENT
    return json.loads(path.read_text())["trainer_nodes"] if path.is_file() else None


def link_final(out: Path, checkpoint: str | None) -> str | None:
    """``<train dir>/final``: a stable path to the newest checkpoint, for configs of later stages."""
    if checkpoint is None:
        return None
    final = out / FINAL
    if final.is_symlink():
        final.unlink()
    final.symlink_to(os.path.relpath(checkpoint, out))
    return str(final)


def train_output(cfg: Config, out: Path) -> StagedDir:
    """Where a training run writes. A fresh run writes beside ``out`` (``<out>.tmp-<pid>``) and is swapped in
    when it finishes, so the previous output stays until then; a failed run is kept as ``<out>.failed``, an
    interrupted one as ``<out>.interrupted`` (``train.resume_from`` can continue one of its checkpoints). A run
    continuing its own checkpoints (``train.resume`` without ``resume_from``) writes in ``out`` itself. A fresh
    folder also keeps a stale Ray run snapshot away: Ray Train would resume that older run."""
    if cfg.train.resume and not cfg.train.resume_from:
        return InPlaceDir(out)
    return StagedDir(out, keep_interrupted=True)


def fit_interruptibly(trainer):
    """``trainer.fit()``, with Ctrl-C stopping the run's workers and raising KeyboardInterrupt here.

    On the main thread Ray Train installs its own SIGINT handler: it aborts the run, then exits the process
    with status 0 (or lets fit raise that its controller died), and stays installed after fit returns. Here
    the trainer hands over its controller instead (``_register_sigint_handler``, which Ray calls only on the
    main thread), so Ctrl-C raises KeyboardInterrupt and this function aborts the run the way Ray's handler
    would, before the caller moves the run's folder away."""
    import signal

    controllers: list = []
    trainer._register_sigint_handler = controllers.append
    previous = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (Ray's handler in the driver exits)
        for controller in controllers:
            _abort(controller)
        raise
    finally:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not previous:
            signal.signal(signal.SIGINT, previous)  # a Ray Train that installed its handler after all


def _abort(controller) -> None:
    """Stop a Ray Train run: its controller shuts the workers down (killing them after a few seconds)."""
    import ray

    try:
        ray.get(controller.abort.remote(), timeout=60)
    except Exception:  # noqa: BLE001 - the controller exits as it aborts (RayActorError), or is gone already
        pass


def finish_manifest(manifest: dict, result, record, target: StagedDir) -> dict:
    """The ``final`` link, the model card and, last, ``manifest.json`` in ``target.path``; the manifest's
    paths name where the files will be once ``target`` is committed."""
    from eqrlhf.model_card import write_model_card

    final = link_final(target.path, str(result.checkpoint.path) if result.checkpoint else None)
    manifest["final"] = target.final_path(final) if final else None
    if final:  # its model card: config, data mixture and licence (the pipeline adds the evaluation)
        manifest["model_card"] = target.final_path(write_model_card(final, record, train_manifest=manifest))
    write_json(target.path / MANIFEST, manifest)
    return manifest
