"""The pipeline's evaluate stage (base and trained model) and its before/after report.

``flat_summary(doc)`` turns an ``eval.json`` document into plain floats (harmful_compliance, over_refusal,
likelihood_retention, reward, per-kind-and-category refusal rates); the sweep reports the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from eqrlhf.atomic import write_json
from eqrlhf.config import CATEGORIES, Config
from eqrlhf.errors import InputNotFound, tried
from eqrlhf.fingerprint import fingerprint
from eqrlhf.restricted_config import declared_tree

EVAL_MANIFEST = "manifest.json"
BASE_TAG, TRAINED_TAG = "base", "trained"
HEADLINE = (
    ("harmful_compliance", "harmful compliance", "lower is better"),
    ("over_refusal", "over-refusal", "lower is better"),
    ("helpful_refusal", "helpful refusals", "lower is better"),
    ("likelihood_retention", "likelihood retention", "higher is better"),
    ("reward", "reward (helpful suites)", "higher is better"),
)


# ---- numbers out of an eval.json ------------------------------------------------------------------------


def _value(stat, key: str):
    return stat.get(key) if isinstance(stat, dict) else stat


def flat_summary(doc: dict) -> dict:
    """Plain floats (None where not measured) from an evaluation document.

    Uses the document's own flat ``summary`` when it has one; otherwise reads ``headline`` (rates and means
    with their intervals) and ``helpfulness.reward``. Adds ``refusal/<kind>/<category>`` rates.
    """
    summary = dict(doc.get("summary") or {})
    headline = doc.get("headline", {})
    summary.setdefault("harmful_compliance", _value(headline.get("harmful_compliance"), "rate"))
    summary.setdefault("over_refusal", _value(headline.get("over_refusal"), "rate"))
    summary.setdefault("likelihood_retention", _value(headline.get("likelihood_retention"), "mean"))
    summary.setdefault("reward", _value((doc.get("helpfulness") or {}).get("reward"), "mean"))
    by_kind_category = (doc.get("metrics") or {}).get("by_kind_category", {})
    for kind in ("harmful", "benign"):
        for category in (*CATEGORIES, "unmapped"):
            stat = by_kind_category.get(kind, {}).get(category)
            if stat:
                summary[f"refusal/{kind}/{category}"] = _value(stat.get("refusal"), "rate")
    return summary


# ---- the evaluate stage ----------------------------------------------------------------------------------


# what the evaluate stage reads (eqrlhf.stages declares it with these keys and ``train.output``)
EVALUATE_KEYS = ("eval", "generation", "model", "categorize", "data", "rollout", "run.seed", "pipeline.evaluate_base")


def _base_fingerprint(cfg: Config) -> str:
    """The base model's evaluation depends on the evaluate stage's keys and the base model's files."""
    local = Path(cfg.model.name_or_path)
    tree = declared_tree(cfg, EVALUATE_KEYS)  # not cfg.model_dump(): the stage holds only its declared keys
    parts = fingerprint(tree, EVALUATE_KEYS, [local] if local.exists() else [])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _entry(tag: str, model: str, out_dir: Path, doc: dict, reused: bool = False) -> dict:
    return {
        "tag": tag,
        "model": model,
        "eval_json": str(out_dir / tag / "eval.json"),
        "report": str(out_dir / tag / "report.md"),
        "summary": flat_summary(doc),
        "reused": reused,
    }


def evaluate_before_after(cfg: Config) -> dict:
    """Evaluate the starting model (``base``, reused while its inputs are unchanged) and the trained one."""
    from eqrlhf.evaluate import evaluate_model

    out_dir = cfg.stage_dir(cfg.eval.output, "eval")
    trained = cfg.stage_dir(cfg.train.output, "train") / "final"
    if not trained.exists():
        raise InputNotFound(f"evaluate: no trained model at {tried(trained)}: run the train stage first")
    manifest_path = out_dir / EVAL_MANIFEST
    previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    base_fp = _base_fingerprint(cfg)
    manifest = {"stage": "evaluate", "config_hash": cfg.hash(), "base_fingerprint": base_fp}
    if cfg.pipeline.evaluate_base:
        base_json = out_dir / BASE_TAG / "eval.json"
        if previous.get("base_fingerprint") == base_fp and base_json.is_file():
            print(f"[pipeline] evaluate: base model unchanged, reusing {base_json}")
            manifest["base"] = _entry(
                BASE_TAG, cfg.model.name_or_path, out_dir, json.loads(base_json.read_text()), True
            )
        else:
            doc = evaluate_model(cfg, cfg.model.name_or_path, BASE_TAG)
            manifest["base"] = _entry(BASE_TAG, cfg.model.name_or_path, out_dir, doc)
    doc = evaluate_model(cfg, str(trained), TRAINED_TAG)
    manifest["trained"] = _entry(TRAINED_TAG, str(trained), out_dir, doc)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(manifest_path, manifest)
    return manifest


# ---- the report ----------------------------------------------------------------------------------------------


def _fmt(value, key: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if key in ("likelihood_retention", "reward") else f"{100 * value:.1f}%"


def _change(before, after, key: str) -> str:
    if before is None or after is None:
        return ""
    delta = after - before
    return f"{delta:+.3f}" if key in ("likelihood_retention", "reward") else f"{100 * delta:+.1f} pt"


def _headline_stat(eval_json: str, key: str) -> str:
    """The rate or mean with its interval and count, as the evaluation report writes it."""
    from eqrlhf.evaluate.report import fmt_mean, fmt_rate

    doc = json.loads(Path(eval_json).read_text())
    if key == "reward":
        return fmt_mean((doc.get("helpfulness") or {}).get("reward"))
    if key == "helpful_refusal":  # refusals of ordinary requests (helpful suites)
        stat = ((doc.get("metrics") or {}).get("by_kind", {}).get("helpful") or {}).get("refusal")
    else:
        stat = doc.get("headline", {}).get(key)
    return fmt_mean(stat) if key == "likelihood_retention" else fmt_rate(stat)


def _category_rows(base: dict | None, trained: dict) -> list[str]:
    rows = []
    for kind, label in (("harmful", "refusal on harmful"), ("benign", "refusal on benign")):
        for category in (*CATEGORIES, "unmapped"):
            key = f"refusal/{kind}/{category}"
            if key in trained["summary"]:
                before = base["summary"].get(key) if base else None
                after = trained["summary"][key]
                rows.append(f"| {label}, {category} | {_fmt(before, 'rate')} | {_fmt(after, 'rate')} |")
    return rows


def _stage_rows(timings: dict) -> list[str]:
    rows = []
    for name, seconds in timings.items():
        status = "skipped (unchanged)" if seconds is None else f"{seconds:.1f} s"
        rows.append(f"| {name} | {status} |")
    return rows


def write_report(cfg: Config, report: dict, timings: dict, seconds: float) -> Path:
    """``<run>/report.md``: before/after headline numbers with intervals, per-category refusal, stages."""
    ev = report["evaluate"]
    base, trained = ev.get("base"), ev["trained"]
    lines = [
        f"# eqrlhf pipeline report: {cfg.run.name}",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}; model `{cfg.model.name_or_path}`, "
        f"loss `{cfg.algorithm.loss}`, config hash `{cfg.hash()}`.",
        "",
        "## Before and after training",
        "",
        "| metric | base | trained | change | |",
        "|---|---|---|---|---|",
    ]
    for key, label, better in HEADLINE:
        b = base["summary"].get(key) if base else None
        t = trained["summary"].get(key)
        lines.append(f"| {label} | {_fmt(b, key)} | {_fmt(t, key)} | {_change(b, t, key)} | {better} |")
    lines += ["", "With 95% intervals and counts:", "", "| metric | base | trained |", "|---|---|---|"]
    for key, label, _ in HEADLINE:
        b = _headline_stat(base["eval_json"], key) if base else "n/a"
        lines.append(f"| {label} | {b} | {_headline_stat(trained['eval_json'], key)} |")
    lines += ["", "## Refusal by kind and risk category", "", "| | base | trained |", "|---|---|---|"]
    lines += _category_rows(base, trained)
    lines += ["", "Full evaluation reports (judge validation, per-suite numbers, plots):", ""]
    for entry in filter(None, (base, trained)):
        lines.append(f"- {entry['tag']}: `{entry['report']}`")
    train = report.get("train") or {}
    if train.get("final_metrics"):
        final = train["final_metrics"]
        shown = ", ".join(
            f"{k} {final[k]:.4f}" for k in ("loss", "rewards/accuracy", "ama/kept_fraction") if k in final
        )
        lines += ["", "## Training", "", f"{train.get('steps_run', '?')} steps of `{train.get('loss')}`: {shown}."]
        lines.append(f"Checkpoint `{train.get('final')}`; metrics `{train.get('metrics_file')}`.")
    lines += ["", f"## Stages ({seconds:.0f} s this run)", "", "| stage | time |", "|---|---|"]
    lines += _stage_rows(timings)
    path = cfg.run.dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _paired_p(completions: tuple[dict, dict] | None, key: str) -> str:
    """McNemar's exact p between the base and the trained model on the prompts both were judged on."""
    from eqrlhf.evaluate.compare import METRICS, paired

    if completions is None or key not in METRICS:
        return ""
    result = paired(*completions, key)
    return f"paired p={result['p']:.3g} (n={result['n']})" if result["n"] else ""


def _both_completions(base: dict | None, trained: dict) -> tuple[dict, dict] | None:
    """Both models' completion records by prompt id, read once for every paired test."""
    from eqrlhf.evaluate.compare import load_completions

    if base is None:
        return None
    try:
        return tuple(load_completions(Path(e["eval_json"]).parent) for e in (base, trained))
    except InputNotFound:
        return None


def _stage_result(name: str, manifest: dict) -> str:
    """One stage's outcome in a few words, from its manifest."""
    if name == "evaluate":
        base = manifest.get("base")
        return ("base model" + (" (reused)" if base.get("reused") else "") + " and " if base else "") + "trained model"
    if "steps_run" in manifest:  # the training stages
        loss = (manifest.get("final_metrics") or {}).get("loss")
        return f"{manifest['steps_run']} steps" + (f", final loss {loss:.4f}" if loss is not None else "")
    if "rows_written" in manifest:  # the data stages
        accuracy = manifest.get("scorer_accuracy")  # the score stage: how well its scorer ranks the pairs
        ranked = f", scorer ranks {accuracy['rate']:.0%} of pairs right" if accuracy and accuracy["n"] else ""
        return f"{manifest['rows_written']} rows written{ranked}"
    return ""


def summary_screen(
    cfg: Config, report: dict, timings: dict, seconds: float, path: Path | None = None, logs: Path | None = None
) -> str:
    """The pipeline's last screen: what each stage did and how long it took, where the outputs and the full logs
    are; with the evaluate stage, first the before/after numbers, each with its 95% interval and count, the
    change, and for the rates McNemar's paired test between the two models on the same prompts."""
    rule = "-" * 78
    lines = [rule, f"eqrlhf pipeline '{cfg.run.name}' ({cfg.algorithm.loss}) finished in {seconds:.0f} s", rule]
    if "evaluate" in report:
        ev = report["evaluate"]
        base, trained = ev.get("base"), ev["trained"]
        completions = _both_completions(base, trained)
        for key, label, better in HEADLINE:
            b = base["summary"].get(key) if base else None
            t = trained["summary"].get(key)
            if b is None and t is None:
                continue
            change = _change(b, t, key)
            test = _paired_p(completions, key)
            lines.append(f"{label} ({better}){': ' + change if change else ''}{'  ' + test if test else ''}")
            if base:
                lines.append(f"  base     {_headline_stat(base['eval_json'], key)}")
            lines.append(f"  trained  {_headline_stat(trained['eval_json'], key)}")
        lines.append(rule)
    statuses = {name: "skipped, unchanged" if took is None else f"{took:.0f} s" for name, took in timings.items()}
    name_width = max(map(len, statuses), default=0)
    status_width = max(map(len, statuses.values()), default=0)
    for name, status in statuses.items():
        result = _stage_result(name, report.get(name, {}))
        lines.append(f"{name:<{name_width}}  {status:>{status_width}}  {result}".rstrip())
    lines += [rule, f"outputs: {cfg.run.dir}"]
    if path is not None:
        lines.append(f"report: {path}")
    if logs is not None:
        lines.append(f"logs: {logs} (all Ray workers' output, Ray Data and Ray Train logs)")
    return "\n".join([*lines, rule])
