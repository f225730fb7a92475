"""The engine pool on real Ray with transformers engines, plus the pure helpers of weight sync.

Engines serve a tiny random Llama with SmolLM2's vocabulary and chat template, saved as
safetensors; its output head is scaled up so greedy decoding is peaked and does not
depend on batch composition. The vLLM engine behind the same pool is tested in
test_vllm_engine_on_cpu.py.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from eqrlhf.config import from_dict
from eqrlhf.models.loading import load_tokenizer, tiny_llama
from eqrlhf.rollout.base import Sampling
from eqrlhf.rollout.hf_engine import HFEngine
from eqrlhf.rollout.pool import EnginePool, chunk_sampling, split_evenly
from eqrlhf.rollout.vllm_engine import cpu_bind_spec
from eqrlhf.rollout.weight_sync import (
    bucket_named_tensors,
    check_bucket,
    expected_shapes,
    logprob_gap,
    pack_bucket,
    packed_entries,
    to_wire,
    unpack_bucket,
)

VOCAB = 49152
PROMPTS = [[{"role": "user", "content": f"Question number {i}: how do I stop process {i}?"}] for i in range(5)]


def peaked_tiny(seed: int):
    model = tiny_llama(vocab_size=VOCAB, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


# -- pure helpers -------------------------------------------------------------------


def test_split_evenly_covers_every_prompt_once_in_order():
    assert split_evenly(5, 2) == [(0, 2), (2, 5)]
    assert split_evenly(1, 4) == [(0, 1)]
    assert split_evenly(0, 3) == []
    assert split_evenly(7, 3) == [(0, 2), (2, 4), (4, 7)]
    base = Sampling(seed=5, temperature=1.0)
    assert chunk_sampling(base, 0) is base
    assert chunk_sampling(base, 2).seed == 5 * 7919 + 2 and chunk_sampling(base, 2).temperature == 1.0


def test_cpu_bind_spec_gives_engines_disjoint_cores():
    assert cpu_bind_spec([0, 1], 0, 1) is None  # one engine per machine: vLLM decides
    assert [cpu_bind_spec([0, 1], k, 2) for k in range(2)] == ["0", "1"]
    assert [cpu_bind_spec([0, 1, 2, 3], k, 2, tensor_parallel_size=2) for k in range(2)] == ["0|1", "2|3"]
    assert [cpu_bind_spec([0, 1, 2, 3, 4, 5], k, 2) for k in range(2)] == ["0,1,2", "3,4,5"]
    assert [cpu_bind_spec([7], k, 2) for k in range(2)] == ["7", "7"]  # fewer cores than engines: shared


def test_logprob_gap_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, float("nan")]])
    engine = torch.tensor([[-1.5, -2.0, -2.0], [-0.5, -0.75, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert logprob_gap(trainer, engine, mask) == pytest.approx((0.5 + 0 + 0 + 0.5) / 4)  # NaN masked out
    assert logprob_gap([[-1.0], [-2.0, -3.0]], [[-1.1], [-2.0, -3.3]]) == pytest.approx(0.4 / 3)
    with pytest.raises(ValueError, match="sequence 1 has 2 trainer and 1 engine"):
        logprob_gap([[-1.0], [-2.0, -3.0]], [[-1.0], [-2.0]])
    with pytest.raises(ValueError, match="non-finite"):
        logprob_gap(trainer, engine)


def test_buckets_pack_and_unpack_exactly():
    a, b, c = torch.arange(4.0), torch.ones(4), torch.zeros(2, 2)  # 16 bytes each
    big = torch.arange(20.0)  # 80 bytes: larger than a bucket, travels alone
    buckets = list(bucket_named_tensors([("a", a), ("b", b), ("big", big), ("c", c)], bucket_bytes=40))
    assert [[name for name, _ in bucket] for bucket in buckets] == [["a", "b"], ["big"], ["c"]]
    bf16 = torch.tensor([[1.5, -2.25, 3.0]], dtype=torch.bfloat16)
    packed = pack_bucket([("w", bf16), ("c", c)])
    for form in (packed, to_wire(packed)):  # object-store form and vLLM rpc form
        (name, tensor), (_, square) = unpack_bucket(form)
        assert name == "w" and tensor.dtype == torch.bfloat16 and torch.equal(tensor, bf16)
        assert square.shape == (2, 2)
    with pytest.raises(ValueError, match="bucket_bytes must be >= 1"):
        list(bucket_named_tensors([("a", a)], 0))


def test_expected_shapes_and_bucket_checks(tmp_path):
    model = tiny_llama(vocab_size=300, seed=0)
    model.config.tie_word_embeddings = True
    model.save_pretrained(tmp_path, safe_serialization=True)
    shapes = expected_shapes(tmp_path)
    assert shapes["model.embed_tokens.weight"] == (300, 64)
    assert shapes["lm_head.weight"] == (300, 64)  # tied: not stored, but in every state_dict
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (64, 64)
    good = pack_bucket([("model.norm.weight", torch.ones(64))])
    check_bucket(packed_entries(good), shapes, "tiny")
    with pytest.raises(KeyError, match="unknown parameter name 'model.nrom.weight' for model tiny"):
        check_bucket(packed_entries(pack_bucket([("model.nrom.weight", torch.ones(64))])), shapes, "tiny")
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(32,\), model tiny expects \(64,\)"):
        check_bucket(packed_entries(pack_bucket([("model.norm.weight", torch.ones(32))])), shapes, "tiny")
    # a flat bucket's entries (CUDA IPC, broadcast) are checked the same way
    check_bucket([("model.norm.weight", "bfloat16", (64,), 128)], shapes, "tiny")
    with pytest.raises(ValueError, match=r"'model.norm.weight' carries 64 bytes, bfloat16\[64\] needs 128"):
        check_bucket([("model.norm.weight", "bfloat16", (64,), 64)], shapes, "tiny")


def test_pool_refuses_bad_settings_before_taking_resources(tmp_path):
    with pytest.raises(ValueError, match="tensor_parallel_size > 1 needs generation.engine=vllm"):
        EnginePool(from_dict({"generation": {"engine": "hf"}, "rollout": {"tensor_parallel_size": 2}}))
    shared_gpu = {"gpus_per_engine": 0.5, "gpu_memory_utilization": 0.85}
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.85 is more than .* rollout.gpus_per_engine=0.5"):
        EnginePool(from_dict({"generation": {"engine": "vllm"}, "rollout": shared_gpu}))
    with pytest.raises(ValueError, match="sync_method=cuda_ipc needs engines on a GPU"):
        EnginePool(from_dict({"rollout": {"sync_method": "cuda_ipc"}}))
    with pytest.raises(FileNotFoundError, match="model directory not found: ./no/such/model"):
        EnginePool(from_dict({"model": {"name_or_path": "./no/such/model"}}))


# -- the pool on Ray ----------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    tokenizer = load_tokenizer("smollm2-135m")
    dirs = {}
    for seed in (0, 1):
        path = tmp_path_factory.mktemp(f"tiny{seed}")
        peaked_tiny(seed).save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
        dirs[seed] = path
    return dirs


def pool_config(model_dir, **rollout):
    return from_dict(
        {
            "model": {"name_or_path": str(model_dir)},
            "generation": {"engine": "hf", "batch_size": 4, "device": "cpu"},
            "rollout": {"num_engines": 2, "cpus_per_engine": 1, **rollout},
        }
    )


@pytest.fixture(scope="module")
def pool(ray_local, model_dirs):
    with EnginePool(pool_config(model_dirs[0], sync_timeout_s=120)) as pool:
        yield pool


def state_dict_of(path):
    from eqrlhf.models.loading import load_causal_lm

    return load_causal_lm(str(path)).state_dict()


def token_ids(completions):
    return [c.token_ids for c in completions]


def test_two_engines_answer_in_prompt_order_like_one_engine(pool, model_dirs):
    sampling = Sampling(max_new_tokens=6, n=2)
    completions = pool.generate(PROMPTS, sampling)
    assert [c.prompt_index for c in completions] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    local = HFEngine(str(model_dirs[0]), batch_size=4).generate(PROMPTS, sampling)
    assert token_ids(completions) == token_ids(local)
    assert [c.prompt_token_ids for c in completions] == [c.prompt_token_ids for c in local]
    health = pool.health()
    assert [h["engine"] for h in health] == ["hf", "hf"] and len({h["pid"] for h in health}) == 2
    assert sorted(h["requests_served"] for h in health) == [2, 3]  # prompts 0-1 on one engine, 2-4 on the other


def test_update_weights_reaches_every_engine_and_bad_names_change_nothing(pool, model_dirs):
    sampling = Sampling(max_new_tokens=6)
    before = token_ids(pool.generate(PROMPTS, sampling))
    new_weights = state_dict_of(model_dirs[1])
    stats = pool.update_weights(new_weights.items(), bucket_bytes=2**20)
    assert stats["tensors"] == len(new_weights) and stats["buckets"] > 2 and stats["sync_seconds"] > 0
    after = token_ids(pool.generate(PROMPTS, sampling))
    assert after == token_ids(HFEngine(str(model_dirs[1]), batch_size=4).generate(PROMPTS, sampling))
    assert after != before
    with pytest.raises(KeyError, match="unknown parameter name 'model.layers.9.mlp.up_proj.weight'"):
        pool.update_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(128, 64))])
    assert token_ids(pool.generate(PROMPTS, sampling)) == after and pool.restarts == [0, 0]
    pool.update_weights(state_dict_of(model_dirs[0]).items())
    assert token_ids(pool.generate(PROMPTS, sampling)) == before


def test_pool_is_used_from_another_worker_and_logs_the_logprob_gap(ray_local, pool, model_dirs):
    # Ray Train workers get train_loop_config the same way (pickled through the object store); a
    # TorchTrainer costs tens of seconds more on 2 cores for no extra coverage of the pool

    def use_pool_elsewhere(pool, new_model: str) -> dict:
        """Runs in another worker process; nested so that Ray pickles it by value (workers cannot import tests)."""
        from eqrlhf.models.loading import load_causal_lm
        from eqrlhf.rollout.weight_sync import completion_logprobs

        sampling = Sampling(max_new_tokens=6)
        before = [c.token_ids for c in pool.generate(PROMPTS, sampling)]
        model = load_causal_lm(new_model)
        probe = (PROMPTS[:2], lambda completions: completion_logprobs(model, completions))
        stats = pool.update_weights(model.state_dict().items(), probe=probe)
        after = [c.token_ids for c in pool.generate(PROMPTS, sampling)]
        return {"before": before, "after": after, "stats": stats}

    pool.update_weights(state_dict_of(model_dirs[0]).items())
    remote = ray_local.remote(num_cpus=0.5)(use_pool_elsewhere)
    result = ray_local.get(remote.remote(pool, str(model_dirs[1])))
    sampling = Sampling(max_new_tokens=6)
    assert result["before"] == token_ids(HFEngine(str(model_dirs[0]), batch_size=4).generate(PROMPTS, sampling))
    assert result["after"] == token_ids(HFEngine(str(model_dirs[1]), batch_size=4).generate(PROMPTS, sampling))
    assert 0 <= result["stats"]["logprob_gap"] < 1e-4  # same weights, same float32 forward
    assert token_ids(pool.generate(PROMPTS, sampling)) == result["after"]  # the driver's handles see the update
    assert pool.restarts == [0, 0]


def run_in_thread(fn, *args):
    box = {}

    def target():
        try:
            box["result"] = fn(*args)
        except BaseException as err:  # handed to the test thread
            box["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def generate_and_kill_engine_1(ray_local, pool, prompts, sampling, took: float):
    """Run ``pool.generate`` in a thread and kill engine 1 a quarter of the way through.

    ``took`` is how long the same call took before. A fixed one-second sleep raced fast
    machines: engine 1 had finished its share before the kill, so nothing was restarted.
    """
    thread, box = run_in_thread(pool.generate, prompts, sampling)
    time.sleep(took / 4)
    ray_local.kill(pool._engines[1], no_restart=True)
    thread.join(timeout=600)
    return thread, box


def test_killed_engine_is_restarted_with_current_weights_and_nothing_is_lost(ray_local, pool, model_dirs):
    pool.update_weights(state_dict_of(model_dirs[1]).items())
    prompts = PROMPTS * 8  # 40 prompts; 20 per engine, 4 at a time: several seconds of work
    sampling = Sampling(max_new_tokens=48)
    started = time.perf_counter()
    expected = token_ids(pool.generate(prompts, sampling))
    old_pid = pool.health()[1]["pid"]
    thread, box = generate_and_kill_engine_1(ray_local, pool, prompts, sampling, time.perf_counter() - started)
    assert "error" not in box, box.get("error")
    completions = box["result"]
    assert pool.restarts == [0, 1]
    assert [c.prompt_index for c in completions] == list(range(40))  # none lost, none duplicated
    assert token_ids(completions) == expected  # the new engine got the updated weights back
    assert pool.health()[1]["pid"] != old_pid


def test_sync_timeout_fails_fast_and_the_pool_heals(pool, model_dirs):
    pool.cfg.rollout.sync_timeout_s = 0.5
    restarts = list(pool.restarts)
    busy = Sampling(max_new_tokens=48, n=40)  # one prompt: a single chunk that keeps engine 0 busy for seconds
    thread, box = run_in_thread(pool.generate, PROMPTS[:1], busy)
    time.sleep(0.5)
    new_weights = state_dict_of(model_dirs[0])
    started = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"engine\(s\) \[0\] did not finish within rollout.sync_timeout_s=0.5"):
        pool.update_weights(new_weights.items())
    assert time.perf_counter() - started < 15  # 0.5 s and the object store, not the generation in the way
    pool.cfg.rollout.sync_timeout_s = 120
    thread.join(timeout=600)
    assert "error" not in box, box.get("error")
    assert [c.prompt_index for c in box["result"]] == [0] * 40  # engine 0 was stopped, restarted, asked again
    assert pool.restarts == [restarts[0] + 1, restarts[1]]
    # engine 1 took the update, engine 0 was restarted with it: both answer like the seed-0 checkpoint
    local = HFEngine(str(model_dirs[0]), batch_size=4).generate(PROMPTS, Sampling(max_new_tokens=6))
    assert token_ids(pool.generate(PROMPTS, Sampling(max_new_tokens=6))) == token_ids(local)


def test_restart_that_outlasts_the_timeout_fails_and_a_later_call_heals(ray_local, pool, model_dirs):
    prompts, sampling = PROMPTS * 8, Sampling(max_new_tokens=48)
    started = time.perf_counter()
    expected = token_ids(pool.generate(prompts, sampling))
    took = time.perf_counter() - started
    restarts = list(pool.restarts)
    pool.cfg.rollout.sync_timeout_s = 0.05  # shorter than any engine start (the actor imports and loads a model)
    thread, box = generate_and_kill_engine_1(ray_local, pool, prompts, sampling, took)
    assert isinstance(box.get("error"), TimeoutError), box
    assert "restarted engine 1 was not up within rollout.sync_timeout_s=0.05 s" in str(box["error"])
    pool.cfg.rollout.sync_timeout_s = 120
    assert token_ids(pool.generate(prompts, sampling)) == expected  # the next call restarts engine 1 again
    assert pool.restarts == [restarts[0], restarts[1] + 2]


def test_broadcast_sync_through_a_process_group_survives_a_restart(ray_local, pool, model_dirs):
    # rollout.sync_method=broadcast: the driver and both engines form a gloo group here (NCCL on GPUs)
    pool.cfg.rollout.sync_method = "broadcast"
    sampling = Sampling(max_new_tokens=6)
    try:
        stats = pool.update_weights(state_dict_of(model_dirs[1]).items(), bucket_bytes=2**20)
        assert stats["buckets"] > 2 and pool._group is not None
        seed1 = token_ids(HFEngine(str(model_dirs[1]), batch_size=4).generate(PROMPTS, sampling))
        assert token_ids(pool.generate(PROMPTS, sampling)) == seed1
        restarts = list(pool.restarts)
        ray_local.kill(pool._engines[0], no_restart=True)
        assert token_ids(pool.generate(PROMPTS, sampling)) == seed1  # restarted from the kept host copies
        assert pool.restarts == [restarts[0] + 1, restarts[1]] and pool._group is None
        pool.update_weights(state_dict_of(model_dirs[0]).items())  # a new group, with the new engine in it
        seed0 = token_ids(HFEngine(str(model_dirs[0]), batch_size=4).generate(PROMPTS, sampling))
        assert token_ids(pool.generate(PROMPTS, sampling)) == seed0
    finally:
        pool.cfg.rollout.sync_method = "object_store"
