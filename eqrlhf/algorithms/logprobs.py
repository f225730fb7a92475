"""Per-token log-probabilities and masked reductions, for padded and packed batches.

Pure torch: tensors in, tensors out. Conventions shared by every caller:

- ``logits`` are already aligned with ``labels``: ``logits[:, t]`` predicts ``labels[:, t]``. For a causal LM
  run on ``input_ids`` use ``labels, mask = shift_for_causal_lm(input_ids, loss_mask)`` with ``logits[:, :-1]``.
- Masks are 0/1 (float or bool). Reductions never let a masked value leak in, even a non-finite one, and
  the gradient reaching a masked position is exactly zero.
- Sums are plain sums over kept tokens (the DPO convention: S(y; m) = sum_t m_t log p(y_t)); means divide by
  the number of kept tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _gathered_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label] in float32, for one chunk."""
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logprobs(logits: Tensor, labels: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Return log p(labels[b, t]) under logits[b, t] as a float32 [B, T] tensor.

    Labels may hold any value at masked positions; negatives (the -100 ignore index) are read as token 0 so
    the gather stays in range, and the caller's mask removes them. With ``chunk_size`` the float32
    log-softmax runs over ``chunk_size`` positions at a time, so the full [B, T, V] float32 copy of
    (possibly bf16) logits never exists at once; under autograd each chunk is recomputed in backward
    (activation checkpointing) for the same reason, at the cost of one extra chunk-wise log-softmax.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not align with labels {tuple(labels.shape)}")
    labels = labels.long().clamp(min=0)
    seq_len = labels.shape[-1]
    if chunk_size is None or chunk_size >= seq_len:
        return _gathered_logprobs(logits, labels)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    recompute = torch.is_grad_enabled() and logits.requires_grad
    chunks = []
    for start in range(0, seq_len, chunk_size):
        part_logits = logits[:, start : start + chunk_size]
        part_labels = labels[:, start : start + chunk_size]
        if recompute:
            chunks.append(checkpoint(_gathered_logprobs, part_logits, part_labels, use_reentrant=False))
        else:
            chunks.append(_gathered_logprobs(part_logits, part_labels))
    return torch.cat(chunks, dim=1)


_compiled_logprobs = None


def fused_token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """``token_logprobs`` as one ``torch.compile``'d kernel, same conventions.

    The float32 upcast, log-sum-exp and gather fuse into one pass over the (bf16) logits, and the backward
    writes the logits' gradient directly, so no [B, T, V] float32 tensor exists and chunking is not needed.
    Compiled once per process with dynamic shapes (batch and length vary from step to step).
    """
    global _compiled_logprobs
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not align with labels {tuple(labels.shape)}")
    if _compiled_logprobs is None:
        _compiled_logprobs = torch.compile(_gathered_logprobs, dynamic=True)
    return _compiled_logprobs(logits, labels.long().clamp(min=0))


def shift_for_causal_lm(input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Labels and mask for next-token prediction: position t of ``logits[:, :-1]`` predicts ``input_ids[:, t+1]``."""
    return input_ids[:, 1:], loss_mask[:, 1:]


def masked_sum(values: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Sum of ``values * mask`` along ``dim``; masked entries contribute exactly 0 (also if inf or nan)."""
    mask = mask.to(values.dtype)
    return (values.masked_fill(mask == 0, 0.0) * mask).sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """Mean over kept entries along ``dim``; an all-masked slice gives 0 (the count is clamped to ``eps``)."""
    count = mask.to(values.dtype).sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=eps)


# ---- packed layouts: several sequences concatenated in one row ---------------------------------------------
#
# A packed row holds sequences back to back; ``seq_ids[t]`` says which one token t belongs to (0, 1, ...;
# -1 for trailing padding). After ``shift_for_causal_lm`` the label at position t is token t+1, so shift the
# ids the same way (``seq_ids[1:]``). The position that predicts the first token of the next sequence then
# carries that next sequence's id; it must be masked, which it is whenever every sequence starts with a
# prompt token (loss_mask 0). ``packed_sums`` returns the same plain sums as ``masked_sum`` on the padded
# layout (no length normalisation); divide by ``packed_sums(torch.ones_like(mask), mask, seq_ids)`` for
# per-sequence means.


def seq_ids_from_position_ids(position_ids: Tensor) -> Tensor:
    """Sequence index per token of a packed row, from position ids that restart at 0 for each sequence."""
    position_ids = position_ids.reshape(-1)
    if position_ids.numel() and position_ids[0] != 0:
        raise ValueError(f"packed position_ids must start at 0, got {int(position_ids[0])}")
    return torch.cumsum((position_ids == 0).long(), dim=0) - 1


def seq_ids_from_cu_seqlens(cu_seqlens: Tensor, total_len: int | None = None) -> Tensor:
    """Sequence index per token from cumulative lengths [0, l0, l0+l1, ...]; tokens past the end get -1."""
    cu_seqlens = cu_seqlens.long()
    total_len = int(cu_seqlens[-1]) if total_len is None else total_len
    if total_len < int(cu_seqlens[-1]):
        raise ValueError(f"total_len {total_len} is shorter than cu_seqlens[-1] = {int(cu_seqlens[-1])}")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)
    padding = torch.full((total_len - ids.numel(),), -1, dtype=torch.long, device=cu_seqlens.device)
    return torch.cat([ids, padding])


def packed_sums(values: Tensor, mask: Tensor, seq_ids: Tensor, num_seqs: int | None = None) -> Tensor:
    """Per-sequence masked sums of a packed row: ``out[k] = sum_{t: seq_ids[t] == k} mask[t] * values[t]``.

    ``values`` and ``mask`` are [T] or [1, T]; tokens with ``seq_ids < 0`` (padding) are ignored. ``num_seqs``
    defaults to ``max(seq_ids) + 1``; pass it when trailing sequences may have no tokens in this row.
    """
    values, mask, seq_ids = values.reshape(-1), mask.reshape(-1), seq_ids.reshape(-1).long()
    if not values.shape == mask.shape == seq_ids.shape:
        raise ValueError(
            f"packed values {tuple(values.shape)}, mask {tuple(mask.shape)} and seq_ids {tuple(seq_ids.shape)} differ"
        )
    num_seqs = int(seq_ids.max()) + 1 if num_seqs is None else num_seqs
    keep = seq_ids >= 0
    contrib = values.masked_fill(mask == 0, 0.0) * mask.to(values.dtype)
    out = torch.zeros(num_seqs, dtype=values.dtype, device=values.device)
    return out.index_add(0, seq_ids[keep], contrib[keep])
