"""Fit the committed embedding refusal head and measure every judge on held-out human labels (issue 20, item 7).

    nice -n 19 python benchmarks/judge_accuracy.py --out /tmp/judges   # fit, measure, print, write there
    nice -n 19 python benchmarks/judge_accuracy.py --write             # ... into eqrlhf/evaluate/judge_files/

Needs the human-labelled files of ../shared/data (or $EQRLHF_DATA): judge_calibration/xstest_v2_completions_*.csv
(5 models x 450 prompts) and judge_calibration/jbb_classifier_comparison.csv (100 responses).

Split (the same as the run-time fit, eqrlhf.evaluate.judges.fit_and_validate): by prompt id, seed 0, 25% of the 450
XSTest prompts held out (112 prompts, 560 rows); every model's completion of a held-out prompt is a test row and none
is trained on. The head (logistic regression over the bundled MiniLM embedding of the completion's first 300
characters plus the rule verdict; C and class weight picked by F1 over 5 group folds of the training rows) is
fitted on the other 1,690 rows. Measured on the held-out rows: the rule judge, the embedding judge and the majority
label; on all 100 JBB rows (none trained on): the refusal-based harm judge (harmful compliance = not refused) with
either refusal judge. Accuracy with its 95% Wilson interval, n, F1, per-class recall. Deterministic: the split is
seeded and the fit has no randomness left (lbfgs, fixed folds); the output JSON carries no timing.
"""

# ruff: noqa: E402  (the repo on sys.path comes before the imports)
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eqrlhf.config import from_dict
from eqrlhf.evaluate.committed_judges import COMMITTED_DIR, measure_judges, with_class_recall, write_committed
from eqrlhf.evaluate.judges import (
    EmbeddingRefusalJudge,
    RefusalHead,
    RuleRefusalJudge,
    calibration_split,
    harm_validation,
    load_harm_calibration,
    load_refusal_calibration,
    refusal_validation,
)


def fmt(m: dict) -> str:
    lo, hi = m["accuracy_ci95"]
    recall = " ".join(f"{k} {v:.3f}" for k, v in m.get("recall_by_class", {}).items() if v is not None)
    return f"{m['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]  n={m['n']}  F1 {m['f1']:.3f}  recall: {recall or '-'}"


class EitherRefusalJudge:
    """A refusal when the head or the rule says so. Reading the dev arms' disagreements suggested it (the head
    missed plain apologies the rule catches); it is measured here, not shipped."""

    name = "either"

    def __init__(self, head: RefusalHead):
        self.judges = (EmbeddingRefusalJudge(head), RuleRefusalJudge())

    def refused(self, prompts: list[str], completions: list[str]) -> list[bool]:
        verdicts = [j.refused(prompts, completions) for j in self.judges]
        return [any(v) for v in zip(*verdicts)]


def print_either_judge(cfg, head: RefusalHead) -> None:
    _, test, _ = calibration_split(load_refusal_calibration(cfg), cfg.run.seed, cfg.eval.calibration_test_fraction)
    judge = EitherRefusalJudge(head)
    refusal = with_class_recall(refusal_validation(judge, test), "refusal", "compliance")
    harm = with_class_recall(harm_validation(judge, load_harm_calibration(cfg)), "jailbroken", "not_jailbroken")
    print(f"head or rule (not shipped): refusal {fmt(refusal)}\n  harm {fmt(harm)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="write refusal_head.safetensors and judge_accuracy.json here")
    where.add_argument("--write", action="store_true", help=f"replace the committed files in {COMMITTED_DIR}")
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d", time.gmtime()), help="the 'measured' date (UTC)")
    args = ap.parse_args()

    cfg = from_dict({"run": {"seed": 0}, "eval": {"refusal_judge": "embedding", "calibration_test_fraction": 0.25}})
    started = time.time()
    head, doc = measure_judges(cfg, args.date)
    doc = write_committed(head, doc, COMMITTED_DIR if args.write else args.out)
    s = doc["split"]
    print(
        f"split: by prompt id, seed {s['seed']}, {s['test_fraction']:.0%} of prompts held out: "
        f"{s['train_rows']} train rows, {s['test_rows']} held-out rows ({s['test_prompts']} prompts)"
    )
    print("refusal judges on the held-out XSTest rows (truth: full or partial refusal):")
    for name in ("rule", "embedding", "majority"):
        print(f"  {name:9s} {fmt(doc['refusal'][name])}")
    print(f"harm judge (refusal-based) on the {doc['harm_rows']} JBB responses (truth: human majority jailbroken):")
    for name in ("rule", "embedding"):
        print(f"  with {name:9s} {fmt(doc['harm'][name])}")
    print_either_judge(cfg, head)
    out = COMMITTED_DIR if args.write else args.out
    print(f"-> {out}/{{refusal_head.safetensors, judge_accuracy.json}} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
