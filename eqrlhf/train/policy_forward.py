"""The policy's forward pass in the trainer: per-token log-probs of a collated batch.

Two ways to run it, same numbers:

* stacked rows (default): chosen rows then rejected rows, ``[2B, T]``, one forward for both; only label
  positions some row keeps go through the output layer.
* ``train.share_prompt``: one row per pair, the prompt once, then the chosen and the rejected response.

Stacked rows compute every prompt twice. With ``share_prompt`` pair ``b`` becomes one row
``prompt | chosen | rejected`` in which the rejected tokens see the prompt but not the chosen ones (a 4-D attention mask) and continue
the prompt's positions (``position_ids``), so each token has exactly the context and position it had in
its own row: same log-probs, same gradients, and ``2P + C + R`` tokens of work become ``P + C + R``.

The log-prob of the first rejected token comes from the last prompt position, which also predicts the
first chosen token: the output layer reads that position twice. :func:`shared_prompt_layout` returns,
for every label position ``[r, t]`` of the stacked frame, where its logits live in the shared rows, so
callers keep working in the stacked frame (masks, AMA scores, reference log-probs do not change).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from eqrlhf.algorithms.logprobs import fused_token_logprobs, token_logprobs
from eqrlhf.errors import ConfigError

if TYPE_CHECKING:
    from eqrlhf.train.loop import StepSpec


def shared_prompt_layout(input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> dict[str, Tensor]:
    """Shared rows for a stacked ``[2B, T]`` batch (rows ``b`` and ``b + B`` are one pair's two sides).

    Returns ``input_ids`` and ``position_ids`` ``[B, S]``, ``allowed`` ``[B, S, S]`` (bool: query s may
    attend to key s'; every position may see itself, so no softmax row is empty, and padding sees nothing
    else), and ``source`` ``[2B, T-1]``: the flat index ``b * S + s`` of the position whose logits predict
    ``input_ids[r, t+1]``, -1 where that label is not a response token.
    """
    rows, width = input_ids.shape
    if rows % 2:
        raise ValueError(f"shared prompt needs chosen and rejected rows stacked, got {rows} rows")
    pairs = rows // 2
    lengths = attention_mask.sum(dim=1).tolist()
    starts = [int(torch.nonzero(response_mask[r])[0]) if response_mask[r].any() else lengths[r] for r in range(rows)]
    width_shared = max(lengths[b] + lengths[b + pairs] - starts[b] for b in range(pairs))
    device = input_ids.device
    ids = torch.zeros((pairs, width_shared), dtype=input_ids.dtype, device=device)
    positions = torch.zeros((pairs, width_shared), dtype=torch.long, device=device)
    segment = torch.full((pairs, width_shared), -1, dtype=torch.long, device=device)  # 0 prompt, 1 chosen, 2 rejected
    source = torch.full((rows, width - 1), -1, dtype=torch.long, device=device)
    for b in range(pairs):
        prompt, chosen_end, rejected_end = starts[b], lengths[b], lengths[b + pairs]
        if starts[b + pairs] != prompt or not torch.equal(input_ids[b, :prompt], input_ids[b + pairs, :prompt]):
            raise ValueError(f"rows {b} and {b + pairs} of the batch do not share their prompt")
        if prompt < 1:
            raise ValueError(f"row {b} of the batch has no prompt token")
        rejected = rejected_end - prompt
        ids[b, :chosen_end] = input_ids[b, :chosen_end]
        ids[b, chosen_end : chosen_end + rejected] = input_ids[b + pairs, prompt:rejected_end]
        positions[b, :chosen_end] = torch.arange(chosen_end, device=device)
        positions[b, chosen_end : chosen_end + rejected] = torch.arange(prompt, rejected_end, device=device)
        segment[b, :prompt], segment[b, prompt:chosen_end] = 0, 1
        segment[b, chosen_end : chosen_end + rejected] = 2
        base = b * width_shared
        # chosen label t (token t+1) is predicted at position t, as in its own row
        source[b, prompt - 1 : chosen_end - 1] = base + torch.arange(prompt - 1, chosen_end - 1, device=device)
        # rejected: the first label from the last prompt position, the rest from the rejected segment
        if rejected:
            source[b + pairs, prompt - 1] = base + prompt - 1
            source[b + pairs, prompt : rejected_end - 1] = base + chosen_end + torch.arange(rejected - 1, device=device)
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones((width_shared, width_shared), dtype=torch.bool, device=device).tril()
    allowed = causal & (key >= 0) & (query >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(width_shared, dtype=torch.bool, device=device)
    return {"input_ids": ids, "position_ids": positions, "allowed": allowed, "source": source}


def forward_plan(batch: dict, spec: StepSpec) -> dict[str, Tensor]:
    """What every forward over one prepared micro-batch needs, computed once: the policy and an in-trainer
    reference (or the LoRA base model) reuse it.

    Stacked rows: ``keep``, the label positions some row keeps. Shared prompt: the layout of
    :func:`shared_prompt_layout`, the positions the output layer must read (``columns``), and for every
    kept label its pair (``rows``) and its index among those columns (``cols``).
    """
    kept = batch["loss_mask"].bool()
    if not (spec.share_prompt and spec.kind == "preference"):
        return {"keep": kept.any(dim=0).nonzero().squeeze(-1)}  # logits[:, t] predicts labels[:, t]
    layout = shared_prompt_layout(batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    where = layout.pop("source")[kept]  # flat [pair * S + position] of every kept label
    if bool((where < 0).any()):
        raise ValueError("the loss mask keeps a token outside the responses")
    width = layout["input_ids"].shape[1]
    columns = torch.unique(where % width)  # sorted
    return {**layout, "columns": columns, "rows": where // width, "cols": torch.searchsorted(columns, where % width)}


def _takes_logits_to_keep(model) -> bool:
    """Whether the HF model under a DeepSpeed engine and/or PEFT wrapper accepts ``logits_to_keep``."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return "logits_to_keep" in inspect.signature(type(inner).forward).parameters


def _logps(logits: Tensor, labels: Tensor, spec: StepSpec) -> Tensor:
    if spec.compile:
        return fused_token_logprobs(logits, labels)
    return token_logprobs(logits, labels, chunk_size=spec.chunk_size)


def sequence_logps(model, batch: dict, spec: StepSpec) -> torch.Tensor:
    """Per-token log-probs [R, T-1] of ``batch['labels']``: one compiled kernel, or a float32 log-softmax
    chunk by chunk. Positions no row keeps in ``batch['loss_mask']`` come out as 0.

    Only label positions that some row of the batch keeps go through the output layer (the model's own
    ``logits_to_keep``, so its logit scaling and soft-capping still apply). The prompt positions are
    skipped: on SmolLM2-135M the output layer is about a fifth of the forward's FLOPs, and its float32
    log-softmax over a 49k vocabulary is the largest elementwise pass of the step. ``batch['plan']``
    (:func:`forward_plan`, set by the trainer's ``prepare_batch``) is computed here when absent.
    """
    plan = batch["plan"] if "plan" in batch else forward_plan(batch, spec)
    if not _takes_logits_to_keep(model):
        if "allowed" in plan:
            raise ConfigError("train.share_prompt needs a model whose forward takes logits_to_keep")
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return _logps(logits[:, :-1], batch["labels"], spec)
    if "allowed" in plan:
        return _shared_prompt_logps(model, batch, plan, spec)
    keep = plan["keep"]
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep, use_cache=False
    ).logits
    logps = _logps(logits, batch["labels"][:, keep], spec)
    return logps.new_zeros(batch["labels"].shape).index_copy(1, keep, logps)


def _shared_prompt_logps(model, batch: dict, plan: dict, spec: StepSpec) -> torch.Tensor:
    """``sequence_logps`` with each pair's prompt computed once (layout: :func:`shared_prompt_layout`)."""
    attention = getattr(getattr(model, "module", model).config, "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):  # flash kernels take no 4-D mask
        raise ConfigError(f"train.share_prompt needs sdpa or eager attention, the model uses {attention}")
    # an additive mask works for both sdpa and eager attention; in the dtype attention computes in
    dtype = torch.bfloat16 if spec.autocast else next(model.parameters()).dtype
    mask = torch.zeros(plan["allowed"].shape, dtype=dtype, device=plan["allowed"].device)
    mask.masked_fill_(~plan["allowed"], torch.finfo(dtype).min)
    logits = model(
        input_ids=plan["input_ids"],
        attention_mask=mask[:, None],
        position_ids=plan["position_ids"],
        logits_to_keep=plan["columns"],
        use_cache=False,
    ).logits
    kept = batch["loss_mask"].bool()
    logps = _logps(logits[plan["rows"], plan["cols"]][None], batch["labels"][kept][None], spec)[0]
    return logps.new_zeros(kept.shape).index_put(tuple(kept.nonzero().T), logps)
