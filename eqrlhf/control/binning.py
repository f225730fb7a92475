"""Scores -> levels by quantiles over the pool of scores of one attribute.

Edges: ``e_i = quantile(pool, i / L)`` for i = 1..L-1 (numpy's default linear interpolation), so each level
holds about 1/L of the pool. A score's level is the number of edges strictly below it:
``level(s) = #{i : e_i < s}``. Hence

- ties never split: equal scores always share a level, so a pool with many equal values (a 0/1 judge)
  fills fewer than L levels; a value equal to an edge goes to the lower level;
- a constant pool gives L-1 equal edges and puts every score in level 0 (``degenerate`` in the summary;
  the data stage then filters every prompt, all its samples being in one bin);
- levels are monotone in the score, and the same edges, written into the stage manifest, bin the
  measured scores at evaluation time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def quantile_edges(scores: Sequence[float], levels: int) -> list[float]:
    """The L-1 inner quantile edges of ``scores`` (needs at least one finite score)."""
    if levels < 2:
        raise ValueError(f"binning needs at least 2 levels, got {levels}")
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise ValueError("binning: the pool of scores is empty")
    if not np.isfinite(values).all():
        raise ValueError(f"binning: {int((~np.isfinite(values)).sum())} non-finite score(s) in the pool")
    return [float(q) for q in np.quantile(values, [i / levels for i in range(1, levels)])]


def assign_levels(scores: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Level of each score: how many edges lie strictly below it (0..len(edges))."""
    return [int(k) for k in np.searchsorted(np.asarray(edges, dtype=np.float64), scores, side="left")]


def binning_summary(scores: Sequence[float], edges: Sequence[float]) -> dict:
    """What goes into the manifest: edges, per-level counts, and whether the pool was constant."""
    assigned = assign_levels(scores, edges)
    counts = [assigned.count(k) for k in range(len(edges) + 1)]
    values = np.asarray(scores, dtype=np.float64)
    return {
        "edges": list(edges),
        "counts": counts,
        "degenerate": bool(values.size and values.min() == values.max()),
        "min": float(values.min()),
        "max": float(values.max()),
    }
