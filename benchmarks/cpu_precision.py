"""Forward + backward of the SmolLM2-135M shape on CPU in three precisions: float32, bfloat16 autocast over
float32 weights (``train.autocast``) and bfloat16 weights (``train.bf16``), at the micro-batch sizes a CPU run
uses. Prints seconds per pass, tokens/s and the ratio to float32, all from the same invocation.

    python benchmarks/cpu_precision.py --threads 1 --batch 2 4 8 --tokens 110

bfloat16 is fast only on CPUs with bf16 matrix units (AMX: Sapphire Rapids and later; see ``lscpu | grep amx``);
elsewhere autocast can be slower than float32. Random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def seconds_per_pass(model, ids: torch.Tensor, autocast: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first pass warms the allocator and the kernels' caches: not counted
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids).logits
        logits.float().log_softmax(-1).mean().backward()
        times.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a Ray Train worker gets its CPUs)")
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 4, 8], help="sequences per pass")
    parser.add_argument("--tokens", type=int, default=110, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **SMOLLM2_135M)
    float_model = AutoModelForCausalLM.from_config(config)
    bf16_model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    print(f"threads {args.threads}, {args.tokens} tokens a sequence, median of {args.repeats} passes")
    print("| sequences | float32 s | autocast s | bf16 weights s | autocast / float32 speed | bf16 / float32 speed |")
    print("|---|---|---|---|---|---|")
    for batch in args.batch:
        ids = torch.randint(0, config.vocab_size, (batch, args.tokens))
        fp32 = seconds_per_pass(float_model, ids, False, args.repeats)
        autocast = seconds_per_pass(float_model, ids, True, args.repeats)
        bf16 = seconds_per_pass(bf16_model, ids, False, args.repeats)
        print(f"| {batch} | {fp32:.2f} | {autocast:.2f} | {bf16:.2f} | {fp32 / autocast:.2f}x | {fp32 / bf16:.2f}x |")


if __name__ == "__main__":
    main()
