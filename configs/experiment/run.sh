#!/usr/bin/env bash
# The Equilibrate experiment on CPU, every command in order (docs/RESULTS.md). Run from the repository root
# with EQRLHF_DATA pointing at the shared datasets. Stages that already finished are not rerun by hand:
# delete runs/experiment to start over.
set -euo pipefail
E=".venv/bin/eqrlhf"
T="-c configs/experiment/train.yaml"
step() { echo "== $(date +%T) $*"; }

step categorize;  $E categorize -c configs/experiment/data.yaml
for arm in all fdc; do
  step "mix $arm";  $E mix -c configs/experiment/mix_$arm.yaml && $E pairs -c configs/experiment/mix_$arm.yaml
done
step "reward model on the FDC pairs"
$E train $T algorithm.loss=reward train.input=runs/experiment/pairs_fdc train.output=runs/experiment/reward_fdc \
  train.micro_batch_size=2 train.grad_accum=2
for arm in fdc all; do
  step "score $arm";  $E score -c configs/experiment/score.yaml ama.input=runs/experiment/pairs_$arm \
    ama.output=runs/experiment/scored_$arm
done
for arm in fdc all; do
  step "AMA-DPO $arm"; $E train $T algorithm.loss=ama_dpo algorithm.reference=precomputed \
    train.input=runs/experiment/scored_$arm train.output=runs/experiment/ama_dpo_$arm
  step "DPO $arm";     $E train $T algorithm.loss=dpo algorithm.reference=precomputed \
    train.input=runs/experiment/scored_$arm train.output=runs/experiment/dpo_$arm
done
