"""The one row schema every data stage reads and writes.

A row is a prompt (the last user turn, plus earlier turns in ``history``) with
optional preference responses and labels. Adapters turn source records into
rows; a record that cannot become a row raises :class:`RowError`, which the
reader turns into an error record naming file, line and field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

from eqrlhf.errors import InputError

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # stable: "<source>:<key in source>"
        ("source", pa.string()),
        ("prompt", pa.string()),  # last user turn
        ("history", pa.string()),  # JSON list of {"role", "content"} before the prompt
        ("chosen", pa.string()),  # preferred response, if the source has one
        ("rejected", pa.string()),
        ("chosen_safe", pa.bool_()),  # per-response safety label (PKU-SafeRLHF, BFPO)
        ("rejected_safe", pa.bool_()),
        ("label", pa.string()),  # the source's own label, input to the `labels` categorizer
        ("harmful", pa.bool_()),  # source-level prior: is the prompt meant to be harmful
        ("category", pa.string()),  # EHD / IHD / MHD / none once categorized
        ("dup_of", pa.string()),  # id of the first row with the same normalised prompt, if any
        ("meta", pa.string()),  # JSON of other source fields worth keeping
        ("file", pa.string()),  # provenance
        ("line", pa.int64()),
    ]
)
COLUMNS = tuple(ROW_SCHEMA.names)

ERROR_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("file", pa.string()),
        ("line", pa.int64()),
        ("field", pa.string()),
        ("reason", pa.string()),
        ("raw", pa.string()),
    ]
)


class RowError(InputError):
    """A source record that cannot become a row. ``field`` names what is wrong; the reader adds file and line."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason, field=field)
        self.reason = reason
        self.args = (field, reason)  # the constructor's arguments, so that the error pickles


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 4000
    max_response_chars: int = 8000


def require_text(record: dict, key: str, *, optional: bool = False) -> str | None:
    """Fetch a text field, raising RowError for missing, wrong-typed or empty values."""
    if key not in record or record[key] is None:
        if optional:
            return None
        raise RowError(key, "missing field")
    value = record[key]
    if not isinstance(value, str):
        raise RowError(key, f"expected text, got {type(value).__name__}")
    if not value.strip():
        if optional:
            return None
        raise RowError(key, "empty text")
    return value


def make_row(
    *,
    source: str,
    key: str | int,
    prompt: str,
    limits: Limits,
    history: list[dict] | None = None,
    chosen: str | None = None,
    rejected: str | None = None,
    chosen_safe: bool | None = None,
    rejected_safe: bool | None = None,
    label: str | None = None,
    harmful: bool | None = None,
    category: str | None = None,
    meta: dict | None = None,
) -> dict:
    """Build a validated row. Length limits and emptiness are checked here, once."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise RowError("prompt", "empty text")
    if len(prompt) > limits.max_prompt_chars:
        raise RowError("prompt", f"{len(prompt)} chars exceeds max_prompt_chars={limits.max_prompt_chars}")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if text is not None and len(text) > limits.max_response_chars:
            raise RowError(name, f"{len(text)} chars exceeds max_response_chars={limits.max_response_chars}")
    return {
        "id": f"{source}:{key}",
        "source": source,
        "prompt": prompt.strip(),
        "history": json.dumps(history or []),
        "chosen": chosen,
        "rejected": rejected,
        "chosen_safe": chosen_safe,
        "rejected_safe": rejected_safe,
        "label": None if label is None else str(label),
        "harmful": harmful,
        "category": category,
        "dup_of": None,
        "meta": json.dumps(meta or {}, ensure_ascii=False, default=str),
        "file": None,
        "line": None,
    }


def rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def errors_to_table(errors: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(errors, schema=ERROR_SCHEMA)
