"""The offline training step (SFT, the DPO family, BFPO, reward and cost models) on the trainer core.

Every worker runs :func:`train_loop_per_worker`: :mod:`eqrlhf.train.core` sets up the device, the DeepSpeed
engines, the resume, the metrics and the checkpoints; this module adds what one offline step computes. Each
worker collates its micro-batches (chosen and rejected rows stacked, so ONE policy forward covers both),
computes masks (response x AMA) before any forward, runs policy and reference, and lets DeepSpeed
accumulate, clip and step.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eqrlhf.algorithms.ama import ama_mask
from eqrlhf.algorithms.catalog import ama_on, loss_info
from eqrlhf.algorithms.logprobs import masked_sum, shift_for_causal_lm
from eqrlhf.algorithms.losses import LossInputs, compute_loss
from eqrlhf.config import Config
from eqrlhf.fault_markers import MARKERS_ENV, mark
from eqrlhf.train.batching import PairSource, collate, read_columns, step_rows, worker_micro_batches
from eqrlhf.train.core import Worker, build_policy, build_reference, restore, run_steps, start_worker, train_engine
from eqrlhf.train.policy_forward import forward_plan, sequence_logps


@dataclass(frozen=True)
class StepSpec:
    """What one training step computes, derived once from the config."""

    loss: str
    kind: str  # preference | sft | scalar
    ama: bool
    reference: str | None  # in_trainer | precomputed | None (loss needs none)
    lora: bool
    bf16: bool
    autocast: bool  # bfloat16 matmuls over float32 weights: the policy via DeepSpeed, the reference here
    chunk_size: int | None
    compile: bool
    share_prompt: bool
    loss_params: dict
    ama_params: dict

    @classmethod
    def from_config(cls, cfg: Config) -> StepSpec:
        loss, algo, ama = cfg.algorithm.loss, cfg.algorithm, ama_on(cfg)
        # the AMA settings and exmate's weight only where they matter: the warm start (sft) and the reward model
        # do not declare them (eqrlhf.stages), so a change to them must not be read there
        ama_params = {}
        if ama:  # scores arrive normalised by the scoring stage, hence normalize="none"
            baseline = "batch_mean" if cfg.ama.baseline_mode == "batch_mean" else cfg.ama.baseline
            ama_params = {"rule": cfg.ama.rule, "baseline": baseline, "tau": cfg.ama.tau, "normalize": "none"}
        loss_params = {
            "beta": algo.beta,
            "label_smoothing": algo.label_smoothing,
            "bfpo_alpha": algo.bfpo_alpha,
            "bfpo_tau": algo.bfpo_tau,
        }
        if loss == "exmate":
            loss_params["exmate_clm_weight"] = cfg.control.clm_weight
        return cls(
            loss=loss,
            kind=loss_info(loss).kind,
            ama=ama,
            reference=algo.reference if loss_info(loss).uses_reference else None,
            lora=cfg.train.lora.r > 0,
            bf16=cfg.train.bf16,
            autocast=cfg.train.autocast,
            chunk_size=cfg.train.logprob_chunk_size,
            compile=cfg.train.compile,
            share_prompt=cfg.train.share_prompt,
            loss_params=loss_params,
            ama_params=ama_params,
        )


# ---- one step ---------------------------------------------------------------------------------------------


def prepare_batch(batch: dict, spec: StepSpec, device: torch.device) -> tuple[dict, dict[str, float]]:
    """Move a micro-batch to the device and add labels and the loss mask (response x AMA, label frame)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    metrics = {"data/truncated_fraction": float(batch.pop("truncated_fraction"))}
    if spec.kind == "scalar":
        return batch, metrics
    labels, mask = shift_for_causal_lm(batch["input_ids"], batch["response_mask"])
    if spec.ama:
        kept, ama_metrics = ama_mask(batch["token_scores"][:, 1:], mask, batch["is_chosen"], **spec.ama_params)
        mask = mask * kept
        metrics.update({f"ama/{k}": float(v) for k, v in ama_metrics.items()})
    batch["labels"], batch["loss_mask"] = labels, mask
    batch["plan"] = forward_plan(batch, spec)
    return batch, metrics


@torch.no_grad()
def reference_sums(engine, reference, batch: dict, spec: StepSpec) -> torch.Tensor:
    """Reference log-prob sums under the SAME mask as the policy's."""
    if spec.reference == "precomputed":
        ref_logps = batch["ref_token_logps"][:, 1:]  # one value per response token, shifted like the labels
    elif reference is None:  # LoRA: the base model is the policy without its adapters
        with engine.module.disable_adapter():
            ref_logps = sequence_logps(engine, batch, spec)
    else:  # the same arithmetic as the policy's forward, so that policy == reference gives equal log-probs
        device_type = batch["input_ids"].device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=spec.autocast):
            ref_logps = sequence_logps(reference, batch, spec)
    return masked_sum(ref_logps.float(), batch["loss_mask"])


def micro_loss(engine, reference, batch: dict, spec: StepSpec):
    """Loss (mean over the micro-batch, see losses.py) and its metrics for one prepared micro-batch."""
    from eqrlhf.models.heads import last_token_scores

    safety = {k: batch[k] for k in ("chosen_safe", "rejected_safe") if k in batch}
    if spec.kind == "scalar":
        scores = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        values = last_token_scores(scores.float(), batch["attention_mask"])
        half = len(values) // 2
        inputs = LossInputs(chosen_scores=values[:half], rejected_scores=values[half:], **safety)
    elif spec.kind == "sft":
        logps = sequence_logps(engine, batch, spec)
        inputs = LossInputs(token_logps=logps, token_mask=batch["loss_mask"])
    else:
        sums = masked_sum(sequence_logps(engine, batch, spec), batch["loss_mask"])
        half = len(sums) // 2
        inputs = LossInputs(policy_chosen_logps=sums[:half], policy_rejected_logps=sums[half:], **safety)
        if spec.reference is not None:
            ref = reference_sums(engine, reference, batch, spec)
            inputs.ref_chosen_logps, inputs.ref_rejected_logps = ref[:half], ref[half:]
        else:  # a policy-only preference loss (exmate): no reference forward at all
            inputs.chosen_lengths = batch["loss_mask"][:half].sum(dim=1)
    return compute_loss(spec.loss, inputs, **spec.loss_params)


def loss_scales(batches: list[dict], spec: StepSpec, accum: int, device: torch.device) -> list[float]:
    """Multipliers making accumulated micro-batch losses equal the loss of the whole global batch.

    DeepSpeed divides each micro-batch loss by ``accum`` and averages gradients over workers, which is
    exact for pair losses (every micro-batch has the same number of pairs): scale 1. Token-averaged losses
    (sft) weigh each micro-batch by its share of the step's kept tokens across all workers.
    """
    if loss_info(spec.loss).units != "tokens":
        return [1.0] * len(batches)
    import torch.distributed as dist

    counts = [float(b["loss_mask"].sum()) for b in batches]
    total = torch.tensor(sum(counts), dtype=torch.float64, device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        world = dist.get_world_size()
    return [c * accum * world / max(float(total), 1.0) for c in counts]


def optimizer_step(engine, reference, batches: list[dict], spec: StepSpec, accum: int) -> dict[str, float]:
    """Forward/backward every micro-batch of this worker; DeepSpeed steps at the accumulation boundary."""
    device = engine.device
    prepared = [prepare_batch(b, spec, device) for b in batches]
    scales = loss_scales([b for b, _ in prepared], spec, accum, device)
    lr = engine.get_lr()[0]  # the LR this update uses (the scheduler advances inside engine.step)
    totals: dict[str, float] = {}
    tokens = 0
    for (batch, batch_metrics), scale in zip(prepared, scales):
        loss, metrics = micro_loss(engine, reference, batch, spec)
        engine.backward(loss * scale)
        engine.step()
        tokens += int(batch["attention_mask"].sum())
        for name, value in {**{k: float(v) for k, v in metrics.items()}, **batch_metrics}.items():
            totals[name] = totals.get(name, 0.0) + value / len(prepared)
    totals["lr"] = lr
    totals["tokens"] = float(tokens)
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        totals["grad_norm"] = float(grad_norm)
    return totals


# ---- the worker -------------------------------------------------------------------------------------------


class OfflineSteps:
    """One optimizer step over the global batch that (seed, step) picks from the pairs (or SFT rows)."""

    counter, progress_key = "step", "loss"

    def __init__(self, worker: Worker, spec: StepSpec, engine, reference):
        cfg, plan = worker.cfg, worker.plan
        self.worker, self.spec, self.engine, self.reference = worker, spec, engine, reference
        self.source = PairSource(
            read_columns(Path(plan["input_dir"]), plan["columns"]), worker.tokenizer, cfg.model.max_length, spec.loss
        )
        self.steps_per_epoch = plan["steps_per_epoch"]

    def run(self, step: int) -> dict[str, float]:
        cfg, train, pad_id = self.worker.cfg, self.worker.cfg.train, self.worker.tokenizer.pad_token_id
        rows = step_rows(step, len(self.source), cfg.run.seed, self.worker.plan["global_batch"])
        micro = worker_micro_batches(rows, self.worker.rank, train.micro_batch_size, train.grad_accum)
        batches = [collate([self.source.get(int(i)) for i in idx], pad_id, self.spec.loss) for idx in micro]
        started = time.perf_counter()
        metrics = optimizer_step(self.engine, self.reference, batches, self.spec, train.grad_accum)
        metrics["time/step_s"] = time.perf_counter() - started
        if os.environ.get(MARKERS_ENV):  # node-loss tests: this rank's update of step+1 is done, on these rows
            ids = self.source.table.column("id").take(np.concatenate(micro)).to_pylist()
            mark("train_step", step=step + 1, rank=self.worker.rank, ids=ids)
        return metrics

    def finish(self, done: int, metrics: dict[str, float]) -> dict[str, float]:
        metrics["tokens"] *= self.worker.world
        metrics["throughput/tokens_per_s"] = metrics["tokens"] / max(metrics["time/step_s"], 1e-9)
        metrics["epoch"] = done / self.steps_per_epoch
        return metrics

    def state(self, done: int) -> dict:
        return {}


def train_loop_per_worker(config: dict) -> None:
    worker = start_worker(config)
    cfg, plan, world = worker.cfg, worker.plan, worker.world
    spec = StepSpec.from_config(cfg)
    total = plan["total_steps"]
    engine = train_engine(cfg.train, world, total, lambda: build_policy(cfg, scalar=spec.kind == "scalar"))
    # LoRA needs no second model: the reference is the policy with its adapters disabled
    in_trainer = spec.reference == "in_trainer" and not spec.lora
    reference = build_reference(cfg, world, engine.device) if in_trainer else None
    state = restore(worker, engine)
    start = int(state["step"]) if state else 0
    steps = OfflineSteps(worker, spec, engine, reference)
    engine.train()
    run_steps(worker, steps, start, total, engine)
