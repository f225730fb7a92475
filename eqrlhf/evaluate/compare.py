"""Paired comparison of evaluated models on the prompts they share.

Two models evaluated on the same prompts are compared prompt by prompt, not rate against rate: a prompt
counts only where both models were judged, and the test is McNemar's exact test on the discordant prompts
(the first model refuses and the second complies, or the reverse), which is far more sensitive than
comparing two independent intervals. Several comparisons at once are Holm-corrected.

    python -m eqrlhf.evaluate.compare runs/x/eval/base runs/x/eval/sft runs/x/eval/recipe

prints one table, every model against the first, from each directory's ``eval.json`` and
``completions.jsonl``.
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


def compare(eval_dirs: list[Path]) -> dict:
    """Every model against the first on every metric, with raw and Holm-adjusted p-values."""
    if len(eval_dirs) < 2:
        raise InputError("compare needs at least two evaluation directories")
    runs = [load_completions(d) for d in eval_dirs]
    first = runs[0]
    if not any(set(first) & set(r) for r in runs[1:]):
        raise InputError(f"no prompt ids in common between {eval_dirs[0]} and the other evaluations")
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
