"""The ``categorize`` stage: read every source, categorize, mark duplicates, write rows.

Output (``cfg.stage_dir(categorize.output, "categorized")``): good rows in ``rows/``,
read errors in ``errors.jsonl`` (counted by reason), rows the categorizer could not
decide in ``unparsed.jsonl`` (counted), and a manifest with per-category, per-source and
duplicate counts. Duplicates are kept and marked: a later row whose normalised
conversation (history + prompt, casefolded, whitespace collapsed) was seen before gets
``dup_of`` = the first row's id. The order is the config's source order, so "first" is
deterministic. A row whose id an earlier row already has is an error (``repeated_id``):
later stages join on ids.
"""

from __future__ import annotations

import hashlib
import json
import time
from array import array
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from eqrlhf.config import Config
from eqrlhf.data.readers import error_record, format_error
from eqrlhf.data.schema import COLUMNS
from eqrlhf.data.sources import read_sources, validate_sources
from eqrlhf.manifest import ErrorBudgetExceeded, StageWriter


def normalise(prompt: str, history: str | None) -> str:
    """What counts as the same conversation: casefolded text, whitespace collapsed."""
    text = prompt if not history or history == "[]" else f"{history}\n{prompt}"
    return " ".join(text.casefold().split())


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class FirstSeen:
    """Map from a 64-bit hash to the first short string seen with it, compact enough for corpus scale.

    Sorted numpy hashes plus a byte arena of values cost about 30 bytes a row where a dict of
    int -> str costs about 150: this is what keeps the driver's memory flat at millions of rows.
    Hash collisions (2^-64 per pair) are negligible below billions of rows.
    """

    def __init__(self):
        self._keys = np.empty(0, np.uint64)  # sorted
        self._slots = np.empty(0, np.uint32)  # entry number of each key
        self._arena = bytearray()
        self._ends = array("Q")  # value k is _arena[_ends[k-1]:_ends[k]]

    def __len__(self) -> int:
        return len(self._ends)

    def first_of(self, hashes: list[int], values: list[str]) -> list[str | None]:
        """Per item in order: the value first seen with its hash, or None when this item is the first."""
        keys = np.array(hashes, dtype=np.uint64)
        pos = np.searchsorted(self._keys, keys)
        hit = pos < len(self._keys)
        hit[hit] = self._keys[pos[hit]] == keys[hit]
        out: list[str | None] = [None] * len(hashes)
        new: dict[int, str] = {}  # first occurrences inside this batch
        for i, (key, value) in enumerate(zip(hashes, values)):
            if hit[i]:
                out[i] = self._value(int(self._slots[pos[i]]))
            elif key in new:
                out[i] = new[key]
            else:
                new[key] = value
        self._add(new)
        return out

    def _value(self, slot: int) -> str:
        return self._arena[self._ends[slot - 1] if slot else 0 : self._ends[slot]].decode()

    def _add(self, new: dict[int, str]) -> None:
        if not new:
            return
        first_slot = len(self._ends)
        for value in new.values():
            self._arena += value.encode()
            self._ends.append(len(self._arena))
        keys = np.fromiter(new.keys(), np.uint64, len(new))
        order = np.argsort(keys)
        at = np.searchsorted(self._keys, keys[order])
        self._keys = np.insert(self._keys, at, keys[order])
        self._slots = np.insert(self._slots, at, (first_slot + order).astype(np.uint32))


class DuplicateIndex:
    """Marks rows whose normalised conversation was seen before: ``dup_of`` = the first row's id."""

    def __init__(self):
        self.first = FirstSeen()
        self.count = 0
        self.by_pair: Counter = Counter()  # "<first source> <- <duplicate source>"

    def mark(self, table: pa.Table) -> pa.Table:
        ids = table.column("id").to_pylist()
        prompts, histories = table.column("prompt").to_pylist(), table.column("history").to_pylist()
        dup_of = self.first.first_of([hash64(normalise(p, h)) for p, h in zip(prompts, histories)], ids)
        for row_id, first in zip(ids, dup_of):
            if first is not None:
                self.count += 1
                self.by_pair[f"{first.split(':', 1)[0]} <- {row_id.split(':', 1)[0]}"] += 1
        return table.set_column(table.column_names.index("dup_of"), "dup_of", pa.array(dup_of, pa.string()))


def reject_repeated_ids(table: pa.Table, seen: FirstSeen) -> tuple[pa.Table, list[dict]]:
    """Rows whose id an earlier row already has become errors: later stages join on ids."""
    ids = table.column("id").to_pylist()
    earlier = seen.first_of([hash64(i) for i in ids], [""] * len(ids))
    repeated = [i for i, e in enumerate(earlier) if e is not None]
    if not repeated:
        return table, []
    bad = table.take(repeated).select(["source", "file", "line", "id", "prompt"]).to_pylist()
    errors = [
        error_record(r["source"], r["file"], r["line"], "id", f"repeated id '{r['id']}'", r["prompt"], "repeated_id")
        for r in bad
    ]
    keep = np.ones(table.num_rows, bool)
    keep[repeated] = False
    return table.filter(pa.array(keep)), errors


def split_batch(batch: pa.Table) -> tuple[pa.Table, list[dict], list[dict]]:
    """(good rows as ROW_SCHEMA columns, read-error records, undecided rows with their reason)."""
    is_error = pc.is_valid(batch.column("error"))
    errors = [json.loads(e) for e in batch.filter(is_error).column("error").to_pylist()]
    rest = batch.filter(pc.invert(is_error))
    if "category_error" in rest.column_names:
        undecided = pc.is_valid(rest.column("category_error"))
        unparsed = rest.filter(undecided).drop_columns(["error"]).to_pylist()
        rest = rest.filter(pc.invert(undecided))
    else:
        unparsed = []
    return rest.select(list(COLUMNS)), errors, unparsed


def _undecided_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def run_categorize(cfg: Config) -> dict:
    """Validate, read, categorize and write; returns the manifest (also printed as a summary)."""
    from eqrlhf.data.categorizers import UNMAPPED_LABEL, add_categories, input_block_rows, validate_categorizer
    from eqrlhf.ray_utils import init_ray

    started = time.time()
    plans = validate_sources(cfg)  # both checks run before any cluster resource is taken
    validate_categorizer(cfg)
    init_ray()
    ds = add_categories(read_sources(cfg, plans, input_block_rows(cfg)), cfg)
    options = ds.context.execution_options
    options.preserve_order = True  # deterministic output and "first" duplicate
    if cfg.data.inflight_mb:  # the driver is the slowest consumer: without a cap, blocks pile up in the store
        options.resource_limits = options.resource_limits.copy(object_store_memory=cfg.data.inflight_mb * 2**20)

    out_dir = cfg.stage_dir(cfg.categorize.output, "categorized")
    # the previous output stays until the new one is complete (eqrlhf.manifest.StageWriter)
    with StageWriter(out_dir, "categorize", cfg.hash()) as writer:
        dups, ids, undecided, first_errors = DuplicateIndex(), FirstSeen(), Counter(), []
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=cfg.data.rows_per_block):
            writer.count_read(batch.num_rows)
            good, errors, unparsed = split_batch(batch)
            good, repeated = reject_repeated_ids(good, ids)
            errors += repeated
            writer.write_rows(dups.mark(good))
            writer.write_errors(errors)
            first_errors.extend(errors[: max(0, 5 - len(first_errors))])
            if unparsed:
                writer.side_output("unparsed", unparsed)
                undecided.update(_undecided_kind(r["category_error"]) for r in unparsed)
        try:
            writer.check_budget(cfg.data.error_budget)
        except ErrorBudgetExceeded:
            # errors.jsonl is complete in <out>.failed for inspection; the previous output is untouched
            print("first errors:\n  " + "\n  ".join(format_error(e) for e in first_errors))
            raise
        manifest = writer.close(
            hints={UNMAPPED_LABEL: "set categorize.label_map or categorize.default_category (docs/your-data.md)"},
            method=cfg.categorize.method,
            sources=[p.source for p in plans],
            duplicates=dups.count,
            duplicates_by_source=dict(sorted(dups.by_pair.items())),
            unparsed_by_kind=dict(sorted(undecided.items())),
            unparsed_rows=sum(undecided.values()),
        )
    print(summary(manifest, first_errors, time.time() - started))
    return manifest


def summary(manifest: dict, first_errors: list[dict], seconds: float) -> str:
    """One screen: what was read, written, routed, failed, and where."""
    lines = [
        f"categorize ({manifest['method']}): read {manifest['rows_read']}, wrote {manifest['rows_written']}, "
        f"unparsed {manifest['unparsed_rows']}, failed {sum(manifest['failed'].values())}, "
        f"duplicates {manifest['duplicates']}, {seconds:.1f}s",
        "  per category: " + _counts(manifest["per_category"]),
        "  per source:   " + _counts(manifest["per_source"]),
    ]
    if manifest["unparsed_by_kind"]:
        lines.append("  unparsed:     " + _counts(manifest["unparsed_by_kind"]))
    if manifest["failed"]:
        lines.append("  failed:       " + _counts(manifest["failed"]))
        lines.extend("    " + format_error(e) for e in first_errors)
    if manifest["duplicates_by_source"]:
        lines.append("  duplicates:   " + _counts(manifest["duplicates_by_source"]))
    return "\n".join(lines)


def _counts(counts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items()) or "-"
