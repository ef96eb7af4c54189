#!/usr/bin/env bash
# The paper's recipes for one GPU, one line per stage (Gou & Nguyen 2024; the author's DeepSpeed-Chat
# scripts). Every stage saves OUT/<stage>/final.pt; a line whose stage is already done loads it and goes
# on, so edit a line's flags, delete that stage's folder (and the ones after it), and run the script
# again. Usage: bash train.sh [hh-rlhf|tldr] [gpt2|gpt2-medium]     (default: hh-rlhf gpt2)
# Multi-GPU: replace `python` with `torchrun --nproc_per_node=N`.
set -euo pipefail
DATASET=${1:-hh-rlhf}
MODEL=${2:-gpt2}
OUT=out/$DATASET-$MODEL
if [ "$DATASET" = tldr ]; then DELTA=2; else DELTA=1; fi  # author: delta 1 on HH-RLHF, 2 on TL;DR
if [ "$MODEL" = gpt2-medium ]; then MB=4; ACC=32; else MB=8; ACC=16; fi  # same effective batch, less memory
RUN="python mpo.py --dataset $DATASET --init $MODEL --out $OUT --max_prompt_len 256 --max_response_len 256 --seed 0"

# 1. SFT on prompt + chosen response (DeepSpeed-Chat step 1: lr 9.65e-6, cosine, 1 epoch)
$RUN --stop_after sft --sft.lr 9.65e-6 --sft.batch_size $MB --sft.grad_accum $((ACC / 2)) --sft.epochs 1 --sft.decay cosine --sft.warmup_steps 0 --sft.weight_decay 0

# 2. Reward model from the base model (author), Bradley-Terry on the human pairs (DeepSpeed-Chat step 2)
$RUN --stop_after rm --rm.init base --rm.lr 5e-5 --rm.batch_size $MB --rm.grad_accum $((ACC / 2)) --rm.epochs 1 --rm.weight_decay 0.1

# 3. Pairs to split: two SFT samples per training prompt (T 1.0, top-k 50, top-p 0.9) ranked by the RM
$RUN --stop_after split --split.source resample --split.delta $DELTA

# 4. MPO stage 1: DPO on the easy pairs, policy and reference from SFT (beta 0.3, lr 5e-6, batch 128, 1 epoch)
$RUN --stop_after mpo_dpo --methods mpo --split.delta $DELTA --dpo.beta 0.3 --dpo.lr 5e-6 --dpo.batch_size $MB --dpo.grad_accum $ACC --dpo.epochs 1

# 5. MPO stage 2: PPO on the hard prompts, policy and KL reference = the DPO model, critic from the RM
$RUN --stop_after mpo --methods mpo --split.delta $DELTA --ppo.kl_coef 0.4 --ppo.kl_clamp true --ppo.actor_lr 3e-6 --ppo.critic_lr 5e-6 --ppo.prompts_per_step 16 --ppo.samples_per_prompt 2 --ppo.ppo_epochs 1 --ppo.passes 1 --ppo.reward_clip 5 --ppo.gamma 1.0 --ppo.lam 0.95 --ppo.clip_range 0.2 --ppo.clip_range_value 0.2

# 6. Baselines (SFT, DPO on all pairs, PPO on all prompts) with the same stage flags, then evaluation and report.md
$RUN --methods dpo_all,ppo_all,mpo --split.delta $DELTA --dpo.beta 0.3 --dpo.lr 5e-6 --dpo.batch_size $MB --dpo.grad_accum $ACC --ppo.kl_coef 0.4 --ppo.actor_lr 3e-6 --ppo.critic_lr 5e-6 --eval.prompts 500
