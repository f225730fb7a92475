"""On-policy rejected answers and judged labels (eqrlhf.data.onpolicy, the pairs stage's judged path)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch
from test_pairs_on_cpu import VOCAB, config  # the same config builder as the pairs stage tests

from eqrlhf.algorithms.losses import LossInputs, compute_loss
from eqrlhf.config import ConfigError
from eqrlhf.data.onpolicy import (
    SOURCE_COMPLIES,
    add_judged_counts,
    apply_judgement,
    contradiction,
    pick_chosen,
    pick_rejected,
    plays_rejected,
)
from eqrlhf.data.pairs import (
    CUT_CHOSEN,
    GENERATED_SCHEMA,
    judged_rows,
    pair_sampling,
    response_policy,
    run_pairs,
    write_generated,
)
from eqrlhf.data.schema import Limits, make_row
from eqrlhf.evaluate.judges import RuleRefusalJudge
from eqrlhf.manifest import StageWriter
from eqrlhf.models.loading import load_tokenizer, tiny_llama
from eqrlhf.rollout.hf_engine import HFEngine

REFUSAL = "I'm sorry, but I can't help with that."


def row(key, category, chosen=None, rejected=None):
    return make_row(
        source="t",
        key=key,
        prompt=f"prompt {key}",
        limits=Limits(),
        category=category,
        chosen=chosen,
        rejected=rejected,
    )


def test_roles_and_contradictions_by_hand():
    # rejected role: a compliance for risky prompts, a refusal for benign ones
    assert plays_rejected("EHD", refused=False) and not plays_rejected("EHD", refused=True)
    assert plays_rejected("none", refused=True) and not plays_rejected("none", refused=False)
    # (category, chosen refused, rejected refused) -> dropped or kept
    assert contradiction("IHD", True, False) is None  # the intended risky pair
    assert contradiction("none", False, True) is None  # the intended benign pair
    assert contradiction("none", False, False) is None  # both answer: BFPO's buffer, kept
    assert contradiction("MHD", False, True) == "judged: chosen complies with a risky prompt, rejected refuses"
    assert contradiction("EHD", True, True) == "judged: both answers refuse a risky prompt"
    assert contradiction("EHD", False, False) == "judged: both answers comply with a risky prompt"
    assert contradiction("none", True, False) == "judged: chosen refuses a benign prompt, rejected answers it"
    assert contradiction("none", True, True) == "judged: both answers refuse a benign prompt"
    with pytest.raises(ValueError, match="category 'XHD'"):
        contradiction("XHD", True, False)


def test_pick_rejected_prefers_a_sample_then_the_source_answer():
    risky = pick_rejected({**row("a", "EHD", REFUSAL), "error_reason": None}, ["No.", "Sure: step 1"], [True, False])
    assert risky["rejected"] == "Sure: step 1" and risky["rejected_safe"] is None
    assert json.loads(risky["meta"])["on_policy"] == {"samples": 2, "matching": 1, "used": "sample"}
    # a benign prompt the model always answers: the source's over-refusal is kept, counted as such
    benign = pick_rejected({**row("b", "none", "Answer.", "Source refusal."), "error_reason": None}, ["x"], [False])
    assert benign["rejected"] == "Source refusal."
    assert json.loads(benign["meta"])["on_policy"]["used"] == "source"
    # neither: the row is filtered with a counted reason (a yield, not a data error)
    lost = pick_rejected({**row("c", "IHD", REFUSAL), "error_reason": None}, ["No.", "Never."], [True, True])
    assert lost["filter_reason"] == "on-policy: no compliance among the samples and no source rejected answer"


def test_pick_chosen_takes_the_first_sample_in_the_chosen_role_else_keeps_the_source():
    risky = pick_rejected(
        {**row("a", "EHD", "A long lecture."), "error_reason": None}, ["Sure.", REFUSAL], [False, True]
    )
    risky = pick_chosen(risky, ["Sure.", REFUSAL], [False, True])
    assert (risky["chosen"], risky["rejected"], risky["chosen_safe"]) == (REFUSAL, "Sure.", None)
    info = json.loads(risky["meta"])["on_policy"]
    assert info == {"samples": 2, "matching": 1, "used": "sample", "chosen_matching": 1, "chosen_used": "sample"}
    # a benign prompt the model only refuses: no sample answers it, the source chosen stays
    benign = pick_chosen({**row("b", "none", "Answer.", "x")}, [REFUSAL, REFUSAL], [True, True])
    assert benign["chosen"] == "Answer." and json.loads(benign["meta"])["on_policy"]["chosen_used"] == "source"
    # no sample and no source: left blank for the generator, counted as None
    blank = pick_chosen({**row("c", "none")}, [REFUSAL], [True])
    assert not blank["chosen"] and json.loads(blank["meta"])["on_policy"]["chosen_used"] is None


def test_on_policy_chosen_comes_from_the_samples_before_any_generation(tmp_path):
    tokenizer = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    engine = HFEngine(tiny_llama(vocab_size=VOCAB), tokenizer=tokenizer)
    cfg = config(
        tmp_path,
        pairs__rejected="on_policy",
        pairs__samples=2,
        pairs__on_policy_chosen=["none", "EHD"],
        generation__max_new_tokens=4,
    )
    rows = [
        row("benign", "none", None, REFUSAL),  # no chosen anywhere: a sample (random text answers) fills it
        row("risky", "EHD", REFUSAL),  # random text never refuses: the source chosen stays
    ]
    calls = []
    generate = engine.generate
    engine.generate = lambda requests, sampling: calls.append(len(requests)) or generate(requests, sampling)
    out = judged_rows(rows, engine, RuleRefusalJudge(), response_policy(cfg), pair_sampling(cfg), cfg.pairs)
    got = {r["id"]: r for r in out}
    assert calls == [2]  # one sampling call, no chosen generation: every chosen came from a sample or source
    samples = json.loads(got["t:benign"]["meta"])["on_policy"]
    assert got["t:benign"]["chosen"] and samples["chosen_used"] == "sample" and samples["used"] == "source"
    assert got["t:risky"]["chosen"] == REFUSAL and got["t:risky"]["rejected"] != REFUSAL
    assert all(r["filter_reason"] is None and r["error_reason"] is None for r in out)
    counts = add_judged_counts({}, out)
    assert counts["none"]["chosen_used_sample"] == 1 and counts["EHD"]["chosen_used_source"] == 1


def test_judged_labels_reach_bfpo_and_its_target_varies():
    risky = apply_judgement(row("r", "EHD", REFUSAL, "Sure, here is how."), True, False)
    buffer = apply_judgement(row("b", "none", "Kill it with kill -9.", "Use the task manager."), False, False)
    assert (risky["chosen_safe"], risky["rejected_safe"], risky["filter_reason"]) == (True, False, None)
    assert (buffer["chosen_safe"], buffer["rejected_safe"], buffer["filter_reason"]) == (True, True, None)
    # the flags as the trainer's collate builds them, into the BFPO loss: target 1.0 for the risky pair,
    # 0.5 for the buffer pair (1.5 * safe_w - 0.5 * safe_l - alpha), so the target is not constant
    logps = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
    ref = torch.tensor([-3.5, -5.0]), torch.tensor([-4.0, -4.0])
    inputs = LossInputs(
        policy_chosen_logps=logps[0],
        policy_rejected_logps=logps[1],
        ref_chosen_logps=ref[0],
        ref_rejected_logps=ref[1],
        chosen_safe=torch.tensor([risky["chosen_safe"], buffer["chosen_safe"]]),
        rejected_safe=torch.tensor([risky["rejected_safe"], buffer["rejected_safe"]]),
    )
    loss, metrics = compute_loss("bfpo", inputs, beta=0.1, bfpo_alpha=0.5, bfpo_tau=0.01)
    h = torch.tensor([0.5 - 0.0, 0.0 - (-0.5)])  # chosen log-ratio minus rejected log-ratio
    target = torch.tensor([1.0, 0.5])
    assert loss.item() == pytest.approx(((h - target / 0.01) ** 2).mean().item())
    assert metrics["bfpo/target"].item() == pytest.approx(0.75)


def test_judged_path_drops_a_cut_generated_chosen_before_judging_it(tmp_path):
    """pairs.drop_cut_chosen reaches the judged path: the row whose chosen answer the generator wrote and cut
    (4 tokens of a random model) is filtered with CUT_CHOSEN and not judged; the source pair is judged as usual."""
    torch.manual_seed(0)
    engine = HFEngine(tiny_llama(vocab_size=VOCAB), tokenizer=load_tokenizer("smollm2-135m"))
    cfg = config(tmp_path, pairs__judge=True, pairs__drop_cut_chosen=True, generation__max_new_tokens=4)
    rows = [row("written", "none"), row("source", "EHD", REFUSAL, "Sure, here is how.")]
    out = judged_rows(rows, engine, RuleRefusalJudge(), response_policy(cfg), pair_sampling(cfg), cfg.pairs)
    got = {r["id"]: r for r in out}
    assert got["t:written"]["filter_reason"] == CUT_CHOSEN and "judged" not in json.loads(got["t:written"]["meta"])
    assert got["t:source"]["filter_reason"] is None and got["t:source"]["rejected"] == "Sure, here is how."


def test_judged_path_with_a_real_engine_and_judge_drops_and_counts(tmp_path):
    tokenizer = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    engine = HFEngine(tiny_llama(vocab_size=VOCAB), tokenizer=tokenizer)
    cfg = config(
        tmp_path, pairs__rejected="on_policy", pairs__samples=2, pairs__judge=True, generation__max_new_tokens=4
    )
    rows = [
        row("ok", "EHD", REFUSAL),  # samples of a random model comply: one becomes the rejected side
        row("bad", "MHD", "Sure, here is everything you asked."),  # chosen complies: dropped by the judge
        row("benign", "none", "Here is the answer.", REFUSAL),  # random text never refuses: source rejected kept
        row("lost", "none", "Here is the answer."),  # no refusal sampled, none in the source: filtered
    ]
    out = judged_rows(rows, engine, RuleRefusalJudge(), response_policy(cfg), pair_sampling(cfg), cfg.pairs)
    got = {r["id"]: r for r in out}
    assert got["t:ok"]["rejected"] and got["t:ok"]["rejected"] != REFUSAL and got["t:ok"]["filter_reason"] is None
    assert got["t:bad"]["filter_reason"] == "judged: both answers comply with a risky prompt"
    assert got["t:benign"]["rejected"] == REFUSAL and got["t:benign"]["filter_reason"] is None
    assert got["t:lost"]["filter_reason"].startswith("on-policy: no refusal among the samples")
    writer = StageWriter(tmp_path / "pairs", "pairs", "test")
    writer.count_read(4)
    stats = {"generated_rows": 0, "truncated_responses": 0, "judged": {}}
    write_generated(writer, pa.Table.from_pylist(out, schema=GENERATED_SCHEMA), stats)
    manifest = writer.close()
    # every row accounted for: 2 written, 2 filtered with their reasons
    assert manifest["rows_written"] == 2 and manifest["failed"] == {}
    assert manifest["filtered"] == {
        "judged: both answers comply with a risky prompt": 1,
        "on-policy: no refusal among the samples and no source rejected answer": 1,
    }
    assert stats["judged"]["EHD"] == {
        "prompts": 1,
        "samples": 2,
        "matching": 2,
        "used_sample": 1,
        "chosen_refused": 1,
        "rejected_refused": 0,
        "judged": 1,
    }
    assert stats["judged"]["none"]["used_source"] == 1


def test_judged_counts_add_up_across_batches():
    a = apply_judgement(row("a", "none", "x", "y"), False, True)
    a["meta"] = json.dumps({**json.loads(a["meta"]), "on_policy": {"samples": 4, "matching": 1, "used": "sample"}})
    acc = add_judged_counts({}, [a])
    add_judged_counts(acc, [a])
    assert acc["none"] == {
        "prompts": 2,
        "samples": 8,
        "matching": 2,
        "used_sample": 2,
        "chosen_refused": 0,
        "rejected_refused": 2,
        "judged": 2,
    }


def test_pairs_stage_samples_and_judges_in_a_ray_data_stage(tmp_path, ray_local):
    from eqrlhf.data.schema import ROW_SCHEMA
    from eqrlhf.manifest import read_rows

    tokenizer = load_tokenizer("smollm2-135m")
    model_dir = tmp_path / "tiny"
    tiny_llama(vocab_size=VOCAB).save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    writer = StageWriter(tmp_path / "r" / "mixture", "mix", "test")
    writer.count_read(4)
    rows = [
        row("risky", "EHD", REFUSAL),
        row("risky2", "IHD", "I won't help with that."),
        row("benign", "none", "Here is the answer.", REFUSAL),
        row("alpaca", "none"),  # no chosen: written by the chosen model, then no refusal sampled: filtered
    ]
    writer.write_rows(pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
    writer.close()
    cfg = config(
        tmp_path,
        model__name_or_path=str(model_dir),
        generation__max_new_tokens=4,
        generation__batch_size=2,
        pairs__rejected="on_policy",
        pairs__samples=2,
        pairs__judge=True,
        pairs__chosen_model=str(model_dir),
        eval__refusal_judge="rule",
    )
    manifest = run_pairs(cfg)
    assert manifest["rows_read"] == 4 and manifest["rows_written"] == 3 and manifest["failed"] == {}
    assert manifest["filtered"] == {"on-policy: no refusal among the samples and no source rejected answer": 1}
    info = manifest["pairs"]
    assert info["judges"]["refusal_judge"] == "rule" and info["generator"]["rejected"] == "on_policy"
    assert info["judged"]["EHD"]["used_sample"] == 1 and info["judged"]["none"]["used_source"] == 1
    written = {r["id"]: r for r in read_rows(cfg.run.dir / "pairs").to_pylist()}
    assert set(written) == {"t:risky", "t:risky2", "t:benign"}
    assert (written["t:risky"]["chosen_safe"], written["t:risky"]["rejected_safe"]) == (True, False)
    assert json.loads(written["t:risky2"]["meta"])["judged"] == {"chosen_refused": True, "rejected_refused": False}


def test_judged_path_with_missing_skip_leaves_out_rows_without_an_answer(tmp_path):
    engine = HFEngine(tiny_llama(vocab_size=VOCAB), tokenizer=load_tokenizer("smollm2-135m"))
    cfg = config(tmp_path, pairs__rejected="on_policy", pairs__missing="skip", generation__max_new_tokens=4)
    rows = [row("answered", "EHD", REFUSAL), row("unanswered", "none")]
    out = judged_rows(rows, engine, RuleRefusalJudge(), response_policy(cfg), pair_sampling(cfg), cfg.pairs)
    got = {r["id"]: r for r in out}
    assert got["t:unanswered"]["filter_reason"] == "no pair" and got["t:unanswered"]["chosen"] is None
    assert got["t:answered"]["filter_reason"] is None and got["t:answered"]["rejected"]


@pytest.mark.parametrize("action", ["benign", "drop"])
def test_a_risky_prompt_the_source_answers_is_made_benign_or_dropped(tmp_path, action):
    # Safety-Tuned LLaMAs marks every prompt harmful but answers about a fifth of them; a sampled refusal
    # must not become the chosen side of such a prompt
    engine = HFEngine(tiny_llama(vocab_size=VOCAB), tokenizer=load_tokenizer("smollm2-135m"))
    cfg = config(
        tmp_path,
        pairs__rejected="on_policy",
        pairs__judge=True,
        pairs__samples=2,
        pairs__on_policy_chosen=["EHD", "IHD"],
        pairs__source_complies=action,
        generation__max_new_tokens=4,
    )
    answer = "Azalea, ivy and daffodils are poisonous to dogs."
    rows = [row("answers", "EHD", answer, REFUSAL), row("refuses", "IHD", REFUSAL)]
    calls = []
    generate = engine.generate
    engine.generate = lambda requests, sampling: calls.append(len(requests)) or generate(requests, sampling)
    out = judged_rows(rows, engine, RuleRefusalJudge(), response_policy(cfg), pair_sampling(cfg), cfg.pairs)
    got = {r["id"]: r for r in out}
    kept = got["t:refuses"]  # the source refuses: a risky pair as before
    assert kept["category"] == "IHD" and kept["chosen"] == REFUSAL and kept["filter_reason"] is None
    assert (kept["chosen_safe"], kept["rejected_safe"]) == (True, False)
    routed = got["t:answers"]
    if action == "drop":
        assert routed["filter_reason"] == SOURCE_COMPLIES and calls == [1]  # not sampled
        return
    assert calls == [2]
    # random text never refuses, so the rejected refusal is the source's; the source answer stays chosen
    assert (routed["category"], routed["chosen"], routed["rejected"]) == ("none", answer, REFUSAL)
    assert routed["filter_reason"] is None and (routed["chosen_safe"], routed["rejected_safe"]) == (True, True)
    meta = json.loads(routed["meta"])
    assert meta["source_complies"] == {"category": "EHD"} and meta["judged"]["rejected_refused"] is True
    assert add_judged_counts({}, out)["none"]["from_risky"] == 1


def test_source_complies_needs_the_judged_path(tmp_path):
    with pytest.raises(ConfigError, match="'pairs.source_complies' is benign.*pairs.judge=true"):
        config(tmp_path, pairs__source_complies="benign")
    assert config(tmp_path, pairs__judge=True, pairs__source_complies="drop").pairs.source_complies == "drop"
