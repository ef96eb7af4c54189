"""Tests of ppo.py: GAE against a plain loop, the losses on textbook cases, reward shaping, that rollout
and training forwards agree, and that PPO raises the demo task's gold reward at a bounded KL."""
import copy
import json

import pytest
import torch
import torch.nn as nn

import ppo as ppo_module
from data import encode_dataset, get_tokenizer, load_task
from dpo import token_logps
from model import GPT, GPTConfig, ScalarModel
from mpo import SFTConfig, sft
from ppo import (Models, PPOConfig, gae, policy_loss, ppo, ppo_update, response_logits, rollout, shape_rewards,
                 value_loss)

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=257, block_size=128)


def prefix_mask(lengths, R):
    return torch.arange(R)[None, :] < torch.tensor(lengths)[:, None]


def test_gae_matches_backward_recursion():
    torch.manual_seed(0)
    lengths, R = [7, 3, 1, 5], 7
    rewards, values = torch.randn(4, R), torch.randn(4, R)
    mask = prefix_mask(lengths, R)
    for gamma, lam in ((1.0, 0.95), (0.9, 0.7)):
        adv, ret = gae(rewards, values, mask, gamma, lam)
        for b, L in enumerate(lengths):
            a = 0.0
            for t in reversed(range(L)):  # the value after the last real token is 0
                next_value = values[b, t + 1].item() if t + 1 < L else 0.0
                a = rewards[b, t].item() + gamma * next_value - values[b, t].item() + gamma * lam * a
                assert adv[b, t].item() == pytest.approx(a, abs=1e-5)
                assert ret[b, t].item() == pytest.approx(a + values[b, t].item(), abs=1e-5)
        assert not adv[~mask].any() and not ret[~mask].any()  # pads carry nothing


def test_clipped_losses_textbook_values():
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1])
    loss, r, clipped = policy_loss(ratio.log(), torch.zeros(5), adv, 0.2)
    # -min(r A, clip(r, 0.8, 1.2) A): gains above 1 + eps are cut, losses are never cut
    assert torch.allclose(loss, torch.tensor([-1.2, -0.5, 1.5, 0.8, -2.2]))
    assert torch.allclose(r, ratio)
    assert clipped.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    values, old, returns = torch.tensor([0.5, 0.1, -0.5]), torch.zeros(3), torch.tensor([1.0, 1.0, 0.0])
    loss, clipped = value_loss(values, old, returns, 0.2)
    # 0.5 max((V - R)^2, (clip(V, old +- 0.2) - R)^2)
    assert torch.allclose(loss, torch.tensor([0.5 * 0.64, 0.5 * 0.81, 0.5 * 0.25]))
    assert clipped.tolist() == [1.0, 0.0, 0.0]


def test_score_on_last_token_and_missing_eos_penalty():
    torch.manual_seed(0)
    lengths, R = [3, 5, 2], 5
    mask = prefix_mask(lengths, R).float()
    logp, ref_logp = torch.randn(3, R), torch.randn(3, R)
    raw, has_eos = torch.tensor([2.0, 7.0, -1.0]), torch.tensor([True, False, True])
    cfg = PPOConfig(kl_clamp=False, reward_clip=5.0, missing_eos_penalty=1.0)
    rewards, scores = shape_rewards(raw, has_eos, logp, ref_logp, mask, 0.1, cfg)
    assert scores.tolist() == [2.0, 4.0, -1.0]  # row 1: clipped to 5, then -1 for the missing EOS
    expected = -0.1 * (logp - ref_logp) * mask
    expected[[0, 1, 2], [2, 4, 1]] += scores  # the score lands on the last real token only
    assert torch.allclose(rewards, expected)
    clamped, _ = shape_rewards(raw, has_eos, logp, ref_logp, mask, 0.1, PPOConfig(kl_clamp=True))
    kl_part = clamped - (expected + 0.1 * (logp - ref_logp) * mask)
    assert torch.allclose(kl_part, -0.1 * ((logp - ref_logp) * mask).clamp(min=0))  # one-sided: never a bonus
    assert (kl_part <= 0).all()


def tiny_setup():
    torch.manual_seed(0)
    tok = get_tokenizer("byte")
    policy, rm = GPT(TINY), ScalarModel(TINY)
    prompts = ["a", "hello there, friend", "sea, 3 words:"]  # different lengths: left padding
    ids = encode_dataset(tok, prompts, 32, 16)
    return tok, policy, rm, copy.deepcopy(rm), prompts, ids


def test_rollout_and_training_forward_agree():
    tok, policy, rm, critic, _, ids = tiny_setup()
    # Greedy KV-cache generation must pick the argmax of the full, left-padded training forward.
    models = Models(policy, copy.deepcopy(policy), rm, critic)
    ro = rollout(models, ids, tok.eot_token, PPOConfig(temperature=0, max_new_tokens=12), None)  # greedy
    seq, attn, P, mask = ro.seq, ro.attn, ro.P, ro.mask
    assert torch.equal(response_logits(policy, seq, attn, P, 1.0).argmax(-1)[mask], seq[:, P:][mask])
    # A padded row gets the log-probs of the same row alone, unpadded.
    cfg = PPOConfig(temperature=0.7, max_new_tokens=12, micro_batch_size=2, samples_per_prompt=2)
    ro = rollout(models, [p for p in ids for _ in range(2)], tok.eot_token, cfg, torch.Generator().manual_seed(0))
    P = ro.P
    for b in range(len(ro.seq)):
        real = ro.attn[b]
        alone = ro.seq[b][real][None]
        P_alone = P - int((~real[:P]).sum())
        logp = token_logps(policy(alone[:, :-1], logits_from=P_alone - 1) / 0.7, alone[:, P_alone:])[0]
        assert torch.allclose(logp, ro.logp[b][ro.mask[b]], atol=1e-5)
    assert torch.equal(ro.logp, ro.ref_logp)  # ref = copy of the policy: KL exactly 0
    # Before the first update the PPO ratio is exactly 1: nothing clipped, approx KL 0.
    ro.advantages, ro.returns = torch.randn_like(ro.values), torch.randn_like(ro.values)
    lr0 = torch.optim.AdamW(policy.parameters(), lr=0.0)
    stats = ppo_update(models, (lr0, torch.optim.AdamW(critic.parameters(), lr=0.0)), ro,
                       PPOConfig(temperature=0.7, micro_batch_size=2), torch.Generator().manual_seed(1))
    assert stats["ratio"] == 1.0 and stats["clipfrac"] == 0.0 and stats["approxkl"] == 0.0


def test_stage_runs_with_scalar_models_logs_and_skips_when_done(tmp_path):
    tok, policy, rm, critic, prompts, ids = tiny_setup()
    cfg = PPOConfig(prompts_per_step=2, max_new_tokens=8, passes=1, actor_lr=1e-3, critic_lr=1e-3, device="cpu")
    ref = copy.deepcopy(policy)
    policy, metrics = ppo(Models(policy, ref, rm, critic), ids, tok, cfg, tmp_path, eval_prompts=ids[:2])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(r["stage"] == "ppo" for r in lines)
    for key in ("score", "rlhf_reward", "kl", "entropy", "clipfrac", "approxkl", "vf_loss", "explained_variance",
                "ratio", "response_len", "eos_frac", "rollout_s", "update_s"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in train), key
    assert [r["step"] for r in lines if r["split"] == "eval"] == [0, 2]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {s["prompt"] for s in samples} <= set(prompts) and all(isinstance(s["response"], str) for s in samples)
    # A finished stage only loads its weights when called again.
    fresh = GPT(TINY)
    again, metrics_again = ppo(Models(fresh, copy.deepcopy(fresh), rm, critic), ids, tok, cfg, tmp_path)
    assert metrics_again == metrics
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), policy.state_dict().values()))


def test_resume_mid_stage_matches_uninterrupted_run(tmp_path, monkeypatch):
    tok, policy, rm, critic, _, ids = tiny_setup()
    cfg = PPOConfig(prompts_per_step=1, max_new_tokens=8, ckpt_every=1, actor_lr=1e-3, critic_lr=1e-3, device="cpu")

    def run(out_dir):  # fresh copies of the starting models, as a restarted process would have
        start = copy.deepcopy(policy)
        return ppo(Models(start, copy.deepcopy(policy), rm, copy.deepcopy(critic)), ids, tok, cfg, out_dir)[0]

    straight = run(tmp_path / "straight")
    real_update, calls = ppo_module.ppo_update, []

    def crash_in_second_update(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_update(*args)

    monkeypatch.setattr(ppo_module, "ppo_update", crash_in_second_update)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    monkeypatch.setattr(ppo_module, "ppo_update", real_update)
    resumed = run(tmp_path / "resumed")  # picks up after iteration 1
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()))
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


class GoldRewardModel(nn.Module):
    """The demo task's gold reward behind the reward-model interface: score(tokens, attention_mask)."""

    def __init__(self, tok, gold_reward):
        super().__init__()
        self.tok, self.gold_reward = tok, gold_reward

    def score(self, idx, attention_mask):
        texts = [self.tok.decode([t for t in row[m].tolist() if t != self.tok.eot_token])
                 for row, m in zip(idx, attention_mask.bool())]
        # demo prompts end with the first ":" ("sea, 4 words, no crab:")
        return torch.tensor([self.gold_reward(t[:t.index(":") + 1], t[t.index(":") + 1:]) for t in texts])


def test_ppo_raises_demo_gold_reward_at_bounded_kl(tmp_path):
    torch.manual_seed(0)
    task, tok = load_task("demo"), get_tokenizer("byte")
    policy = GPT(TINY)
    sft(policy, encode_dataset(tok, task.sft_train, 32, 48),
        SFTConfig(lr=3e-3, batch_size=32, grad_accum=1, max_steps=150, warmup_steps=10, eval_every=0, log_every=50,
                  device="cpu"), tmp_path / "sft")
    ref, gold_rm, critic = copy.deepcopy(policy), GoldRewardModel(tok, task.gold_reward), ScalarModel.from_gpt(policy)
    # Small models learn at much larger learning rates than GPT-2; one pass over the 497 train prompts.
    cfg = PPOConfig(max_new_tokens=40, prompts_per_step=32, ppo_epochs=4, num_minibatches=2,
                    micro_batch_size=64, actor_lr=3e-4, critic_lr=1e-3, kl_coef=0.1, warmup_steps=0, decay="constant",
                    whiten_advantages=True, eval_every=0, device="cpu")
    prompts = encode_dataset(tok, sorted({p.prompt for p in task.pairs_train}), 32, 40)
    policy, metrics = ppo(Models(policy, ref, gold_rm, critic), prompts, tok, cfg, tmp_path / "ppo",
                          eval_prompts=encode_dataset(tok, task.prompts_eval[:64], 32, 40), gold_reward=task.gold_reward)
    evals = [r for r in map(json.loads, (tmp_path / "ppo" / "metrics.jsonl").open()) if r["split"] == "eval"]
    before = evals[0]  # the SFT policy, evaluated before the first update
    gain, kl = metrics["eval/gold"] - before["gold"], metrics["eval/kl"]
    print(f"gold {before['gold']:.3f} -> {metrics['eval/gold']:.3f}, KL {before['kl']:.3f} -> {kl:.3f}")
    assert before["kl"] == 0.0 and gain > 0.5
    # PPO maximises gold - kl_coef * KL, and the SFT start scores gold_before at KL 0: a policy that
    # paid more in KL than it gained would have made its own objective worse.
    assert 0 < kl < gain / cfg.kl_coef
