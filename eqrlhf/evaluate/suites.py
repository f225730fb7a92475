"""Evaluation suites: configured sources read through the data adapters, filtered by kind, sampled, categorized.

A suite (``eval.suites``) is a list of sources of one ``kind``: ``harmful`` prompts (harmful compliance is
measured), ``benign`` prompts that look sensitive (over-refusal is measured), or ``helpful`` prompts with
reference answers (helpfulness). A source file may hold both kinds (XSTest), so a row whose ``harmful`` flag
contradicts the suite's kind is skipped and counted; rows without a flag take the suite's kind. ``limit``
keeps a seeded sample spread over the whole suite (not the first rows of the file, which in XSTest are all
one prompt type). Every prompt then gets a risk category from the configured categorizer, so every number
can be broken down by category; a prompt the categorizer cannot place is kept under ``unmapped``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa

from eqrlhf.config import CATEGORIES, Config, ConfigError, EvalSuiteSection
from eqrlhf.data.mix import sample_key
from eqrlhf.data.readers import SourceError, format_error
from eqrlhf.data.schema import ROW_SCHEMA
from eqrlhf.data.sources import limits_of, plan_source, source_rows
from eqrlhf.errors import InputError, listing
from eqrlhf.evaluate.leakage import LEAKED, normalized_prompt

__all__ = ["KINDS", "UNMAPPED", "Suite", "load_suites", "normalized_prompt", "validate_suites"]

UNMAPPED = "unmapped"  # category bucket of prompts the categorizer could not place
KINDS = ("harmful", "benign", "helpful")
MAX_LISTED_ERRORS = 10


@dataclass
class Suite:
    name: str
    kind: str
    rows: list[dict]  # ROW_SCHEMA dicts plus "suite", "kind" and "category_error"
    counts: dict = field(default_factory=dict)  # read, errors, skipped by reason, sampled out, evaluated
    errors: list[str] = field(default_factory=list)  # "file:line: [source] field 'x': reason"
    leaked: list = field(default_factory=list)  # (row id, leakage.Match) of near-duplicates of training prompts


def suite_limit(suite: EvalSuiteSection, cfg: Config) -> int | None:
    return suite.limit if suite.limit is not None else cfg.eval.limit


def validate_suites(cfg: Config) -> list:
    """Resolve every suite's sources (paths, adapters, CSV columns) before any model is loaded."""
    suites = cfg.eval.suites
    if not suites:
        raise ConfigError("eval.suites is empty: configure at least one suite (name, kind, sources)")
    problems, plans, names = [], [], set()
    for suite in suites:
        where = f"eval.suites['{suite.name}']"
        if suite.name in names:
            problems.append(f"{where}: the suite name is used twice")
        names.add(suite.name)
        if not suite.sources:
            problems.append(f"{where}: no sources")
        limit = suite_limit(suite, cfg)
        if limit is not None and limit < 1:
            problems.append(f"{where}: limit must be >= 1, got {limit}")
        if len({s.name for s in suite.sources}) != len(suite.sources):
            problems.append(f"{where}: two sources share a name (row ids are '<source>:<key>')")
        for src in suite.sources:
            try:
                plans.append((suite, plan_source(src, cfg)))
            except SourceError as err:
                problems.append(f"{where}: {err}")
    if problems:
        raise ConfigError(listing("invalid eval.suites", problems))
    return plans


def kind_mismatch(kind: str, harmful: bool | None) -> str | None:
    """Why a row does not belong in a suite of ``kind`` (None: it does)."""
    if kind == "harmful" and harmful is False:
        return "harmful=false in a harmful suite"
    if kind in ("benign", "helpful") and harmful is True:
        return f"harmful=true in a {kind} suite"
    return None


def seeded_sample(rows: list[dict], limit: int | None, seed: int, skip: int = 0) -> list[dict]:
    """The rows ranked ``skip`` .. ``skip + limit`` by a keyed hash of their id (the ``limit`` smallest when
    ``skip`` is 0), in their original order. The order depends only on the seed and the ids, so two samples of
    the same rows with the same seed, one skipping the other's ``limit``, are disjoint."""
    if skip == 0 and (limit is None or len(rows) <= limit):
        return rows
    ranked = sorted(rows, key=lambda r: sample_key(seed, r["id"]))
    keep = {r["id"] for r in ranked[skip : None if limit is None else skip + limit]}
    return [r for r in rows if r["id"] in keep]


def read_suite(suite: EvalSuiteSection, plans: list, cfg: Config, leakage=None) -> Suite:
    """All rows of one suite's sources, kind-filtered and sampled; adapter errors listed, not dropped.
    With a ``leakage`` check (eqrlhf.evaluate.leakage), near-duplicates of training prompts are dropped before
    sampling (``eval.leakage=drop``) or found among the sampled rows (``fail``, ``report``)."""
    rows, errors, skipped, read = [], [], {}, 0
    for plan in plans:
        for row in source_rows(plan, limits_of(cfg), cfg.data.rows_per_block):
            read += 1
            if row["error"] is not None:
                errors.append(format_error(json.loads(row["error"])))
                continue
            why = kind_mismatch(suite.kind, row["harmful"])
            if why:
                skipped[why] = skipped.get(why, 0) + 1
                continue
            # a row without its own flag takes the suite's kind, so the labels categorizer can place it
            harmful = row["harmful"] if row["harmful"] is not None else suite.kind == "harmful"
            rows.append({**row, "harmful": harmful, "suite": suite.name, "kind": suite.kind})
    if read and len(errors) / read > cfg.data.error_budget:
        shown = "\n  ".join(errors[:MAX_LISTED_ERRORS])
        raise InputError(
            f"eval suite '{suite.name}': {len(errors)} of {read} records cannot be read "
            f"(over data.error_budget {cfg.data.error_budget}):\n  {shown}"
        )
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"eval suite '{suite.name}': row id '{dup}' occurs twice (give each source its own name)")
    leaked = []
    if leakage is not None and cfg.eval.leakage == "drop":
        found = leakage.matches([r["prompt"] for r in rows])
        leaked = [(r["id"], m) for r, m in zip(rows, found) if m is not None]
        if leaked:
            skipped[LEAKED] = len(leaked)
            rows = [r for r, m in zip(rows, found) if m is None]
    sampled = seeded_sample(rows, suite_limit(suite, cfg), cfg.run.seed, suite.skip)
    if leakage is not None and cfg.eval.leakage != "drop":
        found = leakage.matches([r["prompt"] for r in sampled])
        leaked = [(r["id"], m) for r, m in zip(sampled, found) if m is not None]
    if not sampled:
        raise InputError(
            f"eval suite '{suite.name}': no {suite.kind} prompts left (skipped: {skipped or 'none'}"
            + (f"; {len(rows)} rows, skip {suite.skip})" if suite.skip else ")")
        )
    counts = {
        "read": read,
        "errors": len(errors),
        "skipped": skipped,
        "sampled_out": len(rows) - len(sampled),
        "evaluated": len(sampled),
    }
    return Suite(suite.name, suite.kind, sampled, counts, errors, leaked)


def categorize_rows(rows: list[dict], cfg: Config) -> list[dict]:
    """Category per row from ``categorize.method`` (labels, embedding head or LLM judge), in-process.

    The categorizers are Ray Data batch functions over pyarrow tables; an evaluation holds a few
    thousand prompts at most, so one call on one table is enough.
    """
    from eqrlhf.data.categorizers import validate_categorizer

    validate_categorizer(cfg)
    table = pa.Table.from_pylist([{k: r.get(k) for k in ROW_SCHEMA.names} for r in rows], schema=ROW_SCHEMA)
    table = table.append_column("error", pa.array([None] * len(rows), pa.string()))
    method = cfg.categorize.method
    if method == "labels":
        from eqrlhf.data.categorizers.labels import map_labels

        out = map_labels(table, cfg)
    elif method == "embedding":
        from eqrlhf.data.categorizers.embedding import EmbeddingCategorizer

        out = EmbeddingCategorizer(cfg)(table)
    else:
        from eqrlhf.data.categorizers.judge import JudgeCategorizer

        out = JudgeCategorizer(cfg)(table)
    categories, reasons = out.column("category").to_pylist(), out.column("category_error").to_pylist()
    return [
        {**r, "category": c if c in CATEGORIES else UNMAPPED, "category_error": why}
        for r, c, why in zip(rows, categories, reasons, strict=True)
    ]


def load_suites(cfg: Config, plans: list | None = None, leakage=None) -> list[Suite]:
    """Every configured suite, read, filtered, checked for leakage, sampled and categorized (no model is
    loaded here unless ``categorize.method`` needs one)."""
    plans = plans if plans is not None else validate_suites(cfg)
    suites = []
    for suite in cfg.eval.suites:
        suites.append(read_suite(suite, [p for s, p in plans if s is suite], cfg, leakage))
    rows = categorize_rows([r for s in suites for r in s.rows], cfg)
    start = 0
    for suite in suites:
        suite.rows, start = rows[start : start + len(suite.rows)], start + len(suite.rows)
        suite.counts["unmapped_category"] = sum(r["category"] == UNMAPPED for r in suite.rows)
    return suites
