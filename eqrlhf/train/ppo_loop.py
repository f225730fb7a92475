"""The PPO family's step on the trainer core (:mod:`eqrlhf.train.core`, shared with offline training: device,
DeepSpeed engines, checkpoints, resume, metrics): rollouts, experience, K epochs of updates, weight sync.

Per iteration i (every rank runs the same code; rank 0 alone talks to the engine pool):
 1. rank 0 samples ``ppo.prompts_per_iteration`` prompts (numpy generator seeded with (seed, i)), generates
    ``ppo.samples_per_prompt`` completions each with the pool (sampling seed derived from (seed, i)) and
    broadcasts the episodes; rank r takes the r-th contiguous shard;
 2. each rank scores its shard (rule or reward model), computes old / reference log-probs, values,
    KL-shaped rewards, GAE (and the cost side for PPO-Lagrangian) — see :mod:`eqrlhf.train.ppo_experience`;
 3. ``ppo.ppo_epochs`` passes over the shard in mini-batches (one optimizer step of the policy engine and of
    each critic engine per mini-batch), the policy loss masked by AMA when enabled;
 4. the new policy weights go to every engine, bucket by bucket (ZeRO-3 gathers one bucket at a time);
 5. the core logs metrics; every ``train.save_every`` iterations (and at the end) it writes a checkpoint (the
    offline layout, plus the critics in ``critic/`` and ``cost_critic/``).
Everything random is seeded by (run.seed, iteration), so a run resumed from iteration k's checkpoint (policy,
critics, optimizers, lambda) repeats the uninterrupted run's trajectory.
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np

from eqrlhf.algorithms.catalog import loss_info
from eqrlhf.algorithms.ppo import update_log_lambda
from eqrlhf.config import Config
from eqrlhf.rollout.weight_sync import weight_device
from eqrlhf.train.core import (
    Worker,
    build_policy,
    build_reference,
    frozen_model,
    match_bf16,
    restore,
    run_steps,
    start_worker,
    train_engine,
)
from eqrlhf.train.ppo_experience import Models, make_experience, ppo_update

CRITICS = ("critic", "cost_critic")  # checkpoint sub-directories: HF-format model and <name>_deepspeed/ state


# ---- models -----------------------------------------------------------------------------------------------


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

    def build():
        model = _scalar_model(cfg, init_dir)
        model.backbone.config.use_cache = False
        if train.grad_checkpointing:
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if train.bf16:
            match_bf16(model)
        return model

    return train_engine(train, world, total_steps, build)


def build_models(cfg: Config, plan: dict, world: int) -> Models:
    ppo = cfg.ppo
    total_steps = plan["total_iterations"] * plan["steps_per_iteration"]
    policy = train_engine(cfg.train, world, total_steps, lambda: build_policy(cfg, scalar=False))
    reward_model, cost_model = plan["reward_model"], plan["cost_model"]  # absolute paths (None for rules)
    critic = build_critic(cfg, reward_model if ppo.critic_init == "reward_model" else None, world, total_steps)
    lagrangian = loss_info(cfg.algorithm.loss).lagrangian
    cost_critic = None
    if lagrangian:
        init = cost_model if ppo.cost_critic_init == "cost_model" else None
        cost_critic = build_critic(cfg, init, world, total_steps)
    device = policy.device

    def scorer(path: str | None):
        return frozen_model(cfg.train, world, device, lambda: _scalar_model(cfg, path)) if path else None

    return Models(
        policy=policy,
        reference=build_reference(cfg, world, device),
        critic=critic,
        cost_critic=cost_critic,
        reward_model=scorer(reward_model),
        cost_model=scorer(cost_model),
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
    """The prompt rows ``prepare_ppo`` accepted, in the id order both read them in (rank 0 only)."""
    from eqrlhf.manifest import in_id_order, read_rows

    table = in_id_order(read_rows(plan["input_dir"]))
    columns = [c for c in ("id", "prompt", "history", "category") if c in table.column_names]
    table = table.select(columns).take(plan["prompt_rows"])
    return table.to_pylist()


# ---- the worker -------------------------------------------------------------------------------------------


class PPOSteps:
    """One PPO iteration: rollouts, experience, ``ppo.ppo_epochs`` of updates, the Lagrange multiplier, sync."""

    counter, progress_key, steps_per_epoch = "iteration", "reward/score_mean", 1

    def __init__(self, worker: Worker, models: Models, pool, log_lambda: float):
        self.worker, self.models, self.pool, self.log_lambda = worker, models, pool, log_lambda
        self.rows = read_prompt_rows(worker.plan) if worker.rank == 0 else None
        self.lagrangian = loss_info(worker.cfg.algorithm.loss).lagrangian
        self.started = self.rollout_s = 0.0

    def run(self, iteration: int) -> dict[str, float]:
        cfg, rank, models = self.worker.cfg, self.worker.rank, self.models
        shard = self.worker.plan["rollout_batch"] // self.worker.world
        self.started = time.perf_counter()
        episodes = generate_episodes(self.pool, self.rows, cfg, iteration) if rank == 0 else None
        self.rollout_s = time.perf_counter() - self.started
        episodes = broadcast_episodes(episodes)[rank * shard : (rank + 1) * shard]
        experience, metrics, mean_cost = make_experience(models, episodes, cfg, self.worker.tokenizer.pad_token_id)
        if self.lagrangian:
            ppo = cfg.ppo
            self.log_lambda = update_log_lambda(
                self.log_lambda, mean_cost, ppo.cost_threshold, ppo.lambda_lr, ppo.lambda_max
            )
        metrics.update(ppo_update(models, experience, cfg, iteration, math.exp(self.log_lambda)))
        return metrics

    def finish(self, done: int, metrics: dict[str, float]) -> dict[str, float]:
        if self.lagrangian:
            metrics["lagrangian/lambda"] = math.exp(self.log_lambda)
        metrics.update(sync_policy(self.models.policy, self.pool, self.worker.cfg, self.worker.rank))
        metrics["time/rollout_s"] = self.rollout_s
        metrics["time/iteration_s"] = time.perf_counter() - self.started
        return metrics

    def state(self, done: int) -> dict:
        return {"log_lambda": self.log_lambda, "rollout_batch": self.worker.plan["rollout_batch"], "iteration": done}


def ppo_loop_per_worker(config: dict) -> None:
    worker = start_worker(config)
    cfg, plan, pool = worker.cfg, worker.plan, config["pool"]
    models = build_models(cfg, plan, worker.world)
    critics = critic_engines(models)
    state = restore(worker, models.policy, critics)
    start = int(state["step"]) if state else 0
    log_lambda = state.get("log_lambda") if state else None
    steps = PPOSteps(worker, models, pool, math.log(cfg.ppo.lambda_init) if log_lambda is None else log_lambda)
    if start > 0 or plan["sync_at_start"]:  # engines must generate with exactly the policy we continue from
        sync_policy(models.policy, pool, cfg, worker.rank)
    run_steps(worker, steps, start, plan["total_iterations"], models.policy, critics)
