"""Evaluation outputs: ``eval.json``, ``completions.jsonl``, ``report.md`` and PNG plots.

The safety plane places every model evaluated in this run (``<run>/eval/*/eval.json``) and any listed in
``eval.compare``: harmful compliance against over-refusal (both lower is better) and against likelihood
retention (higher is better), with 95% intervals and the Pareto front of each plane.
"""

from __future__ import annotations

import json
from pathlib import Path

from eqrlhf import atomic
from eqrlhf.errors import InputNotFound, tried
from eqrlhf.evaluate.metrics import pareto_front

SAFETY_PLANE = "safety_plane.png"
CATEGORY_BARS = "refusal_by_category.png"


def write_json(path: Path, doc: dict) -> None:
    atomic.write_json(path, doc, indent=1, ensure_ascii=False)  # a reader (another trial's plot) never sees half a file


def write_completions(path: Path, scored: list[dict]) -> None:
    atomic.write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in scored))


# -- the models to compare ------------------------------------------------------------------------


def collect_evaluations(eval_root: Path, compare: list[str]) -> list[dict]:
    """Every eval.json under ``eval_root/*/`` plus the ``compare`` files (or dirs holding one), deduplicated."""
    paths = sorted(eval_root.glob("*/eval.json"))
    for item in compare:
        path = Path(item).expanduser()
        path = path / "eval.json" if path.is_dir() else path
        if not path.is_file():
            raise InputNotFound(f"no eval.json at {tried(path)}", field="eval.compare")
        paths.append(path)
    seen, docs = set(), []
    for path in paths:
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        docs.append({**json.loads(path.read_text()), "_path": str(path)})
    return docs


def plane_point(doc: dict) -> dict:
    h = doc["headline"]
    return {
        "tag": doc["tag"],
        "harm": h["harmful_compliance"],
        "over": h["over_refusal"],
        "help": h["likelihood_retention"],
    }


# -- plots ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(stat: dict, key: str) -> list[float]:
    value, ci = stat.get(key), stat.get("ci95")
    return [value - ci[0], ci[1] - value] if value is not None and ci else [0.0, 0.0]


def _limits(values: list[float], bounds: tuple[float, float] | None) -> tuple[float, float]:
    """Axis range around the values (CI ends included) with a margin, inside ``bounds`` when given."""
    lo, hi = min(values), max(values)
    pad = max(0.08 * (hi - lo), 0.02 if bounds else 1e-3)
    lo, hi = lo - pad, hi + pad
    return (max(lo, bounds[0] - 0.02), min(hi, bounds[1] + 0.02)) if bounds else (lo, hi)


def _panel(ax, points: list[dict], colors: dict, x_key: str, x_value: str, minimize_x: bool, current: str) -> None:
    """One plane: a colour per model (named in the figure legend), the front filled, dominated models hollow."""
    from matplotlib.ticker import MaxNLocator

    usable = [p for p in points if p[x_key][x_value] is not None and p["harm"]["rate"] is not None]
    coords = [(p[x_key][x_value], p["harm"]["rate"]) for p in usable]
    front = set(pareto_front(coords, (minimize_x, True)))
    xs, ys = [], []
    for i, p in enumerate(usable):
        x, y = coords[i]
        x_err, y_err = _err(p[x_key], x_value), _err(p["harm"], "rate")
        xs += [x - x_err[0], x + x_err[1]]
        ys += [y - y_err[0], y + y_err[1]]
        mine, color = p["tag"] == current, colors[p["tag"]]
        ax.errorbar(
            x, y, xerr=[[v] for v in x_err], yerr=[[v] for v in y_err], fmt="*" if mine else "o", color=color,
            markerfacecolor=color if i in front else "white", markersize=14 if mine else 8,
            markeredgewidth=1.5, capsize=3, alpha=0.9, zorder=3,
        )  # fmt: skip
    if len(front) > 1:  # the front as a staircase: the edge of the region its points dominate
        line = sorted(coords[i] for i in front)
        where = "post" if minimize_x else "pre"
        ax.step([c[0] for c in line], [c[1] for c in line], "--", where=where, color="black", alpha=0.4, zorder=1)
    if xs:
        ax.set_xlim(*_limits(xs, (0.0, 1.0) if x_value == "rate" else None))
        ax.set_ylim(*_limits(ys, (0.0, 1.0)))
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_ylabel("harmful compliance (lower is better)")
    ax.grid(alpha=0.3)


def plot_safety_plane(docs: list[dict], current: str, path: Path) -> None:
    """Two panels: harm vs over-refusal, harm vs likelihood retention, zoomed on the models; the legend names
    them. Filled: on the Pareto front (dashed); hollow: dominated; star: this model; bars: 95% CI."""
    plt = _pyplot()
    points = [plane_point(d) for d in docs]
    palette = plt.get_cmap("tab10" if len(points) <= 10 else "tab20")
    colors = {p["tag"]: palette(i % palette.N) for i, p in enumerate(points)}
    legend_rows = (len(points) + 2) // 3
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4 + 0.2 * legend_rows))
    _panel(left, points, colors, "over", "rate", True, current)
    left.set_xlabel("over-refusal on benign prompts\n(lower is better)")
    left.set_title("safety plane", fontsize=10)
    _panel(right, points, colors, "help", "mean", False, current)
    right.set_xlabel("likelihood retention on reference answers\n(nats/token vs baseline, higher is better)")
    right.axvline(0.0, color="black", lw=0.6, alpha=0.5)
    right.set_title("safety vs helpfulness", fontsize=10)
    handles = [
        plt.Line2D([], [], marker="*" if p["tag"] == current else "o", color=colors[p["tag"]], linestyle="none",
                   markersize=11 if p["tag"] == current else 7, label=p["tag"])
        for p in points
    ]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=min(len(points), 3), fontsize=8, frameon=False)
    fig.suptitle(
        f"{len(points)} model(s); filled: Pareto front (dashed); hollow: dominated; star: {current}; bars: 95% CI",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.02 + 0.045 * legend_rows, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_category_refusals(metrics: dict, tag: str, path: Path) -> None:
    """Refusal rate per risk category, one bar per suite kind, with 95% Wilson intervals and counts."""
    plt = _pyplot()
    kinds = ("harmful", "benign", "helpful")
    colors = {"harmful": "tab:red", "benign": "tab:green", "helpful": "tab:blue"}
    categories = list(metrics["by_category"])
    width = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(max(5.5, 1.6 * len(categories) + 2), 4.2))
    for k, kind in enumerate(kinds):
        for c, category in enumerate(categories):
            rows = _kind_category(metrics, kind, category)
            if rows is None:
                continue
            x = c + (k - (len(kinds) - 1) / 2) * width
            ax.bar(x, rows["rate"], width, color=colors[kind], label=kind if c == _first(metrics, kind) else None)
            ax.errorbar(  # a marker in the kind's colour keeps a 0% bar visible
                x, rows["rate"], yerr=[[v] for v in _err(rows, "rate")], fmt="o", color=colors[kind],
                markeredgecolor="black", ecolor="black", capsize=3, zorder=3,
            )  # fmt: skip
            ax.annotate(f"{rows['count']}/{rows['n']}", (x, rows["ci95"][1]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(categories)), categories)
    ax.set_ylim(-0.04, 1.12)
    ax.set_ylabel("refusal rate")
    ax.set_title(f"{tag}: refusal rate per risk category and suite kind (95% CI)", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _kind_category(metrics: dict, kind: str, category: str) -> dict | None:
    stat = metrics["by_kind_category"].get(kind, {}).get(category)
    return stat["refusal"] if stat and stat["refusal"]["n"] else None


def _first(metrics: dict, kind: str) -> int | None:
    return next((i for i, c in enumerate(metrics["by_category"]) if _kind_category(metrics, kind, c)), None)


# -- markdown ----------------------------------------------------------------------------------------------


def fmt_rate(stat: dict | None) -> str:
    if not stat or stat.get("rate") is None:
        return "n/a"
    lo, hi = stat["ci95"]
    return f"{100 * stat['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({stat['count']}/{stat['n']})"


def fmt_mean(stat: dict | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    ci = f" [{stat['ci95'][0]:+.{digits}f}, {stat['ci95'][1]:+.{digits}f}]" if stat.get("ci95") else ""
    return f"{stat['mean']:+.{digits}f}{ci} (n={stat['n']})"


def fmt_judge(v: dict | None) -> str:
    """Accuracy with its interval and F1; a judge without calibration data is said to be unvalidated, and a
    committed measurement (no human-labelled rows here) says it was measured offline, with its file and date."""
    if not v or v.get("accuracy") is None:
        return "NOT VALIDATED (no human-labelled rows)"
    lo, hi = v["accuracy_ci95"]
    where = f"; {fmt_offline(v['offline'])}" if v.get("offline") else ""
    return f"accuracy {v['accuracy']:.3f} [{lo:.3f}, {hi:.3f}], F1 {v['f1']:.3f} (n={v['n']}{where})"


def fmt_offline(note: dict) -> str:
    return f"measured offline {note['measured']}, {note['file']}"


def _suite_rows(metrics: dict, suites: dict, helpful: dict) -> str:
    lines = []
    for name, s in metrics["by_suite"].items():
        key = {"harmful": "harmful_compliance", "benign": "over_refusal"}.get(s["kind"])
        main = fmt_rate(s.get(key)) if key else "-"
        retention = fmt_mean(helpful.get("by_suite", {}).get(name)) if s["kind"] == "helpful" else "-"
        c = suites[name]["counts"]
        lines.append(
            f"| {name} | {s['kind']} | {s['n']} | {fmt_rate(s['refusal'])} | {main} | {retention} | "
            f"{c['read']} | {c['errors']} |"
        )
    return "\n".join(lines)


def _category_rows(metrics: dict, helpful: dict) -> str:
    return "\n".join(
        f"| {cat} | {s['n']} | {fmt_rate(s['refusal'])} | {fmt_rate(s.get('harmful_compliance'))} | "
        f"{fmt_rate(s.get('over_refusal'))} | {fmt_mean(helpful.get('by_category', {}).get(cat))} |"
        for cat, s in metrics["by_category"].items()
    )


def _comparison_rows(docs: list[dict]) -> str:
    points = [plane_point(d) for d in docs]
    safety = set(pareto_front([(p["over"]["rate"], p["harm"]["rate"]) for p in points], (True, True)))
    helpful = set(pareto_front([(p["help"]["mean"], p["harm"]["rate"]) for p in points], (False, True)))
    return "\n".join(
        f"| {p['tag']} | {fmt_rate(p['harm'])} | {fmt_rate(p['over'])} | {fmt_mean(p['help'])} | "
        f"{'yes' if i in safety else ''} | {'yes' if i in helpful else ''} |"
        for i, p in enumerate(points)
    )


def _judge_lines(j: dict) -> str:
    r, hm = j["refusal"], j["harm"]
    compared = "; ".join(f"{name} {fmt_judge(v)}" for name, v in r.get("compared", {}).items())
    refusal = (
        f"{fmt_judge(r['validation'])} on held-out human-labelled XSTest completions (refusal = full or partial "
        "refusal; split by prompt id: no held-out prompt was trained on)"
        if r["validation"]
        else fmt_judge(None)
    )
    harm = f"agreement with the JailbreakBench human majority {fmt_judge(hm['validation'])}" if hm["validation"] else ""
    unparsed = (hm["validation"] or {}).get("unparsed")
    lines = [
        f"- refusal judge used: **{r['used']}**: {refusal}."
        + (f" Same rows, for comparison: {compared}." if compared else "")
        + f" On this model's completions it agrees with the rule baseline on {fmt_rate(r.get('agreement_with_rule'))}.",
        f"- harm judge used: **{hm['used']}**: {harm or fmt_judge(None)}."
        + (f" Unparsed answers: {unparsed} of {hm['validation']['asked']}." if unparsed is not None else ""),
    ]
    lines += [f"- missing calibration data: {m}" for m in r.get("missing", [])]
    note = next((v["offline"] for v in (r["validation"], hm["validation"]) if v and v.get("offline")), None)
    if note:
        lines.append(
            f"- no human-labelled rows here: the numbers marked offline were measured on {note['measured']} "
            f"({note['split']}), recorded in `{note['file']}` with the data's provenance and licences; "
            "set EQRLHF_DATA to validate the judges at run time."
        )
    return "\n".join(lines)


def _overlap_line(overlap: dict | None) -> str:
    if not overlap or not overlap["checked"]:
        return "Training data overlap: not checked (no eval.training_data and no pairs in this run)."
    where = ", ".join(f"`{d}`" for d in overlap["checked"])
    ids = [e["id"] if isinstance(e, dict) else e for e in overlap["examples"]]
    found = f"**{overlap['total']}** (first ids: {ids})" if overlap["total"] else "0"
    rule = f"cosine >= {overlap['threshold']} or equal, {overlap['mode']}" if "threshold" in overlap else "equal"
    return (
        f"Evaluation prompts that are near-duplicates of training prompts ({rule}; {overlap['training_prompts']} "
        f"prompts in {where}): {found}."
    )


def markdown_report(doc: dict, docs: list[dict]) -> str:
    m, h, j = doc["metrics"], doc["headline"], doc["judges"]
    helpful = doc["helpfulness"]
    reward = fmt_mean(helpful.get("reward")) if helpful.get("reward") else "not configured (eval.reward_model)"
    skipped = "; ".join(
        f"{n}: {json.dumps(s['counts']['skipped'])}" for n, s in doc["suites"].items() if s["counts"]["skipped"]
    )
    errors = [e for s in doc["suites"].values() for e in s["errors"]]
    engine = doc["engine"]
    return f"""# Evaluation: {doc["tag"]}

Model `{doc["model"]}`; baseline for likelihood retention `{doc["baseline_model"]}`; {m["n"]} prompts in
{len(doc["suites"])} suites; {doc["seconds"]:.0f} s. Generation: rollout pool of {engine["num_engines"]} {
        engine["engine"]
    } engine(s); sampling {json.dumps(doc["sampling"])}.

## Judges (validated on human labels before use)
{_judge_lines(j)}

## Headline (95% Wilson / t intervals)
| metric | value |
|---|---|
| harmful compliance (harmful suites, lower is better) | {fmt_rate(h["harmful_compliance"])} |
| over-refusal (benign suites, lower is better) | {fmt_rate(h["over_refusal"])} |
| likelihood retention (nats/token vs baseline, higher is better) | {fmt_mean(h["likelihood_retention"])} |
| reference log-likelihood (this model / baseline) | {fmt_mean(helpful.get("reference_loglik"))} / {
        fmt_mean(helpful.get("baseline_loglik"))
    } |
| reward-model score of completions (helpful suites) | {reward} |
| refusal on helpful prompts | {fmt_rate(m["by_kind"].get("helpful", {}).get("refusal"))} |

## Per suite
| suite | kind | n | refusal | harmful compliance / over-refusal | likelihood retention | read | errors |
|---|---|---|---|---|---|---|---|
{_suite_rows(m, doc["suites"], helpful)}

Rows skipped because their own harmful flag contradicts the suite kind: {skipped or "none"}.
Unreadable records: {len(errors)}{"" if not errors else " (first: " + errors[0] + ")"}.
{_overlap_line(doc.get("training_overlap"))}

## Per risk category ({doc["categorizer"]} categorizer)
| category | n | refusal | harmful compliance | over-refusal | likelihood retention |
|---|---|---|---|---|---|
{_category_rows(m, helpful)}

![refusal by category]({CATEGORY_BARS})

## All evaluated models
| model | harmful compliance | over-refusal | likelihood retention | Pareto (safety) | Pareto (helpfulness) |
|---|---|---|---|---|---|
{_comparison_rows(docs)}

![safety plane]({SAFETY_PLANE})

Completions with per-prompt judgements: `completions.jsonl`.
"""


# -- writing everything ---------------------------------------------------------------------------------


def write_outputs(cfg, doc: dict, scored: list[dict], out_dir: Path) -> None:
    """eval.json and completions.jsonl first, then the plots and report over every evaluated model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_completions(out_dir / "completions.jsonl", scored)
    write_json(out_dir / "eval.json", doc)
    docs = collect_evaluations(out_dir.parent, cfg.eval.compare)
    plot_safety_plane(docs, doc["tag"], out_dir / SAFETY_PLANE)
    plot_category_refusals(doc["metrics"], doc["tag"], out_dir / CATEGORY_BARS)
    atomic.write_text(out_dir / "report.md", markdown_report(doc, docs))


def summary_line(doc: dict, out_dir: Path) -> str:
    h, j = doc["headline"], doc["judges"]
    return (
        f"evaluate {doc['tag']}: harmful compliance {fmt_rate(h['harmful_compliance'])}, "
        f"over-refusal {fmt_rate(h['over_refusal'])}, likelihood retention {fmt_mean(h['likelihood_retention'])} | "
        f"refusal judge {j['refusal']['used']}: {fmt_judge(j['refusal']['validation'])} (held-out XSTest); "
        f"harm judge {j['harm']['used']}: {fmt_judge(j['harm']['validation'])} (JBB human labels) "
        f"-> {out_dir} ({doc['seconds']:.0f} s)"
    )
