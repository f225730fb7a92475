"""Labels categorizer: map a source's own label (and its harmful prior) to a risk category.

Lookup for a row with source ``S`` and label ``L`` (``L/T`` when the row's meta has a
``type``, as XSTest rows do), first hit wins:

0. a category the source itself already assigned (``category`` set by the adapter) is kept;
1. ``categorize.label_map``: ``"S:L/T"``, ``"S:L"``, ``"L/T"``, ``"L"``, then ``"S:*"`` (the whole source);
2. the same keys in :data:`DEFAULT_LABEL_MAP` (built-in knowledge of the shared datasets);
3. the source's ``harmful`` prior: ``false`` -> ``none``, ``true`` -> ``categorize.harmful_category``;
4. ``categorize.default_category``;
5. otherwise the row is routed, not guessed: ``category_error = "unmapped label: ..."``.

A label mapped to :data:`UNMAPPED` (Equilibrate's undocumented ``OTHER``) stops at step 4:
the source prior must not turn "unclassified" into a category.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pyarrow as pa

from eqrlhf.config import CATEGORIES, CategorizeSection, Config, ConfigError
from eqrlhf.fault_markers import mark

UNMAPPED = "<unmapped>"
UNMAPPED_LABEL = "unmapped label"
UNPARSED = "unparsed"
UNCERTAIN = "uncertain"  # the embedding head below categorize.embedding.min_confidence

# Equilibrate-RLHF's released labels. OTHER is undocumented: "unclassified", not harmless.
EQUILIBRATE_LABELS = {"EHD": "EHD", "IHD": "IHD", "MHD": "MHD", "No risk": "none", "OTHER": None}

# XSTest: every "safe" prompt is benign (the over-refusal trap). The unsafe contrast twins:
# violent/criminal requests stated outright are explicit (EHD); discriminatory premises and
# requests for a private person's data carry intent without explicit risky terms (IHD);
# distorting sensitive historical events is both (MHD).
XSTEST_LABELS = {
    "safe": "none",
    "unsafe/contrast_homonyms": "EHD",
    "unsafe/contrast_figurative_language": "EHD",
    "unsafe/contrast_safe_targets": "EHD",
    "unsafe/contrast_safe_contexts": "EHD",
    "unsafe/contrast_definitions": "EHD",
    "unsafe/contrast_discr": "IHD",
    "unsafe/contrast_historical_events": "MHD",
    "unsafe/contrast_privacy": "IHD",
}

# BeaverTails harm categories (the 14 of BeaverTails-Evaluation). Categories named by
# explicit content (weapons, drugs, abuse, sexual content, terror) -> EHD; categories that
# are about what the user wants done with otherwise ordinary words (privacy, unethical
# conduct, misinformation, stereotypes, politics) -> IHD. A judgement call: the trained embedding
# head agrees on the IHD rows, but calls most prompts of the EHD-mapped categories IHD or MHD
# (Equilibrate's annotators labelled 60% of BeaverTails prompts IHD). Override per label if needed.
BEAVERTAILS_LABELS = {
    "animal_abuse": "EHD",
    "child_abuse": "EHD",
    "drug_abuse,weapons,banned_substance": "EHD",
    "self_harm": "EHD",
    "sexually_explicit,adult_content": "EHD",
    "terrorism,organized_crime": "EHD",
    "violence,aiding_and_abetting,incitement": "EHD",
    "hate_speech,offensive_language": "EHD",
    "financial_crime,property_crime,theft": "IHD",
    "controversial_topics,politics": "IHD",
    "discrimination,stereotype,injustice": "IHD",
    "misinformation_regarding_ethics,laws_and_safety": "IHD",
    "non_violent_unethical_behavior": "IHD",
    "privacy_violation": "IHD",
}

# Datasets whose adapter labels every row with the dataset's name. Sources not listed
# here fall back on their harmful prior (EHD / none): AdvBench, HarmBench, JBB, StrongREJECT,
# CatQA, CoCoNot, Alpaca, the other Safety-Tuned-LLaMAs sets.
DATASET_LABELS = {
    # Anthropic red-team conversations; BeaverTails (and so PKU-SafeRLHF) took its prompts from
    # them, and Equilibrate's relabelling of those prompts is mostly IHD (1239 of 2079 labelled).
    "hh_rlhf": "IHD",
    "pku_saferlhf": "IHD",
    "harmfulqa": "IHD",  # harmful aims framed as academic questions
    "I-PhysicalSafetyUnsafe": "IHD",  # dangerous advice in benign wording
    "I-Controversial": "IHD",  # discriminatory premises, like XSTest's contrast_discr
    "Q-Harm": "IHD",  # red-team questions
}

DEFAULT_LABEL_MAP: dict[str, str] = {
    **{k: (UNMAPPED if v is None else v) for k, v in EQUILIBRATE_LABELS.items()},
    "none": "none",
    **XSTEST_LABELS,
    **BEAVERTAILS_LABELS,
    **DATASET_LABELS,
}


def validate_label_config(cfg: Config) -> None:
    """Every configured mapping value must be a category; fails before any Ray work."""
    cat = cfg.categorize
    allowed = ", ".join(CATEGORIES)
    for key, value in cat.label_map.items():
        if not key.strip():
            raise ConfigError("categorize.label_map: empty key")
        if value not in CATEGORIES:
            raise ConfigError(f"categorize.label_map['{key}']: '{value}' is not a category ({allowed})")
    for name in ("default_category", "harmful_category"):
        value = getattr(cat, name)
        if value is not None and value not in CATEGORIES:
            raise ConfigError(f"categorize.{name}: '{value}' is not a category ({allowed}) or null")


def label_keys(source: str | None, label: str | None, subtype: str | None) -> list[str]:
    """Lookup keys, most specific first."""
    labels = ([f"{label}/{subtype}"] if label is not None and subtype else []) + ([label] if label is not None else [])
    return [f"{source}:{x}" for x in labels] + labels + [f"{source}:*"]


def meta_type(meta: str | None) -> str | None:
    if not meta or '"type"' not in meta:  # cheap pre-check: most rows have no subtype
        return None
    value = json.loads(meta).get("type")
    return value if isinstance(value, str) else None


def label_category(row: dict, cat: CategorizeSection) -> tuple[str | None, str | None]:
    """(category, None) or (None, "unmapped label: ...") for one row; pure."""
    if row.get("category") in CATEGORIES:
        return row["category"], None
    keys = label_keys(row.get("source"), row.get("label"), meta_type(row.get("meta")))
    found = next((table[k] for table in (cat.label_map, DEFAULT_LABEL_MAP) for k in keys if k in table), None)
    if found is None and row.get("harmful") is not None:
        found = cat.harmful_category if row["harmful"] else "none"
    if found in CATEGORIES:
        return found, None
    if cat.default_category is not None:
        return cat.default_category, None
    why = "marked unclassified in the source" if found == UNMAPPED else "no mapping and no source prior"
    key = row.get("label") if row.get("label") is not None else f"{row.get('source')}:*"
    return None, (
        f"{UNMAPPED_LABEL}: source '{row.get('source')}' label {row.get('label')!r} ({why}; "
        f"add categorize.label_map['{key}'] or set categorize.default_category)"
    )


DecideFn = Callable[[list[dict]], list[tuple[str | None, str | None]]]
LABEL_COLUMNS = ("source", "label", "harmful", "category", "meta")


def with_categories(table: pa.Table, decide: DecideFn, columns: tuple[str, ...]) -> pa.Table:
    """Apply ``decide`` to the rows without a read ``error``; set ``category`` and ``category_error``.

    ``decide`` gets those rows as dicts of ``columns`` (the ones present) and returns one
    ``(category, None)`` or ``(None, "<kind>: <reason>")`` per row.

    Shared by all three categorizers: error rows pass through untouched, and a row the
    categorizer cannot decide gets a null category and the reason, never a guess.
    """
    n = table.num_rows
    errors = table.column("error").to_pylist() if "error" in table.column_names else [None] * n
    good = [i for i, e in enumerate(errors) if e is None]
    categories = table.column("category").to_pylist() if "category" in table.column_names else [None] * n
    reasons: list[str | None] = [None] * n
    if good:
        present = [c for c in columns if c in table.column_names]
        decisions = decide(table.select(present).take(good).to_pylist())
        for i, (category, reason) in zip(good, decisions, strict=True):
            categories[i], reasons[i] = category, reason
    table = set_column(table, "category", pa.array(categories, pa.string()))
    return set_column(table, "category_error", pa.array(reasons, pa.string()))


def set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def map_labels(batch: pa.Table, cfg: Config) -> pa.Table:
    """The Ray Data stage function (stateless: plain tasks, no actors)."""
    mark("categorize", ids=lambda: batch.column("id").to_pylist())  # node-loss tests: proof this node held these rows
    cat = cfg.categorize
    return with_categories(batch, lambda rows: [label_category(r, cat) for r in rows], LABEL_COLUMNS)
