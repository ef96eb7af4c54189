"""The study's accounting: exact t quantiles, "equivalent" verdicts, the seeds a verdict needs, where a
claim's noise comes from, claim (a) for one shared RM, the FLOPs every stage spent against a count by
hand, and the ablation arms' splits.
python -m pytest -q tests/test_accounting.py"""
import copy
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mpo
from data import collate_sft, encode_dataset, get_tokenizer
from dpo import DPOConfig, dpo
from lab.estimates import forward_flops
from lab.results import gap_claim, study
from lab.stats import noise, paired, sampling_variance, seeds_needed, t975, t_quantile, verdict
from lab.study import compute, compute_budget, dpo_flops
from model import GPT, GPTConfig, ScalarModel
from ppo import Models, PPOConfig, ppo
from train import TrainConfig, train


def test_t_quantiles_are_exact_beyond_30_degrees_of_freedom():
    # Published two-sided 95 % and 90 % values (t_{0.975}, t_{0.95}); the old table used 1.96 past df 30.
    for df, q975, q95 in ((1, 12.7062, 6.3138), (9, 2.2622, 1.8331), (31, 2.0395, 1.6955),
                          (40, 2.0211, 1.6839), (60, 2.0003, 1.6706), (120, 1.9799, 1.6577)):
        assert t975(df) == pytest.approx(q975, abs=1e-4) and t_quantile(0.95, df) == pytest.approx(q95, abs=1e-4)
    assert t975(100000) == pytest.approx(1.95996, abs=1e-4)  # the normal's, in the limit


def test_equivalence_needs_the_90_interval_inside_the_margin():
    d = paired([0.1, -0.1, 0.05, 0.0], [0.0] * 4)  # mean 0.0125, sd 0.0854: 90 % half width 2.3534 * 0.0427
    half90 = 2.3534 * 0.08539 / 2
    assert verdict(d) == "inconclusive"  # no margin: the 95 % interval holds 0
    assert verdict(d, margin=0.0125 + half90 + 0.001) == "equivalent"
    assert verdict(d, margin=0.0125 + half90 - 0.001) == "inconclusive"
    assert verdict(paired([3.0, 3.2, 2.8], [1.0] * 3), margin=10.0) == "holds"  # decisive first
    assert verdict(paired([0.5], [0.0]), margin=10.0) == "inconclusive"  # one seed: no interval


def test_seeds_needed_at_the_observed_spread():
    d = paired([3, 5, 4], [1, 2, 3])  # differences 2, 3, 1: mean 2, sd 1
    assert seeds_needed(d) == 4  # t_{0.975, 3} / 2 = 1.59 < 2; at 3 seeds 4.30 / 1.73 = 2.48
    d = paired([0.1, -0.1, 0.05, 0.0], [0.0] * 4)
    n = seeds_needed(d, margin=0.05)  # equivalence: 0.0125 + t_{0.95, n-1} 0.0854 / sqrt(n) < 0.05
    assert 0.0125 + t_quantile(0.95, n - 1) * 0.08539 / math.sqrt(n) < 0.05
    assert 0.0125 + t_quantile(0.95, n - 2) * 0.08539 / math.sqrt(n - 1) >= 0.05
    assert seeds_needed(paired([0.1, -0.1], [0.0, 0.0])) is None  # mean 0, no margin: never


def test_noise_splits_the_spread_into_evaluation_and_training():
    d = paired([1.0, 3.0], [0.0, 0.0])  # differences 1 and 3: variance 2 over seeds
    out = noise(d, [1.5, 1.9], None)  # the evaluation's sampling adds 1.7 on average: training the rest
    assert out["total_sd"] == pytest.approx(2 ** 0.5) and out["evaluation_sd"] == pytest.approx(1.7 ** 0.5)
    assert out["training_sd"] == pytest.approx(0.3 ** 0.5) and out["buy"] == "samples"
    assert noise(d, [0.5, 0.7], None)["buy"] == "seeds"  # training's 1.4 is the larger share
    assert set(noise(d, None, None)) == {"total_sd", "seeds_needed"}  # one sample a prompt: no split


def test_the_evaluations_share_comes_from_the_paired_samples_within_each_prompt():
    # two prompts, three samples each; sample j of both models shares its random numbers: pairs of draws
    a = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
    b = [[1.0, 2.0, 3.0], [1.0, 0.0, -1.0]]  # the same draws on prompt 1: no noise in the difference there
    assert sampling_variance(a, b) == pytest.approx((0.0 + 1.0 / 3) / 2 ** 2)  # var of (-1, 0, 1) is 1, / 3 samples
    assert sampling_variance([[1.0], [2.0]], [[0.0], [0.0]]) is None  # one sample a prompt: no split
    from test_study import record
    records = [record(s, [0.0, 1.0, 2.0, g, 1.0], 0.5, 0.8) for s, g in ((0, 2.0), (1, 4.0))]  # mpo - dpo_all: 1, 3
    for r in records:
        r["evaluation_var"] = {"mpo_beats_dpo_all": 0.2, "mpo_beats_ppo_all": None}
    claims = study(records)["claims"]
    n = claims["mpo_beats_dpo_all"]["noise"]
    assert n["evaluation_sd"] == pytest.approx(0.2 ** 0.5) and n["training_sd"] == pytest.approx(1.8 ** 0.5)
    assert n["buy"] == "seeds" and set(claims["mpo_beats_ppo_all"]["noise"]) == {"total_sd", "seeds_needed"}


def test_one_shared_rm_gets_an_interval_over_its_pairs():
    buckets = {"q1": {"accuracy": 0.5, "pairs": 100, "low": 0.0, "high": 0.1},
               "q4": {"accuracy": 0.9, "pairs": 100, "low": 1.0, "high": 3.0}}
    c = gap_claim([buckets, copy.deepcopy(buckets)])  # two seeds, one RM
    half = 1.96 * (0.5 * 0.5 / 100 + 0.9 * 0.1 / 100) ** 0.5
    assert c["diff"]["ci95"] == pytest.approx([0.4 - half, 0.4 + half]) and c["verdict"] == "holds"
    assert c["diff"]["per_seed"] == pytest.approx([0.4]) and "one RM" in c["metric"]
    other = copy.deepcopy(buckets)
    other["q4"]["accuracy"] = 0.8
    assert gap_claim([buckets, other])["diff"] == paired([0.9, 0.8], [0.5, 0.5])  # own RMs: paired over seeds


def test_forward_flops_are_the_matmuls_torch_counts():
    config = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16)
    for model, head in ((GPT(config), 50), (ScalarModel(config), 1)):
        with FlopCounterMode(display=False) as counter:
            model.eval()(torch.zeros(3, 5, dtype=torch.long))
        assert counter.get_total_flops() == 15 * forward_flops(config, head)
    assert forward_flops(config, 50) == 2 * (12 * 2 * 16 ** 2 + 16 * 50)  # by hand


def write_result(folder, result):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(result | {"wall_s": 1.5}))


def test_every_stage_spends_the_flops_counted_by_hand(tmp_path):
    torch.manual_seed(0)
    tok = get_tokenizer("byte")
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=tok.n_vocab, block_size=32)
    pi, v = 2 * (12 * 16 ** 2 + 16 * tok.n_vocab), 2 * (12 * 16 ** 2 + 16)  # a token's forward, by hand
    flops = {"policy": pi, "rm": v}
    # SFT: 3 steps of 2 x 4 rows of 6 tokens, forward and backward: 3 forwards a token
    rows = [([1, 2, 3], [4, 5, 256])] * 12
    cfg = TrainConfig(lr=1e-3, batch_size=4, grad_accum=2, max_steps=3, eval_every=0, device="cpu")
    write_result(tmp_path / "sft", train(GPT(config), mpo.sft_loss, rows, None, cfg, tmp_path / "sft", "sft",
                                         collate_sft))
    sft = compute(tmp_path, ["sft"], flops)
    assert sft["flops"] == sft["train_flops"] == 3 * pi * 3 * 2 * 4 * 6 and sft["wall_s"] == 1.5
    # DPO: 2 steps of 4 pairs of 2 + 2 + 2 + 3 tokens (the prompt twice); the reference's log-probs once, on all 8
    pairs = [([1, 2], [3, 256], [4, 5, 256])] * 8
    cfg = DPOConfig(lr=1e-3, batch_size=4, grad_accum=1, max_steps=2, warmup_steps=0, eval_every=0, device="cpu")
    policy = GPT(config)
    write_result(tmp_path / "dpo_all", dpo(policy, copy.deepcopy(policy), pairs, cfg, tmp_path / "dpo_all")[1])
    d = compute(tmp_path, ["dpo_all"], flops, {"samples": 16, "tokens": 8 * 9})  # made from resampled pairs
    assert d["train_flops"] == 3 * pi * 2 * 4 * 9
    assert d["score_flops"] == pi * 8 * 9 + v * 8 * 9  # the reference; the RM ranking the resampled pairs
    assert d["sample_flops"] == pi * 8 * 9 and d["samples"] == 16 and d["policy_steps"] == 2
    # PPO: per rollout token, decoding, the old policy and the reference (pi each), the RM and the critic (v
    # each); per trained token (ppo_epochs a rollout token) policy and critic forward and backward.
    prompts = encode_dataset(tok, ["a", "hello there", "sea, 3 words:"], 32, 16)
    cfg = PPOConfig(prompts_per_step=2, samples_per_prompt=2, max_new_tokens=6, ppo_epochs=2, num_minibatches=2,
                    micro_batch_size=2, warmup_steps=0, eval_every=0, device="cpu")
    policy, rm = GPT(config), ScalarModel(config)
    _, result = ppo(Models(policy, copy.deepcopy(policy), rm, copy.deepcopy(rm)), prompts, tok, cfg,
                    tmp_path / "mpo")
    write_result(tmp_path / "mpo", result)
    rollout = result["compute/rollout_tokens"]
    assert result["compute/tokens"] == 2 * rollout
    p = compute(tmp_path, ["mpo"], flops)
    assert p["train_flops"] == 3 * (pi + v) * 2 * rollout
    assert p["sample_flops"] == pi * rollout and p["score_flops"] == (2 * pi + 2 * v) * rollout
    assert p["samples"] == 6 and p["flops"] == p["train_flops"] + p["sample_flops"] + p["score_flops"]
    both = compute(tmp_path, ["dpo_all", "mpo"], flops)  # a model of two stages: their sum
    assert both["flops"] == d["flops"] - pi * 72 - v * 72 + p["flops"] and both["wall_s"] == 3.0


def test_the_arms_split_as_many_pairs_at_random_and_train_ppo_on_every_prompt():
    rows = [([i % 4], [10 + i], [20 + i]) for i in range(12)]  # 4 prompts, 3 pairs each
    gaps = torch.tensor([3.0, 0.1, 2.0, 0.2, 0.3, 1.5, 0.0, 0.4, 5.0, 0.5, 0.6, 0.7])
    split = mpo.SplitConfig(delta=1.0)
    easy, hard = mpo.easy_and_hard(rows, gaps, split)
    assert [r[1][0] for r in easy] == [10, 12, 15, 18] and hard == [[1], [3], [0], [2]]
    draws = [mpo.easy_and_hard(rows, gaps, mpo.SplitConfig(delta=1.0, select="random", seed=s)) for s in (0, 1)]
    assert all(len(e) == len(easy) for e, _ in draws)  # as many easy pairs as the gap gives
    assert [r[1] for r in draws[0][0]] != [r[1] for r in draws[1][0]]  # another seed, another draw
    assert draws[0] == mpo.easy_and_hard(rows, gaps, mpo.SplitConfig(delta=1.0, select="random", seed=0))
    e, every = mpo.easy_and_hard(rows, gaps, mpo.SplitConfig(delta=1.0, ppo_prompts="all"))
    assert e == easy and every == [[0], [1], [2], [3]]


def test_matched_compute_gives_each_method_dpo_alls_flops():
    cfgs = mpo.parse_args(["--dpo.batch_size", "2", "--dpo.grad_accum", "1", "--ppo.prompts_per_step", "4",
                           "--ppo.samples_per_prompt", "2", "--ppo.ppo_epochs", "2"])
    pi, v = 100.0, 10.0
    pairs = [([1, 2], [3], [4, 5])] * 6  # 2 + 2 + 1 + 2 = 7 tokens a pair
    ref, per_step = dpo_flops(cfgs["dpo"], pairs, pi)
    assert (ref, per_step) == (pi * 6 * 7, 3 * pi * 7 * 2)  # the reference once; a step's 2 pairs, 3 forwards
    target = 1000.0 + ref + 10 * per_step  # dpo_all: its resampling, its reference, 10 steps
    assert compute_budget(cfgs, target, {"policy": pi, "rm": v}, pairs, [], 1000.0, 5)["dpo"].max_steps == 10
    # MPO on 2 of the pairs and 3 hard prompts of 2 tokens: half of what the resampling leaves to each stage
    cut = compute_budget(cfgs, target, {"policy": pi, "rm": v}, pairs[:2], [[7, 8]] * 3, 1000.0, 5)
    half = (target - 1000.0) / 2
    assert cut["dpo"].max_steps == round((half - pi * 2 * 7) / per_step)
    per_iteration = 3 * 2 * (2 + 5) * (pi + 2 * pi + 2 * v + 3 * (pi + v) * 2)  # rollout tokens x per token
    assert cut["ppo"].max_iterations == round(half / per_iteration)
    # PPO on every prompt, not made from the resampled pairs: all of it to PPO
    alone = compute_budget(cfgs, target, {"policy": pi, "rm": v}, [], [[7, 8]] * 9, 0.0, 5)
    assert alone["ppo"].max_iterations == round(target / (4 * 2 * 7 * (pi + 2 * pi + 2 * v + 6 * (pi + v))))
    assert cfgs["dpo"].max_steps == 0 and cfgs["ppo"].max_iterations == 0  # a copy
