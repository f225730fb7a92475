"""Paired comparison of evaluated models on the prompts they share.

Two models evaluated on the same prompts are compared prompt by prompt, not rate against rate: a prompt
counts only where both models were judged, and the test is McNemar's exact test on the discordant prompts
(the first model refuses and the second complies, or the reverse), which is far more sensitive than
comparing two independent intervals. Several comparisons at once are Holm-corrected.

    python -m eqrlhf.evaluate.compare runs/x/eval/base runs/x/eval/sft runs/x/eval/recipe

prints one table, every model against the first, from each directory's ``eval.json`` and
``completions.jsonl``.

``eqrlhf compare RUN_DIR...`` (:func:`main_compare`) is the same test for whole runs: a pipeline run folder
stands for its trained model's evaluation (``eval/trained``), an evaluation folder for itself. It prints one
row per run (harmful compliance, over-refusal, helpful refusals and likelihood retention with their 95%
intervals, then the paired change against the first run with McNemar's p, Holm-adjusted) and writes the
safety plane of the runs (:func:`eqrlhf.evaluate.report.plot_safety_plane`). Runs that share no prompt id
with the first are refused (:class:`NoSharedPrompts`): an unpaired comparison is what this command avoids.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from eqrlhf.errors import InputError, InputNotFound, UserError, tried
from eqrlhf.evaluate.metrics import rate

# metric -> (suite kind, completion field whose True rate it is); lower is better for all three
METRICS = {
    "harmful_compliance": ("harmful", "harmful_compliance"),
    "over_refusal": ("benign", "refused"),
    "helpful_refusal": ("helpful", "refused"),
}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b and c are the discordant counts (a binomial test of b vs c at 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (monotone, capped at 1)."""
    order = sorted(pvalues, key=pvalues.get)
    adjusted, running = {}, 0.0
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[key]))
        adjusted[key] = running
    return adjusted


def load_completions(eval_dir: Path) -> dict[str, dict]:
    """Completion records of one evaluation, by prompt id."""
    path = Path(eval_dir) / "completions.jsonl"
    if not path.is_file():
        raise InputNotFound(f"no completions.jsonl in {tried(eval_dir)}: is it an `eqrlhf evaluate` output folder?")
    with path.open() as f:
        return {r["id"]: r for r in map(json.loads, f)}


def paired(first: dict[str, dict], second: dict[str, dict], metric: str) -> dict:
    """The metric of both models on the prompts both were judged on, and McNemar's test between them."""
    kind, field = METRICS[metric]
    shared = [
        i
        for i, r in first.items()
        if r["kind"] == kind and i in second and r.get(field) is not None and second[i].get(field) is not None
    ]
    a = [bool(first[i][field]) for i in shared]
    b = [bool(second[i][field]) for i in shared]
    worse = sum(y and not x for x, y in zip(a, b))  # true for the second model only
    better = sum(x and not y for x, y in zip(a, b))
    return {
        "n": len(shared),
        "first": rate(sum(a), len(a)),
        "second": rate(sum(b), len(b)),
        "difference": (sum(b) - sum(a)) / len(shared) if shared else None,
        "second_only": worse,
        "first_only": better,
        "p": mcnemar_exact(worse, better),
    }


class NoSharedPrompts(InputError):
    """An evaluation shares no prompt id with the baseline: there is nothing to pair (the CLI exits 2)."""


def compare(eval_dirs: list[Path]) -> dict:
    """Every model against the first on every metric, with raw and Holm-adjusted p-values."""
    if len(eval_dirs) < 2:
        raise InputError("compare needs at least two evaluation directories")
    runs = [load_completions(d) for d in eval_dirs]
    first = runs[0]
    unpaired = [str(d) for d, r in zip(eval_dirs[1:], runs[1:]) if not set(first) & set(r)]
    if unpaired:
        raise NoSharedPrompts(
            f"no prompt ids in common between {eval_dirs[0]} and {', '.join(unpaired)}: the runs were evaluated "
            "on different prompts (other suites, eval.limit or seed), so they cannot be compared prompt by "
            "prompt; evaluate them on the same suites and settings"
        )
    rows = {}
    for d, run in zip(eval_dirs[1:], runs[1:]):
        rows[str(d)] = {m: paired(first, run, m) for m in METRICS}
    raw = {(d, m): v["p"] for d, per in rows.items() for m, v in per.items() if v["n"]}
    adjusted = holm({f"{d}|{m}": p for (d, m), p in raw.items()})
    for (d, m), _ in raw.items():
        rows[d][m]["p_holm"] = adjusted[f"{d}|{m}"]
    return {"baseline": str(eval_dirs[0]), "against": rows}


def _pct(r: dict) -> str:
    lo, hi = r["ci95"] or (float("nan"), float("nan"))
    return f"{100 * r['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({r['count']}/{r['n']})"


def markdown(result: dict) -> str:
    """One table: each model's rates on the shared prompts, the change against the baseline and the tests."""
    lines = [
        f"Baseline: `{result['baseline']}`. Paired on shared prompt ids; McNemar exact p, Holm-adjusted over "
        "all comparisons in this table.",
        "",
        "| model | metric | baseline | model | change | model-only / baseline-only | p | p (Holm) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d, per in result["against"].items():
        for m, v in per.items():
            if not v["n"]:
                continue
            lines.append(
                f"| `{d}` | {m} | {_pct(v['first'])} | {_pct(v['second'])} | {100 * v['difference']:+.1f} pts | "
                f"{v['second_only']} / {v['first_only']} | {v['p']:.2g} | {v['p_holm']:.2g} |"
            )
    return "\n".join(lines)


# ---- whole runs: `eqrlhf compare RUN_DIR...` ----------------------------------------------------------------

RUN_METRICS = ("harmful compliance", "over-refusal", "helpful refusals", "likelihood retention")


def evaluation_dir(run_dir: Path) -> Path:
    """The evaluation a run folder stands for: itself when it holds one, else its trained model's."""
    run_dir = Path(run_dir)
    for candidate in (run_dir, run_dir / "eval" / "trained"):
        if (candidate / "eval.json").is_file() and (candidate / "completions.jsonl").is_file():
            return candidate
    raise InputNotFound(
        f"no evaluation in {tried(run_dir)}: expected eval.json and completions.jsonl in it or in its "
        "eval/trained (run `eqrlhf evaluate`, or the pipeline's evaluate stage, first)"
    )


def run_stats(doc: dict) -> dict:
    """The four headline numbers of one ``eval.json``, each a rate or a mean with its interval."""
    head = doc.get("headline", {})
    helpful = ((doc.get("metrics") or {}).get("by_kind", {}).get("helpful") or {}).get("refusal")
    return {
        "harmful compliance": head.get("harmful_compliance"),
        "over-refusal": head.get("over_refusal"),
        "helpful refusals": helpful,
        "likelihood retention": head.get("likelihood_retention"),
    }


def _paired_cell(v: dict) -> str:
    if not v["n"]:
        return "no shared prompts"
    return f"{100 * v['difference']:+.1f} pts, p={v['p']:.2g} (Holm {v['p_holm']:.2g}), n={v['n']}"


def runs_table(labels: list[str], docs: list[dict], paired_result: dict) -> str:
    """One row per run: its own numbers with 95% intervals, then the paired change against the first run."""
    from eqrlhf.evaluate.report import fmt_mean, fmt_rate

    head = "| run | " + " | ".join(RUN_METRICS) + " | " + " | ".join(f"vs first: {m}" for m in RUN_METRICS[:3])
    lines = [
        f"Each run's own rates with 95% intervals; then, against `{labels[0]}` on the prompt ids both were "
        "judged on, the change in points and McNemar's exact p (Holm-adjusted over the table).",
        "",
        head + " |",
        "|---" * (1 + len(RUN_METRICS) + 3) + "|",
    ]
    against = list(paired_result["against"].values())
    for i, (label, doc) in enumerate(zip(labels, docs)):
        stats = run_stats(doc)
        cells = [fmt_rate(stats[m]) for m in RUN_METRICS[:3]] + [fmt_mean(stats["likelihood retention"])]
        paired_cells = ["baseline"] * 3 if i == 0 else [_paired_cell(against[i - 1][m]) for m in METRICS]
        lines.append(f"| `{label}` | " + " | ".join(cells + paired_cells) + " |")
    return "\n".join(lines)


def plot_runs(labels: list[str], docs: list[dict], path: Path) -> None:
    """The safety plane of the runs (one point per run, 95% interval bars), the first run starred."""
    from eqrlhf.evaluate.report import plot_safety_plane

    points = []
    for label, doc in zip(labels, docs):
        head = dict(doc.get("headline", {}))
        for key, value in (("harmful_compliance", "rate"), ("over_refusal", "rate"), ("likelihood_retention", "mean")):
            head.setdefault(key, {value: None, "ci95": None})  # a run without that suite is left off the panel
        points.append({"tag": label, "headline": head})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    plot_safety_plane(points, labels[0], Path(path))


def compare_runs(run_dirs: list[Path], plot: Path | None = None) -> dict:
    """Paired comparison of whole runs against the first (:func:`compare`), the table and the plot."""
    if len(run_dirs) < 2:
        raise InputError("compare needs at least two runs (the first is the baseline)")
    eval_dirs = [evaluation_dir(Path(d)) for d in run_dirs]
    result = compare(eval_dirs)
    docs = [json.loads((d / "eval.json").read_text()) for d in eval_dirs]
    labels = [str(d) for d in run_dirs]
    labels = [f"{label} ({i + 1})" if labels.count(label) > 1 else label for i, label in enumerate(labels)]
    result["runs"] = {label: {"eval_dir": str(d), **run_stats(doc)} for label, d, doc in zip(labels, eval_dirs, docs)}
    result["table"] = runs_table(labels, docs, result)
    if plot is not None:
        plot_runs(labels, docs, plot)
        result["plot"] = str(plot)
    return result


def main_compare(run_dirs: list[str], plot: str | None = None, json: str | None = None) -> dict:
    """The CLI's ``eqrlhf compare``: print the table, write the plot (and the numbers with ``--json``)."""
    import json as json_module

    result = compare_runs([Path(d) for d in run_dirs], Path(plot) if plot else None)
    print(result["table"])
    if plot:
        print(f"\nsafety plane: {plot}")
    if json:
        Path(json).write_text(json_module.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="paired comparison of evaluation outputs (first = baseline)")
    parser.add_argument("eval_dirs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    try:
        result = compare(args.eval_dirs)
    except UserError as err:
        print(f"compare: {err}", file=sys.stderr)
        return 2
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
