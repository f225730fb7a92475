"""Sections of training: the model, the algorithm (loss), AMA, LoRA, the trainer and PPO."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, field_validator, model_validator

from eqrlhf.algorithms.catalog import loss_info
from eqrlhf.config.base import Section, check_custom_resources


class ModelSection(Section):
    name_or_path: str = "smollm2-135m"  # hub id, local dir, or the bundled "smollm2-135m"
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    max_length: int = Field(512, ge=16)


class AlgorithmSection(Section):
    loss: str = "dpo"  # a name in eqrlhf.algorithms.catalog.CATALOG
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # cdpo
    bfpo_alpha: float = 0.5
    bfpo_tau: float = Field(0.01, gt=0)
    reference: Literal["precomputed", "in_trainer"] = "in_trainer"

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, loss: str) -> str:
        loss_info(loss)  # a ValueError naming the closest known loss
        return loss


class AmaSection(Section):
    """Settings of the AMA mask; the loss name turns AMA on (``algorithm.loss: ama_dpo``, ``ama_ppo``, ...)."""

    scorer: Literal["reward_prefix", "dpo_implicit", "critic"] = "reward_prefix"
    rule: Literal["sign", "hysteresis"] = "hysteresis"
    baseline: float = 0.0
    baseline_mode: Literal["constant", "batch_mean"] = "constant"
    tau: float = Field(0.3, ge=0)  # hysteresis half-width
    normalize: Literal["zscore", "none"] = "zscore"
    scorer_model: str | None = None  # reward/cost model dir (reward_prefix) or policy dir (dpo_implicit)
    scorer_ref_model: str | None = None  # reference dir for dpo_implicit
    negate: bool = False  # True for a cost model: score = -cost
    # pairs whose categories AMA masks; the others get flat token scores, which every rule keeps whole (plain
    # DPO on them): for a scorer measured right on one kind of pair only (the score stage's per-category
    # scorer_accuracy). None = every pair
    categories: list[Literal["EHD", "IHD", "MHD", "none"]] | None = None
    input: str | None = None  # pairs to score; default: <run>/pairs
    output: str | None = None  # default: <run>/scored
    batch_size: int = Field(8, ge=1)  # pairs per scoring forward pass (2x sequences: chosen + rejected)
    concurrency: int = Field(1, ge=1)  # scoring actors (each holds its models once)
    num_gpus: float = Field(0.0, ge=0)  # per scoring actor; 0 = CPU, float32


class LoraSection(Section):
    r: int = Field(0, ge=0)  # 0 disables LoRA
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class TrainSection(Section):
    input: str | None = None  # pairs (or scored pairs); default: <run>/scored if present else <run>/pairs
    output: str | None = None  # default: <run>/train
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    # GPUs per worker when use_gpu; a fraction shares one GPU with rollout engines (rollout.sync_method=cuda_ipc)
    gpus_per_worker: float = Field(1.0, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    # custom Ray resources each worker also needs: pins the workers to the nodes started with them (e.g.
    # {trainer_node: 1} with `ray start --resources='{"trainer_node": 8}'` on the trainer nodes); {} = any node
    resources_per_worker: dict[str, PositiveFloat] = Field(default_factory=dict)
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: bool = False
    # bf16 weights and activations, fp32 master weights. At zero_stage 1 gradients also accumulate in fp32
    # (DeepSpeed's BF16_Optimizer), which is the lightest step on one GPU; ZeRO-0 accumulates in bf16.
    bf16: bool = False
    # float32 weights, gradients and optimizer; matmuls in bfloat16 under torch.autocast (DeepSpeed's
    # torch_autocast). Exact float32 updates, unlike bf16 weights, whose rounding (8 mantissa bits) swallows
    # most of a step at DPO's learning rates. On CPUs with AMX (Sapphire Rapids and later) a forward and
    # backward of SmolLM2-135M runs about 1.9x faster than float32. Not together with bf16.
    autocast: bool = False
    micro_batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # None = epochs x steps per epoch
    lr: float = Field(5e-6, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 = no clipping
    grad_checkpointing: bool = False
    lora: LoraSection = Field(default_factory=LoraSection)
    save_every: int = Field(0, ge=0)  # steps; 0 = only at the end
    keep_checkpoints: int | None = Field(None, ge=1)  # newest checkpoints kept on disk; None = all
    resume: bool = False  # continue from the newest checkpoint in <train.output>/checkpoints
    resume_from: str | None = None  # or from this checkpoint dir (e.g. another run's .../checkpoints/step_100)
    logprob_chunk_size: int | None = Field(256, ge=1)  # positions per float32 log-softmax chunk; None = all at once
    # torch.compile each decoder layer and the log-prob kernel (fuses norms, rotary, SwiGLU and the float32
    # log-softmax; chunking is then unneeded). Worth it on GPU; the first steps pay the compile. ZeRO 0-2.
    compile: bool = False
    # preference losses: one row per pair (prompt once, then chosen and rejected, a 4-D attention mask) instead
    # of the prompt in both rows; exact, and 2P+C+R tokens of work become P+C+R. Needs sdpa or eager attention.
    share_prompt: bool = False
    max_failures: int = Field(0, ge=-1)  # Ray Train restarts after a worker failure; -1 = no limit
    log_every: int = Field(1, ge=1)

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(resources)

    @model_validator(mode="after")
    def _one_precision(self) -> TrainSection:
        if self.bf16 and self.autocast:
            raise ValueError("'autocast' and 'bf16' are both true: choose one (autocast keeps float32 weights)")
        return self


class PPOSection(Section):
    """Online RL (algorithm.loss ppo | ama_ppo | ppo_lagrangian | ama_ppo_lagrangian): rollouts from the engine
    pool, critics, GAE.

    AMA-PPO is ``ama_ppo`` (or ``ama_ppo_lagrangian``) with ``ama.scorer=critic`` (docs/method.md section 2.6:
    rule ``sign`` and ``normalize: none`` on the raw values). One iteration's rollout batch (prompts x samples)
    is split over the workers and cut into mini-batches of train.micro_batch_size x train.grad_accum x
    num_workers samples.
    """

    input: str | None = None  # prompts: a categorized mixture or pairs stage dir; default <run>/mixture
    iterations: int = Field(10, ge=1)
    prompts_per_iteration: int = Field(8, ge=1)
    samples_per_prompt: int = Field(2, ge=1)
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, gt=0)  # rollouts sample; the trainer's log-probs use the same temperature
    ppo_epochs: int = Field(1, ge=1)
    clip_eps: float = Field(0.2, gt=0)
    value_clip: float | None = Field(0.2, gt=0)  # None = unclipped value loss
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    kl_coef: float = Field(0.05, ge=0)
    kl_estimator: Literal["k1", "k3"] = "k1"
    whiten_advantages: bool = True
    critic_lr: float | None = Field(None, gt=0)  # None = train.lr
    reward_model: str | None = None  # ScalarHeadLM dir (score at the last token); or:
    reward_rule: str | None = None  # a name in eqrlhf.train.rewards.RULES
    critic_init: Literal["reward_model", "policy"] = "policy"
    # PPO-Lagrangian (Safe-RLHF): a cost source, a cost critic, lambda learned in log space
    cost_model: str | None = None
    cost_rule: str | None = None
    cost_critic_init: Literal["cost_model", "policy"] = "policy"
    cost_threshold: float = 0.0
    lambda_init: float = Field(1.0, gt=0)
    lambda_lr: float = Field(0.05, ge=0)
    lambda_max: float | None = Field(None, gt=0)
