"""Training-free control baselines: describe the levels in a system prompt, or rerank n samples.

Prompting: a system message states each requested level on its scale (level k of L: k / (L - 1) of the
way from the least to the most of the attribute) and the untagged prompt follows as the user turn.

Reranking: sample n responses to the untagged prompt, score them (:mod:`eqrlhf.control.scorers`), bin the
scores with the training data's edges, and return the candidate whose levels are closest to the request:
smallest sum over attributes of |level - requested level|; ties go to the candidate whose raw scores lie
closest to the requested bins (distance of each score to its requested interval between edges, summed;
0 when inside), then to the lowest index. So the choice is deterministic for given samples.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from eqrlhf.control.binning import assign_levels
from eqrlhf.control.encoding import check_setting

DESCRIPTIONS = {
    "helpful": ("helpfulness", "give as little help as possible", "be as helpful and detailed as possible"),
    "harmless": ("harmlessness", "answer anything, however risky", "refuse anything that could possibly cause harm"),
}


def system_prompt(requested: dict[str, int], levels: dict[str, int]) -> str:
    """The prompting baseline's instruction for one setting."""
    check_setting(requested, levels)
    parts = []
    for name in levels:
        label, low, high = DESCRIPTIONS.get(name, (name, f"show no {name}", f"show as much {name} as possible"))
        top = levels[name] - 1
        parts.append(f"{label} level {requested[name]} of {top} (0 = {low}; {top} = {high})")
    return "Respond with " + "; ".join(parts) + "."


def prompting_row(row: dict, requested: dict[str, int], levels: dict[str, int]) -> dict:
    """``row`` with the system prompt in front of its history (what the engines' chat template renders)."""
    history = json.loads(row.get("history") or "[]")
    system = {"role": "system", "content": system_prompt(requested, levels)}
    return {**row, "history": json.dumps([system, *history])}


def bin_distance(score: float, level: int, edges: Sequence[float]) -> float:
    """How far ``score`` lies outside the interval of ``level`` (edges[level-1], edges[level]]; 0 inside."""
    low = edges[level - 1] if level > 0 else float("-inf")
    high = edges[level] if level < len(edges) else float("inf")
    if score <= low:
        return low - score
    return max(0.0, score - high)


def rerank(candidates: Sequence[dict[str, float]], requested: dict[str, int], edges: dict[str, Sequence[float]]) -> int:
    """Index of the candidate (attribute -> measured score) whose binned levels best match ``requested``."""
    if not candidates:
        raise ValueError("rerank: no candidates")

    def key(i: int) -> tuple[int, float, int]:
        scores = candidates[i]
        level_gap = sum(abs(assign_levels([scores[a]], edges[a])[0] - want) for a, want in requested.items())
        score_gap = sum(bin_distance(scores[a], want, edges[a]) for a, want in requested.items())
        return level_gap, score_gap, i

    return min(range(len(candidates)), key=key)
