"""One rank's share of a PPO iteration: episodes -> experience tensors -> K epochs of mini-batch updates.

Experience (all ``[R, T-1]`` in the label frame of :mod:`eqrlhf.algorithms.ppo`, R = this rank's episodes):
old log-probs of the policy and the frozen reference (logits divided by ``ppo.temperature``, the distribution
the engines sampled from), critic values, KL-shaped rewards with the sequence score on the last response
token, GAE advantages and returns; for PPO-Lagrangian also cost values, cost returns and cost advantages
(the cost is a terminal signal, without KL). Advantages are whitened over the response tokens of the whole
iteration (moments summed over all ranks) after the Lagrangian combination.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eqrlhf.algorithms.catalog import ama_on, loss_info
from eqrlhf.algorithms.logprobs import shift_for_causal_lm, token_logprobs
from eqrlhf.algorithms.ppo import (
    critic_value_mask,
    gae,
    lagrangian_advantages,
    masked_entropy,
    masked_moments,
    policy_loss,
    sequence_advantages,
    sequence_kl,
    shaped_rewards,
    terminal_rewards,
    token_mean,
    value_loss,
    whiten,
)
from eqrlhf.config import Config
from eqrlhf.train.batching import collate_sequences
from eqrlhf.train.rewards import Episode, get_rule, score_episodes


@dataclass
class Models:
    policy: object  # DeepSpeed engine of the causal LM
    reference: object | None  # frozen initial policy
    critic: object  # DeepSpeed engine of a ScalarHeadLM
    cost_critic: object | None  # PPO-Lagrangian only
    reward_model: object | None  # frozen ScalarHeadLM when ppo.reward_model is set
    cost_model: object | None


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if _distributed():
        import torch.distributed as dist

        values = values.clone()
        dist.all_reduce(values)
    return values


# ---- forward passes ---------------------------------------------------------------------------------------


def policy_logps(model, batch: dict, temperature: float, chunk_size: int | None, entropy: bool = False):
    """Per-token log-probs [R, T-1] of ``batch['labels']`` at the sampling temperature (and the token-mean
    entropy over ``batch['mask']`` when asked)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    logps = token_logprobs(logits, batch["labels"], chunk_size=chunk_size)
    return (logps, masked_entropy(logits, batch["mask"], chunk_size)) if entropy else (logps, None)


def critic_values(model, batch: dict) -> torch.Tensor:
    """V of the state before each label-frame token: the scalar head at position t scores tokens 0..t."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[:, :-1].float()


def sequence_scores(model, batch: dict) -> torch.Tensor:
    from eqrlhf.models.heads import last_token_scores

    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).float()
    return last_token_scores(scores, batch["attention_mask"])


def rows_of(batch: dict, idx: torch.Tensor) -> dict:
    """Rows ``idx`` of every tensor, cut to the longest of them (right padding, so nothing real is cut)."""
    width = int(batch["attention_mask"][idx].sum(dim=1).max())
    out = {}
    for key, value in batch.items():
        value = value[idx]
        out[key] = value[:, :width] if key in ("input_ids", "attention_mask") else value[:, : width - 1]
    return out


@torch.no_grad()
def forward_in_micro_batches(fn, batch: dict, size: int) -> torch.Tensor:
    """``fn`` over ``size`` rows at a time; results padded back to the batch width and concatenated."""
    rows, width = batch["labels"].shape
    parts = []
    for start in range(0, rows, size):
        out = fn(rows_of(batch, torch.arange(start, min(start + size, rows))))
        if out.dim() == 2:
            out = torch.nn.functional.pad(out, (0, width - out.shape[1]))
        parts.append(out)
    return torch.cat(parts)


# ---- experience -------------------------------------------------------------------------------------------


def collate_episodes(episodes: list[dict], pad_id: int, device: torch.device) -> dict:
    batch = collate_sequences(
        [e["prompt_ids"] for e in episodes],
        [e["response_ids"] for e in episodes],
        pad_id,
        per_token={"engine_logps": [e["engine_logprobs"] for e in episodes]},
    )
    labels, mask = shift_for_causal_lm(batch["input_ids"], batch["response_mask"])
    out = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "labels": labels,
        "mask": mask,
        "engine_logps": batch["engine_logps"][:, 1:],
    }
    return {k: v.to(device) for k, v in out.items()}


def episode_scores(source_model, rule_name: str | None, key: str, episodes, batch, cfg: Config, micro: int):
    """[R] sequence scores from a frozen scalar-head model or a registered rule."""
    if source_model is not None:
        return forward_in_micro_batches(lambda b: sequence_scores(source_model, b), batch, micro)
    rule = get_rule(rule_name, key)
    views = [
        Episode(e["text"], tuple(e["response_ids"]), e["category"], e["finish_reason"], cfg.ppo.max_new_tokens)
        for e in episodes
    ]
    return torch.tensor(score_episodes(rule, views), dtype=torch.float32, device=batch["labels"].device)


def make_experience(models: Models, episodes: list[dict], cfg: Config, pad_id: int) -> tuple[dict, dict, float]:
    """Experience tensors for this rank's episodes, rollout metrics, and the mean episode cost over all ranks."""
    ppo, micro = cfg.ppo, cfg.train.micro_batch_size
    chunk = cfg.train.logprob_chunk_size
    batch = collate_episodes(episodes, pad_id, models.policy.device)
    mask = batch["mask"]
    scores = episode_scores(models.reward_model, ppo.reward_rule, "ppo.reward_rule", episodes, batch, cfg, micro)
    models.policy.eval()
    old = forward_in_micro_batches(lambda b: policy_logps(models.policy, b, ppo.temperature, chunk)[0], batch, micro)
    ref_model = models.reference
    ref = forward_in_micro_batches(lambda b: policy_logps(ref_model, b, ppo.temperature, chunk)[0], batch, micro)
    models.policy.train()
    values = forward_in_micro_batches(lambda b: critic_values(models.critic, b), batch, micro) * mask
    rewards, kl = shaped_rewards(old, ref, mask, scores, ppo.kl_coef, ppo.kl_estimator)
    advantages, returns = gae(rewards, values, mask, ppo.gamma, ppo.lam)
    batch.update(old_logps=old, values=values, returns=returns, advantages=advantages)
    lengths = mask.sum(dim=1)
    seq_kl = sequence_kl(kl, mask)
    metrics = {
        "reward/score_mean": float(scores.mean()),
        "reward/shaped_mean": float((scores - ppo.kl_coef * seq_kl).mean()),
        "kl/sequence": float(seq_kl.mean()),
        "kl/token": float(token_mean(kl, mask)),
        "response/length": float(lengths.float().mean()),
        "response/stop_fraction": sum(e["finish_reason"] == "stop" for e in episodes) / len(episodes),
        "critic/value_mean": float(token_mean(values, mask)),
        "critic/return_mean": float(token_mean(returns, mask)),
    }
    if all(e["engine_logprobs"] is not None for e in episodes):
        # after the previous iteration's sync: how far the engines' log-probs of these tokens are from ours
        gap = (old - batch["engine_logps"]).abs()
        metrics["rollout/logprob_gap"] = float(token_mean(gap, mask))
    mean_cost = 0.0
    if loss_info(cfg.algorithm.loss).lagrangian:
        costs = episode_scores(models.cost_model, ppo.cost_rule, "ppo.cost_rule", episodes, batch, cfg, micro)
        cost_values = forward_in_micro_batches(lambda b: critic_values(models.cost_critic, b), batch, micro) * mask
        cost_adv, cost_returns = gae(terminal_rewards(mask, costs), cost_values, mask, ppo.gamma, ppo.lam)
        batch.update(cost_values=cost_values, cost_returns=cost_returns, cost_advantages=cost_adv)
        total = all_reduce_sum(
            torch.stack([costs.double().sum(), torch.tensor(len(costs), dtype=torch.float64, device=costs.device)])
        )
        mean_cost = float(total[0] / total[1])
        metrics["lagrangian/episode_cost"] = mean_cost
    return batch, metrics, mean_cost


def finish_advantages(batch: dict, cfg: Config, lam: float) -> dict[str, float]:
    """Lagrangian combination, the AMA mask from the critic's values, and whitening; sets
    ``batch['policy_advantages']`` and ``batch['policy_mask']``."""
    mask = batch["mask"]
    advantages = batch["advantages"]
    if "cost_advantages" in batch:
        advantages = lagrangian_advantages(advantages, batch["cost_advantages"], lam)
    metrics = {"ppo/advantage_mean": float(token_mean(advantages, mask))}
    policy_mask = mask
    if ama_on(cfg):
        ama = cfg.ama
        baseline = "batch_mean" if ama.baseline_mode == "batch_mean" else ama.baseline
        kept, ama_metrics = critic_value_mask(
            batch["values"],
            mask,
            sequence_advantages(advantages, mask),
            baseline=baseline,
            rule=ama.rule,
            tau=ama.tau,
            normalize=ama.normalize,
        )
        policy_mask = mask * kept
        metrics.update({f"ama/{k}": float(v) for k, v in ama_metrics.items()})
    if cfg.ppo.whiten_advantages:
        advantages = whiten(advantages, mask, all_reduce_sum(masked_moments(advantages, mask)))
    batch["policy_advantages"], batch["policy_mask"] = advantages, policy_mask
    return metrics


# ---- updates ----------------------------------------------------------------------------------------------


def token_scales(counts: list[float], accum: int, device) -> list[float]:
    """Per-micro-batch loss multipliers making DeepSpeed's accumulated, worker-averaged gradient equal the
    gradient of the token mean over the whole mini-batch (see loop.loss_scales)."""
    import torch.distributed as dist

    total = all_reduce_sum(torch.tensor(sum(counts), dtype=torch.float64, device=device))
    world = dist.get_world_size() if _distributed() else 1
    return [c * accum * world / max(float(total), 1.0) for c in counts]


def _step(engine, micro_batches: list[dict], mask_key: str, loss_fn, accum: int) -> list[dict]:
    """Forward/backward every micro-batch of one mini-batch; DeepSpeed steps at the accumulation boundary."""
    scales = token_scales([float(b[mask_key].sum()) for b in micro_batches], accum, engine.device)
    out = []
    for b, scale in zip(micro_batches, scales):
        loss, metrics = loss_fn(b)
        engine.backward(loss * scale)
        engine.step()
        out.append(metrics)
    return out


def _add(totals: dict, metrics: dict, weight: float) -> None:
    for name, value in metrics.items():
        totals[name] = totals.get(name, 0.0) + float(value) * weight


def ppo_update(models: Models, batch: dict, cfg: Config, iteration: int, lam: float) -> dict[str, float]:
    """``ppo.ppo_epochs`` passes over this rank's experience in mini-batches; returns averaged metrics."""
    metrics = finish_advantages(batch, cfg, lam)
    ppo, train = cfg.ppo, cfg.train
    chunk = train.logprob_chunk_size
    rows = batch["mask"].shape[0]
    mini = train.micro_batch_size * train.grad_accum
    generator = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + iteration)
    lr = models.policy.get_lr()[0]

    def policy_fn(b):
        logps, entropy = policy_logps(models.policy, b, ppo.temperature, chunk, entropy=True)
        loss, m = policy_loss(logps, b["old_logps"], b["policy_advantages"], b["policy_mask"], ppo.clip_eps)
        return loss, {**m, "entropy": entropy}

    def critic_fn(engine, prefix):
        def fn(b):
            values = critic_values(engine, b)
            loss, m = value_loss(values, b[f"{prefix}values"], b[f"{prefix}returns"], b["mask"], ppo.value_clip)
            return loss, {f"{prefix}{k}": v for k, v in m.items()}

        return fn

    totals: dict[str, float] = {}
    updates = ppo.ppo_epochs * (rows // mini) * train.grad_accum
    for _ in range(ppo.ppo_epochs):
        order = torch.randperm(rows, generator=generator)
        for start in range(0, rows, mini):
            idx = order[start : start + mini]
            micro = [rows_of(batch, part) for part in idx.split(train.micro_batch_size)]
            for m in _step(models.policy, micro, "policy_mask", policy_fn, train.grad_accum):
                _add(totals, m, 1 / updates)
            for m in _step(models.critic, micro, "mask", critic_fn(models.critic, ""), train.grad_accum):
                _add(totals, m, 1 / updates)
            if models.cost_critic is not None:
                fn = critic_fn(models.cost_critic, "cost_")
                for m in _step(models.cost_critic, micro, "mask", fn, train.grad_accum):
                    _add(totals, m, 1 / updates)
    metrics.update({f"ppo/{k}": v for k, v in totals.items()})
    metrics["lr"] = lr
    return metrics
