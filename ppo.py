"""PPO-RLHF: reinforcement learning of a language model against a reward model (MPO's stage 2).

The policy is a language model whose actions are tokens. Each iteration it samples responses to a
batch of prompts, a frozen reward model (RM) scores each whole response, and PPO (Schulman et al.
2017) raises the probability of the tokens that earned more reward than a critic predicted, while a
per-token KL penalty keeps the policy near a frozen reference (Ziegler et al. 2019; Stiennon et al.
2020). In MPO (Gou & Nguyen 2024) this stage trains on the prompts the RM finds "hard", starting
from the DPO model, which is also the reference; the critic starts from the RM.

One iteration of `ppo()`: pick prompts -> rollout (sample; log-probs, values, RM scores) ->
KL-shaped rewards -> GAE -> PPO epochs -> log / eval / save.

Implementation details ("The N+ Implementation Details of RLHF with PPO", Huang et al. 2024, and
the author's DeepSpeed-Chat based code), cited here as "detail N" (elsewhere "N+ detail N" is N+'s
own numbering):
 1. Dropout off in all four networks (eval mode), so the ratio starts at exactly 1.
 2. Left-padded prompts, positions from the attention mask: a padded row scores as an unpadded one.
 3. Rollouts sample with the KV cache, pure sampling by default (no top-k / top-p): the
    distribution PPO assumes.
 4. Log-probs (policy and reference) use logits / temperature: the distribution actually sampled.
 5. Truncate after the first EOS; masks keep pads out of the KL, the advantages and every loss.
 6. The RM scores the truncated text at its last real token (the EOS, when it ended).
 7. EOS trick: a response that never ends has `missing_eos_penalty` subtracted from its score.
 8. RM scores clipped to [-5, 5] (DeepSpeed-Chat, the author's code).
 9. Per-token KL penalty -kl_coef * (log pi - log ref); the score added on the last real token
    (N+, TRL: the slot after it). Author (default): the log-ratio clamped at 0 from below, so the
    KL term never pays a bonus. Optional adaptive coefficient.
10. The critic is a separate network initialised from the RM; values after the last token are 0.
11. GAE with gamma 1, lambda 0.95 over the response tokens; returns = advantages + values.
12. Optional whitening (off, as the author) of the rewards and advantages: masked, whole batch.
13. Clipped surrogate (0.2) and clipped value loss (0.2, x 0.5 x vf_coef); masked token means.
14. Epochs over minibatches reshuffled each epoch, micro-batches with gradient accumulation.
15. AdamW eps 1e-5, separate actor and critic learning rates, warm-up then cosine, grad clipping.
16. Reference log-probs, old log-probs and old values computed once per rollout, under no_grad.

Left to the lab: the stage's bookkeeping (lab/stage.py), the evaluation and log statistics
(lab/ppo_eval.py), torchrun's ranks (lab/devices.py). As a function:

    models = Models(policy, ref=copy.deepcopy(policy), reward_model=rm, critic=copy.deepcopy(rm))
    policy, metrics = ppo(models, prompts, tok, PPOConfig(), "out/run")

Tests: python -m pytest -q tests/test_ppo.py
"""
import math
import time
from collections import defaultdict
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn

from data import collate_prompts
from dpo import token_logps
from lab.devices import (all_reduce_mean, autocast, average_gradients, masked_mean, masked_var,
                         mean_over_ranks, pick_device, rank, world_size)
from lab.ppo_eval import decode, eval_policy, rollout_stats
from lab.stage import StageRun
from model import response_mask
from train import lr_at


@dataclass
class PPOConfig:
    # rollouts (defaults: the author's MPO script unless noted)
    prompts_per_step: int = 16        # prompts per iteration
    samples_per_prompt: int = 2       # responses sampled per prompt
    passes: int = 1                   # passes over the prompts (one over the hard prompts)
    max_iterations: int = 0           # > 0: this many iterations, not `passes` (--budget matched)
    max_new_tokens: int = 256         # response budget
    temperature: float = 1.0          # sampling temperature (N+: 0.7); log-probs use it (detail 4)
    top_k: int = 0                    # 0 = off: pure sampling (detail 3)
    top_p: float = 1.0                # 1 = off
    missing_eos_penalty: float = 1.0  # EOS trick (N+, TRL): minus this for a response without EOS
    # rewards
    reward_clip: float = 5.0          # RM score clipped to [-reward_clip, reward_clip]
    kl_coef: float = 0.4              # beta of the per-token KL penalty (author: 0.4; N+: 0.05)
    kl_clamp: bool = True             # author's one-sided clamp: log-ratio clamped at 0 from below
    kl_target: float = 0.0            # > 0: adaptive beta, steers the KL per response (Ziegler: 6)
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
    vf_coef: float = 1.0              # author: none (1); own optimizer: acts only via grad_clip
    ent_coef: float = 0.0             # entropy bonus
    actor_lr: float = 3e-6
    critic_lr: float = 5e-6
    adam_eps: float = 1e-5            # N+: PyTorch's eps 1e-8 makes the first steps too large
    weight_decay: float = 0.0
    warmup_steps: int = 100           # linear warm-up of both learning rates, in iterations
    decay: str = "cosine"             # then "cosine" (author), "linear" or "constant"
    grad_clip: float = 1.0
    # bookkeeping
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"               # autocast: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    log_every: int = 1                # iterations between log lines
    eval_every: int = 50              # iterations between evaluations (also the first and last)
    eval_prompts: int = 128           # the first (stratified) this many held-out prompts; 0 = all
    ckpt_every: int = 50              # iterations between resumable checkpoints (and at the end)
    num_samples: int = 2              # completions per log line written to samples.jsonl


@dataclass
class Models:
    """The four networks of PPO-RLHF: the policy and the critic are trained, the reference and the
    reward model frozen, so those two must be copies, not the trained objects themselves."""
    policy: nn.Module        # pi: the language model (model.GPT) being trained
    ref: nn.Module           # pi_ref: the KL penalty's anchor (detail 9), frozen
    reward_model: nn.Module  # scores a whole response (model.ScalarModel), frozen
    critic: nn.Module        # V: a ScalarModel, usually a copy of the RM (detail 10), trained

    def __post_init__(self):
        if self.ref is self.policy or self.critic is self.reward_model:
            raise ValueError("ppo: pass copies: ref = copy.deepcopy(policy), "
                             "critic = copy.deepcopy(reward_model)")

    def prepare(self, device):
        """All four on the device in eval mode for good, also while training (detail 1); the
        reference and the RM frozen."""
        for model in (self.policy, self.ref, self.reward_model, self.critic):
            model.to(device).eval()
        self.ref.requires_grad_(False)
        self.reward_model.requires_grad_(False)


@dataclass
class Rollout:
    """A batch of sampled responses and what the update needs from them, computed once (detail 16).
    Row b is a left-padded prompt of width P followed by its response: seq[b, :P], seq[b, P:]."""
    seq: torch.Tensor       # (B, P + R) token ids
    attn: torch.Tensor      # (B, P + R) attention mask: False on pads
    P: int                  # the padded prompt width
    mask: torch.Tensor      # (B, R) the real response tokens, up to the first EOS (detail 5)
    has_eos: torch.Tensor   # (B,) the response ended (detail 7)
    logp: torch.Tensor      # (B, R) log pi_old of each response token (detail 4)
    ref_logp: torch.Tensor  # (B, R) log pi_ref
    values: torch.Tensor    # (B, R) V_old, 0 after the last token (detail 10)
    scores: torch.Tensor    # (B,) the RM's raw scores (detail 6)
    generate_s: float = 0.0  # seconds spent sampling
    rollout_s: float = 0.0   # seconds for the whole rollout: sampling, then scoring
    advantages: torch.Tensor | None = None  # (B, R), from GAE
    returns: torch.Tensor | None = None     # (B, R)

    @property
    def responses(self) -> torch.Tensor:
        return self.seq[:, self.P:]

    def rows(self, idx) -> "Rollout":
        """The rows idx of the batch (a micro-batch of the update)."""
        tensors = [f.name for f in fields(self) if torch.is_tensor(getattr(self, f.name))]
        return replace(self, **{name: getattr(self, name)[idx] for name in tensors})


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the real tokens of every rank's rows (detail 12), plus the mean again
    when not shift_mean (rewards keep their level); pads stay 0."""
    mean = masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(masked_var(x, mask) + 1e-8)
    return (out if shift_mean else out + mean) * mask


def response_logits(model, seq, attn, P, temperature):
    """Logits (B, R, V) predicting the response tokens seq[:, P:], divided by the sampling
    temperature (detail 4). Position t predicts token t + 1: the LM head runs from P - 1 on."""
    logits = model(seq[:, :-1], attention_mask=attn[:, :-1], logits_from=P - 1)
    return logits.float() / temperature


def response_values(critic, seq, attn, P):
    """V(s_t) (B, R) for each response token: the critic's value of the prefix that precedes it."""
    return critic(seq[:, :-1], attention_mask=attn[:, :-1])[:, P - 1:].float()


@torch.no_grad()
def rollout(models, prompt_ids, eos_id, cfg, generator) -> Rollout:
    """Sample a response per prompt (left-padded, KV cache: details 2, 3), truncate it after the
    first EOS, and score it: policy and reference log-probs, the critic's values and the RM's
    score, once for the whole update (detail 16)."""
    start = time.time()
    device = next(models.policy.parameters()).device
    batch = collate_prompts(prompt_ids)
    query = batch["tokens"].to(device)
    query_mask = batch["attention_mask"].to(device)
    top_k = cfg.top_k or None
    top_p = cfg.top_p if cfg.top_p < 1 else None
    with autocast(device, cfg.dtype):
        seq = models.policy.generate(query, cfg.max_new_tokens, cfg.temperature, top_k, top_p,
                                     eos_id, query_mask, generator=generator)
    P = query.size(1)
    mask = response_mask(seq[:, P:], eos_id)  # generate already wrote pads after EOS (detail 5)
    R = int(mask.sum(1).max())  # drop the all-pad columns after the longest response: no forward
    seq = seq[:, :P + R]
    mask = mask[:, :R]
    attn = torch.cat([query_mask, mask], 1)
    generate_s = time.time() - start
    # Score in micro-batches: micro_batch_size rows per forward, as in the update.
    out = defaultdict(list)
    for i in range(0, len(seq), cfg.micro_batch_size):
        s = seq[i:i + cfg.micro_batch_size]
        a = attn[i:i + cfg.micro_batch_size]
        with autocast(seq.device, cfg.dtype):
            for name, model in (("logp", models.policy), ("ref_logp", models.ref)):
                out[name].append(token_logps(response_logits(model, s, a, P, cfg.temperature),
                                             s[:, P:]))
            out["values"].append(response_values(models.critic, s, a, P))
            # at the last real token (detail 6)
            out["scores"].append(models.reward_model.score(s, a).float())
    out = {k: torch.cat(v) for k, v in out.items()}
    return Rollout(seq, attn, P, mask, has_eos=(seq[:, P:] == eos_id).any(1), logp=out["logp"],
                   ref_logp=out["ref_logp"], values=out["values"] * mask,  # detail 10
                   scores=out["scores"], generate_s=generate_s, rollout_s=time.time() - start)


def shape_rewards(raw_scores, has_eos, logp, ref_logp, mask, kl_coef, cfg):
    """Per-token rewards (B, R): -kl_coef * log(pi / ref) on every response token (clamped at 0 from
    below when cfg.kl_clamp), plus the clipped, EOS-penalised score on the last real token (detail
    9). Returns (rewards, scores)."""
    scores = raw_scores.clamp(-cfg.reward_clip, cfg.reward_clip)  # detail 8
    scores = scores - cfg.missing_eos_penalty * (~has_eos)  # detail 7, after the clip: always bites
    log_ratio = (logp - ref_logp) * mask
    rewards = -kl_coef * (log_ratio.clamp(min=0) if cfg.kl_clamp else log_ratio)
    last = mask.sum(1).long() - 1  # the response mask is True on a prefix of each row
    rewards[torch.arange(len(rewards), device=rewards.device), last] += scores
    return rewards, scores


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16) over response tokens (B, R):
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with V = 0 after the
    last real token (mask True on a prefix of each row). Returns (advantages, returns = advantages
    + values)."""
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = advantages[:, t] = delta + gamma * lam * next_advantage
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, advantages + values


def policy_loss(logp, old_logp, advantages, clip):
    """Clipped surrogate (Schulman et al. 2017, eq. 7) per token: max(-A r, -A clip(r, 1 - eps,
    1 + eps)), r = pi / pi_old. Returns (loss, ratio, clipped) where clipped marks tokens the clip
    acted on."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    return torch.max(unclipped, clipped), ratio, (clipped > unclipped).float()


def value_loss(values, old_values, returns, clip):
    """Clipped value loss per token (OpenAI baselines' ppo2, detail 13): 0.5 max((V - R)^2, (V_old +
    clip(V - V_old, -eps, eps) - R)^2). Returns (loss, clipped)."""
    unclipped = (values - returns) ** 2
    clipped = (old_values + (values - old_values).clamp(-clip, clip) - returns) ** 2
    return 0.5 * torch.max(unclipped, clipped), (clipped > unclipped).float()


def ppo_update(models, opts, ro, cfg, generator):
    """cfg.ppo_epochs epochs over minibatches of the rollout `ro` (detail 14), each minibatch one
    step of the actor's and the critic's optimizers `opts`; returns token-mean statistics and
    update_s, its seconds."""
    start, policy, critic = time.time(), models.policy, models.critic
    device = ro.seq.device
    sums = defaultdict(float)
    n_all = 0.0
    for _ in range(cfg.ppo_epochs):
        # exactly num_minibatches steps, also when torchrun's ranks hold unequal rollouts
        order = torch.randperm(len(ro.seq), generator=generator).to(device)
        for mb in order.tensor_split(cfg.num_minibatches):
            # the masked token mean over the whole minibatch of every rank (detail 13)
            n_tokens = all_reduce_mean(ro.mask[mb].sum().float())
            for idx in [i for i in mb.split(cfg.micro_batch_size) if len(i)]:
                b = ro.rows(idx)
                m = b.mask.float()
                with autocast(device, cfg.dtype):
                    logits = response_logits(policy, b.seq, b.attn, b.P, cfg.temperature)
                    new_values = response_values(critic, b.seq, b.attn, b.P)
                logp = token_logps(logits, b.responses)
                pg, ratio, pg_clipped = policy_loss(logp, b.logp, b.advantages, cfg.clip_range)
                vf, vf_clipped = value_loss(new_values, b.values, b.returns, cfg.clip_range_value)
                z = logits if cfg.ent_coef else logits.detach()  # H = logsumexp(z) - E_pi[z]
                entropy = z.logsumexp(-1) - (z.softmax(-1) * z).sum(-1)
                loss = pg + cfg.vf_coef * vf - cfg.ent_coef * entropy
                ((loss * m).sum() / n_tokens).backward()
                with torch.no_grad():
                    logged = dict(pg_loss=pg, vf_loss=vf, entropy=entropy, clipfrac=pg_clipped,
                                  vf_clipfrac=vf_clipped, ratio=ratio,
                                  approxkl=0.5 * (logp - b.logp) ** 2)
                    for k, v in logged.items():
                        sums[k] += float((v * m).sum())
            n_all += float(n_tokens)
            for model, opt in zip((policy, critic), opts):
                average_gradients(model)  # under torchrun: every rank steps with the mean gradient
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
    return {k: v / n_all for k, v in sums.items()} | {"update_s": time.time() - start}


def optimizers(models, cfg, device):
    """AdamW for the actor and for the critic (detail 15), fused as train.adamw; default betas,
    and cfg.weight_decay (0) on every parameter."""
    fused = torch.device(device).type in ("cuda", "cpu")
    return tuple(torch.optim.AdamW(model.parameters(), lr=lr, eps=cfg.adam_eps,
                                   weight_decay=cfg.weight_decay, fused=fused)
                 for model, lr in ((models.policy, cfg.actor_lr), (models.critic, cfg.critic_lr)))


def adaptive_kl_coef(kl_coef, kl, n, cfg):
    """Ziegler et al. 2019, eq. 2: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""
    return kl_coef * (1 + min(max(kl / cfg.kl_target - 1, -0.2), 0.2) * n / cfg.kl_horizon)


def pick_prompts(prompts, it, cfg) -> tuple[list, int]:
    """Iteration `it`'s share of a pass over the prompts (each pass in a new order), each
    samples_per_prompt times, and their number; under torchrun, this rank's part of them."""
    epoch, k = divmod(it, math.ceil(len(prompts) / cfg.prompts_per_step))
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed + epoch))
    picked = order.tolist()[k * cfg.prompts_per_step:(k + 1) * cfg.prompts_per_step]
    batch = [prompts[i] for i in picked for _ in range(cfg.samples_per_prompt)]
    # a rank left with none takes the first prompt: every rank joins each gradient all-reduce
    return batch[rank()::world_size()] or batch[:1], len(batch)


def ppo(models: Models, prompts, tok, cfg: PPOConfig, out_dir, eval_prompts=None, gold_reward=None,
        stage="ppo"):
    """PPO-RLHF of models.policy on `prompts` (token ids), critic alongside: (policy, metrics)."""
    if cfg.temperature <= 0:
        raise ValueError(f"ppo: temperature must be > 0 (PPO samples), got {cfg.temperature}")
    policy, critic, device = models.policy, models.critic, pick_device(cfg.device)
    models.prepare(device)
    opt_pi, opt_v = optimizers(models, cfg, device)
    total = cfg.max_iterations or cfg.passes * math.ceil(len(prompts) / cfg.prompts_per_step)
    run = StageRun(out_dir, stage, total, unit="iteration", rewrite=False)
    it, ckpt = run.resume(policy=policy, critic=critic, opt_pi=opt_pi, opt_v=opt_v)
    if run.finished:
        return policy, run.result
    kl_coef = ckpt["kl_coef"] if ckpt else cfg.kl_coef

    def evaluate():  # the held-out prompts, with the same random draws every time (lab)
        metrics = eval_policy(rollout, models, eval_prompts, tok, cfg, gold_reward, stage)
        run.log_eval(it, metrics, digits=3)

    if it == 0 and eval_prompts:
        evaluate()
    run.start_clock(it)
    while it < total:
        prompt_ids, n = pick_prompts(prompts, it, cfg)
        for opt, lr in ((opt_pi, cfg.actor_lr), (opt_v, cfg.critic_lr)):  # detail 15
            opt.param_groups[0]["lr"] = lr_at(it, cfg, total, lr)
        # 1. Rollout. Every random draw comes from generators seeded by (seed, iteration): a
        # checkpoint needs no RNG state.
        seed = cfg.seed * 1_000_003 + it + rank() * 100003
        generator = torch.Generator(device).manual_seed(seed)
        ro = rollout(models, prompt_ids, tok.eot_token, cfg, generator)
        # 2. Rewards: the per-token KL penalty, plus the score on the last token (details 7-9).
        mask = ro.mask.float()
        rewards, _ = shape_rewards(ro.scores, ro.has_eos, ro.logp, ro.ref_logp, mask, kl_coef, cfg)
        # 3. GAE: advantages and returns (details 11, 12).
        shaped = masked_whiten(rewards, mask, shift_mean=False) if cfg.whiten_rewards else rewards
        advantages, ro.returns = gae(shaped, ro.values, mask, cfg.gamma, cfg.lam)
        ro.advantages = masked_whiten(advantages, mask) if cfg.whiten_advantages else advantages
        # 4. Update: PPO epochs on this batch (details 13-15).
        shuffle = torch.Generator().manual_seed(cfg.seed + it)
        stats = ppo_update(models, (opt_pi, opt_v), ro, cfg, shuffle)
        # 5. Log; adapt the KL coefficient (Ziegler et al. 2019); evaluate; checkpoint.
        pairs = decode(tok, prompt_ids, ro)
        stats = mean_over_ranks(stats | rollout_stats(ro, rewards, mask, kl_coef, pairs,
                                                      gold_reward))
        run.stop_if_not_finite(it, stats)
        kl_coef = adaptive_kl_coef(kl_coef, stats["kl"], n, cfg) if cfg.kl_target > 0 else kl_coef
        it += 1
        run.count(steps=cfg.ppo_epochs * cfg.num_minibatches,  # the stage's compute
                  tokens=float(ro.attn.sum()) * cfg.ppo_epochs, samples=len(prompt_ids),
                  rollout_tokens=float(ro.attn.sum()))
        if it % cfg.log_every == 0 or it == total:
            run.log_iteration(it, stats, pairs[:cfg.num_samples], ro.scores)
        if eval_prompts and (it == total or (cfg.eval_every and it % cfg.eval_every == 0)):
            evaluate()
        if cfg.ckpt_every and it % cfg.ckpt_every == 0 and it < total:
            run.save(it, policy=policy, critic=critic, opt_pi=opt_pi, opt_v=opt_v, kl_coef=kl_coef)
    return policy, run.finish(it, {"policy": policy.state_dict()})
