"""docs/your-data.md: both example configs run categorize -> mix -> pairs on their example files (no model),
and the counts the guide quotes are the counts the stages write."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from eqrlhf.config import load_config
from eqrlhf.manifest import read_rows

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "docs" / "examples"

CASES = {
    "your_csv.yaml": {
        "file": "forum_posts.csv",
        "categorize": {
            "rows_read": 8,
            "rows_written": 8,  # duplicates are kept (and marked) by categorize
            "per_category": {"EHD": 2, "IHD": 2, "MHD": 1, "none": 3},
            "filtered": {},
            "failed": {},
            "duplicates": 1,
            "unparsed_rows": 0,
        },
        "mix": {
            "rows_read": 8,
            "rows_written": 7,
            "per_category": {"EHD": 2, "IHD": 2, "MHD": 1, "none": 2},
            "filtered": {"duplicate": 1},
            "failed": {},
        },
        "pairs": {
            "rows_read": 7,
            "rows_written": 5,
            "per_category": {"EHD": 1, "IHD": 2, "none": 2},
            "filtered": {"no pair": 2},
            "failed": {},
        },
        "dup_of": {"forum:c08": "forum:c06"},
        "unparsed": [],
        # (chosen_safe, rejected_safe) of the pairs: none of them carries source labels, so the category decides
        "flags": {
            "forum:c01": (True, False),
            "forum:c03": (True, False),
            "forum:c05": (True, False),
            "forum:c06": (True, True),
            "forum:c07": (True, True),
        },
    },
    "your_jsonl.yaml": {
        "file": "chat_logs.jsonl",
        "categorize": {
            "rows_read": 8,
            "rows_written": 7,
            "per_category": {"EHD": 2, "IHD": 1, "MHD": 1, "none": 3},
            "filtered": {},
            "failed": {},
            "duplicates": 0,
            "unparsed_rows": 1,
            "unparsed_by_kind": {"unmapped label": 1},
        },
        "mix": {
            "rows_read": 7,
            "rows_written": 7,
            "per_category": {"EHD": 2, "IHD": 1, "MHD": 1, "none": 3},
            "filtered": {},
            "failed": {},
        },
        "pairs": {
            "rows_read": 7,
            "rows_written": 5,
            "per_category": {"EHD": 1, "IHD": 1, "MHD": 1, "none": 2},
            "filtered": {"no pair": 2},
            "failed": {},
        },
        "dup_of": {},
        "unparsed": ["chat:j8"],
        # j1's labels come from the file (its rejected answer is evasive, not harmful); the others from the category
        "flags": {
            "chat:j1": (True, True),
            "chat:j3": (True, False),
            "chat:j4": (True, False),
            "chat:j5": (True, True),
            "chat:j7": (True, True),
        },
    },
}


def records_in(path: Path) -> int:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            return sum(1 for _ in csv.DictReader(fh))
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def has_pair(row: dict) -> bool:
    return all((row.get(side) or "").strip() for side in ("chosen", "rejected"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_config_runs_the_data_stages_with_the_documented_counts(name, tmp_path, ray_local, monkeypatch):
    from eqrlhf.data.categorize_stage import run_categorize
    from eqrlhf.data.mix import run_mix
    from eqrlhf.data.pairs import run_pairs

    case = CASES[name]
    monkeypatch.chdir(REPO)  # the example configs name their files relative to the repository root
    cfg = load_config(EXAMPLES / name, [f"run.output_dir={tmp_path}"])
    assert cfg.run.stages == ["categorize", "mix", "pairs"] and cfg.pairs.missing == "skip"

    manifests = {"categorize": run_categorize(cfg), "mix": run_mix(cfg), "pairs": run_pairs(cfg)}
    for stage, folder in (("categorize", "categorized"), ("mix", "mixture"), ("pairs", "pairs")):
        got, expected = manifests[stage], case[stage]
        assert {key: got[key] for key in expected} == expected, stage
        assert json.loads((cfg.run.dir / folder / "manifest.json").read_text()) == got, stage

    # what the counts rest on: every record of the file is read, and exactly the mixed rows with both answers pass
    assert manifests["categorize"]["rows_read"] == records_in(EXAMPLES / case["file"])
    mixture = read_rows(cfg.run.dir / "mixture").to_pylist()
    assert manifests["pairs"]["rows_written"] == sum(has_pair(r) for r in mixture)
    assert manifests["pairs"]["pairs"]["passthrough"] == manifests["pairs"]["rows_written"]
    assert manifests["pairs"]["pairs"]["missing"] == manifests["pairs"]["filtered"]["no pair"]
    assert manifests["pairs"]["pairs"]["generator"] is None  # skip: no model was needed

    categorized = read_rows(cfg.run.dir / "categorized").to_pylist()
    assert {r["id"]: r["dup_of"] for r in categorized if r["dup_of"]} == case["dup_of"]
    unparsed = cfg.run.dir / "categorized" / "unparsed.jsonl"
    routed = [json.loads(line)["id"] for line in unparsed.read_text().splitlines()] if unparsed.is_file() else []
    assert routed == case["unparsed"]

    pairs = read_rows(cfg.run.dir / "pairs").to_pylist()
    assert {r["id"]: (r["chosen_safe"], r["rejected_safe"]) for r in pairs} == case["flags"]
