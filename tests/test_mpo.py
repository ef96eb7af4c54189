"""The MPO pipeline: the reward-gap split, the CLI, and a whole tiny run on the demo task with resume.
python -m pytest -q tests/test_mpo.py"""
import json

import pytest
import torch

from lab.cli import DEMO
from lab.pipeline import run_pipeline, split_pairs
from mpo import SplitConfig, parse_args, split_by_reward_gap
from data import get_tokenizer


def test_split_by_reward_gap_uses_absolute_gap_and_puts_ties_at_delta_in_easy():
    gaps = torch.tensor([0.5, -1.0, 1.0, 0.99, -2.5, 0.0, 3.0])
    easy, hard = split_by_reward_gap(gaps, 1.0)
    assert easy.tolist() == [1, 2, 4, 6] and hard.tolist() == [0, 3, 5]
    easy, hard = split_by_reward_gap(gaps.tolist(), 0.0)  # delta 0: everything is easy
    assert easy.tolist() == list(range(7)) and hard.tolist() == []
    easy, hard = split_by_reward_gap(gaps, 10.0)
    assert easy.tolist() == [] and hard.tolist() == list(range(7))


def test_quantile_split_and_hard_first_order(tmp_path, capsys):
    tok = get_tokenizer("byte")
    rows = [([1, 2], [3, 256], [4, 256]), ([5], [6, 256], [7, 256]), ([1, 2], [8, 256], [9, 256]),
            ([10], [11, 256], [12, 256])]
    gaps = torch.tensor([0.1, 2.0, -0.3, 4.0])
    easy, hard, stats = split_pairs(rows, gaps, SplitConfig(quantile=0.5), tmp_path, tok)
    assert stats["delta"] == pytest.approx(torch.quantile(gaps.abs(), 0.5).item())  # 1.15: half on each side
    assert easy == [rows[1], rows[3]] and hard == [[1, 2]]  # the hard prompts, each once
    lines = [json.loads(line) for line in (tmp_path / "split.jsonl").read_text().splitlines()]
    assert [line["side"] for line in lines] == ["hard", "easy", "hard", "easy"]
    assert [line["gap"] for line in lines] == pytest.approx(gaps.tolist())
    easy, hard, _ = split_pairs(rows, gaps, SplitConfig(delta=1.0, order="hard_first"), tmp_path, tok)
    assert easy == [rows[0], rows[2]] and hard == [[5], [10]]
    _, hard, stats = split_pairs(rows, gaps, SplitConfig(delta=0.0), tmp_path, tok)
    assert hard == [] and stats["hard_prompts"] == 0
    assert "no prompts for PPO" in capsys.readouterr().out


def test_cli_flags_override_demo_values_and_dataclass_defaults():
    cfgs = parse_args(["--dpo.beta", "0.1", "--split.delta", "2", "--seed", "3", "--ppo.whiten_rewards", "true"])
    assert cfgs["dpo"].beta == 0.1 and cfgs["split"].delta == 2.0 and cfgs["ppo"].whiten_rewards is True
    assert cfgs["sft"].lr == DEMO["sft"]["lr"] and cfgs["sft"].seed == 3 and cfgs["ppo"].seed == 3
    assert cfgs["ppo"].max_new_tokens == cfgs["run"].max_response_len == DEMO["run"]["max_response_len"]
    assert parse_args([])["split"].quantile == 0.0 and parse_args([])["split"].delta == 1.0  # the author's delta
    assert parse_args(["--split.quantile", "0.5"])["split"].quantile == 0.5
    assert parse_args(["--split.quantile", "0.5", "--split.delta", "2"])["split"].quantile == 0.5
    real = parse_args(["--dataset", "hh-rlhf"])
    assert real["dpo"].lr == 5e-6 and real["run"].max_response_len == 256  # the author's values
    with pytest.raises(SystemExit):
        parse_args(["--dpo.beta", "high"])


TINY_RUN = ["--max_train", "64", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--device", "cpu",
            "--max_response_len", "24", "--sft.max_steps", "4", "--rm.max_steps", "4", "--dpo.max_steps", "2",
            "--ppo.prompts_per_step", "64", "--ppo.ppo_epochs", "1", "--split.quantile", "0.5", "--eval.prompts", "16",
            "--variants", "stage2_ref=sft"]


def test_tiny_pipeline_runs_writes_report_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    report = run_pipeline(parse_args(TINY_RUN + ["--out", str(out)]))
    text = report.read_text()
    for name in ("sft", "dpo_all", "ppo_all", "mpo", "mpo[stage2_ref=sft]"):
        assert f"| {name} |" in text
    for png in ("gaps.png", "curves.png", "frontier.png"):
        assert (out / png).stat().st_size > 1000
    split = [json.loads(line) for line in (out / "split.jsonl").read_text().splitlines()]
    assert {row["side"] for row in split} == {"easy", "hard"}
    weights = {p: torch.load(p, weights_only=True) for p in out.rglob("final.pt")}
    assert len(weights) == 7  # sft rm dpo_all ppo_all mpo_dpo mpo, and the variant's mpo (its DPO stage: MPO's)
    assert not (out / "variants" / "stage2_ref-sft" / "mpo_dpo").exists()
    capsys.readouterr()

    again = run_pipeline(parse_args(TINY_RUN + ["--out", str(out)]))  # every stage done: all skipped
    log = capsys.readouterr().out
    assert log.count("done in an earlier run") == 7
    assert again.read_text() == text  # same models, same seeds: the same evaluation
    assert all(torch.equal(a, b) for p, w in weights.items()
               for a, b in zip(w.values(), torch.load(p, weights_only=True).values()))


def test_bf16_and_activation_checkpointing_run_the_pipeline_and_print_the_memory_estimate(tmp_path, capsys):
    argv = TINY_RUN[:-2] + ["--methods", "mpo", "--dtype", "bf16", "--grad_checkpoint", "true", "--out", str(tmp_path)]
    text = run_pipeline(parse_args(argv)).read_text()
    log = capsys.readouterr().out
    assert "memory estimate (cpu, bf16, activation checkpointing): sft " in log and " ppo " in log
    assert "plan (rough, cpu): sft 4 steps ~" in log and "| total ~" in log
    assert "| mpo |" in text
    assert all(v.dtype == torch.float32 for v in torch.load(tmp_path / "mpo" / "final.pt").values() if v.is_floating_point())


def test_evaluation_per_subset_adds_up_to_the_whole(tmp_path):
    from lab.pipeline import Data, RunConfig
    from lab.evaluate import EvalConfig, compare_to_sft
    from model import GPT, GPTConfig, ScalarModel
    torch.manual_seed(0)
    tok = get_tokenizer("byte")
    config = GPTConfig(block_size=32, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16)
    models = {"sft": GPT(config), "other": GPT(config)}
    rm = ScalarModel(config)
    prompts = [list(f"prompt {i}:".encode()) for i in range(6)]
    subsets = ["helpful", "harmless", "helpful", "helpful", "harmless", "helpful"]
    cfg = EvalConfig(samples=2, batch_size=4)
    run = RunConfig(max_response_len=6)
    results, _ = compare_to_sft(models, rm, Data(tok, prompts_eval=prompts, subsets=subsets), run, cfg)
    for name, r in results.items():
        parts = r["subsets"]
        assert {s: p["prompts"] for s, p in parts.items()} == {"helpful": 4, "harmless": 2}
        whole = sum(p["rm_score"] * p["prompts"] for p in parts.values()) / 6
        assert whole == pytest.approx(r["rm_score"], abs=1e-5)
        assert sum(p["win_rate"] * p["prompts"] for p in parts.values()) / 6 == pytest.approx(r["win_rate"])
    assert all(p["win_rate"] == 0.5 for p in results["sft"]["subsets"].values())  # ties with itself
    assert "subsets" not in compare_to_sft(models, rm, Data(tok, prompts_eval=prompts), run, cfg)[0]["sft"]


def test_author_defaults_by_dataset_and_resampled_pairs_per_row():
    from lab.pipeline import RunConfig
    from mpo import make_pairs
    from model import GPT, GPTConfig, ScalarModel
    hh, tldr = parse_args(["--dataset", "hh-rlhf"]), parse_args(["--dataset", "tldr"])
    assert hh["split"].delta == 1.0 and tldr["split"].delta == 2.0  # author: 1 on HH-RLHF, 2 on TL;DR
    assert (hh["sft"].lr, hh["sft"].warmup_steps, hh["rm"].lr, hh["dpo"].warmup_steps) == (5e-5, 500, 5e-6, 100)
    assert (hh["ppo"].warmup_steps, hh["ppo"].decay, hh["ppo"].whiten_advantages) == (100, "cosine", False)
    assert hh["run"].max_prompt_len == 512 and hh["split"].pairs_per_row and not parse_args([])["split"].pairs_per_row
    torch.manual_seed(0)
    tok = get_tokenizer("byte")
    config = GPTConfig(block_size=16, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16)
    rows = [([1, 2], [3, 256], [4, 256]), ([5], [6, 256], [7, 256]), ([1, 2], [8, 256], [9, 256])]  # a repeated prompt
    for per_row, prompts in ((True, [[1, 2], [5], [1, 2]]), (False, [[1, 2], [5]])):
        split = SplitConfig(batch_size=8, pairs_per_row=per_row)
        made, gaps = make_pairs(GPT(config), ScalarModel(config), rows, split, RunConfig(max_response_len=4), 256)
        assert [p for p, _, _ in made] == prompts and (gaps >= 0).all() and len(gaps) == len(prompts)


def test_dpo_human_trains_on_the_datasets_own_pairs(tmp_path):
    out = tmp_path / "run"
    argv = TINY_RUN[:-2] + ["--methods", "dpo_all,dpo_human", "--seeds", "1", "--out", str(out)]
    text = run_pipeline(parse_args(argv)).read_text()
    assert "| dpo_human |" in text and "| dpo_all |" in text
    human, resampled = (json.loads((out / name / "settings.json").read_text()) for name in ("dpo_human", "dpo_all"))
    # no RM and no resampling behind it: only how many pairs there are to split (as many human pairs)
    assert not any(k.startswith("rm.") for k in human) and any(k.startswith("rm.") for k in resampled)
    assert {k: v for k, v in resampled.items() if k in human} == human  # the same SFT model and DPO flags
    results = json.loads((out / "results.json").read_text())["methods"]
    assert results["dpo_human"]["compute"]["policy_steps"] == results["dpo_all"]["compute"]["policy_steps"] == 2
