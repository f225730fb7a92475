"""Stage outputs: parquet shards, an error file and a JSON manifest of counts.

Every stage writes through :class:`StageWriter`, so every input row is
accounted for: written, filtered with a counted reason, or in ``errors.jsonl``
with file, line and field. The driver streams batches into it; memory stays
bounded by one shard.

The writer fills ``<out>.tmp-<pid>`` beside the output (:class:`eqrlhf.atomic.StagedDir`) and swaps it in
whole when it closes, so the previous output (rows and manifest) stays as it was until then: a stage that
fails keeps its attempt as ``<out>.failed`` (with its ``errors.jsonl``) and one interrupted by Ctrl-C
leaves nothing. Use it as a context manager (``with StageWriter(...) as writer:``) so that an exception
anywhere in the stage does the same.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from eqrlhf.atomic import StagedDir, write_json
from eqrlhf.errors import InputError, InputNotFound, tried

MANIFEST = "manifest.json"
ROWS_DIR = "rows"
ERRORS = "errors.jsonl"


class ErrorBudgetExceeded(InputError):
    """More rows failed than ``data.error_budget`` allows: the input is wrong (the CLI exits 2)."""


class NothingWritten(InputError):
    """A stage read rows and wrote none; the message names the reason counted most."""


class StageWriter:
    def __init__(self, out_dir: str | Path, stage: str, config_hash: str, shard_rows: int = 50_000):
        self.dir = Path(out_dir)  # where the output will be once closed; the previous one stays until then
        self._staged = StagedDir(self.dir)  # a stage output is always rewritten whole, beside the old one
        self.work_dir = self._staged.path  # where this run writes: extra files a stage adds go here too
        (self.work_dir / ROWS_DIR).mkdir(parents=True)
        self.stage = stage
        self.config_hash = config_hash
        self.shard_rows = shard_rows
        self.started = time.time()
        self.read = 0
        self.written = 0
        self.by_category: Counter = Counter()
        self.by_source: Counter = Counter()
        self.filtered: Counter = Counter()
        self.failed: Counter = Counter()
        self.failed_fields: Counter = Counter()  # (source, file, field, reason code) of each error
        self.extra: dict = {}
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._shards = 0
        self._errors = open(self.work_dir / ERRORS, "w", encoding="utf-8")
        self._side: dict[str, object] = {}
        self._committed = False

    def __enter__(self) -> StageWriter:
        return self

    def __exit__(self, kind, err, tb) -> None:
        """An exception out of the stage: an error keeps the attempt as ``<out>.failed``, Ctrl-C removes it;
        either way the previous output is untouched."""
        if kind is not None:
            self._close_files()
            self._staged.__exit__(kind, err, tb)

    def _close_files(self) -> None:
        self._errors.close()
        for fh in self._side.values():
            fh.close()

    def fail(self) -> Path:
        """Give up: keep this attempt as ``<out>.failed`` for inspection and return that folder."""
        self._close_files()
        return self._staged.fail()

    # -- rows -------------------------------------------------------------
    def write_rows(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.written += table.num_rows
        if "category" in table.column_names:
            self.by_category.update(
                c if c is not None else "uncategorized" for c in table.column("category").to_pylist()
            )
        if "source" in table.column_names:
            self.by_source.update(table.column("source").to_pylist())
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.shard_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending, promote_options="default")
        pq.write_table(table, self.work_dir / ROWS_DIR / f"part-{self._shards:05d}.parquet")
        self._shards += 1
        self._pending, self._pending_rows = [], 0

    # -- accounting -------------------------------------------------------
    def count_read(self, n: int) -> None:
        self.read += n

    def filter(self, reason: str, n: int = 1) -> None:
        """Rows left out on purpose (duplicates, category not asked for...)."""
        self.filtered[reason] += n

    def write_errors(self, errors: list[dict]) -> None:
        for err in errors:
            code = err.get("reason_code") or err["reason"].split(":")[0]
            self.failed[code] += 1
            self.failed_fields[(err.get("source"), err.get("file"), err.get("field"), code)] += 1
            self._errors.write(json.dumps(err, ensure_ascii=False, default=str) + "\n")

    def side_output(self, name: str, rows: list[dict]) -> None:
        """Append rows to a named JSONL side output (e.g. the judge's `unparsed`)."""
        if name not in self._side:
            self._side[name] = open(self.work_dir / f"{name}.jsonl", "w", encoding="utf-8")
        fh = self._side[name]
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        self.extra.setdefault(f"{name}_rows", 0)
        self.extra[f"{name}_rows"] += len(rows)

    def check_budget(self, budget: float) -> None:
        total = max(self.read, 1)
        errors = sum(self.failed.values())
        if errors / total <= budget:
            return
        head = f"{self.stage}: {errors} of {self.read} rows failed ({errors / total:.1%}, error budget {budget:.1%})"
        (source, file, field, code), n = self.failed_fields.most_common(1)[0]
        # the previous output stays and this attempt is kept for inspection (after close: the output itself)
        errors_file = (self.dir if self._committed else self.fail()) / ERRORS
        if n == errors and code == "missing_field":  # one column every row lacks: a mapping problem
            raise ErrorBudgetExceeded(
                f"{head}: every one lacks field '{field}' in source '{source}' ({file}), so the file's columns "
                f"do not match what the adapter reads: map them with data.sources[].fields (docs/your-data.md); "
                f"rows in {errors_file}"
            )
        raise ErrorBudgetExceeded(f"{head}; see {errors_file} (raise data.error_budget to accept)")

    def close(self, hints: dict[str, str] | None = None, **extra) -> dict:
        """Write the manifest, swap the output into place and return the manifest. A stage that read rows and
        wrote none raises NothingWritten naming the reason counted most (with ``hints[reason]``, what to
        change) and keeps its attempt as ``<out>.failed``: no later stage reads the empty output, and the
        previous output stays."""
        if self.read and not self.written:
            reasons = self.filtered + self.failed + Counter(extra.get("unparsed_by_kind") or {})
            top, n = reasons.most_common(1)[0] if reasons else ("no reason counted", self.read)
            hint = (hints or {}).get(top)
            raise NothingWritten(
                f"{self.stage}: wrote 0 of {self.read} rows; {n} of {self.read}: {top}"
                + (f": {hint}" if hint else "")
                + f" (counts: {dict(reasons)}; details in {self.fail()})"
            )
        self._flush()
        self._close_files()
        self.extra.update(extra)
        manifest = {
            "stage": self.stage,
            "config_hash": self.config_hash,
            "rows_read": self.read,
            "rows_written": self.written,
            "per_category": dict(sorted(self.by_category.items())),
            "per_source": dict(sorted(self.by_source.items())),
            "filtered": dict(sorted(self.filtered.items())),
            "failed": dict(sorted(self.failed.items())),
            "shards": self._shards,
            "seconds": round(time.time() - self.started, 3),
            **self.extra,
        }
        write_json(self.work_dir / MANIFEST, manifest)  # last: a folder without one is not a finished stage
        self._staged.commit()
        self._committed = True
        return manifest


def read_manifest(stage_dir: str | Path) -> dict:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        raise InputNotFound(f"no stage output at {tried(stage_dir)}: no {MANIFEST}; run the previous stage first")
    return json.loads(path.read_text())


def rows_path(stage_dir: str | Path) -> Path:
    read_manifest(stage_dir)  # fail with a clear message when the stage did not run
    return Path(stage_dir) / ROWS_DIR


def in_id_order(table: pa.Table) -> pa.Table:
    """A stage's rows in one canonical order. Ray Data writes them in whatever order its tasks finish, so two
    runs of the same config hold the same rows in different orders; whatever picks rows by position (the
    trainer's step -> rows permutation, PPO's prompt batches) needs this order to repeat a run."""
    keys = [k for k in ("id", "prompt") if k in table.column_names]  # prompt breaks ties between repeated ids
    return table.sort_by([(k, "ascending") for k in keys]) if keys else table


def read_rows(stage_dir: str | Path) -> pa.Table:
    """Load a (small) stage output in memory, in the order the stage wrote it; large ones should go through
    ray.data.read_parquet."""
    path = rows_path(stage_dir)
    files = sorted(path.glob("*.parquet"))
    if not files:
        from eqrlhf.data.schema import ROW_SCHEMA

        return ROW_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
