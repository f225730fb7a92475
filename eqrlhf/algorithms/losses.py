"""Loss registry: preference (DPO family, BFPO), likelihood (SFT) and scalar-head (reward, cost) losses by name.

Every loss takes a ``LossInputs`` and keyword params (``beta``, ``label_smoothing``, ``bfpo_alpha``,
``bfpo_tau``; a loss ignores those it does not use) and returns ``(loss, metrics)``: a scalar tensor with
gradient and a dict of detached scalars, ``metrics["loss"]`` included.

Reduction and gradient accumulation. Pair losses (dpo, ipo, cdpo, bfpo, reward, cost and their ama_
variants) are the MEAN over the pairs of the batch; sft / ama_sft is the mean over kept TOKENS of the whole
batch (sum of -mask*logp over all rows / sum of mask). ``reduction_units(name, inputs)`` gives the count a
loss averages over (pairs, or kept tokens). To make k micro-batches reproduce one big batch exactly, the
trainer scales each micro-batch loss by ``units_micro / units_step`` before backward, where ``units_step``
is the sum of ``reduction_units`` over all micro-batches of the optimizer step (and over data-parallel ranks
if gradients are summed; if they are averaged, as DDP and DeepSpeed do, multiply the scale by the world
size). For pair losses with equal micro-batch sizes this is the familiar ``loss / grad_accum_steps``; for
sft it is not, since micro-batches hold different token counts.

Preference metrics: ``rewards/chosen`` and ``rewards/rejected`` (means of beta * (policy - reference)
log-prob sums), ``rewards/margin``, ``rewards/accuracy`` (fraction of pairs with chosen reward > rejected
reward), ``logps/chosen``, ``logps/rejected``. Scalar-head metrics: ``accuracy``, ``scores/chosen``,
``scores/rejected``, ``scores/margin`` (and, for cost, ``cost/sign_accuracy``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from eqrlhf.algorithms.catalog import LossInfo, loss_info
from eqrlhf.algorithms.logprobs import masked_sum


@dataclass
class LossInputs:
    policy_chosen_logps: Tensor | None = None  # [B] masked sums of per-token log-probs (response mask x AMA mask)
    policy_rejected_logps: Tensor | None = None
    ref_chosen_logps: Tensor | None = None  # [B] reference, summed with the SAME mask as the policy
    ref_rejected_logps: Tensor | None = None
    token_logps: Tensor | None = None  # [B, T] for sft / masked NLL
    token_mask: Tensor | None = None  # [B, T] 0/1
    chosen_scores: Tensor | None = None  # [B] scalar-head outputs (reward / cost models)
    rejected_scores: Tensor | None = None
    chosen_safe: Tensor | None = None  # [B] bool, per-response safety labels (bfpo, cost)
    rejected_safe: Tensor | None = None
    chosen_lengths: Tensor | None = None  # [B] kept chosen tokens (exmate's length-normalised NLL)


@dataclass(frozen=True)
class LossParams:
    beta: float = 0.1
    label_smoothing: float = 0.0
    bfpo_alpha: float = 0.5
    bfpo_tau: float = 0.01
    exmate_clm_weight: float = 1.0


LossFn = Callable[[LossInputs, LossParams], tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    requires: tuple[str, ...]  # LossInputs fields the function reads
    info: LossInfo  # what the loss needs from the data and the trainer (eqrlhf.algorithms.catalog)


LOSSES: dict[str, LossSpec] = {}

PAIR_LOGPS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
PAIR_SCORES = ("chosen_scores", "rejected_scores")
SAFETY = ("chosen_safe", "rejected_safe")
TOKENS = ("token_logps", "token_mask")


def register(name: str, *, requires: tuple[str, ...]):
    """Add a loss function to ``LOSSES`` under ``name``, a name declared in the catalog."""

    def decorator(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        info = loss_info(name)  # raises for a name the catalog does not declare
        if info.kind == "online":
            raise ValueError(f"loss {name!r} is an online (PPO) loss: eqrlhf.algorithms.ppo computes it")
        LOSSES[name] = LossSpec(fn, requires, info)
        return fn

    return decorator


def _spec(name: str) -> LossSpec:
    loss_info(name)  # an unknown name: a ValueError naming the closest known loss
    if name not in LOSSES:
        raise ValueError(f"loss {name!r} has no offline function: the PPO trainer (eqrlhf.train.ppo) computes it")
    return LOSSES[name]


def reduction_units(name: str, inputs: LossInputs) -> Tensor:
    """How many units the loss averages over: pairs in the batch, or kept tokens for sft (see module doc)."""
    spec = _spec(name)
    if spec.info.units == "tokens":
        return inputs.token_mask.float().sum()
    return torch.tensor(float(len(getattr(inputs, spec.requires[0]))))


def compute_loss(name: str, inputs: LossInputs, **params: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Compute the registered loss ``name``; raises ValueError for unknown names and missing inputs."""
    spec = _spec(name)
    known = {f.name for f in fields(LossParams)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise TypeError(f"loss {name!r}: unknown parameter(s) {unknown}; known: {sorted(known)}")
    missing = [field for field in spec.requires if getattr(inputs, field) is None]
    if missing:
        raise ValueError(f"loss {name!r} needs LossInputs field(s) {missing}")
    sizes = {field: tuple(getattr(inputs, field).shape) for field in spec.requires}
    if len({shape[0] if shape else None for shape in sizes.values()}) != 1:
        raise ValueError(f"loss {name!r}: inputs disagree on the batch size: {sizes}")
    return spec.fn(inputs, LossParams(**params))


# ---- preference losses on summed log-probs ------------------------------------------------------------------


def _logratios(inputs: LossInputs) -> tuple[Tensor, Tensor]:
    chosen = inputs.policy_chosen_logps - inputs.ref_chosen_logps
    rejected = inputs.policy_rejected_logps - inputs.ref_rejected_logps
    return chosen, rejected


def _preference_metrics(loss: Tensor, inputs: LossInputs, beta: float) -> dict[str, Tensor]:
    chosen, rejected = _logratios(inputs)
    chosen_rewards, rejected_rewards = beta * chosen.detach().float(), beta * rejected.detach().float()
    return {
        "loss": loss.detach(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": inputs.policy_chosen_logps.detach().float().mean(),
        "logps/rejected": inputs.policy_rejected_logps.detach().float().mean(),
    }


def _dpo(inputs: LossInputs, p: LossParams) -> tuple[Tensor, dict[str, Tensor]]:
    """-log sigmoid(beta * h), h = (pi_c - ref_c) - (pi_r - ref_r) (Rafailov et al. 2023)."""
    chosen, rejected = _logratios(inputs)
    loss = -F.logsigmoid(p.beta * (chosen - rejected)).mean()
    return loss, _preference_metrics(loss, inputs, p.beta)


def _ipo(inputs: LossInputs, p: LossParams) -> tuple[Tensor, dict[str, Tensor]]:
    """(h - 1/(2 beta))^2 on summed log-ratios (Azar et al. 2023, eq. 17, beta = their tau).

    trl 1.16 divides each log-ratio by its completion length first; we do not, so that AMA masks (which
    change the kept-token count) act on the same summed quantity as in DPO. For comparable settings use a
    smaller beta for long responses.
    """
    chosen, rejected = _logratios(inputs)
    loss = ((chosen - rejected - 1.0 / (2.0 * p.beta)) ** 2).mean()
    return loss, _preference_metrics(loss, inputs, p.beta)


def _cdpo(inputs: LossInputs, p: LossParams) -> tuple[Tensor, dict[str, Tensor]]:
    """Conservative DPO: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), eps = label_smoothing."""
    if not 0.0 <= p.label_smoothing < 0.5:
        raise ValueError(f"cdpo label_smoothing must be in [0, 0.5), got {p.label_smoothing}")
    chosen, rejected = _logratios(inputs)
    logits = p.beta * (chosen - rejected)
    eps = p.label_smoothing
    loss = (-(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)).mean()
    return loss, _preference_metrics(loss, inputs, p.beta)


# The ama_ variants run the same math: the caller sums log-probs under the AMA mask (docs/method.md section 2.5).
for _name, _fn in (("dpo", _dpo), ("ipo", _ipo), ("cdpo", _cdpo)):
    register(_name, requires=PAIR_LOGPS)(_fn)
    register(f"ama_{_name}", requires=PAIR_LOGPS)(_fn)


@register("bfpo", requires=PAIR_LOGPS + SAFETY)
def _bfpo(inputs: LossInputs, p: LossParams) -> tuple[Tensor, dict[str, Tensor]]:
    """BFPO (Zhang et al. 2024, arXiv 2408.15313): mean of (h - g / tau)^2.

    h is the unmasked DPO log-ratio difference between the more-helpful (chosen) and the less-helpful
    (rejected) response, g = 1.5 * safe(chosen) - 0.5 * safe(rejected) - alpha, alpha = ``bfpo_alpha``,
    tau = ``bfpo_tau``. Conventions checked against the authors' code (wx-zhang/bfpo, BFPOTrainer.bfpo):
    their 1.5 and 0.5 come from b1 = 3, b3 = 1 / (b1 - 1); their tau is passed as the DPO ``beta`` (0.01 in
    their recipe); h uses token-summed log-probs (no length normalisation), as here. Reported implicit
    rewards use ``beta`` like the DPO family, not tau.
    """
    chosen, rejected = _logratios(inputs)
    target = 1.5 * inputs.chosen_safe.float() - 0.5 * inputs.rejected_safe.float() - p.bfpo_alpha
    loss = ((chosen - rejected - target / p.bfpo_tau) ** 2).mean()
    metrics = _preference_metrics(loss, inputs, p.beta)
    metrics["bfpo/target"] = target.mean()
    return loss, metrics


# ---- likelihood ---------------------------------------------------------------------------------------------


def _sft(inputs: LossInputs, p: LossParams) -> tuple[Tensor, dict[str, Tensor]]:
    """Masked NLL, token-level mean over the whole batch: -sum(mask * logp) / sum(mask).

    Long responses weigh more than short ones (each token counts once), the usual SFT convention; an
    all-masked batch gives 0 with no gradient.
    """
    if inputs.token_logps.shape != inputs.token_mask.shape:
        raise ValueError(
            f"sft: token_logps {tuple(inputs.token_logps.shape)} and token_mask {tuple(inputs.token_mask.shape)} differ"
        )
    tokens = inputs.token_mask.float().sum()
    loss = -masked_sum(inputs.token_logps, inputs.token_mask, dim=None) / tokens.clamp(min=1.0)
    return loss, {"loss": loss.detach(), "sft/tokens": tokens}


register("sft", requires=TOKENS)(_sft)
register("ama_sft", requires=TOKENS)(_sft)
# controllable generation (eqrlhf.control): conditional LM = sft on rows whose prompt carries control tags
register("clm", requires=TOKENS)(_sft)


@register("exmate", requires=("policy_chosen_logps", "policy_rejected_logps", "chosen_lengths"))
def _exmate(inputs: LossInputs, p: LossParams) -> tuple[Tensor, dict[str, Tensor]]:
    """Pairwise reading of ExMATE (Tuan et al. 2024, arXiv 2404.01295): policy only, no reference.

    With x the prompt carrying the control tags of y+, y- a response to the same prompt whose tags
    differ, s(y) = sum_t log p(y_t | x, y_<t) and |y+| the number of y+ tokens:

        L = mean over pairs of [ -log sigmoid(s(y+) - s(y-)) + w * ( -s(y+) / |y+| ) ],  w = exmate_clm_weight

    The first term is the 2-way softmax cross-entropy -log(e^s(y+) / (e^s(y+) + e^s(y-))): the matching
    response must become more likely than the mismatching one under the requested control; the second keeps
    the per-token likelihood of the matching response up, so the contrast is not won by pushing y- down only.
    """
    chosen, rejected = inputs.policy_chosen_logps, inputs.policy_rejected_logps
    contrastive = -F.logsigmoid(chosen - rejected)
    nll = -chosen / inputs.chosen_lengths.float().clamp(min=1.0)
    loss = (contrastive + p.exmate_clm_weight * nll).mean()
    return loss, {
        "loss": loss.detach(),
        "exmate/contrastive": contrastive.detach().mean(),
        "exmate/clm": nll.detach().mean(),
        "logps/chosen": chosen.detach().float().mean(),
        "logps/rejected": rejected.detach().float().mean(),
        "rewards/accuracy": (chosen.detach() > rejected.detach()).float().mean(),
    }


# ---- scalar heads (reward and cost models) ------------------------------------------------------------------


def _score_metrics(loss: Tensor, inputs: LossInputs, correct: Tensor) -> dict[str, Tensor]:
    chosen, rejected = inputs.chosen_scores.detach().float(), inputs.rejected_scores.detach().float()
    return {
        "loss": loss.detach(),
        "accuracy": correct.float().mean(),
        "scores/chosen": chosen.mean(),
        "scores/rejected": rejected.mean(),
        "scores/margin": (chosen - rejected).mean(),
    }


@register("reward", requires=PAIR_SCORES)
def _reward(inputs: LossInputs, p: LossParams) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry: mean of -log sigmoid(r_chosen - r_rejected); accuracy = r_chosen > r_rejected."""
    margin = inputs.chosen_scores - inputs.rejected_scores
    loss = -F.logsigmoid(margin).mean()
    return loss, _score_metrics(loss, inputs, margin.detach() > 0)


@register("cost", requires=PAIR_SCORES + SAFETY)
def _cost(inputs: LossInputs, p: LossParams) -> tuple[Tensor, dict[str, Tensor]]:
    """Safe-RLHF cost model (Dai et al. 2023, arXiv 2310.12773, eq. 6); chosen is the SAFER response.

    Mean of -log sigmoid(c_rejected - c_chosen) - log sigmoid(s_c c_chosen) - log sigmoid(s_r c_rejected),
    with s = +1 for an unsafe response and -1 for a safe one, so cost > 0 means unsafe. Same as the
    authors' sequence-wise loss (safe_rlhf/values/cost/trainer.py: higher-cost = our rejected); their
    optional score regulariser is not included. ``accuracy`` counts pairs ranked right (c_rejected >
    c_chosen); ``cost/sign_accuracy`` the responses whose cost sign matches their label.
    """
    c_chosen, c_rejected = inputs.chosen_scores, inputs.rejected_scores
    s_chosen = 1.0 - 2.0 * inputs.chosen_safe.float()  # safe -> -1, unsafe -> +1
    s_rejected = 1.0 - 2.0 * inputs.rejected_safe.float()
    loss = (
        -F.logsigmoid(c_rejected - c_chosen) - F.logsigmoid(s_chosen * c_chosen) - F.logsigmoid(s_rejected * c_rejected)
    ).mean()
    metrics = _score_metrics(loss, inputs, (c_rejected - c_chosen).detach() > 0)
    signs_right = torch.cat([(s_chosen * c_chosen).detach() > 0, (s_rejected * c_rejected).detach() > 0])
    metrics["cost/sign_accuracy"] = signs_right.float().mean()
    return loss, metrics
