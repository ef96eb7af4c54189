"""DPO: closed forms of the loss, response log-probs against a hand loop, the reference bookkeeping,
and DPO learning on the demo task. python -m pytest -q tests/test_dpo.py"""
import copy
import json
import math

import pytest
import torch

from data import collate_pairs, collate_prompts
from dpo import DPOConfig, dpo, dpo_loss, response_logps, token_logps
from helpers import sequence_logps  # the plain full-sequence form response_logps equals
from model import GPT, GPTConfig, response_mask
from test_stages import demo, demo_sft  # the demo task and its SFT model, trained once per session


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=257, block_size=128))


def random_pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(0, 256, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()
    return [(ids(3, 9), ids(1, 8) + [256], ids(1, 8) + [256]) for _ in range(n)]


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_loss_is_ln2_with_zero_rewards_when_policy_equals_reference():
    logps = torch.randn(2, 5) * 10
    losses, chosen, rejected = dpo_loss(logps[0], logps[1], logps[0].clone(), logps[1].clone(), beta=0.3)
    torch.testing.assert_close(losses, torch.full((5,), math.log(2)))
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0
    assert (chosen > rejected).float().mean() == 0  # accuracy is strict: ties count as wrong


def test_gradient_raises_chosen_and_lowers_rejected_logps():
    policy_chosen, policy_rejected = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    losses, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, torch.randn(4), torch.randn(4), beta=0.1)
    losses.sum().backward()
    assert (policy_chosen.grad < 0).all() and (policy_rejected.grad > 0).all()  # descent: chosen up, rejected down
    assert not chosen.requires_grad and not rejected.requires_grad


def test_conservative_dpo_and_ipo_match_hand_computation():
    # h = (-3 - -4) - (-5 - -4) = 2; beta h = 1
    args = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0])
    losses, chosen, rejected = dpo_loss(*args, beta=0.5, label_smoothing=0.1)
    assert losses.item() == pytest.approx(-0.9 * log_sigmoid(1.0) - 0.1 * log_sigmoid(-1.0))
    assert (chosen.item(), rejected.item()) == (0.5, -0.5)
    assert dpo_loss(*args, beta=0.5)[0].item() == pytest.approx(-log_sigmoid(1.0))
    assert dpo_loss(*args, beta=0.25, loss_type="ipo")[0].item() == pytest.approx((2 - 1 / (2 * 0.25)) ** 2)


def test_sequence_logps_equals_a_hand_loop_and_ignores_right_padding():
    model = tiny_gpt()
    batch = collate_pairs(random_pairs(3))
    tokens, mask = batch["tokens"], batch["loss_mask"]
    with torch.no_grad():
        logits = model(tokens)
        fast = sequence_logps(logits, tokens, mask)
        by_hand = torch.zeros(len(tokens))
        for b in range(len(tokens)):
            for t in range(1, tokens.size(1)):
                if mask[b, t]:  # token t is predicted by the logits at t - 1
                    by_hand[b] += torch.log_softmax(logits[b, t - 1], -1)[tokens[b, t]]
        torch.testing.assert_close(fast, by_hand)
        torch.testing.assert_close(response_logps(model, batch), by_hand)  # LM head from min prompt_len - 1
        padded = torch.cat([tokens, torch.zeros(len(tokens), 7, dtype=torch.long)], 1)
        padded_mask = torch.cat([mask, torch.zeros(len(tokens), 7, dtype=torch.bool)], 1)
        torch.testing.assert_close(sequence_logps(model(padded), padded, padded_mask), by_hand)


def test_reference_must_be_a_separate_model(tmp_path):
    model = tiny_gpt()
    with pytest.raises(ValueError, match="ref is the policy"):
        dpo(model, model, random_pairs(8), DPOConfig(device="cpu"), tmp_path)


def test_precomputed_and_on_the_fly_reference_give_the_same_training(tmp_path):
    pairs, sft = random_pairs(16), tiny_gpt()
    runs = []
    for precompute in (True, False):
        cfg = DPOConfig(lr=1e-3, batch_size=4, grad_accum=2, max_steps=3, warmup_steps=0, log_every=1, eval_every=0,
                        precompute_ref=precompute, device="cpu")
        policy, metrics = dpo(copy.deepcopy(sft), copy.deepcopy(sft), pairs, cfg, tmp_path / str(precompute), pairs[:8])
        losses = [line["loss"] for line in map(json.loads, open(tmp_path / str(precompute) / "metrics.jsonl"))]
        runs.append((policy, metrics, losses))
    (a, metrics_a, losses_a), (b, metrics_b, losses_b) = runs
    assert len(losses_a) == 4 and losses_a[-1] != pytest.approx(math.log(2))  # 3 steps + eval: it trained
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    for key in ("eval/loss", "eval/rewards/margins", "eval/logps/chosen"):
        assert metrics_a[key] == pytest.approx(metrics_b[key], rel=1e-4), key
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)  # batches padded to other lengths: float noise


def mean_gold_of_samples(model, task, tok, prompts, seed=0):
    """Mean gold reward of one sampled response (temperature 1) per prompt."""
    batch = collate_prompts([tok.encode_ordinary(p) for p in prompts])
    out = model.generate(batch["tokens"], 40, temperature=1.0, eos_id=tok.eot_token,
                         attention_mask=batch["attention_mask"], generator=torch.Generator().manual_seed(seed))
    new = out[:, batch["tokens"].size(1):]
    keep = response_mask(new, tok.eot_token) & (new != tok.eot_token)
    texts = [tok.decode(row[m].tolist()) for row, m in zip(new, keep)]
    return sum(task.gold_reward(p, t) for p, t in zip(prompts, texts)) / len(prompts)


def test_dpo_learns_the_preferences_and_raises_the_gold_reward_of_samples(tmp_path):
    task, tok, rows = demo()
    sft_model, _ = demo_sft()
    cfg = DPOConfig(lr=1e-4, beta=0.3, batch_size=32, grad_accum=1, max_steps=200, warmup_steps=5, eval_every=200,
                    device="cpu")
    pairs = rows["pairs_train"][:200 * 32]  # as many as 200 steps draw: the reference's log-probs of these only
    policy, metrics = dpo(copy.deepcopy(sft_model), copy.deepcopy(sft_model), pairs, cfg, tmp_path,
                          rows["pairs_eval"])
    evals = [line for line in map(json.loads, open(tmp_path / "metrics.jsonl")) if line["split"] == "eval"]
    assert evals[0]["loss"] == pytest.approx(math.log(2)) and evals[0]["rewards/accuracies"] == 0
    assert metrics["eval/rewards/accuracies"] > 0.58 and metrics["eval/rewards/margins"] > 0  # 600 held-out pairs
    prompts = task.prompts_eval * 4  # 600 samples: the mean gold is known to about +-0.1
    before, after = (mean_gold_of_samples(m, task, tok, prompts) for m in (sft_model, policy))
    print(f"DPO eval accuracy {metrics['eval/rewards/accuracies']:.3f}, gold of samples {before:.3f} -> {after:.3f}")
    assert after > before + 0.3


def test_token_logps_hand_written_backward_matches_autograd_of_log_softmax():
    logits = torch.randn(3, 4, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 4))
    grad = torch.randn(3, 4)
    expected = torch.autograd.grad(logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1), logits, grad)[0]
    got = token_logps(logits, tokens)
    torch.testing.assert_close(got, logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1))
    torch.testing.assert_close(torch.autograd.grad(got, logits, grad)[0], expected)
