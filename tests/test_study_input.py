"""A study refuses bad input before it starts: its flags, a second study on the same --out, a user's
task with nothing usable in it; and single runs name the file of a line or a checkpoint they cannot
use. python -m pytest -q tests/test_study_input.py"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mpo
from lab.readers import DataError, read_jsonl
from model import GPT, GPTConfig
from test_robust import error_of  # mpo.main's one line "mpo: error: ..."

REPO = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--sft.max_steps", "2",
        "--rm.max_steps", "2", "--methods", "", "--eval.prompts", "4"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("argv, expected", [
    (["--seeds", "100000"], "argument --seeds: must be at most 1000, got 100000"),
    (["--sweep", "inf"], "argument --sweep: expected multiples > 0 separated by commas"),
    (["--sweep", "1,nan"], "argument --sweep: expected multiples > 0 separated by commas"),
])
def test_study_flags_are_bounded_before_anything_runs(argv, expected, tmp_path, capsys):
    with pytest.raises(SystemExit):
        mpo.main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert expected in err and max(map(len, err.splitlines())) < 400
    assert not (tmp_path / "out").exists()


def test_a_second_study_on_the_same_out_is_refused_at_once(tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; from pathlib import Path; "
                               f"sys.path.insert(0, {str(REPO)!r}); from lab import runs; "
                               f"runs.lock_run_folder(Path({str(out)!r})); print('locked', flush=True); "
                               "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        message = error_of(["--out", str(out), *TINY, "--seeds", "3"], capsys)
        assert message == (f"mpo: error: {out}: in use by another run (pid {holder.pid}, which holds "
                           f"{out / '.lock'}); wait for it to end, or use another --out")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no seed started
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("seeds", ["1", "2"])
@pytest.mark.parametrize("bad, where, what", [
    ("train", "train.jsonl", "no usable preference pair once encoded"),
    ("test", "test.jsonl", "no usable held-out prompt once encoded"),
])
def test_a_task_with_nothing_usable_stops_before_out_changes(bad, where, what, seeds, tmp_path, capsys):
    task = tmp_path / "task"
    task.mkdir()
    pairs = [{"prompt": f"Q: {i}?", "chosen": f" {i}", "rejected": f" {i + 1}"} for i in range(4)]
    if bad == "train":  # every pair's two responses the same
        write_jsonl(task / "train.jsonl", [p | {"rejected": p["chosen"]} for p in pairs])
        write_jsonl(task / "test.jsonl", pairs)
    else:  # every held-out prompt empty
        write_jsonl(task / "train.jsonl", pairs)
        write_jsonl(task / "test.jsonl", [p | {"prompt": ""} for p in pairs])
    out = tmp_path / "out"
    message = error_of(["--dataset", "jsonl", "--data_dir", str(task), "--tokenizer", "byte",
                        "--preset", "demo", "--seeds", seeds, "--out", str(out), *TINY], capsys)
    assert message.startswith(f"mpo: error: {task / where}: {what}")
    assert not out.exists()  # a fresh --out stays untouched, also by a study's seeds


def test_a_line_too_deep_or_a_number_too_long_names_its_file_and_line(tmp_path):
    deep = write_jsonl(tmp_path / "deep.jsonl", [{"prompt": "p"}])
    deep.write_text(deep.read_text() + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=rf"^{deep}:2: JSON nested too deeply to read$"):
        list(read_jsonl(deep))
    long = tmp_path / "long.jsonl"
    long.write_text('{"prompt": 1' + "0" * 5000 + "}\n")
    with pytest.raises(DataError, match=rf"^{long}:1: unreadable JSON \(Exceeds the limit"):
        list(read_jsonl(long))


def test_init_weights_holding_nan_name_the_file_and_tensor(tmp_path, capsys):
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=16))
    with torch.no_grad():
        gpt.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    gpt.save_pretrained(tmp_path / "nan")
    with pytest.raises(ValueError, match=r"model.safetensors: (transformer\.)?h\.0\.mlp\.c_fc\.weight holds NaN"):
        GPT.from_pretrained(tmp_path / "nan")
    message = error_of(["--init", str(tmp_path / "nan"), "--seeds", "1", "--out", str(tmp_path / "out"),
                        "--device", "cpu", "--demo.pairs_train", "300"], capsys)
    assert "h.0.mlp.c_fc.weight holds NaN or inf weights" in message and not (tmp_path / "out").exists()


def test_a_gold_function_that_exits_is_one_line_naming_it(tmp_path):
    from lab.readers import load_gold_reward
    (tmp_path / "gold.py").write_text("import sys\ndef gold(prompt, response):\n    sys.exit(3)\n")
    spec = f"{tmp_path / 'gold.py'}:gold"
    with pytest.raises(ValueError, match=rf"^--gold_reward {spec}: raised SystemExit: 3 on prompt 'p'$"):
        load_gold_reward(spec, ("p", " r"))


def test_a_gold_function_that_does_not_return_is_reported_while_the_run_waits(tmp_path, capsys):
    from lab.readers import load_gold_reward
    (tmp_path / "slow.py").write_text("import time\ndef gold(prompt, response):\n"
                                      "    if prompt == 'wait':\n        time.sleep(2.5)\n    return 1.0\n")
    spec = f"{tmp_path / 'slow.py'}:gold"
    gold = load_gold_reward(spec, ("p", " r"), patience=1.0)
    assert gold("quick", " r") == 1.0 and capsys.readouterr().err == ""  # an answer in time: no word
    assert gold("wait", " r") == 1.0
    err = capsys.readouterr().err  # said within 2 s of the call's start, while it still ran
    assert re.search(rf"--gold_reward {re.escape(spec)}: no answer after [12] s on prompt 'wait'; still waiting "
                     r"\(Ctrl-C stops the run\)", err), err
