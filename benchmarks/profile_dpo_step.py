"""Where one DPO optimizer step spends its time: our step functions on one device, no Ray, under torch.profiler.

The same code path as a Ray Train worker (``StepSpec``, ``build_policy``, ``initialize_engine``,
``optimizer_step``) on fabricated batches of a random-init Llama shape, so GPU kernels and host gaps can be
read without the trainer around them. Prints the mean step time over timed steps, then the top operators by
device time (or CPU time on CPU) of a profiled step.

    python benchmarks/profile_dpo_step.py --device cuda --shape 1b
    python benchmarks/profile_dpo_step.py --device cuda --shape 135m --set train.logprob_chunk_size=null
    python benchmarks/profile_dpo_step.py --shape 135m-narrow --pairs 2 --prompt-tokens 4 --response-tokens 4 \
        --rows 0 --count-ops --set train.bf16=true --set train.zero_stage=0   # what a step dispatches

On GPU the engine is bf16 at ZeRO-1 (DeepSpeed's BF16_Optimizer, see deepspeed_config.py); on CPU fp32 ZeRO-0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def fabricated_batch(pairs: int, prompt: int, response: int, vocab: int, seed: int):
    import torch

    from eqrlhf.train.batching import collate_sequences

    gen = torch.Generator().manual_seed(seed)
    # chosen row b and rejected row b + pairs share their prompt, as collate() builds them (train.share_prompt)
    prompts = [torch.randint(0, vocab, (prompt,), generator=gen).tolist() for _ in range(pairs)] * 2
    responses = [torch.randint(0, vocab, (response,), generator=gen).tolist() for _ in range(2 * pairs)]
    ref = [(-torch.rand(response, generator=gen) * 5).tolist() for _ in range(2 * pairs)]
    batch = collate_sequences(prompts, responses, 0, {"ref_token_logps": ref})
    batch["is_chosen"] = torch.tensor([i < pairs for i in range(2 * pairs)])
    batch["truncated_fraction"] = torch.tensor(0.0)
    return batch


def main() -> None:
    from dpo_vs_trl import SHAPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="135m")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, default=448)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=25, help="operators in the profile table (0: timing only)")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. train.zero_stage=2")
    parser.add_argument("--phases", action="store_true", help="host ms per step in forward, backward and step")
    parser.add_argument("--count-ops", action="store_true", help="operators and host syncs per phase of a step")
    args = parser.parse_args()

    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from eqrlhf.config import apply_override, from_dict
    from eqrlhf.train.core import build_policy
    from eqrlhf.train.deepspeed_config import build_ds_config, initialize_engine
    from eqrlhf.train.loop import StepSpec, optimizer_step

    cuda = args.device == "cuda"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    root = Path(tempfile.mkdtemp(prefix="eqrlhf-profile-"))
    vocab = 49152
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=True, **SHAPES[args.shape])
    ).save_pretrained(root / "model")
    tree = {
        "run": {"name": "profile", "output_dir": str(root), "seed": 0},
        "model": {"name_or_path": str(root / "model"), "max_length": 4096},
        "algorithm": {"loss": "dpo", "beta": 0.1, "reference": "precomputed"},
        "train": {
            "use_gpu": cuda,
            "bf16": cuda,
            "zero_stage": 1 if cuda else 0,
            "micro_batch_size": args.pairs,
            "lr": 1e-6,
        },
    }
    for item in args.set:
        apply_override(tree, item)
    cfg = from_dict(tree)
    spec = StepSpec.from_config(cfg)
    engine = initialize_engine(
        build_policy(cfg, scalar=spec.kind == "scalar"), build_ds_config(cfg.train, 1), cuda, lr_scheduler=None
    )
    shutil.rmtree(root, ignore_errors=True)  # the model is loaded: leave no 0.5-4 GB copy behind
    engine.train()
    batches = [fabricated_batch(args.pairs, args.prompt_tokens, args.response_tokens, vocab, seed) for seed in range(4)]
    tokens = int(batches[0]["attention_mask"].sum())

    def step(i: int) -> None:
        optimizer_step(engine, None, [batches[i % len(batches)]], spec, cfg.train.grad_accum)

    for i in range(3):
        step(i)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    print(
        f"{args.shape} {args.device} overrides={args.set}: {seconds * 1e3:.1f} ms/step, "
        f"{tokens / seconds:,.0f} tokens/s, peak {peak:.1f} GiB"
    )
    if args.phases:  # host time per phase of the step, without the profiler's per-op overhead
        phase_times(engine, step, cuda, args.steps)
    if args.count_ops:
        count_ops(engine, step)
    if args.rows == 0:
        return
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        step(0)
        if cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))


class Phases:
    """Wraps the engine's forward, backward and step so that a step's work can be charged to each phase."""

    NAMES = ("forward", "backward", "step")

    def __init__(self, engine):
        self.engine, self.current, self.seconds = engine, "other", dict.fromkeys(self.NAMES, 0.0)

    def __enter__(self):
        self.originals = {name: getattr(self.engine, name) for name in self.NAMES}
        for name, call in self.originals.items():
            setattr(self.engine, name, self._timed(name, call))
        return self

    def __exit__(self, *exc):
        for name, call in self.originals.items():
            setattr(self.engine, name, call)

    def _timed(self, name, call):
        def wrapper(*args, **kwargs):
            started, self.current = time.perf_counter(), name
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started
                self.current = "other"

        return wrapper


def phase_times(engine, step, cuda: bool, steps: int) -> None:
    """Host milliseconds per step spent inside DeepSpeed's forward, backward and step calls, and the rest.

    The host returns from a call as soon as its kernels are queued, so on a GPU these are launch and Python
    costs; a step whose host total exceeds its device time is bound by the host.
    """
    import torch

    with Phases(engine) as phases:
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for i in range(steps):
            step(i)
        if cuda:
            torch.cuda.synchronize()
        total = (time.perf_counter() - started) / steps * 1e3
    shown = ", ".join(f"{name} {seconds / steps * 1e3:.1f}" for name, seconds in phases.seconds.items())
    rest = total - sum(phases.seconds.values()) / steps * 1e3
    print(f"host ms per step: {shown}, everything else {rest:.1f} (wall {total:.1f} ms/step)")


def count_ops(engine, step) -> None:
    """Operators and host syncs per phase of one step (``op_count.py``; a GPU run would use DeepSpeed's
    FusedAdam where a CPU run uses torch's AdamW, which only changes the step phase at ZeRO-0)."""
    from op_count import OpCounter

    with Phases(engine) as phases, OpCounter(lambda: phases.current) as counter:
        step(0)
    total = sum(counter.ops.values())
    print(f"one step: {total} operators, {sum(counter.syncs.values())} host syncs")
    for line in counter.lines((*Phases.NAMES, "other")):
        print("  " + line)


if __name__ == "__main__":
    main()
