"""Loss registry: every loss against hand arithmetic, DPO against trl 1.16, and gradient accumulation."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from eqrlhf.algorithms.catalog import CATALOG, loss_info
from eqrlhf.algorithms.logprobs import masked_sum, shift_for_causal_lm, token_logprobs
from eqrlhf.algorithms.losses import LOSSES, PAIR_LOGPS, LossInputs, compute_loss, reduction_units, register
from eqrlhf.models.loading import tiny_llama


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def pair_inputs() -> LossInputs:
    # Log-ratios: chosen  (-10 + 11, -20 + 19, -5 + 6)  = (1, -1, 1)
    #             rejected (-12 + 11, -18 + 19, -9 + 6) = (-1, 1, -3)
    # so h = chosen - rejected = (2, -2, 4).
    return LossInputs(
        policy_chosen_logps=torch.tensor([-10.0, -20.0, -5.0]),
        policy_rejected_logps=torch.tensor([-12.0, -18.0, -9.0]),
        ref_chosen_logps=torch.tensor([-11.0, -19.0, -6.0]),
        ref_rejected_logps=torch.tensor([-11.0, -19.0, -6.0]),
    )


def test_dpo_by_hand():
    loss, m = compute_loss("dpo", pair_inputs(), beta=0.1)
    # -log sigmoid(0.1 h) = softplus(-0.1 h) for h = 2, -2, 4.
    expected = (softplus(-0.2) + softplus(0.2) + softplus(-0.4)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["loss"].item() == pytest.approx(expected, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.1 * (1 - 1 + 1) / 3, abs=1e-6)
    assert m["rewards/rejected"].item() == pytest.approx(0.1 * (-1 + 1 - 3) / 3, abs=1e-6)
    assert m["rewards/margin"].item() == pytest.approx(0.1 * (2 - 2 + 4) / 3, abs=1e-6)
    assert m["rewards/accuracy"].item() == pytest.approx(2 / 3)
    assert m["logps/chosen"].item() == pytest.approx(-35 / 3, abs=1e-5)
    assert m["logps/rejected"].item() == pytest.approx(-13.0, abs=1e-5)


def test_ipo_by_hand():
    loss, m = compute_loss("ipo", pair_inputs(), beta=0.1)
    # (h - 1 / (2 * 0.1))^2 = (h - 5)^2: 9, 49, 1 -> mean 59 / 3.
    assert loss.item() == pytest.approx(59 / 3, abs=1e-4)
    assert m["rewards/accuracy"].item() == pytest.approx(2 / 3)


def test_cdpo_by_hand():
    loss, _ = compute_loss("cdpo", pair_inputs(), beta=0.1, label_smoothing=0.1)
    # 0.9 * softplus(-0.1 h) + 0.1 * softplus(0.1 h)
    rows = [0.9 * softplus(-0.1 * h) + 0.1 * softplus(0.1 * h) for h in (2, -2, 4)]
    assert loss.item() == pytest.approx(sum(rows) / 3, abs=1e-6)
    plain, _ = compute_loss("dpo", pair_inputs(), beta=0.1)
    zero_eps, _ = compute_loss("cdpo", pair_inputs(), beta=0.1, label_smoothing=0.0)
    assert torch.equal(plain, zero_eps)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\), got 0.5"):
        compute_loss("cdpo", pair_inputs(), label_smoothing=0.5)


def test_bfpo_by_hand():
    inputs = pair_inputs()
    inputs.chosen_safe = torch.tensor([True, False, True])
    inputs.rejected_safe = torch.tensor([False, False, True])
    loss, m = compute_loss("bfpo", inputs, bfpo_alpha=0.5, bfpo_tau=0.01)
    # g = 1.5 s_c - 0.5 s_r - 0.5 = (1.0, -0.5, 0.5); g / tau = (100, -50, 50); h = (2, -2, 4)
    # (2 - 100)^2 + (-2 + 50)^2 + (4 - 50)^2 = 9604 + 2304 + 2116 = 14024
    assert loss.item() == pytest.approx(14024 / 3, rel=1e-6)
    assert m["bfpo/target"].item() == pytest.approx(1.0 / 3)
    with pytest.raises(ValueError, match=r"'bfpo' needs LossInputs field\(s\) \['chosen_safe', 'rejected_safe'\]"):
        compute_loss("bfpo", pair_inputs())


def test_sft_token_mean_by_hand():
    inputs = LossInputs(
        token_logps=torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]]),
        token_mask=torch.tensor([[1, 1, 0], [0, 1, 1]]),
    )
    loss, m = compute_loss("sft", inputs)
    # Kept: -1, -2, -5, -6 -> 14 / 4 tokens (a per-row mean would give (1.5 + 5.5) / 2 = 3.5 too, so check units)
    assert loss.item() == pytest.approx(3.5)
    assert m["sft/tokens"].item() == 4.0
    uneven = LossInputs(token_logps=inputs.token_logps, token_mask=torch.tensor([[1, 0, 0], [1, 1, 1]]))
    # Token mean (1 + 4 + 5 + 6) / 4 = 4, not the row mean (1 + 5) / 2 = 3.
    assert compute_loss("ama_sft", uneven)[0].item() == pytest.approx(4.0)
    assert reduction_units("sft", uneven).item() == 4.0
    with pytest.raises(ValueError, match=r"token_logps \(2, 3\) and token_mask \(2, 2\) differ"):
        compute_loss("sft", LossInputs(token_logps=inputs.token_logps, token_mask=torch.ones(2, 2)))


def test_reward_bradley_terry_by_hand():
    inputs = LossInputs(chosen_scores=torch.tensor([1.0, 0.0]), rejected_scores=torch.tensor([0.0, 2.0]))
    loss, m = compute_loss("reward", inputs)
    # -log sigmoid(1) = softplus(-1); -log sigmoid(-2) = softplus(2)
    assert loss.item() == pytest.approx((softplus(-1) + softplus(2)) / 2, abs=1e-6)
    assert m["accuracy"].item() == 0.5
    assert m["scores/chosen"].item() == 0.5 and m["scores/rejected"].item() == 1.0
    assert m["scores/margin"].item() == -0.5


def test_cost_model_by_hand():
    inputs = LossInputs(
        chosen_scores=torch.tensor([-1.0, 0.5]),  # chosen is the safer response
        rejected_scores=torch.tensor([2.0, -0.5]),
        chosen_safe=torch.tensor([True, False]),
        rejected_safe=torch.tensor([False, False]),
    )
    loss, m = compute_loss("cost", inputs)
    # Row 0: -ls(2 - (-1)) - ls(-1 * -1) - ls(+1 * 2) = softplus(-3) + softplus(-1) + softplus(-2)
    # Row 1: -ls(-0.5 - 0.5) - ls(+1 * 0.5) - ls(+1 * -0.5) = softplus(1) + softplus(-0.5) + softplus(0.5)
    row0 = softplus(-3) + softplus(-1) + softplus(-2)
    row1 = softplus(1) + softplus(-0.5) + softplus(0.5)
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    assert m["accuracy"].item() == 0.5  # row 0 ranked right (2 > -1), row 1 not (-0.5 < 0.5)
    assert m["cost/sign_accuracy"].item() == 0.75  # only row 1's rejected cost has the wrong sign


def test_registry_names_and_errors():
    assert set(LOSSES) == {"dpo", "ipo", "cdpo", "ama_dpo", "ama_ipo", "ama_cdpo", "bfpo", "exmate"} | {
        "sft",
        "ama_sft",
        "clm",
        "reward",
        "cost",
    }
    # every offline loss the catalog declares has a function, and only those
    assert set(LOSSES) == {name for name, info in CATALOG.items() if info.kind != "online"}
    assert (
        loss_info("ama_dpo").uses_reference and loss_info("bfpo").uses_reference and not loss_info("sft").uses_reference
    )
    assert not loss_info("reward").uses_reference and not loss_info("cost").uses_reference
    assert loss_info("ama_ipo").ama and not loss_info("ipo").ama and loss_info("ama_sft").ama
    assert loss_info("bfpo").safety_labels and loss_info("cost").safety_labels and not loss_info("dpo").safety_labels
    assert LOSSES["sft"].info.units == "tokens" and LOSSES["dpo"].info.units == "pairs"
    with pytest.raises(ValueError, match=r"unknown loss 'ama_dop'.*did you mean 'ama_dpo'"):
        compute_loss("ama_dop", pair_inputs())
    with pytest.raises(ValueError, match=r"unknown loss 'ppp' \(did you mean 'ppo'\?\); known losses:"):
        loss_info("ppp")
    with pytest.raises(ValueError, match="not declared|unknown loss 'mine'"):
        register("mine", requires=PAIR_LOGPS)(lambda inputs, p: None)
    with pytest.raises(ValueError, match="online"):
        register("ppo", requires=PAIR_LOGPS)(lambda inputs, p: None)
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) \['betta'\]"):
        compute_loss("dpo", pair_inputs(), betta=0.1)
    short = pair_inputs()
    short.ref_rejected_logps = short.ref_rejected_logps[:2]
    with pytest.raises(ValueError, match="disagree on the batch size"):
        compute_loss("dpo", short)


def test_dpo_matches_trl_dpo_trainer(tmp_path):
    """Our log-probs + masked sums + dpo loss against trl 1.16's DPOTrainer._compute_loss on the same batch.

    trl's DPO loss lives inside DPOTrainer._compute_loss (no standalone function), so we build a real
    DPOTrainer with two tiny random Llamas and SmolLM2's tokenizer, collate a batch with its own collator,
    and compare the loss, the gradient it produces and its logged reward metrics with ours computed from
    plain model logits. Loss type "sigmoid" (DPO) and "ipo"; trl's IPO divides each log-ratio by the
    completion length, which we reproduce by feeding length-normalised sums to our (summed) ipo loss.
    """
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from eqrlhf.models.loading import cache_dir, load_tokenizer

    if not (cache_dir() / "smollm2-135m" / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 tokenizer not materialised in the eqrlhf cache")
    tok = load_tokenizer("smollm2-135m")
    policy, reference = tiny_llama(vocab_size=len(tok), seed=0), tiny_llama(vocab_size=len(tok), seed=1)
    rows = [
        ("How do I kill a Python process?", "Find its PID, then run kill PID.", "I can't help with that."),
        ("Say hi.", "Hi there, friend!", "No."),
        ("What is 2 + 2?", "4.", "Two plus two is five, of course."),
    ]
    ds = datasets.Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": p}],
                "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}],
            }
            for p, c, r in rows
        ]
    )
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=0.1, report_to=[], use_cpu=True, max_length=128)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])  # [chosen..., rejected...]

    def our_sums(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels, mask = shift_for_causal_lm(batch["input_ids"], batch["completion_mask"])
        return masked_sum(token_logprobs(logits[:, :-1], labels, chunk_size=16), mask), mask

    for loss_type in ("sigmoid", "ipo"):
        trainer.loss_types, trainer._metrics["train"] = [loss_type], defaultdict(list)
        policy.zero_grad()
        trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
        trl_loss.backward()
        trl_grad = policy.model.layers[0].self_attn.q_proj.weight.grad.clone()

        policy.zero_grad()
        sums, mask = our_sums(policy)
        with torch.no_grad():
            ref_sums, _ = our_sums(reference)
        if loss_type == "ipo":  # trl's per-token normalisation, applied to policy and reference alike
            lengths = mask.sum(1).clamp(min=1)
            sums, ref_sums = sums / lengths, ref_sums / lengths
        n = len(rows)
        inputs = LossInputs(sums[:n], sums[n:], ref_sums[:n], ref_sums[n:])
        ours, metrics = compute_loss("dpo" if loss_type == "sigmoid" else "ipo", inputs, beta=0.1)
        ours.backward()
        assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
        assert torch.allclose(policy.model.layers[0].self_attn.q_proj.weight.grad, trl_grad, rtol=1e-4, atol=1e-7)
        if loss_type == "sigmoid":
            logged = trainer._metrics["train"]
            for ours_key, trl_key in [
                ("rewards/chosen", "rewards/chosen"),
                ("rewards/rejected", "rewards/rejected"),
                ("rewards/margin", "rewards/margins"),
                ("rewards/accuracy", "rewards/accuracies"),
                ("logps/chosen", "logps/chosen"),
            ]:
                assert metrics[ours_key].item() == pytest.approx(logged[trl_key][-1], rel=1e-5, abs=1e-6)


def _accumulation_batch():
    """8 pairs of length-12 sequences with response masks of different lengths (no padding involved)."""
    torch.manual_seed(4)
    input_ids = torch.randint(0, 256, (16, 12))  # rows 0..7 chosen, 8..15 rejected
    mask = torch.zeros(16, 12)
    for row in range(16):
        mask[row, 3 + row % 5 :] = 1  # response starts after a prompt of 3..7 tokens
    return input_ids, mask


def _micro_loss(name, policy, reference, input_ids, mask):
    labels, shifted = shift_for_causal_lm(input_ids, mask)
    per_token = token_logprobs(policy(input_ids).logits[:, :-1], labels)
    if name == "sft":
        inputs = LossInputs(token_logps=per_token, token_mask=shifted)
    else:
        with torch.no_grad():
            ref = masked_sum(token_logprobs(reference(input_ids).logits[:, :-1], labels), shifted)
        sums, half = masked_sum(per_token, shifted), len(input_ids) // 2
        inputs = LossInputs(sums[:half], sums[half:], ref[:half], ref[half:])
    loss, _ = compute_loss(name, inputs, beta=0.1)
    return loss, reduction_units(name, inputs)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("name", ["dpo", "sft"])
def test_eight_micro_batches_of_one_equal_one_batch_of_eight(name):
    input_ids, mask = _accumulation_batch()
    policy, reference = tiny_llama(seed=0), tiny_llama(seed=1)
    # sft trains on the chosen rows only; dpo on pairs (chosen i, rejected i).
    rows = [[i] for i in range(8)] if name == "sft" else [[i, i + 8] for i in range(8)]
    full_rows = list(range(8)) if name == "sft" else list(range(16))

    loss, _ = _micro_loss(name, policy, reference, input_ids[full_rows], mask[full_rows])
    loss.backward()
    full = _grads(policy)

    # The rule from losses.py: scale each micro-batch loss by units_micro / units_step.
    units_step = sum(reduction_units_of(name, mask[r]) for r in rows)
    policy.zero_grad()
    naive = []
    for r in rows:
        micro, units = _micro_loss(name, policy, reference, input_ids[r], mask[r])
        assert units.item() == reduction_units_of(name, mask[r])
        (micro * units / units_step).backward()
        naive.append(micro.detach())
    assert torch.allclose(_grads(policy), full, rtol=1e-4, atol=1e-7)

    naive_mean = torch.stack(naive).mean()  # loss / grad_accum_steps
    if name == "dpo":
        assert naive_mean.item() == pytest.approx(loss.item(), rel=1e-5)
    else:  # responses of 5..9 kept tokens: the plain mean of per-micro-batch means is not the token mean
        assert abs(naive_mean.item() - loss.item()) > 1e-3


def reduction_units_of(name: str, mask_rows: torch.Tensor) -> float:
    """Units of a micro-batch known before its forward pass (what a trainer computes from the batch)."""
    return float(mask_rows[:, 1:].sum()) if name == "sft" else float(len(mask_rows) // 2)
