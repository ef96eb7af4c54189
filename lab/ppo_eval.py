"""What PPO logs besides its losses: each iteration's statistics of its rollout, and the held-out
evaluation along the stage (ppo.ppo calls both)."""
from collections import defaultdict

import torch

from lab.devices import masked_var, rank, shard, sum_over_ranks
from lab.progress import progress
from lab.readers import decode_text


def decode(tok, prompt_ids, ro):
    """(prompt, response) strings of the rollout's rows; the response without its EOS and pads."""
    return [(tok.decode(p), decode_text(tok, r[m].tolist()))
            for p, r, m in zip(prompt_ids, ro.responses, ro.mask)]


def rollout_stats(ro, rewards, mask, kl_coef, pairs, gold_reward=None) -> dict:
    """What an iteration logs about its rollout: mean score, RLHF reward, KL to the reference (k1,
    per response), length, share ending with EOS, the critic's explained variance, its seconds, and
    the mean gold reward of the decoded (prompt, response) `pairs` when the task has one."""
    unexplained = masked_var(ro.returns - ro.values, mask)
    gold = {"gold": sum(gold_reward(p, r) for p, r in pairs) / len(pairs)} if gold_reward else {}
    return {"score": float(ro.scores.mean()),
            "rlhf_reward": float(rewards.sum(1).mean()),
            "kl": float(((ro.logp - ro.ref_logp) * mask).sum(1).mean()),
            "kl_coef": kl_coef,
            "response_len": float(mask.sum(1).mean()),
            "eos_frac": float(ro.has_eos.float().mean()),
            "generate_s": ro.generate_s, "rollout_s": ro.rollout_s,
            "explained_variance":
                1 - float(unexplained / masked_var(ro.returns, mask).clamp(min=1e-8)),
            **gold}


@torch.no_grad()
def eval_policy(rollout, models, prompt_ids, tok, cfg, gold_reward=None, stage="ppo"):
    """One response to each of the first cfg.eval_prompts prompts (a fraction of the cost) sampled
    by `rollout` (ppo.rollout), always with the same random draws (a fixed seed), so that
    evaluations along the stage differ only by the policy: mean RM score, KL to the reference (nats
    per response), length, share ending with EOS, and the gold reward when the task has one. Under
    torchrun each rank samples for its shard of the prompts and the sums are gathered."""
    prompt_ids = prompt_ids[:cfg.eval_prompts or None]
    device = next(models.policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1 + rank() * 100003)
    sums = defaultdict(float)
    step = cfg.prompts_per_step * cfg.samples_per_prompt
    mine = shard(prompt_ids)
    for i in progress(range(0, len(mine), step), f"{stage} eval"):
        ro = rollout(models, mine[i:i + step], tok.eot_token, cfg, generator)
        sums["score"] += float(ro.scores.sum())
        sums["kl"] += float(((ro.logp - ro.ref_logp) * ro.mask).sum())
        sums["response_len"] += float(ro.mask.sum())
        sums["eos_frac"] += float(ro.has_eos.sum())
        if gold_reward:
            sums["gold"] += sum(gold_reward(p, r) for p, r in decode(tok, mine[i:i + step], ro))
    return {k: v / len(prompt_ids) for k, v in sum_over_ranks(sums).items()}
