"""The study over seeds: the t-interval and verdict arithmetic on fixed numbers, the claims, the RM's accuracy
by |gap| quartile, the compute every stage counts, and `--seeds 2` end to end (fixed data, reuse on a rerun).
python -m pytest -q tests/test_study.py"""
import copy
import json
import math

import pytest
import torch

import mpo
from data import collate_sft, encode_dataset, get_tokenizer, load_task
from model import GPT, GPTConfig, ScalarModel
from ppo import Models, PPOConfig, ppo
from lab.results import seed_record, study, write_study
from lab.stats import paired, summary, t975, verdict
from lab.rm import accuracy_by_gap_quartile
from lab.study import matched_budget
from train import TrainConfig, train


def t_cdf(x, df, steps=20000):
    """P(T <= x) of Student's t by Simpson's rule on its density (x > 0)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = lambda t: c * (1 + t * t / df) ** (-(df + 1) / 2)  # noqa: E731
    h = x / steps
    s = f(0) + f(x) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, steps))
    return 0.5 + s * h / 3


def test_t975_is_the_975_quantile():
    assert t975(1) == pytest.approx(math.tan(0.475 * math.pi), abs=1e-4)  # df 1: Cauchy, closed form
    assert t975(2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), abs=1e-4)  # df 2: (2p-1)/sqrt(2p(1-p))
    for df in (*range(1, 31), 45, 200):
        assert t_cdf(t975(df), df) == pytest.approx(0.975, abs=2e-5), df


def test_summary_mean_and_student_t_interval():
    s = summary([1, 2, 3])  # mean 2, sample sd 1
    half = 4.302653 / math.sqrt(3)
    assert s["mean"] == 2 and s["ci95"] == pytest.approx([2 - half, 2 + half]) and s["per_seed"] == [1, 2, 3]
    s = summary([0.5, 1.5])  # sd sqrt(0.5), n 2: half width 12.706205 * 0.5
    assert s["ci95"] == pytest.approx([1 - 6.3531025, 1 + 6.3531025])
    assert summary([4.0]) == {"mean": 4.0, "ci95": None, "per_seed": [4.0]}  # one seed: no interval
    assert summary([2, 2, 2])["ci95"] == [2, 2]


def test_paired_differences_and_verdicts():
    d = paired([3, 5, 4], [1, 2, 3])  # differences 2, 3, 1: mean 2, sd 1
    assert d["per_seed"] == [2, 3, 1] and d["mean"] == 2
    assert d["ci95"] == pytest.approx([2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)])
    assert verdict(d) == "inconclusive"  # [-0.48, 4.48] contains 0
    d = paired([3.0, 3.2, 2.8], [1.0, 1.0, 1.0])  # 2 +- 4.3027 * 0.2 / sqrt(3) = [1.50, 2.50]
    assert d["ci95"] == pytest.approx([2 - 0.49683, 2 + 0.49683], abs=1e-4) and verdict(d) == "holds"
    assert verdict(paired([1.0, 1.0, 1.0], [3.0, 3.2, 2.8])) == "fails"
    assert verdict(paired([5.0], [1.0])) == "inconclusive" and verdict(None) == "inconclusive"  # one seed: no interval
    with pytest.raises(ValueError):
        paired([1, 2], [1])


def record(seed, gold, q1, q4, rm_scores=None):
    """A per-seed record: gold per model (or only RM scores), and the RM's accuracy in the bottom / top quartile."""
    methods = {}
    for i, name in enumerate(("sft", "dpo_all", "ppo_all", "mpo", "mpo[stage2_ref=sft]")):
        m = {"rm_score": rm_scores[i] if rm_scores else 0.0, "kl_to_sft": float(i), "win_rate": 0.5,
             "compute": {"policy_steps": 10 * i + seed, "policy_tokens": 100, "samples": 0}}
        methods[name] = ({"gold": gold[i]} if gold else {}) | m
    return {"seed": seed, "methods": methods,
            "gap_buckets": {"q1": {"accuracy": q1, "pairs": 10, "low": 0.0, "high": 0.1},
                            "q4": {"accuracy": q4, "pairs": 10, "low": 0.5, "high": 2.0}}}


def test_study_claims_on_fixed_numbers():
    #          sft  dpo_all ppo_all mpo  mpo[sft ref]
    golds = [[0.0, 1.0, 2.0, 2.0, 1.0], [0.0, 1.5, 1.0, 2.1, 1.2], [0.0, 1.2, 3.0, 2.2, 1.1]]
    records = [record(s, g, q1, q4) for s, g, q1, q4 in zip((0, 1, 2), golds, (0.5, 0.6, 0.55), (0.8, 0.9, 0.7))]
    r = study(records)
    assert r["seeds"] == [0, 1, 2] and set(r["methods"]) == {"sft", "dpo_all", "ppo_all", "mpo", "mpo[stage2_ref=sft]"}
    assert r["methods"]["mpo"]["gold"] == summary([2.0, 2.1, 2.2])
    assert set(r["methods"]["mpo"]) == {"gold", "rm_score", "kl_to_sft", "win_rate", "compute"}
    assert r["methods"]["ppo_all"]["compute"] == {"policy_steps": 21, "policy_tokens": 100, "samples": 0}  # mean
    c = r["claims"]
    assert c["mpo_beats_dpo_all"]["diff"]["per_seed"] == pytest.approx([1.0, 0.6, 1.0])
    assert c["mpo_beats_dpo_all"]["verdict"] == "holds"  # 0.867 +- 4.3027 * 0.231 / sqrt(3) = [0.29, 1.44]
    assert c["mpo_beats_ppo_all"]["diff"]["per_seed"] == pytest.approx([0.0, 1.1, -0.8])
    assert c["mpo_beats_ppo_all"]["verdict"] == "inconclusive"
    assert c["dpo_reference_beats_sft_reference"]["diff"] == paired([2.0, 2.1, 2.2], [1.0, 1.2, 1.1])
    a = c["rm_accuracy_rises_with_gap"]
    assert a["diff"]["per_seed"] == pytest.approx([0.3, 0.3, 0.15]) and a["verdict"] == "holds"
    assert a["buckets"]["q4"]["accuracy"] == summary([0.8, 0.9, 0.7]) and a["buckets"]["q4"]["pairs"] == 10
    assert json.loads(json.dumps(r)) == r  # plain JSON


def test_study_uses_the_rm_score_without_gold_and_says_what_a_claim_needs():
    records = [record(s, None, 0.5, 0.5, [0, 1, 2, 1.5 + s, 0]) for s in (0, 1)]
    for rec in records:
        del rec["methods"]["mpo[stage2_ref=sft]"]
    r = study(records)
    assert "gold" not in r["methods"]["mpo"]
    assert r["claims"]["mpo_beats_ppo_all"]["diff"]["per_seed"] == [-0.5, 0.5]
    assert "rm_score" in r["claims"]["mpo_beats_ppo_all"]["metric"]
    c = r["claims"]["dpo_reference_beats_sft_reference"]
    assert c["diff"] is None and c["verdict"] == "inconclusive" and "mpo[stage2_ref=sft]" in c["metric"]
    assert r["claims"]["rm_accuracy_rises_with_gap"]["verdict"] == "inconclusive"  # the same accuracy: sd 0, diff 0


def test_a_run_folders_results_give_back_its_record():
    rec = record(7, [0.0, 1.0, 2.0, 3.0, 4.0], 0.5, 0.75)
    back = seed_record(json.loads(json.dumps(study([rec]))))
    assert back == rec
    rec["gold_checks"] = {"accuracy": 0.7, "ceiling": 0.8, "easy_share": 0.4}  # tasks with gold
    rec["samples"] = {"sft": [["a prompt", " a response"]]}
    assert seed_record(json.loads(json.dumps(study([rec])))) == rec


def test_study_report_gives_each_seeds_rm_against_gold(tmp_path):
    by_gap = {"[0,1)": {"accuracy": 0.6, "pairs": 50}, "[1,2)": {"accuracy": 0.9, "pairs": 5},
              ">=3": {"accuracy": None, "pairs": 0}}
    records = [record(s, [0.0, 1.0, 2.0, 3.0, 4.0], 0.5, 0.75) for s in (0, 1)]
    for r, pearson in zip(records, (0.5, None)):  # None: too few pairs split for a correlation
        r["gold_checks"] = {"accuracy": 0.72, "ceiling": 0.8, "by_gap": by_gap, "easy_share": 0.25,
                            "easy_vs_gold": 0.9, "hard_vs_gold": None, "pearson": pearson}
    text = write_study(tmp_path, mpo.parse_args([]), study(records), []).read_text()
    # the ratio to the ceiling, the top bucket that has pairs, "-" where there is no number
    assert "| 0 | 0.720 | 0.800 | 0.900 | 0.900 ([1,2), 5) | 0.250 | 0.900 | - | 0.500 |" in text
    assert "| 1 | 0.720 | 0.800 | 0.900 | 0.900 ([1,2), 5) | 0.250 | 0.900 | - | - |" in text


def test_accuracy_by_gap_quartile_splits_by_rank():
    gaps = torch.tensor([0.1, -0.2, 0.3, 0.4, -1.0, 2.0, 3.0, -4.0])  # |gap| order: two pairs per quartile
    q = accuracy_by_gap_quartile(gaps)
    assert list(q) == ["q1", "q2", "q3", "q4"] and all(b["pairs"] == 2 for b in q.values())
    assert [b["accuracy"] for b in q.values()] == [0.5, 1.0, 0.5, 0.5]
    assert (q["q1"]["low"], q["q4"]["high"]) == pytest.approx((0.1, 4.0))


def test_train_and_ppo_count_their_compute(tmp_path):
    torch.manual_seed(0)
    tok = get_tokenizer("byte")
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=tok.n_vocab, block_size=32)
    rows = [([1, 2, 3], [4, 5, 256])] * 12  # 6 real tokens a row
    cfg = TrainConfig(lr=1e-3, batch_size=4, grad_accum=2, max_steps=3, eval_every=0, device="cpu")
    result = train(GPT(config), mpo.sft_loss, rows, None, cfg, tmp_path / "sft", "sft", collate_sft)
    assert result["compute/steps"] == 3 and result["compute/tokens"] == 3 * 2 * 4 * 6

    prompts = encode_dataset(tok, ["a", "hello there", "sea, 3 words:"], 32, 16)
    cfg = PPOConfig(prompts_per_step=2, samples_per_prompt=2, max_new_tokens=6, ppo_epochs=2, num_minibatches=2,
                    micro_batch_size=2, warmup_steps=0, eval_every=0, device="cpu")
    policy, rm = GPT(config), ScalarModel(config)
    _, result = ppo(Models(policy, copy.deepcopy(policy), rm, copy.deepcopy(rm)), prompts, tok, cfg, tmp_path / "ppo")
    logs = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    rows_per_iteration = [4, 2]  # 3 prompts, 2 per iteration, 2 samples each
    response_tokens = sum(n * line["response_len"] for n, line in zip(rows_per_iteration, logs))
    prompt_tokens = 2 * sum(map(len, prompts))
    assert result["compute/steps"] == 2 * 2 * 2 and result["compute/samples"] == 6
    assert result["compute/tokens"] == pytest.approx(2 * (prompt_tokens + response_tokens))


def test_matched_budget_gives_every_method_the_same_optimizer_steps():
    cfgs = mpo.parse_args(["--ppo.ppo_epochs", "4", "--ppo.num_minibatches", "2"])  # 8 steps a PPO iteration
    both, dpo_only, ppo_only = (matched_budget(cfgs, 64, e, h) for e, h in ((1, 1), (1, 0), (0, 1)))
    assert (both["dpo"].max_steps, both["ppo"].max_iterations) == (32, 4)  # MPO: 32 + 4 x 8
    assert dpo_only["dpo"].max_steps == 64 and ppo_only["ppo"].max_iterations == 8
    odd = matched_budget(cfgs, 60, True, True)  # 30 DPO steps, 30 / 8 -> 4 iterations (32 steps)
    assert (odd["dpo"].max_steps, odd["ppo"].max_iterations) == (30, 4)
    assert matched_budget(cfgs, 3, False, True)["ppo"].max_iterations == 1  # at least one iteration
    assert cfgs["dpo"].max_steps == 0 and cfgs["ppo"].max_iterations == 0  # a copy: the run's configs unchanged


TINY = ["--max_train", "64", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--device", "cpu",
        "--max_response_len", "24", "--sft.max_steps", "4", "--rm.max_steps", "4", "--dpo.max_steps", "4",
        "--ppo.prompts_per_step", "64", "--ppo.ppo_epochs", "1", "--split.quantile", "0.5", "--eval.prompts", "16"]


def test_seeds_study_end_to_end_fixed_data_one_thread_and_reuse(tmp_path, capsys):
    assert mpo.parse_args([])["run"].seeds == 10 and mpo.parse_args(["--dataset", "tldr"])["run"].seeds == 1
    with pytest.raises(SystemExit):
        mpo.parse_args(["--seeds", "0"])
    assert "argument --seeds: must be at least 1, got 0" in capsys.readouterr().err
    out = tmp_path / "study"
    mpo.main([*TINY, "--seeds", "2", "--seed", "5", "--budget", "matched", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [5, 6]
    arms = ["mpo[stage2_ref=sft]", "mpo[select=random]", "mpo[ppo_prompts=all]"]
    names = ["sft", "dpo_all", "dpo_human", "ppo_all", "mpo_dpo", "mpo", *arms]
    assert list(results["methods"]) == names  # the study adds dpo_human, mpo_dpo and the arms
    for m in results["methods"].values():
        assert set(m) == {"gold", "rm_score", "kl_to_sft", "win_rate", "compute"}
        assert len(m["gold"]["per_seed"]) == 2 and m["gold"]["ci95"][0] <= m["gold"]["mean"] <= m["gold"]["ci95"][1]
    # --study shared (the demo's): SFT, the RM and the resampled pairs made once, in shared/, for both seeds
    assert all((out / "shared" / s / "final.pt").exists() for s in ("sft", "rm"))
    assert not any((out / f"seed_{s}" / stage).exists() for s in (5, 6) for stage in ("sft", "rm"))
    assert not list(out.glob("seed_*/pairs_*.pt")) and (out / "shared" / "pairs_resample.pt").exists()
    # The arms reuse MPO's DPO stage where theirs would be the same: their PPO starts from the same model.
    seed = out / "seed_5"
    assert not (seed / "variants" / "stage2_ref-sft" / "mpo_dpo").exists()
    assert (seed / "variants" / "select-random" / "mpo_dpo" / "final.pt").exists()  # other pairs: its own

    def first_eval(folder):
        return next(r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                    if r["split"] == "eval")

    start = {k: v for k, v in first_eval(seed / "mpo").items() if k not in ("time", "kl")}
    for arm in ("stage2_ref-sft", "ppo_prompts-all"):  # the same samples (KL: to its own reference)
        assert {k: v for k, v in first_eval(seed / "variants" / arm / "mpo").items() if k not in ("time", "kl")} == start
    assert first_eval(seed / "variants" / "ppo_prompts-all" / "mpo")["kl"] == 0
    # The matched budget: dpo_all's 4 optimizer steps for every method; a PPO iteration takes 1 epoch x 2
    # minibatches, on all of its prompts (fewer than 64): ppo_all 2 iterations, MPO 2 DPO steps and 1 iteration.
    compute = {name: m["compute"] for name, m in results["methods"].items()}
    ppo_cfg = mpo.parse_args(TINY)["ppo"]
    assert ppo_cfg.ppo_epochs * ppo_cfg.num_minibatches == 2
    assert [compute[m]["policy_steps"] for m in names[1:]] == [4, 4, 4, 2, 4, 4, 4, 4]
    split = [json.loads(line)["side"] for line in (seed / "split.jsonl").read_text().splitlines()]
    assert len(split) < ppo_cfg.prompts_per_step  # one resampled pair per distinct prompt (the demo's split)
    # Responses sampled, the resampling (two per pair) counted for the models made from the resampled pairs
    resampled = 2 * len(split)
    assert compute["ppo_all"]["samples"] == 2 * len(split) * ppo_cfg.samples_per_prompt
    assert compute["mpo"]["samples"] == resampled + split.count("hard") * ppo_cfg.samples_per_prompt
    assert compute["mpo_dpo"]["samples"] == compute["dpo_all"]["samples"] == resampled
    assert compute["dpo_human"]["samples"] == 0
    # the arm has MPO's budget (one iteration) on every prompt
    assert compute["mpo[ppo_prompts=all]"]["samples"] == resampled + len(split) * ppo_cfg.samples_per_prompt
    assert compute["dpo_all"]["policy_tokens"] > compute["mpo_dpo"]["policy_tokens"]  # all pairs against the easy half
    assert compute["mpo"]["flops"] > compute["mpo_dpo"]["flops"] > 0 and set(results["common_compute"]) == {"sft", "rm"}
    assert set(results["claims"]) == {"rm_accuracy_rises_with_gap", "mpo_beats_dpo_all", "mpo_beats_ppo_all",
                                      "mpo_beats_dpo_human", "dpo_reference_beats_sft_reference",
                                      "gap_split_beats_random_split", "hard_prompts_beat_all_prompts"}
    for name, c in results["claims"].items():
        assert c["verdict"] in ("holds", "fails", "equivalent", "inconclusive")
        assert len(c["diff"]["per_seed"]) == (1 if name == "rm_accuracy_rises_with_gap" else 2)  # one RM
    assert set(results["claims"]["mpo_beats_dpo_all"]["noise"]) >= {"total_sd", "evaluation_sd", "training_sd"}
    text = (out / "report.md").read_text()
    assert text.index("| mpo_beats_dpo_all |") < text.index("| mpo[stage2_ref=sft] |")  # the claims come first
    assert "`--budget matched`" in text and "`--study shared`" in text
    assert "The demo's regime: preference pairs from the SFT data's generator (on-policy)" in text
    assert (out / "overoptimisation.png").stat().st_size > 1000
    # Each seed's RM and split against gold reach the study's report, the ceiling beside the accuracy.
    checks = results["gold_checks"]
    assert len(checks) == 2 and all(0 < c["ceiling"] <= 1 and 0 <= c["easy_share"] <= 1 for c in checks)
    assert checks[0] == checks[1]  # one RM and split: one row
    assert f"| all (one RM) | {checks[1]['accuracy']:.3f} | {checks[1]['ceiling']:.3f} |" in text
    # and the first seed's samples, as its own report shows them
    samples = (seed / "report.md").read_text().split("## Samples\n")[1].split("## ")[0]
    assert "## Samples (seed 5)\n" + samples in text and samples.count("**") == 2 * len(names)
    # Each seed is a run folder of its own; the task data is the first seed's in both.
    seeds = [json.loads((out / f"seed_{s}" / "results.json").read_text()) for s in (5, 6)]
    assert [r["methods"]["mpo"]["gold"]["per_seed"][0] for r in seeds] == results["methods"]["mpo"]["gold"]["per_seed"]
    prompts = [[json.loads(line)["prompt"] for line in (out / f"seed_{s}" / "split.jsonl").read_text().splitlines()]
               for s in (5, 6)]
    assert prompts[0] == prompts[1]
    assert load_task("demo", 5).pairs_train != load_task("demo", 6).pairs_train  # which --seed alone would change
    config = json.loads((out / "seed_6" / "config.json").read_text())
    assert config["run"]["seed"] == 6 and config["dpo"]["seed"] == 6 and config["run"]["seeds"] == 1
    assert seeds[0]["methods"]["sft"]["gold"] != seeds[1]["methods"]["sft"]["gold"]  # another evaluation draw
    # A rerun reuses every seed's stages and gives the same numbers.
    capsys.readouterr()
    mpo.main([*TINY, "--seeds", "2", "--seed", "5", "--budget", "matched", "--out", str(out)])
    assert json.loads((out / "results.json").read_text()) == results
    assert all((out / f"seed_{s}" / "log.txt").read_text().count("done in an earlier run") >= 9 for s in (5, 6))
    # --reuse checks what it is given: another RM is refused in one line, before anything changes
    with pytest.raises(SystemExit) as e:
        mpo.main([*TINY, "--rm.lr", "0.5", "--seed", "5", "--out", str(tmp_path / "one"), "--seeds", "1",
                  "--reuse", str(out / "shared")])
    assert e.value.code == f"mpo: error: --reuse {out / 'shared'}: its rm was made with other flags (--rm.lr)"


def test_sweep_runs_every_multiple_on_shared_sft_and_rm_and_draws_the_frontier(tmp_path, capsys):
    for bad in ("1,-2", "1,x", "nan"):
        with pytest.raises(SystemExit):
            mpo.parse_args(["--sweep", bad])
        assert f"argument --sweep: expected multiples > 0 separated by commas, e.g. 0.5,1,2; got '{bad}'" in (
            capsys.readouterr().err)
    out = tmp_path / "sweep"
    mpo.main([*TINY, "--seeds", "1", "--sweep", "2,0.5", "--out", str(out)])
    configs = {x: json.loads((out / f"sweep_{x}" / "config.json").read_text()) for x in ("0.5", "2")}
    base = mpo.parse_args(TINY)
    assert configs["0.5"]["dpo"]["beta"] == pytest.approx(0.5 * base["dpo"].beta)
    assert configs["2"]["ppo"]["kl_coef"] == pytest.approx(2 * base["ppo"].kl_coef)
    weights = {x: {s: torch.load(out / f"sweep_{x}" / s / "final.pt") for s in ("sft", "rm", "dpo_all")}
               for x in ("0.5", "2")}
    for s in ("sft", "rm"):  # the second multiple starts from the first one's SFT model and RM
        assert all(torch.equal(weights["0.5"][s][k], weights["2"][s][k]) for k in weights["2"][s])
    dpo_all = weights["0.5"]["dpo_all"], weights["2"]["dpo_all"]
    assert not all(torch.equal(dpo_all[0][k], dpo_all[1][k]) for k in dpo_all[0])  # another beta, another model
    sweep = json.loads((out / "sweep.json").read_text())
    assert list(sweep) == ["0.5", "2"] and all(set(r) == {
        "seeds", "methods", "claims", "gold_checks", "samples", "common_compute", "equivalence_margin", "gold_best",
        "evaluation_var"} for r in sweep.values())
    text = (out / "report.md").read_text()
    assert "| model | x0.5 | x2 |" in text and "| mpo_beats_dpo_all |" in text
    assert (out / "frontier.png").stat().st_size > 1000
