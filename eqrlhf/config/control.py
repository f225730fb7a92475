"""The section of controllable safety and helpfulness (`eqrlhf control-data`, its evaluation)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from eqrlhf.config.base import Section
from eqrlhf.config.data_stages import SourceSection


class ControlSection(Section):
    """Controllable safety and helpfulness (Tuan et al. 2024, arXiv 2404.01295): `eqrlhf control-data`
    self-generates tagged training rows; `eqrlhf evaluate` with ``evaluate: true`` measures controllability."""

    # attribute -> number of levels (0..L-1), in tag order: "[helpful=2][harmless=0] <prompt>"
    levels: dict[str, int] = Field(default_factory=lambda: {"helpful": 3, "harmless": 3})
    encoding: Literal["text", "special_tokens"] = "text"  # special_tokens: each tag is one added token
    base_model: str | None = None  # samples the responses (and gets the tokens added); None = model.name_or_path
    input: str | None = None  # stage dir of prompt rows; default <run>/mixture (unless sources are given)
    sources: list[SourceSection] = Field(default_factory=list)  # or prompt files read through the adapters
    limit: int | None = Field(None, ge=1)  # prompts used (seeded sample); None = all
    output: str | None = None  # default: <run>/control_data
    heldout_fraction: float = Field(0.2, ge=0, lt=1)  # prompts kept out of training: the "unseen" eval prompts
    samples_per_prompt: int = Field(4, ge=2)  # k responses sampled per prompt
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    pairs_per_prompt: int = Field(4, ge=1)  # preference losses: at most this many (A, B) pairs per prompt
    clm_weight: float = Field(1.0, ge=0)  # exmate: weight of the length-normalised NLL of the matching response
    # helpfulness = a reward model's score (ScalarHeadLM dir)
    reward_model: str | None = None
    # harmlessness = -cost of a cost model (ScalarHeadLM dir), or a refusal judge's verdict (refused = 1, else 0)
    harmless_scorer: Literal["cost_model", "refusal_rule", "refusal_embedding"] = "cost_model"
    cost_model: str | None = None
    batch_size: int = Field(8, ge=1)  # sequences per scoring forward pass
    # controllability evaluation (`eqrlhf evaluate` runs it instead of the safety evaluation when true)
    evaluate: bool = False
    methods: list[Literal["tags", "prompting", "rerank"]] = Field(
        default_factory=lambda: ["tags", "prompting", "rerank"]
    )
    eval_prompts: int = Field(8, ge=1)  # per split (seen in training, unseen)
    rerank_samples: int = Field(4, ge=1)  # n candidates per prompt for the rerank baseline
    # `eqrlhf control-generate` (serving example): these prompts at these levels (None = every setting)
    serve_prompts: list[str] = Field(default_factory=list)
    serve_levels: dict[str, int] | None = None
