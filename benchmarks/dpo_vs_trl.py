"""DPO training throughput: eqrlhf's trainer (Ray Train + DeepSpeed, one worker) vs trl's DPOTrainer.

Same model, same pairs, same batch (pairs per optimizer step), same sequence lengths, same precision,
same machine, in one invocation. Each side runs in its own subprocess so peak memory is its own.
Reference log-probs are precomputed for both sides by default (trl's `precompute_ref_log_probs=True`,
our `score` stage); the precompute pass is not counted for either.

    python benchmarks/dpo_vs_trl.py                                   # CPU, real SmolLM2-135M
    python benchmarks/dpo_vs_trl.py --device cuda --bf16 --shape 135m --response-tokens 448
    python benchmarks/dpo_vs_trl.py --device cuda --bf16 --shape 1b --response-tokens 448 --compile

Tokens/s counts the non-padding tokens of the policy forward (prompt + response, chosen and rejected)
per optimizer step, after the warm-up steps. MFU counts policy forward+backward only: 6 * params * tokens/s.
With ``--share-prompt`` our trainer computes each pair's prompt once: the tokens counted stay the same (the
work done for them is smaller), so its MFU figure then overstates what the hardware did.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

WORDS = "the model reads a long answer about safe cooking and careful travel in the quiet city".split()
SHAPES = {  # random-init Llama shapes (SmolLM2-135M and a ~1.2B model), vocab of the SmolLM2 tokenizer
    "135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3
    ),
    # SmolLM2-135M's depth and head layout at 1/8 of its width: compute is negligible, so a step's time on
    # any device is the host's per-operator cost (Python, dispatch, launches), the regime 135M is in on a GPU
    "135m-narrow": dict(
        hidden_size=72, intermediate_size=192, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3
    ),
    "1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8
    ),
}


def text_of(n_words: int, offset: int) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n_words))


def make_model_dir(args, root: Path) -> str:
    from eqrlhf.models.loading import load_tokenizer, resolve_model_path

    if args.shape is None:
        return resolve_model_path(args.model)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(args.tokenizer)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **SHAPES[args.shape],
    )
    torch.manual_seed(0)
    path = root / f"random-{args.shape}"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_pairs(args, root: Path) -> Path:
    """Synthetic pairs whose token lengths are close to the requested ones (one word ~ one token here)."""
    from eqrlhf.data.schema import Limits, make_row, rows_to_table
    from eqrlhf.manifest import StageWriter

    n = args.pairs_per_step * (args.steps + args.warmup)
    limits = Limits(max_prompt_chars=10**6, max_response_chars=10**6)
    rows = [
        make_row(
            source="bench",
            key=i,
            prompt=text_of(args.prompt_tokens, i),
            limits=limits,
            chosen=text_of(args.response_tokens, i + 1),
            rejected=text_of(args.response_tokens, i + 2),
            chosen_safe=True,
            rejected_safe=False,
            category="none",
        )
        for i in range(n)
    ]
    out = root / "pairs"
    writer = StageWriter(out, "pairs", "bench")
    writer.count_read(n)
    writer.write_rows(rows_to_table(rows))
    writer.close()
    return out


def common_cfg(args, root: Path, model_dir: str) -> dict:
    return {
        "run": {"name": "bench", "output_dir": str(root), "seed": 0},
        "model": {"name_or_path": model_dir, "max_length": args.prompt_tokens + args.response_tokens + 64},
        "algorithm": {"loss": "dpo", "beta": 0.1, "reference": args.reference},
    }


def run_ours(args, root: Path, model_dir: str) -> dict:
    from eqrlhf.config import from_dict
    from eqrlhf.train import run_train
    from eqrlhf.train.metrics import read_metrics

    tree = common_cfg(args, root, model_dir)
    pairs = root / "pairs"
    if args.reference == "precomputed":  # not timed: the reference pass, like trl's precompute
        from eqrlhf.data.score import run_score

        tree["ama"] = {
            "input": str(pairs),
            "output": str(root / "scored"),
            "batch_size": args.pairs_per_step,
            "num_gpus": 1.0 if args.device == "cuda" else 0.0,
        }
        run_score(from_dict(tree))
        pairs = root / "scored"
    tree["train"] = {
        "input": str(pairs),
        "output": str(root / "ours"),
        "num_workers": 1,
        "use_gpu": args.device == "cuda",
        "cpus_per_worker": os.cpu_count() if args.device == "cpu" else 1,  # trl uses every core too
        "zero_stage": args.zero_stage if args.zero_stage is not None else (1 if args.bf16 else 0),
        "bf16": args.bf16,
        "micro_batch_size": args.pairs_per_step // args.grad_accum,
        "grad_accum": args.grad_accum,
        "max_steps": args.steps + args.warmup,
        "lr": 1e-6,
        "lr_schedule": "constant",
        "save_every": 0,
        "grad_checkpointing": args.grad_checkpointing,
        "compile": args.compile,
        "share_prompt": args.share_prompt,
    }
    run_train(from_dict(tree))
    rows = read_metrics(root / "ours" / "metrics.jsonl")[args.warmup :]
    tokens = sum(r["tokens"] for r in rows)
    seconds = sum(r["time/step_s"] for r in rows)
    memory = max(r.get("memory/max_allocated_gib", r.get("memory/rss_gib", 0.0)) for r in rows)
    return {
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / len(rows),
        "tokens_per_step": tokens / len(rows),
        "peak_memory_gib": memory,
    }


def run_trl(args, root: Path, model_dir: str) -> dict:
    import resource

    import torch
    from datasets import Dataset
    from op_count import OpCounter
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    n = args.pairs_per_step * (args.steps + args.warmup)
    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": text_of(args.prompt_tokens, i)}],
                "chosen": [{"role": "assistant", "content": text_of(args.response_tokens, i + 1)}],
                "rejected": [{"role": "assistant", "content": text_of(args.response_tokens, i + 2)}],
            }
            for i in range(n)
        ]
    )
    cuda = args.device == "cuda"
    times: list[float] = []
    tokens: list[int] = []

    counted = {}

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            # --count-ops: the last warm-up step (untimed) runs under the operator counter
            self.counter = OpCounter() if args.count_ops and len(times) == args.warmup - 1 else None
            if self.counter:
                self.counter.__enter__()
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            if self.counter:
                self.counter.__exit__(None, None, None)
                counted.update(ops=self.counter.ops["all"], syncs=self.counter.syncs["all"])

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = DPOConfig(
        output_dir=str(root / "trl"),
        per_device_train_batch_size=args.pairs_per_step // args.grad_accum,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps + args.warmup,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        beta=0.1,
        bf16=args.bf16,
        use_cpu=not cuda,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        max_length=args.prompt_tokens + args.response_tokens + 64,
        precompute_ref_log_probs=args.reference == "precomputed",
        gradient_checkpointing=args.grad_checkpointing,
        use_liger_kernel=args.liger,
        torch_compile=args.side == "trl_compiled",
        dataloader_drop_last=True,
        seed=0,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[Timer()])
    for ex in trainer.train_dataset:  # same token definition as ours: prompt + response, both sides
        tokens.append(2 * len(ex["prompt_ids"]) + len(ex["chosen_ids"]) + len(ex["rejected_ids"]))
    trainer.train()
    steady = times[args.warmup :]
    tokens_per_step = sum(tokens) / (args.steps + args.warmup)
    memory = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "tokens_per_s": tokens_per_step * len(steady) / sum(steady),
        "step_s": sum(steady) / len(steady),
        "tokens_per_step": tokens_per_step,
        "peak_memory_gib": memory / 2**30,
        **counted,
    }


def param_count(model_dir: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model (used when --shape is not given)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random-init model of this shape instead")
    parser.add_argument("--tokenizer", default="smollm2-135m", help="tokenizer for --shape models (name or dir)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--pairs-per-step", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, default=192)
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="untimed first steps (with 2, trl's slow early steps were still timed on an H100)",
    )
    parser.add_argument("--reference", choices=["precomputed", "in_trainer"], default="precomputed")
    parser.add_argument(
        "--zero-stage", type=int, help="ours; default 1 with --bf16 (BF16_Optimizer, fp32 gradients), else 0"
    )
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="ours: train.compile (compiled layers and log-probs)")
    parser.add_argument(
        "--share-prompt", action="store_true", help="ours: train.share_prompt (each pair's prompt computed once)"
    )
    parser.add_argument("--trl-compile", action="store_true", help="also run trl with torch_compile=True")
    parser.add_argument(
        "--count-ops",
        action="store_true",
        help="trl: operators and host syncs of one step (ours: profile_dpo_step.py --count-ops)",
    )
    parser.add_argument("--liger", action="store_true", help="trl: use_liger_kernel (needs liger-kernel, GPU)")
    parser.add_argument("--peak-tflops", type=float, default=787.0, help="matmul peak for MFU (H100 measured)")
    parser.add_argument("--side", choices=["ours", "trl", "trl_compiled"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:  # child process: run one side, print its JSON result last
        root = Path(args.root)
        model_dir = (root / "model_dir.txt").read_text()
        result = (run_ours if args.side == "ours" else run_trl)(args, root, model_dir)
        print("RESULT " + json.dumps(result))
        return

    root = Path(tempfile.mkdtemp(prefix="eqrlhf-bench-"))
    try:  # the model copy, pairs and both trainers' checkpoints take ~2 GB per invocation
        compare(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def compare(args, root: Path) -> None:
    """Run both sides in their own subprocesses on the same model and pairs; print the table and the ratio."""
    model_dir = make_model_dir(args, root)
    (root / "model_dir.txt").write_text(model_dir)
    write_pairs(args, root)
    results = {}
    for side in ("ours", "trl", "trl_compiled") if args.trl_compile else ("ours", "trl"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--side", side, "--root", str(root)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"{side} failed (exit {proc.returncode})")
        results[side] = json.loads(lines[-1][len("RESULT ") :])
    params = param_count(model_dir)
    what = args.shape and f"random-init {args.shape} shape" or args.model
    print(
        f"\nDPO throughput: {what} ({params / 1e6:.0f}M params), {args.device}, "
        f"{'bf16' if args.bf16 else 'fp32'}, {args.pairs_per_step} pairs/step, ~{args.prompt_tokens}+"
        f"{args.response_tokens} tokens, reference {args.reference}, {args.steps} timed steps after {args.warmup}"
    )
    print("| trainer | tokens/s | s/step | tokens/step | peak memory GiB | policy MFU |")
    print("|---|---|---|---|---|---|")
    for side, r in results.items():
        mfu = 6 * params * r["tokens_per_s"] / (args.peak_tflops * 1e12) if args.device == "cuda" else float("nan")
        print(
            f"| {side} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {r['tokens_per_step']:.0f} | "
            f"{r['peak_memory_gib']:.2f} | {mfu:.1%} |"
        )
    best = max((side for side in results if side != "ours"), key=lambda side: results[side]["tokens_per_s"])
    print(f"ratio ours/{best} (the faster trl): {results['ours']['tokens_per_s'] / results[best]['tokens_per_s']:.2f}x")
    for side, r in results.items():
        if "ops" in r:
            print(f"{side}: one step dispatched {r['ops']} operators with {r['syncs']} host syncs")


if __name__ == "__main__":
    main()
