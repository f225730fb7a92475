"""Training/evaluation leakage: evaluation prompts that are near-duplicates of a training prompt.

Evaluating on what a model was trained on flatters it, and copies are rarely exact: JailbreakBench, for
example, rewrites behaviours drawn from AdvBench and HarmBench. A prompt counts as leaked when its sentence
embedding (``eval.embedding_model``, L2-normalised) has cosine similarity >= ``eval.near_duplicate_threshold``
with any training prompt of ``eval.training_data``, or when the two are equal after case and whitespace
folding. ``eval.leakage`` says what happens: ``drop`` removes leaked prompts from their suite before the seeded
sample (counted under the suite's ``skipped``), ``fail`` stops the evaluation before any model is loaded,
naming the prompts, ``report`` only counts them in eval.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eqrlhf.config import ConfigError

LEAKED = "near-duplicate of a training prompt"
MAX_LISTED = 5


def normalized_prompt(text: str) -> str:
    """Case and whitespace folded, so a copy with different spacing still counts as the same prompt."""
    return " ".join(text.lower().split())


@dataclass
class Match:
    similarity: float  # cosine similarity to the nearest training prompt (1.0 for an exact copy)
    nearest: str  # that training prompt


class LeakageCheck:
    """Nearest training prompt of each evaluation prompt, by exact match and embedding similarity."""

    def __init__(self, training_prompts: list[str], threshold: float, encoder_name: str, where: list[str]):
        texts: dict[str, str] = {}
        for prompt in training_prompts:
            if prompt:
                texts.setdefault(normalized_prompt(prompt), prompt)
        self.dirs, self.threshold = where, threshold
        self.exact, self.texts = set(texts), list(texts.values())
        self._encoder, self._encoder_name = None, encoder_name
        self._vectors = None

    @classmethod
    def of_stages(cls, training_dirs: list[Path], threshold: float, encoder_name: str) -> LeakageCheck:
        """The prompts of training stage outputs (pairs, mixtures, categorized corpora)."""
        from eqrlhf.manifest import read_rows

        prompts = [p for d in training_dirs for p in read_rows(d).column("prompt").to_pylist()]
        return cls(prompts, threshold, encoder_name, [str(d) for d in training_dirs])

    def _embed(self, texts: list[str]) -> np.ndarray:
        from eqrlhf.data.categorizers.embedding import embed, load_encoder

        if self._encoder is None:
            self._encoder = load_encoder(self._encoder_name)
        return embed(self._encoder, texts, 64)

    def matches(self, prompts: list[str]) -> list[Match | None]:
        """Per prompt, its nearest training prompt when it is at or above the threshold, else None."""
        if not self.texts or not prompts:
            return [None] * len(prompts)
        if self._vectors is None:
            self._vectors = self._embed(self.texts)
        out: list[Match | None] = []
        queries = self._embed(prompts)
        for start in range(0, len(prompts), 1024):  # bounded memory: 1024 x training rows at a time
            sims = queries[start : start + 1024] @ self._vectors.T
            best = sims.argmax(axis=1)
            for k, j in enumerate(best):
                prompt = prompts[start + k]
                if normalized_prompt(prompt) in self.exact:
                    out.append(Match(1.0, prompt))
                elif sims[k, j] >= self.threshold:
                    out.append(Match(float(sims[k, j]), self.texts[j]))
                else:
                    out.append(None)
        return out

    def summary(self, suites: list, found: dict[str, list[tuple[str, Match]]], mode: str) -> dict:
        """The ``training_overlap`` block of eval.json."""
        return {
            "checked": self.dirs,
            "training_prompts": len(self.texts),
            "threshold": self.threshold,
            "mode": mode,
            "total": sum(len(v) for v in found.values()),
            "by_suite": {s.name: len(found.get(s.name, [])) for s in suites},
            "examples": [
                {"id": i, "similarity": round(m.similarity, 3), "nearest_training_prompt": m.nearest[:200]}
                for v in found.values()
                for i, m in v
            ][:10],
        }


def fail_on_leaks(found: dict[str, list[tuple[str, Match]]], check: LeakageCheck) -> None:
    """eval.leakage=fail: one error naming the leaked prompts, before any model is loaded."""
    leaked = [(suite, i, m) for suite, v in found.items() for i, m in v]
    if not leaked:
        return
    shown = "\n  ".join(
        f"{suite}/{i}: similarity {m.similarity:.3f} to training prompt {m.nearest[:80]!r}"
        for suite, i, m in leaked[:MAX_LISTED]
    )
    raise ConfigError(
        f"{len(leaked)} evaluation prompts are near-duplicates (cosine >= {check.threshold}) of training prompts "
        f"in {', '.join(check.dirs)}:\n  {shown}\nremove them from the suites (eval.leakage=drop) or keep their "
        "source out of training"
    )
