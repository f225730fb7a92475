"""The pair builder: passthrough, skip/error modes, safety flags, generation in a Ray Data stage."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from eqrlhf.config import ConfigError, from_dict
from eqrlhf.data.pairs import (
    CUT_CHOSEN,
    DEFAULT_POLICY,
    GENERATED_SCHEMA,
    fill_missing,
    pair_conversations,
    pair_sampling,
    response_policy,
    run_pairs,
    write_generated,
)
from eqrlhf.data.schema import ROW_SCHEMA, Limits, make_row
from eqrlhf.manifest import ErrorBudgetExceeded, StageWriter, read_rows
from eqrlhf.models.loading import load_tokenizer, tiny_llama
from eqrlhf.rollout.hf_engine import HFEngine

VOCAB = 49152  # SmolLM2's tokenizer, so the real chat template runs


def mixture_rows() -> list[dict]:
    def row(key, category, chosen=None, rejected=None, **flags):
        return make_row(
            source="t",
            key=key,
            prompt=f"prompt {key}",
            limits=Limits(),
            category=category,
            chosen=chosen,
            rejected=rejected,
            **flags,
        )

    return [
        row("p1", "EHD", "I can't help with that.", "Sure, here it is."),
        row("m1", "none", "Use kill -9 <pid>.", None),  # rejected missing
        row("p2", "IHD", "Not that, but here is how to talk to them.", "Sure."),
        row("m2", "EHD"),  # both missing
        row("p3", "MHD", "No.", "Yes."),
        row("p4", "none", "Here is the answer.", "Sorry, I can't."),
        row("m3", "IHD", "I won't do that part.", "   "),  # blank counts as missing
        row("p5", "EHD", "a", "b", chosen_safe=False, rejected_safe=False),  # source labels win
    ]


def config(tmp_path, **pairs_and_more) -> object:
    tree = {"run": {"output_dir": str(tmp_path), "name": "r"}, "pairs": {}}
    for key, value in pairs_and_more.items():
        section, _, name = key.partition("__")
        tree.setdefault(section, {})[name] = value
    return from_dict(tree)


@pytest.fixture()
def mixture(tmp_path):
    writer = StageWriter(tmp_path / "r" / "mixture", "mix", "test")
    writer.count_read(8)
    writer.write_rows(pa.Table.from_pylist(mixture_rows(), schema=ROW_SCHEMA))
    writer.close()
    return tmp_path


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


def save_model(model, tokenizer, path):
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    return save_model(tiny_llama(vocab_size=VOCAB), tokenizer, tmp_path_factory.mktemp("tiny"))


def eos_only_model(eos: int):
    """A tiny model whose greedy output is EOS at once: every generation comes back empty."""
    model = tiny_llama(vocab_size=VOCAB)
    with torch.no_grad():
        for layer in model.model.layers:  # residual stream = token embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0  # coordinate 0 always positive
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[eos, 0] = 10.0  # only EOS reads it
    return model


def by_id(cfg) -> dict[str, dict]:
    return {r["id"]: r for r in read_rows(cfg.run.dir / "pairs").to_pylist()}


def test_passthrough_with_skip_counts_and_safety_flags(mixture):
    cfg = config(mixture, pairs__missing="skip")
    manifest = run_pairs(cfg)
    assert manifest["rows_read"] == 8 and manifest["rows_written"] == 5
    assert manifest["filtered"] == {"no pair": 3} and manifest["failed"] == {}
    assert manifest["pairs"]["passthrough"] == 5 and manifest["pairs"]["missing"] == 3
    assert manifest["pairs"]["generator"] is None
    rows = by_id(cfg)
    assert set(rows) == {"t:p1", "t:p2", "t:p3", "t:p4", "t:p5"}
    flags = {i: (r["chosen_safe"], r["rejected_safe"]) for i, r in rows.items()}
    assert flags == {
        "t:p1": (True, False),  # EHD: refusal safe, compliance unsafe
        "t:p2": (True, False),  # IHD
        "t:p3": (True, False),  # MHD
        "t:p4": (True, True),  # none: a needless refusal is unhelpful, not unsafe
        "t:p5": (False, False),  # the source's own labels are kept
    }
    assert rows["t:p1"]["chosen"] == "I can't help with that." and rows["t:p1"]["rejected"] == "Sure, here it is."


def test_missing_error_and_unavailable_engine_fail_before_writing(mixture):
    cfg = config(mixture, pairs__missing="error")
    with pytest.raises(ValueError, match=r"row t:m1 in .*mixture has no chosen/rejected pair \(3 of 8 rows lack one\)"):
        run_pairs(cfg)
    # vLLM loads safetensors directories: a GGUF model is refused before anything is written
    with pytest.raises(ConfigError, match="generation.engine=vllm loads safetensors directories"):
        run_pairs(config(mixture, generation__engine="vllm", model__gguf_file="model.gguf"))
    assert not (cfg.run.dir / "pairs").exists()


def test_policy_overrides_and_conversations():
    cfg = config("/tmp", pairs__policy={"IHD": {"chosen": "Custom IHD instruction."}})
    policy = response_policy(cfg)
    assert policy["IHD"] == {"chosen": "Custom IHD instruction.", "rejected": DEFAULT_POLICY["IHD"]["rejected"]}
    assert policy["EHD"] == DEFAULT_POLICY["EHD"]
    row = {**mixture_rows()[1], "history": json.dumps([{"role": "user", "content": "earlier"}])}
    # m1 lacks only its rejected side: one conversation, with the needless-refusal instruction for `none`
    assert pair_conversations(row, policy) == [
        (
            "rejected",
            [
                {"role": "system", "content": DEFAULT_POLICY["none"]["rejected"]},
                {"role": "user", "content": "earlier"},
                {"role": "user", "content": "prompt m1"},
            ],
        )
    ]
    assert [side for side, _ in pair_conversations(mixture_rows()[3], policy)] == ["chosen", "rejected"]
    with pytest.raises(ConfigError, match="pairs.policy.XHD: unknown category"):
        response_policy(config("/tmp", pairs__policy={"XHD": {"chosen": "x"}}))
    with pytest.raises(ConfigError, match="pairs.policy.none.rejected: empty instruction"):
        response_policy(config("/tmp", pairs__policy={"none": {"rejected": " "}}))


def test_generation_fills_missing_sides_in_a_ray_data_stage(mixture, tiny_dir, ray_local):
    cfg = config(
        mixture,
        model__name_or_path=tiny_dir,
        generation__max_new_tokens=4,
        generation__batch_size=2,
    )
    manifest = run_pairs(cfg)
    assert manifest["rows_written"] == 8 and manifest["failed"] == {} and manifest["filtered"] == {}
    info = manifest["pairs"]
    assert (info["passthrough"], info["missing"], info["generated_rows"]) == (5, 3, 3)
    assert info["truncated_responses"] == 4  # m1: 1 side, m2: 2, m3: 1; a random model never stops in 4 tokens
    assert info["generator"]["model"] == tiny_dir and info["generator"]["engine"] == "hf"
    assert info["generator"]["sampling"] == {
        "max_new_tokens": 4,
        "temperature": 0.0,
        "top_p": 1.0,
        "n": 1,
        "seed": 0,
    }
    rows = by_id(cfg)
    assert rows["t:m1"]["chosen"] == "Use kill -9 <pid>." and rows["t:m1"]["rejected"].strip()
    assert rows["t:m2"]["chosen"].strip() and rows["t:m2"]["rejected"].strip()
    assert rows["t:m2"]["chosen"] != rows["t:m2"]["rejected"]  # different instructions, different greedy text
    assert json.loads(rows["t:m1"]["meta"])["generated"] == {"rejected": "length"}
    assert json.loads(rows["t:m2"]["meta"])["generated"] == {"chosen": "length", "rejected": "length"}
    assert (rows["t:m1"]["chosen_safe"], rows["t:m1"]["rejected_safe"]) == (True, True)
    assert (rows["t:m2"]["chosen_safe"], rows["t:m2"]["rejected_safe"]) == (True, False)
    assert rows["t:p2"] == {**mixture_rows()[2], "chosen_safe": True, "rejected_safe": False}


def test_cut_chosen_answers_are_dropped_and_counted_when_asked(tmp_path, tiny_dir, tokenizer):
    """A random model never stops within 4 tokens: every generated side is cut. With pairs.drop_cut_chosen the
    row whose chosen side was generated (m2) is filtered with a counted reason; rows where only the rejected
    side was generated (m1, m3) stay, and so does every row without it set."""
    from transformers import AutoModelForCausalLM

    engine = HFEngine(AutoModelForCausalLM.from_pretrained(tiny_dir), tokenizer=tokenizer)
    cfg = config(tmp_path, pairs__drop_cut_chosen=True, generation__max_new_tokens=4)
    sampling = pair_sampling(cfg)
    kept = fill_missing(mixture_rows(), engine, response_policy(cfg), sampling)
    assert [r["id"] for r in kept if r.get("filter_reason")] == []
    rows = fill_missing(mixture_rows(), engine, response_policy(cfg), sampling, drop_cut_chosen=True)
    assert {r["id"]: r.get("filter_reason") for r in rows if r.get("filter_reason")} == {"t:m2": CUT_CHOSEN}
    writer = StageWriter(tmp_path / "pairs", "pairs", "test")
    writer.count_read(len(rows))
    stats = {"generated_rows": 0, "truncated_responses": 0}
    write_generated(writer, pa.Table.from_pylist(rows, schema=GENERATED_SCHEMA), stats)
    manifest = writer.close()
    assert manifest["rows_written"] == 7 and manifest["filtered"] == {CUT_CHOSEN: 1}
    assert stats == {"generated_rows": 7, "truncated_responses": 2}  # m1's and m3's cut rejected sides, counted
    assert "t:m2" not in {r["id"] for r in read_rows(tmp_path / "pairs").to_pylist()}


def test_empty_generations_are_errors_with_the_row_id(tmp_path, tokenizer):
    # the same functions the Ray stage runs (fill_missing in the actor, write_generated in the driver)
    engine = HFEngine(eos_only_model(tokenizer.eos_token_id), tokenizer=tokenizer)
    cfg = config(tmp_path)
    rows = fill_missing(mixture_rows(), engine, response_policy(cfg), pair_sampling(cfg))
    writer = StageWriter(tmp_path / "pairs", "pairs", "test")
    writer.count_read(len(rows))
    stats = {"generated_rows": 0, "truncated_responses": 0}
    write_generated(writer, pa.Table.from_pylist(rows, schema=GENERATED_SCHEMA), stats)
    manifest = writer.close()
    # rows with a pair went through untouched; the three that needed text got none
    assert manifest["rows_written"] == 5 and manifest["failed"] == {"empty generation": 3}
    assert stats == {"generated_rows": 5, "truncated_responses": 0}
    errors = [json.loads(line) for line in (tmp_path / "pairs" / "errors.jsonl").read_text().splitlines()]
    assert [(e["id"], e["field"]) for e in errors] == [("t:m1", "rejected"), ("t:m2", "chosen"), ("t:m3", "rejected")]
    assert all(e["reason"].startswith("empty generation") and e["source"] == "t" for e in errors)
    with pytest.raises(ErrorBudgetExceeded, match="3 of 8 rows failed"):
        writer.check_budget(0.05)
