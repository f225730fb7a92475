"""DeepSpeed configuration and the learning-rate schedule, built from ``TrainSection``.

The optimizer is AdamW with the same settings everywhere: DeepSpeed's FusedAdam on GPU, its CPU Adam op
with optimizer offload, and ``torch.optim.AdamW`` for plain CPU training (:func:`initialize_engine`). The
CPU Adam op is JIT-compiled on first use in every new environment (95 s on an idle 2-core machine, several
minutes under load), which a CPU run without offload does not need to pay. The LR schedule is a
plain function of the optimizer step, wrapped in a ``LambdaLR`` that DeepSpeed steps at every
accumulation boundary and saves in its checkpoint (only the step count: the lambda is a closure, so a
resumed run takes the schedule from its own config and continues the same curve).
"""

from __future__ import annotations

import math

from eqrlhf.config import TrainSection


def global_batch_pairs(train: TrainSection, world_size: int) -> int:
    """Pairs per optimizer step: micro batch x accumulation steps x data-parallel workers."""
    return train.micro_batch_size * train.grad_accum * world_size


def build_ds_config(train: TrainSection, world_size: int) -> dict:
    """The DeepSpeed config dict for the policy (or scalar-head) engine."""
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_bucket_size=5e7)
    if train.zero_stage == 3:
        # Needed to gather full weights at save time; the other knobs keep small models unpartitioned
        # only where partitioning would cost more than it saves.
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=1e4)
    if train.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
        if train.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": train.use_gpu}
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": global_batch_pairs(train, world_size),
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.bf16},
        "torch_autocast": {"enabled": train.autocast, "dtype": "bfloat16"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": train.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": train.weight_decay},
        },
        "steps_per_print": 10**9,  # our own metrics writer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if train.bf16 and train.zero_stage == 1:
        # DeepSpeed's BF16_Optimizer: gradients accumulate in fp32 flat buffers, and a NaN/inf shows in the one
        # global norm. Its step dispatches ~600 operators with 3 host syncs at the 135M shape, against ~4,100
        # at ZeRO-2 and ~7,300 with a sync per gradient tensor at ZeRO-0 (DeepSpeed's fp16-style wrapper;
        # `benchmarks/profile_dpo_step.py --count-ops`, on CPU). On a small model the GPU waits on the host.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def initialize_engine(model, ds_config: dict, use_gpu: bool, lr_scheduler=None):
    """``deepspeed.initialize`` for a trainable model; on CPU without offload, with torch's AdamW.

    The config's "optimizer" block gives the AdamW settings in both cases (ZeRO 1-3 wrap torch's AdamW
    as they wrap their own), so a config means the same optimizer on a laptop and on a cluster.
    """
    import deepspeed
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if not use_gpu and "offload_optimizer" not in ds_config["zero_optimization"]:
        settings = dict(ds_config["optimizer"]["params"])
        settings["betas"] = tuple(settings["betas"])
        optimizer = torch.optim.AdamW(params, **settings)
        ds_config = {k: v for k, v in ds_config.items() if k != "optimizer"}
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, config=ds_config, lr_scheduler=lr_scheduler
    )
    return engine


def build_reference_ds_config(train: TrainSection, world_size: int) -> dict:
    """ZeRO-3 inference config for the frozen reference model (only used when the policy is ZeRO-3)."""
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": global_batch_pairs(train, world_size),
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1e4},
        "bf16": {"enabled": train.bf16},
        "steps_per_print": 10**9,
    }


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak LR before optimizer step ``step`` (0-based).

    Linear warmup from 1/(warmup+1) to 1 over ``warmup_steps``, then constant, linear decay to 0, or cosine
    decay to 0 at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_schedule {schedule!r}: use constant, linear or cosine")
