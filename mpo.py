"""Mixed Preference Optimization (Gou & Nguyen 2024): SFT, a reward model, then DPO on the pairs the
reward model finds easy and PPO on the prompts it finds hard.

This file holds the method and the entry point, in pipeline order: the SFT stage, the reward-model stage,
then (below them) scoring and the reward-gap split, the two-stage pipeline, evaluation and the CLI.
Every stage takes encoded rows from data.encode_dataset and runs through train.train.

    from mpo import SFTConfig, sft, RMConfig, train_reward_model
    policy, metrics = sft(gpt, encoded_examples, SFTConfig(), "out/run")
    rm, metrics = train_reward_model(ScalarModel.from_gpt(base), encoded_pairs, RMConfig(), "out/run")

Tests: python -m pytest -q tests/test_stages.py
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import collate_pairs, collate_sft
from train import TrainConfig, autocast, pick_device, to_device, train


@dataclass
class SFTConfig(TrainConfig):
    # DeepSpeed-Chat step 1 (the author's code base): lr 9.65e-6, no weight decay, cosine, no warm-up.
    lr: float = 9.65e-6
    batch_size: int = 8
    grad_accum: int = 4
    epochs: float = 1.0


def sft_loss(model, batch):
    """Mean next-token cross-entropy over response tokens + EOS; prompt and pad positions are masked."""
    tokens, mask = batch["tokens"], batch["loss_mask"]
    start = max(int(batch["prompt_lens"].min()) - 1, 0)  # no LM head on positions that predict prompt
    logits = model(tokens, logits_from=start)[:, :-1]
    targets = tokens[:, start + 1:].masked_fill(~mask[:, start + 1:], -100)  # -100: ignored
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100), {}


def sft(model, examples, cfg: SFTConfig, out_dir, eval_examples=None):
    """Supervised fine-tuning on (prompt_ids, response_ids); returns (model, metrics) with the train and
    eval loss and perplexity (exp of the mean token loss)."""
    metrics = train(model, sft_loss, examples, eval_examples, cfg, out_dir, "sft", collate_sft)
    for split in ("train", "eval"):
        if f"{split}/loss" in metrics:
            metrics[f"{split}/ppl"] = math.exp(metrics[f"{split}/loss"])
    return model, metrics


@dataclass
class RMConfig(TrainConfig):
    # DeepSpeed-Chat step 2 for small models: lr 5e-5, weight decay 0.1, cosine, 1 epoch (RMs overfit
    # preference data fast; N+ uses lr 3e-6). Effective batch 64 = DS-Chat's 8 per GPU x 8 GPUs.
    lr: float = 5e-5
    batch_size: int = 8
    grad_accum: int = 8
    epochs: float = 1.0
    weight_decay: float = 0.1
    margin: float = 0.0        # Bradley-Terry margin: chosen must win by this much (Llama 2)
    center_coef: float = 0.0   # reward centring, coef * (r_c + r_r)^2 (Eisenstein et al. 2023)
    init: str = "base"         # the pipeline starts the RM from "base" (author) or "sft"


def last_token_scores(rm, batch):
    """RM score of every row of a right-padded batch, read at its last real token (the EOS). No
    attention mask: causal attention already hides the pads that follow (the fast SDPA path)."""
    values = rm(batch["tokens"])
    return values.gather(1, (batch["lengths"] - 1)[:, None]).squeeze(1).float()


def bradley_terry_loss(chosen, rejected, margin=0.0, center_coef=0.0):
    """Per-pair loss -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2, shape (B,)."""
    return -F.logsigmoid(chosen - rejected - margin) + center_coef * (chosen + rejected) ** 2


GAP_BUCKETS = ((0, 1, "[0,1)"), (1, 2, "[1,2)"), (2, 3, "[2,3)"), (3, math.inf, ">=3"))


def accuracy_by_gap(gaps, by=None) -> dict:
    """Share of pairs with gap > 0 (chosen scored above rejected), bucketed by |by| (default |gaps|):
    the paper's table of RM accuracy against the RM score gap (61 / 81 / 90 / 97 % on HH-RLHF).
    Returns {bucket: {"accuracy": share or None when empty, "pairs": count}}."""
    gaps = torch.as_tensor(gaps, dtype=torch.float)
    size = gaps.abs() if by is None else torch.as_tensor(by, dtype=torch.float).abs()
    out = {}
    for low, high, name in GAP_BUCKETS:
        inside = (size >= low) & (size < high)
        n = int(inside.sum())
        out[name] = {"accuracy": float((gaps[inside] > 0).float().mean()) if n else None, "pairs": n}
    return out


@torch.no_grad()
def batch_scores(rm, rows, collate, batch_size, device) -> list:
    """RM scores of encoded rows, one tensor per batch (for pairs: the chosen rows, then the rejected)."""
    rm.eval()
    scores = []
    for i in range(0, len(rows), batch_size):
        with autocast(device):
            scores.append(last_token_scores(rm, to_device(collate(rows[i:i + batch_size]), device)).cpu())
    return scores


def score_pairs(rm, pairs, batch_size, device):
    """(chosen_scores, rejected_scores), each (N,), of encoded (prompt, chosen, rejected) triples."""
    chosen, rejected = zip(*(s.chunk(2) for s in batch_scores(rm, pairs, collate_pairs, batch_size, device)))
    return torch.cat(chosen), torch.cat(rejected)


def train_reward_model(rm, pairs, cfg: RMConfig, out_dir, eval_pairs=None, reference_examples=None):
    """Train a ScalarModel on encoded pairs with the Bradley-Terry loss; returns (rm, metrics). With
    `reference_examples` (encoded SFT (prompt, response) rows), the head's offset is then set so they
    score 0 on average (N+ reward normalisation)."""
    def loss_fn(model, batch):
        scores = last_token_scores(model, batch)
        chosen, rejected = scores.chunk(2)  # collate_pairs: chosen rows first, then rejected
        loss = bradley_terry_loss(chosen, rejected, cfg.margin, cfg.center_coef).mean()
        return loss, {"accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).detach().mean(),
                      "chosen": chosen.detach().mean(), "rejected": rejected.detach().mean()}

    metrics = train(rm, loss_fn, pairs, eval_pairs, cfg, out_dir, "rm", collate_pairs, key_metric="accuracy")
    device = pick_device(cfg.device)
    if eval_pairs:
        chosen, rejected = score_pairs(rm, eval_pairs, cfg.batch_size, device)
        metrics["eval/accuracy_by_gap"] = accuracy_by_gap(chosen - rejected)
    if reference_examples:
        rm.offset.zero_()  # scores are head output - offset: measure them without one
        rm.offset.fill_(torch.cat(batch_scores(rm, reference_examples, collate_sft, cfg.batch_size, device)).mean())
        metrics["offset"] = float(rm.offset)
    return rm, metrics
