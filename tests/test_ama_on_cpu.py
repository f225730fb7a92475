"""AMA masks: z-scoring, the sign and hysteresis rules, fallback, and where gradients may flow."""

from __future__ import annotations

import math

import pytest
import torch

from eqrlhf.algorithms.ama import ama_mask, hysteresis_mask, sign_mask, zscore
from eqrlhf.algorithms.logprobs import masked_sum, shift_for_causal_lm, token_logprobs
from eqrlhf.algorithms.losses import LossInputs, compute_loss
from eqrlhf.models.loading import tiny_llama

POS, NEG = torch.tensor([True]), torch.tensor([False])


def test_zscore_by_hand():
    scores = torch.tensor([[9.0, 1.0, 2.0, 3.0], [5.0, 4.0, 7.0, 7.0]])
    response = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]])
    z = zscore(scores, response)
    # Row 0: mean 2, population std sqrt(2/3) -> +-1 / sqrt(2/3) = +-1.2247; prompt position -> 0.
    assert z[0].tolist() == pytest.approx([0.0, -math.sqrt(1.5), 0.0, math.sqrt(1.5)], abs=1e-5)
    # Row 1: a single response token has std 0 and normalises to 0.
    assert z[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_sign_mask_constant_baseline():
    scores = torch.tensor([[0.5, -0.25, 0.0, 1.0]])
    response = torch.tensor([[1, 1, 1, 0]])
    # A score equal to the baseline is kept in neither row kind; position 3 is outside the response.
    assert sign_mask(scores, response, POS).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert sign_mask(scores, response, NEG).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert sign_mask(scores, response, POS, baseline=0.5).tolist() == [[0.0, 0.0, 0.0, 0.0]]
    assert sign_mask(scores, response, NEG, baseline=0.5).tolist() == [[0.0, 1.0, 1.0, 0.0]]


def test_sign_mask_batch_mean_baseline():
    scores = torch.tensor([[1.0, 2.0, 100.0], [3.0, 6.0, -100.0]])
    response = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # Batch mean over response tokens only: (1 + 2 + 3 + 6) / 4 = 3 (the +-100 prompt scores are ignored).
    mask = sign_mask(scores, response, torch.tensor([True, False]), baseline="batch_mean")
    assert mask.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]  # 1, 2 are not > 3; 3 is not < 3, 6 is not < 3
    mask = sign_mask(scores, response, torch.tensor([False, True]), baseline="batch_mean")
    assert mask.tolist() == [[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="'batch_mean'"):
        sign_mask(scores, response, POS.repeat(2), baseline="median")


def test_hysteresis_band_edges():
    tau = 0.5
    # Prompt positions (response 0) hold extreme scores that must not move the segment sign.
    scores = torch.tensor([[-9.0, 0.25, 0.5, -0.5, -0.75, 0.0, 0.5, 0.75, -1.0, -9.0]])
    response = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1, 0]])
    # Segment sign: starts +1; s == +tau and s == -tau do not flip; -0.75 < -tau flips to -1 (that token
    # included); 0.5 == tau keeps -1; 0.75 > tau flips back to +1; -1.0 flips to -1.
    segment = [+1, +1, +1, +1, -1, -1, -1, +1, -1]
    expected_pos = [0.0] + [1.0 if s == 1 else 0.0 for s in segment[1:]] + [0.0]
    expected_neg = [0.0] + [1.0 if s == -1 else 0.0 for s in segment[1:]] + [0.0]
    assert hysteresis_mask(scores, response, POS, tau).tolist() == [expected_pos]
    assert hysteresis_mask(scores, response, NEG, tau).tolist() == [expected_neg]


def test_hysteresis_default_tau_edges_and_batch():
    # The default tau = 0.3 against float32 scores of exactly 0.3 / -0.3: no flip.
    scores = torch.tensor([[0.3, -0.3, -0.3, 0.2], [0.1, -0.31, 0.3, 0.31]])
    response = torch.ones_like(scores)
    mask = hysteresis_mask(scores, response, torch.tensor([True, False]))
    assert mask.tolist() == [[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]]


def test_ama_mask_fallback_and_metrics():
    scores = torch.tensor(
        [
            [0.0, 1.0, -1.0, 2.0],  # positive: sign keeps 1.0 and 2.0
            [0.0, -1.0, -2.0, 0.0],  # positive, every score <= 0: empty -> falls back to the 3 response tokens
            [0.0, 1.0, -1.0, 0.0],  # negative: keeps -1.0
            [5.0, 5.0, 0.0, 0.0],  # negative, response is the last two tokens only: empty -> fallback (2)
        ]
    )
    response = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 0], [0, 0, 1, 1]])
    is_positive = torch.tensor([True, True, False, False])
    mask, metrics = ama_mask(scores, response, is_positive, rule="sign", normalize="none")
    assert mask.tolist() == [
        [0.0, 1.0, 0.0, 1.0],
        [0.0, 1.0, 1.0, 1.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0, 1.0],
    ]
    # Response tokens: 3 + 3 + 2 + 2 = 10. Kept: 2 + 3 + 1 + 2 = 8; before fallback 2 + 0 + 1 + 0 = 3.
    assert metrics["kept_fraction"].item() == pytest.approx(8 / 10)
    assert metrics["kept_fraction_before_fallback"].item() == pytest.approx(3 / 10)
    assert metrics["fallback_fraction"].item() == pytest.approx(2 / 4)
    assert metrics["kept_fraction_pos"].item() == pytest.approx(5 / 6)
    assert metrics["kept_fraction_neg"].item() == pytest.approx(3 / 4)
    assert mask.dtype == torch.float32 and mask.shape == scores.shape


def test_rows_with_flat_scores_keep_their_whole_answer_under_every_rule():
    """ama.categories writes zeros for the pairs it leaves out; every rule must then train their whole answers
    (plain DPO on them), mixed in a batch with scored rows."""
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 2.0, -3.0, 1.0], [0.0, -2.0, 3.0, 0.5]])
    response = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0], [0, 1, 1, 1], [0, 1, 1, 1]])
    is_positive = torch.tensor([True, False, True, False])
    settings = [
        {"rule": "hysteresis", "normalize": "zscore"},
        {"rule": "hysteresis", "normalize": "none", "tau": 0.0},
        {"rule": "sign", "normalize": "zscore"},
        {"rule": "sign", "normalize": "none", "baseline": 0.7},
        {"rule": "sign", "normalize": "none", "baseline": "batch_mean"},  # the scored rows move the mean
    ]
    for kwargs in settings:
        mask, _ = ama_mask(scores, response, is_positive, **kwargs)
        assert mask[:2].tolist() == response[:2].float().tolist(), kwargs
        assert mask[2:].sum() < response[2:].sum(), kwargs  # the scored rows are masked


def test_ama_mask_zscore_then_hysteresis():
    # Row scores 1, 2, 3, 10 -> mean 4, std sqrt((9 + 4 + 1 + 36) / 4) = sqrt(12.5) = 3.5355:
    # z = -0.849, -0.566, -0.283, 1.697. With tau 0.3: flips to -1 at the first token, back to +1 at the last.
    scores = torch.tensor([[1.0, 2.0, 3.0, 10.0]])
    response = torch.ones_like(scores)
    mask, metrics = ama_mask(scores, response, POS, rule="hysteresis", tau=0.3)
    assert mask.tolist() == [[0.0, 0.0, 0.0, 1.0]]
    mask, _ = ama_mask(scores, response, NEG, rule="hysteresis", tau=0.3)
    assert mask.tolist() == [[1.0, 1.0, 1.0, 0.0]]
    # Same z-scores under the sign rule: positive keeps z > 0 only.
    mask, metrics = ama_mask(scores, response, POS, rule="sign")
    assert mask.tolist() == [[0.0, 0.0, 0.0, 1.0]]
    assert metrics["kept_fraction"].item() == pytest.approx(1 / 4)
    assert metrics["kept_fraction_neg"].item() == 0.0  # no negative rows


def test_ama_mask_errors_name_the_problem():
    scores = torch.tensor([[0.0, float("nan")], [0.0, 1.0]])
    response = torch.tensor([[1, 1], [1, 1]])
    with pytest.raises(ValueError, match=r"not finite on response tokens of batch row\(s\) \[0\]"):
        ama_mask(scores, response, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="rule must be one of"):
        ama_mask(scores.nan_to_num(), response, torch.tensor([True, False]), rule="window")
    with pytest.raises(ValueError, match=r"is_positive must be \[B\] = \[2\]"):
        ama_mask(scores.nan_to_num(), response, torch.tensor([True]))
    with pytest.raises(ValueError, match=r"scores \(2, 2\) and response_mask \(2, 3\)"):
        zscore(scores, torch.ones(2, 3))
    # A NaN outside the response (e.g. a prompt position the scorer skipped) is fine.
    mask, _ = ama_mask(scores, torch.tensor([[1, 0], [1, 1]]), torch.tensor([True, False]), normalize="none")
    assert mask.tolist() == [[1.0, 0.0], [1.0, 1.0]]  # both rows keep nothing under the rule and fall back


def _pair_batch(seed: int = 0):
    torch.manual_seed(seed)
    input_ids = torch.randint(0, 256, (4, 10))  # rows 0, 1 chosen; rows 2, 3 rejected
    response = torch.zeros(4, 10, dtype=torch.long)
    response[:, 4:] = 1
    response[1, 8:] = 0  # a shorter response
    return input_ids, response


def test_all_ones_ama_mask_equals_unmasked_loss():
    input_ids, response = _pair_batch()
    policy, reference = tiny_llama(seed=0), tiny_llama(seed=1)
    labels, mask = shift_for_causal_lm(input_ids, response)
    with torch.no_grad():
        policy_lp = token_logprobs(policy(input_ids).logits[:, :-1], labels)
        ref_lp = token_logprobs(reference(input_ids).logits[:, :-1], labels)
    # Scores every rule keeps in full: chosen rows far above +tau, rejected rows far below -tau.
    scores = torch.where(torch.arange(4)[:, None] < 2, 5.0, -5.0).expand(4, 9).clone()
    ama, metrics = ama_mask(scores, mask, torch.tensor([True, True, False, False]), normalize="none")
    assert torch.equal(ama, mask.float()) and metrics["kept_fraction"].item() == 1.0

    def inputs(m):
        p, r = masked_sum(policy_lp, m), masked_sum(ref_lp, m)
        return LossInputs(p[:2], p[2:], r[:2], r[2:])

    for base in ("dpo", "ipo", "cdpo"):
        plain, _ = compute_loss(base, inputs(mask), beta=0.1, label_smoothing=0.1)
        masked, _ = compute_loss(f"ama_{base}", inputs(mask * ama), beta=0.1, label_smoothing=0.1)
        assert torch.equal(plain, masked)


def test_gradients_reach_only_kept_tokens():
    input_ids, response = _pair_batch(seed=1)
    model = tiny_llama(seed=0)
    labels, mask = shift_for_causal_lm(input_ids, response)
    scores = torch.randn(4, 9)
    ama, _ = ama_mask(scores, mask, torch.tensor([True, True, False, False]), rule="hysteresis")
    kept = mask * ama
    assert 0 < kept.sum() < mask.sum()  # the mask really removes some response tokens

    logits = model(input_ids).logits
    logits.retain_grad()
    per_token = token_logprobs(logits[:, :-1], labels, chunk_size=4)
    sums = masked_sum(per_token, kept)
    loss, _ = compute_loss("ama_dpo", LossInputs(sums[:2], sums[2:], sums[:2].detach(), sums[2:].detach()))
    loss.backward()

    grad = logits.grad[:, :-1]
    row_norms = grad.abs().sum(-1)
    assert (row_norms[kept == 0] == 0).all()  # exactly zero at every dropped position
    assert (row_norms[kept == 1] > 0).all()
    assert (logits.grad[:, -1] == 0).all()  # the last position predicts nothing
    assert model.model.embed_tokens.weight.grad is not None
