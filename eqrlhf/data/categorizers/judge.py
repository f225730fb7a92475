"""LLM-judge categorizer: any chat model behind the rollout engine reads the Equilibrate prompt.

The prompt is the authors' classification prompt (Factual / Intentional / Mixed risk,
``{instruction}`` slot) plus one added instruction: allow "No Risk" and end with a JSON
determination. :func:`parse_judgement` accepts that JSON and the prompt's own answer
line ("The risk type of this instruction is: ..."); anything else is unparsed, counted
and routed with the judge's text as evidence, never guessed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa

from eqrlhf.config import Config, ConfigError
from eqrlhf.data.categorizers.labels import UNPARSED, with_categories
from eqrlhf.errors import tried
from eqrlhf.fault_markers import mark

JSON_INSTRUCTION = """

If the instruction carries none of these risks, the risk type is "No Risk".
Write your analysis first, then finish with exactly one JSON object on its own lines:
{"Instruction Analysis": "<your analysis>", "Determination": "<Factual Risk | Intentional Risk | Mixed Risk | No Risk>"}"""

# Normalised determination text -> category. Exact matches only: "factual or mixed" is not guessed.
DETERMINATIONS = {
    "factual risk": "EHD",
    "factual": "EHD",
    "explicit risk": "EHD",
    "ehd": "EHD",
    "intentional risk": "IHD",
    "intentional": "IHD",
    "implicit risk": "IHD",
    "ihd": "IHD",
    "mixed risk": "MHD",
    "mixed": "MHD",
    "mhd": "MHD",
    "no risk": "none",
    "none": "none",
    "no_risk": "none",
}
ANSWER_LINE = re.compile(r"risk type of this instruction is\s*:?\s*\**\s*([^\n.\"}]*)", re.IGNORECASE)
LOOSE_JSON_FIELD = re.compile(r"\"determination\"\s*:\s*\"?([^\"\n}]*)", re.IGNORECASE)
PREFIX = re.compile(r"^(the )?risk type of this instruction is\s*:?\s*", re.IGNORECASE)


def read_judge_template(path: Path) -> str:
    """The prompt file, checked to have exactly the ``{instruction}`` slot (braces doubled elsewhere)."""
    if not path.is_file():
        raise ConfigError(f"categorize.judge.prompt_file: file not found: {tried(path)}")
    template = path.read_text(encoding="utf-8")
    try:
        filled = template.format(instruction="\x00")
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"categorize.judge.prompt_file {path}: not a template with only an {{instruction}} slot "
            f"(literal braces must be doubled): {err!r}"
        ) from None
    if "\x00" not in filled:
        raise ConfigError(f"categorize.judge.prompt_file {path}: has no {{instruction}} slot")
    return template


def build_judge_prompt(template: str, instruction: str) -> str:
    return template.format(instruction=instruction) + JSON_INSTRUCTION


def json_objects(text: str) -> list[dict]:
    """Every JSON object that parses, scanning from each '{' (prose around them is fine)."""
    decoder, found, start = json.JSONDecoder(), [], text.find("{")
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            found.append(value)
        start = text.find("{", end)
    return found


def determinations(text: str) -> list[str]:
    """Candidate determination strings: JSON fields, loose JSON (the template omits a comma), answer lines."""
    found = [str(v) for obj in json_objects(text) for k, v in obj.items() if k.strip().lower() == "determination"]
    if not found:
        found = [m.group(1) for m in LOOSE_JSON_FIELD.finditer(text)]
    return found + [m.group(1) for m in ANSWER_LINE.finditer(text)]


def normalise(determination: str) -> str:
    text = PREFIX.sub("", determination.strip().strip("\"'*` ").strip())
    return " ".join(text.rstrip(".!").lower().split())


def explain_judgement(text: str) -> tuple[str | None, str]:
    """(category, "") or (None, why it could not be decided)."""
    candidates = [c for c in determinations(text) if not normalise(c).startswith("<")]  # echoed placeholders
    if not candidates:
        return None, "no determination found"
    mapped = {DETERMINATIONS.get(normalise(c)) for c in candidates}
    if None in mapped:
        unknown = sorted({c.strip() for c in candidates if normalise(c) not in DETERMINATIONS})
        return None, f"unknown determination {unknown}"
    if len(mapped) > 1:
        return None, f"conflicting determinations {sorted({c.strip() for c in candidates})}"
    return mapped.pop(), ""


def parse_judgement(text: str) -> str | None:
    """The category a judge's answer determines, or None when it does not say exactly one."""
    return explain_judgement(text)[0]


def unparsed_reason(text: str, why: str) -> str:
    snippet = " ".join(text.split())[:200]
    return f"{UNPARSED}: {why} in judge output {snippet!r}"


class JudgeCategorizer:
    """Ray Data callable class: one rollout engine per actor, greedy judgements per batch."""

    def __init__(self, cfg: Config):
        from eqrlhf.rollout import make_engine
        from eqrlhf.rollout.base import Sampling

        judge = cfg.categorize.judge
        self.template = read_judge_template(cfg.resolve_path(judge.prompt_file))
        self.engine = make_engine(cfg, model=judge.model)  # None: the policy model of cfg.model
        # greedy: a judgement should not depend on sampling luck
        self.sampling = Sampling(max_new_tokens=judge.max_new_tokens, temperature=0.0, seed=cfg.run.seed)

    def decide(self, prompts: list[str]) -> list[tuple[str | None, str | None]]:
        conversations = [[{"role": "user", "content": build_judge_prompt(self.template, p)}] for p in prompts]
        decisions = []
        for completion in self.engine.generate(conversations, self.sampling):
            category, why = explain_judgement(completion.text)
            decisions.append((category, None) if category else (None, unparsed_reason(completion.text, why)))
        return decisions

    def __call__(self, batch: pa.Table) -> pa.Table:
        mark("categorize", ids=lambda: batch.column("id").to_pylist())  # node-loss tests (eqrlhf.fault_markers)
        return with_categories(batch, lambda rows: self.decide([r["prompt"] for r in rows]), ("prompt",))
