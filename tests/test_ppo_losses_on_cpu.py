"""The PPO family's pure functions against values computed by hand on small tensors, and the reward rules."""

from __future__ import annotations

import math

import pytest
import torch

from eqrlhf.algorithms.ppo import (
    critic_value_mask,
    gae,
    lagrangian_advantages,
    masked_entropy,
    masked_moments,
    policy_loss,
    sequence_advantages,
    shaped_rewards,
    terminal_rewards,
    update_log_lambda,
    value_loss,
    whiten,
)
from eqrlhf.config import ConfigError
from eqrlhf.train.rewards import Episode, get_rule


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual.float(), torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


# label frame: position 0 is a prompt token (mask 0), then the response
MASK = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])


def test_kl_shaped_rewards_k1_and_k3():
    logp = torch.tensor([[9.0, -1.0, -2.0, -0.5]])
    ref = torch.tensor([[0.0, -1.5, -1.0, -0.5]])
    mask = MASK[:1]
    rewards, kl = shaped_rewards(logp, ref, mask, torch.tensor([2.0]), kl_coef=0.1)
    # k1 = logp - ref = [., 0.5, -1.0, 0]; r = -0.1 * k1, the score 2 lands on the last response token
    close(kl, [[0.0, 0.5, -1.0, 0.0]])
    close(rewards, [[0.0, -0.05, 0.1, 2.0]])
    _, kl3 = shaped_rewards(logp, ref, mask, torch.tensor([2.0]), kl_coef=0.1, kl_estimator="k3")
    # k3 = (e^x - 1) - x with x = ref - logp = [-0.5, 1.0, 0]
    close(kl3, [[0.0, math.exp(-0.5) - 1 + 0.5, math.e - 2, 0.0]])
    # a padded row: the score goes to its last response token (index 2), never to padding
    assert terminal_rewards(MASK, torch.tensor([1.0, 3.0])).tolist() == [[0, 0, 0, 1.0], [0, 0, 3.0, 0]]
    with pytest.raises(ValueError, match="unknown kl_estimator 'k2'"):
        shaped_rewards(logp, ref, mask, torch.tensor([2.0]), 0.1, "k2")


def test_gae_by_hand_with_prompt_and_padding():
    rewards = torch.tensor([[0.0, 0.1, -0.2, 1.0], [0.0, 0.5, 1.0, 7.0]])  # 7.0 sits on padding
    values = torch.tensor([[9.0, 0.5, 0.4, 0.3], [9.0, 0.2, 0.6, 5.0]])  # 9.0 on the prompt, 5.0 on padding
    adv, ret = gae(rewards, values, MASK, gamma=0.9, lam=0.8)
    # row 0: d3 = 1 - .3 = .7; d2 = -.2 + .9*.3 - .4 = -.33; d1 = .1 + .9*.4 - .5 = -.04
    #        A3 = .7; A2 = -.33 + .72*.7 = .174; A1 = -.04 + .72*.174 = .08528
    # row 1: V after its last token is 0 (episode ends): d2 = 1 - .6 = .4; d1 = .5 + .9*.6 - .2 = .84
    #        A2 = .4; A1 = .84 + .72*.4 = 1.128
    close(adv, [[0.0, 0.08528, 0.174, 0.7], [0.0, 1.128, 0.4, 0.0]])
    close(ret, [[0.0, 0.58528, 0.574, 1.0], [0.0, 1.328, 1.0, 0.0]])
    close(sequence_advantages(adv, MASK), [0.08528, 1.128])
    # gamma = lam = 1: the advantage is the return-to-go minus the value
    adv1, _ = gae(rewards, values, MASK, gamma=1.0, lam=1.0)
    close(adv1[0, 1:], [0.9 - 0.5, 0.8 - 0.4, 1.0 - 0.3])


def test_whiten_over_kept_tokens_and_with_given_moments():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = whiten(x, mask)
    s = math.sqrt(2 / 3 + 1e-8)
    close(out, [[-1 / s, 0.0, 1 / s, 0.0]])
    assert masked_moments(x, mask).tolist() == [6.0, 14.0, 3.0]
    # moments of a larger batch (e.g. summed over workers): mean 0, variance 4 -> x / 2
    close(whiten(x, mask, torch.tensor([0.0, 4.0, 1.0], dtype=torch.float64)), [[0.5, 1.0, 1.5, 0.0]])


def test_policy_loss_clips_on_both_sides():
    ratio = torch.tensor([[1.5, 0.5, 1.1, 1.5, 10.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the wild last token is masked out
    old = torch.zeros_like(ratio)
    logp = ratio.log().requires_grad_()
    loss, metrics = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # per token max(-A r, -A clip(r)): -1.2 (clipped above), 0.8 (clipped below), -2.2, 1.5 (pessimistic: unclipped)
    assert float(loss.detach()) == pytest.approx((-1.2 + 0.8 - 2.2 + 1.5) / 4)
    assert float(metrics["clip_frac"]) == pytest.approx(0.5)
    kl = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1, 1.5)]
    assert float(metrics["approx_kl"]) == pytest.approx(sum(kl) / 4, abs=1e-6)
    loss.backward()
    # d/dlogp of -A r = -A r / 4 where not clipped; clipped tokens and the masked token get no gradient
    close(logp.grad, [[0.0, 0.0, -2.2 / 4, 1.5 / 4, 0.0]])


def test_losses_average_over_all_kept_tokens_of_the_batch():
    zeros = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # rows of 3 and 1 response tokens
    adv = torch.tensor([[1.0, 1.0, 1.0], [4.0, 9.0, 9.0]])
    loss, _ = policy_loss(zeros, zeros, adv, mask, clip_eps=0.2)
    assert float(loss) == pytest.approx(-(1 + 1 + 1 + 4) / 4)  # not the mean of row means, -2.5
    returns = torch.tensor([[1.0, 1.0, 1.0], [3.0, 5.0, 5.0]])
    loss, _ = value_loss(zeros, zeros, returns, mask, value_clip=None)
    assert float(loss) == pytest.approx(0.5 * (1 + 1 + 1 + 9) / 4)


def test_value_loss_clipped_and_plain():
    values = torch.tensor([[1.0, 1.5, 2.0, 50.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 1.9, 0.0]])
    returns = torch.tensor([[0.0, 1.4, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, metrics = value_loss(values, old, returns, mask, value_clip=0.2)
    # errors 1, 0.01, 1; clipped values 0.7, 0.7, 2.0 -> errors 0.49, 0.49, 1; max: 1, 0.49, 1
    assert float(loss.detach()) == pytest.approx(0.5 * (1 + 0.49 + 1) / 3)
    assert float(metrics["value_clip_frac"]) == pytest.approx(1 / 3)
    loss.backward()
    # token 2's clipped error wins and is flat in V (V moved past the clip range): no gradient there
    close(values.grad, [[1.0 / 3, 0.0, -1.0 / 3, 0.0]])
    plain, _ = value_loss(values, old, returns, mask, value_clip=None)
    assert float(plain.detach()) == pytest.approx(0.5 * (1 + 0.01 + 1) / 3)


def test_entropy_of_uniform_and_peaked_rows():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert float(masked_entropy(logits, mask, chunk_size=1)) == pytest.approx(math.log(4) / 2, abs=1e-6)


def test_critic_mask_rule_at_the_boundary_and_fallback():
    values = torch.tensor([[0.5, 0.0, -0.3], [0.5, 0.0, -0.3], [0.0, -1.0, -2.0]])
    mask = torch.ones(3, 3)
    seq_adv = torch.tensor([0.0, -1.0, 1.0])  # advantage == b counts as ">= b": row 0 is positive
    kept, metrics = critic_value_mask(values, mask, seq_adv, baseline=0.0)
    # positive rows keep V > 0 (V == 0 is not kept), the negative row keeps V < 0; row 2 keeps nothing
    # with V > 0 and falls back to its whole response
    assert kept.tolist() == [[1, 0, 0], [0, 0, 1], [1, 1, 1]]
    assert float(metrics["kept_fraction"]) == pytest.approx(5 / 9)
    assert float(metrics["fallback_fraction"]) == pytest.approx(1 / 3)
    assert float(metrics["kept_fraction_before_fallback"]) == pytest.approx(2 / 9)
    # b = -0.5 and position 0 outside the response: row 0 keeps V > -0.5 on the response only (not V_0 = 0.5);
    # rows 1 (V < -0.5) and 2 (V > -0.5) keep nothing and fall back to their response
    response = torch.tensor([[0.0, 1, 1]] * 3)
    kept, metrics = critic_value_mask(values, response, seq_adv, baseline=-0.5)
    assert kept.tolist() == [[0, 1, 1]] * 3
    assert float(metrics["fallback_fraction"]) == pytest.approx(2 / 3)


def test_lagrangian_advantages_and_lambda_update_sign():
    combined = lagrangian_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0]), lam=1.0)
    assert combined.tolist() == [0.25, 1.5]  # (A_r - 1 * A_c) / 2
    assert update_log_lambda(0.0, 1.0, 0.2, lr=0.1) == pytest.approx(0.08)  # costlier than allowed: lambda up
    assert update_log_lambda(0.0, 0.0, 0.2, lr=0.1) == pytest.approx(-0.02)  # cheaper: lambda down
    assert update_log_lambda(math.log(2), 10.0, 0.0, lr=1.0, lambda_max=3.0) == pytest.approx(math.log(3))


def test_reward_rules():
    def episode(text, category, ids=(1, 2, 3)):
        return Episode(text, ids, category, "stop", max_new_tokens=12)

    refusal, answer = "I can't help with that.", "Sure, first you take the lid off."
    safe = get_rule("safe_refusal")
    assert [safe(episode(refusal, "EHD")), safe(episode(answer, "IHD"))] == [1.0, -1.0]
    assert [safe(episode(answer, "none")), safe(episode(refusal, "none"))] == [1.0, -1.0]
    cost = get_rule("harmful_compliance", "ppo.cost_rule")
    assert [cost(episode(answer, "MHD")), cost(episode(refusal, "MHD")), cost(episode(answer, "none"))] == [1, 0, 0]
    assert get_rule("length")(episode(answer, None)) == 0.25  # 3 of 12 tokens
    assert get_rule("brevity")(episode(answer, None)) == 0.75
    with pytest.raises(ConfigError, match="ppo.cost_rule: unknown rule 'always_onee' \\(did you mean 'always_one'"):
        get_rule("always_onee", "ppo.cost_rule")
