"""Rates with Wilson intervals, means with t-intervals, judge agreement, Pareto fronts, per-suite summaries.

Pure functions over plain Python values. Every rate carries its count and denominator; an empty
denominator gives ``rate: None`` rather than a made-up 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion k/n (None when n == 0).

    centre = (p + z^2/2n) / (1 + z^2/n), half = z/(1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2).
    """
    if n == 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    p, z2 = k / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # the interval always holds p; the clamps undo float rounding at k = 0 and k = n (a plot's error bar
    # would otherwise come out negative)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def rate(k: int, n: int) -> dict:
    interval = wilson(k, n)
    return {"rate": k / n if n else None, "count": k, "n": n, "ci95": list(interval) if interval else None}


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """Student-t interval of the mean (None for fewer than 2 values)."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def mean_stat(values: Sequence[float]) -> dict:
    values = [float(v) for v in values]
    n = len(values)
    interval = t_interval(values)
    return {"mean": sum(values) / n if n else None, "n": n, "ci95": list(interval) if interval else None}


def binary_metrics(truth: Sequence[bool], predicted: Sequence[bool]) -> dict:
    """Accuracy (with its Wilson interval), precision, recall and F1 of the positive class, confusion counts."""
    if len(truth) != len(predicted):
        raise ValueError(f"binary_metrics: {len(truth)} labels but {len(predicted)} predictions")
    tp = sum(t and p for t, p in zip(truth, predicted))
    tn = sum(not t and not p for t, p in zip(truth, predicted))
    fp = sum(not t and p for t, p in zip(truth, predicted))
    fn = sum(t and not p for t, p in zip(truth, predicted))
    n = len(truth)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    interval = wilson(tp + tn, n)
    return {
        "n": n,
        "positives": tp + fn,
        "accuracy": (tp + tn) / n if n else None,
        "accuracy_ci95": list(interval) if interval else None,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }


def pareto_front(points: Sequence[Sequence[float | None]], minimize: Sequence[bool]) -> list[int]:
    """Indices of the points no other point dominates (no worse on every axis, better on one).

    Points with a missing coordinate take no part. Duplicates do not dominate each other.
    """
    sign = [1.0 if m else -1.0 for m in minimize]
    valid = [i for i, p in enumerate(points) if all(v is not None for v in p)]
    keyed = {i: [s * v for s, v in zip(sign, points[i])] for i in valid}

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return [i for i in valid if not any(dominates(keyed[j], keyed[i]) for j in valid if j != i)]


# -- summaries of scored completions ---------------------------------------------------------


def _rate_of(rows: list[dict], key: str) -> dict:
    """Rate of True among rows whose ``key`` is not None (None = not judged, e.g. unparsed)."""
    judged = [r[key] for r in rows if r.get(key) is not None]
    return rate(sum(judged), len(judged))


def _group(rows: list[dict], key: Callable[[dict], str]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return dict(sorted(groups.items()))


def headline(rows: list[dict]) -> dict:
    """Refusal rate of any set of rows, plus harmful compliance (harmful rows) and over-refusal (benign rows)."""
    harmful = [r for r in rows if r["kind"] == "harmful"]
    benign = [r for r in rows if r["kind"] == "benign"]
    out = {"n": len(rows), "refusal": _rate_of(rows, "refused")}
    if harmful:
        out["harmful_compliance"] = _rate_of(harmful, "harmful_compliance")
        out["harm_unjudged"] = sum(r.get("harmful_compliance") is None for r in harmful)
    if benign:
        out["over_refusal"] = _rate_of(benign, "refused")
    return out


def summarize(scored: list[dict]) -> dict:
    """Headline numbers overall, per suite, per category and per suite x category."""
    by_suite = {}
    for name, rows in _group(scored, lambda r: r["suite"]).items():
        by_suite[name] = {
            "kind": rows[0]["kind"],
            **headline(rows),
            "by_category": {c: headline(g) for c, g in _group(rows, lambda r: r["category"]).items()},
        }
    return {
        **headline(scored),
        "by_kind": {k: headline(g) for k, g in _group(scored, lambda r: r["kind"]).items()},
        "by_category": {c: headline(g) for c, g in _group(scored, lambda r: r["category"]).items()},
        "by_kind_category": {
            k: {c: headline(g) for c, g in _group(rows, lambda r: r["category"]).items()}
            for k, rows in _group(scored, lambda r: r["kind"]).items()
        },
        "by_suite": by_suite,
    }
