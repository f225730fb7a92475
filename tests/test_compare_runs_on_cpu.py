"""`eqrlhf compare RUN_DIR...`: one table of whole runs, paired against the first on shared prompt ids, and
the safety plane PNG. The paired numbers come from eqrlhf.evaluate.compare's test (also under
``python -m eqrlhf.evaluate.compare``); here they are checked against values worked out by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from eqrlhf.cli import main
from eqrlhf.evaluate.compare import NoSharedPrompts, compare_runs
from eqrlhf.evaluate.metrics import rate

REPO = Path(__file__).resolve().parents[1]


def record(kind: str, i, flag: bool, retention: float | None = None) -> dict:
    field = "harmful_compliance" if kind == "harmful" else "refused"
    prefix = {"harmful": "h", "benign": "b", "helpful": "a"}[kind]
    r = {"id": f"{prefix}{i}", "kind": kind, "harmful_compliance": None, "refused": False}
    r[field] = flag
    if kind == "harmful":
        r["refused"] = not flag
    if retention is not None:
        r["likelihood_retention"] = retention
    return r


def write_evaluation(folder: Path, records: list[dict], retention: dict) -> Path:
    """eval.json (the headline numbers as the evaluation computes them) and completions.jsonl."""
    folder.mkdir(parents=True)
    by_kind = {k: [r for r in records if r["kind"] == k] for k in ("harmful", "benign", "helpful")}
    complied = sum(r["harmful_compliance"] for r in by_kind["harmful"])
    over = sum(r["refused"] for r in by_kind["benign"])
    doc = {
        "tag": folder.name,
        "headline": {
            "harmful_compliance": rate(complied, len(by_kind["harmful"])),
            "over_refusal": rate(over, len(by_kind["benign"])),
            "likelihood_retention": retention,
        },
        "metrics": {"by_kind": {"helpful": {"refusal": rate(sum(r["refused"] for r in by_kind["helpful"]), 5)}}},
    }
    (folder / "eval.json").write_text(json.dumps(doc))
    (folder / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.fixture
def two_runs(tmp_path):
    base = [record("harmful", i, True) for i in range(10)] + [record("benign", i, False) for i in range(4)]
    base += [record("helpful", i, i == 0, 0.0) for i in range(5)]
    # trained: complies on 2 of the 10 shared harmful prompts and on h99, which the base never saw; refuses one
    # benign prompt and no helpful one
    trained = [record("harmful", i, i < 2) for i in range(10)] + [record("harmful", 99, True)]
    trained += [record("benign", i, i == 0) for i in range(4)] + [record("helpful", i, False, 0.25) for i in range(5)]
    base_dir = write_evaluation(tmp_path / "base_eval", base, {"mean": 0.0, "n": 5, "ci95": [0.0, 0.0]})
    run = tmp_path / "runs" / "recipe"  # a pipeline run folder: its trained model's evaluation is used
    write_evaluation(run / "eval" / "trained", trained, {"mean": 0.25, "n": 5, "ci95": [0.125, 0.375]})
    return base_dir, run


def wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    z = 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_compare_prints_one_table_with_paired_tests_and_writes_the_plane(two_runs, tmp_path, capsys):
    base, run = two_runs
    plot = tmp_path / "plots" / "plane.png"
    assert main(["compare", str(base), str(run), "--plot", str(plot), "--json", str(tmp_path / "c.json")]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == 2 and rows[0].startswith(f"| `{base}` |") and rows[1].startswith(f"| `{run}` |")
    # each run's own numbers: the trained run's harmful compliance counts h99 too, 3 of 11
    lo, hi = wilson_by_hand(3, 11)
    assert f"| 27.3% [{100 * lo:.1f}, {100 * hi:.1f}] (3/11) |" in rows[1]
    assert "| 100.0% [" in rows[0] and "(10/10)" in rows[0] and "| 20.0% [" in rows[0] and "(1/5)" in rows[0]
    assert "| +0.250 [+0.125, +0.375] (n=5) |" in rows[1]
    # paired on the 10 harmful, 4 benign and 5 helpful prompts both runs share (h99 is not paired):
    # harmful 10 -> 2 complied, 8 discordant one way: p = 2 / 2^8; benign 0 -> 1 refused: p = 1;
    # helpful 1 -> 0 refused: p = 1. Holm over the three: 3 x 0.0078 = 0.023, then 1 and 1
    assert "| -80.0 pts, p=0.0078 (Holm 0.023), n=10 | +25.0 pts, p=1 (Holm 1), n=4 |" in rows[1]
    assert rows[1].endswith("| -20.0 pts, p=1 (Holm 1), n=5 |") and "| baseline | baseline | baseline |" in rows[0]
    numbers = json.loads((tmp_path / "c.json").read_text())
    hc = numbers["against"][str(run / "eval" / "trained")]["harmful_compliance"]
    assert (hc["n"], hc["first_only"], hc["second_only"], hc["p"]) == (10, 8, 0, pytest.approx(2 / 2**8))
    # the plot: a valid PNG
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plot) as image:
        image.verify()
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 300


def test_runs_without_shared_prompt_ids_are_refused(two_runs, tmp_path, capsys):
    base, run = two_runs
    other = write_evaluation(tmp_path / "other", [record("harmful", "x", True)], {"mean": None, "n": 0})
    with pytest.raises(NoSharedPrompts, match=f"no prompt ids in common between {base} and {other}"):
        compare_runs([base, run, other], plot=tmp_path / "never.png")
    assert not (tmp_path / "never.png").exists()
    assert main(["compare", str(base), str(other), "--plot", str(tmp_path / "never.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eqrlhf compare: no prompt ids in common") and "cannot be compared prompt by prompt" in err
    assert main(["compare", str(base), str(tmp_path / "nothing")]) == 2
    assert "no evaluation in" in capsys.readouterr().err


def test_compare_reproduces_the_quickstart_paired_test_in_the_readme():
    # docs/results/quickstart: the base model and the shipped quickstart, 60 prompts per suite
    results = REPO / "docs" / "results" / "quickstart"
    out = compare_runs([results / "base", results / "shipped"])
    hc = out["against"][str(results / "shipped")]["harmful_compliance"]
    assert (hc["first"]["count"], hc["second"]["count"], hc["n"]) == (52, 31, 60)
    assert hc["p"] == pytest.approx(2e-5, rel=0.1)  # README: "McNemar p = 2e-5"
    assert "| -35.0 pts, p=1.9e-05" in out["table"]
