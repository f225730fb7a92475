"""`eqrlhf evaluate`: harmful compliance, over-refusal and helpfulness of one model, with validated judges.

``evaluate_model(cfg, model_path, tag)`` is the library function (Ray Tune trials and the pipeline call it);
``run_evaluate`` is the stage. Order of work: everything that can be wrong with the config or the inputs is
checked first (suites, models, judges, calibration files), then the prompts are read and categorized, the
refusal judge loaded (the embedding head is fitted on first use), completions generated through the rollout
pool (``generation.engine``: hf or vllm; sampling from ``generation``), judged, and the helpfulness numbers
computed in-process. Output in ``<run>/eval/<tag>/``: ``eval.json``, ``completions.jsonl``, ``report.md``,
``safety_plane.png``, ``refusal_by_category.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from pathlib import Path

from eqrlhf.config import Config, ConfigError
from eqrlhf.errors import InputNotFound, tried

__all__ = ["evaluate_model", "judges_record", "model_tag", "run_evaluate"]


def model_tag(model: str) -> str:
    """A folder name for a model: the last path component, with anything but [A-Za-z0-9._-] replaced."""
    name = Path(model.rstrip("/")).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _scalar_head(key: str, value: str) -> str:
    from eqrlhf.models.heads import HEAD_CONFIG
    from eqrlhf.models.loading import resolve_model

    path = resolve_model(key, value)
    if not (Path(path) / HEAD_CONFIG).is_file():
        raise InputNotFound(f"{path} is not a scalar-head model (no {HEAD_CONFIG})", field=key)
    return path


def check_evaluation(cfg: Config, model_path: str) -> dict:
    """Fail on a bad config before any model is loaded or Ray started; return model paths and suite plans."""
    from eqrlhf.data.categorizers import validate_categorizer
    from eqrlhf.evaluate.committed_judges import refusal_head_file
    from eqrlhf.evaluate.judges import calibration_found
    from eqrlhf.evaluate.suites import validate_suites
    from eqrlhf.models.loading import resolve_model
    from eqrlhf.rollout import check_engine

    ev = cfg.eval
    plans = validate_suites(cfg)
    validate_categorizer(cfg)
    check_engine(cfg)  # the pool's engines are built in actors: a missing vLLM would surface only there
    if ev.harm_judge_model and ev.cost_model:
        raise ConfigError("eval.harm_judge_model and eval.cost_model are both set: pick one harm judge")
    paths = {"model": resolve_model("eval.model", model_path)}
    paths["baseline"] = resolve_model("eval.baseline_model", ev.baseline_model or cfg.model.name_or_path)
    if ev.harm_judge_model:
        paths["harm_judge"] = resolve_model("eval.harm_judge_model", ev.harm_judge_model)
    if ev.cost_model:
        paths["cost"] = _scalar_head("eval.cost_model", ev.cost_model)
    if ev.reward_model:
        paths["reward"] = _scalar_head("eval.reward_model", ev.reward_model)
    # a judge that is fitted, or is a model, is validated on human labels before use; the rule baseline
    # may run without them (and says so in the report)
    missing = calibration_found(cfg)
    head = refusal_head_file(cfg)  # the committed head unless eval.refusal_head names another
    if ev.refusal_judge == "embedding" and not head.is_file():
        for problem in filter(None, missing.values()):
            raise InputNotFound(
                f"{problem}: eval.refusal_head {head} does not exist and would be fitted and validated on it "
                "(or use eval.refusal_judge=rule)"
            )
    if (ev.harm_judge_model or ev.cost_model) and missing["harm"]:
        kind = "LLM" if ev.harm_judge_model else "cost-model"
        raise InputNotFound(f"{missing['harm']}: the {kind} harm judge is validated on it before use")
    # a wrong eval.training_data entry fails here, before any model loads
    return {"paths": paths, "plans": plans, "training": training_dirs(cfg)}


def run_evaluate(cfg: Config) -> dict:
    if cfg.control.evaluate:  # controllable generation: levels requested vs measured (issue 7)
        from eqrlhf.evaluate.controllability import run_controllability

        return run_controllability(cfg)
    return evaluate_model(cfg, cfg.eval.model or cfg.model.name_or_path, cfg.eval.tag)


def evaluate_model(cfg: Config, model_path: str | None = None, tag: str | None = None) -> dict:
    """Evaluate one model (checkpoint dir, hub id or "smollm2-135m") on ``cfg.eval.suites``.

    Writes ``<run>/eval/<tag>/`` (``cfg.eval.output`` replaces ``<run>/eval``) and returns the eval.json
    document. Keys:

    - ``summary``: flat, for Tune objectives: ``harmful_compliance`` and ``over_refusal`` (rates in [0, 1],
      lower is better), ``likelihood_retention`` (nats/token vs the baseline model, 0 = nothing lost,
      higher is better), ``reward`` (mean reward-model score, None unless ``eval.reward_model``),
      ``refusal_judge_accuracy``/``refusal_judge_f1``/``harm_judge_accuracy`` (on held-out human labels,
      None when not validated), ``harmful_n``/``benign_n``/``helpful_n`` (prompts judged). A rate is None
      when no suite of its kind was evaluated.
    - ``headline``: the three main numbers with ``count``/``n``/``ci95`` (rates: ``rate``; means: ``mean``).
    - ``metrics``: refusal, harmful compliance and over-refusal overall, ``by_kind``, ``by_category``,
      ``by_kind_category`` and ``by_suite`` (each suite again ``by_category``), all with counts and 95% CIs.
    - ``helpfulness``: likelihood retention (overall, ``by_suite``, ``by_category``), reference
      log-likelihoods, reward; ``judges``: which judges were used and their validation numbers;
      ``suites``: sources and read/skip/error counts; ``sampling``, ``engine``, ``seconds``, ``out_dir``.
    """
    from eqrlhf.evaluate.committed_judges import refusal_judge_for
    from eqrlhf.evaluate.generation import generate
    from eqrlhf.evaluate.helpfulness import helpfulness_numbers
    from eqrlhf.evaluate.judges import Judges, score_completions
    from eqrlhf.evaluate.leakage import LeakageCheck, fail_on_leaks
    from eqrlhf.evaluate.metrics import summarize
    from eqrlhf.evaluate.report import summary_line, write_outputs
    from eqrlhf.evaluate.suites import load_suites
    from eqrlhf.rollout import Sampling

    started = time.time()
    model_path = model_path or cfg.eval.model or cfg.model.name_or_path
    tag = tag or cfg.eval.tag or model_tag(model_path)
    if tag != model_tag(tag):
        raise ConfigError(f"eval.tag '{tag}' must be a plain folder name ([A-Za-z0-9._-])")
    checked = check_evaluation(cfg, model_path)
    paths = checked["paths"]
    out_dir = cfg.stage_dir(cfg.eval.output, "eval") / tag
    ev = cfg.eval
    leakage = LeakageCheck.of_stages(checked["training"], ev.near_duplicate_threshold, ev.embedding_model)
    suites = load_suites(cfg, checked["plans"], leakage if checked["training"] else None)
    leaked = {s.name: s.leaked for s in suites if s.leaked}
    if ev.leakage == "fail":
        fail_on_leaks(leaked, leakage)  # before any model is loaded
    rows = [r for s in suites for r in s.rows]
    refusal_judge, validation = refusal_judge_for(cfg)

    sampling = Sampling.from_config(cfg.generation, seed=cfg.run.seed)
    completions = generate(cfg, paths["model"], rows, sampling)
    with harm_judge(cfg, paths, validation["harm"]) as (harm, harm_info):
        scored = score_completions(rows, completions, Judges(refusal_judge, harm))
    helpfulness = helpfulness_numbers(cfg, paths, scored, rows)

    judges = judges_record(refusal_judge.name, validation, harm_info, scored)
    doc = eval_document(cfg, tag, model_path, paths, suites, summarize(scored), helpfulness, judges)
    doc["training_overlap"] = leakage.summary(suites, leaked, ev.leakage)
    doc["sampling"] = dataclasses.asdict(sampling)
    doc["out_dir"] = str(out_dir)
    doc["seconds"] = round(time.time() - started, 1)
    write_outputs(cfg, doc, scored, out_dir)
    print(summary_line(doc, out_dir))
    return doc


def judges_record(used: str, validation: dict, harm_info: dict, scored: list[dict]) -> dict:
    """eval.json's ``judges``: which judges were used and their numbers on human labels (marked ``offline`` where
    they are the committed measurement because no human-labelled rows are here; None: not validated at all)."""
    from eqrlhf.evaluate.metrics import rate

    return {
        "refusal": {
            "used": used,
            "validation": validation["refusal"],
            "compared": validation["compared"],  # other judges on the same held-out rows
            "missing": validation["missing"],
            # the human labels come from larger models' replies; low agreement with the rule baseline on
            # this model's replies is a warning that its outputs look unlike the calibration data
            "agreement_with_rule": rate(sum(r["refused"] == r["refused_rule"] for r in scored), len(scored)),
        },
        "harm": harm_info,
    }


def training_dirs(cfg: Config) -> list[Path]:
    """``eval.training_data`` (each must be a stage dir), else the run's own pairs when they exist."""
    from eqrlhf.manifest import MANIFEST

    if not cfg.eval.training_data:
        pairs = cfg.run.dir / "pairs"
        return [pairs] if (pairs / MANIFEST).is_file() else []
    dirs = [cfg.resolve_path(d) for d in cfg.eval.training_data]
    for i, d in enumerate(dirs):
        if not (d / MANIFEST).is_file():
            raise InputNotFound(f"no stage output (manifest.json) in {tried(d)}", field=f"eval.training_data[{i}]")
    return dirs


@contextlib.contextmanager
def harm_judge(cfg: Config, paths: dict, refusal_based_validation: dict | None):
    """(judge, info) for the configured harm judge, validated on the JailbreakBench human labels first.

    The default judge is None (harmful compliance = harmful prompt and not refused); its validation comes
    with the refusal judge. An LLM judge runs in its own EnginePool, shut down on exit."""
    from eqrlhf.evaluate.judges import load_harm_calibration

    ev = cfg.eval
    if ev.harm_judge_model:
        from eqrlhf.evaluate.harm import LLMHarmJudge
        from eqrlhf.rollout.pool import EnginePool

        with EnginePool(cfg, paths["harm_judge"]) as pool:
            judge = LLMHarmJudge(pool, ev.harm_judge_max_new_tokens)
            yield (
                judge,
                {"used": f"llm ({ev.harm_judge_model})", "validation": judge.validation(load_harm_calibration(cfg))},
            )
    elif ev.cost_model:
        from eqrlhf.evaluate.harm import CostHarmJudge
        from eqrlhf.evaluate.helpfulness import load_scalar_head
        from eqrlhf.rollout import resolve_device

        model, tokenizer = load_scalar_head(paths["cost"], paths["model"], cfg.model.dtype)
        model = model.to(resolve_device(cfg.generation.device))
        judge = CostHarmJudge(model, tokenizer, ev.cost_threshold, cfg.model.max_length, ev.batch_size)
        used = f"cost ({ev.cost_model}, harmful when cost > {ev.cost_threshold})"
        yield judge, {"used": used, "validation": judge.validation(load_harm_calibration(cfg))}
    else:
        yield None, {"used": "refusal-based (harmful prompt and not refused)", "validation": refusal_based_validation}


def eval_document(cfg: Config, tag, model_path, paths, suites, metrics, helpfulness, judges) -> dict:
    """Everything eval.json holds besides sampling settings, timing and the output folder."""
    from eqrlhf.evaluate.metrics import rate

    headline = {
        "harmful_compliance": metrics.get("harmful_compliance", rate(0, 0)),  # rate None: no such suite
        "over_refusal": metrics.get("over_refusal", rate(0, 0)),
        "likelihood_retention": helpfulness["likelihood_retention"],
    }
    return {
        "tag": tag,
        "model": model_path,
        "model_resolved": paths["model"],
        "baseline_model": paths["baseline"],
        "config_hash": cfg.hash(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "engine": {
            "engine": cfg.generation.engine,
            "num_engines": cfg.rollout.num_engines,
            "device": cfg.generation.device,
            "batch_size": cfg.generation.batch_size,
        },
        "categorizer": cfg.categorize.method,
        "summary": flat_summary(headline, metrics, helpfulness, judges),
        "judges": judges,
        "suites": {
            s.name: {
                "kind": s.kind,
                "sources": [str(cfg.resolve_path(src.path)) for src in _suite_config(cfg, s.name).sources],
                "counts": s.counts,
                "errors": s.errors,
            }
            for s in suites
        },
        "headline": headline,
        "metrics": metrics,
        "helpfulness": helpfulness,
        "completions_file": "completions.jsonl",
    }


def flat_summary(headline: dict, metrics: dict, helpfulness: dict, judges: dict) -> dict:
    """The numbers a sweep optimises, as plain floats (None where not measured)."""
    refusal, harm = judges["refusal"]["validation"] or {}, judges["harm"]["validation"] or {}
    by_kind = metrics["by_kind"]
    return {
        "harmful_compliance": headline["harmful_compliance"]["rate"],
        "over_refusal": headline["over_refusal"]["rate"],
        # refusals of ordinary requests with reference answers (helpful suites): over-safety beyond look-alikes
        "helpful_refusal": by_kind["helpful"]["refusal"]["rate"] if "helpful" in by_kind else None,
        "likelihood_retention": headline["likelihood_retention"]["mean"],
        "reward": (helpfulness.get("reward") or {}).get("mean"),
        "refusal_judge_accuracy": refusal.get("accuracy"),
        "refusal_judge_f1": refusal.get("f1"),
        "harm_judge_accuracy": harm.get("accuracy"),
        **{f"{kind}_n": by_kind.get(kind, {}).get("n", 0) for kind in ("harmful", "benign", "helpful")},
    }


def _suite_config(cfg: Config, name: str):
    return next(s for s in cfg.eval.suites if s.name == name)
