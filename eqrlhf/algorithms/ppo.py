"""The PPO family in pure torch: KL-shaped rewards, GAE, clipped losses, the AMA-PPO critic mask, PPO-Lagrangian.

Layout shared by every function: tensors are ``[B, T]`` in the *label frame* of a causal LM
(position t holds the log-prob of token t+1, see ``logprobs.shift_for_causal_lm``), and ``mask`` is the
0/1 response mask in that frame: one contiguous run of 1s per row (the response), 0 on prompt and padding.
``values[:, t]`` is the critic's value of the state before response token t+1 is emitted (the scalar head
at position t, i.e. of the prefix ending at token t). Token means are over all kept tokens of the batch
(sum of mask-weighted values / sum of mask), never per row first.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from eqrlhf.algorithms.ama import ama_mask
from eqrlhf.algorithms.logprobs import masked_sum


def token_mean(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean over every kept token of the batch (not a mean of row means); 0 when nothing is kept."""
    mask = mask.to(values.dtype)
    return (values.masked_fill(mask == 0, 0.0) * mask).sum() / mask.sum().clamp(min=eps)


# ---- KL and rewards ---------------------------------------------------------------------------------------


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """log pi - log pi_ref: unbiased per-token KL estimate (can be negative)."""
    return logp - ref_logp


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """(r - 1) - log r with r = pi_ref / pi: unbiased, always >= 0, lower variance (Schulman's k3)."""
    log_ratio = ref_logp - logp
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


def last_token_index(mask: Tensor) -> Tensor:
    """[B] index of the last kept position of every row (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask > 0, positions, -1).max(dim=1).values.clamp(min=0)


def first_token_index(mask: Tensor) -> Tensor:
    """[B] index of the first kept position of every row (0 for an empty row)."""
    width = mask.shape[1]
    positions = torch.arange(width, device=mask.device).expand_as(mask)
    first = torch.where(mask > 0, positions, width).min(dim=1).values
    return torch.where(first == width, torch.zeros_like(first), first)


def shaped_rewards(
    logp: Tensor, ref_logp: Tensor, mask: Tensor, scores: Tensor, kl_coef: float, kl_estimator: str = "k1"
) -> tuple[Tensor, Tensor]:
    """Token rewards r_t = -kl_coef * KL_t on every response token, plus the sequence score on the last one.

    ``scores`` is [B] (reward model at the last token, or a rule). Returns ``(rewards, kl)``, both [B, T]
    and 0 outside the mask; ``kl`` is the per-token estimate (k1 or k3) the penalty used.
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; known: {sorted(KL_ESTIMATORS)}")
    mask = mask.float()
    kl = KL_ESTIMATORS[kl_estimator](logp.float(), ref_logp.float()) * mask
    rewards = -kl_coef * kl
    last = last_token_index(mask)
    has_response = mask.sum(dim=1) > 0
    bonus = torch.where(has_response, scores.float(), torch.zeros_like(scores, dtype=torch.float32))
    rewards = rewards.scatter_add(1, last.unsqueeze(1), bonus.unsqueeze(1))
    return rewards, kl


def terminal_rewards(mask: Tensor, scores: Tensor) -> Tensor:
    """[B, T] with the sequence score on the last response token only (the cost signal of PPO-Lagrangian)."""
    zero = torch.zeros_like(mask, dtype=torch.float32)
    rewards, _ = shaped_rewards(zero, zero, mask, scores, kl_coef=0.0)
    return rewards


# ---- advantages ---------------------------------------------------------------------------------------------


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the response tokens of every row.

    delta_t = r_t + gamma * V_{t+1} - V_t with V after the last response token = 0 (the episode ends);
    A_t = delta_t + gamma * lam * A_{t+1}. Returns ``(advantages, returns)`` with returns = A + V, both [B, T]
    and 0 outside the mask.
    """
    mask = mask.float()
    rewards, values = rewards.float() * mask, values.float() * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    width = rewards.shape[1]
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def masked_moments(values: Tensor, mask: Tensor) -> Tensor:
    """float64 [sum, sum of squares, count] over kept entries: all-reduce them to whiten across workers."""
    mask = mask.double()
    values = values.double().masked_fill(mask == 0, 0.0)
    return torch.stack([(values * mask).sum(), (values**2 * mask).sum(), mask.sum()])


def whiten(values: Tensor, mask: Tensor, moments: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over kept entries (population variance); 0 outside the mask.

    ``moments`` ([sum, sumsq, count], e.g. summed over workers by the trainer) defaults to this tensor's own.
    """
    total, squares, count = (masked_moments(values, mask) if moments is None else moments).tolist()
    if count == 0:
        return torch.zeros_like(values)
    mean = total / count
    var = max(squares / count - mean**2, 0.0)
    out = (values - mean) / math.sqrt(var + eps)
    return out * mask.to(out.dtype)


# ---- losses -------------------------------------------------------------------------------------------------


def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate: token mean over the mask of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

    Metrics: ``clip_frac`` (kept tokens where the clipped term is the larger one, i.e. gradient is cut),
    ``approx_kl`` (token mean of (ratio - 1) - log ratio, the k3 estimate of KL(old || new)), ``ratio``.
    """
    log_ratio = (logp - old_logp).float()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = token_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "policy_loss": loss.detach(),
            "clip_frac": token_mean((clipped > unclipped).float(), mask),
            "approx_kl": token_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio": token_mean(ratio, mask),
        }
    return loss, metrics


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, value_clip: float | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """0.5 * token mean of max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clamp(V - V_old, -c, c).

    ``value_clip=None`` gives the plain squared error. ``value_clip_frac``: tokens where the clipped error
    is the larger one.
    """
    values = values.float()
    error = (values - returns) ** 2
    if value_clip is None:
        worst, clip_frac = error, torch.zeros_like(error)
    else:
        clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
        clipped_error = (clipped - returns) ** 2
        worst = torch.maximum(error, clipped_error)
        clip_frac = (clipped_error > error).float()
    loss = 0.5 * token_mean(worst, mask)
    with torch.no_grad():
        metrics = {"value_loss": loss.detach(), "value_clip_frac": token_mean(clip_frac, mask)}
    return loss, metrics


def masked_entropy(logits: Tensor, mask: Tensor, chunk_size: int | None = 256) -> Tensor:
    """Token-mean entropy of softmax(logits) [B, T, V] over the mask, float32 chunk by chunk, no gradient."""
    with torch.no_grad():
        width = logits.shape[1]
        step = width if not chunk_size else chunk_size
        parts = []
        for start in range(0, width, step):
            part = logits[:, start : start + step].float()
            logp = torch.log_softmax(part, dim=-1)
            parts.append(-(logp.exp() * logp).sum(-1))
        return token_mean(torch.cat(parts, dim=1), mask)


# ---- AMA-PPO ------------------------------------------------------------------------------------------------


def sequence_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """[B] the (unwhitened) GAE advantage at the first response token: the episode's discounted return minus
    the critic's value of the prompt, i.e. "score minus baseline" for the whole sample."""
    return advantages.gather(1, first_token_index(mask).unsqueeze(1)).squeeze(1)


def critic_value_mask(
    values: Tensor,
    mask: Tensor,
    seq_advantages: Tensor,
    *,
    baseline: float | str = 0.0,
    rule: str = "sign",
    tau: float = 0.3,
    normalize: str = "none",
) -> tuple[Tensor, dict[str, Tensor]]:
    """AMA-PPO (docs/method.md section 2.6): a sample with advantage >= b keeps tokens with V_t > b, else tokens with V_t < b.

    ``baseline`` b is a number or "batch_mean" (then V_t is compared with the mean value over the batch's
    response tokens and the sample advantage with the mean sample advantage). A token with V_t == b is kept
    in neither case; a row whose mask comes out empty falls back to its full response mask. With the default
    ``rule="sign", normalize="none"`` this is exactly the rule above; ``hysteresis`` / ``zscore`` apply
    eqrlhf.algorithms.ama's other rule to the values instead. The mask is meant for the policy loss only
    (critic and KL stay unmasked). Returns the float32 mask and ama_mask's metrics (kept_fraction,
    fallback_fraction, ...).
    """
    if isinstance(baseline, str):
        is_positive = seq_advantages >= seq_advantages.float().mean()
    else:
        is_positive = seq_advantages >= baseline
    return ama_mask(values, mask, is_positive, rule=rule, baseline=baseline, tau=tau, normalize=normalize)


# ---- PPO-Lagrangian (Safe-RLHF) -----------------------------------------------------------------------------


def lagrangian_advantages(reward_advantages: Tensor, cost_advantages: Tensor, lam: float) -> Tensor:
    """(A_r - lambda * A_c) / (1 + lambda): maximise reward, minimise cost, on the reward's scale."""
    return (reward_advantages - lam * cost_advantages) / (1.0 + lam)


def update_log_lambda(
    log_lambda: float, mean_episode_cost: float, cost_threshold: float, lr: float, lambda_max: float | None = None
) -> float:
    """One gradient-ascent step of log(lambda) on J_c - d: log_lambda + lr * (mean cost - threshold).

    lambda grows while episodes cost more than the threshold and shrinks otherwise (the sign of Safe-RLHF's
    update, whose Lagrangian term is lambda * (J_c - d)); ``lambda_max`` caps lambda.
    """
    new = log_lambda + lr * (mean_episode_cost - cost_threshold)
    if lambda_max is not None:
        new = min(new, math.log(lambda_max))
    return new


def sequence_kl(kl: Tensor, mask: Tensor) -> Tensor:
    """[B] summed per-token KL over each response (what "KL to the reference" reports)."""
    return masked_sum(kl, mask)
