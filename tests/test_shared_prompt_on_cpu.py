"""train.share_prompt: one row per pair (prompt, chosen, rejected) gives the same log-probs, losses and
gradients as the stacked rows, on a tiny random Llama with the SmolLM2 tokenizer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_train_on_cpu import _examples, make_model_dir, pair_rows, train_config

from eqrlhf.algorithms.logprobs import masked_sum
from eqrlhf.train.batching import collate, collate_sequences
from eqrlhf.train.loop import StepSpec, micro_loss, prepare_batch
from eqrlhf.train.policy_forward import sequence_logps, shared_prompt_layout


def test_layout_by_hand():
    # pair 0: prompt [1, 2], chosen [3, 4, 5], rejected [6]; pair 1: prompt [7], chosen [8], rejected [9, 10, 11]
    prompts, responses = [[1, 2], [7], [1, 2], [7]], [[3, 4, 5], [8], [6], [9, 10, 11]]
    batch = collate_sequences(prompts, responses, pad_id=0)
    layout = shared_prompt_layout(batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    assert layout["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 0]]
    assert layout["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2], [0, 1, 1, 2, 3, 0]]
    # label t of stacked row r (token t+1) -> flat index of the shared position predicting it; width 6
    assert layout["source"].tolist() == [
        [-1, 1, 2, 3],  # chosen 3, 4, 5 from positions 1, 2, 3
        [0 + 6, -1, -1, -1],  # chosen 8 from position 0 of pair 1
        [-1, 1, -1, -1],  # rejected 6 from the last prompt position, like chosen 3
        [0 + 6, 2 + 6, 3 + 6, -1],  # rejected 9 from the prompt; 10, 11 from the rejected segment (2, 3)
    ]
    allowed = layout["allowed"].int()
    assert allowed[0, 5].tolist() == [1, 1, 0, 0, 0, 1]  # rejected sees the prompt and itself, not chosen
    assert allowed[0, 4].tolist() == [1, 1, 1, 1, 1, 0]  # chosen is causal over prompt + chosen
    assert allowed[1, 4].tolist() == [1, 0, 1, 1, 1, 0]
    assert allowed[1, 5].tolist() == [0, 0, 0, 0, 0, 1]  # padding sees only itself: no empty softmax row


def test_rows_with_different_prompts_are_refused():
    batch = collate_sequences([[1, 2], [1, 3]], [[4], [5]], pad_id=0)
    with pytest.raises(ValueError, match="rows 0 and 1 of the batch do not share their prompt"):
        shared_prompt_layout(batch["input_ids"], batch["attention_mask"], batch["response_mask"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_equals_stacked_rows(tmp_path, model_dir, attention):
    """Same per-token log-probs, same DPO loss (with an in-trainer reference) and same gradients."""
    from eqrlhf.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    policy = load_causal_lm(str(model_dir))
    policy.config._attn_implementation = attention
    torch.manual_seed(3)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    reference = load_causal_lm(str(model_dir)).eval()
    stacked = StepSpec.from_config(train_config(tmp_path / "r", model_dir))
    shared = dataclasses.replace(stacked, share_prompt=True)
    examples = _examples(tokenizer, pair_rows(5))  # prompts and responses of different lengths: rows pad differently

    results = {}
    for name, spec in (("stacked", stacked), ("shared", shared)):
        batch, _ = prepare_batch(collate(examples, tokenizer.pad_token_id, "dpo"), spec, "cpu")
        assert ("allowed" in batch["plan"]) == spec.share_prompt  # the plan the forward will follow
        kept = batch["loss_mask"].bool()
        policy.zero_grad()
        logps = sequence_logps(policy, batch, spec)
        loss, metrics = micro_loss(policy, reference, batch, spec)
        loss.backward()
        results[name] = (logps.detach(), loss.item(), metrics, [p.grad.clone() for p in policy.parameters()])
    (logps_a, loss_a, metrics_a, grads_a), (logps_b, loss_b, metrics_b, grads_b) = results.values()
    assert torch.allclose(logps_a[kept], logps_b[kept], atol=1e-5)
    assert torch.all(logps_b[~kept] == 0)
    assert loss_b == pytest.approx(loss_a, abs=1e-6)
    for key in metrics_a:
        # sums over whole sequences (about -145) differ in the last float32 bit or two: relative tolerance
        assert float(metrics_b[key]) == pytest.approx(float(metrics_a[key]), rel=1e-6, abs=1e-5)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, atol=1e-6)
    assert masked_sum(logps_b, batch["loss_mask"]).shape == (10,)
