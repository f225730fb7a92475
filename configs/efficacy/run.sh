#!/usr/bin/env bash
# The efficacy experiment (configs/efficacy/README.md), every step in order. Resumable: a step whose output
# is complete (a final checkpoint, an eval.json, a stage manifest) is skipped, so an interrupted run picks
# up where it stopped; each finished evaluation is copied to docs/results/efficacy/<arm>/ (eval.json,
# completions.jsonl, report.md and the configs that produced it). Run from the repository root with
# EQRLHF_DATA pointing at the shared datasets and the categorizer head fitted
# (eqrlhf categorize-train -c configs/categorizer.yaml):
#   bash configs/efficacy/run.sh            (logs: runs/efficacy/logs/)
set -euo pipefail
E=".venv/bin/eqrlhf"
R=runs/efficacy
C=configs/efficacy
mkdir -p $R/logs
step() { echo "== $(date +%T) $*"; }
done_if() { [[ -e "$1" ]] && { echo "   done already ($1)"; return 0; } || return 1; }

evaluate() {  # evaluate <test|dev> <arm> <model> <config files that trained it...>; dev is for choosing recipes
  local split=$1 arm=$2 model=$3 sfx="" out=docs/results/efficacy/$2
  [[ $split == dev ]] && sfx=_dev out=docs/results/efficacy/dev/$2
  shift 3
  done_if $R/eval$sfx/$arm/eval.json || $E evaluate -c $C/evaluate$sfx.yaml eval.model=$model eval.tag=$arm \
    > $R/logs/eval${sfx}_$arm.log 2>&1
  mkdir -p $out
  cp $R/eval$sfx/$arm/{eval.json,completions.jsonl,report.md} $C/evaluate$sfx.yaml "$@" $out/
}

step "SFT arm: categorize, mix 300 + 300, fine-tune"
done_if $R/categorized/manifest.json || $E categorize -c $C/sft.yaml > $R/logs/categorize.log 2>&1
done_if $R/mixture_sft/manifest.json || $E mix -c $C/sft.yaml > $R/logs/mix_sft.log 2>&1
done_if $R/sft/final/config.json || $E train -c $C/sft.yaml > $R/logs/sft.log 2>&1
step "recipe data: categorize (Alpaca added), mix 200 + 300"  # before any evaluation: its leakage check reads it
done_if $R/categorized_dpo/manifest.json || $E categorize -c $C/pairs.yaml > $R/logs/categorize_dpo.log 2>&1
done_if $R/mixture_dpo/manifest.json || $E mix -c $C/pairs.yaml > $R/logs/mix_dpo.log 2>&1

step "evaluate base and SFT"
evaluate test base smollm2-135m
evaluate test sft $R/sft/final $C/sft.yaml

step "recipe: on-policy judged pairs from the SFT model, DPO"
done_if $R/pairs_dpo/manifest.json || $E pairs -c $C/pairs.yaml > $R/logs/pairs_dpo.log 2>&1
done_if $R/dpo/final/config.json || $E train -c $C/dpo.yaml > $R/logs/dpo.log 2>&1
step "evaluate the recipe"
evaluate test sft_dpo $R/dpo/final $C/sft.yaml $C/pairs.yaml $C/dpo.yaml
step "second recipe: harmful pairs with both answers sampled from the SFT model, DPO one epoch"
done_if $R/mixture_onpolicy/manifest.json || $E mix -c $C/pairs_onpolicy.yaml > $R/logs/mix_onpolicy.log 2>&1
done_if $R/pairs_onpolicy/manifest.json || $E pairs -c $C/pairs_onpolicy.yaml > $R/logs/pairs_onpolicy.log 2>&1
done_if $R/dpo_onpolicy/final/config.json || $E train -c $C/dpo_onpolicy.yaml > $R/logs/dpo_onpolicy.log 2>&1
evaluate test sft_dpo_onpolicy $R/dpo_onpolicy/final $C/sft.yaml $C/pairs_onpolicy.yaml $C/dpo_onpolicy.yaml
step "dev split: base, SFT; AMA-DPO and DPO on the second recipe's pairs (same pairs, same budget)"
evaluate dev base smollm2-135m
evaluate dev sft $R/sft/final $C/sft.yaml
done_if $R/scored_onpolicy/manifest.json || $E score -c $C/ama_dpo_onpolicy.yaml > $R/logs/score_onpolicy.log 2>&1
done_if $R/ama_dpo_onpolicy/final/config.json || $E train -c $C/ama_dpo_onpolicy.yaml \
  > $R/logs/ama_dpo_onpolicy.log 2>&1
evaluate dev sft_ama_dpo_onpolicy $R/ama_dpo_onpolicy/final $C/sft.yaml $C/pairs_onpolicy.yaml $C/ama_dpo_onpolicy.yaml
evaluate dev sft_dpo_onpolicy $R/dpo_onpolicy/final $C/sft.yaml $C/pairs_onpolicy.yaml $C/dpo_onpolicy.yaml
step "dev split: AMA-DPO with masks on the harmful pairs only (the scorer is right on those)"
done_if $R/scored_harmful_masks/manifest.json || $E score -c $C/ama_dpo_harmful_masks.yaml \
  > $R/logs/score_harmful_masks.log 2>&1
done_if $R/ama_dpo_harmful_masks/final/config.json || $E train -c $C/ama_dpo_harmful_masks.yaml \
  > $R/logs/ama_dpo_harmful_masks.log 2>&1
evaluate dev sft_ama_dpo_harmful_masks $R/ama_dpo_harmful_masks/final $C/sft.yaml $C/pairs_onpolicy.yaml \
  $C/ama_dpo_onpolicy.yaml $C/ama_dpo_harmful_masks.yaml
step "dev split: a less overly safe warm start (200 refusals + 700 benign answers, Alpaca's written by the base)"
done_if $R/mixture_sft_balanced/manifest.json || $E mix -c $C/sft_balanced.yaml > $R/logs/mix_sft_balanced.log 2>&1
done_if $R/pairs_sft_balanced/manifest.json || $E pairs -c $C/sft_balanced.yaml > $R/logs/pairs_sft_balanced.log 2>&1
done_if $R/sft_balanced/final/config.json || $E train -c $C/sft_balanced.yaml > $R/logs/sft_balanced.log 2>&1
evaluate dev sft_balanced $R/sft_balanced/final $C/sft.yaml $C/sft_balanced.yaml
step "dev split: on-policy pairs from the balanced warm start; AMA-DPO and DPO on them"
done_if $R/pairs_balanced/manifest.json || $E pairs -c $C/pairs_balanced.yaml > $R/logs/pairs_balanced.log 2>&1
done_if $R/scored_balanced/manifest.json || $E score -c $C/ama_dpo_balanced.yaml > $R/logs/score_balanced.log 2>&1
done_if $R/ama_dpo_balanced/final/config.json || $E train -c $C/ama_dpo_balanced.yaml \
  > $R/logs/ama_dpo_balanced.log 2>&1
evaluate dev sft_balanced_ama_dpo $R/ama_dpo_balanced/final $C/sft.yaml $C/sft_balanced.yaml $C/pairs_onpolicy.yaml \
  $C/pairs_balanced.yaml $C/dpo_onpolicy.yaml $C/ama_dpo_onpolicy.yaml $C/ama_dpo_balanced.yaml
done_if $R/dpo_balanced/final/config.json || $E train -c $C/dpo_balanced.yaml > $R/logs/dpo_balanced.log 2>&1
evaluate dev sft_balanced_dpo $R/dpo_balanced/final $C/sft.yaml $C/sft_balanced.yaml $C/pairs_onpolicy.yaml \
  $C/pairs_balanced.yaml $C/dpo_onpolicy.yaml $C/dpo_balanced.yaml
done_if $R/bfpo_balanced/final/config.json || $E train -c $C/bfpo_balanced.yaml > $R/logs/bfpo_balanced.log 2>&1
evaluate dev sft_balanced_bfpo $R/bfpo_balanced/final $C/sft.yaml $C/sft_balanced.yaml $C/pairs_onpolicy.yaml \
  $C/pairs_balanced.yaml $C/dpo_onpolicy.yaml $C/dpo_balanced.yaml $C/bfpo_balanced.yaml
step "dev split: the balanced warm start with its answers written to completion (no answer cut mid-sentence)"
done_if $R/pairs_sft_uncut/manifest.json || $E pairs -c $C/sft_uncut.yaml > $R/logs/pairs_sft_uncut.log 2>&1
done_if $R/sft_uncut/final/config.json || $E train -c $C/sft_uncut.yaml > $R/logs/sft_uncut.log 2>&1
evaluate dev sft_uncut $R/sft_uncut/final $C/sft.yaml $C/sft_balanced.yaml $C/sft_uncut.yaml
step "dev split: pairs weighted to benign look-alikes (3 of 4 prompts CoCoNot), DPO from the balanced warm start"
done_if $R/categorized_benign_heavy/manifest.json || $E categorize -c $C/pairs_benign_heavy.yaml \
  > $R/logs/categorize_benign_heavy.log 2>&1
done_if $R/mixture_benign_heavy/manifest.json || $E mix -c $C/pairs_benign_heavy.yaml > $R/logs/mix_benign_heavy.log 2>&1
done_if $R/pairs_benign_heavy/manifest.json || $E pairs -c $C/pairs_benign_heavy.yaml \
  > $R/logs/pairs_benign_heavy.log 2>&1
done_if $R/dpo_benign_heavy/final/config.json || $E train -c $C/dpo_benign_heavy.yaml > $R/logs/dpo_benign_heavy.log 2>&1
evaluate dev sft_balanced_dpo_benign_heavy $R/dpo_benign_heavy/final $C/sft.yaml $C/sft_balanced.yaml \
  $C/pairs_onpolicy.yaml $C/pairs_balanced.yaml $C/pairs_benign_heavy.yaml $C/dpo_onpolicy.yaml $C/dpo_balanced.yaml \
  $C/dpo_benign_heavy.yaml
step "dev split: a second round of benign-heavy pairs, sampled from the first round's DPO model"
done_if $R/mixture_round2/manifest.json || $E mix -c $C/pairs_round2.yaml > $R/logs/mix_round2.log 2>&1
done_if $R/pairs_round2/manifest.json || $E pairs -c $C/pairs_round2.yaml > $R/logs/pairs_round2.log 2>&1
done_if $R/dpo_round2/final/config.json || $E train -c $C/dpo_round2.yaml > $R/logs/dpo_round2.log 2>&1
evaluate dev sft_balanced_dpo_round2 $R/dpo_round2/final $C/sft.yaml $C/sft_balanced.yaml $C/pairs_onpolicy.yaml \
  $C/pairs_balanced.yaml $C/pairs_benign_heavy.yaml $C/pairs_round2.yaml $C/dpo_onpolicy.yaml $C/dpo_balanced.yaml \
  $C/dpo_benign_heavy.yaml $C/dpo_round2.yaml
step "dev split: step 12's DPO at max length 640, no pair cut"
done_if $R/dpo_benign_heavy_len640/final/config.json || $E train -c $C/dpo_benign_heavy_len640.yaml \
  > $R/logs/dpo_benign_heavy_len640.log 2>&1
evaluate dev sft_balanced_dpo_benign_heavy_len640 $R/dpo_benign_heavy_len640/final $C/sft.yaml $C/sft_balanced.yaml \
  $C/pairs_onpolicy.yaml $C/pairs_balanced.yaml $C/pairs_benign_heavy.yaml $C/dpo_onpolicy.yaml $C/dpo_balanced.yaml \
  $C/dpo_benign_heavy.yaml $C/dpo_benign_heavy_len640.yaml
step "dev split: the FDC pool (embedding categorizer, judged on-policy pairs from the balanced warm start)"
done_if $R/categorized_fdc/manifest.json || $E categorize -c $C/pairs_fdc_pool.yaml > $R/logs/categorize_fdc.log 2>&1
done_if $R/mixture_fdc_pool/manifest.json || $E mix -c $C/pairs_fdc_pool.yaml > $R/logs/mix_fdc_pool.log 2>&1
done_if $R/pairs_fdc_pool/manifest.json || $E pairs -c $C/pairs_fdc_pool.yaml > $R/logs/pairs_fdc_pool.log 2>&1
mkdir -p docs/results/efficacy/dev/manifests
cp $R/pairs_fdc_pool/manifest.json docs/results/efficacy/dev/manifests/pairs_fdc_pool.json
for sweep in scale_dpo_all scale_fdc_ama; do
  step "dev split: the scaling sweep $sweep"
  done_if $R/sweep/$sweep/results.csv || $E sweep -c $C/sweep_$sweep.yaml > $R/logs/sweep_$sweep.log 2>&1
  out=docs/results/efficacy/dev/sweep_$sweep
  mkdir -p $out
  cp $R/sweep/$sweep/{results.csv,results.md,pareto.png} $C/sweep_$sweep.yaml $out/
  for ev in $R/sweep/$sweep/trials/*/eval/*/; do  # every trial's evaluation, for paired tests
    trial=$(basename "${ev%/eval/*}")
    mkdir -p $out/$trial && cp "$ev"{eval.json,completions.jsonl,report.md} $out/$trial/
  done
done
step "dev split: the SFT arm with seed 1 (the seed-to-seed spread)"
done_if $R/mixture_sft_seed1/manifest.json || $E mix -c $C/sft_seed1.yaml > $R/logs/mix_sft_seed1.log 2>&1
done_if $R/sft_seed1/final/config.json || $E train -c $C/sft_seed1.yaml > $R/logs/sft_seed1.log 2>&1
evaluate dev sft_seed1 $R/sft_seed1/final $C/sft.yaml $C/sft_seed1.yaml
step "dev split: FDC + AMA-DPO at scale 50 with a reward-model scorer trained on the pool's other pairs"
done_if $R/mixture_fdc50/manifest.json || $E mix -c $C/ama_dpo_fdc_rm.yaml > $R/logs/mix_fdc50.log 2>&1
done_if $R/pairs_fdc50/manifest.json || $E pairs -c $C/ama_dpo_fdc_rm.yaml > $R/logs/pairs_fdc50.log 2>&1
done_if $R/mixture_rm_heldout/manifest.json || $E mix -c $C/reward_fdc_heldout.yaml > $R/logs/mix_rm_heldout.log 2>&1
done_if $R/pairs_rm_heldout/manifest.json || $E pairs -c $C/reward_fdc_heldout.yaml > $R/logs/pairs_rm_heldout.log 2>&1
done_if $R/reward_fdc_heldout/final/config.json || $E train -c $C/reward_fdc_heldout.yaml \
  > $R/logs/reward_fdc_heldout.log 2>&1
done_if $R/scored_fdc50_rm/manifest.json || $E score -c $C/ama_dpo_fdc_rm.yaml > $R/logs/score_fdc50_rm.log 2>&1
done_if $R/ama_dpo_fdc50_rm/final/config.json || $E train -c $C/ama_dpo_fdc_rm.yaml > $R/logs/ama_dpo_fdc50_rm.log 2>&1
evaluate dev sft_balanced_fdc_ama_rm $R/ama_dpo_fdc50_rm/final $C/sft_balanced.yaml $C/pairs_fdc_pool.yaml \
  $C/sweep_scale_dpo_all.yaml $C/sweep_scale_fdc_dpo.yaml $C/sweep_scale_fdc_ama.yaml $C/reward_fdc_heldout.yaml \
  $C/ama_dpo_fdc_rm.yaml
out=docs/results/efficacy/dev/sft_balanced_fdc_ama_rm
cp $R/scored_fdc50_rm/manifest.json $out/score_manifest.json
cp $R/reward_fdc_heldout/manifest.json $out/reward_model_manifest.json
cp $R/mixture_rm_heldout/manifest.json $out/reward_mixture_manifest.json
done_if $R/dpo_fdc50/final/config.json || $E train -c $C/dpo_fdc50.yaml > $R/logs/dpo_fdc50.log 2>&1
evaluate dev sft_balanced_fdc_dpo50 $R/dpo_fdc50/final $C/sft_balanced.yaml $C/pairs_fdc_pool.yaml \
  $C/sweep_scale_dpo_all.yaml $C/sweep_scale_fdc_dpo.yaml $C/ama_dpo_fdc_rm.yaml $C/dpo_fdc50.yaml
O="ama.categories=[EHD,IHD,MHD] ama.output=$R/scored_fdc50_rm_harmful train.input=$R/scored_fdc50_rm_harmful"
O="$O train.output=$R/ama_dpo_fdc50_rm_harmful"  # the same arm with the mask on the harmful pairs only
done_if $R/scored_fdc50_rm_harmful/manifest.json || $E score -c $C/ama_dpo_fdc_rm.yaml $O \
  > $R/logs/score_fdc50_rm_harmful.log 2>&1
done_if $R/ama_dpo_fdc50_rm_harmful/final/config.json || $E train -c $C/ama_dpo_fdc_rm.yaml $O \
  > $R/logs/ama_dpo_fdc50_rm_harmful.log 2>&1
evaluate dev sft_balanced_fdc_ama_rm_harmful_masks $R/ama_dpo_fdc50_rm_harmful/final $C/sft_balanced.yaml \
  $C/pairs_fdc_pool.yaml $C/sweep_scale_dpo_all.yaml $C/sweep_scale_fdc_dpo.yaml $C/sweep_scale_fdc_ama.yaml \
  $C/reward_fdc_heldout.yaml $C/ama_dpo_fdc_rm.yaml
cp $R/scored_fdc50_rm_harmful/manifest.json docs/results/efficacy/dev/sft_balanced_fdc_ama_rm_harmful_masks/score_manifest.json
step "dev split: step 12's benign-heavy pairs sampled from plain SFT (seed 1), DPO from it"
done_if $R/pairs_sft_benign_heavy/manifest.json || $E pairs -c $C/pairs_sft_benign_heavy.yaml \
  > $R/logs/pairs_sft_benign_heavy.log 2>&1
done_if $R/dpo_sft_benign_heavy/final/config.json || $E train -c $C/dpo_sft_benign_heavy.yaml \
  > $R/logs/dpo_sft_benign_heavy.log 2>&1
# the config chain behind every arm trained on step 19's pairs (copied beside each arm's results)
SFT_PAIRS_CHAIN="$C/sft.yaml $C/sft_seed1.yaml $C/pairs_onpolicy.yaml $C/pairs_balanced.yaml $C/pairs_benign_heavy.yaml
  $C/pairs_sft_benign_heavy.yaml $C/dpo_onpolicy.yaml $C/dpo_balanced.yaml $C/dpo_benign_heavy.yaml
  $C/dpo_sft_benign_heavy.yaml"
evaluate dev sft_dpo_benign_heavy $R/dpo_sft_benign_heavy/final $SFT_PAIRS_CHAIN
drawn_down_arm() {  # drawn_down_arm <key> <configs dpo_sft_<key>.yaml extends...>: step 19's pairs drawn down, DPO
  local k=$1 f=$C/dpo_sft_$1.yaml
  shift
  done_if $R/mixture_sft_$k/manifest.json || $E mix -c $f > $R/logs/mix_sft_$k.log 2>&1
  done_if $R/pairs_sft_$k/manifest.json || $E pairs -c $f > $R/logs/pairs_sft_$k.log 2>&1
  done_if $R/dpo_sft_$k/final/config.json || $E train -c $f > $R/logs/dpo_sft_$k.log 2>&1
  evaluate dev sft_dpo_$k $R/dpo_sft_$k/final $SFT_PAIRS_CHAIN "$@" $f
  cp $R/mixture_sft_$k/manifest.json docs/results/efficacy/dev/sft_dpo_$k/mixture_manifest.json
}
drawn_down_arm mid_mix                              # 19b: 40% harmful
drawn_down_arm mix45 $C/dpo_sft_mid_mix.yaml        # 19c: 45% harmful
drawn_down_arm mid_mix_seed1 $C/dpo_sft_mid_mix.yaml  # 19d: 19b with run.seed 1
done_if $R/ppo_lagrangian_sft/final/config.json || $E train -c $C/ppo_lagrangian_sft.yaml \
  > $R/logs/ppo_lagrangian_sft.log 2>&1
evaluate dev sft_ppo_lagrangian $R/ppo_lagrangian_sft/final $C/sft.yaml $C/sft_seed1.yaml configs/ppo_cpu.yaml \
  configs/ppo_lagrangian_cpu.yaml $C/ppo_lagrangian_sft.yaml
step finished
