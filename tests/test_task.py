"""A user's own task (--dataset jsonl, --gold_reward, --tokenizer, --preset demo) and the demo tokenizer.
python -m pytest -q tests/test_task.py"""
import gzip
import json
import math

import pytest

import data
from data import DataError, Pair, get_tokenizer, load_task
from lab import tasks
from lab.readers import load_gold_reward
from lab.cli import DEMO
from lab.pipeline import run_pipeline
from mpo import parse_args

TRAIN = [{"prompt": "Q: 1+1?", "chosen": " 2", "rejected": " 3"},
         {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"},
         {"prompt": "Q: 1+1?", "chosen": " two", "rejected": " 11"}]
TEST = [{"prompt": "Q: 3+3?", "chosen": " 6", "rejected": " 7"}, {"prompt": "Q: 3+3?", "chosen": " six", "rejected": " 33"},
        {"prompt": "Q: 4+4?", "chosen": " 8", "rejected": " 9"}]
GOLD = "def gold(prompt, response):\n    return -abs(len(response) - 2.0)\n"


def write(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


def task_dir(tmp_path):
    write(tmp_path / "train.jsonl", TRAIN)
    write(tmp_path / "test.jsonl.gz", TEST, gz=True)
    return tmp_path


def test_jsonl_task_reads_preference_lines_and_sft_falls_back_to_chosen(tmp_path):
    task = load_task("jsonl", data_dir=task_dir(tmp_path))
    assert sorted(task.pairs_train, key=str) == sorted((Pair(**r) for r in TRAIN), key=str)  # shuffled, all kept
    assert task.pairs_eval == [Pair(**r) for r in TEST]
    assert task.prompts_eval == ["Q: 3+3?", "Q: 4+4?"]  # test.jsonl's distinct prompts, in order
    assert sorted(task.sft_train) == sorted((r["prompt"], r["chosen"]) for r in TRAIN)
    assert task.sft_eval == [(r["prompt"], r["chosen"]) for r in TEST]
    assert task.gold_reward is None and task.tokenizer == "gpt2"
    write(tmp_path / "sft_train.jsonl", [{"prompt": "Q: 5+5?", "completion": " 10"}])
    assert load_task("jsonl", data_dir=tmp_path).sft_train == [("Q: 5+5?", " 10")]


def test_a_look_at_a_task_prints_its_rows_or_stops_with_one_error_line(tmp_path, capsys):
    tasks.main(["jsonl", str(task_dir(tmp_path))])  # python -m lab.tasks jsonl DIR
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "{'sft_train': 3, 'sft_eval': 3, 'pairs_train': 3, 'pairs_eval': 3, 'prompts_eval': 2}"
    assert sum(line.startswith("SFT  'Q: ") for line in out) == 3 and sum("chosen" in line for line in out) == 3
    assert not any("gold" in line for line in out)  # no gold reward, no gold line
    (tmp_path / "test.jsonl.gz").unlink()
    with pytest.raises(SystemExit) as e:
        tasks.main(["jsonl", str(tmp_path)])
    assert str(e.value).startswith("python -m lab.tasks: error: ") and "test.jsonl" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("line, problem", [
    ({"prompt": "p", "chosen": " a"}, 'train.jsonl:2: missing field "rejected"'),
    ({"prompt": "p", "chosen": 3, "rejected": " b"}, 'train.jsonl:2: field "chosen" is int, expected str'),
    ({"prompt": ["p"], "chosen": " a", "rejected": " b"}, 'train.jsonl:2: field "prompt" is list, expected str')])
def test_jsonl_bad_lines_name_file_and_line(tmp_path, line, problem):
    task_dir(tmp_path)
    write(tmp_path / "train.jsonl", [TRAIN[0], line])
    with pytest.raises(DataError) as e:
        load_task("jsonl", data_dir=tmp_path)
    assert str(e.value).endswith(problem) and "\n" not in str(e.value)


def test_jsonl_empty_or_missing_files(tmp_path):
    task_dir(tmp_path)
    (tmp_path / "train.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: empty file"):
        load_task("jsonl", data_dir=tmp_path)
    (tmp_path / "train.jsonl").unlink()
    with pytest.raises(DataError, match=r"train.jsonl: no such file \(nor .jsonl.gz\)"):
        load_task("jsonl", data_dir=tmp_path)
    with pytest.raises(DataError, match="needs --data_dir"):
        load_task("jsonl")
    task_dir(tmp_path)
    write(tmp_path / "sft_test.jsonl", [{"prompt": "p", "response": " r"}])  # TRL's key is "completion"
    with pytest.raises(DataError, match='sft_test.jsonl:1: missing field "completion"'):
        load_task("jsonl", data_dir=tmp_path)


def test_gold_reward_hook_good_and_bad(tmp_path):
    (tmp_path / "task.py").write_text(GOLD + "def bad(prompt, response):\n    return 1 / len(response)\n"
                                      "def nan(prompt, response):\n    return float('nan')\n"
                                      "def text(prompt, response):\n    return 'high'\n")
    gold = load_gold_reward(f"{tmp_path}/task.py:gold", ("p", " 2"))
    assert gold("p", " 42") == -1.0 and isinstance(gold("p", "x"), float)
    bad = load_gold_reward(f"{tmp_path}/task.py:bad", ("p", " 2"))  # fine on the sample...
    with pytest.raises(ValueError, match=r"task.py:bad: raised ZeroDivisionError: division by zero on prompt 'q'"):
        bad("q", "")  # ...and a later failure names the function
    cases = {f"{tmp_path}/task.py:nan": "returned nan", f"{tmp_path}/task.py:text": "raised ValueError",
             f"{tmp_path}/task.py:missing": "cannot import (AttributeError", f"{tmp_path}/nope.py:gold":
             "cannot import (FileNotFoundError", f"{tmp_path}/task.py": "expected FILE.py:FUNCTION"}
    (tmp_path / "broken.py").write_text("def gold(:\n")
    cases[f"{tmp_path}/broken.py:gold"] = "cannot import (SyntaxError"
    for spec, problem in cases.items():
        with pytest.raises(ValueError) as e:
            load_gold_reward(spec, ("p", " 2"))
        assert str(e.value).startswith(f"--gold_reward {spec}: ") and problem in str(e.value)
        assert "\n" not in str(e.value)


def test_preset_demo_applies_to_any_dataset_and_help_shows_it(capsys):
    mine = parse_args(["--dataset", "jsonl", "--preset", "demo", "--rm.lr", "1e-3"])
    assert mine["sft"].lr == DEMO["sft"]["lr"] and mine["run"].max_response_len == DEMO["run"]["max_response_len"]
    assert mine["rm"].normalize is True and mine["rm"].lr == 1e-3  # a flag still wins over the preset
    plain = parse_args(["--dataset", "jsonl"])
    assert plain["sft"].lr == 5e-5 and plain["rm"].normalize is False  # the author's values
    assert parse_args([])["sft"].lr == DEMO["sft"]["lr"]  # --dataset demo implies the preset
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "--preset demo (implied by --dataset demo) sets: " in " ".join(capsys.readouterr().out.split())
    for bad in (["--preset", "big"], ["--tokenizer", "gpt3"], ["--demo.noise_temperature", "warm"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    knobs = parse_args(["--demo.noise_temperature", "0.5", "--demo.pairs_train", "100", "--data_seed", "7"])
    assert knobs["demo"].noise_temperature == 0.5 and knobs["demo"].pairs_train == 100
    assert knobs["run"].data_seed == 7 and knobs["run"].seed == 0


def test_demo_tokenizer_round_trips_and_each_word_is_one_token():
    tok = get_tokenizer("demo")
    for text in ["sea, 4 words, no crab:", " fish wave boat big", " fsh  wave\n", "é€ <|endoftext|> 12", ""]:
        assert tok.decode(tok.encode_ordinary(text)) == text
    assert all(len(tok.encode_ordinary(" " + w)) == 1 for w in data.DEMO_WORDS)
    assert len(tok.encode_ordinary("sea, 4 words, no crab:")) == 8  # sea , _4 _words , _no _crab :
    assert len(tok.encode_ordinary(" fishy")) == 6  # not a word: bytes
    assert tok.eot_token == tok.n_vocab - 1 and tok.decode([tok.eot_token]) == "<|endoftext|>"


def test_demo_best_gold_is_an_upper_bound_reached_by_a_response():
    prompt = "sea, 3 words, no fish:"
    best = tasks.demo_best_gold(prompt)
    assert best == data.demo_gold_reward(prompt, " boat wave big") == 1.0 + 1.25 + 0 + 1  # b...b bonus beats crab
    task = load_task("demo", demo=data.DemoConfig(sft_train=200, pairs_train=10))
    assert all(data.demo_gold_reward(p, r) <= tasks.demo_best_gold(p) for p, r in task.sft_train)


def test_own_task_runs_end_to_end_with_byte_tokenizer_preset_and_gold(tmp_path):
    (tmp_path / "task").mkdir()
    folder = task_dir(tmp_path / "task")
    (tmp_path / "task.py").write_text(GOLD)
    argv = ["--dataset", "jsonl", "--data_dir", str(folder), "--tokenizer", "byte", "--preset", "demo",
            "--gold_reward", f"{tmp_path}/task.py:gold", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
            "--device", "cpu", "--max_response_len", "8", "--sft.max_steps", "2", "--rm.max_steps", "2",
            "--dpo.max_steps", "1", "--ppo.prompts_per_step", "4", "--ppo.ppo_epochs", "1", "--eval.samples", "2",
            "--out", str(tmp_path / "out")]
    text = run_pipeline(parse_args(argv)).read_text()
    assert "| gold |" in text.replace("gold | gold_se", "gold |") and "label ceiling" in text
    assert math.isfinite(json.loads((tmp_path / "out" / "rm" / "result.json").read_text())["gain"])
    (tmp_path / "task.py").write_text("def gold(prompt, response):\n    raise KeyError(prompt)\n")
    with pytest.raises(ValueError, match="task.py:gold: raised KeyError"):
        run_pipeline(parse_args(argv[:-1] + [str(tmp_path / "out2")]))
    assert not (tmp_path / "out2").exists()  # checked before anything under --out was made
