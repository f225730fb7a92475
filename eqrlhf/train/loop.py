"""The Ray Train worker loop: a DeepSpeed engine, one optimizer step at a time, checkpoints and metrics.

Every worker runs :func:`train_loop_per_worker`. Ray Train has already created the torch process group
(gloo on CPU, NCCL on GPU); ``deepspeed.initialize`` finds it initialised and wraps it instead of starting
its own. One step: each worker collates its micro-batches (chosen and rejected rows stacked, so ONE policy
forward covers both), computes masks (response x AMA) before any forward, runs policy and reference,
and lets DeepSpeed accumulate, clip and step.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from eqrlhf.algorithms.ama import ama_mask
from eqrlhf.algorithms.catalog import ama_on, loss_info
from eqrlhf.algorithms.logprobs import masked_sum, shift_for_causal_lm
from eqrlhf.algorithms.losses import LossInputs, compute_loss
from eqrlhf.config import Config, ConfigError
from eqrlhf.train.batching import PairSource, collate, read_columns, step_rows, worker_micro_batches
from eqrlhf.train.checkpoint import (
    checkpoint_dir_name,
    load_resume_state,
    load_training_checkpoint,
    report_checkpoint,
    save_training_checkpoint,
    trainer_state,
)
from eqrlhf.train.deepspeed_config import build_ds_config, build_reference_ds_config, initialize_engine, lr_factor
from eqrlhf.train.metrics import MetricsWriter, average_over_workers, memory_metrics
from eqrlhf.train.policy_forward import forward_plan, sequence_logps

# Test hook for crash recovery: the worker of rank $EQRLHF_TEST_KILL_RANK (default: the last) SIGKILLs
# itself after step $EQRLHF_TEST_KILL_AT_STEP, once: it first creates the marker file $EQRLHF_TEST_KILL_MARKER
# and never fires when that file exists, so the restarted run goes through.
KILL_AT_STEP, KILL_MARKER, KILL_RANK = "EQRLHF_TEST_KILL_AT_STEP", "EQRLHF_TEST_KILL_MARKER", "EQRLHF_TEST_KILL_RANK"


@dataclass(frozen=True)
class StepSpec:
    """What one training step computes, derived once from the config."""

    loss: str
    kind: str  # preference | sft | scalar
    ama: bool
    reference: str | None  # in_trainer | precomputed | None (loss needs none)
    lora: bool
    bf16: bool
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
            chunk_size=cfg.train.logprob_chunk_size,
            compile=cfg.train.compile,
            share_prompt=cfg.train.share_prompt,
            loss_params=loss_params,
            ama_params=ama_params,
        )


# ---- models -----------------------------------------------------------------------------------------------


def _zero3_init(ds_config: dict):
    """While the returned object lives, ``from_pretrained`` loads weights straight into ZeRO-3 partitions."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def build_policy(cfg: Config, spec: StepSpec):
    """The trainable model: a causal LM (optionally with LoRA) or a ScalarHeadLM for reward/cost."""
    from eqrlhf.models.loading import compile_decoder_layers, load_causal_lm

    kwargs = {"dtype": cfg.model.dtype, "trust_remote_code": cfg.model.trust_remote_code}
    if spec.kind == "scalar":
        from eqrlhf.models.heads import ScalarHeadLM

        model = ScalarHeadLM.from_lm(cfg.model.name_or_path, **kwargs)
        backbone = model.backbone
    else:
        model = backbone = load_causal_lm(cfg.model.name_or_path, gguf_file=cfg.model.gguf_file, **kwargs)
    backbone.config.use_cache = False
    if spec.compile:
        compile_decoder_layers(backbone)
    if cfg.train.grad_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.lora:
        from peft import LoraConfig, get_peft_model

        lora = cfg.train.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    if spec.bf16:
        # Under ZeRO-3, zero.Init already created the loaded weights as bf16 partitions; what was built
        # after it (the score head, LoRA adapters) is float32, and DeepSpeed needs a single dtype.
        for param in model.parameters():
            if not hasattr(param, "ds_id"):
                param.data = param.data.to(torch.bfloat16)
    return model


def build_reference(cfg: Config, spec: StepSpec, world_size: int, device: torch.device):
    """Frozen reference for in-trainer log-probs; None when the loss needs none, they are precomputed,
    or LoRA is on (then the reference is the policy with its adapters disabled: no second model)."""
    if spec.reference != "in_trainer" or spec.lora:
        return None
    from eqrlhf.models.loading import load_causal_lm

    kwargs = {"dtype": cfg.model.dtype, "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.train.zero_stage == 3:
        import deepspeed

        ref_config = build_reference_ds_config(cfg.train, world_size)
        keep = _zero3_init(ref_config)  # noqa: F841 (must outlive from_pretrained)
        ref = load_causal_lm(cfg.model.name_or_path, gguf_file=cfg.model.gguf_file, **kwargs)
        ref.config.use_cache = False
        engine, *_ = deepspeed.initialize(model=ref, config=ref_config)
        engine.eval()
        return engine
    ref = load_causal_lm(cfg.model.name_or_path, gguf_file=cfg.model.gguf_file, **kwargs)
    ref.config.use_cache = False
    ref.requires_grad_(False)
    ref.eval()
    return ref.to(device=device, dtype=torch.bfloat16 if spec.bf16 else None)


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
    else:
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


def restore(engine, plan: dict) -> int:
    """Load the checkpoint to continue from (Ray's latest after a crash, else train.resume*); return its step."""
    state = load_resume_state(plan, lambda path: load_training_checkpoint(engine, path))
    if state is None:
        return 0
    if state["global_batch"] != plan["global_batch"]:
        raise ConfigError(
            f"checkpoint at step {state['step']} was trained with global batch {state['global_batch']}, "
            f"this run uses {plan['global_batch']}: the data position would not match"
        )
    return int(state["step"])


def save_and_report(engine, step: int, state: dict, metrics: dict, tokenizer, rank: int, plan: dict) -> None:
    """Write this worker's part of checkpoint step_N into a local dir; Ray Train merges and persists them."""
    local = Path(tempfile.mkdtemp(prefix=f"eqrlhf-{checkpoint_dir_name(step)}-rank{rank}-"))
    try:
        save_training_checkpoint(engine, local, state, tokenizer, rank)
        report_checkpoint(local, step, {**metrics, "step": step}, plan, rank)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _maybe_kill_for_test(step: int, rank: int, world: int) -> None:
    at, marker = os.environ.get(KILL_AT_STEP), os.environ.get(KILL_MARKER)
    if not (at and marker) or step != int(at) or rank != int(os.environ.get(KILL_RANK, world - 1)):
        return
    if not Path(marker).exists():
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)


def _progress(rank: int, total: int, start: int):
    if rank != 0:
        return None
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=total, desc="train")
    bar.update(start)
    return bar


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch

    from eqrlhf.models.loading import load_tokenizer

    # the config object itself, not a dump rebuilt here: it keeps the stage's restriction (eqrlhf.restricted_config)
    cfg, plan = config["cfg"], config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train = cfg.train
    if train.use_gpu:
        # DeepSpeed places the engine on cuda:$LOCAL_RANK; Ray Train's GPU for this worker is the one
        # get_device() names (an index into CUDA_VISIBLE_DEVICES, not always the local rank).
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        os.environ["LOCAL_RANK"] = str(device.index)
    else:
        torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    torch.manual_seed(cfg.run.seed)  # same initial weights (fresh heads, LoRA) on every worker
    spec = StepSpec.from_config(cfg)
    tokenizer = load_tokenizer(cfg.model.name_or_path, gguf_file=cfg.model.gguf_file)
    # Wrap Ray Train's process group in DeepSpeed's comm layer now (it starts none of its own when one
    # exists), so that ZeRO-3 loading below already sees the real world size.
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    ds_config = build_ds_config(train, world)
    keep = _zero3_init(ds_config) if train.zero_stage == 3 else None  # noqa: F841
    model = build_policy(cfg, spec)
    total = plan["total_steps"]

    def scheduler(optimizer):
        # a closure, so the checkpoint keeps only the step count and the schedule comes from this config
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total, train.warmup_steps, train.lr_schedule)
        )

    engine = initialize_engine(model, ds_config, train.use_gpu, lr_scheduler=scheduler)
    reference = build_reference(cfg, spec, world, engine.device)
    start = restore(engine, plan)
    source = PairSource(
        read_columns(Path(plan["input_dir"]), plan["columns"]), tokenizer, cfg.model.max_length, spec.loss
    )
    writer = MetricsWriter(Path(plan["train_dir"]), start, plan.get("tracking")) if rank == 0 else None
    bar = _progress(rank, total, start)
    global_batch, per_epoch = plan["global_batch"], plan["steps_per_epoch"]
    engine.train()
    for step in range(start, total):
        torch.manual_seed(cfg.run.seed * 1_000_003 + step)  # per-step seed: dropout etc. resume exactly
        rows = step_rows(step, len(source), cfg.run.seed, global_batch)
        micro = worker_micro_batches(rows, rank, train.micro_batch_size, train.grad_accum)
        batches = [collate([source.get(int(i)) for i in idx], tokenizer.pad_token_id, spec.loss) for idx in micro]
        started = time.perf_counter()
        metrics = optimizer_step(engine, reference, batches, spec, train.grad_accum)
        metrics["time/step_s"] = time.perf_counter() - started
        metrics.update(memory_metrics(engine.device))
        metrics = average_over_workers(metrics, engine.device)
        metrics["tokens"] *= world
        metrics["throughput/tokens_per_s"] = metrics["tokens"] / max(metrics["time/step_s"], 1e-9)
        done = step + 1
        metrics["epoch"] = done / per_epoch
        if writer is not None and (done % train.log_every == 0 or done == total):
            writer.write(done, metrics)
        if bar is not None:
            bar.set_description(f"train loss {metrics['loss']:.4f}")
            bar.update(1)
        if (train.save_every and done % train.save_every == 0) or done == total:
            state = trainer_state(done, per_epoch, global_batch, world, cfg.run.seed, plan["config_hash"], metrics)
            save_and_report(engine, done, state, metrics, tokenizer, rank, plan)
        _maybe_kill_for_test(done, rank, world)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
