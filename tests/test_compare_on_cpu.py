"""Paired comparison of evaluations: McNemar's exact test, Holm's correction, shared prompt ids."""

from __future__ import annotations

import json

import pytest
from scipy.stats import binomtest

from eqrlhf.evaluate.compare import compare, holm, main, markdown, mcnemar_exact


def test_mcnemar_exact_by_hand_and_against_scipy():
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # all six discordant prompts one way
    assert mcnemar_exact(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    for b, c in [(3, 11), (7, 2), (20, 35)]:
        assert mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue)


def test_holm_by_hand():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    # sorted a, c, b: 3 x 0.01, 2 x 0.03, then max(0.06, 1 x 0.04) keeps the order monotone
    assert adjusted == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert holm({"x": 0.6, "y": 0.7}) == {"x": 1.0, "y": 1.0}


def write_eval(path, records):
    path.mkdir(parents=True)
    (path / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_compare_pairs_prompts_by_id(tmp_path):
    def harmful(i, complied):
        return {"id": f"h{i}", "kind": "harmful", "harmful_compliance": complied, "refused": not complied}

    def benign(i, refused):
        return {"id": f"b{i}", "kind": "benign", "harmful_compliance": None, "refused": refused}

    base = write_eval(tmp_path / "base", [harmful(i, True) for i in range(10)] + [benign(i, False) for i in range(4)])
    # the trained model complies on 2 of the 10 harmful prompts and refuses 1 benign prompt; a prompt the
    # base model never saw (h99) is not paired
    trained = [harmful(i, i < 2) for i in range(10)] + [benign(i, i == 0) for i in range(4)] + [harmful(99, True)]
    result = compare([base, write_eval(tmp_path / "trained", trained)])
    row = result["against"][str(tmp_path / "trained")]
    hc = row["harmful_compliance"]
    assert (hc["n"], hc["first"]["count"], hc["second"]["count"]) == (10, 10, 2)
    assert (hc["second_only"], hc["first_only"], hc["difference"]) == (0, 8, pytest.approx(-0.8))
    assert hc["p"] == pytest.approx(2 / 2**8)
    over = row["over_refusal"]
    assert (over["n"], over["second_only"], over["first_only"], over["p"]) == (4, 1, 0, 1.0)
    assert row["helpful_refusal"]["n"] == 0 and "p_holm" not in row["helpful_refusal"]
    assert hc["p_holm"] == pytest.approx(2 * hc["p"])  # two tests in the family
    table = markdown(result)
    assert "| harmful_compliance | 100.0% [" in table and "-80.0 pts" in table
    # no shared ids: a clear refusal, exit 2
    other = write_eval(tmp_path / "other", [harmful("x", True)])
    with pytest.raises(ValueError, match="no prompt ids in common"):
        compare([base, other])
    assert main([str(base), str(other)]) == 2
