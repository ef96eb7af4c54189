"""bench.py runs the stages' own step functions on a tiny model and reports consistent numbers.
python -m pytest -q tests/test_bench.py"""
import json
import sys

import bench

NAMES = ["matmul_peak", "sft_step", "rm_step", "dpo_step", "generate_greedy", "generate_sample", "ppo_iteration"]


def test_bench_prints_one_consistent_json_line_per_benchmark(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--vocab", "300",
                                      "--batch", "2", "--prompt-len", "6", "--response-len", "5", "--ppo-epochs", "2",
                                      "--warmup", "0", "--iters", "2", "--device", "cpu", "--dtype", "fp32", "bf16"])
    bench.main()
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["name"], r["dtype"]) for r in out] == [(n, d) for d in ("fp32", "bf16") for n in NAMES]
    assert all(r["gflops"] > 0 for r in out if r["name"] == "matmul_peak")
    tokens = {"sft_step": 2 * 11, "rm_step": 4 * 11, "dpo_step": 4 * 11, "generate_greedy": 2 * 5, "generate_sample": 2 * 5}
    for r in (r for r in out if r["name"] != "matmul_peak"):
        assert {"tokens_per_s", "mfu", "peak_mem_mb", "device"} <= set(r) and r["device"] == "cpu"
        assert 0 < r["mfu"] < 1 and r["peak_mem_mb"] > 0
        if r["name"].endswith("_step"):
            assert r["est_mem_mb"] > 0
        if r["name"] in tokens:  # tokens per step / seconds per step
            assert abs(r["tokens_per_s"] * r["s_per_step"] - tokens[r["name"]]) < 0.01 * tokens[r["name"]] + 0.1
    for ppo in (r for r in out if r["name"] == "ppo_iteration"):
        assert ppo["prompts"] == 2 and ppo["prompt_len"] == 6 and 1 <= ppo["new_tokens"] <= 5 and ppo["ppo_epochs"] == 2
        assert ppo["generate_s"] + ppo["score_s"] + ppo["update_s"] <= ppo["s_per_iter"] * 1.5
