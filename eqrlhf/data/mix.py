"""The mixture builder: how many rows of each risk category go into training (FDC).

Asked counts come from the config, either absolute (``mix.counts``) or as shares of a
safety budget (``mix.ratios`` x ``mix.safety_scale``), plus general (category ``none``)
rows in proportion to the safety rows (``mix.general_ratio``). Which rows are taken is
decided by a keyed hash: per category, the k rows with the smallest ``hash(seed, id)``.
That choice is the same whatever order the corpus arrives in, changes with ``run.seed``,
and needs one pass with a bounded heap per category, so memory is O(selected) rows.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from eqrlhf.config import CATEGORIES, ConfigError
from eqrlhf.data.schema import ROW_SCHEMA
from eqrlhf.manifest import StageWriter, rows_path

SAFETY = ("EHD", "IHD", "MHD")
REPEAT_MARK = "#r"  # with_repeats gives copy K of a row the id "<id>#rK"; held_out_ids strips it again
REPEAT_SUFFIX = re.compile(re.escape(REPEAT_MARK) + r"\d+$")


def validate_mix(cfg) -> dict[str, int]:
    """Check ``cfg.mix`` and return the number of rows asked per category (no I/O, no Ray)."""
    mix = cfg.mix  # category names and signs are checked by the schema at load
    both = sorted(set(mix.counts) & set(mix.ratios))
    if both:
        raise ConfigError(f"category {both[0]} is in both mix.counts and mix.ratios; give it in one only")
    if "none" in mix.ratios:
        raise ConfigError("mix.ratios.none: ratios share the safety budget; size general rows with mix.general_ratio")
    if mix.general_ratio and "none" in mix.counts:
        raise ConfigError("both mix.counts.none and mix.general_ratio are given; use one of them")
    asked = dict(mix.counts)
    if mix.ratios:
        if mix.safety_scale is None:
            raise ConfigError("mix.safety_scale: required (>= 0) when mix.ratios is given")
        total = sum(mix.ratios.values())
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ConfigError(f"mix.ratios: shares of mix.safety_scale must sum to 1, got {total:g}")
        asked.update(shares_to_counts(mix.ratios, mix.safety_scale))
    elif mix.safety_scale is not None:
        raise ConfigError("mix.safety_scale: only used with mix.ratios, which is empty")
    if mix.general_ratio:
        asked["none"] = round(mix.general_ratio * sum(asked.get(cat, 0) for cat in SAFETY))
    if sum(asked.values()) == 0:
        raise ConfigError("the mix asks for no rows; set mix.counts, or mix.ratios with mix.safety_scale")
    return {cat: asked[cat] for cat in CATEGORIES if cat in asked}


def shares_to_counts(shares: dict[str, float], total: int) -> dict[str, int]:
    """Largest-remainder rounding, so the counts sum exactly to ``total``."""
    exact = {cat: share * total for cat, share in shares.items()}
    counts = {cat: math.floor(x) for cat, x in exact.items()}
    by_remainder = sorted(exact, key=lambda cat: (-(exact[cat] - counts[cat]), cat))
    for cat in by_remainder[: total - sum(counts.values())]:
        counts[cat] += 1
    return counts


def sample_key(seed: int, row_id: str) -> int:
    """A stable pseudo-random rank for a row (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(f"{seed}\x00{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class BottomK:
    """The k rows with the smallest keys seen so far; holds at most k rows at any time.

    Keys are 64-bit hashes of unique ids, so ties do not occur in practice; the insertion
    counter only keeps heapq from ever comparing two row dicts.
    """

    def __init__(self, k: int):
        self.k = k
        self._heap: list[tuple[int, int, dict]] = []  # (-key, insertion no., row): a max-heap on key
        self._pushed = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, key: int, row: dict) -> None:
        self._pushed += 1
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, (-key, self._pushed, row))
        elif self.k and -key > self._heap[0][0]:
            heapq.heapreplace(self._heap, (-key, self._pushed, row))

    def sorted_rows(self) -> list[dict]:
        """Kept rows by ascending key."""
        return [row for _, _, row in sorted(self._heap, key=lambda item: (-item[0], item[1]))]


def iter_stage_rows(stage_dir: Path, batch_rows: int, columns: list[str] | None = None):
    """Stream rows (or only ``columns`` of them) of a stage output shard by shard (never the whole corpus in memory)."""
    for shard in sorted(rows_path(stage_dir).glob("*.parquet")):
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=batch_rows, columns=columns):
            yield from batch.to_pylist()


def held_out_ids(cfg) -> set[str]:
    """Row ids of the stage dirs in ``mix.exclude``; a repeated row's copy suffix (``#rK``) is dropped."""
    ids: set[str] = set()
    for stage in cfg.mix.exclude:  # only the id column is read: an excluded stage can be a large corpus
        for row in iter_stage_rows(cfg.resolve_path(stage), cfg.data.rows_per_block, columns=["id"]):
            ids.add(REPEAT_SUFFIX.sub("", row["id"]))
    return ids


def with_repeats(rows: list[dict], asked: int) -> tuple[list[dict], int]:
    """Cycle through ``rows`` (in key order) until ``asked``; copy K of a row gets id suffix ``#rK``."""
    out = list(rows)
    for extra in range(asked - len(rows)):
        row = dict(rows[extra % len(rows)])
        row["id"] = f"{row['id']}{REPEAT_MARK}{extra // len(rows) + 1}"
        out.append(row)
    return out, asked - len(rows)


def run_mix(cfg) -> dict:
    """Select the mixture from the categorized stage; write ``<run>/mixture``; return its manifest."""
    asked = validate_mix(cfg)
    seed, mix = cfg.run.seed, cfg.mix
    in_dir = cfg.stage_dir(mix.input, "categorized")
    picks = {cat: BottomK(k) for cat, k in asked.items()}
    held_out = held_out_ids(cfg)
    available = dict.fromkeys(CATEGORIES, 0)
    read, skipped = 0, {"duplicate": 0, "uncategorized": 0, "held out": 0}
    for row in iter_stage_rows(in_dir, cfg.data.rows_per_block):
        read += 1
        cat = row.get("category")
        if cat not in available:
            skipped["uncategorized"] += 1
            continue
        if row["id"] in held_out:
            skipped["held out"] += 1
            continue
        if mix.exclude_duplicates and row.get("dup_of"):
            skipped["duplicate"] += 1
            continue
        available[cat] += 1
        if cat in picks:
            picks[cat].push(sample_key(seed, row["id"]), row)

    shortfall = [cat for cat, k in asked.items() if available[cat] < k]
    for cat in shortfall:
        if not mix.with_replacement or available[cat] == 0:
            hint = "" if mix.with_replacement else " (set mix.with_replacement=true to repeat rows)"
            raise ConfigError(
                f"category {cat} asks for {asked[cat]} rows but only {available[cat]} are available in {in_dir}{hint}"
            )

    selected, report = [], {}
    for cat, k in asked.items():
        rows, repeated = with_repeats(picks[cat].sorted_rows(), k) if k else ([], 0)
        selected.extend(rows)
        report[cat] = {"asked": k, "available": available[cat], "selected": len(rows), "repeated": repeated}
    for cat in CATEGORIES:
        report.setdefault(cat, {"asked": 0, "available": available[cat], "selected": 0, "repeated": 0})
    # Categories interleave in key order, so a prefix of the mixture is itself a fair sample.
    selected.sort(key=lambda row: (sample_key(seed, row["id"]), row["id"]))

    with StageWriter(cfg.stage_dir(mix.output, "mixture"), "mix", cfg.hash()) as writer:
        writer.count_read(read)
        for reason, n in skipped.items():
            if n:
                writer.filter(reason, n)
        not_sampled = sum(available.values()) - sum(r["selected"] - r["repeated"] for r in report.values())
        if not_sampled:
            writer.filter("not sampled", not_sampled)
        for start in range(0, len(selected), cfg.data.rows_per_block):
            writer.write_rows(
                pa.Table.from_pylist(selected[start : start + cfg.data.rows_per_block], schema=ROW_SCHEMA)
            )
        manifest = writer.close(
            mix={
                "seed": seed,
                "with_replacement": mix.with_replacement,
                "rows_repeated": sum(r["repeated"] for r in report.values()),
                "exclude_duplicates": mix.exclude_duplicates,
                "held_out_from": list(mix.exclude),
                "categories": report,
            }
        )
    print(
        f"mix: read {read}, selected {len(selected)} "
        + " ".join(f"{c}={r['selected']}/{r['available']}" for c, r in report.items())
        + f" -> {writer.dir}"
    )
    return manifest
