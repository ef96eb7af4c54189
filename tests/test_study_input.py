"""A study refuses bad input before it starts: its flags, a second study on the same --out, a user's
task with nothing usable in it; and runs name the file of a line, a checkpoint or a gold function
they cannot use. Each case runs `python mpo.py` in a subprocess of its own session and checks the
exit code, the one line, that no process of the run is left (/proc) and what --out holds.
python -m pytest -q tests/test_study_input.py"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import GPT, GPTConfig
from test_study_signals import session

REPO = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--sft.max_steps", "2",
        "--rm.max_steps", "2", "--methods", "", "--eval.prompts", "4"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mpo_error(argv, timeout=120, code=1, starts="mpo: error: ") -> str:
    """`python mpo.py argv` in a session of its own must exit `code` with one line "mpo: error: ..."
    on stderr's last line, leaving no process behind; returns that line."""
    proc = subprocess.Popen([sys.executable, str(REPO / "mpo.py"), *map(str, argv)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == code and stderr.strip(), stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(starts) and len(line) < 400, line
    assert not session(proc.pid)  # no seed's process, no resource tracker
    return line


@pytest.mark.parametrize("argv, expected", [
    (["--seeds", "100000"], "argument --seeds: must be at most 1000, got 100000"),
    (["--sweep", "inf"], "argument --sweep: expected multiples > 0 separated by commas"),
    (["--sweep", "1,nan"], "argument --sweep: expected multiples > 0 separated by commas"),
])
def test_study_flags_are_bounded_before_anything_runs(argv, expected, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "mpo.py"), *argv, "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and expected in proc.stderr.splitlines()[-1]  # argparse's usage error
    assert max(map(len, proc.stderr.splitlines())) < 400 and not (tmp_path / "out").exists()


def test_a_second_study_on_the_same_out_is_refused_at_once(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; from pathlib import Path; "
                               f"sys.path.insert(0, {str(REPO)!r}); from lab import runs; "
                               f"runs.lock_run_folder(Path({str(out)!r})); print('locked', flush=True); "
                               "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        message = mpo_error(["--out", out, *TINY, "--seeds", "3"])
        assert message == (f"mpo: error: {out}: in use by another run (pid {holder.pid}, which holds "
                           f"{out / '.lock'}); wait for it to end, or use another --out")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no seed started
        assert holder.poll() is None  # the first is undisturbed
    finally:
        holder.kill()
        holder.wait()


def user_task(tmp_path, train=None, test=None):
    """A user's task folder: four pairs, train.jsonl and test.jsonl replaced where given."""
    task = tmp_path / "task"
    task.mkdir()
    pairs = [{"prompt": f"Q: {i}?", "chosen": f" {i}", "rejected": f" {i + 1}"} for i in range(4)]
    write_jsonl(task / "train.jsonl", train(pairs) if train else pairs)
    write_jsonl(task / "test.jsonl", test(pairs) if test else pairs)
    return task, ["--dataset", "jsonl", "--data_dir", task, "--tokenizer", "byte", "--preset", "demo", *TINY]


@pytest.mark.parametrize("seeds", ["1", "2"])
@pytest.mark.parametrize("bad, where, what", [
    ("train", "train.jsonl", "no usable preference pair once encoded"),
    ("test", "test.jsonl", "no usable held-out prompt once encoded"),
])
def test_a_task_with_nothing_usable_stops_before_out_changes(bad, where, what, seeds, tmp_path):
    if bad == "train":  # every pair's two responses the same
        task, argv = user_task(tmp_path, train=lambda pairs: [p | {"rejected": p["chosen"]} for p in pairs])
    else:  # every held-out prompt empty
        task, argv = user_task(tmp_path, test=lambda pairs: [p | {"prompt": ""} for p in pairs])
    out = tmp_path / "out"
    assert mpo_error([*argv, "--seeds", seeds, "--out", out]).startswith(f"mpo: error: {task / where}: {what}")
    assert not out.exists()  # a fresh --out stays untouched, also by a study's seeds


@pytest.mark.parametrize("line, what", [
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply to read"),
    ('{"prompt": 1' + "0" * 5000 + "}", r"unreadable JSON \(Exceeds the limit"),
], ids=["too deep", "number too long"])
def test_a_line_too_deep_or_a_number_too_long_names_its_file_and_line(line, what, tmp_path):
    task, argv = user_task(tmp_path)
    (task / "train.jsonl").write_text((task / "train.jsonl").read_text() + line + "\n")
    out = tmp_path / "out"
    assert re.match(rf"mpo: error: {re.escape(str(task / 'train.jsonl'))}:5: {what}", mpo_error([*argv, "--out", out]))
    assert not out.exists()


def test_init_weights_holding_nan_name_the_file_and_tensor(tmp_path):
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=16))
    with torch.no_grad():
        gpt.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    gpt.save_pretrained(tmp_path / "nan")
    with pytest.raises(ValueError, match=r"model.safetensors: (transformer\.)?h\.0\.mlp\.c_fc\.weight holds NaN"):
        GPT.from_pretrained(tmp_path / "nan")
    out = tmp_path / "out"
    message = mpo_error(["--init", tmp_path / "nan", "--seeds", "1", "--out", out, "--device", "cpu",
                         "--demo.pairs_train", "300"])
    assert f"{tmp_path / 'nan' / 'model.safetensors'}" in message
    assert "h.0.mlp.c_fc.weight holds NaN or inf weights" in message and not out.exists()


@pytest.mark.parametrize("seeds", ["1", "2"])
def test_a_gold_function_that_exits_is_one_line_naming_it(seeds, tmp_path):
    task, argv = user_task(tmp_path)
    (tmp_path / "gold.py").write_text("import sys\ndef gold(prompt, response):\n    sys.exit(3)\n")
    spec = f"{tmp_path / 'gold.py'}:gold"
    out = tmp_path / "out"
    message = mpo_error([*argv, "--gold_reward", spec, "--seeds", seeds, "--out", out])
    assert message.startswith(f"mpo: error: --gold_reward {spec}: raised SystemExit: 3 on prompt ")
    assert not out.exists()


def test_a_gold_function_that_raises_keyboard_interrupt_is_an_interrupt(tmp_path):
    # raised inside the function or by Ctrl-C while it runs: the two cannot be told apart
    task, argv = user_task(tmp_path)
    (tmp_path / "gold.py").write_text("def gold(prompt, response):\n    raise KeyboardInterrupt\n")
    out = tmp_path / "out"
    line = mpo_error([*argv, "--gold_reward", f"{tmp_path / 'gold.py'}:gold", "--out", out], code=130,
                     starts="mpo: interrupted")
    assert line == "mpo: interrupted outside the training stages; rerun with the same --out to resume"
    assert not out.exists()


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
