"""The transformers rollout engine on a tiny random Llama with the real SmolLM2 tokenizer.

The model has SmolLM2's vocabulary (49152) so the real chat template and tokenizer run,
but hidden size 64, so a generate call takes milliseconds. Its output head is scaled up
to make the distribution peaked: log-prob checks then compare numbers that differ.
"""

from __future__ import annotations

import math

import pytest
import torch

from eqrlhf.config import from_dict
from eqrlhf.models.loading import load_tokenizer, tiny_llama
from eqrlhf.rollout import Sampling, make_engine
from eqrlhf.rollout.base import RolloutEngine
from eqrlhf.rollout.hf_engine import HFEngine, sampling_logprobs

VOCAB = 49152
PROMPTS = [
    [{"role": "user", "content": "How do I kill a Python process?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


def peaked_tiny(seed: int = 0):
    model = tiny_llama(vocab_size=VOCAB, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # logits of order 10: a peaked, input-dependent distribution
    return model


@pytest.fixture()
def engine(tokenizer):
    return HFEngine(peaked_tiny(), tokenizer=tokenizer, batch_size=4)


def forward_logprobs(model, prompt_ids: list[int], tokens: list[int], temperature: float = 1.0) -> list[float]:
    """Log-probs of ``tokens`` after ``prompt_ids`` from one unpadded forward pass."""
    ids = torch.tensor([prompt_ids + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()


def test_engine_satisfies_protocol_and_reports_health(engine):
    assert isinstance(engine, RolloutEngine)
    engine.generate(PROMPTS, Sampling(max_new_tokens=2, n=2))
    health = engine.health()
    assert health["engine"] == "hf" and health["device"] == "cpu" and health["dtype"] == "float32"
    assert health["requests_served"] == 2 and health["completions_served"] == 4


def test_greedy_is_deterministic_and_logprobs_match_a_forward_pass(engine):
    first = engine.generate(PROMPTS, Sampling(max_new_tokens=6))
    second = engine.generate(PROMPTS, Sampling(max_new_tokens=6))
    assert [c.token_ids for c in first] == [c.token_ids for c in second]
    assert [c.prompt_index for c in first] == [0, 1]
    # the two prompts differ in length, so the shorter one was left-padded in the batch
    assert len(first[0].prompt_token_ids) != len(first[1].prompt_token_ids)
    for completion, conversation in zip(first, PROMPTS):
        expected_prompt = engine.tokenizer.apply_chat_template(conversation, add_generation_prompt=True)["input_ids"]
        assert completion.prompt_token_ids == expected_prompt  # no padding in what is returned
        assert completion.finish_reason == "length" and len(completion.token_ids) == 6
        assert engine.pad_id not in completion.token_ids
        reference = forward_logprobs(engine.model, completion.prompt_token_ids, completion.token_ids)
        assert completion.logprobs == pytest.approx(reference, abs=1e-4)
        assert min(completion.logprobs) < -0.01  # a real distribution, not a trivially certain one


def test_n_samples_ordered_by_prompt_then_sample(engine):
    out = engine.generate(PROMPTS, Sampling(max_new_tokens=5, temperature=1.0, n=3, seed=7))
    assert [c.prompt_index for c in out] == [0, 0, 0, 1, 1, 1]
    assert len({tuple(c.token_ids) for c in out[:3]}) > 1  # samples of one prompt differ
    assert all(len(c.token_ids) == 5 and len(c.logprobs) == 5 for c in out)


def test_seeded_sampling_is_reproducible_and_independent_of_batch_composition(engine):
    sampling = Sampling(max_new_tokens=6, temperature=0.9, n=2, seed=123)
    a = engine.generate(PROMPTS, sampling)
    b = engine.generate(PROMPTS, sampling)
    alone = engine.generate(PROMPTS[:1], sampling)
    other_seed = engine.generate(PROMPTS, Sampling(max_new_tokens=6, temperature=0.9, n=2, seed=124))
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.token_ids for c in alone] == [c.token_ids for c in a[:2]]
    assert [c.token_ids for c in other_seed] != [c.token_ids for c in a]


def test_sampling_logprobs_are_under_the_tempered_distribution(engine):
    out = engine.generate(PROMPTS[:1], Sampling(max_new_tokens=5, temperature=0.7, seed=1))[0]
    reference = forward_logprobs(engine.model, out.prompt_token_ids, out.token_ids, temperature=0.7)
    assert out.logprobs == pytest.approx(reference, abs=1e-4)


def test_top_p_truncates_and_renormalises_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    # mass before each token: 0, 0.5, 0.8, 0.95 -> top_p 0.7 keeps the first two, 0.5/0.8 and 0.3/0.8
    logp = sampling_logprobs(logits, temperature=1.0, top_p=0.7)[0]
    assert logp[:2].tolist() == pytest.approx([math.log(0.625), math.log(0.375)], abs=1e-6)
    assert logp[2:].tolist() == [float("-inf"), float("-inf")]
    # temperature 2 over probs p gives p^(1/2) renormalised
    sqrt = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    assert sampling_logprobs(logits, 2.0, 1.0)[0].exp().tolist() == pytest.approx((sqrt / sqrt.sum()).tolist())


def test_top_p_sampling_only_emits_tokens_of_the_nucleus(engine):
    out = engine.generate(PROMPTS, Sampling(max_new_tokens=4, temperature=1.0, top_p=0.5, n=3, seed=3))
    for completion in out:
        ids = torch.tensor([completion.prompt_token_ids + completion.token_ids])
        with torch.no_grad():
            logits = engine.model(ids).logits[0, len(completion.prompt_token_ids) - 1 : -1]
        probs = torch.softmax(logits, dim=-1)
        for step, token in enumerate(completion.token_ids):
            # the probability mass of tokens more likely than the chosen one stays below top_p
            mass_before = probs[step][probs[step] > probs[step, token]].sum().item()
            assert mass_before < 0.5
            nucleus = probs[step][probs[step] >= probs[step, token]].sum().item()
            assert completion.logprobs[step] >= math.log(probs[step, token].item()) - 1e-5
            assert completion.logprobs[step] <= math.log(probs[step, token].item() / min(nucleus, 1.0)) + 1e-4


def test_stop_at_eos_is_reported_and_kept_in_token_ids(tokenizer):
    eos = tokenizer.eos_token_id
    engine = HFEngine(tiny_llama(vocab_size=VOCAB), tokenizer=tokenizer)
    # make EOS the argmax everywhere: the residual stream is just the embedding, whose
    # coordinate 0 is positive, the final norm keeps only that coordinate, and only the
    # EOS row of the output head reads it
    layers = engine.model.config.num_hidden_layers
    embed = engine.model.model.embed_tokens.weight.detach().clone()
    embed[:, 0] = 1.0
    head = torch.zeros(VOCAB, 64)
    head[eos, 0] = 10.0
    norm = torch.zeros(64)
    norm[0] = 1.0
    updates = [("model.embed_tokens.weight", embed), ("lm_head.weight", head), ("model.norm.weight", norm)]
    for i in range(layers):
        updates += [
            (f"model.layers.{i}.self_attn.o_proj.weight", torch.zeros(64, 64)),
            (f"model.layers.{i}.mlp.down_proj.weight", torch.zeros(64, 128)),
        ]
    engine.update_weights(updates)
    out = engine.generate(PROMPTS, Sampling(max_new_tokens=8))
    assert [(c.token_ids, c.finish_reason, c.text) for c in out] == [([eos], "stop", "")] * 2


def test_update_weights_changes_outputs_and_rejects_unknown_names(engine):
    before = engine.generate(PROMPTS, Sampling(max_new_tokens=6))
    other = peaked_tiny(seed=1)
    engine.update_weights([("lm_head.weight", other.lm_head.weight.detach().clone())])
    after = engine.generate(PROMPTS, Sampling(max_new_tokens=6))
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    assert torch.equal(engine.model.lm_head.weight, other.lm_head.weight)
    with pytest.raises(KeyError, match=r"unknown parameter name\(s\) \['lm_head.wieght', 'extra.bias'\]"):
        engine.update_weights([("lm_head.wieght", torch.zeros(1)), ("extra.bias", torch.zeros(1))])
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(3,\), model expects \(64,\)"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))])


def test_make_engine_from_config_loads_a_saved_model(tmp_path, tokenizer):
    tiny_llama(vocab_size=VOCAB).save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    cfg = from_dict({"model": {"name_or_path": str(tmp_path)}, "generation": {"batch_size": 3, "device": "auto"}})
    engine = make_engine(cfg)
    assert engine.batch_size == 3 and engine.health()["model"] == str(tmp_path)
    assert len(engine.generate(PROMPTS, Sampling(max_new_tokens=2))) == 2
    # generation.engine=vllm is tested in test_vllm_engine_on_cpu.py
