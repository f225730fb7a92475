"""Adaptive message-wise alignment (AMA): turn per-token scores into 0/1 gradient masks.

Scores s_t come from a scorer (reward of each prefix, DPO implicit reward per token, or the PPO value); see
docs/method.md section 2. Every function takes ``scores`` [B, T], ``response_mask`` [B, T] (1 on response tokens) and
``is_positive`` [B] (True for chosen responses / samples with advantage >= b, False for rejected ones) and
returns a float32 mask of the same shape as ``scores``, 0 outside the response. Scores are treated as
constants: nothing here carries gradient.

Rules:
- ``sign`` (the authors' code): keep positive-row tokens with s_t > b and negative-row tokens with s_t < b;
  a score equal to the baseline is kept in neither.
- ``hysteresis`` (the paper's figure): a segment sign starts at +1 and changes only on response tokens: to
  -1 at a token with s_t < -tau, back to +1 at a token with s_t > +tau (strict: s_t == +-tau changes
  nothing). The flipping token belongs to the new segment. Positive rows keep tokens of +1 segments,
  negative rows tokens of -1 segments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from eqrlhf.algorithms.logprobs import masked_mean

RULES = ("sign", "hysteresis")
NORMALIZATIONS = ("zscore", "none")


def _check_inputs(scores: Tensor, response_mask: Tensor, is_positive: Tensor | None = None) -> None:
    if scores.dim() != 2 or scores.shape != response_mask.shape:
        raise ValueError(
            f"AMA scores {tuple(scores.shape)} and response_mask {tuple(response_mask.shape)} must both be [B, T]"
        )
    if is_positive is not None and tuple(is_positive.shape) != (scores.shape[0],):
        raise ValueError(f"AMA is_positive must be [B] = [{scores.shape[0]}], got {tuple(is_positive.shape)}")
    bad = (~torch.isfinite(scores) & (response_mask > 0)).any(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"AMA scores are not finite on response tokens of batch row(s) {rows}")


def zscore(scores: Tensor, response_mask: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-row (s - mean) / (std + eps) over response tokens, population std; 0 outside the response.

    A row whose response scores are all equal (or a single token) normalises to all zeros.
    """
    _check_inputs(scores, response_mask)
    scores = scores.detach().float()
    mask = response_mask.float()
    mean = masked_mean(scores, mask).unsqueeze(1)
    std = masked_mean((scores - mean) ** 2, mask).sqrt().unsqueeze(1)
    z = (scores - mean) / (std + eps)
    return torch.where(mask > 0, z, torch.zeros_like(z))


def resolve_baseline(scores: Tensor, response_mask: Tensor, baseline: float | str) -> float:
    """A constant baseline, or "batch_mean": the mean score over all response tokens of the batch."""
    if isinstance(baseline, str):
        if baseline != "batch_mean":
            raise ValueError(f"AMA baseline must be a number or 'batch_mean', got {baseline!r}")
        mask = response_mask > 0
        return float(scores.detach().float()[mask].mean()) if mask.any() else 0.0
    return float(baseline)


def sign_mask(scores: Tensor, response_mask: Tensor, is_positive: Tensor, baseline: float | str = 0.0) -> Tensor:
    """Keep positive-row tokens with s_t > b and negative-row tokens with s_t < b."""
    _check_inputs(scores, response_mask, is_positive)
    b = resolve_baseline(scores, response_mask, baseline)
    scores = scores.detach().float()
    positive = is_positive.bool().unsqueeze(1)
    keep = torch.where(positive, scores > b, scores < b) & (response_mask > 0)
    return keep.float()


def hysteresis_mask(scores: Tensor, response_mask: Tensor, is_positive: Tensor, tau: float = 0.3) -> Tensor:
    """Keep tokens whose hysteresis segment sign agrees with the row label (+1 positive, -1 negative)."""
    _check_inputs(scores, response_mask, is_positive)
    if tau < 0:
        raise ValueError(f"AMA hysteresis tau must be >= 0, got {tau}")
    scores = scores.detach().float()
    response = response_mask > 0
    # Each response token beyond the band is an "event" that sets the sign; the segment sign at t is the
    # sign of the last event at or before t (+1 before any event). cummax over event positions finds it
    # without a Python loop over T.
    event = torch.zeros_like(scores, dtype=torch.long)
    event = torch.where(response & (scores > tau), 1, event)
    event = torch.where(response & (scores < -tau), -1, event)
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(event)
    last_event = torch.where(event != 0, positions, -1).cummax(dim=1).values
    segment = torch.where(last_event >= 0, event.gather(1, last_event.clamp(min=0)), 1)
    wanted = torch.where(is_positive.bool(), 1, -1).unsqueeze(1)
    return ((segment == wanted) & response).float()


def _fraction(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator as a float32 scalar, 0 when the denominator is 0 (no such tokens or rows)."""
    numerator, denominator = numerator.float(), denominator.float()
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), torch.zeros_like(numerator))


def ama_mask(
    scores: Tensor,
    response_mask: Tensor,
    is_positive: Tensor,
    *,
    rule: str = "hysteresis",
    baseline: float | str = 0.0,
    tau: float = 0.3,
    normalize: str = "zscore",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Normalise the scores, apply the rule, and fall back to the full response where the mask is empty.

    Returns the float32 0/1 mask and detached scalar metrics (0 where the denominator is empty):
    - ``kept_fraction``: kept tokens / response tokens, on the final mask (after fallback);
    - ``kept_fraction_before_fallback``: the same for the rule's own mask;
    - ``fallback_fraction``: rows with response tokens whose rule mask was empty / all rows;
    - ``kept_fraction_pos`` / ``kept_fraction_neg``: ``kept_fraction`` over positive / negative rows.
    With ``normalize="zscore"`` every row has mean 0, so ``baseline="batch_mean"`` is (numerically) 0;
    it is meant for raw scores (``normalize="none"``).
    """
    if rule not in RULES:
        raise ValueError(f"AMA rule must be one of {RULES}, got {rule!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"AMA normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    _check_inputs(scores, response_mask, is_positive)
    response = (response_mask > 0).float()
    normed = zscore(scores, response_mask) if normalize == "zscore" else scores.detach().float()
    if rule == "sign":
        raw = sign_mask(normed, response_mask, is_positive, baseline)
    else:
        raw = hysteresis_mask(normed, response_mask, is_positive, tau)

    raw_kept = raw.sum(dim=1)
    response_len = response.sum(dim=1)
    fell_back = (raw_kept == 0) & (response_len > 0)
    mask = torch.where(fell_back.unsqueeze(1), response, raw)

    kept = mask.sum(dim=1)
    positive = is_positive.bool()
    metrics = {
        "kept_fraction": _fraction(kept.sum(), response_len.sum()),
        "kept_fraction_before_fallback": _fraction(raw_kept.sum(), response_len.sum()),
        "fallback_fraction": _fraction(fell_back.sum(), torch.tensor(len(fell_back))),
        "kept_fraction_pos": _fraction(kept[positive].sum(), response_len[positive].sum()),
        "kept_fraction_neg": _fraction(kept[~positive].sum(), response_len[~positive].sum()),
    }
    return mask, metrics
