"""Using what a run trained (lab/use.py): `python mpo.py sample` and `python mpo.py export`.
python -m pytest -q tests/test_use.py"""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import mpo
from data import collate_prompts
from lab.use import load_stage, sample
from lab.weights import read_safetensors, write_safetensors
from model import GPT

# A tiny demo run: SFT and the RM only (no DPO / PPO), a 1-layer GPT, one run folder.
TINY = ["--seeds", "1", "--device", "cpu", "--max_train", "200", "--n_layer", "1", "--n_head", "2",
        "--n_embd", "32", "--sft.max_steps", "30", "--rm.max_steps", "10", "--methods", "",
        "--eval.prompts", "4", "--rm.n_embd", "0", "--rm.n_head", "0", "--rm.normalize", "true"]
PROMPTS = ["sea, 4 words, no crab:", "night, 3 words, no moon:"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    mpo.main(["--out", str(out), *TINY])
    return out


def error_of(argv, capsys, command) -> str:
    """mpo.main(argv) must stop with one line "mpo <command>: error: ..."; returns it."""
    with pytest.raises(SystemExit) as stop:
        mpo.main(argv)
    message = stop.value.code
    assert isinstance(message, str) and "\n" not in message, message
    assert message.startswith(f"mpo {command}: error: "), message
    return message


def test_sample_is_deterministic_under_a_seed_and_is_gpt_generate(run, capsys):
    policy, tok, cfg = load_stage(run, "sft")
    assert tok.name == "demo" and isinstance(policy, GPT) and not policy.training
    first = sample(policy, tok, cfg, PROMPTS, 12, temperature=1.0, seed=3)
    assert first == sample(policy, tok, cfg, PROMPTS, 12, temperature=1.0, seed=3)
    assert first != sample(policy, tok, cfg, PROMPTS, 12, temperature=1.0, seed=4)
    batch = collate_prompts([tok.encode_ordinary(p) for p in PROMPTS])
    direct = policy.generate(batch["tokens"], 12, 1.0, None, None, tok.eot_token,
                             batch["attention_mask"], generator=torch.Generator().manual_seed(3))
    new = direct[:, batch["tokens"].size(1):].tolist()
    for (prompt_ids, answer), row, p in zip(first, new, PROMPTS):
        assert prompt_ids == tok.encode_ordinary(p)
        assert answer == row[:len(answer)] and (len(answer) == 12 or answer[-1] == tok.eot_token)


def test_the_command_prints_every_stage_with_rm_and_gold(run, capsys):
    mpo.main(["sample", "--out", str(run), "--stages", "sft", "--prompt", PROMPTS[0],
              "--temperature", "0", "--max_new_tokens", "8"])
    out = capsys.readouterr().out.splitlines()
    assert out[1] == PROMPTS[0] and out[2].startswith("  [sft] rm ") and " | gold " in out[2]
    mpo.main(["sample", "--out", str(run), "--stages", "sft", "--prompt", PROMPTS[0],
              "--temperature", "0", "--max_new_tokens", "8"])
    assert capsys.readouterr().out.splitlines() == out  # greedy: the same answer again


def test_interactive_sampling_reads_prompts_from_stdin(run, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(PROMPTS[0] + "\n" + PROMPTS[1]))
    mpo.main(["sample", "--out", str(run), "--stages", "sft", "--max_new_tokens", "4"])
    out = capsys.readouterr().out
    assert out.count("  [sft] ") == 2 and PROMPTS[0] in out and PROMPTS[1] in out


def test_exported_policy_reloads_to_identical_logits(run, tmp_path, capsys):
    mpo.main(["export", "--out", str(run), "--stage", "sft", "--to", str(tmp_path / "sft")])
    out = capsys.readouterr().out
    assert "GPT2LMHeadModel" in out and "no tokenizer files written" in out  # the demo's own
    ours = load_stage(run, "sft")[0]
    again = GPT.from_pretrained(tmp_path / "sft")
    idx = torch.randint(0, ours.config.vocab_size, (2, 10))
    assert torch.equal(ours(idx), again(idx))
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["n_layer"] == 1


def test_exported_reward_model_folds_the_gain_and_names_the_dropped_offset(run, tmp_path, capsys):
    mpo.main(["export", "--out", str(run), "--stage", "rm", "--to", str(tmp_path / "rm")])
    rm = load_stage(run, "rm")[0]
    assert float(rm.gain) != 1.0  # --rm.normalize set a gain and an offset
    tensors = read_safetensors(tmp_path / "rm" / "model.safetensors")
    assert torch.equal(tensors["score.weight"], rm.head.weight * rm.gain)
    assert not any(k.startswith("lm_head") for k in tensors)
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and config["num_labels"] == 1
    # the body (all but score.weight) reloads as our GPT, and its last hidden state times
    # score.weight, less the dropped offset, is our score
    (tmp_path / "body").mkdir()
    shutil.copy(tmp_path / "rm" / "config.json", tmp_path / "body")
    write_safetensors({k: v for k, v in tensors.items() if k != "score.weight"},
                      tmp_path / "body" / "model.safetensors")
    body = GPT.from_pretrained(tmp_path / "body")
    idx = torch.randint(0, rm.gpt.config.vocab_size, (3, 7))
    logits = body.body(idx)[:, -1] @ tensors["score.weight"].T
    assert torch.allclose(logits.squeeze(1) - rm.gain * rm.offset, rm.score(idx, torch.ones_like(idx)),
                          atol=1e-5)
    assert f"our score = the exported logit - {float(rm.gain * rm.offset):.6g}" in capsys.readouterr().out


def test_bad_inputs_get_one_line(run, tmp_path, capsys):
    message = error_of(["sample", "--out", str(run), "--stages", "sft,mpo", "--prompt", "x"], capsys,
                       "sample")
    assert f"{run}: no stage mpo (finished: rm, sft)" in message
    unfinished = shutil.copytree(run, tmp_path / "unfinished")
    (unfinished / "sft" / "final.pt").unlink()
    message = error_of(["sample", "--out", str(unfinished), "--stages", "sft"], capsys, "sample")
    assert "stage sft is unfinished (no final.pt)" in message
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    message = error_of(["export", "--out", str(run), "--stage", "sft", "--to", str(tmp_path / "full")],
                       capsys, "export")
    assert "exists and is not empty" in message and (tmp_path / "full" / "keep.txt").read_text() == "mine"
    long = " ".join(["sea"] * 40)
    message = error_of(["sample", "--out", str(run), "--stages", "sft", "--prompt", long], capsys,
                       "sample")
    assert "prompt of 40 tokens is too long" in message and "--max_prompt_len" in message
    message = error_of(["sample", "--out", str(run), "--stages", "sft,rm"], capsys, "sample")
    assert "--stages sft,rm: name policy stages" in message
    message = error_of(["sample", "--out", str(tmp_path / "nothing")], capsys, "sample")
    assert "not a run folder" in message
    assert not list(Path(tmp_path).glob(".*.tmp"))  # no half-written export left behind


def test_hh_prompts_are_dialogue_turns_after_the_history():
    from lab.pipeline import RunConfig
    from lab.use import wrap_prompt
    hh = RunConfig(dataset="hh-rlhf")
    first = wrap_prompt(hh, "Hi")
    assert first == "\n\nHuman: Hi\n\nAssistant:"
    assert wrap_prompt(hh, "And?", first + " Hello.") == first + " Hello.\n\nHuman: And?\n\nAssistant:"
    assert wrap_prompt(RunConfig(dataset="demo"), "sea, 4 words, no crab:") == "sea, 4 words, no crab:"
