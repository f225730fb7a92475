"""Configured sources -> one Ray Dataset of rows (ROW_SCHEMA + ``error``).

``validate_sources(cfg)`` checks every source before Ray starts (path exists, format and
adapter known, CSV columns present) and returns read plans. ``read_sources(cfg)`` reads
them through a Ray Data :class:`Datasource` whose read tasks stream their files block by
block. A record that cannot become a row is still a row of the output: its ``error``
column holds the error record as JSON (source, file, line, field, reason, raw) and the
row columns are null except source, file and line, so later stages can count and route
it instead of losing it.
"""

from __future__ import annotations

import functools
import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from eqrlhf.config import Config, SourceSection
from eqrlhf.data.adapters import (
    ADAPTERS,
    Context,
    check_generic_fields,
    detect_adapter,
    not_data_reason,
    suggest_adapter,
)
from eqrlhf.data.readers import (
    SourceError,
    csv_header,
    detect_format,
    error_record,
    iter_records,
    reason_code,
)
from eqrlhf.data.schema import ROW_SCHEMA, Limits, RowError
from eqrlhf.errors import listing, tried

OUTPUT_SCHEMA = ROW_SCHEMA.append(pa.field("error", pa.string()))
_EMPTY_ROW = dict.fromkeys(OUTPUT_SCHEMA.names)
GZIP_EXPANSION = 5  # rough in-memory size of a gzipped text file relative to its bytes


@dataclass(frozen=True)
class FileSpec:
    path: str  # absolute (read tasks may run in another working directory), or a hub id
    format: str
    adapter: str


@dataclass(frozen=True)
class ReadPlan:
    """One configured source, resolved: which files, read how, capped at ``limit`` rows."""

    source: str
    files: tuple[FileSpec, ...]
    split: str = "train"
    limit: int | None = None
    fields: tuple[tuple[str, str], ...] = ()


# -- validation (no Ray) --------------------------------------------------------


def validate_sources(cfg: Config) -> list[ReadPlan]:
    """Resolve every source or fail listing every problem (each names source and path)."""
    if not cfg.data.sources:
        raise SourceError("data.sources is empty: configure at least one source (name, path, adapter)")
    problems, plans, names = [], [], set()
    for src in cfg.data.sources:
        if src.name in names:
            problems.append(f"source '{src.name}': the name is used twice (ids are '<source>:<key>')")
        names.add(src.name)
        try:
            plans.append(plan_source(src, cfg))
        except SourceError as exc:
            problems.append(str(exc))
    if problems:
        raise SourceError(listing("invalid data.sources", problems))
    return plans


def plan_source(src: SourceSection, cfg: Config) -> ReadPlan:
    where = f"source '{src.name}' ({src.path})"
    if not src.name or ":" in src.name:
        raise SourceError(f"{where}: name must be non-empty and contain no ':' (ids are '<source>:<key>')")
    if src.limit is not None and src.limit < 0:
        raise SourceError(f"{where}: limit must be >= 0, got {src.limit}")
    if src.adapter != "auto" and src.adapter not in ADAPTERS:
        raise SourceError(
            f"{where}: unknown adapter '{src.adapter}'{suggest_adapter(src.adapter)}; known: {', '.join(ADAPTERS)}"
        )
    if src.format == "hub":
        files = [FileSpec(src.path, "hub", _pick_adapter(src, src.path.rsplit("/", 1)[-1], where))]
        _check_hub_reachable(where)
    else:
        files = [_file_spec(src, path, where) for path in _expand(cfg.resolve_path(src.path), src, where)]
    if any(f.adapter == "generic" for f in files):
        problem = check_generic_fields(src.fields)
        if problem:
            raise SourceError(f"{where}: {problem}")
    return ReadPlan(src.name, tuple(files), src.split, src.limit, tuple(sorted(src.fields.items())))


def _expand(path: Path, src: SourceSection, where: str) -> list[Path]:
    """A file, a saved dataset dir, a directory of data files, or a glob pattern."""
    if any(ch in str(path) for ch in "*?["):
        found = [Path(p) for p in sorted(glob.glob(str(path))) if Path(p).is_file()]
        if not found:
            raise SourceError(f"{where}: the pattern {tried(path)} matches no files")
        return [p.resolve() for p in found]
    if not path.exists():
        hint = ""
        if src.format == "auto" and src.path.count("/") == 1 and "{" not in src.path:
            hint = " (if this is a hub dataset id, set format: hub)"
        raise SourceError(f"{where}: path not found: {tried(path)}{hint}")
    if path.is_dir() and src.format != "hf_disk" and detect_format(path) != "hf_disk":
        found = sorted(p for p in path.iterdir() if p.is_file() and detect_format(p))
        if not found:
            raise SourceError(f"{where}: directory {path} holds no .jsonl/.json/.csv/.parquet(.gz) files")
        return [p.resolve() for p in found]
    return [path.resolve()]


def _file_spec(src: SourceSection, path: Path, where: str) -> FileSpec:
    why = not_data_reason(path.name)
    if why:
        raise SourceError(f"{where}: {path.name} is {why}; remove it from data.sources")
    fmt = src.format if src.format != "auto" else detect_format(path)
    if fmt is None:
        raise SourceError(f"{where}: cannot tell the format of {path.name}; set format (jsonl, json, csv, parquet...)")
    adapter = _pick_adapter(src, path.name, where)
    if fmt == "csv":
        needed = src.fields.values() if adapter == "generic" else ADAPTERS[adapter].required
        header = csv_header(path)
        missing = [c for c in needed if c not in header]
        if missing:
            raise SourceError(
                f"{where}: {path.name} line 1: CSV header lacks column(s) {missing} needed by adapter "
                f"'{adapter}' (header: {header})"
            )
    return FileSpec(str(path), fmt, adapter)


def _pick_adapter(src: SourceSection, file_name: str, where: str) -> str:
    if src.adapter != "auto":
        return src.adapter
    found = detect_adapter(file_name) or ("generic" if src.fields else None)
    if found is None:
        raise SourceError(
            f"{where}: no adapter recognises the file name {file_name!r}; set adapter to one of "
            f"{', '.join(ADAPTERS)} (or 'generic' with fields: {{prompt: <column>, ...}})"
        )
    return found


def _check_hub_reachable(where: str) -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise SourceError(
            f"{where}: format hub needs network access to huggingface.co, but HF_HUB_OFFLINE is set; "
            "point the source at a local file or a save_to_disk directory instead"
        )


# -- reading (runs inside Ray read tasks; also callable directly) ----------------


def source_rows(plan: ReadPlan, limits: Limits, rows_per_block: int = 2048) -> Iterator[dict]:
    """Rows (OUTPUT_SCHEMA dicts) of one plan in file order, at most ``plan.limit`` of them."""
    emitted = 0
    for spec in plan.files:
        adapter = ADAPTERS[spec.adapter]
        ctx = Context(plan.source, limits, dict(plan.fields), _stem(spec.path))
        items = iter_records(
            spec.path, spec.format, plan.source, split=plan.split, flatten=adapter.flatten, batch_rows=rows_per_block
        )
        for index, item in enumerate(items):
            for row in _item_rows(adapter, item, index, ctx, spec.path):
                if plan.limit is not None and emitted >= plan.limit:
                    return
                emitted += 1
                yield row


def _item_rows(adapter, item, index: int, ctx: Context, file: str) -> list[dict]:
    if item.error is not None:
        return [_error_row(item.error)]
    try:
        rows = adapter.rows(item.record, index, ctx)
    except RowError as exc:
        err = error_record(ctx.source, file, item.line, exc.field, exc.reason, item.record, reason_code(exc.reason))
        return [_error_row(err)]
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # an unexpected shape of this record
        reason = f"adapter '{adapter.name}' failed: {type(exc).__name__}: {exc}"
        return [_error_row(error_record(ctx.source, file, item.line, "record", reason, item.record, "adapter_error"))]
    for row in rows:
        row["file"], row["line"], row["error"] = file, item.line, None
    return rows


def _error_row(err: dict) -> dict:
    return {**_EMPTY_ROW, "source": err["source"], "file": err["file"], "line": err["line"], "error": json.dumps(err)}


def _stem(path: str) -> str:
    name = Path(path).name
    return name[: -len(".gz")] if name.endswith(".gz") else name.rsplit(".", 1)[0] if "." in name else name


def read_blocks(plan: ReadPlan, limits: Limits, rows_per_block: int) -> Iterator[pa.Table]:
    """The read task body: stream rows into tables of ``rows_per_block`` rows."""
    rows: list[dict] = []
    for row in source_rows(plan, limits, rows_per_block):
        rows.append(row)
        if len(rows) >= rows_per_block:
            yield pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def task_plans(plans: list[ReadPlan]) -> list[ReadPlan]:
    """One read task per file; a source with a row limit keeps its files in one task so the cap is exact."""
    out = []
    for plan in plans:
        if plan.limit is not None or len(plan.files) == 1:
            out.append(plan)
        else:
            out.extend(ReadPlan(plan.source, (f,), plan.split, None, plan.fields) for f in plan.files)
    return out


def _size(spec: FileSpec) -> int:
    path = Path(spec.path)
    if spec.format == "hub" or not path.exists():
        return 0
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size * (GZIP_EXPANSION if path.suffix == ".gz" else 1)


# -- Ray Data -------------------------------------------------------------------


def _datasource_class():
    # Imported lazily so that validation and plain reads never import Ray.
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class SourcesDatasource(Datasource):
        """Read tasks over resolved plans; each yields pyarrow tables of OUTPUT_SCHEMA."""

        def __init__(self, plans: list[ReadPlan], limits: Limits, rows_per_block: int):
            super().__init__()
            self.plans, self.limits, self.rows_per_block = task_plans(plans), limits, rows_per_block

        def get_name(self) -> str:
            return "EqrlhfSources"

        def estimate_inmemory_data_size(self) -> int | None:
            return sum(_size(f) for p in self.plans for f in p.files) or None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            tasks = []
            for plan in self.plans:  # one task per file: ``parallelism`` cannot split a JSONL stream
                meta = BlockMetadata(
                    num_rows=None,
                    size_bytes=sum(_size(f) for f in plan.files) or None,
                    input_files=[f.path for f in plan.files],
                    exec_stats=None,
                )
                read = functools.partial(read_blocks, plan, self.limits, self.rows_per_block)
                tasks.append(ReadTask(read, meta, schema=OUTPUT_SCHEMA, per_task_row_limit=per_task_row_limit))
            return tasks

    return SourcesDatasource


def limits_of(cfg: Config) -> Limits:
    return Limits(max_prompt_chars=cfg.data.max_prompt_chars, max_response_chars=cfg.data.max_response_chars)


def read_sources(cfg: Config, plans: list[ReadPlan] | None = None, rows_per_block: int | None = None):
    """A ``ray.data.Dataset`` of every configured source (ROW_SCHEMA + ``error``), in config order, in
    blocks of ``rows_per_block`` rows (default ``data.rows_per_block``)."""
    import ray.data

    plans = plans if plans is not None else validate_sources(cfg)
    datasource = _datasource_class()(plans, limits_of(cfg), rows_per_block or cfg.data.rows_per_block)
    return ray.data.read_datasource(datasource)
