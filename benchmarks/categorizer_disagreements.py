"""A seeded sample of prompts where the shipped categorizer head and the human label disagree (issue 17).

    nice -n 19 python benchmarks/categorizer_disagreements.py --n 50 --out docs/results/categorizer/disagreements.jsonl

The head is judged by out-of-fold predictions: the same deduplicated prompts, stratified 5-fold split and
nested choice of C as ``benchmarks/categorizer_cv.py`` (its candidate ``b_minilm_balanced``, the one shipped),
so every prompt is predicted by a model that never saw it. The sample is drawn uniformly from the
disagreements; reading it by hand tells how many of them are label errors rather than categorizer errors,
which bounds the macro-F1 any categorizer can show against these labels.
"""

# ruff: noqa: E402  (the repo on sys.path and categorizer_cv's BLAS limits come before the imports)
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import categorizer_cv as cv
import numpy as np
from sklearn.model_selection import StratifiedKFold

from eqrlhf.config import CATEGORIES, from_dict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="/tmp/eqrlhf_categorizer_cv")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/results/categorizer/disagreements.jsonl")
    args = ap.parse_args()

    cfg = from_dict({})
    texts, labels, _ = cv.load_data(cfg.resolve_path(cfg.categorize.embedding.train_file))
    cv.TEXTS = np.array(texts, dtype=object)
    y = np.array([CATEGORIES.index(label) for label in labels])
    cv.FEATURES["minilm"] = cv.cached(Path(args.cache) / "minilm.npy", texts, cv.minilm_features)
    splits = list(StratifiedKFold(5, shuffle=True, random_state=args.seed).split(np.zeros(len(y)), y))
    pred, logits, _ = cv.run_candidate(cv.SHIPPABLE, cv.candidates()[cv.SHIPPABLE], y, splits, args.seed)
    temperature = cv.fit_temperature(logits, y)
    z = logits / temperature
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    wrong = np.flatnonzero(pred != y)
    pick = np.random.default_rng(args.seed).choice(wrong, size=min(args.n, len(wrong)), replace=False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for k, i in enumerate(sorted(pick)):
            row = {
                "n": k + 1,
                "prompt": texts[i],
                "label": CATEGORIES[y[i]],
                "predicted": CATEGORIES[pred[i]],
                "confidence": round(float(probs[i].max()), 3),
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(wrong)} of {len(y)} out-of-fold predictions disagree with the label; wrote {len(pick)} to {out}")


if __name__ == "__main__":
    main()
