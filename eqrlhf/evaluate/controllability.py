"""Controllability: does the measured helpfulness / harmlessness follow the requested levels?

`eqrlhf evaluate` with ``control.evaluate: true`` runs this instead of the safety evaluation. Every control
setting (all level combinations) is applied to ``control.eval_prompts`` prompts of each split: ``seen``
(sampled from the control-data stage's ``train_prompts.jsonl``) and ``unseen`` (``heldout_prompts.jsonl``,
never sampled for training), with each method:

- ``tags``: the trained model (``eval.model``) on ``<tags> <prompt>``;
- ``prompting``: the base model (``control.base_model`` or ``model.name_or_path``) with a system prompt
  describing the levels (:func:`eqrlhf.control.baselines.system_prompt`);
- ``rerank``: the base model's ``control.rerank_samples`` samples per prompt, the best match picked per
  setting (:func:`eqrlhf.control.baselines.rerank`).

Responses are scored with the same scorers as the training data and binned with the SAME edges (read from
the control-data manifest). Per method, split and attribute a (see :func:`group_metrics`):

- ``spearman``: Spearman rank correlation between requested level of a and measured score of a over all
  (prompt, setting) responses (None when either side is constant);
- ``in_bin``: fraction of responses whose measured level of a equals the requested one;
- ``mean_by_level``: mean measured score of a per requested level of a;
- ``cross[b]``: the effect of the OTHER attribute's request on a: Spearman of requested level of b vs
  measured a, and ``slope`` (least-squares change of measured a per level of b). Ideal control has a large
  own correlation and cross effects near 0.

Output ``<eval.output or run/eval>/<eval.tag or "controllability">/``: ``controllability.json``,
``responses.jsonl``, ``controllability.png``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from eqrlhf.config import Config, ConfigError
from eqrlhf.control.binning import assign_levels
from eqrlhf.control.encoding import all_settings, check_levels, tag_prompt
from eqrlhf.errors import InputError

SPLITS = ("seen", "unseen")


# ---- metrics (pure) ----------------------------------------------------------------------------------------


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (average ranks for ties); None when fewer than 2 points or either side is constant."""
    from scipy.stats import rankdata

    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(np.corrcoef(rankdata(x), rankdata(y))[0, 1])


def slope(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Least-squares slope of y on x; None when x is constant."""
    if len(x) < 2 or len(set(x)) < 2:
        return None
    return float(np.polyfit(np.asarray(x, dtype=float), np.asarray(y, dtype=float), 1)[0])


def group_metrics(records: list[dict], levels: dict[str, int], edges: dict[str, Sequence[float]]) -> dict:
    """Per attribute: spearman, in_bin, mean_by_level and cross effects; records hold requested/scores dicts."""
    out = {"n": len(records)}
    for a in levels:
        wanted = [r["requested"][a] for r in records]
        measured = [r["scores"][a] for r in records]
        landed = assign_levels(measured, edges[a]) if records else []
        by_level = {}
        for k in range(levels[a]):
            values = [m for w, m in zip(wanted, measured) if w == k]
            by_level[str(k)] = float(np.mean(values)) if values else None
        cross = {}
        for b in levels:
            if b != a:
                other = [r["requested"][b] for r in records]
                cross[b] = {"spearman": spearman(other, measured), "slope": slope(other, measured)}
        out[a] = {
            "spearman": spearman(wanted, measured),
            "slope": slope(wanted, measured),
            "in_bin": float(np.mean([w == got for w, got in zip(wanted, landed)])) if records else None,
            "mean_by_level": by_level,
            "cross": cross,
        }
    return out


def summarize_records(records: list[dict], levels: dict[str, int], edges: dict) -> dict:
    """metrics[method][split] for split in seen, unseen and all."""
    out: dict = {}
    for method in dict.fromkeys(r["method"] for r in records):
        mine = [r for r in records if r["method"] == method]
        out[method] = {s: group_metrics([r for r in mine if r["split"] == s], levels, edges) for s in SPLITS}
        out[method]["all"] = group_metrics(mine, levels, edges)
    return out


# ---- generation per method ---------------------------------------------------------------------------------


def _generate(cfg: Config, model: str, rows: list[dict], sampling) -> list[str]:
    from eqrlhf.evaluate.generation import generate

    return [c.text for c in generate(cfg, model, rows, sampling)]


def tags_records(cfg: Config, model: str, prompts: list[dict], settings: list[dict]) -> list[dict]:
    from eqrlhf.rollout import Sampling

    levels = cfg.control.levels
    jobs = [(p, s) for p in prompts for s in settings]
    rows = [{**p, "prompt": tag_prompt(p["prompt"], s, levels)} for p, s in jobs]
    texts = _generate(cfg, model, rows, Sampling.from_config(cfg.generation, seed=cfg.run.seed))
    return [_record("tags", p, s, t) for (p, s), t in zip(jobs, texts, strict=True)]


def prompting_records(cfg: Config, model: str, prompts: list[dict], settings: list[dict]) -> list[dict]:
    from eqrlhf.control.baselines import prompting_row
    from eqrlhf.rollout import Sampling

    jobs = [(p, s) for p in prompts for s in settings]
    rows = [prompting_row(p, s, cfg.control.levels) for p, s in jobs]
    texts = _generate(cfg, model, rows, Sampling.from_config(cfg.generation, seed=cfg.run.seed))
    return [_record("prompting", p, s, t) for (p, s), t in zip(jobs, texts, strict=True)]


def rerank_records(cfg: Config, model: str, prompts: list[dict], settings: list[dict], scorers, edges) -> list:
    """n samples per prompt, scored once; each setting picks its best match among them."""
    from eqrlhf.control.baselines import rerank
    from eqrlhf.rollout import Sampling

    c, n = cfg.control, cfg.control.rerank_samples
    sampling = Sampling(c.max_new_tokens, c.temperature, c.top_p, n=n, seed=cfg.run.seed)
    texts = _generate(cfg, model, prompts, sampling)
    scores = scorers.score([p for p in prompts for _ in range(n)], texts)
    out = []
    for i, p in enumerate(prompts):
        candidates = [{a: scores[a][i * n + j] for a in c.levels} for j in range(n)]
        for s in settings:
            j = rerank(candidates, s, edges)
            out.append({**_record("rerank", p, s, texts[i * n + j]), "scores": candidates[j], "candidate": j})
    return out


def _record(method: str, prompt: dict, setting: dict, text: str) -> dict:
    return {
        "method": method,
        "split": prompt["split"],
        "prompt_id": prompt["id"],
        "prompt": prompt["prompt"],
        "history": prompt.get("history") or "[]",
        "requested": setting,
        "completion": text,
    }


# ---- the evaluation ----------------------------------------------------------------------------------------


def eval_prompts(cfg: Config, stage: Path) -> list[dict]:
    """``control.eval_prompts`` prompts per split (seeded sample), tagged with their split."""
    from eqrlhf.evaluate.suites import seeded_sample

    out = []
    for split, name in (("seen", "train_prompts.jsonl"), ("unseen", "heldout_prompts.jsonl")):
        path = stage / name
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        out += [{**r, "split": split} for r in seeded_sample(rows, cfg.control.eval_prompts, cfg.run.seed)]
    if not out:
        raise InputError(f"controllability: no prompts in {stage}/train_prompts.jsonl or heldout_prompts.jsonl")
    return out


def run_controllability(cfg: Config, model_path: str | None = None, tag: str | None = None) -> dict:
    from eqrlhf.control.encoding import check_single_tokens
    from eqrlhf.control.scorers import Scorers, check_scorers, scorer_names
    from eqrlhf.control.selfgen import base_model, output_dir, read_control_manifest
    from eqrlhf.models.loading import load_tokenizer, resolve_model_path

    started = time.time()
    c = cfg.control
    check_levels(c.levels)
    check_scorers(cfg)
    if not c.methods:
        raise ConfigError("control.methods is empty: pick from tags, prompting, rerank")
    manifest = read_control_manifest(cfg)
    edges = {a: s["edges"] for a, s in manifest["control"]["binning"].items()}
    model = resolve_model_path(model_path or cfg.eval.model or cfg.model.name_or_path)
    base = resolve_model_path(base_model(cfg))
    if "tags" in c.methods and c.encoding == "special_tokens":
        check_single_tokens(load_tokenizer(model), c.levels)
    prompts = eval_prompts(cfg, output_dir(cfg))
    settings = all_settings(c.levels)
    scorers = Scorers(cfg, base)
    records: list[dict] = []
    for method in c.methods:
        if method == "rerank":
            records += rerank_records(cfg, base, prompts, settings, scorers, edges)
            continue
        made = (tags_records if method == "tags" else prompting_records)(
            cfg, model if method == "tags" else base, prompts, settings
        )
        untagged = [{"prompt": r["prompt"], "history": r["history"]} for r in made]
        scores = scorers.score(untagged, [r["completion"] for r in made])
        records += [{**r, "scores": {a: scores[a][i] for a in c.levels}} for i, r in enumerate(made)]
    metrics = summarize_records(records, c.levels, edges)
    out_dir = cfg.stage_dir(cfg.eval.output, "eval") / (tag or cfg.eval.tag or "controllability")
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "model": model,
        "base_model": base,
        "levels": c.levels,
        "edges": edges,
        "scorers": scorer_names(cfg),
        "prompts": {s: sum(p["split"] == s for p in prompts) for s in SPLITS},
        "settings": len(settings),
        "methods": c.methods,
        "metrics": metrics,
        "config_hash": cfg.hash(),
        "seconds": round(time.time() - started, 1),
    }
    (out_dir / "controllability.json").write_text(json.dumps(doc, indent=2))
    with open(out_dir / "responses.jsonl", "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    plot_levels(metrics, c.levels, out_dir / "controllability.png")
    print(summary_line(metrics, c.levels, out_dir))
    return doc


def summary_line(metrics: dict, levels: dict[str, int], out_dir: Path) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.2f}"

    parts = []
    for method, by_split in metrics.items():
        m = by_split["all"]
        parts.append(
            f"{method}: " + ", ".join(f"{a} rho {fmt(m[a]['spearman'])} in-bin {fmt(m[a]['in_bin'])}" for a in levels)
        )
    return f"controllability ({out_dir}): " + "; ".join(parts)


def plot_levels(metrics: dict, levels: dict[str, int], path: Path) -> None:
    """Mean measured score of each attribute against its requested level, one line per method (all prompts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(levels), figsize=(5 * len(levels), 4), squeeze=False)
    for ax, a in zip(axes[0], levels):
        for method, by_split in metrics.items():
            means = by_split["all"][a]["mean_by_level"]
            xs = [int(k) for k, v in means.items() if v is not None]
            ax.plot(xs, [means[str(k)] for k in xs], marker="o", label=method)
        ax.set_xlabel(f"requested {a} level")
        ax.set_ylabel(f"measured {a} score")
        ax.set_xticks(range(levels[a]))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
