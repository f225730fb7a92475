"""Online RL on Ray Train: PPO, AMA-PPO (``ama_ppo`` with ``ama.scorer: critic``), PPO-Lagrangian (and its AMA twin).

``run_ppo(cfg)`` validates everything before Ray starts (loss, reward and cost sources, models, the prompt
stage and every prompt's length, batch arithmetic, the checkpoint to resume), starts the rollout engine pool
(:class:`eqrlhf.rollout.pool.EnginePool`, its own placement group) in the driver, then fits a
``TorchTrainer`` whose workers run :func:`eqrlhf.train.ppo_loop.ppo_loop_per_worker`. The driver owns the
pool: it is shut down when the run ends or fails (a pool passed in by the caller is left running). Rank 0
of the trainer drives the pool through the handles it receives.

Output (``train.output``, default ``<run>/train``), as the offline trainer: ``metrics.jsonl`` (one line per
iteration), ``tb/``, ``checkpoints/step_N/`` (N = iterations done: the policy in HF format plus DeepSpeed
state, ``critic/`` and ``cost_critic/`` as ScalarHeadLM dirs plus ``critic_deepspeed/`` ...,
``trainer_state.json`` with the iteration and log lambda), ``final`` and ``manifest.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from eqrlhf.algorithms.catalog import ONLINE, ama_on, loss_info
from eqrlhf.atomic import write_json
from eqrlhf.config import Config, ConfigError
from eqrlhf.restricted_config import whole_config_for_records
from eqrlhf.tracking import check_tracking, training_plan
from eqrlhf.train.batching import TrainInputError
from eqrlhf.train.driver import (
    CHECKPOINTS,
    check_worker_resources,
    finish_manifest,
    fit_interruptibly,
    read_placement,
    resume_checkpoint,
    scaling_config,
    train_dir,
    train_output,
    with_absolute_model_path,
    worker_env,
)

MAX_LISTED = 5


def prompt_input_dir(cfg: Config) -> Path:
    """``ppo.input``, else ``<run>/mixture`` (a categorized mixture; a pairs stage works the same)."""
    return cfg.stage_dir(cfg.ppo.input, "mixture")


def _check_scalar_model(path: str, key: str, policy_path: str) -> str:
    """A ScalarHeadLM directory whose vocabulary matches the policy's; returns its resolved path."""
    from eqrlhf.models.heads import HEAD_CONFIG, HEAD_WEIGHTS

    resolved = Path(path).expanduser()
    missing = [n for n in (HEAD_CONFIG, HEAD_WEIGHTS, "config.json") if not (resolved / n).is_file()]
    if missing:
        raise ConfigError(
            f"{key}={path}: not a scalar-head model directory (missing {', '.join(missing)}); "
            "train one with algorithm.loss=reward or cost"
        )
    own = json.loads((resolved / "config.json").read_text()).get("vocab_size")
    policy_config = Path(policy_path) / "config.json"
    theirs = json.loads(policy_config.read_text()).get("vocab_size") if policy_config.is_file() else own
    if own != theirs:
        raise ConfigError(f"{key}={path}: vocabulary of {own} tokens, the policy has {theirs}: they must share one")
    return str(resolved.resolve())


def _check_sources(cfg: Config, policy_path: str) -> dict:
    """Reward (and cost) source: exactly one of a model or a rule per side; critics initialised from them.

    Returns the absolute model paths (``reward_model``, ``cost_model``; None for rules): workers run in
    another working directory.
    """
    from eqrlhf.train.rewards import get_rule

    ppo, lagrangian = cfg.ppo, loss_info(cfg.algorithm.loss).lagrangian
    sides = [("reward", ppo.reward_model, ppo.reward_rule)]
    if lagrangian:
        sides.append(("cost", ppo.cost_model, ppo.cost_rule))
    elif ppo.cost_model or ppo.cost_rule:
        raise ConfigError(
            "ppo.cost_model / ppo.cost_rule are used by algorithm.loss=ppo_lagrangian (or ama_ppo_lagrangian) only"
        )
    paths = {"reward_model": None, "cost_model": None}
    for side, model, rule in sides:
        if (model is None) == (rule is None):
            raise ConfigError(f"set exactly one of ppo.{side}_model (a scalar-head model dir) and ppo.{side}_rule")
        if rule is not None:
            get_rule(rule, f"ppo.{side}_rule")
        else:
            paths[f"{side}_model"] = _check_scalar_model(str(cfg.resolve_path(model)), f"ppo.{side}_model", policy_path)
    if ppo.critic_init == "reward_model" and ppo.reward_model is None:
        raise ConfigError("ppo.critic_init=reward_model needs ppo.reward_model")
    if lagrangian and ppo.cost_critic_init == "cost_model" and ppo.cost_model is None:
        raise ConfigError("ppo.cost_critic_init=cost_model needs ppo.cost_model")
    return paths


def _check_algorithm(cfg: Config) -> None:
    if cfg.algorithm.loss not in ONLINE:
        raise ConfigError(f"algorithm.loss={cfg.algorithm.loss!r} is not an online RL loss ({', '.join(ONLINE)})")
    if cfg.train.lora.r > 0:
        raise ConfigError(f"train.lora.r={cfg.train.lora.r}: LoRA is not supported by the PPO trainer yet")


def _where(row: dict) -> str:
    place = f"row id={row.get('id')!r}"
    return place + (f" (source {row['file']}, line {row.get('line')})" if row.get("file") else "")


def check_prompts(cfg: Config, input_dir: Path, tokenizer) -> tuple[list[int], list[str]]:
    """Row indices whose prompt fits ``model.max_length`` with ``ppo.max_new_tokens`` of room, and the ids of
    those that do not (reported in the manifest, never sampled). A missing prompt is an error."""
    from eqrlhf.data.tokenize import encode_prompt
    from eqrlhf.manifest import in_id_order, read_rows

    if not (input_dir / "manifest.json").is_file():
        raise TrainInputError(
            f"prompt input {input_dir} does not exist: set ppo.input to a categorized mixture (or pairs) stage, "
            "or run `eqrlhf pipeline` first"
        )
    columns = ["id", "prompt", "history", "file", "line"]
    table = in_id_order(read_rows(input_dir))  # ppo_loop.read_prompt_rows takes these indices in the same order
    rows = table.select([c for c in columns if c in table.column_names]).to_pylist()
    bad = [f"{_where(r)}: field 'prompt' is missing or empty" for r in rows if not (r.get("prompt") or "").strip()]
    if bad:
        listed = "\n  ".join(bad[:MAX_LISTED])
        raise TrainInputError(f"prompt input {input_dir}: {len(bad)} bad row(s):\n  {listed}")
    room = cfg.model.max_length - cfg.ppo.max_new_tokens
    valid, too_long = [], []
    for i, row in enumerate(rows):
        (valid if len(encode_prompt(tokenizer, row)) <= room else too_long).append(i)
    if len(valid) < cfg.ppo.prompts_per_iteration:
        raise TrainInputError(
            f"prompt input {input_dir}: {len(valid)} of {len(rows)} prompts fit model.max_length="
            f"{cfg.model.max_length} minus ppo.max_new_tokens={cfg.ppo.max_new_tokens}; "
            f"ppo.prompts_per_iteration={cfg.ppo.prompts_per_iteration} needs at least that many"
        )
    return valid, [rows[i]["id"] for i in too_long]


def _batch_plan(cfg: Config) -> dict:
    from eqrlhf.rollout import check_engine
    from eqrlhf.rollout.weight_sync import check_sync_method
    from eqrlhf.train.deepspeed_config import global_batch_pairs

    ppo, world = cfg.ppo, cfg.train.num_workers
    rollout_batch = ppo.prompts_per_iteration * ppo.samples_per_prompt
    global_batch = global_batch_pairs(cfg.train, world)
    if rollout_batch % global_batch:
        raise ConfigError(
            f"ppo.prompts_per_iteration x ppo.samples_per_prompt = {rollout_batch} episodes must be a multiple of "
            f"the mini-batch train.micro_batch_size x train.grad_accum x train.num_workers = {global_batch}"
        )
    check_engine(cfg)  # the pool's engines are built in actors: a missing vLLM would surface only there
    if cfg.generation.engine == "vllm" and cfg.model.max_length > cfg.rollout.max_model_len:
        raise ConfigError(
            f"model.max_length={cfg.model.max_length} exceeds rollout.max_model_len={cfg.rollout.max_model_len}"
        )
    check_sync_method(cfg, trainer=True)
    return {
        "rollout_batch": rollout_batch,
        "global_batch": global_batch,
        "steps_per_iteration": ppo.ppo_epochs * rollout_batch // global_batch,
        "total_iterations": ppo.iterations,
    }


def prepare_ppo(cfg: Config) -> dict:
    """Validate config and inputs without Ray; return the plan every worker receives (plain JSON data; the
    trainer adds its ``tracking`` entry once it has dumped the config)."""
    from eqrlhf.models.loading import load_tokenizer, resolve_model
    from eqrlhf.train.checkpoint import read_trainer_state

    _check_algorithm(cfg)
    check_tracking(cfg)
    policy_path = resolve_model("model.name_or_path", cfg.model.name_or_path)
    plan = {**_batch_plan(cfg), **_check_sources(cfg, policy_path)}
    input_dir = prompt_input_dir(cfg)
    tokenizer = load_tokenizer(cfg.model.name_or_path, gguf_file=cfg.model.gguf_file)
    valid, too_long = check_prompts(cfg, input_dir, tokenizer)
    out = train_dir(cfg)
    resume_from = resume_checkpoint(cfg, out)
    start = 0
    if resume_from is not None:
        state = read_trainer_state(resume_from)
        start = state["step"]
        for key in ("rollout_batch", "global_batch"):
            if state.get(key) != plan[key]:
                raise ConfigError(
                    f"checkpoint {resume_from} was trained with {key}={state.get(key)}; this config gives "
                    f"{plan[key]}, so the run would not continue the same trajectory"
                )
        if start >= plan["total_iterations"]:
            raise ConfigError(f"checkpoint {resume_from} is at iteration {start}, already at ppo.iterations")
    return {
        **plan,
        "input_dir": str(input_dir.resolve()),
        "prompt_rows": valid,
        "prompts_too_long": too_long,
        "train_dir": str(out.resolve()),
        "start_iteration": start,
        "resume_from": str(resume_from) if resume_from else None,
        "sync_at_start": False,
        "config_hash": cfg.hash(),
    }


def build_ppo_trainer(cfg: Config, plan: dict, pool):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from eqrlhf.train.ppo_loop import ppo_loop_per_worker

    train = cfg.train
    check_worker_resources(train)
    return TorchTrainer(
        ppo_loop_per_worker,
        # the pool object carries only actor and placement-group handles: rank 0 uses them, nothing is copied
        train_loop_config={"cfg": cfg, "plan": plan, "pool": pool},
        scaling_config=scaling_config(train),
        run_config=RunConfig(
            name=CHECKPOINTS,
            storage_path=plan["train_dir"],
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env()},
        ),
    )


SUMMARY_KEYS = (
    "reward/score_mean",
    "kl/sequence",
    "ppo/policy_loss",
    "ppo/value_loss",
    "ppo/clip_frac",
    "ama/kept_fraction",
    "lagrangian/lambda",
    "lagrangian/episode_cost",
    "rollout/logprob_gap",
    "sync/seconds",
)


def summary_text(manifest: dict) -> str:
    lines = [
        f"train [{manifest['loss']}{' + AMA' if manifest['ama'] else ''}] {manifest['iterations_run']} iteration(s) "
        f"({manifest['start_iteration']} -> {manifest['total_iterations']}) in {manifest['seconds']:.1f}s, "
        f"{manifest['num_workers']} worker(s), ZeRO-{manifest['zero_stage']}, {manifest['rollout_batch']} episodes "
        f"per iteration from {manifest['engines']} {manifest['engine']} engine(s)",
        f"  prompts: {manifest['prompts']} from {manifest['input_dir']} ({manifest['prompts_too_long']} too long, "
        "never sampled)",
    ]
    for row in manifest["history"]:
        shown = "  ".join(f"{k.split('/')[-1]}={row[k]:.4f}" for k in SUMMARY_KEYS if k in row)
        lines.append(f"  iteration {row['step']}: {shown}  ({row['time/iteration_s']:.1f}s)")
    lines.append(f"  checkpoint: {manifest['final_checkpoint']}")
    return "\n".join(lines)


def run_ppo(cfg: Config, pool=None) -> dict:
    """Validate, start the engine pool (unless ``pool`` is given), train, write ``manifest.json``."""
    cfg = with_absolute_model_path(cfg)
    plan = prepare_ppo(cfg)
    out = Path(plan["train_dir"])
    # written beside the previous output and swapped in at the end, as offline training (train_output)
    with train_output(cfg, out) as target:
        plan["train_dir"] = str(target.path)
        manifest = _run_ppo(cfg, plan, out, target, pool)
        target.commit()
    print(summary_text(manifest), flush=True)
    return manifest


def _run_ppo(cfg: Config, plan: dict, out: Path, target, pool) -> dict:
    from eqrlhf.ray_utils import init_ray
    from eqrlhf.train.checkpoint import list_checkpoints
    from eqrlhf.train.metrics import METRICS_FILE, read_metrics

    work = target.path
    record = whole_config_for_records(cfg)  # the whole run's config, also where the stage holds part of it
    dump = record.model_dump(mode="json")  # one dump: train_config.json and the tracked run's params
    write_json(work / "train_config.json", dump)
    plan["tracking"] = training_plan(cfg, out, dump)  # MLflow / W&B run of rank 0; None when off
    init_ray()
    owned = pool is None
    # a pool someone else used may hold other weights: give it this run's starting policy first
    plan["sync_at_start"] = not owned
    started = time.time()
    if owned:
        from eqrlhf.rollout.pool import EnginePool

        pool = EnginePool(cfg)
    engine_nodes = list(pool.node_ids)  # read now: an owned pool is gone after the run
    try:
        result = fit_interruptibly(build_ppo_trainer(cfg, plan, pool))
    finally:
        if owned:
            pool.shutdown()
    seconds = time.time() - started
    history = read_metrics(work / METRICS_FILE)
    manifest = {
        "stage": "train",
        "config_hash": plan["config_hash"],
        "loss": cfg.algorithm.loss,
        "ama": ama_on(cfg),
        "input_dir": plan["input_dir"],
        "prompts": len(plan["prompt_rows"]),
        "prompts_too_long": len(plan["prompts_too_long"]),
        "prompts_too_long_ids": plan["prompts_too_long"][:100],
        "rollout_batch": plan["rollout_batch"],
        "global_batch": plan["global_batch"],
        "steps_per_iteration": plan["steps_per_iteration"],
        "num_workers": cfg.train.num_workers,
        "zero_stage": cfg.train.zero_stage,
        "engine": cfg.generation.engine,
        "engines": cfg.rollout.num_engines,
        "placement": {"trainer_nodes": read_placement(work), "engine_nodes": engine_nodes},  # Ray node ids
        "start_iteration": plan["start_iteration"],
        "total_iterations": plan["total_iterations"],
        "iterations_run": plan["total_iterations"] - plan["start_iteration"],
        "seconds": round(seconds, 3),
        "history": history,
        "final_metrics": history[-1] if history else dict(result.metrics or {}),
        "checkpoints": [target.final_path(p) for p in list_checkpoints(work / CHECKPOINTS)],
        "final_checkpoint": target.final_path(result.checkpoint.path) if result.checkpoint else None,
        "metrics_file": str(out / METRICS_FILE),
    }
    return finish_manifest(manifest, result, record, target)
