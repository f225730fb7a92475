"""Iterate raw records out of a source file, with provenance, never raising on bad data.

Every reader yields :class:`Item` values: a record (usually a dict) with the line it
starts on, or an error record ``{source, file, line, field, reason, reason_code, raw}``
for input that cannot be read (malformed JSON, bytes that are not UTF-8, a CSV row with
the wrong number of fields...). Errors are data, so a stage can count and write them
instead of dying on line 80,000 of a corpus.

``line`` is the 1-based physical line where the record starts for JSONL, CSV and
top-level JSON arrays; for parquet, saved datasets, hub datasets and nested JSON that an
adapter flattens it is the 1-based record ordinal.

JSONL, CSV and parquet are streamed (one line / one record batch at a time); a JSON
document is necessarily parsed whole.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from eqrlhf.errors import ConfigError

RAW_CHARS = 500  # how much of an offending record an error keeps
FORMATS = ("jsonl", "json", "csv", "parquet", "hf_disk", "hub")
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class Item(NamedTuple):
    line: int
    record: Any = None
    error: dict | None = None


class SourceError(ConfigError):
    """A configured source that cannot be read at all (the message names source and path)."""


def error_record(source: str, file: str, line: int | None, field: str, reason: str, raw: Any, code: str) -> dict:
    if not isinstance(raw, str):
        raw = json.dumps(raw, ensure_ascii=False, default=str)
    return {
        "source": source,
        "file": file,
        "line": line,
        "field": field,
        "reason": reason,
        "reason_code": code,
        "raw": raw[:RAW_CHARS],
    }


def format_error(err: dict) -> str:
    """One line a person can act on: ``file:line: field 'x': reason``."""
    return f"{err['file']}:{err['line']}: [{err['source']}] field '{err['field']}': {err['reason']}"


def reason_code(reason: str) -> str:
    """A short countable code for a RowError reason (the manifest counts errors by it)."""
    if reason.startswith("missing"):
        return "missing_field"
    if reason.startswith("expected"):
        return "wrong_type"
    if reason.startswith("empty"):
        return "empty_text"
    if "exceeds max_" in reason:
        return "too_long"
    return "invalid"


def detect_format(path: Path) -> str | None:
    """Format from the file name (``x.jsonl.gz`` -> jsonl) or a saved-dataset directory."""
    if path.is_dir():
        saved = (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
        return "hf_disk" if saved else None
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _SUFFIX_FORMATS.get(suffixes[-1]) if suffixes else None


def open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def iter_records(
    path: str | Path,
    fmt: str,
    source: str,
    *,
    split: str = "train",
    flatten: Callable[[Any], Iterable[dict]] | None = None,
    batch_rows: int = 2048,
) -> Iterator[Item]:
    """Records of one file (or saved dataset, or hub id) in order; see the module docstring."""
    path = Path(path) if fmt != "hub" else path
    if fmt == "jsonl":
        yield from _jsonl_items(path, source)
    elif fmt == "json":
        yield from _json_items(path, source, flatten)
    elif fmt == "csv":
        yield from _csv_items(path, source)
    elif fmt == "parquet":
        yield from _parquet_items(path, batch_rows)
    elif fmt == "hf_disk":
        yield from _hf_disk_items(path, split)
    elif fmt == "hub":
        yield from _hub_items(str(path), split, source)
    else:
        raise SourceError(f"source '{source}': unknown format '{fmt}' for {path} (known: {', '.join(FORMATS)})")


# -- JSONL ----------------------------------------------------------------------


def _lines(path: Path, source: str) -> Iterator[tuple[int, bytes | None, dict | None]]:
    """(line number, bytes) per physical line; a corrupt gzip stream ends with an error."""
    n = 0
    try:
        with open_binary(path) as fh:
            for n, data in enumerate(fh, 1):
                yield n, data, None
    except (OSError, EOFError, zlib.error) as exc:
        reason = f"file unreadable after line {n}: {type(exc).__name__}: {exc}"
        yield n + 1, None, error_record(source, str(path), n + 1, "file", reason, "", "unreadable")


def _jsonl_items(path: Path, source: str) -> Iterator[Item]:
    file = str(path)
    for n, data, err in _lines(path, source):
        if err is not None:
            yield Item(n, error=err)
            return
        if not data.strip():
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            reason = f"not valid UTF-8 at byte offset {exc.start} of the line ({data[exc.start : exc.start + 4]!r})"
            raw = data.decode("utf-8", errors="replace")
            yield Item(n, error=error_record(source, file, n, "record", reason, raw, "encoding"))
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            reason = f"malformed JSON: {exc.msg} (column {exc.colno})"
            yield Item(n, error=error_record(source, file, n, "record", reason, text, "malformed_json"))
            continue
        if not isinstance(record, dict):
            reason = f"expected a JSON object per line, got {type(record).__name__}"
            yield Item(n, error=error_record(source, file, n, "record", reason, text, "wrong_type"))
            continue
        yield Item(n, record)


# -- JSON documents -------------------------------------------------------------

_WS = re.compile(r"[ \t\n\r]*")


def _json_items(path: Path, source: str, flatten: Callable[[Any], Iterable[dict]] | None) -> Iterator[Item]:
    # A JSON document has to be parsed whole, so it is loaded in memory (the shared JSON
    # files are at most a few MB; large corpora should be JSONL or parquet).
    file = str(path)
    with open_binary(path) as fh:
        data = fh.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        reason = f"not valid UTF-8 at byte {exc.start}; a JSON document cannot be read in part"
        yield Item(line, error=error_record(source, file, line, "record", reason, "", "encoding"))
        return
    start = _WS.match(text).end()
    if text[start : start + 1] == "[":
        yield from _json_array_items(text, start, source, file)
        return
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        reason = f"malformed JSON: {exc.msg} (column {exc.colno})"
        snippet = text.splitlines()[exc.lineno - 1] if text else ""
        yield Item(
            exc.lineno, error=error_record(source, file, exc.lineno, "record", reason, snippet, "malformed_json")
        )
        return
    if flatten is None:
        reason = f"top-level JSON {type(document).__name__}: this adapter expects a list of records"
        yield Item(1, error=error_record(source, file, 1, "record", reason, text, "wrong_type"))
        return
    try:
        for ordinal, record in enumerate(flatten(document), 1):
            yield Item(ordinal, record)
    except (KeyError, TypeError, ValueError) as exc:  # the document does not have the layout the adapter knows
        reason = f"unexpected JSON layout for this adapter: {type(exc).__name__}: {exc}"
        yield Item(1, error=error_record(source, file, 1, "record", reason, text, "wrong_type"))


def _json_array_items(text: str, pos: int, source: str, file: str) -> Iterator[Item]:
    """Elements of a top-level array with the line each starts on (raw_decode walks the array)."""
    decoder = json.JSONDecoder()
    line, counted = 1, 0
    pos = _WS.match(text, pos + 1).end()
    if text[pos : pos + 1] == "]":
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            bad = text.count("\n", 0, exc.pos) + 1
            reason = f"malformed JSON: {exc.msg}; the rest of the array is not read"
            yield Item(bad, error=error_record(source, file, bad, "record", reason, text[exc.pos :], "malformed_json"))
            return
        yield Item(line, value)
        pos = _WS.match(text, pos).end()
        if text[pos : pos + 1] == ",":
            pos = _WS.match(text, pos + 1).end()
        elif text[pos : pos + 1] == "]":
            return
        else:
            bad = text.count("\n", 0, pos) + 1
            reason = "malformed JSON: expected ',' or ']' between array elements; the rest is not read"
            yield Item(bad, error=error_record(source, file, bad, "record", reason, text[pos:], "malformed_json"))
            return


# -- CSV ------------------------------------------------------------------------


def _csv_items(path: Path, source: str) -> Iterator[Item]:
    """Rows as {header: value}; quoted multi-line fields work, ``line`` is where a record starts."""
    file = str(path)
    bad_lines: list[int] = []  # lines that were not UTF-8 (decoded with replacement, then reported)
    fatal: list[dict] = []

    def text_lines() -> Iterator[str]:
        for n, data, err in _lines(path, source):
            if err is not None:
                fatal.append(err)
                return
            try:
                yield data.decode("utf-8")
            except UnicodeDecodeError:
                bad_lines.append(n)
                yield data.decode("utf-8", errors="replace")

    reader = csv.reader(text_lines())
    try:
        header = next(reader, None)
    except csv.Error as exc:
        header, fatal = None, [error_record(source, file, 1, "header", f"bad CSV header: {exc}", "", "malformed_csv")]
    if header is None:
        err = fatal[0] if fatal else error_record(source, file, 1, "header", "empty CSV file: no header", "", "empty")
        yield Item(1, error=err)
        return
    header = [h.lstrip("\ufeff") if i == 0 else h for i, h in enumerate(header)]
    start = reader.line_num + 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            yield Item(start, error=error_record(source, file, start, "record", f"bad CSV: {exc}", "", "malformed_csv"))
            start = reader.line_num + 1
            continue
        end = reader.line_num
        item = _csv_item(header, values, start, end, bad_lines, source, file)
        if item is not None:
            yield item
        bad_lines[:] = [b for b in bad_lines if b > end]
        start = end + 1
    for err in fatal:
        yield Item(err["line"], error=err)


def _csv_item(header, values, start, end, bad_lines, source, file) -> Item | None:
    if not values:  # a blank line
        return None
    raw = ",".join(values)
    if any(start <= b <= end for b in bad_lines):
        field = next((h for h, v in zip(header, values) if "\ufffd" in v), "record")
        reason = f"not valid UTF-8 (line {next(b for b in bad_lines if b >= start)})"
        return Item(start, error=error_record(source, file, start, field, reason, raw, "encoding"))
    if len(values) != len(header):
        if len(values) < len(header):
            missing = ", ".join(repr(h) for h in header[len(values) :])
            reason = f"row has {len(values)} fields, header has {len(header)}: missing column(s) {missing}"
            field = header[len(values)]
        else:
            reason = f"row has {len(values)} fields, header has {len(header)}: extra values"
            field = "record"
        return Item(start, error=error_record(source, file, start, field, reason, raw, "missing_column"))
    return Item(start, dict(zip(header, values)))


def csv_header(path: Path) -> list[str]:
    """The header of a CSV file (for up-front checks of the columns an adapter needs)."""
    with open_binary(path) as fh:
        first = fh.readline().decode("utf-8-sig", errors="replace")
    return next(csv.reader([first]), [])


# -- columnar and datasets ------------------------------------------------------


def _parquet_items(path: Path, batch_rows: int) -> Iterator[Item]:
    import pyarrow.parquet as pq

    ordinal = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        for record in batch.to_pylist():
            ordinal += 1
            yield Item(ordinal, record)


def _pick_split(dataset, split: str, where: str):
    if hasattr(dataset, "keys") and not hasattr(dataset, "features"):  # a DatasetDict
        if split not in dataset:
            raise SourceError(f"{where}: split '{split}' not found (has: {', '.join(dataset.keys())})")
        return dataset[split]
    return dataset


def _hf_disk_items(path: Path, split: str) -> Iterator[Item]:
    import datasets

    dataset = _pick_split(datasets.load_from_disk(str(path)), split, str(path))  # memory-mapped arrow
    for ordinal, record in enumerate(dataset, 1):
        yield Item(ordinal, record)


def _hub_items(hub_id: str, split: str, source: str) -> Iterator[Item]:
    import datasets

    try:
        dataset = datasets.load_dataset(hub_id, split=split, streaming=True)
        records = iter(dataset)
        first = next(records, None)
    except Exception as exc:  # any failure here means: not reachable, or not a dataset
        raise SourceError(
            f"source '{source}': could not load hub dataset '{hub_id}' (split '{split}'): {type(exc).__name__}: "
            f"{str(exc)[:300]}. Hub sources need network access to huggingface.co; offline, point the source at "
            "a local file or a save_to_disk directory instead"
        ) from None
    if first is None:
        return
    yield Item(1, first)
    for ordinal, record in enumerate(records, 2):
        yield Item(ordinal, record)
