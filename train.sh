#!/usr/bin/env bash
# The paper's recipes for one GPU, one line per stage (Gou & Nguyen 2024; the author's DeepSpeed-Chat
# scripts). Every line passes the same flags (FLAGS) and differs only in --stop_after: a stage records the
# flags it was made with (OUT/<stage>/settings.json), a line whose stage is already done loads it and goes
# on, and a rerun whose flags differ from a stage's record is refused. To change a setting, edit FLAGS and
# run the script again with --redo: it redoes the stages the change reaches and keeps the others.
# Usage: bash train.sh [hh-rlhf|tldr] [gpt2|gpt2-medium] [more mpo.py flags, e.g. --redo]  (default: hh-rlhf gpt2)
# Multi-GPU: replace `python` with `torchrun --nproc_per_node=N`.
set -euo pipefail
DATASET=${1:-hh-rlhf}
MODEL=${2:-gpt2}
EXTRA=("${@:3}")
OUT=out/$DATASET-$MODEL
if [ "$DATASET" = tldr ]; then DELTA=2; else DELTA=1; fi  # author: delta 1 on HH-RLHF, 2 on TL;DR
if [ "$MODEL" = gpt2-medium ]; then MB=4; ACC=32; else MB=8; ACC=16; fi  # same effective batch, less memory
FLAGS=(
  --dataset "$DATASET" --init "$MODEL" --out "$OUT" --max_prompt_len 512 --max_response_len 256 --seed 0
  --methods dpo_all,ppo_all,mpo --eval.prompts 500
  # SFT on prompt + chosen response (author: lr 5e-5, 500 warm-up steps, cosine, 1 epoch)
  --sft.lr 5e-5 --sft.warmup_steps 500 --sft.batch_size $MB --sft.grad_accum $((ACC / 4)) --sft.epochs 1
  --sft.decay cosine --sft.weight_decay 0
  # Reward model from the base model, Bradley-Terry on the human pairs (author: lr 5e-6; DS-Chat: decay 0.1)
  --rm.init base --rm.lr 5e-6 --rm.batch_size $MB --rm.grad_accum $((ACC / 2)) --rm.epochs 1 --rm.weight_decay 0.1
  # Pairs to split: two SFT samples per comparison row (T 1.0, top-k 50, top-p 0.9) ranked by the RM
  --split.source resample --split.pairs_per_row true --split.delta $DELTA
  # DPO (MPO stage 1 on the easy pairs, and the dpo_all baseline): beta 0.3, lr 5e-6, 100 warm-up steps,
  # batch 128, 1 epoch
  --dpo.beta 0.3 --dpo.lr 5e-6 --dpo.warmup_steps 100 --dpo.batch_size $MB --dpo.grad_accum $ACC --dpo.epochs 1
  # PPO (MPO stage 2 on the hard prompts from the DPO model, and the ppo_all baseline); critic from the RM;
  # warm-up 100 iterations then cosine, no advantage whitening (author)
  --ppo.kl_coef 0.4 --ppo.kl_clamp true --ppo.actor_lr 3e-6 --ppo.critic_lr 5e-6 --ppo.warmup_steps 100
  --ppo.decay cosine --ppo.whiten_advantages false --ppo.prompts_per_step 16 --ppo.samples_per_prompt 2
  --ppo.ppo_epochs 1 --ppo.passes 1 --ppo.reward_clip 5 --ppo.gamma 1.0 --ppo.lam 0.95 --ppo.clip_range 0.2
  --ppo.clip_range_value 0.2
)
RUN=(python mpo.py "${FLAGS[@]}" "${EXTRA[@]}")

# In the pipeline's order: SFT, the reward model, the pairs and their split, the baselines (DPO on all pairs,
# PPO on all prompts), MPO's DPO on the easy pairs, MPO's PPO on the hard prompts; then the evaluation and report.md.
"${RUN[@]}" --stop_after sft
"${RUN[@]}" --stop_after rm
"${RUN[@]}" --stop_after split
"${RUN[@]}" --stop_after dpo_all
"${RUN[@]}" --stop_after ppo_all
"${RUN[@]}" --stop_after mpo_dpo
"${RUN[@]}" --stop_after mpo
"${RUN[@]}"
