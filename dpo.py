"""Direct Preference Optimization (Rafailov et al. 2023): the loss, response log-probs, and the DPO
stage.

MPO's stage 1 runs DPO on the "easy" pairs, policy and reference both starting from the SFT model
(Gou & Nguyen 2024: the first of the two stages). As in the reference implementation (Rafailov,
Mitchell et al.): chosen and rejected rows go through one concatenated forward; a response's
log-prob is the SUM of its token log-probs (prompt and pads masked, the appended EOS included); the
reference is frozen. With h the difference of log-ratios,

    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]
    DPO:   -log sigmoid(beta h)                                   (Rafailov et al. 2023, eq. 7)
    cDPO:  -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (Mitchell 2023, noisy labels)
    IPO:   (h - 1/(2 beta))^2                                     (Azar et al. 2023, eq. 17)

    from dpo import DPOConfig, dpo
    policy, metrics = dpo(policy, ref, encoded_pairs, DPOConfig(beta=0.3), "out/run")

`encoded_pairs`: (prompt_ids, chosen_ids, rejected_ids) from data.encode_dataset. Left to the lab
(lab/speed.py): the fast log-prob kernel and the reference's log-probs computed once, the same
numbers in less memory and time. Tests: python -m pytest -q tests/test_dpo.py
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import collate_pairs
from lab.devices import pick_device
from lab.speed import token_logps as fast_token_logps
from lab.speed import with_ref_logps
from train import TrainConfig, train


@dataclass
class DPOConfig(TrainConfig):
    lr: float = 5e-6               # author's MPO script
    batch_size: int = 8            # pairs per micro-batch: 16 rows in the concatenated forward
    grad_accum: int = 16           # effective batch 128 pairs (author)
    epochs: float = 1.0            # one pass over the easy pairs (author)
    warmup_steps: int = 100        # author
    beta: float = 0.3              # author's MPO script (0.2 in an older one)
    label_smoothing: float = 0.0   # cDPO: assumed fraction of flipped labels
    loss_type: str = "sigmoid"     # "sigmoid" (DPO, cDPO) or "ipo"
    precompute_ref: bool = True    # reference log-probs computed once: no reference in training


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0, loss_type="sigmoid"):
    """Per-pair losses and implicit rewards beta * (log pi - log ref), detached; each (B,)."""
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":  # eq. 7: Bradley-Terry on implicit rewards; eps > 0 is cDPO
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                  - label_smoothing * F.logsigmoid(-beta * h))
    elif loss_type == "ipo":  # Azar et al. 2023, eq. 17, on summed log-probs (TRL: token means)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def token_logps(logits, tokens):
    """log p(token) (B, T) of each token under the logits (B, T, V) at its own position, in fp32
    (bf16 log-probs of long responses are too coarse, TRL #878). Also PPO's per-token log-probs.
    In plain form: F.log_softmax(logits.float(), -1).gather(-1, tokens[..., None]).squeeze(-1);
    lab/speed.py computes the same numbers keeping one vocabulary-sized buffer instead of four."""
    return fast_token_logps(logits, tokens)


def response_logps(model, batch):
    """Summed response log-probs of every row of a collated batch. logits[:, t] predicts
    tokens[:, t + 1], and loss_mask selects the targets (response tokens + EOS). The LM head runs
    only from the position that predicts the shortest prompt's first response token."""
    tokens, mask = batch["tokens"], batch["loss_mask"]
    start = max(int(batch["prompt_lens"].min()) - 1, 0)
    # the last position predicts nothing: no forward on it
    logits = model(tokens[:, :-1], logits_from=start)
    return (token_logps(logits, tokens[:, start + 1:]) * mask[:, start + 1:]).sum(-1)


def dpo_step_loss(model, ref, batch, cfg: DPOConfig):
    """The DPO stage's loss_fn: mean loss over the pairs of a collate_pairs batch, and its metrics.
    The reference log-probs come from the batch when precomputed, else from a forward of `ref`."""
    logps = response_logps(model, batch)
    if "ref_logps" in batch:
        ref_logps = batch["ref_logps"]
    else:
        with torch.no_grad():
            ref_logps = response_logps(ref, batch)
    n = logps.size(0) // 2  # collate_pairs stacks the chosen rows first, then the rejected ones
    losses, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:],
                                        cfg.beta, cfg.label_smoothing, cfg.loss_type)
    return losses.mean(), {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),  # strict: 0 at step 0, not 0.5
        "logps/chosen": logps[:n].detach().mean(),
        "logps/rejected": logps[n:].detach().mean()}


def dpo(policy, ref, pairs, cfg: DPOConfig, out_dir, eval_pairs=None, stage="dpo"):
    """Train `policy` with DPO against the frozen `ref`; returns (policy, metrics). `stage` names
    the checkpoint, the log lines and the progress (dpo_all, mpo_dpo)."""
    if ref is policy:  # frozen below, and the loss would sit at ln 2 forever (TRL refuses it too)
        raise ValueError("dpo: ref is the policy itself; pass a frozen copy, "
                         "e.g. copy.deepcopy(sft_model)")
    ref.to(pick_device(cfg.device)).eval().requires_grad_(False)
    collate = collate_pairs
    if cfg.precompute_ref:  # the reference's log-probs once, as data: no reference forward a step
        pairs, eval_pairs, collate = with_ref_logps(response_logps, ref, pairs, eval_pairs, cfg,
                                                    stage)

    def loss_fn(model, batch):
        return dpo_step_loss(model, ref, batch, cfg)

    metrics = train(policy, loss_fn, pairs, eval_pairs, cfg, out_dir, stage, collate,
                    key_metric="rewards/accuracies")
    # the stage's compute: tokens through the frozen reference, once or every step (a pair's
    # prompt twice, its two responses; with_ref_logps appended the reference's log-probs: *_)
    once = sum(2 * len(p) + len(c) + len(r) for p, c, r, *_ in pairs)
    metrics["compute/ref_tokens"] = once if cfg.precompute_ref else metrics["compute/tokens"]
    return policy, metrics
