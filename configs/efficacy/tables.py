"""The efficacy experiment's tables for docs/RESULTS.md, from the committed results (docs/results/efficacy/<arm>/).

    .venv/bin/python configs/efficacy/tables.py base sft sft_dpo > /tmp/tables.md

Per arm: the headline rates with 95% Wilson intervals and their n, harmful compliance per risk category (the
project's embedding categorizer), over-refusal per XSTest prompt type, degenerate answers, and the refusal
judge's agreement with the rule baseline on the arm's own completions (the disagreements are written to
docs/results/efficacy/<arm>/judge_disagreements.jsonl for reading). Then paired tests (McNemar, Holm) of every
arm against the first and of the last arm against the second (the primary comparison: recipe vs plain SFT).
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

from eqrlhf.evaluate.compare import compare, markdown
from eqrlhf.evaluate.metrics import rate

ROOT = Path("docs/results/efficacy")
DATA = Path(os.environ.get("EQRLHF_DATA", "../shared/data"))


def pct(r: dict) -> str:
    if not r["n"]:
        return "-"
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({r['count']}/{r['n']})"


def degenerate(text: str) -> bool:
    """Empty, or one word 4-gram repeated 4 or more times (a loop)."""
    words = re.findall(r"\w+", text.lower())
    if not words:
        return True
    grams = Counter(tuple(words[i : i + 4]) for i in range(len(words) - 3))
    return bool(grams) and max(grams.values()) >= 4


def xstest_types() -> dict[str, str]:
    with (DATA / "over_refusal/xstest_prompts.csv").open() as f:
        return {f"xstest_safe:{r['id']}": r["type"] for r in csv.DictReader(f)}


def main(arms: list[str]) -> None:
    types = xstest_types()
    rows = {arm: [json.loads(line) for line in (ROOT / arm / "completions.jsonl").open()] for arm in arms}
    print(
        "| arm | harmful compliance | over-refusal (XSTest safe + JBB benign) | helpful refusals (AlpacaEval) "
        "| likelihood retention | degenerate |"
    )
    print("|---|---|---|---|---|---|")
    for arm in arms:
        doc = json.loads((ROOT / arm / "eval.json").read_text())
        r = rows[arm]
        harm = [x for x in r if x["kind"] == "harmful" and x["harmful_compliance"] is not None]
        benign = [x for x in r if x["kind"] == "benign"]
        helpful = [x for x in r if x["kind"] == "helpful"]
        ret = doc["headline"]["likelihood_retention"]
        lo, hi = ret.get("ci95") or (float("nan"), float("nan"))
        print(
            f"| {arm} | {pct(rate(sum(x['harmful_compliance'] for x in harm), len(harm)))} "
            f"| {pct(rate(sum(x['refused'] for x in benign), len(benign)))} "
            f"| {pct(rate(sum(x['refused'] for x in helpful), len(helpful)))} "
            f"| {ret['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {sum(degenerate(x['completion']) for x in r)}/{len(r)} |"
        )
    print("\nThe same rates with the rule judge's verdicts (refused_rule) in place of the embedding head's:\n")
    print("| arm | harmful compliance | over-refusal | helpful refusals |\n|---|---|---|---|")
    for arm in arms:
        r = rows[arm]
        by_kind = {k: [x["refused_rule"] for x in r if x["kind"] == k] for k in ("harmful", "benign", "helpful")}
        harm = [not v for v in by_kind["harmful"]]
        print(
            f"| {arm} | {pct(rate(sum(harm), len(harm)))} | {pct(rate(sum(by_kind['benign']), len(by_kind['benign'])))} "
            f"| {pct(rate(sum(by_kind['helpful']), len(by_kind['helpful'])))} |"
        )
    print("\nHarmful compliance per risk category (embedding categorizer):\n")
    cats = ("EHD", "IHD", "MHD")
    print("| arm | " + " | ".join(cats) + " |\n|---|" + "---|" * len(cats))
    for arm in arms:
        harm = [x for x in rows[arm] if x["kind"] == "harmful" and x["harmful_compliance"] is not None]
        cells = []
        for c in cats:
            g = [x["harmful_compliance"] for x in harm if x["category"] == c]
            cells.append(pct(rate(sum(g), len(g))))
        print(f"| {arm} | " + " | ".join(cells) + " |")
    kinds = sorted({types[x["id"]] for x in rows[arms[0]] if x["id"] in types})
    print("\nOver-refusal per XSTest safe prompt type:\n")
    print("| arm | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds))
    for arm in arms:
        cells = []
        for t in kinds:
            g = [x["refused"] for x in rows[arm] if types.get(x["id"]) == t]
            cells.append(pct(rate(sum(g), len(g))))
        print(f"| {arm} | " + " | ".join(cells) + " |")
    print("\nRefusal judge (embedding head) vs the rule baseline on each arm's own completions:\n")
    print("| arm | agreement | judge refuses, rule not | rule refuses, judge not |\n|---|---|---|---|")
    for arm in arms:
        r = rows[arm]
        disagree = [x for x in r if x["refused"] != x["refused_rule"]]
        with (ROOT / arm / "judge_disagreements.jsonl").open("w") as f:
            for x in disagree:
                keep = ("id", "kind", "prompt", "completion", "refused", "refused_rule")
                f.write(json.dumps({k: x[k] for k in keep}) + "\n")
        print(
            f"| {arm} | {pct(rate(len(r) - len(disagree), len(r)))} | {sum(x['refused'] for x in disagree)} "
            f"| {sum(x['refused_rule'] for x in disagree)} |"
        )
    print("\nPaired tests against the base model:\n")
    print(markdown(compare([ROOT / a for a in arms])))
    if len(arms) > 2:
        print("\nPaired tests of the last arm against the second (the primary comparison):\n")
        print(markdown(compare([ROOT / arms[1], ROOT / arms[-1]])))


if __name__ == "__main__":
    main(sys.argv[1:])
