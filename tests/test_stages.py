"""The SFT and reward-model stages of mpo.py: closed forms, and learning on the demo task.
python -m pytest -q tests/test_stages.py"""
import functools
import json
import math
import tempfile

import pytest
import torch
import torch.nn.functional as F

from data import DemoConfig, collate_pairs, collate_sft, encode_dataset, get_tokenizer, load_task
from model import GPT, GPTConfig, ScalarModel
from lab.rm import accuracy_by_gap, batch_scores, score_batch, score_pairs
from mpo import RMConfig, SFTConfig, bradley_terry_loss, sft, sft_loss, train_reward_model

# The demo-task model of the learning tests: the smallest GPT that spells the demo's words well after a
# few hundred steps (2 layers of 64 need twice the steps for the same eval loss).
DEMO_GPT = GPTConfig(n_layer=2, n_head=4, n_embd=128, vocab_size=257, block_size=128)


@functools.cache
def demo():
    """The demo task (600 held-out pairs, to measure accuracy to about +-2%) and its rows encoded
    with the byte tokenizer."""
    task = load_task("demo", demo=DemoConfig(pairs_eval=600, pairs_train=3000))  # the pairs these tests were tuned on
    tok = get_tokenizer("byte")
    rows = {k: encode_dataset(tok, getattr(task, k), 32, 48, k)
            for k in ("sft_train", "sft_eval", "pairs_train", "pairs_eval")}
    assert len(rows["pairs_eval"]) == len(task.pairs_eval)  # no pair dropped: rows line up with task pairs
    return task, tok, rows


@functools.cache
def demo_sft():
    """A tiny GPT fine-tuned on the demo's SFT data, shared by the SFT, RM and DPO learning tests:
    (sft model, eval losses at step 0 and at the end)."""
    task, tok, rows = demo()
    torch.manual_seed(0)
    cfg = SFTConfig(lr=3e-3, batch_size=32, grad_accum=1, max_steps=300, warmup_steps=10, eval_every=300,
                    log_every=50, device="cpu")
    with tempfile.TemporaryDirectory() as out:
        model, _ = sft(GPT(DEMO_GPT), rows["sft_train"], cfg, out, rows["sft_eval"])
        lines = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    return model, [line["loss"] for line in lines if line["split"] == "eval"]


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=257, block_size=128))


EXAMPLES = [([5, 6, 7], [8, 9, 256]), ([1, 2, 3, 4, 5], [6, 256]), ([9, 9], [1, 2, 3, 4, 256])]


def test_sft_loss_is_the_mean_token_loss_on_response_and_eos_only():
    model, batch = tiny_gpt(), collate_sft(EXAMPLES)
    with torch.no_grad():
        loss, _ = sft_loss(model, batch)
        terms = []
        for prompt, response in EXAMPLES:
            logits = model(torch.tensor([prompt + response]))[0]
            for t in range(len(prompt), len(prompt) + len(response)):  # logits at t - 1 predict token t
                terms.append(F.cross_entropy(logits[t - 1], torch.tensor((prompt + response)[t])))
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_bradley_terry_loss_on_given_margins():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = [math.log1p(math.exp(-2.0)), math.log(2), math.log1p(math.exp(2.0))]  # -log sigmoid(gap)
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), torch.tensor(expected))
    with_margin = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.0)), math.log1p(math.exp(3.0))]
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin=1.0), torch.tensor(with_margin))
    centred = bradley_terry_loss(chosen, rejected, center_coef=0.5) - bradley_terry_loss(chosen, rejected)
    torch.testing.assert_close(centred, torch.tensor([2.0, 0.0, 0.0]))  # 0.5 * (r_c + r_r)^2


def test_accuracy_by_gap_buckets_by_absolute_gap():
    table = accuracy_by_gap(torch.tensor([0.5, -0.5, 1.5, 2.5, -3.5, 4.0, 3.0]))
    assert table == {"[0,1)": {"accuracy": 0.5, "pairs": 2}, "[1,2)": {"accuracy": 1.0, "pairs": 1},
                     "[2,3)": {"accuracy": 1.0, "pairs": 1}, ">=3": {"accuracy": 2 / 3, "pairs": 3}}
    by_other = accuracy_by_gap([1.0, -1.0, 1.0], by=[0.1, 5.0, -5.0])
    assert by_other["[0,1)"] == {"accuracy": 1.0, "pairs": 1} and by_other[">=3"] == {"accuracy": 0.5, "pairs": 2}
    assert by_other["[1,2)"] == {"accuracy": None, "pairs": 0}


def test_reward_is_read_at_the_last_real_token_like_scalar_model_score():
    torch.manual_seed(0)
    rm = ScalarModel(GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=257, block_size=128))
    batch = collate_pairs([(p, r, r[1:]) for p, r in EXAMPLES])
    with torch.no_grad():
        scores = score_batch(rm, batch)
        torch.testing.assert_close(scores, rm.score(batch["tokens"], batch["attention_mask"]))
        rows = zip(batch["tokens"].tolist(), batch["lengths"])
        alone = torch.stack([rm(torch.tensor([row[:n]]))[0, -1] for row, n in rows])  # each row unpadded
    torch.testing.assert_close(scores, alone)


def test_sft_learns_the_demo_responses():
    model, (before, after) = demo_sft()
    assert before == pytest.approx(math.log(257), abs=0.1)  # an untrained model: uniform over 257 bytes
    assert after < 0.9  # it levels off near 0.75 nats per byte


def test_reward_model_beats_chance_and_is_surer_on_large_gold_gaps(tmp_path):
    task, tok, rows = demo()
    sft_model, _ = demo_sft()
    cfg = RMConfig(lr=1e-4, batch_size=32, grad_accum=1, max_steps=150, warmup_steps=10, eval_every=0, device="cpu")
    torch.manual_seed(0)  # the head's init; RM from SFT (RMConfig.init="sft"): the demo's base model is untrained
    rm, metrics = train_reward_model(ScalarModel.from_gpt(sft_model), rows["pairs_train"], cfg, tmp_path,
                                     rows["pairs_eval"], reference_examples=rows["sft_eval"])
    assert metrics["eval/accuracy"] > 0.55  # 600 pairs: chance is 0.50 +- 0.02; label noise caps it near 0.79
    chosen, rejected = score_pairs(rm, rows["pairs_eval"], 64, "cpu", "auto")
    gold = [task.gold_reward(p.prompt, p.chosen) - task.gold_reward(p.prompt, p.rejected) for p in task.pairs_eval]
    table = accuracy_by_gap(chosen - rejected, by=gold)
    print("RM accuracy", metrics["eval/accuracy"], "by gold gap", table, "by RM gap", metrics["eval/accuracy_by_gap"])
    assert table[">=3"]["accuracy"] > table["[0,1)"]["accuracy"] + 0.1  # labels of small gaps are near coin flips
    reference = torch.cat(batch_scores(rm, rows["sft_eval"], collate_sft, 64, "cpu", "auto"))
    by_prompt = {}
    for (prompt, _), score in zip(rows["sft_eval"], reference.tolist()):
        by_prompt.setdefault(tuple(prompt), []).append(score)
    within = [x - sum(xs) / len(xs) for xs in by_prompt.values() for x in xs]  # N+ 11, std among one prompt's
    dof = sum(len(xs) - 1 for xs in by_prompt.values())
    assert abs(float(reference.mean())) < 1e-4 and math.sqrt(sum(x * x for x in within) / dof) == pytest.approx(1.0)


def test_demo_reward_model_is_surer_on_its_own_large_gaps(tmp_path):
    """The fact MPO rests on, on the demo with its word tokenizer: held-out accuracy rises with |RM gap|
    (gaps in units of the SFT responses' score spread)."""
    task = load_task("demo", demo=DemoConfig(pairs_train=12800, pairs_eval=1000))
    tok = get_tokenizer("demo")
    pairs, pairs_eval, reference = (encode_dataset(tok, x, 16, 16, "t") for x in (task.pairs_train, task.pairs_eval,
                                                                                 task.sft_eval))
    torch.manual_seed(0)
    rm = ScalarModel(GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=tok.n_vocab, block_size=32))
    cfg = RMConfig(lr=1e-3, batch_size=32, grad_accum=1, epochs=1.0, warmup_steps=10, eval_every=0, device="cpu")
    _, metrics = train_reward_model(rm, pairs, cfg, tmp_path, pairs_eval, reference)
    table = [v for v in metrics["eval/accuracy_by_gap"].values() if v["pairs"] >= 50]
    print(metrics["eval/accuracy_by_gap"])
    assert len(table) >= 2 and table[-1]["accuracy"] > table[0]["accuracy"] + 0.1  # 1000 pairs: +-0.03 each
