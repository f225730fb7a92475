"""End-to-end fine-tuned categorizers, cross-validated on the same folds as benchmarks/categorizer_cv.py (issue 17).

    nice -n 19 python benchmarks/categorizer_finetune.py --inner lora8_top2          # fold 0's inner validation curve
    nice -n 19 python benchmarks/categorizer_finetune.py --cv lora8_top2 --compare   # 5-fold CV (resumable per fold)
    ... --cv NAME --folds-only 0 1 --threads 1    # share the folds between processes (rerun --cv NAME to summarise)
    ... --refit NAME; --write-adapter NAME PATH   # fit on every prompt and write the safetensors adapter + head

Data and folds: exactly those of categorizer_cv.py (its ``load_data``; StratifiedKFold(5, shuffle, seed 0)).
Hyper-parameters are fixed before the outer folds are looked at: the number of epochs (and the candidate's
settings below) comes from ``--inner`` only, which trains on 80% of fold 0's *training* part and scores the other
20% after every epoch; no outer test fold is used to choose anything. Each (candidate, fold) writes its
out-of-fold logits to ``--cache``, so an interrupted run resumes where it stopped. Metrics: categorizer_cv's pooled
out-of-fold macro-F1 / recall with 95% percentile-bootstrap intervals; the temperature is fitted on the pooled
out-of-fold logits (the argmax, and so every metric but calibration, does not depend on it).

Candidates (see CANDIDATES): ``lora8_top2`` (LoRA rank 8 on the last 2 of MiniLM's 6 layers, over cached lower
states), ``lora8`` (LoRA on every layer's attention), ``full_top2`` (the last 2 layers' weights themselves: 14 MB,
measured only, to see what the low rank leaves on the table). All start the head from a class-balanced logistic
regression on the frozen embeddings of the training part (sklearn's default C=1).
"""

# ruff: noqa: E402  (thread limits and the repo on sys.path come before the imports)
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from categorizer_cv import DATA_PROVENANCE, confusion, ece, load_data, per_1000, scores, selective, summarise
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, train_test_split

from eqrlhf.config import CATEGORIES, from_dict
from eqrlhf.data.categorizers.embedding import BUNDLED_ENCODER, embed, fit_temperature, load_encoder
from eqrlhf.data.categorizers.finetune import (
    FinetuneSettings,
    load_adapter_categorizer,
    lora_tensors,
    lower_states,
    predict_logits,
    read_adapter,
    save_adapter,
    train,
)

K = len(CATEGORIES)
# Fixed settings. Epochs: the best epoch of --inner (fold 0's inner validation); see docs/categorizer_cv.md.
# The "_top2" candidates adapt the last 2 of MiniLM's 6 layers over cached lower states (exact, and about 5x
# cheaper per epoch): on the shared 2-core machine a whole-encoder epoch took over 10 minutes per fold.
TOP2 = {"top_layers": 2, "targets": ("query", "key", "value", "output.dense", "intermediate.dense")}
CANDIDATES = {
    "lora8_top2": FinetuneSettings(rank=8, alpha=16.0, lr=1e-3, head_lr=1e-3, epochs=4, **TOP2),
    "full_top2": FinetuneSettings(rank=0, lr=5e-5, head_lr=1e-3, epochs=4, **TOP2),
    # whole encoder: 1 epoch, taken from lora8_top2's inner validation (best epoch 1; later epochs overfit the
    # noisy labels) rather than tuned again: an inner curve of the whole encoder costs an hour on this machine
    "lora8": FinetuneSettings(rank=8, alpha=16.0, lr=5e-4, head_lr=1e-3, epochs=1),
    "full": FinetuneSettings(rank=0, lr=3e-5, head_lr=1e-3, epochs=4),
}
CACHE = Path("/tmp/eqrlhf_categorizer_finetune")
STATES: dict[int, list[np.ndarray]] = {}  # top_layers -> cached lower states of every prompt
INNER_EPOCHS = 5
INNER_FILE = Path("docs/results/categorizer/finetune_inner.json")


def settings_for(name: str) -> FinetuneSettings:
    """The candidate's settings, with the epoch count of its fold-0 inner validation when that has been run."""
    inner = json.loads(INNER_FILE.read_text()) if INNER_FILE.is_file() else {}
    return replace(CANDIDATES[name], epochs=inner[name]["best_epoch"]) if name in inner else CANDIDATES[name]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def frozen_features(texts: list[str], cache: Path) -> np.ndarray:
    import hashlib

    key = hashlib.sha1("\n".join(texts).encode()).hexdigest()[:16]
    file = cache / f"minilm-{key}.npy"
    if not file.is_file():
        file.parent.mkdir(parents=True, exist_ok=True)
        np.save(file, embed(load_encoder(BUNDLED_ENCODER), texts, 64))
    return np.load(file)


def probe(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The warm start: class-balanced logistic regression on frozen embeddings, sklearn's default C."""
    model = LogisticRegression(max_iter=5000, class_weight="balanced").fit(x, y)
    assert list(model.classes_) == list(range(K))
    return model.coef_, model.intercept_


def states(texts: list[str], top: int, cache: Path) -> list[np.ndarray]:
    """Lower hidden states of every prompt for ``top`` adapted layers, cached on disk (concatenated + offsets)."""
    import hashlib

    if top not in STATES:
        key = hashlib.sha1("\n".join(texts).encode()).hexdigest()[:16]
        file = cache / f"states-top{top}-{key}.npz"
        if not file.is_file():
            started = time.time()
            rows = lower_states(load_encoder(BUNDLED_ENCODER), texts, top)
            offsets = np.cumsum([0] + [len(r) for r in rows])
            np.savez(file, concat=np.concatenate(rows), offsets=offsets)
            log(f"lower states for top {top} layers: {len(rows)} prompts in {time.time() - started:.0f}s")
        saved = np.load(file)
        c, o = saved["concat"], saved["offsets"]
        STATES[top] = [c[o[i] : o[i + 1]] for i in range(len(o) - 1)]
    return STATES[top]


def fit(idx: np.ndarray, texts: list[str], y: np.ndarray, x: np.ndarray, settings: FinetuneSettings, on_epoch=None):
    """Fine-tune on the prompts ``idx`` (indices into the full lists)."""
    model = load_encoder(BUNDLED_ENCODER)
    top = settings.top_layers
    head, names = train(
        model,
        [texts[i] for i in idx],
        y[idx],
        K,
        settings,
        init_head=probe(x[idx], y[idx]),
        on_epoch=on_epoch,
        log=log,
        states=[STATES[top][i] for i in idx] if top else None,
    )
    return model, head, names


def logits_of(model, head, idx: np.ndarray, texts: list[str], settings: FinetuneSettings) -> np.ndarray:
    top = settings.top_layers
    rows = [STATES[top][i] for i in idx] if top else None
    return predict_logits(model, head, [texts[i] for i in idx], top_layers=top, states=rows)


def macro_f1(y: np.ndarray, logits: np.ndarray) -> float:
    return float(scores(confusion(y, logits.argmax(1), K))["macro_f1"])


def run_inner(names, texts, y, x, splits, out: Path) -> None:
    """Fold 0's training part, split 80/20 (stratified, seed 0); inner-validation macro-F1 after every epoch."""
    train_idx, _ = splits[0]
    tr, va = train_test_split(train_idx, test_size=0.2, stratify=y[train_idx], random_state=0)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    for name in names:
        if name in doc:
            log(f"inner {name}: done already ({doc[name]['best_epoch']} epochs)")
            continue
        settings = replace(CANDIDATES[name], epochs=INNER_EPOCHS)
        curve, model = [], load_encoder(BUNDLED_ENCODER)
        top = settings.top_layers
        if top:
            states(texts, top, CACHE)

        # called by train() after each epoch, with the model as trained so far (defaults bind this loop turn's)
        def score(epoch, head, model=model, curve=curve, name=name, settings=settings):
            logits = logits_of(model, head, va, texts, settings)
            recall = scores(confusion(y[va], logits.argmax(1), K))["recall"]
            row = {"epoch": epoch, "macro_f1": round(macro_f1(y[va], logits), 4)}
            row["recall"] = dict(zip(CATEGORIES, recall.round(3).tolist()))
            curve.append(row)
            log(f"  inner {name} epoch {epoch}: macro-F1 {row['macro_f1']:.3f} recall {row['recall']}")

        started = time.time()
        rows = [STATES[top][i] for i in tr] if top else None
        train(model, [texts[i] for i in tr], y[tr], K, settings, probe(x[tr], y[tr]), score, log, states=rows)
        probe_f1 = macro_f1(y[va], x[va] @ probe(x[tr], y[tr])[0].T)
        best = max(curve, key=lambda r: r["macro_f1"])
        doc[name] = {
            "settings": settings.to_dict(),
            "train": len(tr),
            "validation": len(va),
            "frozen_probe_macro_f1": round(probe_f1, 4),
            "curve": curve,
            "best_epoch": best["epoch"],
            "seconds": round(time.time() - started, 1),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))
        log(f"inner {name}: best epoch {best['epoch']} (macro-F1 {best['macro_f1']:.3f}; frozen probe {probe_f1:.3f})")


def run_cv(name: str, texts, y, x, splits, cache: Path, only=None) -> tuple[np.ndarray, list[float]] | None:
    """Out-of-fold logits, one file per fold under the cache (resumable; ``only``: just these folds, so several
    processes can share the folds). None while some fold is missing."""
    logits, seconds = np.zeros((len(y), K), np.float32), []
    for f, (tr, te) in enumerate(splits):
        file = cache / name / f"fold{f}.npz"
        if only is not None and f not in only:
            continue
        if file.is_file():
            saved = np.load(file)
            assert np.array_equal(saved["test"], te), f"{file}: other folds; clear the cache"
            assert str(saved["settings"]) == json.dumps(settings_for(name).to_dict()), f"{file}: other settings"
            logits[te], seconds = saved["logits"], seconds + [float(saved["seconds"])]
            continue
        log(f"cv {name} fold {f}: train {len(tr)} / test {len(te)}")
        started = time.time()
        settings = settings_for(name)
        if settings.top_layers:
            states(texts, settings.top_layers, cache)
        model, head, _ = fit(tr, texts, y, x, settings)
        logits[te] = logits_of(model, head, te, texts, settings)
        seconds.append(time.time() - started)
        file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            file, test=te, logits=logits[te], seconds=seconds[-1], settings=json.dumps(settings_for(name).to_dict())
        )
        log(f"cv {name} fold {f}: macro-F1 {macro_f1(y[te], logits[te]):.3f} ({seconds[-1]:.0f}s)")
    if only is not None:  # the other folds are written by other processes: read them all once they are there
        if not all((cache / name / f"fold{f}.npz").is_file() for f in range(len(splits))):
            return None
        return run_cv(name, texts, y, x, splits, cache)
    return logits, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="/tmp/eqrlhf_categorizer_finetune")
    ap.add_argument("--inner", nargs="*", metavar="CANDIDATE", help="fold-0 inner validation curves")
    ap.add_argument("--cv", nargs="*", metavar="CANDIDATE", help="5-fold CV of these candidates")
    ap.add_argument("--folds-only", nargs="*", type=int, help="with --cv: run only these outer folds")
    ap.add_argument("--refit", metavar="CANDIDATE", help="fit on every prompt into the cache (for --write-adapter)")
    ap.add_argument("--write-adapter", nargs=2, metavar=("CANDIDATE", "PATH"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare", action="store_true", help="paired bootstrap against the shipped frozen head (b)")
    ap.add_argument("--time", action="store_true", help="with --write-adapter: time the shipped categorizer")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", default="docs/results/categorizer/finetune.json")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    cfg = from_dict({})
    train_file = cfg.resolve_path(cfg.categorize.embedding.train_file)
    texts, labels, stats = load_data(train_file)
    y = np.array([CATEGORIES.index(label) for label in labels])
    splits = list(StratifiedKFold(5, shuffle=True, random_state=0).split(np.zeros(len(y)), y))
    global CACHE
    CACHE = cache = Path(args.cache)
    out = Path(args.out)
    x = frozen_features(texts, cache)
    log(f"{len(texts)} prompts, classes {np.bincount(y).tolist()} ({list(CATEGORIES)})")

    if args.inner is not None:
        run_inner(args.inner or list(CANDIDATES), texts, y, x, splits, INNER_FILE)

    doc = json.loads(out.read_text()) if out.is_file() else {"results": {}, "timing": {}}
    folds = [te for _, te in splits]
    for name in args.cv or []:
        done = run_cv(name, texts, y, x, splits, cache, args.folds_only)
        if done is None:
            log(f"cv {name}: folds {args.folds_only} done; the others are still missing")
            continue
        logits, seconds = done
        r = summarise(name, y, logits.argmax(1), folds, args.bootstrap, 0)
        t = fit_temperature(logits, y)
        r.update(
            settings=settings_for(name).to_dict(),
            fold_train_seconds=[round(s, 1) for s in seconds],
            temperature=round(t, 4),
            ece_raw=ece(y, logits, 1.0),
            ece_scaled=ece(y, logits, t),
            selective=selective(y, logits, t, [0.0, 0.4, 0.5, 0.6, 0.7]),
        )
        doc["results"][name] = r
        pc = r["per_class"]
        log(
            f"{name}: macro-F1 {r['macro_f1']:.3f} {r['macro_f1_ci95']} acc {r['accuracy']:.3f} recall EHD "
            f"{pc['EHD']['recall']:.2f} {pc['EHD']['recall_ci95']} IHD {pc['IHD']['recall']:.2f} MHD "
            f"{pc['MHD']['recall']:.2f} none {pc['none']['recall']:.2f}; T={t:.3f}"
        )
        np.save(cache / name / "oof_logits.npy", logits)
        doc["train_seconds_per_1000_prompt_epochs"] = doc.get("train_seconds_per_1000_prompt_epochs", {})
        doc["train_seconds_per_1000_prompt_epochs"][name] = round(
            float(np.mean(seconds)) / (settings_for(name).epochs * len(splits[0][0]) / 1000), 1
        )
    if args.compare:
        doc["paired_vs_frozen_b"] = compare(doc, y, x, splits, cache, args.bootstrap)
    if args.refit:
        refit(args.refit, texts, y, x)
    if args.compare or any(name in doc["results"] for name in args.cv or []):
        doc["data"] = {**stats, "used": len(texts), "class_counts": dict(zip(CATEGORIES, np.bincount(y).tolist()))}
        doc["protocol"] = (
            "categorizer_cv.py's folds (StratifiedKFold 5, shuffle, seed 0); settings fixed beforehand (epochs from "
            "fold 0's inner validation, finetune_inner.json); pooled out-of-fold metrics, 95% percentile bootstrap "
            f"({args.bootstrap} resamples) over prompts; temperature fitted on the pooled out-of-fold logits"
        )
        doc["machine"] = (
            "2 CPU cores shared with other jobs, nice 19; folds ran 3 processes x 1 thread (times are upper bounds)"
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))
        log(f"wrote {out}")
    if args.write_adapter:
        timing = write_adapter(args.write_adapter[0], Path(args.write_adapter[1]), texts, y, x, doc, args.time)
        doc.setdefault("timing", {}).update(timing)
        out.write_text(json.dumps(doc, indent=1))


def compare(doc: dict, y: np.ndarray, x: np.ndarray, splits, cache: Path, n_boot: int) -> dict:
    """Macro-F1 of each fine-tuned candidate minus that of categorizer_cv's (b) (the shipped frozen head, refitted
    here on the same folds), with a paired percentile bootstrap over prompts."""
    import categorizer_cv

    categorizer_cv.FEATURES["minilm"] = x
    pipe = categorizer_cv.candidates()["b_minilm_balanced"]
    base, _, _ = categorizer_cv.run_candidate("b_minilm_balanced", pipe, y, splits, 0)
    log(f"frozen head (b) on these folds: macro-F1 {macro_f1(y, np.eye(K)[base]):.4f}")
    rng, out = np.random.default_rng(0), {"b_minilm_balanced_macro_f1": round(macro_f1(y, np.eye(K)[base]), 4)}
    draws = [rng.integers(0, len(y), len(y)) for _ in range(n_boot)]
    for name in doc["results"]:
        file = cache / name / "oof_logits.npy"
        if not file.is_file():
            continue
        pred = np.load(file).argmax(1)

        def f1(p, i):
            return scores(confusion(y[i], p[i], K))["macro_f1"]

        diffs = [f1(pred, i) - f1(base, i) for i in draws]
        every = np.arange(len(y))
        out[name] = {
            "diff": round(float(f1(pred, every) - f1(base, every)), 4),
            "ci95": np.percentile(diffs, [2.5, 97.5]).round(4).tolist(),
        }
        log(f"{name} - frozen (b): {out[name]}")
    return out


class Linear:
    """What ``save_adapter`` reads of a head (weight, bias), rebuilt from a cached refit."""

    def __init__(self, coef: np.ndarray, intercept: np.ndarray):
        import torch

        self.weight, self.bias = torch.from_numpy(coef), torch.from_numpy(intercept)


def refit(name: str, texts, y, x) -> None:
    """Fit ``name`` on every prompt and keep it in the cache (temperature still 1: --write-adapter adds the CV one)."""
    settings = settings_for(name)
    started = time.time()
    if settings.top_layers:
        states(texts, settings.top_layers, CACHE)
    model, head, names = fit(np.arange(len(texts)), texts, y, x, settings)
    check = logits_of(model, head, np.arange(64), texts, settings)
    meta = {"settings": settings.to_dict(), "temperature": 1.0, "rank": settings.rank, "alpha": settings.alpha}
    meta |= {"classes": list(CATEGORIES), "embedding_model": BUNDLED_ENCODER}
    extra = {"seconds": round(time.time() - started, 1), "check_logits": check.round(5).tolist()}
    save_adapter(CACHE / name / "refit.safetensors", head, lora_tensors(model[0].auto_model, names), meta, extra)
    log(f"refit {name} on {len(texts)} prompts in {extra['seconds']}s")


def write_adapter(name: str, path: Path, texts, y, x, doc: dict, timed: bool) -> dict:
    """Refit ``name`` on every prompt with its fixed settings; temperature from its CV out-of-fold logits."""
    settings = settings_for(name)
    assert settings.rank > 0, "only a LoRA candidate fits the 2 MB shipping limit"
    cv = doc["results"][name]
    fitted = CACHE / name / "refit.safetensors"
    if not fitted.is_file():
        refit(name, texts, y, x)
    tensors, fit_meta, fit_extra = read_adapter(fitted)
    meta = {
        "classes": list(CATEGORIES),
        "embedding_model": BUNDLED_ENCODER,
        "normalization": "l2",
        "rank": settings.rank,
        "alpha": settings.alpha,
        "temperature": cv["temperature"],
    }
    extra = {
        "provenance": {
            "fitted_by": f"benchmarks/categorizer_finetune.py --write-adapter {name}",
            **DATA_PROVENANCE,
            "settings": settings.to_dict(),
            "refit_seconds": fit_extra["seconds"],
        },
        "metrics": {
            "cv": {
                k: cv[k] for k in ("macro_f1", "macro_f1_ci95", "accuracy", "per_class", "temperature", "selective")
            },
            "protocol": doc["protocol"],
        },
    }
    assert fit_meta["settings"] == json.loads(json.dumps(settings.to_dict())), "refit with other settings"
    lora = {k: v for k, v in tensors.items() if k.startswith("lora.")}
    save_adapter(path, Linear(tensors["head.coef"], tensors["head.intercept"]), lora, meta, extra)
    # the file must reproduce the fitted model: load it the way the categorizer does (adapter merged into the
    # plain encoder) and compare with the logits the training path (cached lower states) gave
    head2, encoder2 = load_adapter_categorizer(path)
    want = fit_extra["check_logits"]
    got = np.log(head2.predict_proba(embed(encoder2, texts[: len(want)], 64)))
    got_pred, want_pred = got.argmax(1), np.asarray(want).argmax(1)
    log(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB); reload agrees on {(got_pred == want_pred).mean():.3f}")
    assert (got_pred == want_pred).mean() > 0.98
    if not timed:
        return {}
    # merged into the encoder, the adapter costs nothing at categorize time: this is the frozen encoder's cost
    seconds = per_1000(lambda t: head2.predict_proba(embed(encoder2, t, 256)), texts)
    log(f"shipped categorizer: {seconds}s per 1,000 prompts")
    return {"shipped_categorizer_s_per_1000": seconds}


if __name__ == "__main__":
    main()
