"""The demo's regimes: preference pairs from another generator than the SFT data's (off-policy), and several
resampled pairs per prompt, each of them used. python -m pytest -q tests/test_regimes.py"""
from dataclasses import replace

import torch

import mpo
from data import get_tokenizer
from demo import DEMO_NEUTRAL, DemoConfig, make_demo_task
from lab.pipeline import RunConfig
from model import GPT, GPTConfig, ScalarModel


def word_stats(rows) -> tuple[float, float]:
    """(share of neutral words, mean words beyond the count the prompt asks for) of (prompt, response, ...) rows."""
    words = [w for row in rows for r in row[1:] for w in r.split()]
    extra = [len(r.split()) - int(row[0].split(", ")[1][0]) for row in rows for r in row[1:]]
    return sum(w in DEMO_NEUTRAL for w in words) / len(words), sum(extra) / len(extra)


def test_off_policy_pairs_come_from_another_distribution_than_the_sft_data():
    cfg = DemoConfig(sft_train=3000, sft_eval=10, pairs_train=1500, pairs_eval=10)
    on, off = make_demo_task(cfg), make_demo_task(replace(cfg, pairs_source="other"))
    assert on[0] == off[0] and on[2] != off[2]  # the same SFT data, other pairs
    sft, on_pairs, off_pairs = word_stats(on[0]), word_stats(on[2]), word_stats(off[2])
    # the default pairs share the SFT data's distribution; the other source has more neutral words, longer
    assert abs(sft[0] - on_pairs[0]) < 0.02 and abs(sft[1] - on_pairs[1]) < 0.05
    assert off_pairs[0] > sft[0] + 0.15 and off_pairs[1] > sft[1] + 0.5
    assert on == make_demo_task(replace(cfg, pairs_source="sft"))  # the default is the same generator


def test_several_pairs_per_prompt_are_all_made_and_split_by_their_mean_gap():
    torch.manual_seed(0)
    tok = get_tokenizer("demo")
    config = GPTConfig(block_size=24, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16)
    prompts = [tok.encode(p) for p in ("sea, 3 words, no crab:", "day, 4 words, no sun:")]
    pairs = [(p, [1, tok.eot_token], [2, tok.eot_token]) for p in prompts for _ in range(5)]  # 5 rows each
    split = mpo.SplitConfig(pairs_per_row=False, pairs_per_prompt=3, delta=0.5)
    run = RunConfig(max_prompt_len=16, max_response_len=6, device="cpu")
    rows, gaps = mpo.make_pairs(GPT(config), ScalarModel(config), pairs, split, run, tok.eot_token)
    assert [r[0] for r in rows] == [prompts[0]] * 3 + [prompts[1]] * 3  # three pairs per distinct prompt
    assert len(gaps) == 6 and (gaps >= 0).all()
    # a prompt's pairs go to the side of their mean |gap|: all three used, on one side
    gaps = torch.tensor([2.0, 0.0, 0.0, 0.4, 0.1, 0.9])  # means 0.67 (easy) and 0.47 (hard)
    easy, hard = mpo.split_indices(gaps, split)
    assert easy.tolist() == [0, 1, 2] and hard.tolist() == [3, 4, 5]
    easy_pairs, hard_prompts = mpo.easy_and_hard(rows, gaps, split)
    assert len(easy_pairs) == 3 and hard_prompts == [prompts[1]]
    one = mpo.split_indices(gaps, replace(split, pairs_per_prompt=1))  # one draw: pair by pair
    assert one[0].tolist() == [0, 5]


def test_the_second_gold_task_loads_as_a_users_task_and_its_labels_follow_its_gold(tmp_path):
    from lab.readers import load_gold_reward, read_jsonl_task
    from lab.regimes import sort_task
    sort_task(tmp_path / "sort", pairs=400, prompts=40, held_out=10)
    sft_train, sft_test, train, test = read_jsonl_task(tmp_path / "sort")
    assert len(sft_train) == 3000 and len({p for p, *_ in test}) == 10
    assert not {p for p, *_ in train} & {p for p, *_ in test}  # held-out prompts never train
    gold = load_gold_reward(f"{tmp_path / 'sort' / 'gold.py'}:gold", ("", ""))
    assert gold("sort: 7 3 9 ->", " 3 7 9") == 5.0  # sorted, every digit kept: the best
    assert gold("sort: 7 3 9 ->", " 7 3 9") == 3.5 and gold("sort: 7 3 9 ->", " 3 7 9 9") == 4.0
    agree = [gold(p, c) > gold(p, r) for p, c, r in train if gold(p, c) != gold(p, r)]
    assert 0.65 < sum(agree) / len(agree) < 0.95  # noisy labels, mostly right


def test_a_random_split_keeps_a_prompts_pairs_together_and_a_quantile_is_of_prompts():
    gaps = torch.tensor([2.0, 0.0, 0.0, 0.4, 0.1, 0.9, 3.0, 3.0, 3.0, 0.0, 0.1, 0.2])  # 4 prompts, 3 pairs each
    split = mpo.SplitConfig(pairs_per_row=False, pairs_per_prompt=3, delta=0.5, select="random")
    for seed in range(5):
        easy, hard = mpo.split_indices(gaps, replace(split, seed=seed))
        assert len(easy) == 6 and sorted(easy.tolist() + hard.tolist()) == list(range(12))
        assert {i // 3 for i in easy.tolist()}.isdisjoint({i // 3 for i in hard.tolist()})
    median = mpo.split_indices(gaps, replace(split, select="gap", quantile=0.5))  # of the prompts' means
    assert median[0].tolist() == [0, 1, 2, 6, 7, 8]
