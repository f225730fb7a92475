"""The Ray Train worker loop of the PPO family: rollouts, experience, K epochs of updates, weight sync.

Per iteration i (every rank runs the same code; rank 0 alone talks to the engine pool):
 1. rank 0 samples ``ppo.prompts_per_iteration`` prompts (numpy generator seeded with (seed, i)), generates
    ``ppo.samples_per_prompt`` completions each with the pool (sampling seed derived from (seed, i)) and
    broadcasts the episodes; rank r takes the r-th contiguous shard;
 2. each rank scores its shard (rule or reward model), computes old / reference log-probs, values,
    KL-shaped rewards, GAE (and the cost side for PPO-Lagrangian) — see :mod:`eqrlhf.train.ppo_experience`;
 3. ``ppo.ppo_epochs`` passes over the shard in mini-batches (one optimizer step of the policy engine and of
    each critic engine per mini-batch), the policy loss masked by AMA when enabled;
 4. the new policy weights go to every engine, bucket by bucket (ZeRO-3 gathers one bucket at a time);
 5. rank 0 logs metrics; every ``train.save_every`` iterations (and at the end) a checkpoint is written.
Everything random is seeded by (run.seed, iteration), so a run resumed from iteration k's checkpoint (policy,
critics, optimizers, lambda) repeats the uninterrupted run's trajectory.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from eqrlhf.algorithms.catalog import loss_info
from eqrlhf.algorithms.ppo import update_log_lambda
from eqrlhf.config import Config
from eqrlhf.errors import InputNotFound
from eqrlhf.rollout.weight_sync import weight_device
from eqrlhf.train.checkpoint import (
    DS_TAG,
    checkpoint_dir_name,
    load_resume_state,
    load_training_checkpoint,
    refuse_pickled_code,
    report_checkpoint,
    save_model_weights,
    save_training_checkpoint,
    trainer_state,
)
from eqrlhf.train.deepspeed_config import build_ds_config, build_reference_ds_config, initialize_engine, lr_factor
from eqrlhf.train.loop import StepSpec, _zero3_init, build_policy, build_reference
from eqrlhf.train.metrics import MetricsWriter, average_over_workers, memory_metrics
from eqrlhf.train.ppo_experience import Models, make_experience, ppo_update

CRITICS = ("critic", "cost_critic")  # checkpoint sub-directories: HF-format model and <name>_deepspeed/ state


def ppo_step_spec(cfg: Config) -> StepSpec:
    """What loop.build_policy / build_reference need: a causal-LM policy with an in-trainer reference."""
    return StepSpec(
        loss=cfg.algorithm.loss,
        kind="preference",
        ama=False,
        reference="in_trainer",
        lora=False,
        bf16=cfg.train.bf16,
        chunk_size=cfg.train.logprob_chunk_size,
        compile=cfg.train.compile,
        share_prompt=False,  # PPO scores its own rollout rows, not pairs
        loss_params={},
        ama_params={},
    )


# ---- models -----------------------------------------------------------------------------------------------


def _scheduler(cfg: Config, total_steps: int):
    train = cfg.train

    def build(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total_steps, train.warmup_steps, train.lr_schedule)
        )

    return build


def _scalar_model(cfg: Config, init_dir: str | None):
    """A ScalarHeadLM: loaded whole from ``init_dir`` (reward / cost model) or the policy's backbone + fresh head."""
    from eqrlhf.models.heads import ScalarHeadLM

    kwargs = {"dtype": cfg.model.dtype, "trust_remote_code": cfg.model.trust_remote_code}
    if init_dir is not None:
        return ScalarHeadLM.load(init_dir, **kwargs)
    return ScalarHeadLM.from_lm(cfg.model.name_or_path, **kwargs)


def build_critic(cfg: Config, init_dir: str | None, world: int, total_steps: int):
    """A trainable value model in its own DeepSpeed engine (learning rate ``ppo.critic_lr``)."""

    train = cfg.train.model_copy(update={"lr": cfg.ppo.critic_lr or cfg.train.lr})
    ds_config = build_ds_config(train, world)
    keep = _zero3_init(ds_config) if train.zero_stage == 3 else None  # noqa: F841 (must outlive loading)
    model = _scalar_model(cfg, init_dir)
    model.backbone.config.use_cache = False
    if train.grad_checkpointing:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train.bf16:  # as loop.build_policy: what zero.Init did not create (the head) must match the backbone
        for param in model.parameters():
            if not hasattr(param, "ds_id"):
                param.data = param.data.to(torch.bfloat16)
    return initialize_engine(model, ds_config, train.use_gpu, lr_scheduler=_scheduler(cfg, total_steps))


def build_frozen_scorer(cfg: Config, path: str, world: int, device: torch.device):
    """A frozen reward / cost model: a ZeRO-3 inference engine when the policy is ZeRO-3 (as the reference)."""
    if cfg.train.zero_stage == 3:
        import deepspeed

        ref_config = build_reference_ds_config(cfg.train, world)
        keep = _zero3_init(ref_config)  # noqa: F841
        engine, *_ = deepspeed.initialize(model=_scalar_model(cfg, path), config=ref_config)
        engine.eval()
        return engine
    model = _scalar_model(cfg, path).requires_grad_(False).eval()
    return model.to(device=device, dtype=torch.bfloat16 if cfg.train.bf16 else None)


def build_models(cfg: Config, plan: dict, world: int) -> Models:

    ppo, spec = cfg.ppo, ppo_step_spec(cfg)
    total_steps = plan["total_iterations"] * plan["steps_per_iteration"]
    ds_config = build_ds_config(cfg.train, world)
    keep = _zero3_init(ds_config) if cfg.train.zero_stage == 3 else None  # noqa: F841
    model = build_policy(cfg, spec)
    policy = initialize_engine(model, ds_config, cfg.train.use_gpu, lr_scheduler=_scheduler(cfg, total_steps))
    reward_model, cost_model = plan["reward_model"], plan["cost_model"]  # absolute paths (None for rules)
    critic = build_critic(cfg, reward_model if ppo.critic_init == "reward_model" else None, world, total_steps)
    lagrangian = loss_info(cfg.algorithm.loss).lagrangian
    cost_critic = None
    if lagrangian:
        init = cost_model if ppo.cost_critic_init == "cost_model" else None
        cost_critic = build_critic(cfg, init, world, total_steps)
    device = policy.device
    return Models(
        policy=policy,
        reference=build_reference(cfg, spec, world, device),
        critic=critic,
        cost_critic=cost_critic,
        reward_model=build_frozen_scorer(cfg, reward_model, world, device) if reward_model else None,
        cost_model=build_frozen_scorer(cfg, cost_model, world, device) if cost_model else None,
    )


def critic_engines(models: Models) -> dict:
    return {name: engine for name, engine in zip(CRITICS, (models.critic, models.cost_critic)) if engine is not None}


# ---- weight sync ------------------------------------------------------------------------------------------


def _param_groups(named_params: list, bucket_bytes: int) -> list[list]:
    """Consecutive parameters in groups of at most ``bucket_bytes`` (ZeRO-3 gathers one group at a time)."""
    groups, group, size = [], [], 0
    for name, param in named_params:
        nbytes = getattr(param, "ds_numel", param.numel()) * param.element_size()
        if group and size + nbytes > bucket_bytes:
            groups.append(group)
            group, size = [], 0
        group.append((name, param))
        size += nbytes
    return groups + ([group] if group else [])


def policy_tensors(engine, bucket_bytes: int, rank: int, on_device: bool = False):
    """(name, tensor) of every policy parameter on rank 0; ZeRO-3 shards are gathered group by group, and every
    rank must iterate this generator to the end (the gathers are collectives).

    Host copies by default; ``on_device`` (cuda_ipc or NCCL broadcast sync) yields the parameters themselves, or device copies
    of gathered ZeRO-3 shards, which the pool packs into its CUDA buckets.
    """
    zero3 = engine.zero_optimization_stage() == 3
    device = engine.device if on_device else "cpu"
    for group in _param_groups(list(engine.module.named_parameters()), bucket_bytes):
        if zero3:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=None)
        else:
            gathered = contextlib.nullcontext()
        with gathered:
            if rank == 0:
                for name, param in group:  # a copy: the gathered storage is released when the group ends
                    yield name, param.detach().to(device, copy=True) if zero3 else param.detach().to(device)


def sync_policy(engine, pool, cfg: Config, rank: int) -> dict[str, float]:
    """Push the policy's weights to every rollout engine; rank 0 returns the pool's sync statistics."""
    bucket_bytes = int(cfg.rollout.sync_bucket_mb * 2**20)
    tensors = policy_tensors(engine, bucket_bytes, rank, on_device=weight_device(cfg) == "cuda")
    if rank != 0:
        for _ in tensors:
            pass
        return {}
    stats = pool.update_weights(tensors, bucket_bytes)
    return {"sync/seconds": stats["sync_seconds"], "sync/mb": stats["bytes"] / 2**20}


# ---- rollouts ---------------------------------------------------------------------------------------------


def sample_prompts(num_prompts: int, count: int, seed: int, iteration: int) -> list[int]:
    """The prompts iteration ``iteration`` draws, without replacement: a function of (seed, iteration) only."""
    picked = np.random.default_rng([seed, iteration]).choice(num_prompts, size=count, replace=False)
    return [int(i) for i in picked]


def rollout_seed(seed: int, iteration: int) -> int:
    return (seed * 1_000_003 + iteration) % (2**31)


def generate_episodes(pool, rows: list[dict], cfg: Config, iteration: int) -> list[dict]:
    """Rank 0: sample prompts and generate; episodes ordered by prompt, then sample."""
    from eqrlhf.data.tokenize import prompt_messages
    from eqrlhf.rollout.base import Sampling

    ppo = cfg.ppo
    picked = [rows[i] for i in sample_prompts(len(rows), ppo.prompts_per_iteration, cfg.run.seed, iteration)]
    sampling = Sampling(
        max_new_tokens=ppo.max_new_tokens,
        temperature=ppo.temperature,
        top_p=1.0,
        n=ppo.samples_per_prompt,
        seed=rollout_seed(cfg.run.seed, iteration),
    )
    completions = pool.generate([prompt_messages(row) for row in picked], sampling)
    return [
        {
            "row_id": picked[c.prompt_index]["id"],
            "category": picked[c.prompt_index].get("category"),
            "prompt_ids": list(c.prompt_token_ids),
            "response_ids": list(c.token_ids),
            "text": c.text,
            "engine_logprobs": list(c.logprobs) if c.logprobs is not None else None,
            "finish_reason": c.finish_reason,
        }
        for c in completions
    ]


def broadcast_episodes(episodes: list[dict] | None) -> list[dict]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return episodes
    box = [episodes]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def read_prompt_rows(plan: dict) -> list[dict]:
    """The prompt rows ``prepare_ppo`` accepted, in table order (rank 0 only)."""
    from eqrlhf.manifest import read_rows

    table = read_rows(plan["input_dir"])
    columns = [c for c in ("id", "prompt", "history", "category") if c in table.column_names]
    table = table.select(columns).take(plan["prompt_rows"])
    return table.to_pylist()


# ---- checkpoints ------------------------------------------------------------------------------------------


def save_ppo_checkpoint(
    models: Models, iteration: int, state: dict, metrics: dict, tokenizer, rank: int, plan: dict
) -> None:
    """Critics, then the policy; the manifest written after Ray Train persisted every rank's part marks the
    checkpoint complete."""
    local = Path(tempfile.mkdtemp(prefix=f"eqrlhf-ppo-{checkpoint_dir_name(iteration)}-rank{rank}-"))
    try:
        for name, engine in critic_engines(models).items():
            engine.save_checkpoint(str(local / f"{name}_deepspeed"), tag=DS_TAG)
            save_model_weights(engine, local / name, tokenizer, rank)
        save_training_checkpoint(models.policy, local, state, tokenizer, rank)
        report_checkpoint(local, iteration, {**metrics, "iteration": iteration}, plan, rank)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _load_all(models: Models, path: Path) -> dict:
    state = load_training_checkpoint(models.policy, path)
    for name, engine in critic_engines(models).items():
        refuse_pickled_code(engine)
        load_path, _ = engine.load_checkpoint(str(path / f"{name}_deepspeed"), tag=DS_TAG)
        if load_path is None:
            raise InputNotFound(f"checkpoint {path} has no DeepSpeed state for the {name} ({name}_deepspeed/)")
    return state


def restore(models: Models, plan: dict) -> tuple[int, float | None]:
    """(iterations done, log lambda) from Ray's latest checkpoint after a crash, else train.resume*, else (0, None)."""
    state = load_resume_state(plan, lambda path: _load_all(models, path))
    if state is None:
        return 0, None
    return int(state["step"]), state.get("log_lambda")


# ---- the worker -------------------------------------------------------------------------------------------


def _setup_device(cfg: Config) -> None:
    if cfg.train.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()  # see loop.train_loop_per_worker
        torch.cuda.set_device(device)
        os.environ["LOCAL_RANK"] = str(device.index)
    else:
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))


def ppo_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train

    from eqrlhf.models.loading import load_tokenizer

    # the config object, not a dump rebuilt here: it keeps the stage's restriction (eqrlhf.restricted_config)
    cfg, plan, pool = config["cfg"], config["plan"], config["pool"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _setup_device(cfg)
    torch.manual_seed(cfg.run.seed)  # identical fresh critic heads on every worker
    tokenizer = load_tokenizer(cfg.model.name_or_path, gguf_file=cfg.model.gguf_file)
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    models = build_models(cfg, plan, world)
    start, log_lambda = restore(models, plan)
    if log_lambda is None:
        log_lambda = math.log(cfg.ppo.lambda_init)
    rows = read_prompt_rows(plan) if rank == 0 else None
    if start > 0 or plan["sync_at_start"]:  # engines must generate with exactly the policy we continue from
        sync_policy(models.policy, pool, cfg, rank)
    writer = MetricsWriter(Path(plan["train_dir"]), start, plan.get("tracking")) if rank == 0 else None
    total, shard = plan["total_iterations"], plan["rollout_batch"] // world
    lagrangian = loss_info(cfg.algorithm.loss).lagrangian
    for iteration in range(start, total):
        started = time.perf_counter()
        torch.manual_seed(cfg.run.seed * 1_000_003 + iteration)
        episodes = generate_episodes(pool, rows, cfg, iteration) if rank == 0 else None
        rollout_s = time.perf_counter() - started
        episodes = broadcast_episodes(episodes)[rank * shard : (rank + 1) * shard]
        experience, metrics, mean_cost = make_experience(models, episodes, cfg, tokenizer.pad_token_id)
        if lagrangian:
            ppo = cfg.ppo
            log_lambda = update_log_lambda(log_lambda, mean_cost, ppo.cost_threshold, ppo.lambda_lr, ppo.lambda_max)
        metrics.update(ppo_update(models, experience, cfg, iteration, math.exp(log_lambda)))
        metrics.update(memory_metrics(models.policy.device))
        metrics = average_over_workers(metrics, models.policy.device)
        if lagrangian:
            metrics["lagrangian/lambda"] = math.exp(log_lambda)
        metrics.update(sync_policy(models.policy, pool, cfg, rank))
        metrics["time/rollout_s"] = rollout_s
        metrics["time/iteration_s"] = time.perf_counter() - started
        done = iteration + 1
        if writer is not None and (done % cfg.train.log_every == 0 or done == total):
            writer.write(done, metrics)
        if (cfg.train.save_every and done % cfg.train.save_every == 0) or done == total:
            state = trainer_state(done, 1, plan["global_batch"], world, cfg.run.seed, plan["config_hash"], metrics)
            state.update(log_lambda=log_lambda, rollout_batch=plan["rollout_batch"], iteration=done)
            save_ppo_checkpoint(models, done, state, metrics, tokenizer, rank, plan)
    if writer is not None:
        writer.close()
