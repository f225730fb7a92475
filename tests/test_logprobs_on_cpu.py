"""Per-token log-probs, causal shift, masked reductions and packed-row sums."""

from __future__ import annotations

import math

import pytest
import torch

from eqrlhf.algorithms.logprobs import (
    fused_token_logprobs,
    masked_mean,
    masked_sum,
    packed_sums,
    seq_ids_from_cu_seqlens,
    seq_ids_from_position_ids,
    shift_for_causal_lm,
    token_logprobs,
)


def test_token_logprobs_by_hand():
    # Row 0 logits [0, 0, ln 2] -> softmax (1/4, 1/4, 1/2); row 1 logits [ln 3, 0, 0] -> (3/5, 1/5, 1/5).
    logits = torch.tensor([[[0.0, 0.0, math.log(2)], [math.log(3), 0.0, 0.0]]])
    labels = torch.tensor([[2, -100]])  # -100 (ignore index) is read as token 0
    out = token_logprobs(logits, labels)
    assert out.dtype == torch.float32
    assert out[0].tolist() == pytest.approx([math.log(1 / 2), math.log(3 / 5)], abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 9, 10, 64])
def test_chunked_equals_full_log_softmax_gather(dtype, chunk_size):
    torch.manual_seed(0)
    logits = (torch.randn(3, 10, 50) * 4).to(dtype)
    labels = torch.randint(0, 50, (3, 10))
    labels[1, 4:] = -100
    expected = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, labels, chunk_size=chunk_size), expected, atol=1e-6)


def test_chunked_gradients_equal_unchunked():
    torch.manual_seed(1)
    base = torch.randn(2, 7, 33)
    labels = torch.randint(0, 33, (2, 7))
    weights = torch.randn(2, 7)
    grads = []
    for chunk_size in (None, 2):
        logits = base.clone().requires_grad_(True)
        (token_logprobs(logits, labels, chunk_size=chunk_size) * weights).sum().backward()
        grads.append(logits.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_token_logprobs_rejects_misaligned_shapes():
    with pytest.raises(ValueError, match=r"logits \(2, 5, 8\) do not align with labels \(2, 4\)"):
        token_logprobs(torch.zeros(2, 5, 8), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        token_logprobs(torch.zeros(1, 5, 8), torch.zeros(1, 5, dtype=torch.long), chunk_size=0)


def test_shift_for_causal_lm():
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1]])
    labels, shifted = shift_for_causal_lm(ids, mask)
    assert labels.tolist() == [[6, 7, 8]]
    assert shifted.tolist() == [[0, 1, 1]]


def test_masked_sum_and_mean_by_hand():
    values = torch.tensor([[1.0, 2.0, float("-inf")], [4.0, float("nan"), 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0]])
    # Masked -inf / nan never leak: row 0 = 1 + 2, row 1 = 4 + 6, row 2 has nothing.
    assert masked_sum(values, mask).tolist() == [3.0, 10.0, 0.0]
    assert masked_mean(values, mask).tolist() == [1.5, 5.0, 0.0]
    assert masked_sum(values[:2, :2], mask[:2, :2].bool(), dim=0).tolist() == [5.0, 2.0]


def test_seq_ids_from_position_ids_and_cu_seqlens():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert seq_ids_from_position_ids(position_ids).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    assert seq_ids_from_cu_seqlens(cu).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert seq_ids_from_cu_seqlens(cu, total_len=11).tolist()[-3:] == [2, -1, -1]
    with pytest.raises(ValueError, match="must start at 0"):
        seq_ids_from_position_ids(torch.tensor([1, 2, 0]))


def test_packed_sums_equal_padded_sums():
    torch.manual_seed(2)
    lengths = [4, 2, 5]
    padded_values = torch.randn(3, 5)
    padded_mask = torch.zeros(3, 5)
    padded_mask[0, 1:4] = 1  # first token of each sequence is a prompt token (mask 0)
    padded_mask[1, 1:2] = 1
    padded_mask[2, 2:5] = 1
    padded = masked_sum(padded_values, padded_mask)

    # The same tokens back to back in one row, plus two padding slots (seq id -1) holding junk.
    values = torch.cat([padded_values[i, :n] for i, n in enumerate(lengths)] + [torch.tensor([99.0, 99.0])])
    mask = torch.cat([padded_mask[i, :n] for i, n in enumerate(lengths)] + [torch.ones(2)])
    cu = torch.tensor([0, 4, 6, 11])
    seq_ids = seq_ids_from_cu_seqlens(cu, total_len=13)
    packed = packed_sums(values[None], mask[None], seq_ids)
    assert packed.shape == (3,)
    assert torch.allclose(packed, padded, atol=1e-6)
    counts = packed_sums(torch.ones_like(values), mask, seq_ids)
    assert counts.tolist() == [3.0, 1.0, 3.0]
    assert packed_sums(values, mask, seq_ids, num_seqs=4)[3] == 0.0


def test_packed_sums_after_causal_shift_match_padded():
    # A packed row run through the causal shift: the position predicting the next sequence's first token
    # is dropped because that token is a prompt token (loss mask 0).
    torch.manual_seed(3)
    logits = torch.randn(1, 9, 16)
    input_ids = torch.randint(0, 16, (1, 9))
    loss_mask = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 1, 1]])
    seq_ids = seq_ids_from_position_ids(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4]))
    labels, mask = shift_for_causal_lm(input_ids, loss_mask)
    per_token = token_logprobs(logits[:, :-1], labels)
    packed = packed_sums(per_token, mask, seq_ids[1:])
    first = masked_sum(token_logprobs(logits[:, :3], input_ids[:, 1:4]), loss_mask[:, 1:4])
    second = masked_sum(token_logprobs(logits[:, 4:8], input_ids[:, 5:9]), loss_mask[:, 5:9])
    assert torch.allclose(packed, torch.cat([first, second]), atol=1e-6)


def test_packed_sums_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match=r"packed values \(4,\), mask \(4,\) and seq_ids \(3,\) differ"):
        packed_sums(torch.zeros(4), torch.ones(4), torch.zeros(3, dtype=torch.long))


def test_compiled_logprobs_and_layers_match_eager():
    # train.compile: the compiled log-prob kernel and compiled decoder layers give the eager values and
    # gradients (bf16 logits included, and a -100 label at a masked position).
    from eqrlhf.models.loading import compile_decoder_layers, tiny_llama

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(2, 7, 50).to(dtype).requires_grad_()
        labels = torch.randint(0, 50, (2, 7))
        labels[1, 6] = -100
        eager = token_logprobs(logits, labels, chunk_size=3)
        fused = fused_token_logprobs(logits, labels)
        assert fused.dtype == torch.float32
        assert torch.allclose(fused, eager, atol=1e-5)
        (g_eager,) = torch.autograd.grad(eager[:, :6].sum(), logits)
        (g_fused,) = torch.autograd.grad(fused[:, :6].sum(), logits)
        assert torch.allclose(g_fused.float(), g_eager.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-5)

    ids = torch.randint(0, 256, (2, 9))
    eager_model, compiled_model = tiny_llama(seed=1), tiny_llama(seed=1)
    assert compile_decoder_layers(compiled_model) == 2
    outs = []
    for model in (eager_model, compiled_model):
        logits = model(input_ids=ids).logits
        logits.float().logsumexp(-1).sum().backward()
        outs.append((logits.detach(), model.lm_head.weight.grad))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-4)
