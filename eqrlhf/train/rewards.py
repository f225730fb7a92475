"""Rule-based reward and cost functions for PPO, selected by name (``ppo.reward_rule`` / ``ppo.cost_rule``).

A rule scores one episode: the prompt row's category (EHD / IHD / MHD / none) and the completion. Rules are
cheap, deterministic and need no model, so they serve tests, smoke runs and sanity baselines next to a
learned reward model. Refusals are detected with the evaluation's rule judge
(:func:`eqrlhf.evaluate.judges.rule_refused`), so training and evaluation agree on what a refusal is.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from eqrlhf.config import ConfigError


@dataclass(frozen=True)
class Episode:
    """What a rule sees of one rollout."""

    text: str  # the decoded completion
    response_ids: tuple[int, ...]  # generated ids (with the final EOS when the model stopped)
    category: str | None  # of the prompt row: EHD | IHD | MHD | none | None (uncategorized)
    finish_reason: str  # stop | length
    max_new_tokens: int


Rule = Callable[[Episode], float]
RULES: dict[str, Rule] = {}


def register(name: str):
    def decorator(fn: Rule) -> Rule:
        RULES[name] = fn
        return fn

    return decorator


def _harmful(episode: Episode) -> bool:
    return episode.category in ("EHD", "IHD", "MHD")


def _refused(episode: Episode) -> bool:
    from eqrlhf.evaluate.judges import rule_refused

    return rule_refused(episode.text)


@register("safe_refusal")
def safe_refusal(episode: Episode) -> float:
    """+1 for refusing a risky prompt or answering a benign one, -1 for harmful compliance or over-refusal."""
    return 1.0 if _refused(episode) == _harmful(episode) else -1.0


@register("harmful_compliance")
def harmful_compliance(episode: Episode) -> float:
    """Cost 1 when a risky prompt (EHD / IHD / MHD) gets an answer that is not a refusal, else 0."""
    return 1.0 if _harmful(episode) and not _refused(episode) else 0.0


@register("length")
def length(episode: Episode) -> float:
    """Share of the token budget used, in [0, 1]: a reward any policy can learn to move (tests, smoke runs)."""
    return len(episode.response_ids) / episode.max_new_tokens


@register("brevity")
def brevity(episode: Episode) -> float:
    """1 - length: rewards short answers that stop on their own."""
    return 1.0 - length(episode)


@register("always_one")
def always_one(episode: Episode) -> float:
    """Constant 1 (a rigged cost: every episode is costly)."""
    return 1.0


@register("always_zero")
def always_zero(episode: Episode) -> float:
    """Constant 0 (a rigged cost: no episode is costly)."""
    return 0.0


def get_rule(name: str, key: str = "ppo.reward_rule") -> Rule:
    """The rule registered as ``name``; a ConfigError naming ``key`` and the closest name otherwise."""
    if name not in RULES:
        close = difflib.get_close_matches(name, RULES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{key}: unknown rule '{name}'{hint}; known rules: {', '.join(sorted(RULES))}")
    return RULES[name]


def score_episodes(rule: Rule, episodes: list[Episode]) -> list[float]:
    return [float(rule(episode)) for episode in episodes]
