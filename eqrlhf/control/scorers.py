"""Measured attribute scores of (prompt, response): what the tags are binned from and evaluated against.

- ``helpful``: the score of a reward model (``control.reward_model``, a ScalarHeadLM dir) at the last
  response token;
- ``harmless``: minus the score of a cost model (``control.cost_model``; Safe-RLHF sign: cost > 0 unsafe),
  or, with ``control.harmless_scorer: refusal_rule | refusal_embedding``, the refusal judge's verdict as
  0/1 (1 = refused). The judge is a coarse stand-in for when no cost model can be trained: it cannot tell
  a safe helpful answer from a harmful one, and its two values fill at most two levels (see binning).

Scoring always sees the untagged prompt: a response is judged against the request, not the control.
Models load once, in the calling process.
"""

from __future__ import annotations

from eqrlhf.config import Config, ConfigError
from eqrlhf.control.encoding import ControlError

SUPPORTED = ("helpful", "harmless")


def check_scorers(cfg: Config) -> dict[str, str]:
    """Fail before any model loads: every attribute has a scorer and its model dir exists; returns paths."""
    from eqrlhf.models.heads import HEAD_CONFIG

    c = cfg.control
    unknown = [a for a in c.levels if a not in SUPPORTED]
    if unknown:
        raise ControlError(f"control.levels: no scorer for attribute(s) {unknown}; supported: {list(SUPPORTED)}")
    needed = {}
    if "helpful" in c.levels:
        needed["control.reward_model"] = c.reward_model
    if "harmless" in c.levels and c.harmless_scorer == "cost_model":
        needed["control.cost_model"] = c.cost_model
    if "harmless" in c.levels and c.harmless_scorer == "refusal_embedding":
        # the head is fitted on first use from the calibration files: fail now, not after sampling, when neither
        # exists (e.g. ../shared/data absent)
        from eqrlhf.evaluate.committed_judges import refusal_head_file

        head, pattern = refusal_head_file(cfg), cfg.resolve_path(cfg.eval.calibration_files)
        if not head.is_file() and not any(pattern.parent.glob(pattern.name)):
            raise ConfigError(
                f"control.harmless_scorer=refusal_embedding: no fitted head at {head} (eval.refusal_head) and no "
                f"calibration file matches {pattern} (eval.calibration_files) to fit one; set data.data_root or "
                "EQRLHF_DATA, or use control.harmless_scorer=refusal_rule"
            )
    paths = {}
    for key, value in needed.items():
        if not value:
            hint = " (or control.harmless_scorer=refusal_rule)" if key == "control.cost_model" else ""
            raise ConfigError(f"{key} is not set: a ScalarHeadLM dir is needed to score this attribute{hint}")
        path = cfg.resolve_path(value)
        if not (path / HEAD_CONFIG).is_file():
            raise ConfigError(f"{key}: {path} is not a scalar-head model (no {HEAD_CONFIG})")
        paths[key.split(".")[1]] = str(path)
    return paths


class Scorers:
    """``score(rows, completions) -> {attribute: [score, ...]}`` for the configured attributes."""

    def __init__(self, cfg: Config, tokenizer_fallback: str):
        self.cfg = cfg
        self.paths = check_scorers(cfg)
        self.fallback = tokenizer_fallback
        self._heads: dict[str, tuple] = {}
        self._judge = None

    def _head(self, key: str):
        from eqrlhf.evaluate.helpfulness import load_scalar_head

        if key not in self._heads:
            self._heads[key] = load_scalar_head(self.paths[key], self.fallback, self.cfg.model.dtype)
        return self._heads[key]

    def _head_scores(self, key: str, rows: list[dict], completions: list[str]) -> list[float]:
        from eqrlhf.evaluate.helpfulness import reward_scores

        model, tokenizer = self._head(key)
        scores, _ = reward_scores(
            model, tokenizer, rows, completions, self.cfg.model.max_length, self.cfg.control.batch_size
        )
        return scores

    def _refused(self, rows: list[dict], completions: list[str]) -> list[bool]:
        if self._judge is None:
            from eqrlhf.evaluate.committed_judges import refusal_judge_for
            from eqrlhf.evaluate.judges import RuleRefusalJudge

            if self.cfg.control.harmless_scorer == "refusal_rule":
                self._judge = RuleRefusalJudge()
            else:
                embedding = self.cfg.eval.model_copy(update={"refusal_judge": "embedding"})
                self._judge, _ = refusal_judge_for(self.cfg.model_copy(update={"eval": embedding}))
        return self._judge.refused([r["prompt"] for r in rows], completions)

    def score(self, rows: list[dict], completions: list[str]) -> dict[str, list[float]]:
        import torch

        out = {}
        with torch.no_grad():
            if "helpful" in self.cfg.control.levels:
                out["helpful"] = self._head_scores("reward_model", rows, completions)
            if "harmless" in self.cfg.control.levels:
                if self.cfg.control.harmless_scorer == "cost_model":
                    out["harmless"] = [-c for c in self._head_scores("cost_model", rows, completions)]
                else:
                    out["harmless"] = [float(r) for r in self._refused(rows, completions)]
        return {name: out[name] for name in self.cfg.control.levels}


def scorer_names(cfg: Config) -> dict[str, str]:
    """Human-readable description of what each attribute's score is (for manifests and reports)."""
    c = cfg.control
    names = {"helpful": f"reward model {c.reward_model}"}
    names["harmless"] = (
        f"-cost, cost model {c.cost_model}"
        if c.harmless_scorer == "cost_model"
        else f"{c.harmless_scorer} (1 = refused)"
    )
    return {a: names[a] for a in c.levels if a in names}
