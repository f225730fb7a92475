"""The mixture builder: exact counts, order- and seed-determinism, shortfalls, repeats, duplicates, memory."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest

from eqrlhf.config import ConfigError, from_dict
from eqrlhf.data.mix import BottomK, run_mix, sample_key, shares_to_counts, validate_mix
from eqrlhf.data.schema import ROW_SCHEMA, Limits, make_row
from eqrlhf.manifest import StageWriter, read_rows

# 40 EHD (5 of them duplicates), 20 IHD, 10 MHD, 60 none, 3 uncategorized
AVAILABLE = {"EHD": 35, "IHD": 20, "MHD": 10, "none": 60}


def corpus() -> list[dict]:
    rows = []
    for cat, n in (("EHD", 40), ("IHD", 20), ("MHD", 10), ("none", 60), (None, 3)):
        for i in range(n):
            row = make_row(source="t", key=f"{cat}-{i}", prompt=f"prompt {cat} {i}", limits=Limits(), category=cat)
            if cat == "EHD" and i >= 35:
                row["dup_of"] = f"t:EHD-{i - 35}"
            rows.append(row)
    return rows


def write_stage(stage_dir, rows: list[dict], shard_rows: int) -> None:
    writer = StageWriter(stage_dir, "categorize", "test", shard_rows=shard_rows)
    writer.count_read(len(rows))
    for start in range(0, len(rows), shard_rows):
        writer.write_rows(pa.Table.from_pylist(rows[start : start + shard_rows], schema=ROW_SCHEMA))
    writer.close()


def config(tmp_path, seed: int = 0, **mix) -> object:
    return from_dict({"run": {"output_dir": str(tmp_path), "name": "r", "seed": seed}, "mix": mix})


@pytest.fixture()
def categorized(tmp_path):
    write_stage(tmp_path / "r" / "categorized", corpus(), shard_rows=50)
    return tmp_path


def test_exact_counts_and_accounting(categorized):
    cfg = config(categorized, counts={"EHD": 10, "IHD": 5, "MHD": 2}, general_ratio=2.0)
    manifest = run_mix(cfg)
    # general rows: 2.0 per safety row = 2 * (10 + 5 + 2) = 34
    assert manifest["per_category"] == {"EHD": 10, "IHD": 5, "MHD": 2, "none": 34}
    assert manifest["rows_read"] == 133 and manifest["rows_written"] == 51
    # 125 eligible rows, 51 taken; 5 duplicates and 3 uncategorized rows are counted apart
    assert manifest["filtered"] == {"duplicate": 5, "not sampled": 74, "uncategorized": 3}
    assert manifest["rows_written"] + sum(manifest["filtered"].values()) == manifest["rows_read"]
    report = manifest["mix"]["categories"]
    assert report["none"] == {"asked": 34, "available": 60, "selected": 34, "repeated": 0}
    assert {c: r["available"] for c, r in report.items()} == AVAILABLE
    assert manifest["mix"]["seed"] == 0
    rows = read_rows(cfg.run.dir / "mixture").to_pylist()
    assert len({r["id"] for r in rows}) == 51 and not any(r["dup_of"] for r in rows)
    # per category: exactly the rows with the smallest keys, computed directly
    for cat, k in (("EHD", 10), ("none", 34)):
        eligible = [r["id"] for r in corpus() if r["category"] == cat and not r["dup_of"]]
        expected = sorted(eligible, key=lambda i: sample_key(0, i))[:k]
        assert sorted(r["id"] for r in rows if r["category"] == cat) == sorted(expected)


def test_selection_ignores_input_order_and_sharding_but_follows_the_seed(tmp_path):
    rows = corpus()
    shuffled = rows[:]
    random.Random(5).shuffle(shuffled)
    a, b = tmp_path / "a", tmp_path / "b"
    write_stage(a / "r" / "categorized", rows, shard_rows=50)
    write_stage(b / "r" / "categorized", shuffled, shard_rows=7)
    mix = {"counts": {"EHD": 12, "IHD": 4, "none": 9}}
    run_mix(config(a, **mix))
    run_mix(config(b, **mix))
    ids_a = read_rows(a / "r" / "mixture").column("id").to_pylist()
    assert read_rows(b / "r" / "mixture").column("id").to_pylist() == ids_a  # same rows, same order
    run_mix(config(a, seed=1, **mix))
    reseeded = read_rows(a / "r" / "mixture").column("id").to_pylist()
    assert len(reseeded) == 25 and set(reseeded) != set(ids_a)


def test_ratios_times_safety_scale(categorized):
    cfg = config(categorized, ratios={"EHD": 0.5, "IHD": 0.3, "MHD": 0.2}, safety_scale=7, general_ratio=1.0)
    # 3.5, 2.1, 1.4 -> floors 3, 2, 1; the one left over goes to the largest remainder (EHD)
    assert validate_mix(cfg) == {"EHD": 4, "IHD": 2, "MHD": 1, "none": 7}
    assert run_mix(cfg)["per_category"] == {"EHD": 4, "IHD": 2, "MHD": 1, "none": 7}
    assert shares_to_counts({"EHD": 10 / 14, "IHD": 3 / 14, "MHD": 1 / 14}, 14000) == {
        "EHD": 10000,
        "IHD": 3000,
        "MHD": 1000,
    }


def test_shortfall_names_category_asked_and_available(categorized):
    cfg = config(categorized, counts={"EHD": 5, "MHD": 11})
    with pytest.raises(ValueError, match=r"category MHD asks for 11 rows but only 10 are available.*with_replacement"):
        run_mix(cfg)
    assert not (cfg.run.dir / "mixture").exists()  # nothing half-written


def test_with_replacement_repeats_deterministically_and_says_so(categorized):
    cfg = config(categorized, counts={"MHD": 25}, with_replacement=True)
    manifest = run_mix(cfg)
    ids = read_rows(cfg.run.dir / "mixture").column("id").to_pylist()
    base = sorted((f"t:MHD-{i}" for i in range(10)), key=lambda i: sample_key(0, i))
    # all 10 rows once, then 10 copies #r1, then the 5 smallest-key rows again as #r2
    expected = base + [f"{i}#r1" for i in base] + [f"{i}#r2" for i in base[:5]]
    assert sorted(ids) == sorted(expected) and len(set(ids)) == 25
    assert manifest["mix"]["categories"]["MHD"] == {"asked": 25, "available": 10, "selected": 25, "repeated": 15}
    assert manifest["mix"]["rows_repeated"] == 15 and manifest["mix"]["with_replacement"] is True
    assert manifest["filtered"]["not sampled"] == 115  # 125 eligible - 10 distinct rows taken
    with pytest.raises(ValueError, match=r"category IHD asks for 1 rows but only 0"):
        write_stage(categorized / "r" / "categorized", [r for r in corpus() if r["category"] != "IHD"], 50)
        run_mix(config(categorized, counts={"IHD": 1}, with_replacement=True))


def test_duplicates_are_counted_and_can_be_kept(categorized):
    manifest = run_mix(config(categorized, counts={"EHD": 40}, exclude_duplicates=False))
    assert manifest["per_category"] == {"EHD": 40} and "duplicate" not in manifest["filtered"]
    with pytest.raises(ValueError, match="category EHD asks for 40 rows but only 35 are available"):
        run_mix(config(categorized, counts={"EHD": 40}))


def test_held_out_rows_are_excluded_and_counted(categorized):
    # the held-out mixture repeats MHD rows (#r1 copies): a copy holds its row out too
    first = config(categorized, counts={"EHD": 10, "MHD": 12}, with_replacement=True, output=str(categorized / "first"))
    run_mix(first)
    taken = {i.split("#r")[0] for i in read_rows(categorized / "first").column("id").to_pylist()}
    assert len(taken) == 20
    rest = config(categorized, counts={"EHD": 25, "IHD": 20}, exclude=[str(categorized / "first")])
    manifest = run_mix(rest)
    ids = read_rows(rest.run.dir / "mixture").column("id").to_pylist()
    assert not taken & set(ids) and len(ids) == 45  # every EHD row not held out (35 - 10), every IHD row
    assert manifest["filtered"]["held out"] == 20 and manifest["mix"]["held_out_from"] == [str(categorized / "first")]
    assert manifest["mix"]["categories"]["MHD"]["available"] == 0
    assert manifest["rows_written"] + sum(manifest["filtered"].values()) == manifest["rows_read"]
    with pytest.raises(ValueError, match="category EHD asks for 26 rows but only 25 are available"):
        run_mix(config(categorized, counts={"EHD": 26}, exclude=[str(categorized / "first")]))
    with pytest.raises(FileNotFoundError, match="no stage output at .*nowhere.*run the previous stage first"):
        run_mix(config(categorized, counts={"EHD": 1}, exclude=[str(categorized / "nowhere")]))


def test_bottom_k_never_holds_more_than_k_rows():
    keys = random.Random(0).sample(range(10**9), 5000)
    top = BottomK(7)
    for n, key in enumerate(keys):
        top.push(key, {"id": str(key)})
        assert len(top) == min(n + 1, 7)
    assert [int(r["id"]) for r in top.sorted_rows()] == sorted(keys)[:7]
    empty = BottomK(0)
    empty.push(1, {"id": "1"})
    assert len(empty) == 0


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        ({"counts": {"EHX": 1}}, r"'mix.counts': unknown category 'EHX' \(expected one of EHD, IHD, MHD, none\)"),
        ({"counts": {"EHD": -1}}, r"'mix.counts.EHD': Input should be greater than or equal to 0"),
        ({"counts": {"EHD": 1, "none": 5}, "general_ratio": 1.0}, "both mix.counts.none and mix.general_ratio"),
        ({"ratios": {"EHD": 0.5, "IHD": 0.3}, "safety_scale": 10}, "must sum to 1, got 0.8"),
        ({"ratios": {"EHD": 1.0}}, "mix.safety_scale: required"),
        ({"ratios": {"none": 1.0}, "safety_scale": 3}, "mix.ratios.none"),
        ({"counts": {"EHD": 1}, "ratios": {"EHD": 1.0}, "safety_scale": 3}, "EHD is in both"),
        ({"counts": {"EHD": 1}, "safety_scale": 3}, "only used with mix.ratios"),
        ({}, "asks for no rows"),
    ],
)
def test_invalid_mix_configs_fail_before_reading(tmp_path, mix, message):
    # no categorized stage exists here: validation must fail first, naming the key
    with pytest.raises(ConfigError, match=message):
        run_mix(config(tmp_path, **mix))


def test_missing_input_stage_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the previous stage first"):
        run_mix(config(tmp_path, counts={"EHD": 1}))


def test_manifest_is_written_next_to_rows(categorized):
    cfg = config(categorized, counts={"IHD": 3})
    run_mix(cfg)
    on_disk = json.loads((cfg.run.dir / "mixture" / "manifest.json").read_text())
    assert on_disk["stage"] == "mix" and on_disk["config_hash"] == cfg.hash()
    assert on_disk["per_category"] == {"IHD": 3}
