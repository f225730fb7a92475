"""Training data: which columns a loss needs, checks before Ray starts, the step -> rows mapping, collation.

Why not Ray Data streaming here: an exactly resumable run needs "optimizer step s reads rows R(s)" to be a
pure function of (seed, s), so a restart from a checkpoint at step s reads exactly what an uninterrupted run
would, and 1 worker x 2 accumulation steps reads the same global batches as 2 workers x 1. A streaming split
gives no such guarantee (block order depends on task timing) and cannot seek to a position. The pair table
is small (tens of thousands of rows), so every worker loads it and takes its slice of each global batch.

Global batch of step s: epoch e = s // steps_per_epoch, rows ``permutation(seed, e)[k*G:(k+1)*G]`` with
k = s % steps_per_epoch and G = micro_batch_size * grad_accum * num_workers. Worker r takes
``[r*m*a:(r+1)*m*a]`` of those (m = micro batch, a = accumulation) and splits it into a micro-batches. The
``n % G`` rows left at the end of each epoch's permutation are not used in that epoch (they differ per epoch);
the manifest reports the count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch

from eqrlhf.algorithms.catalog import loss_info, response_sides
from eqrlhf.data.tokenize import encode_pair
from eqrlhf.errors import InputError
from eqrlhf.manifest import in_id_order, read_manifest, rows_path

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
MAX_LISTED_ERRORS = 5


class TrainInputError(InputError):
    """Training input that cannot be used; the message names the directory, row and field."""


def required_columns(loss: str, ama: bool, precomputed_reference: bool) -> list[str]:
    """Columns the input table must have (text columns are always needed as a fallback for tokenizing)."""
    sides = response_sides(loss)
    cols = ["id", "prompt", "history", *sides]
    if loss_info(loss).safety_labels:
        cols += ["chosen_safe", "rejected_safe"]
    if ama:
        cols += ["prompt_ids", *(f"{s}_ids" for s in sides), *(f"{s}_scores" for s in sides)]
    if precomputed_reference:
        cols += ["prompt_ids", *(f"{s}_ids" for s in sides), *(f"ref_{s}_logps" for s in sides)]
    return list(dict.fromkeys(cols))


def _parquet_files(input_dir: Path) -> list[Path]:
    return sorted(rows_path(input_dir).glob("*.parquet"))


def input_columns(input_dir: Path) -> list[str]:
    read_manifest(input_dir)  # a clear "run the previous stage first" when the stage never ran
    files = _parquet_files(input_dir)
    if not files:
        raise TrainInputError(f"training input {input_dir} has a manifest but no rows")
    return pads.dataset([str(f) for f in files], format="parquet").schema.names


def read_columns(input_dir: Path, columns: list[str]) -> pa.Table:
    """The rows in id order (:func:`eqrlhf.manifest.in_id_order`): the step -> rows mapping permutes row
    positions, so the same rows must sit in the same places in every run."""
    files = [str(f) for f in _parquet_files(input_dir)]
    return in_id_order(pads.dataset(files, format="parquet").to_table(columns=columns))


def _where(table: pa.Table, i: int) -> str:
    row = {c: table.column(c)[i].as_py() for c in ("id", "file", "line") if c in table.column_names}
    place = f"row id={row.get('id')!r}"
    if row.get("file"):
        place += f" (source {row['file']}, line {row.get('line')})"
    return place


def _bad_rows(condition: pa.ChunkedArray) -> list[int]:
    return np.flatnonzero(condition.fill_null(True).to_numpy(zero_copy_only=False)).tolist()


def check_input_table(input_dir: Path, loss: str, ama: bool, precomputed_reference: bool) -> int:
    """Validate the training table before any cluster resource is taken; return its row count.

    Every problem is an error naming the directory, the row (id, source file and line) and the field:
    a training run never drops rows silently.
    """
    columns = input_columns(input_dir)
    need = required_columns(loss, ama, precomputed_reference)
    missing = [c for c in need if c not in columns]
    if missing:
        why = []
        if ama and any(c.endswith("_scores") or c.endswith("_ids") for c in missing):
            why.append(f"loss '{loss}' uses AMA: run the scoring stage (`eqrlhf score`) with AMA enabled first")
        if precomputed_reference and any(c.startswith("ref_") for c in missing):
            why.append("algorithm.reference=precomputed: run the scoring stage to precompute reference log-probs")
        raise TrainInputError(
            f"training input {input_dir} lacks column(s) {missing} needed by loss '{loss}'"
            + ("; " + "; ".join(why) if why else "")
        )
    extra = [c for c in ("file", "line", *TOKEN_COLUMNS) if c in columns and c not in need]
    table = read_columns(input_dir, need + extra)
    if table.num_rows == 0:
        raise TrainInputError(f"training input {input_dir} has no rows")
    tokenized = all(c in table.column_names for c in TOKEN_COLUMNS)
    problems: list[str] = []
    sides = response_sides(loss)
    for side in sides:
        if tokenized:
            bad = _bad_rows(pc.less(pc.list_value_length(table.column(f"{side}_ids")), 1))
            problems += [f"{_where(table, i)}: field '{side}_ids' is empty" for i in bad]
        else:
            bad = _bad_rows(pc.less(pc.utf8_length(table.column(side)), 1))
            problems += [f"{_where(table, i)}: field '{side}' is missing or empty" for i in bad]
    if loss_info(loss).safety_labels:
        for field in ("chosen_safe", "rejected_safe"):
            bad = _bad_rows(pc.is_null(table.column(field)))
            problems += [
                f"{_where(table, i)}: field '{field}' is null (loss '{loss}' needs safety labels)" for i in bad
            ]
    for prefix, suffix, wanted in (("", "_scores", ama), ("ref_", "_logps", precomputed_reference)):
        if not wanted:
            continue
        for side in sides:
            field = f"{prefix}{side}{suffix}"
            values = pc.list_value_length(table.column(field))
            tokens = pc.list_value_length(table.column(f"{side}_ids"))
            for i in _bad_rows(pc.not_equal(values, tokens)):
                problems.append(
                    f"{_where(table, i)}: field '{field}' has {values[i].as_py()} values "
                    f"for {tokens[i].as_py()} tokens in '{side}_ids'"
                )
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED_ERRORS])
        more = f"\n  ... and {len(problems) - MAX_LISTED_ERRORS} more" if len(problems) > MAX_LISTED_ERRORS else ""
        raise TrainInputError(f"training input {input_dir}: {len(problems)} bad row(s):\n  {listed}{more}")
    return table.num_rows


# ---- rows as token ids ------------------------------------------------------------------------------------


class PairSource:
    """Random access to training examples (token ids, scores, labels), tokenizing lazily where needed.

    A worker only touches the rows of its own slices, so lazy tokenization costs each worker 1/num_workers
    of the table per epoch; results are cached for later epochs.
    """

    def __init__(self, table: pa.Table, tokenizer, max_length: int, loss: str):
        self.table = table
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.sides = response_sides(loss)
        self.tokenized = all(c in table.column_names for c in TOKEN_COLUMNS)
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.table.num_rows

    def _value(self, column: str, i: int):
        return self.table.column(column)[i].as_py() if column in self.table.column_names else None

    def get(self, i: int) -> dict:
        if i not in self._cache:
            self._cache[i] = self._build(i)
        return self._cache[i]

    def _build(self, i: int) -> dict:
        if self.tokenized:
            ids = {c: self._value(c, i) for c in TOKEN_COLUMNS}
            truncated = bool(self._value("truncated", i))
        else:
            row = {c: self._value(c, i) for c in ("prompt", "history", "chosen", "rejected")}
            # sft rows need no rejected response; an empty one costs a single EOS token and cuts nothing
            row["rejected"] = row["rejected"] or ""
            ids = encode_pair(self.tokenizer, row, self.max_length)
            truncated = ids["truncated"]
        example = {"prompt": ids["prompt_ids"], "truncated": truncated}
        for side in self.sides:
            example[side] = ids[f"{side}_ids"]
            example[f"{side}_scores"] = self._value(f"{side}_scores", i)
            example[f"ref_{side}_logps"] = self._value(f"ref_{side}_logps", i)
        example["chosen_safe"] = self._value("chosen_safe", i)
        example["rejected_safe"] = self._value("rejected_safe", i)
        return example


# ---- which rows each step reads ---------------------------------------------------------------------------


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    return num_rows // global_batch


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def step_position(step: int, per_epoch: int) -> tuple[int, int]:
    """(epoch, step within the epoch) of 0-based global step ``step``."""
    return divmod(step, per_epoch)


def step_rows(step: int, num_rows: int, seed: int, global_batch: int) -> np.ndarray:
    """Row indices of the whole global batch of step ``step``."""
    epoch, k = step_position(step, steps_per_epoch(num_rows, global_batch))
    return epoch_permutation(num_rows, seed, epoch)[k * global_batch : (k + 1) * global_batch]


def worker_micro_batches(rows: np.ndarray, rank: int, micro: int, accum: int) -> list[np.ndarray]:
    """This worker's share of a global batch, as ``accum`` micro-batches of ``micro`` rows."""
    share = rows[rank * micro * accum : (rank + 1) * micro * accum]
    return [share[j * micro : (j + 1) * micro] for j in range(accum)]


# ---- collation --------------------------------------------------------------------------------------------


def collate_sequences(
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    per_token: dict[str, list[list[float] | None]] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response rows, with 0/1 masks and per-response-token values placed in position.

    ``response_mask[b, p]`` is 1 where token p is a response token; ``per_token[name][b][t]`` (one value per
    response token) lands at the position of response token t, 0 elsewhere.
    """
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    rows, width = len(prompts), max(lengths)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    response = torch.zeros((rows, width), dtype=torch.float32)
    values = {name: torch.zeros((rows, width), dtype=torch.float32) for name in per_token or {}}
    for b, (prompt, resp) in enumerate(zip(prompts, responses)):
        start, end = len(prompt), len(prompt) + len(resp)
        input_ids[b, :end] = torch.tensor(prompt + resp, dtype=torch.long)
        attention[b, :end] = 1
        response[b, start:end] = 1.0
        for name, lists in (per_token or {}).items():
            if lists[b] is not None:
                values[name][b, start:end] = torch.tensor(lists[b], dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention, "response_mask": response, **values}


def collate(examples: list[dict], pad_id: int, loss: str) -> dict[str, torch.Tensor]:
    """One micro-batch. Preference and scalar losses stack chosen rows then rejected rows (2B rows, one
    forward pass for both); sft uses the chosen rows only. ``token_scores`` / ``ref_token_logps`` appear when
    the examples carry them; ``chosen_safe`` / ``rejected_safe`` ([B] bool) when every example has them.
    """
    sides = response_sides(loss)
    prompts = [ex["prompt"] for _ in sides for ex in examples]
    responses = [ex[side] for side in sides for ex in examples]
    per_token = {}
    for name, key in (("token_scores", "{}_scores"), ("ref_token_logps", "ref_{}_logps")):
        lists = [ex[key.format(side)] for side in sides for ex in examples]
        if all(v is not None for v in lists):
            per_token[name] = lists
    batch = collate_sequences(prompts, responses, pad_id, per_token)
    batch["is_chosen"] = torch.tensor([side == "chosen" for side in sides for _ in examples])
    for field in ("chosen_safe", "rejected_safe"):
        if all(ex[field] is not None for ex in examples):
            batch[field] = torch.tensor([bool(ex[field]) for ex in examples])
    batch["truncated_fraction"] = torch.tensor(sum(ex["truncated"] for ex in examples) / len(examples))
    return batch
