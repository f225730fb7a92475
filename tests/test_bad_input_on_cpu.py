"""Broken input: every bad record becomes an error naming file, line and field; bad config fails before Ray."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from eqrlhf.config import from_dict
from eqrlhf.data.readers import SourceError, format_error
from eqrlhf.data.sources import limits_of, source_rows, validate_sources
from eqrlhf.manifest import ERRORS, MANIFEST, ErrorBudgetExceeded

BAD = Path(__file__).parent / "fixtures" / "bad"
JSONL_FIELDS = {"id": "uid", "prompt": "prompt", "chosen": "response", "label": "label", "harmful": "harmful"}
CSV_FIELDS = {"id": "id", "prompt": "prompt", "label": "label"}

# (line, field, reason_code) of every bad record in fixtures/bad/broken.jsonl, written by hand
JSONL_ERRORS = [
    (2, "record", "malformed_json"),
    (3, "prompt", "missing_field"),
    (4, "prompt", "wrong_type"),
    (5, "prompt", "empty_text"),
    (6, "record", "encoding"),
    (7, "prompt", "too_long"),  # 322 chars with max_prompt_chars=200
    (10, "harmful", "wrong_type"),
    (11, "record", "wrong_type"),
]
CSV_ERRORS = [(3, "label", "missing_column"), (6, "prompt", "encoding")]


def config(tmp_path: Path | None = None, *sources: dict, **data) -> object:
    tree = {"data": {"data_root": str(BAD), "max_prompt_chars": 200, "sources": list(sources), **data}}
    if tmp_path is not None:
        tree["run"] = {"output_dir": str(tmp_path), "name": "bad"}
    return from_dict(tree)


JSONL = {"name": "j", "path": "{data_root}/broken.jsonl", "adapter": "generic", "fields": JSONL_FIELDS}
CSV = {"name": "c", "path": "{data_root}/broken.csv", "fields": CSV_FIELDS}  # auto -> generic via fields


def read_all(cfg) -> tuple[list[dict], list[dict]]:
    rows = [r for plan in validate_sources(cfg) for r in source_rows(plan, limits_of(cfg))]
    return [r for r in rows if r["error"] is None], [json.loads(r["error"]) for r in rows if r["error"]]


def test_broken_jsonl_reports_each_line_and_field():
    rows, errors = read_all(config(None, JSONL))
    assert [r["id"] for r in rows] == ["j:a1", "j:a9", "j:a12", "j:a12"]  # the stage rejects the repeat
    assert [(e["line"], e["field"], e["reason_code"]) for e in errors] == JSONL_ERRORS
    assert all(e["file"] == str(BAD.resolve() / "broken.jsonl") and e["source"] == "j" for e in errors)
    reasons = {e["line"]: e["reason"] for e in errors}
    assert reasons[3] == "missing field"
    assert reasons[4] == "expected text, got int"
    assert reasons[6] == "not valid UTF-8 at byte offset 28 of the line (b'\\xe9 au')"
    assert reasons[7] == "322 chars exceeds max_prompt_chars=200"
    assert reasons[10] == "expected a boolean, got 'maybe'"
    assert reasons[11] == "expected a JSON object per line, got list"
    assert errors[0]["raw"] == '{"uid": "a2", "prompt": "unterminated\n'
    assert format_error(errors[1]) == f"{BAD.resolve() / 'broken.jsonl'}:3: [j] field 'prompt': missing field"


def test_broken_csv_reports_record_start_lines():
    rows, errors = read_all(config(None, CSV))
    assert [(r["id"], r["line"]) for r in rows] == [("c:c1", 2), ("c:c3", 4), ("c:c5", 7)]
    assert rows[1]["prompt"] == "A prompt over\ntwo lines, with a comma"  # quoted multi-line field
    assert [(e["line"], e["field"], e["reason_code"]) for e in errors] == CSV_ERRORS
    assert errors[0]["reason"] == "row has 2 fields, header has 3: missing column(s) 'label'"


def test_malformed_json_array_keeps_earlier_elements_and_names_the_line():
    src = {"name": "a", "path": "{data_root}/broken_array.json", "adapter": "stl_instructions"}
    rows, errors = read_all(config(None, src))
    assert [(r["id"], r["line"]) for r in rows] == [("a:0", 2), ("a:1", 3)]
    assert [(e["line"], e["field"], e["reason_code"]) for e in errors] == [(5, "record", "malformed_json")]
    assert "the rest of the array is not read" in errors[0]["reason"]


def test_truncated_gzip_is_an_error_not_a_crash(tmp_path):
    data = gzip.compress(b"".join(b'{"instruction": "Question %d?"}\n' % i for i in range(2000)))
    (tmp_path / "alpaca_data.jsonl.gz").write_bytes(data[: len(data) // 2])
    cfg = from_dict({"data": {"data_root": str(tmp_path), "sources": [{"name": "t", "path": "{data_root}/*.gz"}]}})
    rows, errors = read_all(cfg)
    assert len(rows) > 0 and len(errors) == 1
    assert errors[0]["reason_code"] == "unreadable" and errors[0]["line"] == len(rows) + 1
    assert errors[0]["reason"].startswith(f"file unreadable after line {len(rows)}: EOFError")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            {"name": "x", "path": "{data_root}/missing.jsonl"},
            r"source 'x' \(\{data_root\}/missing.jsonl\): path not found",
        ),
        (
            {"name": "x", "path": "{data_root}/broken.csv", "adapter": "xstets"},
            r"unknown adapter 'xstets' \(did you mean 'xstest'\?\)",
        ),
        (
            {"name": "x", "path": "{data_root}/no_label_column.csv", "adapter": "xstest"},
            r"no_label_column.csv line 1: CSV header lacks column\(s\) \['type', 'label'\] needed by adapter 'xstest'",
        ),
        ({"name": "x", "path": "{data_root}/broken.jsonl"}, r"no adapter recognises the file name 'broken.jsonl'"),
        (
            {"name": "x", "path": "{data_root}/broken.jsonl", "adapter": "generic", "fields": {"question": "q"}},
            r"unknown field\(s\) \['question'\]",
        ),
        (
            {"name": "x", "path": "walledai/XSTest"},
            r"path not found: .*walledai/XSTest .*\(if this is a hub dataset id",
        ),
        ({"name": "x", "path": "walledai/XSTest", "format": "hub", "adapter": "xstest"}, r"HF_HUB_OFFLINE is set"),
        ({"name": "a:b", "path": "{data_root}/broken.csv", "fields": CSV_FIELDS}, r"contain no ':'"),
    ],
)
def test_bad_source_config_fails_before_reading(source, message, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match=message):
        validate_sources(config(None, source))


def test_all_source_problems_are_listed_at_once():
    cfg = config(None, {"name": "a", "path": "{data_root}/nope.csv"}, {"name": "a", "path": "{data_root}/nope2.csv"})
    with pytest.raises(SourceError) as info:
        validate_sources(cfg)
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid data.sources:" and len(lines) == 4
    assert "the name is used twice" in lines[2]


def test_no_sources_is_an_error():
    with pytest.raises(SourceError, match="data.sources is empty"):
        validate_sources(config(None))


# -- through the stage (Ray) ----------------------------------------------------


def test_categorize_writes_errors_with_counts(tmp_path, ray_local):
    from eqrlhf.data.categorize_stage import run_categorize

    cfg = config(tmp_path, JSONL, CSV, error_budget=1.0)
    cfg.categorize.label_map = {"benign": "none"}
    manifest = run_categorize(cfg)
    assert manifest["rows_read"] == 17 and manifest["rows_written"] == 6
    assert manifest["failed"] == {
        "encoding": 2,
        "empty_text": 1,
        "malformed_json": 1,
        "missing_column": 1,
        "missing_field": 1,
        "repeated_id": 1,
        "too_long": 1,
        "wrong_type": 3,
    }
    assert manifest["per_category"] == {"EHD": 1, "none": 5}  # a12 is harmful=true -> harmful_category EHD
    assert manifest["duplicates"] == 2  # a9 and c5 repeat a1 ("How do I bake bread?") after normalising
    assert manifest["duplicates_by_source"] == {"j <- c": 1, "j <- j": 1}
    out = tmp_path / "bad" / "categorized"
    errors = [json.loads(line) for line in (out / ERRORS).read_text().splitlines()]
    repeated = ("broken.jsonl", 13, "id", "repeated_id")
    expected = sorted(
        [("broken.jsonl", *e) for e in JSONL_ERRORS] + [("broken.csv", *e) for e in CSV_ERRORS] + [repeated]
    )
    assert sorted((Path(e["file"]).name, e["line"], e["field"], e["reason_code"]) for e in errors) == expected
    assert next(e["reason"] for e in errors if e["line"] == 13) == "repeated id 'j:a12'"


def test_error_budget_fails_the_stage_after_writing_errors(tmp_path, ray_local):
    from eqrlhf.data.categorize_stage import run_categorize

    cfg = config(tmp_path, JSONL, CSV, error_budget=0.5)
    cfg.categorize.label_map = {"benign": "none"}
    out = tmp_path / "bad" / "categorized"
    with pytest.raises(ErrorBudgetExceeded, match=r"11 of 17 rows failed \(64.7%, error budget 50.0%\); see .*raise"):
        run_categorize(cfg)
    failed = out.with_name("categorized.failed")  # the attempt is kept beside the output, for inspection
    assert len((failed / ERRORS).read_text().splitlines()) == 11
    assert not (out / MANIFEST).exists()  # a failed stage leaves nothing a later stage would read as done
    assert not (failed / MANIFEST).exists() and not list(out.parent.glob("categorized.tmp-*"))


def _own_files(tmp_path: Path) -> tuple[Path, Path]:
    """A new user's CSV whose labels the config does not map, and a JSONL whose prompt column is misspelled."""
    csv_file = tmp_path / "mine.csv"
    csv_file.write_text("id,prompt,label\n" + "".join(f"{k},question number {k},benignish\n" for k in range(40)))
    jsonl_file = tmp_path / "mine.jsonl"
    jsonl_file.write_text("".join(json.dumps({"id": k, "promt": f"question {k}"}) + "\n" for k in range(40)))
    return csv_file, jsonl_file


def test_a_stage_that_writes_nothing_fails_naming_the_reason(tmp_path, ray_local, capsys):
    from eqrlhf.cli import main

    csv_file, _ = _own_files(tmp_path)
    args = [
        "categorize",
        f"run.output_dir={tmp_path}",
        "run.name=mine",
        "data.sources=[{name: mine, path: PATH, fields: {id: id, prompt: prompt, label: label}}]",
    ]
    args[-1] = args[-1].replace("PATH", str(csv_file))
    assert main([*args, "categorize.harmful_category=null"]) == 2
    err = capsys.readouterr().err
    assert "categorize: wrote 0 of 40 rows; 40 of 40: unmapped label" in err, err
    assert "set categorize.label_map or categorize.default_category" in err
    assert not (tmp_path / "mine" / "categorized" / MANIFEST).exists()
    # the next stage then says the previous one did not finish, not "set mix.with_replacement"
    assert main(["mix", f"run.output_dir={tmp_path}", "run.name=mine", "mix.counts={EHD: 1}"]) == 2
    assert "run the previous stage first" in capsys.readouterr().err


def test_a_column_every_row_lacks_points_at_the_fields_mapping(tmp_path, ray_local, capsys):
    from eqrlhf.cli import main

    _, jsonl_file = _own_files(tmp_path)
    source = f"data.sources=[{{name: mine, path: {jsonl_file}, fields: {{id: id, prompt: prompt}}}}]"
    assert main(["categorize", f"run.output_dir={tmp_path}", "run.name=mine", source]) == 2
    err = capsys.readouterr().err
    assert "40 of 40 rows failed" in err and "every one lacks field 'prompt' in source 'mine'" in err, err
    assert "data.sources[].fields" in err and "raise data.error_budget" not in err
