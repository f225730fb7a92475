"""Every stage declared once: its function, the config keys it reads, the files it reads and writes, and
when it applies. ``eqrlhf pipeline``, the single-stage commands (``eqrlhf mix`` ...), the ``jobs/`` shims
and the Tune trials all run stages from here, so they skip an unchanged stage the same way.

A stage's fingerprint (eqrlhf.fingerprint) is the digest of each declared key's value, of each input file
or folder, and of the package version. The declared keys are what the stage and the workers and actors it
starts read, branch by branch (a stage with a vLLM engine also reads ``rollout``; the judged pairs path also
reads the refusal judge's ``eval`` keys): a key missing here is a stale skip, so when a stage starts reading
a new setting, add it here. ``eqrlhf.pipeline.run_stage`` runs each stage on a config restricted to these keys
(eqrlhf.restricted_config), so reading one that is not declared raises ``UndeclaredConfigRead`` instead.

Stage order is pipeline order: categorize -> mix -> pairs -> warm_start -> on_policy -> reward -> score -> train ->
evaluate.
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from eqrlhf.algorithms.catalog import ONLINE, ama_on
from eqrlhf.config import AlgorithmSection, Config
from eqrlhf.data.categorize_stage import run_categorize
from eqrlhf.data.categorizers import validate_categorizer
from eqrlhf.data.categorizers.embedding import head_path
from eqrlhf.data.mix import run_mix, validate_mix
from eqrlhf.data.pairs import response_policy, run_pairs
from eqrlhf.data.score import run_score, scoring_needed, training_input_dir
from eqrlhf.data.sources import validate_sources
from eqrlhf.evaluate.suites import validate_suites
from eqrlhf.pipeline_report import EVALUATE_KEYS, evaluate_before_after
from eqrlhf.rollout import check_engine
from eqrlhf.train.driver import check_settings


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Config], dict]
    help: str
    reads: Callable[[Config], tuple[str, ...]]  # dotted config keys this stage reads, for this config
    inputs: Callable[[Config], list[Path]]  # files and folders it reads (earlier stages' outputs included)
    output: Callable[[Config], Path]  # the folder it writes; its manifest.json is written last
    applies: Callable[[Config], bool] = lambda cfg: True
    # the checks that need no earlier stage's output: the pipeline runs every selected stage's check
    # before any stage starts, and reports all problems at once
    check: Callable[[Config], object] | None = None


# ---- keys read by parts several stages share ----------------------------------------------------------

# a generation engine (eqrlhf.rollout.make_engine / EnginePool): vLLM engines also read `rollout`
ENGINE_KEYS = ("generation.engine", "generation.device", "generation.batch_size", "model.dtype")
ENGINE_KEYS += ("model.trust_remote_code", "model.gguf_file", "run.seed")
# the refusal judge (eqrlhf.evaluate.committed_judges.refusal_judge_for), fitted from the calibration files when missing
JUDGE_KEYS = tuple(
    f"eval.{k}"
    for k in (
        "refusal_judge",
        "refusal_head",
        "refusal_input",
        "embedding_model",
        "calibration_files",
        "calibration_test_fraction",
        "calibration_limit",
        "harm_validation_file",
        "harm_validation_limit",
    )
)


def _engine_keys(cfg: Config) -> tuple[str, ...]:
    return ENGINE_KEYS + (("rollout",) if cfg.generation.engine == "vllm" else ())


def _local(cfg: Config, *paths: str | None) -> list[Path]:
    """The given settings as paths (hub ids and bundled names stay: their digest is "missing", the key
    value already covers them); globs are expanded."""
    out = []
    for p in paths:
        if not p:
            continue
        resolved = str(cfg.resolve_path(p))
        out += [Path(m) for m in sorted(glob.glob(resolved))] if any(c in resolved for c in "*?[") else [Path(resolved)]
    return out


def _judge_files(cfg: Config) -> list[Path]:
    from eqrlhf.evaluate.committed_judges import COMMITTED_ACCURACY, COMMITTED_HEAD, head_configured

    files = _local(cfg, cfg.eval.calibration_files, cfg.eval.harm_validation_file)
    if cfg.eval.refusal_judge == "embedding" and not head_configured(cfg):  # the committed head and its accuracy
        return [COMMITTED_HEAD, COMMITTED_ACCURACY, *files]
    return _local(cfg, cfg.eval.refusal_head) + files


# ---- the reward stage (the pipeline trains a reward model when AMA needs one and the config names none) ---


def reward_stage_needed(cfg: Config) -> bool:
    """AMA token scores from a reward model that the config does not name: the pipeline trains one."""
    return ama_on(cfg) and cfg.ama.scorer == "reward_prefix" and not cfg.ama.scorer_model


def reward_model_dir(cfg: Config) -> Path:
    return cfg.run.dir / "reward_model"


# ---- the warm start (supervised fine-tuning on the chosen answers before the preference stages) -----------

# the stages that start from the warm-started model: the score stage's reference log-probs (DPO's reference
# is the model DPO starts from) and the policy. The reward model and the evaluation's "before" keep the base.
WARM_STARTED = ("score", "train")


def warm_start_dir(cfg: Config) -> Path:
    return cfg.run.dir / "warm_start"


def warm_started_model(cfg: Config) -> str:
    return str(warm_start_dir(cfg) / "final")


def _training_on_pairs(cfg: Config, loss: str, settings, output: Path) -> Config:
    """A pipeline-only training stage's config: ``loss`` on this run's pairs with its own train settings."""
    train = settings.model_copy(update={"input": str(cfg.stage_dir(cfg.pairs.output, "pairs")), "output": str(output)})
    return cfg.model_copy(update={"algorithm": AlgorithmSection(loss=loss), "train": train})


def warm_start_config(cfg: Config) -> Config:
    """The warm-start stage's config: SFT on this run's pairs (their chosen answers), `pipeline.warm_start`."""
    return _training_on_pairs(cfg, "sft", cfg.pipeline.warm_start, warm_start_dir(cfg))


# ---- on-policy rejected answers from the warm start ------------------------------------------------------

# pairs.rejected=on_policy samples the rejected side from the model DPO starts from. With a warm start that model
# only exists after the warm_start stage, which itself trains on the pairs' chosen answers: the pairs stage then
# writes instructed pairs (the source's rejected answers, or ones written under the policy instruction: the
# fallback), and the on_policy stage samples the warm-started model over them and writes <run>/on_policy, which
# the score and train stages read instead of <run>/pairs.


def on_policy_after_warm_start(cfg: Config) -> bool:
    return cfg.pipeline.warm_start is not None and cfg.pairs.rejected == "on_policy"


def on_policy_dir(cfg: Config) -> Path:
    return cfg.run.dir / "on_policy"


def on_policy_config(cfg: Config) -> Config:
    """The on_policy stage's config: the pairs stage's on-policy path over this run's pairs, sampling the
    warm-started model; every input row already has both answers (missing: error)."""
    given = str(cfg.stage_dir(cfg.pairs.output, "pairs"))
    pairs = cfg.pairs.model_copy(update={"input": given, "output": str(on_policy_dir(cfg)), "missing": "error"})
    return _starting_from_warm_start(cfg).model_copy(update={"pairs": pairs})


def _starting_from_warm_start(cfg: Config) -> Config:
    """``cfg`` with the warm-started model in place of model.name_or_path."""
    model = cfg.model.model_copy(update={"name_or_path": warm_started_model(cfg), "gguf_file": None})
    return cfg.model_copy(update={"model": model})


def effective_config(cfg: Config, stage: str | None = None) -> Config:
    """The config ``stage`` sees: the pipeline's reward model filled in where the config leaves it open; with a
    warm start, the warm-started model in place of model.name_or_path for the stages in WARM_STARTED, and
    the dpo_implicit AMA scorer (when unset) comparing the warm-started model with the base; with a warm start
    and on-policy rejected answers, instructed pairs first and the on_policy stage's pairs for WARM_STARTED."""
    if reward_stage_needed(cfg):
        final = str(reward_model_dir(cfg) / "final")
        ama = cfg.ama.model_copy(update={"scorer_model": final})
        ev = cfg.eval if cfg.eval.reward_model else cfg.eval.model_copy(update={"reward_model": final})
        cfg = cfg.model_copy(update={"ama": ama, "eval": ev})
    if cfg.pipeline.warm_start is None:
        return cfg
    if ama_on(cfg) and cfg.ama.scorer == "dpo_implicit" and not cfg.ama.scorer_model:
        # what the warm start learned, token by token: log pi_warm(y_t) - log pi_base(y_t)
        ref = cfg.ama.scorer_ref_model or cfg.model.name_or_path
        ama = cfg.ama.model_copy(update={"scorer_model": warm_started_model(cfg), "scorer_ref_model": ref})
        cfg = cfg.model_copy(update={"ama": ama})
    if stage in WARM_STARTED:
        cfg = _starting_from_warm_start(cfg)
    if not on_policy_after_warm_start(cfg):
        return cfg
    if stage == "pairs":
        return cfg.model_copy(update={"pairs": cfg.pairs.model_copy(update={"rejected": "instructed"})})
    if stage in WARM_STARTED:
        sampled = str(on_policy_dir(cfg))
        ama = cfg.ama if cfg.ama.input else cfg.ama.model_copy(update={"input": sampled})
        cfg = cfg.model_copy(update={"ama": ama, "pairs": cfg.pairs.model_copy(update={"output": sampled})})
    return cfg


def reward_config(cfg: Config) -> Config:
    """The reward-model stage's config: Bradley-Terry loss on this run's pairs, `pipeline.reward_train` settings."""
    return _training_on_pairs(cfg, "reward", cfg.pipeline.reward_train, reward_model_dir(cfg))


def run_train(cfg: Config) -> dict:
    # imported on use: eqrlhf.train pulls in torch and DeepSpeed (3 s), and the CLI imports this module
    # to build its --help and to refuse a bad config in well under a second
    from eqrlhf.train import run_train as train

    return train(cfg)


def _pipeline_training(name: str, help: str, section: str, to_config, output, applies) -> Stage:
    """A training stage only the pipeline runs (warm start, reward model): its config is ``to_config(cfg)``,
    built from the ``pipeline.<section>`` train settings and the run's pairs."""
    return Stage(
        name,
        lambda c: run_train(to_config(c)),
        help,
        lambda c: (f"pipeline.{section}", "model", "run.seed", "pairs.output"),
        lambda c: [c.stage_dir(c.pairs.output, "pairs"), *_local(c, c.model.name_or_path)],
        output,
        applies,
        check=lambda c: check_settings(to_config(c)),
    )


def _check_categorize(cfg: Config) -> None:
    validate_sources(cfg)
    validate_categorizer(cfg)


def _check_pairs(cfg: Config) -> None:
    response_policy(cfg)
    if cfg.pairs.missing == "generate" or cfg.pairs.rejected == "on_policy" or cfg.pairs.judge:
        check_engine(cfg)


def _check_evaluate(cfg: Config) -> None:
    validate_suites(cfg)
    validate_categorizer(cfg)
    check_engine(cfg)


# ---- declarations ----------------------------------------------------------------------------------------


def _categorize_reads(cfg: Config) -> tuple[str, ...]:
    judge = cfg.categorize.method == "judge"
    return ("data", "categorize", "run.seed") + ((*_engine_keys(cfg), "model.name_or_path") if judge else ())


def _categorize_inputs(cfg: Config) -> list[Path]:
    files = _local(cfg, *(s.path for s in cfg.data.sources))
    if cfg.categorize.method == "embedding":
        files += [head_path(cfg), *_local(cfg, cfg.categorize.embedding.model)]  # the shipped head when unset
    if cfg.categorize.method == "judge":
        judge = cfg.categorize.judge
        files += _local(cfg, judge.prompt_file, judge.model or cfg.model.name_or_path)
    return files


def _pairs_reads(cfg: Config) -> tuple[str, ...]:
    judged = cfg.pairs.rejected == "on_policy" or cfg.pairs.judge
    keys = ("pairs", "generation", "model", "data.rows_per_block", "data.error_budget", *_engine_keys(cfg))
    return keys + (JUDGE_KEYS if judged else ())


def _pairs_inputs(cfg: Config) -> list[Path]:
    judged = cfg.pairs.rejected == "on_policy" or cfg.pairs.judge
    files = [cfg.stage_dir(cfg.pairs.input, "mixture")]
    files += _local(cfg, cfg.model.name_or_path, cfg.pairs.chosen_model)
    return files + (_judge_files(cfg) if judged else [])


def _train_reads(cfg: Config) -> tuple[str, ...]:
    keys = ("train", "algorithm", "model", "run.seed")
    if cfg.algorithm.loss in ONLINE:
        return keys + ("ppo", "ama", "generation", "rollout")
    # the input folder (eqrlhf.data.score.training_input_dir): the scored pairs when the config scores, else the pairs
    keys += ("pairs.output", "control.clm_weight") + (("ama.output",) if scoring_needed(cfg) else ())
    # the AMA mask's settings only for a loss that masks (eqrlhf.train.loop.StepSpec reads them only then)
    return keys + (("ama.rule", "ama.tau", "ama.baseline", "ama.baseline_mode") if ama_on(cfg) else ())


def _train_inputs(cfg: Config) -> list[Path]:
    if cfg.algorithm.loss in ONLINE:
        files = [cfg.stage_dir(cfg.ppo.input, "mixture"), *_local(cfg, cfg.ppo.reward_model, cfg.ppo.cost_model)]
    else:
        files = [training_input_dir(cfg)]
    return files + _local(cfg, cfg.model.name_or_path, cfg.train.resume_from)


def _evaluate_inputs(cfg: Config) -> list[Path]:
    e = cfg.eval
    files = [cfg.stage_dir(cfg.train.output, "train") / "final"]
    files += _local(cfg, cfg.model.name_or_path, e.baseline_model, e.reward_model, e.cost_model, e.harm_judge_model)
    files += _local(cfg, *(s.path for suite in e.suites for s in suite.sources), *e.training_data)
    files += _judge_files(cfg) + _local(cfg, e.embedding_model)
    if cfg.categorize.method == "embedding":
        files += [head_path(cfg), *_local(cfg, cfg.categorize.embedding.model)]
    return files + ([cfg.run.dir / "pairs"] if not e.training_data else [])


PIPELINE = [
    Stage(
        "categorize",
        run_categorize,
        "stream sources and label EHD/IHD/MHD/none",
        _categorize_reads,
        _categorize_inputs,
        lambda c: c.stage_dir(c.categorize.output, "categorized"),
        check=_check_categorize,
    ),
    Stage(
        "mix",
        run_mix,
        "build a training mixture from categorized data",
        lambda c: ("mix", "run.seed", "data.rows_per_block"),
        lambda c: [c.stage_dir(c.mix.input, "categorized"), *(c.resolve_path(d) for d in c.mix.exclude)],
        lambda c: c.stage_dir(c.mix.output, "mixture"),
        check=validate_mix,
    ),
    Stage(
        "pairs",
        run_pairs,
        "turn prompts into preference pairs",
        _pairs_reads,
        _pairs_inputs,
        lambda c: c.stage_dir(c.pairs.output, "pairs"),
        check=_check_pairs,
    ),
    _pipeline_training(
        "warm_start",
        "supervised fine-tuning on the pairs' chosen answers before DPO (pipeline only)",
        "warm_start",
        warm_start_config,
        warm_start_dir,
        lambda c: c.pipeline.warm_start is not None,
    ),
    Stage(
        "on_policy",
        lambda c: run_pairs(on_policy_config(c)),
        "sample the rejected answers from the warm-started model (pipeline only)",
        lambda c: _pairs_reads(on_policy_config(c)),
        lambda c: _pairs_inputs(on_policy_config(c)),
        on_policy_dir,
        on_policy_after_warm_start,
        check=lambda c: _check_pairs(on_policy_config(c)),
    ),
    _pipeline_training(
        "reward",
        "train the reward model behind AMA scores (pipeline only)",
        "reward_train",
        reward_config,
        reward_model_dir,
        reward_stage_needed,
    ),
    Stage(
        "score",
        run_score,
        "add AMA token scores and reference log-probs",
        lambda c: ("ama", "algorithm", "model", "run.seed", "train.autocast"),
        lambda c: [
            c.stage_dir(c.ama.input, "pairs"),
            *_local(c, c.model.name_or_path, c.ama.scorer_model, c.ama.scorer_ref_model),
        ],
        lambda c: c.stage_dir(c.ama.output, "scored"),
        scoring_needed,
    ),
    Stage(
        "train",
        run_train,
        "Ray Train + DeepSpeed training (SFT, DPO family, BFPO, RM, cost, PPO)",
        _train_reads,
        _train_inputs,
        lambda c: c.stage_dir(c.train.output, "train"),
        check=check_settings,
    ),
    Stage(
        "evaluate",
        evaluate_before_after,
        "evaluate the starting and the trained model (pipeline only)",
        lambda c: (*EVALUATE_KEYS, "train.output"),
        _evaluate_inputs,
        lambda c: c.stage_dir(c.eval.output, "eval"),
        check=_check_evaluate,
    ),
]
STAGES = {stage.name: stage for stage in PIPELINE}
