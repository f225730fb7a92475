"""The trainer core: what every Ray Train worker does, whether it trains offline (:mod:`eqrlhf.train.loop`: SFT,
the DPO family, BFPO, reward and cost models) or online (:mod:`eqrlhf.train.ppo_loop`: PPO, PPO-Lagrangian).

A worker starts the same way (:func:`start_worker`), builds its trainable models as DeepSpeed engines with
one optimizer and LR schedule (:func:`train_engine`) and its frozen ones as inference engines
(:func:`frozen_model`), continues from one checkpoint layout through one resume path (:func:`restore`,
:mod:`eqrlhf.train.checkpoint`) and runs :func:`run_steps`, which owns the per-step seed, the metrics
averaged over workers and written by rank 0, the progress bar, the checkpoints and the crash test hook.
What differs between the loops is a :class:`StepFunction`: an offline batch -> loss -> optimizer step, or
rollout -> experience -> PPO updates -> weight sync.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from eqrlhf.config import Config, ConfigError, TrainSection
from eqrlhf.train.checkpoint import (
    checkpoint_dir_name,
    load_resume_state,
    load_training_checkpoint,
    report_checkpoint,
    save_training_checkpoint,
    trainer_state,
)
from eqrlhf.train.deepspeed_config import build_ds_config, build_reference_ds_config, initialize_engine, lr_factor
from eqrlhf.train.metrics import MetricsWriter, average_over_workers, memory_metrics

# deepspeed, ray, transformers and peft (and eqrlhf.models, which loads transformers) are imported in the
# functions that use them: the step code of loop.py, which tests and the profiler import outside a worker,
# stays light.

# Test hook for crash recovery: the worker of rank $EQRLHF_TEST_KILL_RANK (default: the last) SIGKILLs
# itself after step $EQRLHF_TEST_KILL_AT_STEP (its update and metrics done, its checkpoint not yet written),
# once: it first creates the marker file $EQRLHF_TEST_KILL_MARKER and never fires when that file exists, so
# the restarted run goes through.
KILL_AT_STEP, KILL_MARKER, KILL_RANK = "EQRLHF_TEST_KILL_AT_STEP", "EQRLHF_TEST_KILL_MARKER", "EQRLHF_TEST_KILL_RANK"


# ---- start-up ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    cfg: Config  # the stage's restricted config object itself, not a dump rebuilt here (eqrlhf.restricted_config)
    plan: dict
    rank: int
    world: int
    tokenizer: object


def setup_device(train: TrainSection) -> None:
    if train.use_gpu:
        import ray.train.torch

        # DeepSpeed places the engine on cuda:$LOCAL_RANK; Ray Train's GPU for this worker is the one
        # get_device() names (an index into CUDA_VISIBLE_DEVICES, not always the local rank).
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        os.environ["LOCAL_RANK"] = str(device.index)
    else:
        torch.set_num_threads(max(1, int(train.cpus_per_worker)))


def start_worker(config: dict) -> Worker:
    """Device, seed, tokenizer and DeepSpeed's comm layer for this Ray Train worker."""
    import deepspeed
    import ray.train

    from eqrlhf.models.loading import load_tokenizer
    from eqrlhf.train.driver import record_placement

    cfg, plan = config["cfg"], config["plan"]
    ctx = ray.train.get_context()
    setup_device(cfg.train)
    torch.manual_seed(cfg.run.seed)  # same initial weights (fresh heads, LoRA, critics) on every worker
    tokenizer = load_tokenizer(cfg.model.name_or_path, gguf_file=cfg.model.gguf_file)
    if os.environ.get("TORCH_EXTENSIONS_DIR"):  # eqrlhf.train.driver.worker_env sets it
        for lock in Path(os.environ["TORCH_EXTENSIONS_DIR"]).glob("*/lock"):
            clear_stale_build_lock(lock.parent)
    # Ray Train has created the process group (gloo on CPU, NCCL on GPU): DeepSpeed wraps it instead of
    # starting its own, now, so that ZeRO-3 loading already sees the real world size. On CPU it builds (or
    # finds built) its shared-memory op here.
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    worker = Worker(cfg, plan, ctx.get_world_rank(), ctx.get_world_size(), tokenizer)
    record_placement(worker)
    return worker


def clear_stale_build_lock(folder: Path, min_age_s: float = 30, settle_s: float = 5) -> bool:
    """Remove torch's lock file in the C++ op build folder ``folder`` when its builder is gone.

    The process that builds an op (DeepSpeed's, through torch.utils.cpp_extension) holds ``folder/lock``
    while ``ninja`` runs in ``folder``; every other process waits until the file is gone, without a limit. A
    builder killed mid-build (Ctrl-C aborts a run's workers; a worker killed for any reason) leaves the file,
    and every later run on the machine would wait forever. The file is stale when it is at least
    ``min_age_s`` old and no ``ninja`` works in ``folder`` on this machine, checked twice ``settle_s`` apart
    (a live builder runs ninja from a moment after taking the lock until a moment before releasing it).
    Without /proc (not Linux) nothing is removed. Returns whether the file was removed."""
    lock = folder / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return False
        if _ninja_builds_in(folder):
            return False
        if age >= min_age_s:
            break
        time.sleep(min(settle_s, min_age_s - age))
    time.sleep(settle_s)
    if not lock.exists() or _ninja_builds_in(folder):
        return False
    lock.unlink(missing_ok=True)
    print(f"[train] removed {lock}: left by a build that no longer runs")
    return True


def _ninja_builds_in(folder: Path) -> bool:
    if not Path("/proc").is_dir():
        return True  # cannot tell: assume it does
    target = os.path.realpath(folder)
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "ninja":
                if os.path.realpath(os.readlink(entry / "cwd")) == target:
                    return True
        except OSError:  # gone, or another user's
            continue
    return False


# ---- models -----------------------------------------------------------------------------------------------


def zero3_init(ds_config: dict):
    """While the returned object lives, ``from_pretrained`` loads weights straight into ZeRO-3 partitions."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def lr_scheduler(train: TrainSection, total_steps: int):
    def build(optimizer):
        # a closure, so the checkpoint keeps only the step count and the schedule comes from this config
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total_steps, train.warmup_steps, train.lr_schedule)
        )

    return build


def train_engine(train: TrainSection, world: int, total_steps: int, build_model: Callable):
    """A trainable model in its own DeepSpeed engine: AdamW with ``train``'s settings and LR schedule."""
    ds_config = build_ds_config(train, world)
    keep = zero3_init(ds_config) if train.zero_stage == 3 else None  # noqa: F841 (must outlive loading)
    model = build_model()
    return initialize_engine(model, ds_config, train.use_gpu, lr_scheduler=lr_scheduler(train, total_steps))


def frozen_model(train: TrainSection, world: int, device: torch.device, load: Callable):
    """A model only run forward (reference, reward / cost model): a ZeRO-3 inference engine when the policy
    is ZeRO-3, else the whole model on this worker's device."""
    if train.zero_stage == 3:
        import deepspeed

        ref_config = build_reference_ds_config(train, world)
        keep = zero3_init(ref_config)  # noqa: F841 (must outlive loading)
        engine, *_ = deepspeed.initialize(model=load(), config=ref_config)
        engine.eval()
        return engine
    model = load()
    model.requires_grad_(False)
    model.eval()
    return model.to(device=device, dtype=torch.bfloat16 if train.bf16 else None)


def match_bf16(model) -> None:
    # Under ZeRO-3, zero.Init already created the loaded weights as bf16 partitions; what was built after it
    # (a score head, LoRA adapters) is float32, and DeepSpeed needs a single dtype.
    for param in model.parameters():
        if not hasattr(param, "ds_id"):
            param.data = param.data.to(torch.bfloat16)


def build_policy(cfg: Config, scalar: bool):
    """The trainable model: a causal LM (optionally with LoRA) or, ``scalar``, a ScalarHeadLM (reward/cost)."""
    from eqrlhf.models.loading import compile_decoder_layers, load_causal_lm

    kwargs = {"dtype": cfg.model.dtype, "trust_remote_code": cfg.model.trust_remote_code}
    if scalar:
        from eqrlhf.models.heads import ScalarHeadLM

        model = ScalarHeadLM.from_lm(cfg.model.name_or_path, **kwargs)
        backbone = model.backbone
    else:
        model = backbone = load_causal_lm(cfg.model.name_or_path, gguf_file=cfg.model.gguf_file, **kwargs)
    backbone.config.use_cache = False
    if cfg.train.compile:
        compile_decoder_layers(backbone)
    if cfg.train.grad_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.train.lora.r > 0:
        from peft import LoraConfig, get_peft_model

        lora = cfg.train.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    if cfg.train.bf16:
        match_bf16(model)
    return model


def build_reference(cfg: Config, world: int, device: torch.device):
    """The frozen initial policy, for in-trainer reference log-probs."""
    from eqrlhf.models.loading import load_causal_lm

    def load():
        kwargs = {"dtype": cfg.model.dtype, "trust_remote_code": cfg.model.trust_remote_code}
        ref = load_causal_lm(cfg.model.name_or_path, gguf_file=cfg.model.gguf_file, **kwargs)
        ref.config.use_cache = False
        return ref

    return frozen_model(cfg.train, world, device, load)


# ---- checkpoints ------------------------------------------------------------------------------------------


def restore(worker: Worker, policy, extras: dict | None = None) -> dict | None:
    """Load the checkpoint to continue from (Ray's latest after a crash, else train.resume*) into the policy
    and ``extras`` (PPO's critics); return its trainer state, or None for a fresh start."""
    plan = worker.plan
    state = load_resume_state(plan, lambda path: load_training_checkpoint(policy, path, extras))
    if state is not None and state["global_batch"] != plan["global_batch"]:
        raise ConfigError(
            f"checkpoint at step {state['step']} was trained with global batch {state['global_batch']}, "
            f"this run uses {plan['global_batch']}: the data position would not match"
        )
    return state


def save_and_report(worker: Worker, step: int, state: dict, metrics: dict, policy, extras: dict | None) -> None:
    """Write this worker's part of checkpoint step_N into a local dir; Ray Train merges and persists them."""
    local = Path(tempfile.mkdtemp(prefix=f"eqrlhf-{checkpoint_dir_name(step)}-rank{worker.rank}-"))
    try:
        save_training_checkpoint(policy, local, state, worker.tokenizer, worker.rank, extras)
        report_checkpoint(local, step, metrics, worker.plan, worker.rank)
    finally:
        shutil.rmtree(local, ignore_errors=True)


# ---- the step loop ----------------------------------------------------------------------------------------


class StepFunction(Protocol):
    """What a loop adds to :func:`run_steps`."""

    counter: str  # the name of the step count in the metrics reported to Ray Train ("step", "iteration")
    progress_key: str  # the metric the progress bar shows
    steps_per_epoch: int  # for trainer_state.json's epoch and step within it

    def run(self, step: int) -> dict[str, float]:
        """Step ``step`` (0-based) on this worker; its metrics, before they are averaged over workers."""

    def finish(self, done: int, metrics: dict[str, float]) -> dict[str, float]:
        """The averaged metrics of step ``done`` (1-based) with what needs the world, or rank 0 alone, added."""

    def state(self, done: int) -> dict:
        """What this loop adds to trainer_state.json."""


def _progress(rank: int, total: int, start: int):
    if rank != 0:
        return None
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=total, desc="train", unit="step")  # drawn by the driver, with its ETA
    bar.update(start)
    return bar


def _maybe_kill_for_test(step: int, rank: int, world: int) -> None:
    at, marker = os.environ.get(KILL_AT_STEP), os.environ.get(KILL_MARKER)
    if not (at and marker) or step != int(at) or rank != int(os.environ.get(KILL_RANK, world - 1)):
        return
    if not Path(marker).exists():
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)


def run_steps(worker: Worker, steps: StepFunction, start: int, total: int, policy, extras: dict | None = None) -> None:
    """Steps ``start`` .. ``total - 1``: metrics to ``metrics.jsonl`` every ``train.log_every`` steps and a
    checkpoint of ``policy`` and ``extras`` every ``train.save_every`` steps, both at the last step."""
    cfg, plan, rank, world = worker.cfg, worker.plan, worker.rank, worker.world
    train, device = cfg.train, policy.device
    writer = MetricsWriter(Path(plan["train_dir"]), start, plan.get("tracking")) if rank == 0 else None
    bar = _progress(rank, total, start)
    shown = steps.progress_key.rsplit("/", 1)[-1]
    for step in range(start, total):
        # no generator state in the checkpoint: everything random is reseeded from (seed, step), so a resumed
        # step draws exactly what the uninterrupted run drew
        torch.manual_seed(cfg.run.seed * 1_000_003 + step)
        metrics = steps.run(step)
        metrics.update(memory_metrics(device))
        done = step + 1
        metrics = steps.finish(done, average_over_workers(metrics, device))
        if writer is not None and (done % train.log_every == 0 or done == total):
            writer.write(done, metrics)
        if bar is not None:
            bar.set_description(f"train {shown} {metrics[steps.progress_key]:.4f}")
            bar.update(1)
        _maybe_kill_for_test(done, rank, world)
        if (train.save_every and done % train.save_every == 0) or done == total:
            per_epoch, seed, config_hash = steps.steps_per_epoch, cfg.run.seed, plan["config_hash"]
            state = trainer_state(done, per_epoch, plan["global_batch"], world, seed, config_hash, metrics)
            state.update(steps.state(done))
            save_and_report(worker, done, state, {**metrics, steps.counter: done}, policy, extras)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
