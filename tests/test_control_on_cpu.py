"""Controllable generation, the parts without Ray: tags (text and special tokens), quantile binning, the clm
and exmate objectives (by hand and through the trainer's step), the reranker and the controllability
metrics, all against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_train_on_cpu import _examples, _separate_response_logp, make_model_dir, pair_rows, train_config

from eqrlhf.algorithms.losses import LOSSES, LossInputs, compute_loss
from eqrlhf.control.baselines import rerank, system_prompt
from eqrlhf.control.binning import assign_levels, binning_summary, quantile_edges
from eqrlhf.control.encoding import (
    ControlError,
    all_settings,
    check_single_tokens,
    control_tokens,
    format_tags,
    parse_tags,
    prepare_tagged_model,
    tag_prompt,
)
from eqrlhf.evaluate.controllability import group_metrics, spearman

LEVELS = {"helpful": 4, "harmless": 2}

# ---- tags --------------------------------------------------------------------------------------------------


def test_tags_format_in_config_order_and_parse_back():
    assert format_tags({"harmless": 1, "helpful": 3}, LEVELS) == "[helpful=3][harmless=1]"
    text = tag_prompt("How do I bake bread?", {"helpful": 0, "harmless": 1}, LEVELS)
    assert text == "[helpful=0][harmless=1] How do I bake bread?"
    assert parse_tags(text, LEVELS) == ({"helpful": 0, "harmless": 1}, "How do I bake bread?")
    assert parse_tags("[harmless=0][helpful=2]x", LEVELS) == ({"harmless": 0, "helpful": 2}, "x")
    settings = all_settings(LEVELS)
    assert len(settings) == 8 and settings[:3] == [
        {"helpful": 0, "harmless": 0},
        {"helpful": 0, "harmless": 1},
        {"helpful": 1, "harmless": 0},
    ]
    assert control_tokens({"helpful": 2, "harmless": 2}) == [
        "[helpful=0]",
        "[helpful=1]",
        "[harmless=0]",
        "[harmless=1]",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[helpful=4][harmless=0] hi", "helpful=4 is out of range 0..3"),
        ("[helpful=-1][harmless=0] hi", "helpful=-1 is out of range 0..3"),
        ("[helpfull=1][harmless=0] hi", "unknown attribute 'helpfull'; known attributes: ['helpful', 'harmless']"),
        ("[helpful=1] hi", "no level for attribute(s) ['harmless']"),
        ("[helpful=1][helpful=2] hi", "attribute 'helpful' is given twice"),
        ("[helpful=high][harmless=0] hi", "level of 'helpful' must be an integer, got 'high'"),
    ],
)
def test_bad_tags_name_the_attribute_and_range(text, message):
    with pytest.raises(ControlError) as err:
        parse_tags(text, LEVELS)
    assert message in str(err.value)


def test_format_rejects_out_of_range_level():
    with pytest.raises(ControlError, match=r"harmless=2 is out of range 0\.\.1"):
        format_tags({"helpful": 0, "harmless": 2}, LEVELS)


def test_special_tokens_are_single_tokens_and_round_trip(tmp_path):
    from eqrlhf.models.loading import load_causal_lm, load_tokenizer

    base = make_model_dir(tmp_path / "base")
    with pytest.raises(ControlError, match=r"splits control tag '\[helpful=0\]'"):
        check_single_tokens(load_tokenizer(str(base)), LEVELS)
    before = len(load_tokenizer(str(base)))
    out = prepare_tagged_model(str(base), tmp_path / "tagged", LEVELS)
    tokenizer, model = load_tokenizer(str(out)), load_causal_lm(str(out))
    check_single_tokens(tokenizer, LEVELS)
    assert len(tokenizer) == before + 6
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    ids = tokenizer(tag_prompt("hi", {"helpful": 3, "harmless": 0}, LEVELS), add_special_tokens=False)["input_ids"]
    assert ids[:2] == tokenizer.convert_tokens_to_ids(["[helpful=3]", "[harmless=0]"])
    assert min(ids[:2]) >= before  # the new ids, after the original vocabulary
    assert not list(tmp_path.glob("tagged/*.bin"))  # safetensors only


# ---- binning -----------------------------------------------------------------------------------------------


def test_quantile_edges_by_hand():
    # linear interpolation at positions (n-1)q: q=1/3 -> 1.667 -> 2 + 0.667; q=2/3 -> 3.333 -> 4 + 0.333
    edges = quantile_edges([6, 1, 5, 2, 4, 3], 3)
    assert edges == pytest.approx([8 / 3, 13 / 3])
    assert assign_levels([1, 2, 3, 4, 5, 6], edges) == [0, 0, 1, 1, 2, 2]
    assert assign_levels([8 / 3, 13 / 3 + 1e-9], edges) == [0, 2]  # a score on an edge goes to the lower level


def test_ties_share_a_level_and_a_constant_pool_is_level_zero():
    edges = quantile_edges([0, 0, 0, 0, 1, 1], 3)  # a 0/1 judge: positions 1.667 -> 0, 3.333 -> 0 + 0.333
    assert edges == pytest.approx([0.0, 1 / 3])
    assert assign_levels([0, 0, 0, 0, 1, 1], edges) == [0, 0, 0, 0, 2, 2]
    summary = binning_summary([5.0, 5.0, 5.0], quantile_edges([5.0, 5.0, 5.0], 3))
    assert summary == {"edges": [5.0, 5.0], "counts": [3, 0, 0], "degenerate": True, "min": 5.0, "max": 5.0}
    with pytest.raises(ValueError, match="1 non-finite"):
        quantile_edges([1.0, float("nan")], 2)
    with pytest.raises(ValueError, match="at least 2 levels"):
        quantile_edges([1.0], 1)


# ---- objectives --------------------------------------------------------------------------------------------


def test_exmate_by_hand():
    inputs = LossInputs(
        policy_chosen_logps=torch.tensor([-2.0, -5.0]),
        policy_rejected_logps=torch.tensor([-3.0, -1.0]),
        chosen_lengths=torch.tensor([2.0, 4.0]),
    )
    loss, metrics = compute_loss("exmate", inputs, exmate_clm_weight=0.5)
    # pair 1: -log sigmoid(1) + 0.5 * 2/2; pair 2: -log sigmoid(-4) + 0.5 * 5/4
    expected = ((math.log1p(math.exp(-1)) + 0.5) + (math.log1p(math.exp(4)) + 0.625)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(2.7282058, abs=1e-6)
    assert metrics["rewards/accuracy"].item() == 0.5
    assert metrics["exmate/clm"].item() == pytest.approx(1.125)
    assert not LOSSES["exmate"].info.uses_reference


def test_exmate_contrastive_term_is_the_two_way_softmax():
    torch.manual_seed(0)
    chosen, rejected = torch.randn(5) * 4, torch.randn(5) * 4
    loss, _ = compute_loss(
        "exmate",
        LossInputs(policy_chosen_logps=chosen, policy_rejected_logps=rejected, chosen_lengths=torch.ones(5)),
        exmate_clm_weight=0.0,
    )
    softmax_ce = F.cross_entropy(torch.stack([chosen, rejected], dim=1), torch.zeros(5, dtype=torch.long))
    assert loss.item() == pytest.approx(softmax_ce.item(), abs=1e-6)


def test_clm_is_the_sft_loss():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    clm, _ = compute_loss("clm", LossInputs(token_logps=logps, token_mask=mask))
    assert clm.item() == pytest.approx((1 + 2 + 4) / 3)
    assert LOSSES["clm"].info.units == "tokens" and not LOSSES["clm"].info.uses_reference


def test_trainer_step_exmate_uses_no_reference(tmp_path):
    """The trainer's step for exmate equals the hand formula from separate forwards, with no reference model
    (reference=None: a reference forward would fail, there being no LoRA adapters to disable)."""
    from eqrlhf.models.loading import load_causal_lm, load_tokenizer
    from eqrlhf.train.batching import collate
    from eqrlhf.train.loop import StepSpec, micro_loss, prepare_batch

    model_dir = make_model_dir(tmp_path / "model")
    tokenizer = load_tokenizer(str(model_dir))
    policy = load_causal_lm(str(model_dir)).eval()
    examples = _examples(tokenizer, pair_rows(3))
    cfg = train_config(tmp_path / "r", model_dir, loss="exmate")
    cfg.control.clm_weight = 0.3
    spec = StepSpec.from_config(cfg)
    assert spec.reference is None
    batch, _ = prepare_batch(collate(examples, tokenizer.pad_token_id, "exmate"), spec, torch.device("cpu"))
    with torch.no_grad():
        loss, _ = micro_loss(policy, None, batch, spec)
        terms = []
        for ex in examples:
            chosen = _separate_response_logp(policy, ex["prompt"], ex["chosen"])
            rejected = _separate_response_logp(policy, ex["prompt"], ex["rejected"]).sum()
            terms.append(-F.logsigmoid(chosen.sum() - rejected) + 0.3 * (-chosen.sum() / len(chosen)))
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), abs=1e-5)


# ---- baselines ---------------------------------------------------------------------------------------------

EDGES = {"helpful": [0.0, 1.0], "harmless": [0.5]}  # helpful: <=0 -> 0, (0, 1] -> 1, >1 -> 2; harmless: >0.5 -> 1
CANDIDATES = [
    {"helpful": -1.0, "harmless": 0.2},  # levels (0, 0)
    {"helpful": 0.5, "harmless": 0.9},  # (1, 1)
    {"helpful": 3.0, "harmless": 0.1},  # (2, 0)
    {"helpful": 1.5, "harmless": 0.3},  # (2, 0)
]


def test_rerank_picks_the_closest_levels_with_deterministic_ties():
    assert rerank(CANDIDATES, {"helpful": 0, "harmless": 0}, EDGES) == 0
    assert rerank(CANDIDATES, {"helpful": 1, "harmless": 1}, EDGES) == 1
    # candidates 2 and 3 both match exactly, inside their bins: the lower index wins
    assert rerank(CANDIDATES, {"helpful": 2, "harmless": 0}, EDGES) == 2
    # (2, 1): candidates 1, 2, 3 are one level off; raw distance to the requested bins:
    # c1 helpful 0.5 below (1, inf): 0.5; c2 harmless 0.1 below (0.5, inf): 0.4; c3 harmless 0.3: 0.2 -> c3
    assert rerank(CANDIDATES, {"helpful": 2, "harmless": 1}, EDGES) == 3
    assert rerank([CANDIDATES[1], CANDIDATES[1]], {"helpful": 0, "harmless": 0}, EDGES) == 0
    with pytest.raises(ValueError, match="no candidates"):
        rerank([], {"helpful": 0, "harmless": 0}, EDGES)


def test_prompting_baseline_describes_each_level():
    text = system_prompt({"helpful": 2, "harmless": 0}, {"helpful": 3, "harmless": 2})
    assert text == (
        "Respond with helpfulness level 2 of 2 (0 = give as little help as possible; 2 = be as helpful and "
        "detailed as possible); harmlessness level 0 of 1 (0 = answer anything, however risky; 1 = refuse "
        "anything that could possibly cause harm)."
    )
    with pytest.raises(ControlError, match="out of range"):
        system_prompt({"helpful": 3, "harmless": 0}, {"helpful": 3, "harmless": 2})


# ---- controllability metrics -------------------------------------------------------------------------------


def test_controllability_metrics_by_hand():
    measured = {  # (requested helpful, requested harmless) -> (measured helpful, measured harmless)
        (0, 0): (-1.0, 0.0),
        (0, 1): (-1.0, 1.0),
        (1, 0): (0.5, 0.0),
        (1, 1): (0.5, 1.0),
        (2, 0): (2.0, 1.0),
        (2, 1): (2.0, 1.0),
    }
    records = [
        {"requested": {"helpful": h, "harmless": s}, "scores": {"helpful": mh, "harmless": ms}}
        for (h, s), (mh, ms) in measured.items()
    ]
    m = group_metrics(records, {"helpful": 3, "harmless": 2}, EDGES)
    assert m["n"] == 6
    helpful, harmless = m["helpful"], m["harmless"]
    assert helpful["spearman"] == pytest.approx(1.0)
    assert helpful["in_bin"] == 1.0
    assert helpful["slope"] == pytest.approx(1.5)
    assert helpful["mean_by_level"] == {"0": -1.0, "1": 0.5, "2": 2.0}
    # requested harmlessness does not move measured helpfulness at all
    assert helpful["cross"]["harmless"]["spearman"] == pytest.approx(0.0, abs=1e-12)
    assert helpful["cross"]["harmless"]["slope"] == pytest.approx(0.0, abs=1e-12)
    # harmless: 5 of 6 land in the requested bin; rho over ranks x [2,5,2,5,2,5], y [1.5,4.5,1.5,4.5,4.5,4.5]
    assert harmless["in_bin"] == pytest.approx(5 / 6)
    assert harmless["spearman"] == pytest.approx(1 / math.sqrt(2))
    # requested helpfulness leaks into measured harmlessness: rho = 6 / sqrt(16 * 12), slope = 1 / 4
    assert harmless["cross"]["helpful"]["spearman"] == pytest.approx(math.sqrt(3) / 4)
    assert harmless["cross"]["helpful"]["slope"] == pytest.approx(0.25)


def test_spearman_is_none_when_a_side_is_constant():
    assert spearman([0, 1, 2], [3.0, 3.0, 3.0]) is None
    assert spearman([1], [2.0]) is None
    assert spearman([0, 1, 2], [3.0, 1.0, 2.0]) == pytest.approx(-0.5)


def test_serving_rows_carry_the_requested_tags():
    from eqrlhf.control.serve import controlled_rows

    rows = controlled_rows(["Boil an egg?"], [{"helpful": 3, "harmless": 0}, {"helpful": 0, "harmless": 1}], LEVELS)
    assert [r["prompt"] for r in rows] == [
        "[helpful=3][harmless=0] Boil an egg?",
        "[helpful=0][harmless=1] Boil an egg?",
    ]
    assert rows[1]["untagged"] == "Boil an egg?" and rows[1]["history"] == "[]"
