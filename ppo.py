"""PPO-RLHF: reinforcement learning of a language model against a reward model (MPO's stage 2).

The policy is a language model whose actions are tokens. Each iteration it samples responses to a batch
of prompts, a frozen reward model (RM) scores each whole response, and PPO (Schulman et al. 2017)
raises the probability of the tokens that earned more reward than a critic predicted, while a per-token
KL penalty keeps the policy near a frozen reference (Ziegler et al. 2019; Stiennon et al. 2020). In MPO
(Gou & Nguyen 2024) this stage trains on the prompts the RM finds "hard", starting from the DPO model,
which is also the reference; the critic starts from the RM.

One iteration: rollout -> log-probs and values -> KL-shaped rewards -> GAE -> PPO epochs -> log.

Implementation details, from "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024)
and the author's DeepSpeed-Chat based code; the code cites them as "detail N":
 1. Dropout off in policy, reference, RM and critic (eval mode) so the ratio starts at exactly 1.
 2. Left-padded prompts, positions from the attention mask: a padded row scores like an unpadded one.
 3. Rollouts sample with the KV cache; pure sampling (no top-k / top-p) by default, so the samples come
    from the distribution PPO assumes.
 4. Log-probs (policy and reference) use logits / temperature: the distribution actually sampled.
 5. Truncate after the first EOS; masks keep pads out of the KL, the advantages and every loss.
 6. The RM scores the truncated text at its last real token, the EOS.
 7. EOS trick: a response that never ends has `missing_eos_penalty` subtracted from its score.
 8. RM scores clipped to [-5, 5] (DeepSpeed-Chat, the author's code).
 9. Per-token KL penalty -kl_coef * (log pi - log ref) on every response token; the score is added on
    the last real token (the EOS) itself, not on the slot after it as in N+ and TRL. Author (default):
    the per-token log-ratio is clamped at 0 from below, so the KL term only ever penalises and a token
    the policy finds less likely than the reference earns no bonus. Optional adaptive coefficient.
10. The critic is a separate network initialised from the RM; values after the last token are 0.
11. GAE with gamma 1, lambda 0.95 over the response tokens; returns = advantages + values.
12. Optional whitening (off, as the author) of the advantages, with masked statistics of the whole batch
    (all ranks), and of the rewards.
13. Clipped surrogate (0.2) and clipped value loss (0.2, x 0.5 x vf_coef); masked token means.
14. Epochs over minibatches reshuffled each epoch, micro-batches with gradient accumulation.
15. AdamW eps 1e-5, separate actor and critic learning rates, warm-up then cosine decay, grad clipping.
16. Reference log-probs, old log-probs and old values computed once per rollout, under no_grad.

Run it through the pipeline (`python mpo.py`, see train.sh); as a function:

    policy, metrics = ppo(policy, ref, rm, critic, prompts, tok, PPOConfig(), "out/run")

Tests: python -m pytest -q tests/test_ppo.py
"""
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from data import collate_prompts
from dpo import token_logps
from model import response_mask
from train import (_drop_log_lines_after, all_reduce_mean, atomic_save, autocast, is_main, load_checkpoint,
                   load_weights, lr_at, mean_over_ranks, pick_device, progress, rank, rate_eta, shard, sum_over_ranks,
                   timestamp, world_size)


@dataclass
class PPOConfig:
    # rollouts (defaults: the author's MPO script unless noted)
    prompts_per_step: int = 16        # prompts per iteration
    samples_per_prompt: int = 2       # responses sampled per prompt
    passes: int = 1                   # passes over the prompts (one over the hard prompts)
    max_iterations: int = 0           # > 0: this many iterations instead of `passes` (mpo.py --budget matched)
    max_new_tokens: int = 256         # response budget
    temperature: float = 1.0          # sampling temperature (N+: 0.7); log-probs use the same one (detail 4)
    top_k: int = 0                    # 0 = off: pure sampling (detail 3)
    top_p: float = 1.0                # 1 = off
    missing_eos_penalty: float = 1.0  # EOS trick (N+, TRL): subtracted from the score of a response without EOS
    # rewards
    reward_clip: float = 5.0          # RM score clipped to [-reward_clip, reward_clip]
    kl_coef: float = 0.4              # beta of the per-token KL penalty (author: 0.4 fixed; N+: 0.05)
    kl_clamp: bool = True             # author's one-sided clamp: log-ratio clamped at 0 from below
    kl_target: float = 0.0            # > 0: adaptive beta steering the KL per response to this (Ziegler: 6)
    kl_horizon: int = 10000           # adaptive controller horizon, in responses
    whiten_rewards: bool = False
    # GAE
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = False   # author: off (N+, TRL: on)
    # update
    ppo_epochs: int = 1               # epochs over each rollout batch (N+: 4)
    num_minibatches: int = 1          # optimizer steps per epoch
    micro_batch_size: int = 8         # rows per forward; gradients accumulate over a minibatch
    clip_range: float = 0.2           # PPO ratio clip epsilon
    clip_range_value: float = 0.2     # value clip, in reward units
    vf_coef: float = 1.0              # author: none (1); separate critic and optimizer: only matters against grad_clip
    ent_coef: float = 0.0             # entropy bonus
    actor_lr: float = 3e-6
    critic_lr: float = 5e-6
    adam_eps: float = 1e-5            # N+ detail: PyTorch's eps 1e-8 makes the first steps too large
    weight_decay: float = 0.0
    warmup_steps: int = 100           # linear warm-up of both learning rates, in iterations (author)
    decay: str = "cosine"             # then "cosine" (author), "linear" or "constant"
    grad_clip: float = 1.0
    # bookkeeping
    seed: int = 0
    device: str = "auto"
    log_every: int = 1                # iterations between log lines
    eval_every: int = 50              # iterations between evaluations on eval_prompts (also first and last)
    eval_prompts: int = 128           # of the held-out prompts, the first (stratified) this many; 0 = all
    ckpt_every: int = 50              # iterations between resumable checkpoints (always one at the end)
    num_samples: int = 2              # completions per log line written to samples.jsonl


def entropy_from_logits(logits):
    """H = logsumexp(z) - sum softmax(z) z, per position."""
    return logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)


def masked_mean(x, mask):
    """Mean over the real tokens of the whole batch: under torchrun every rank's rows (sum and count
    all-reduced), so the whitening statistics do not depend on how the batch is split across ranks."""
    total = all_reduce_mean(torch.stack([(x * mask).sum(), mask.sum().to(x.dtype)]))
    return total[0] / total[1].clamp(min=1)


def masked_var(x, mask):
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std with statistics over the real tokens only (detail 12); pads stay 0."""
    mean = masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(masked_var(x, mask) + 1e-8)
    return (out if shift_mean else out + mean) * mask


def response_logits(model, seq, attn, P, temperature):
    """Logits (B, R, V) predicting the response tokens seq[:, P:], divided by the sampling temperature
    (detail 4). Position t predicts token t + 1, so the LM head runs from P - 1 on, not on the prompt."""
    return model(seq[:, :-1], attention_mask=attn[:, :-1], logits_from=P - 1).float() / temperature


def response_values(critic, seq, attn, P):
    """V(s_t) (B, R) for each response token: the critic's value of the prefix that precedes it."""
    return critic(seq[:, :-1], attention_mask=attn[:, :-1])[:, P - 1:].float()


@torch.no_grad()
def sample(policy, prompt_ids, eos_id, cfg, generator):
    """Sample a response per prompt (left-padded, KV cache) and truncate it after the first EOS.
    Returns seq (B, P + R), its attention mask, P and the response mask (B, R)."""
    device = next(policy.parameters()).device
    batch = collate_prompts(prompt_ids)
    query, query_mask = batch["tokens"].to(device), batch["attention_mask"].to(device)
    with autocast(device):
        seq = policy.generate(query, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None,
                              cfg.top_p if cfg.top_p < 1 else None, eos_id, query_mask, generator=generator)
    P = query.size(1)
    mask = response_mask(seq[:, P:], eos_id)  # generate already wrote pads after EOS (detail 5)
    R = int(mask.sum(1).max())  # drop the all-pad columns after the longest response: no forward on them
    seq, mask = seq[:, :P + R], mask[:, :R]
    return seq, torch.cat([query_mask, mask], 1), P, mask


@torch.no_grad()
def score_samples(policy, ref, reward_model, critic, seq, attn, P, mask, eos_id, cfg):
    """Everything the update needs from sample's outputs, computed once (detail 16): policy and
    reference log-probs, values and RM scores. Returns (rollout dict, P)."""
    out = defaultdict(list)
    for i in range(0, len(seq), cfg.micro_batch_size):
        s, a = seq[i:i + cfg.micro_batch_size], attn[i:i + cfg.micro_batch_size]
        with autocast(seq.device):
            out["logp"].append(token_logps(response_logits(policy, s, a, P, cfg.temperature), s[:, P:]))
            out["ref_logp"].append(token_logps(response_logits(ref, s, a, P, cfg.temperature), s[:, P:]))
            out["values"].append(response_values(critic, s, a, P))
            out["raw_scores"].append(reward_model.score(s, a).float())  # at the last real token (detail 6)
    ro = {k: torch.cat(v) for k, v in out.items()}
    ro["values"] = ro["values"] * mask  # detail 10: no value after the end
    has_eos = (seq[:, P:] == eos_id).any(1)
    return dict(ro, seq=seq, attn=attn, mask=mask, has_eos=has_eos), P


def shape_rewards(raw_scores, has_eos, logp, ref_logp, mask, kl_coef, cfg):
    """Per-token rewards (B, R): -kl_coef * log(pi / ref) on every response token (clamped at 0 from
    below when cfg.kl_clamp), plus the clipped, EOS-penalised score on the last real token (detail 9).
    Returns (rewards, scores)."""
    scores = raw_scores.clamp(-cfg.reward_clip, cfg.reward_clip)  # detail 8
    scores = scores - cfg.missing_eos_penalty * (~has_eos)  # detail 7, after the clip so it always bites
    log_ratio = (logp - ref_logp) * mask
    rewards = -kl_coef * (log_ratio.clamp(min=0) if cfg.kl_clamp else log_ratio)
    last = mask.sum(1).long() - 1  # the response mask is True on a prefix of each row
    rewards[torch.arange(len(rewards), device=rewards.device), last] += scores
    return rewards, scores


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16) over response tokens (B, R):
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with V = 0 after the last
    real token (mask True on a prefix of each row). Returns (advantages, returns = advantages + values)."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    next_value, next_advantage = torch.zeros_like(values[:, 0]), torch.zeros_like(values[:, 0])
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = advantages[:, t] = delta + gamma * lam * next_advantage
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, advantages + values


def policy_loss(logp, old_logp, advantages, clip):
    """Clipped surrogate (Schulman et al. 2017, eq. 7) per token: max(-A r, -A clip(r, 1 - eps, 1 + eps)),
    r = pi / pi_old. Returns (loss, ratio, clipped) where clipped marks tokens the clip acted on."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    return torch.max(unclipped, clipped), ratio, (clipped > unclipped).float()


def value_loss(values, old_values, returns, clip):
    """Clipped value loss per token: 0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2).
    Returns (loss, clipped)."""
    unclipped = (values - returns) ** 2
    clipped = (old_values + (values - old_values).clamp(-clip, clip) - returns) ** 2
    return 0.5 * torch.max(unclipped, clipped), (clipped > unclipped).float()


def ppo_update(policy, critic, opt_pi, opt_v, ro, P, cfg, generator):
    """cfg.ppo_epochs epochs over minibatches of the rollout batch; returns token-mean statistics."""
    B, device = ro["seq"].size(0), ro["seq"].device
    sums, n_all = defaultdict(float), 0.0
    for _ in range(cfg.ppo_epochs):
        # Exactly num_minibatches optimizer steps, also under torchrun where ranks may hold unequal rollouts.
        for mb in torch.randperm(B, generator=generator).to(device).tensor_split(cfg.num_minibatches):
            # masked token mean over the whole minibatch (detail 13), of all ranks: DDP averages gradients
            n_tokens = all_reduce_mean(ro["mask"][mb].sum().float())
            for idx in [i for i in mb.split(cfg.micro_batch_size) if len(i)]:
                b = {k: v[idx] for k, v in ro.items()}
                m = b["mask"].float()
                with autocast(device):
                    logits = response_logits(policy, b["seq"], b["attn"], P, cfg.temperature)
                    new_values = response_values(critic, b["seq"], b["attn"], P)
                logp = token_logps(logits, b["seq"][:, P:])
                pg, ratio, pg_clipped = policy_loss(logp, b["logp"], b["advantages"], cfg.clip_range)
                vf, vf_clipped = value_loss(new_values, b["values"], b["returns"], cfg.clip_range_value)
                entropy = entropy_from_logits(logits if cfg.ent_coef else logits.detach())
                loss = pg + cfg.vf_coef * vf - cfg.ent_coef * entropy
                ((loss * m).sum() / n_tokens).backward()
                with torch.no_grad():
                    log_ratio = logp - b["logp"]
                    for k, v in dict(pg_loss=pg, vf_loss=vf, entropy=entropy, clipfrac=pg_clipped,
                                     vf_clipfrac=vf_clipped, ratio=ratio, approxkl=0.5 * log_ratio ** 2).items():
                        sums[k] += float((v * m).sum())
            n_all += float(n_tokens)
            for model, opt in ((policy, opt_pi), (critic, opt_v)):
                if world_size() > 1:  # data parallel: every rank steps with the ranks' mean gradient
                    for p in model.parameters():
                        p.grad = all_reduce_mean(p.grad if p.grad is not None else torch.zeros_like(p))
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
    return {k: v / n_all for k, v in sums.items()}


def optimizers(policy, critic, cfg, device):
    """AdamW for the actor and for the critic (detail 15). Fused: one pass per parameter instead of a
    dozen elementwise ones, 5x faster steps on CPU (as train.adamw)."""
    fused = torch.device(device).type in ("cuda", "cpu")
    return tuple(torch.optim.AdamW(model.parameters(), lr=lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                                   fused=fused) for model, lr in ((policy, cfg.actor_lr), (critic, cfg.critic_lr)))


def iteration(policy, ref, reward_model, critic, opt_pi, opt_v, prompt_ids, eos_id, kl_coef, cfg, it):
    """One PPO iteration on prompt_ids: rollout -> KL-shaped rewards -> GAE -> PPO epochs. Returns
    (rollout dict, P, rewards, stats): the update statistics plus the seconds spent sampling
    (generate_s), in the whole rollout with its scoring forwards (rollout_s) and in the update (update_s)."""
    device = next(policy.parameters()).device
    t0 = time.time()
    # 1. Rollout; every random draw comes from generators seeded by (seed, iteration).
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + it + rank() * 100003)
    samples = sample(policy, prompt_ids, eos_id, cfg, generator)
    t1 = time.time()
    ro, P = score_samples(policy, ref, reward_model, critic, *samples, eos_id, cfg)
    # 2. KL-shaped per-token rewards, then advantages and returns.
    mask = ro["mask"].float()
    rewards, _ = shape_rewards(ro["raw_scores"], ro["has_eos"], ro["logp"], ro["ref_logp"], mask, kl_coef, cfg)
    shaped = masked_whiten(rewards, mask, shift_mean=False) if cfg.whiten_rewards else rewards
    advantages, ro["returns"] = gae(shaped, ro["values"], mask, cfg.gamma, cfg.lam)
    ro["advantages"] = masked_whiten(advantages, mask) if cfg.whiten_advantages else advantages
    t2 = time.time()
    # 3. PPO epochs on this batch.
    stats = ppo_update(policy, critic, opt_pi, opt_v, ro, P, cfg, torch.Generator().manual_seed(cfg.seed + it))
    t3 = time.time()
    return ro, P, rewards, stats | {"generate_s": t1 - t0, "rollout_s": t2 - t0, "update_s": t3 - t2}


def adaptive_kl_coef(kl_coef, kl, n, cfg):
    """Ziegler et al. 2019, eq. 2: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""
    return kl_coef * (1 + min(max(kl / cfg.kl_target - 1, -0.2), 0.2) * n / cfg.kl_horizon)


@torch.no_grad()
def evaluate(policy, ref, reward_model, critic, prompt_ids, tok, cfg, gold_reward=None, name="ppo eval"):
    """One sampled response per prompt, always with the same random draws (a fixed seed), so that
    evaluations along the stage differ only by the policy: mean RM score, KL to the reference (nats
    per response), length, share ending with EOS, and the gold reward when the task has one. Under
    torchrun each rank samples for its shard of the prompts and the sums are gathered."""
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1 + rank() * 100003)
    sums, step, mine = defaultdict(float), cfg.prompts_per_step * cfg.samples_per_prompt, shard(prompt_ids)
    for i in progress(range(0, len(mine), step), name):
        samples = sample(policy, mine[i:i + step], tok.eot_token, cfg, generator)
        ro, P = score_samples(policy, ref, reward_model, critic, *samples, tok.eot_token, cfg)
        sums["score"] += float(ro["raw_scores"].sum())
        sums["kl"] += float(((ro["logp"] - ro["ref_logp"]) * ro["mask"]).sum())
        sums["response_len"] += float(ro["mask"].sum())
        sums["eos_frac"] += float(ro["has_eos"].sum())
        if gold_reward:
            pairs = decode(tok, mine[i:i + step], ro["seq"][:, P:], ro["mask"])
            sums["gold"] += sum(gold_reward(p, r) for p, r in pairs)
    return {k: v / len(prompt_ids) for k, v in sum_over_ranks(sums).items()}


def decode(tok, prompt_ids, responses, mask):
    """(prompt, response) strings; the response without its EOS and pads."""
    eos = tok.eot_token
    return [(tok.decode(p), tok.decode([t for t in r[m].tolist() if t != eos]))
            for p, r, m in zip(prompt_ids, responses, mask)]


def ppo(policy, ref, reward_model, critic, prompts, tok, cfg: PPOConfig, out_dir, eval_prompts=None,
        gold_reward=None, stage="ppo"):
    """Train `policy` with PPO on `prompts` (token-id lists from data.encode_dataset) against the frozen
    `ref` and `reward_model`; `critic` (a ScalarModel, usually a copy of the RM) is trained alongside. `gold_reward(prompt,
    response)`, when the task has one, is logged beside the RM score. Returns (policy, metrics).
    Calling it again with the same out_dir resumes from the last checkpoint, or only loads the final
    weights when the stage had finished. `stage` names the checkpoint and the log lines (the PPO
    baseline and MPO's PPO stage can share an out_dir)."""
    if ref is policy or critic is reward_model:  # the copy would be trained, or the original frozen
        raise ValueError("ppo: pass copies: ref = copy.deepcopy(policy), critic = copy.deepcopy(reward_model)")
    if cfg.temperature <= 0:
        raise ValueError(f"ppo: temperature must be > 0 (PPO needs a sampling policy), got {cfg.temperature}")
    device = pick_device(cfg.device)
    eval_prompts = eval_prompts and eval_prompts[:cfg.eval_prompts or None]  # a small fraction of the cost
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path, samples_path = (out_dir / f"{stage}_ckpt.pt", out_dir / "metrics.jsonl",
                                         out_dir / "samples.jsonl")
    for model in (policy, ref, reward_model, critic):
        model.to(device).eval()  # detail 1: eval mode (no dropout) for good, training included
    ref.requires_grad_(False)
    reward_model.requires_grad_(False)
    opt_pi, opt_v = optimizers(policy, critic, cfg, device)
    per_pass = math.ceil(len(prompts) / cfg.prompts_per_step)
    total = cfg.max_iterations or cfg.passes * per_pass
    it, kl_coef, result = 0, cfg.kl_coef, {}
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        load_weights(policy, ckpt["policy"], ckpt_path)
        it, result = ckpt["iteration"], ckpt["metrics"]
        if ckpt["done"]:
            print(f"{stage}: finished checkpoint {ckpt_path} found, weights loaded, stage skipped")
            return policy, result
        load_weights(critic, ckpt["critic"], ckpt_path)
        opt_pi.load_state_dict(ckpt["opt_pi"])
        opt_v.load_state_dict(ckpt["opt_v"])
        kl_coef = ckpt["kl_coef"]
        print(f"{stage}: resuming from {ckpt_path} at iteration {it}/{total}")
    for path in (log_path, samples_path):
        _drop_log_lines_after(path, stage, it if ckpt_path.exists() else -1)

    def save(done):
        # Every random draw comes from generators seeded by (seed, iteration): no RNG state to save.
        state = {"policy": policy.state_dict(), "iteration": it, "metrics": result, "done": done}
        if not done:
            state |= {"critic": critic.state_dict(), "opt_pi": opt_pi.state_dict(),
                      "opt_v": opt_v.state_dict(), "kl_coef": kl_coef}
        atomic_save(state, ckpt_path)

    def log(split, metrics, line, samples=()):
        result.update({f"{split}/{k}": v for k, v in metrics.items()})
        if is_main():
            with open(log_path, "a") as f:
                f.write(json.dumps({"stage": stage, "step": it, "split": split, "time": timestamp(), **metrics}) + "\n")
            with open(samples_path, "a") as f:
                f.writelines(json.dumps({"stage": stage, "step": it, **s}) + "\n" for s in samples)
        print(line, flush=True)

    def run_eval():
        m = evaluate(policy, ref, reward_model, critic, eval_prompts, tok, cfg, gold_reward, f"{stage} eval")
        log("eval", m, f"{stage} eval iteration {it}: " + " ".join(f"{k} {v:.3f}" for k, v in m.items()))

    if it == 0 and eval_prompts:
        run_eval()
    start_time, start_it = time.time(), it
    while it < total:
        # This iteration's prompts (each pass in a new order), samples_per_prompt responses each.
        epoch, k = divmod(it, per_pass)
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        batch = [prompts[i] for i in order[k * cfg.prompts_per_step:(k + 1) * cfg.prompts_per_step]
                 for _ in range(cfg.samples_per_prompt)]
        # Under torchrun each rank samples its share (a rank left with none, at the tail of a pass, takes
        # the first prompt: every rank must join each gradient all-reduce).
        prompt_ids = batch[rank()::world_size()] or batch[:1]
        for opt, lr in ((opt_pi, cfg.actor_lr), (opt_v, cfg.critic_lr)):
            for group in opt.param_groups:
                group["lr"] = lr_at(it, cfg, total, lr)
        ro, P, rewards, stats = iteration(policy, ref, reward_model, critic, opt_pi, opt_v, prompt_ids,
                                          tok.eot_token, kl_coef, cfg, it)
        mask = ro["mask"].float()
        # Log; adapt the KL coefficient; checkpoint.
        kl = float(((ro["logp"] - ro["ref_logp"]) * mask).sum(1).mean())  # k1 estimate, nats per response
        pairs = decode(tok, prompt_ids, ro["seq"][:, P:], ro["mask"])
        stats |= {"score": float(ro["raw_scores"].mean()), "rlhf_reward": float(rewards.sum(1).mean()),
                  "kl": kl, "kl_coef": kl_coef, "response_len": float(mask.sum(1).mean()),
                  "eos_frac": float(ro["has_eos"].float().mean()),
                  "explained_variance": 1 - float(masked_var(ro["returns"] - ro["values"], mask)
                                                  / masked_var(ro["returns"], mask).clamp(min=1e-8))}
        if gold_reward:
            stats["gold"] = sum(gold_reward(p, r) for p, r in pairs) / len(pairs)
        stats = mean_over_ranks(stats)
        kl = stats["kl"]
        bad = [k for k, v in stats.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"{stage}: {', '.join(bad)} not finite at iteration {it + 1}; stopped, last good "
                                     f"checkpoint kept: {ckpt_path if ckpt_path.exists() else 'none yet'}")
        if cfg.kl_target > 0:
            kl_coef = adaptive_kl_coef(kl_coef, kl, len(batch), cfg)
        it += 1
        # The stage's compute, all ranks (the study compares budgets): policy optimizer steps, real tokens
        # through the policy's forward + backward (every PPO epoch) and responses sampled; kept in result.
        done = sum_over_ranks({"tokens": float(ro["attn"].sum()) * cfg.ppo_epochs, "samples": len(prompt_ids)})
        result["compute/steps"] = result.get("compute/steps", 0) + cfg.ppo_epochs * cfg.num_minibatches
        result["compute/tokens"] = result.get("compute/tokens", 0) + int(done["tokens"])
        result["compute/samples"] = result.get("compute/samples", 0) + int(done["samples"])
        if it % cfg.log_every == 0 or it == total:
            samples = [{"prompt": p, "response": r, "score": float(s)}
                       for (p, r), s in zip(pairs[:cfg.num_samples], ro["raw_scores"])]
            speed = rate_eta(it - start_it, total - start_it, time.time() - start_time)
            gold = f" | gold {stats['gold']:.3f}" if gold_reward else ""
            log("train", stats, f"{stage} {it}/{total} | {speed} | score {stats['score']:.3f}{gold}"
                f" | kl {kl:.3f} | len {stats['response_len']:.1f} | eos {stats['eos_frac']:.2f} | clipfrac "
                f"{stats['clipfrac']:.3f} | rollout {stats['rollout_s']:.2f}s update {stats['update_s']:.2f}s", samples)
        if eval_prompts and (it == total or (cfg.eval_every and it % cfg.eval_every == 0)):
            run_eval()
        if cfg.ckpt_every and it % cfg.ckpt_every == 0 and it < total:
            save(done=False)
    save(done=True)
    return policy, result
