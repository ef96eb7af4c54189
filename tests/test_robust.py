"""Crash safety and bad input: a run killed with SIGKILL resumes to the same weights and metrics, a NaN or a
bad file or flag stops with one line (`mpo: error: ...`), and nothing under --out is damaged.
python -m pytest -q tests/test_robust.py"""
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mpo
from data import get_tokenizer
from lab.readers import MAX_LINE, DataError, read_jsonl
from lab.weights import read_safetensors
from model import GPT, GPTConfig, ScalarModel
from ppo import Models, PPOConfig, ppo
from lab.checkpoints import atomic_save
from train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
# The demo task with a 1-layer GPT: SFT and the RM checkpoint every 5 steps; no DPO / PPO baselines; one run
# folder (the demo's default is a study over 3 seeds).
TINY = ["--seeds", "1", "--device", "cpu", "--max_train", "200", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
        "--sft.max_steps", "60", "--sft.ckpt_every", "5", "--sft.log_every", "1", "--sft.eval_every", "20",
        "--rm.max_steps", "20", "--rm.ckpt_every", "5", "--rm.log_every", "1", "--methods", "", "--eval.prompts", "8",
        "--rm.n_embd", "0", "--rm.n_head", "0"]  # the RM in the policy's shape: a shape flag changes both


def cli(out, *extra):
    """`python mpo.py` on the tiny run, one thread (bit-identical reruns), as a Popen."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "mpo.py"), "--out", str(out), *TINY, *extra], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


def lines(path):
    """A metrics.jsonl's records, without their time stamps (a rerun logs the same steps at other times)."""
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in Path(path).read_text().splitlines()]


def hashes(out) -> dict:
    """{relative path: sha256} of every file under out."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(out).rglob("*")) if p.is_file()}


def kill_when(proc, ready, what):
    """SIGKILL proc as soon as ready() holds (polled every 5 ms)."""
    deadline = time.time() + 120
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def logged_step(path, stage_step):
    def ready():
        try:
            return any(line["split"] == "train" and line["step"] >= stage_step for line in lines(path))
        except (OSError, json.JSONDecodeError):  # not there yet, or a line half written
            return False
    return ready


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The tiny run, uninterrupted."""
    out = tmp_path_factory.mktemp("whole")
    code, _, stderr = finish(cli(out))
    assert code == 0, stderr[-3000:]
    return out


def error_of(argv, capsys) -> str:
    """mpo.main(argv) must stop with SystemExit("mpo: error: <one line>"); returns that line."""
    with pytest.raises(SystemExit) as stop:
        mpo.main(argv)
    message = stop.value.code
    assert isinstance(message, str) and message.startswith("mpo: error: ") and "\n" not in message, message
    return message


def test_sigkill_mid_stage_then_rerun_ends_like_an_uninterrupted_run(whole, tmp_path):
    out = tmp_path / "killed"
    # Killed in SFT after its step-5 checkpoint and 3+ logged steps; then in the RM right after its first log
    # line (before or after its first checkpoint); the third run finishes.
    run = cli(out)
    kill_when(run, logged_step(out / "sft" / "metrics.jsonl", 8), "SFT step 8")
    assert (out / "sft" / "sft_ckpt.pt").exists() and not (out / "sft" / "final.pt").exists()
    step = torch.load(out / "sft" / "sft_ckpt.pt", weights_only=True)["step"]
    assert step % 5 == 0 and max(line["step"] for line in lines(out / "sft" / "metrics.jsonl")) > step
    run = cli(out)
    kill_when(run, lambda: (out / "rm" / "metrics.jsonl").exists(), "the RM stage")
    assert (out / "sft" / "final.pt").exists() and not (out / "rm" / "final.pt").exists()
    code, stdout, stderr = finish(cli(out))
    assert code == 0, stderr[-3000:]
    assert "sft: done in an earlier run" in stdout

    for name in ("sft", "rm"):
        a, b = (torch.load(d / name / "final.pt") for d in (whole, out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        untimed = lambda d: [{**line, "time": 0} for line in lines(d / name / "metrics.jsonl")]  # noqa: E731
        assert untimed(out) == untimed(whole), name  # no duplicates (the time stamps differ)
        a, b = (json.loads((d / name / "result.json").read_text()) for d in (whole, out))
        assert {**a, "wall_s": 0} == {**b, "wall_s": 0}
        assert not list((out / name).glob("*_ckpt.pt"))  # superseded by final.pt
    for name in ("split.jsonl", "pairs_resample.pt"):
        assert (out / name).read_bytes() == (whole / name).read_bytes()
    # The evaluation tables of the reports (the rest has paths and wall times).
    tables = [[row for row in (d / "report.md").read_text().splitlines() if row.startswith("|")] for d in (whole, out)]
    assert tables[0] == tables[1] and tables[0]
    assert not list(out.rglob("*.tmp"))


def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(whole, tmp_path):
    out = shutil.copytree(whole, tmp_path / "out")
    before = hashes(out)
    # DPO at lr 1e30: the first step (checkpointed) leaves weights near 1e30; the next forward overflows to nan.
    code, _, stderr = finish(cli(out, "--methods", "dpo_all", "--dpo.lr", "1e30", "--dpo.ckpt_every", "1"))
    errors = [line for line in stderr.splitlines() if not line.startswith("encode_dataset")]
    assert code == 1 and "Traceback" not in stderr
    assert errors == [f"mpo: error: dpo_all: loss is nan at step 2; stopped, last good checkpoint kept: "
                      f"{out / 'dpo_all' / 'dpo_all_ckpt.pt'}"], stderr
    ckpt = torch.load(out / "dpo_all" / "dpo_all_ckpt.pt", weights_only=True)
    assert ckpt["step"] == 1 and not ckpt["done"] and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (out / "dpo_all" / "final.pt").exists()
    after = hashes(out)
    assert {k: after[k] for k in before if k != "config.json"} == {k: v for k, v in before.items() if k != "config.json"}


def test_nan_reward_stops_ppo_naming_the_quantities(tmp_path):
    """PPO runs its own loop: a reward model gone nan at iteration 2 stops it; iteration 1's checkpoint stays."""
    torch.manual_seed(0)
    policy = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=257, block_size=32))
    rm = ScalarModel(policy.config)
    calls = 0

    def score(idx, attention_mask):
        nonlocal calls
        calls += 1
        return ScalarModel.score(rm, idx, attention_mask) * (float("nan") if calls > 1 else 1.0)

    rm.score = score
    cfg = PPOConfig(prompts_per_step=4, samples_per_prompt=1, max_new_tokens=4, ckpt_every=1, eval_every=0,
                    device="cpu")
    prompts = [[1, 2, 3]] * 12
    with pytest.raises(FloatingPointError) as error:
        ppo(Models(GPT(policy.config), policy, rm, ScalarModel(policy.config)), prompts, get_tokenizer("byte"), cfg,
            tmp_path)
    message = str(error.value)
    assert "\n" not in message and message.startswith("ppo: ") and "score" in message and "iteration 2" in message
    ckpt = torch.load(tmp_path / "ppo_ckpt.pt", weights_only=True)
    assert ckpt["iteration"] == 1 and all(torch.isfinite(v).all() for v in ckpt["policy"].values())


def test_cuda_out_of_memory_is_explained_in_one_line(monkeypatch, capsys, tmp_path):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nGPU 0 has ...")

    monkeypatch.setattr(mpo, "sft", oom)
    message = error_of(["--out", str(tmp_path), *TINY], capsys)
    assert message.startswith("mpo: error: sft: CUDA out of memory; lower --sft.batch_size and raise --sft.grad_accum")
    assert "rerun with the same --out to resume" in message


def test_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path):
    class Unwritable:
        def __reduce__(self):
            raise OSError("No space left on device")

    atomic_save({"step": 1}, tmp_path / "ckpt.pt")
    with pytest.raises(OSError):
        atomic_save({"step": 2, "blob": Unwritable()}, tmp_path / "ckpt.pt")
    assert torch.load(tmp_path / "ckpt.pt")["step"] == 1


def hh_files(root, broken=None) -> Path:
    """A --data_dir with the four HH-RLHF files load_task reads (3 good pairs each); `broken` maps one
    file, e.g. "harmless-base/train", to the bytes it holds instead."""
    good = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello there",
                       "rejected": "\n\nHuman: hi\n\nAssistant: go away"}) + "\n"
    for subset in ("helpful-base", "harmless-base"):
        for split in ("train", "test"):
            path = root / "hh-rlhf" / subset / f"{split}.jsonl.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(gzip.compress((good * 3).encode()))
    for name, data in (broken or {}).items():
        (root / "hh-rlhf" / f"{name}.jsonl.gz").write_bytes(data)
    return root


BAD_FILES = {
    "malformed": ({"harmless-base/train": gzip.compress(b'{"chosen": "a", "rejected": "b"}\n{"chosen": "x",\n')},
                  "harmless-base/train.jsonl.gz:2: malformed JSON"),
    "truncated": ({"helpful-base/test": gzip.compress(b'{"chosen": "a", "rejected": "b"}\n' * 50)[:40]},
                  "helpful-base/test.jsonl.gz:1: cannot read"),
    "missing field": ({"helpful-base/train": gzip.compress(b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b"}\n')},
                      'helpful-base/train.jsonl.gz:1: missing field "rejected"'),
    "empty after filtering": ({f"{s}/train": gzip.compress(b'{"chosen": "x", "rejected": "x"}\n')
                               for s in ("helpful-base", "harmless-base")}, "sft_train is empty after filtering"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_dataset_files_stop_with_file_line_and_reason(case, whole, tmp_path, capsys):
    broken, expected = BAD_FILES[case]
    out = shutil.copytree(whole, tmp_path / "out")
    before = hashes(out)
    data = hh_files(tmp_path / "data", broken)
    message = error_of(["--dataset", "hh-rlhf", "--data_dir", str(data), "--out", str(out)], capsys)
    assert expected in message
    assert hashes(out) == before


@pytest.mark.parametrize("flag, mismatch", [
    (["--n_embd", "64"], "sft: made with --n_embd 32, this run has --n_embd 64; "),
    (["--n_layer", "2"], "sft: made with --n_layer 1, this run has --n_layer 2; "),
], ids=["n_embd", "n_layer"])
def test_checkpoints_of_another_model_shape_are_refused_naming_the_stage(flag, mismatch, whole, tmp_path, capsys):
    out = shutil.copytree(whole, tmp_path / "out")
    before = hashes(out)
    message = error_of(["--out", str(out), *TINY, *flag], capsys)
    assert message.startswith(f"mpo: error: {mismatch}")
    assert hashes(out) == before
    shutil.rmtree(out / "sft")  # without SFT's checkpoint the RM's record is refused before anything changes
    before = hashes(out)
    message = error_of(["--out", str(out), *TINY, *flag, "--sft.max_steps", "1"], capsys)
    assert message.startswith(f"mpo: error: rm: made with --{flag[0][2:]} ")
    assert hashes(out) == before
    # A checkpoint that fits its record but not the model (an --init folder whose files changed): refused by shape.
    settings = json.loads((whole / "sft" / "settings.json").read_text())
    shutil.rmtree(out)
    shutil.copytree(whole / "sft", out / "sft")
    (out / "sft" / "settings.json").write_text(json.dumps({**settings, flag[0][2:]: int(flag[1])}, indent=1))
    before = hashes(out)
    message = error_of(["--out", str(out), *TINY, *flag], capsys)
    assert message.startswith(f"mpo: error: {out / 'sft' / 'final.pt'}: checkpoint of another model shape")
    assert hashes(out) == before


def test_train_refuses_a_checkpoint_of_another_shape(tmp_path):
    def mse(model, batch):
        return ((model(batch["x"]) - 1) ** 2).mean(), {}

    def collate(rows):
        return {"x": torch.stack(rows)}

    rows = [torch.randn(4) for _ in range(8)]
    cfg = TrainConfig(batch_size=4, grad_accum=1, max_steps=2, eval_every=0, device="cpu")
    train(torch.nn.Linear(4, 1), mse, rows, None, cfg, tmp_path, "toy", collate)
    before = hashes(tmp_path)
    with pytest.raises(ValueError) as error:
        train(torch.nn.Linear(4, 2), mse, rows, None, cfg, tmp_path, "toy", collate)
    assert str(error.value).startswith(f"{tmp_path / 'toy_ckpt.pt'}: checkpoint of another model shape (weight is "
                                       "(1, 4) there, (2, 4) in this run; 2 mismatched tensors)")
    assert hashes(tmp_path) == before


@pytest.mark.parametrize("header", [(10 ** 9).to_bytes(8, "little") + b"{}",  # longer than the file
                                    (64).to_bytes(8, "little") + b"{not json" + bytes(64)], ids=["length", "json"])
def test_corrupt_safetensors_header_of_init(header, whole, tmp_path, capsys):
    init = tmp_path / "gpt"
    init.mkdir()
    (init / "config.json").write_text(json.dumps({"n_positions": 80, "vocab_size": 257, "n_layer": 1, "n_head": 2,
                                                  "n_embd": 32}))
    (init / "model.safetensors").write_bytes(header)
    out = shutil.copytree(whole, tmp_path / "out")
    before = hashes(out)
    message = error_of(["--out", str(out), *TINY, "--init", str(init)], capsys)
    assert message.startswith(f"mpo: error: {init / 'model.safetensors'}: corrupt safetensors header")
    assert hashes(out) == before


@pytest.mark.parametrize("argv, expected", [
    (["--n_embd", "x"], "argument --n_embd: invalid int value: 'x'"),
    (["--sft.lr", "fast"], "argument --sft.lr: invalid float value: 'fast'"),
    (["--dpo.precompute_ref", "maybe"], "argument --dpo.precompute_ref: invalid bool value: 'maybe'"),
    (["--dataset", "imdb"], "argument --dataset: invalid choice: 'imdb' (choose from 'demo', 'jsonl', 'hh-rlhf', 'tldr')"),
    (["--split.source", "resampel"], "argument --split.source: invalid choice: 'resampel'"),
    (["--frobnicate", "1"], "unrecognized arguments: --frobnicate 1"),
    (["--methods", "dpo_all,ppo"],
     "argument --methods: unknown ppo (choose from dpo_all, dpo_human, ppo_all, mpo, mpo_dpo)"),
    (["--variants", "delta=2;order=hard_frist"], "argument --variants: order 'hard_frist' is not one of easy_first"),
    (["--variants", "detla=2"], "argument --variants: unknown SplitConfig field 'detla'"),
], ids=["int", "float", "bool", "dataset", "choice", "unknown", "methods", "variant value", "variant field"])
def test_bad_flags_exit_2_with_usage_and_one_error_line(argv, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        mpo.main(["--out", str(tmp_path / "out"), *argv])
    usage, error = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and usage.startswith("usage: python mpo.py") and expected in error
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu(tmp_path, capsys):
    message = error_of(["--out", str(tmp_path / "out"), *TINY, "--device", "cuda"], capsys)
    assert message == "mpo: error: --device cuda: no CUDA device here (torch.cuda.is_available() is False)"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("delta, trained, skipped, warning", [
    ("100", "mpo", "mpo_dpo", "leaves no pairs for DPO and {n} prompts for PPO: MPO skips its DPO stage"),
    ("0", "mpo_dpo", "mpo", "leaves no prompts for PPO and {n} pairs for DPO: MPO runs DPO on them and skips its PPO"),
], ids=["all hard", "all easy"])
def test_a_delta_that_empties_one_side_warns_and_the_run_completes(delta, trained, skipped, warning, whole, tmp_path,
                                                                  capsys):
    out = shutil.copytree(whole, tmp_path / "out")
    before = hashes(out)
    mpo.main(["--out", str(out), *TINY, "--methods", "mpo", "--split.quantile", "0", "--split.delta", delta,
              "--dpo.max_steps", "2", "--ppo.prompts_per_step", "64", "--ppo.max_new_tokens", "4",
              "--ppo.eval_every", "0"])
    stdout = capsys.readouterr().out
    n = len(torch.load(out / "pairs_resample.pt")["gaps"])  # one resampled pair per distinct training prompt
    assert f"warning: delta {delta} " + warning.format(n=n) in stdout
    assert (out / trained / "final.pt").exists() and not (out / skipped).exists()
    assert "| mpo |" in (out / "report.md").read_text()
    kept = [k for k in before if k.startswith(("sft/", "rm/")) or k == "pairs_resample.pt"]
    assert {k: hashes(out)[k] for k in kept} == {k: before[k] for k in kept}


class Planted:
    """A pickle whose loading would run code: it makes the directory `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("name, expected", [
    ("sft/final.pt", "not a weights-only checkpoint (it calls posix.mkdir); refused: loading it "
                     "could run code"),
    ("rm/rm_ckpt.pt", "not a weights-only checkpoint (it calls posix.mkdir)"),
    ("pairs_resample.pt", "not a weights-only checkpoint (it calls posix.mkdir)"),
    ("truncated sft/final.pt", "cannot read checkpoint, truncated or corrupt ("),
], ids=["final", "resume checkpoint", "pairs cache", "truncated"])
def test_a_planted_or_torn_checkpoint_is_refused_and_runs_no_code(name, expected, whole, tmp_path, capsys):
    out, marker = shutil.copytree(whole, tmp_path / "out"), tmp_path / "pwned"
    path = out / name.split()[-1]
    if name.startswith("truncated"):
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    else:
        if name.startswith("rm/"):  # an unfinished RM: its checkpoint is what train() resumes from
            (out / "rm" / "final.pt").unlink()
        torch.save({"model": Planted(marker), "step": 1}, path)
    before = hashes(out)
    message = error_of(["--out", str(out), *TINY], capsys)
    assert message.startswith(f"mpo: error: {path}: {expected}"), message
    assert not marker.exists() and hashes(out) == before


def test_ppo_refuses_a_planted_checkpoint(tmp_path):
    torch.save({"policy": Planted(tmp_path / "pwned"), "iteration": 1}, tmp_path / "ppo_ckpt.pt")
    policy = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=257, block_size=32))
    rm = ScalarModel(policy.config)
    with pytest.raises(ValueError, match=f"{tmp_path / 'ppo_ckpt.pt'}: not a weights-only checkpoint"):
        ppo(Models(GPT(policy.config), policy, rm, ScalarModel(policy.config)), [[1, 2]], get_tokenizer("byte"),
            PPOConfig(device="cpu"), tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_a_second_run_on_the_same_out_is_refused_naming_the_holder_and_a_dead_holder_does_not_block(whole, tmp_path,
                                                                                                  capsys):
    out = shutil.copytree(whole, tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; from pathlib import Path; sys.path.insert(0, "
                               f"{str(REPO)!r}); from lab import runs; runs.lock_run_folder(Path({str(out)!r})); "
                               "print('locked', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = hashes(out)
        message = error_of(["--out", str(out), *TINY], capsys)
        assert message == (f"mpo: error: {out}: in use by another run (pid {holder.pid}, which holds {out / '.lock'}); "
                           "wait for it to end, or use another --out")
        assert hashes(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".lock").read_text() == f"{holder.pid}\n"  # a killed holder leaves its pid, but no lock
    from lab import runs
    runs.lock_run_folder(out)
    assert (out / ".lock").read_text() == f"{os.getpid()}\n"
    runs.release_run_folders()
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--sft.lr", "0.001"], "sft: made with --sft.lr 0.003, this run has --sft.lr 0.001; rerun with the same flags, "
                            "use another --out, or add --redo to redo sft and the stages after it"),
    (["--seed", "1"], "sft: made with --seed 0, this run has --seed 1 (and 1 more); "),
    (["--rm.margin", "0.5"], "rm: made with --rm.margin 0.0, this run has --rm.margin 0.5; "),
    (["--split.batch_size", "8"], "pairs_resample: made with --split.batch_size 0, this run has "
                                  "--split.batch_size 8;"),
    (["--sft.batch_size", "16"], "sft: made with --sft.batch_size x --sft.grad_accum 32, this run has --sft.batch_size "
                                 "x --sft.grad_accum 16; "),
], ids=["lr", "seed", "rm", "pairs", "effective batch"])
def test_a_rerun_with_other_flags_is_refused_naming_the_stage_and_the_flag(argv, expected, whole, tmp_path, capsys):
    out = shutil.copytree(whole, tmp_path / "out")
    before = hashes(out)
    assert error_of(["--out", str(out), *TINY, *argv], capsys).startswith("mpo: error: " + expected)
    assert hashes(out) == before  # config.json and report.md too: they describe the run that made them


def test_a_record_made_before_a_flag_existed_means_its_default(whole, tmp_path, capsys):
    out = shutil.copytree(whole, tmp_path / "out")
    for record in [out / "sft" / "settings.json", out / "rm" / "settings.json", out / "pairs_resample.json"]:
        settings = json.loads(record.read_text())
        del settings["demo.pairs_source"]  # as an mpo.py before --demo.pairs_source recorded it
        record.write_text(json.dumps(settings))
    mpo.main(["--out", str(out), *TINY])
    assert capsys.readouterr().out.count("done in an earlier run") == 2  # sft and rm, loaded
    message = error_of(["--out", str(out), *TINY, "--demo.pairs_source", "other"], capsys)
    assert message.startswith("mpo: error: sft: made with --demo.pairs_source sft (unrecorded: the default), this "
                              "run has --demo.pairs_source other")


def test_a_stage_without_a_record_is_refused(whole, tmp_path, capsys):
    out = shutil.copytree(whole, tmp_path / "out")
    (out / "sft" / "settings.json").unlink()  # as made by an mpo.py that recorded nothing
    before = hashes(out)
    message = error_of(["--out", str(out), *TINY], capsys)
    assert message.startswith(f"mpo: error: sft: {out / 'sft'} has no record of the flags it was made with")
    assert hashes(out) == before


def test_flags_that_change_no_result_are_no_conflict_and_leftovers_are_cleared(whole, tmp_path, capsys):
    """Bookkeeping, device and evaluation flags and the micro-batch split reuse the stages; a rerun also removes
    temporary files of killed writes and tolerates a torn last metrics line."""
    out = shutil.copytree(whole, tmp_path / "out")
    (out / "sft" / ".final.pt.99999999.tmp").write_bytes(b"half a checkpoint")
    (out / ".rm.99999999.tmp").mkdir()  # a folder --redo renamed before it was killed
    with open(out / "rm" / "metrics.jsonl", "a") as f:
        f.write('{"stage": "rm", "st')
    kept = {k: v for k, v in hashes(out).items() if k.startswith(("sft/", "rm/", "pairs_")) and ".tmp" not in k}
    mpo.main(["--out", str(out), *TINY, "--sft.log_every", "7", "--sft.eval_every", "0", "--rm.ckpt_every", "3",
              "--sft.batch_size", "16", "--sft.grad_accum", "2", "--eval.samples", "2",
              "--max_eval", "50",  # the held-out rows: the RM's normalisation uses training rows
              "--dtype", "fp32", "--device", "cpu"])
    stdout = capsys.readouterr().out
    assert "sft: done in an earlier run" in stdout and "rm: done in an earlier run" in stdout
    assert {k: hashes(out)[k] for k in kept} == kept
    assert not list(out.rglob("*.tmp")) and (out / "report.md").exists()
    assert '"sft.batch_size*sft.grad_accum": 32' in (out / "report.md").read_text()


def test_redo_redoes_the_changed_stage_and_those_after_it_only(whole, tmp_path, capsys):
    out = shutil.copytree(whole, tmp_path / "out")
    before = hashes(out)
    mpo.main(["--out", str(out), *TINY, "--rm.lr", "2e-3", "--redo"])
    stdout = capsys.readouterr().out
    assert f"--redo: removed {out / 'rm'}, made with other settings" in stdout
    assert f"--redo: removed {out / 'pairs_resample.pt'}" in stdout and "sft: done in an earlier run" in stdout
    after = hashes(out)
    assert all(after[k] == v for k, v in before.items() if k.startswith("sft/"))  # upstream of the change: kept
    assert after["rm/final.pt"] != before["rm/final.pt"] and after["pairs_resample.pt"] != before["pairs_resample.pt"]
    assert json.loads((out / "rm" / "settings.json").read_text())["rm.lr"] == 2e-3
    assert json.loads((out / "pairs_resample.json").read_text())["rm.lr"] == 2e-3
    assert '"rm.lr": 0.002' in (out / "report.md").read_text() and not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("argv, stopped", [
    (["--methods", "mpo", "--split.quantile", "0", "--split.delta", "100", "--stop_after", "mpo_dpo"], "mpo_dpo"),
    (["--methods", "", "--stop_after", "dpo_all"], "dpo_all"),
], ids=["empty side", "not in methods"])
def test_stop_after_a_skipped_stage_stops_there(argv, stopped, whole, tmp_path, capsys):
    out = shutil.copytree(whole, tmp_path / "out")
    before = hashes(out)
    mpo.main(["--out", str(out), *TINY, *argv])
    assert f"stopped after {stopped} (skipped in this run), as --stop_after asked" in capsys.readouterr().out
    after, rewritten = hashes(out), ("config.json", "split.jsonl")  # this run's flags; this run's split
    assert ({k: v for k, v in after.items() if k not in rewritten}
            == {k: v for k, v in before.items() if k not in rewritten})
    assert set(after) == set(before)  # no MPO PPO stage, no new report


@pytest.mark.parametrize("argv, expected", [
    (["--sft.batch_size", "0"], "argument --sft.batch_size: must be > 0, got 0"),
    (["--sft.grad_accum", "0"], "argument --sft.grad_accum: must be > 0, got 0"),
    (["--sft.log_every", "0"], "argument --sft.log_every: must be > 0, got 0"),
    (["--sft.ckpt_every", "0"], "argument --sft.ckpt_every: must be > 0, got 0"),
    (["--ppo.prompts_per_step", "0"], "argument --ppo.prompts_per_step: must be > 0, got 0"),
    (["--ppo.micro_batch_size", "0"], "argument --ppo.micro_batch_size: must be > 0, got 0"),
    (["--eval.samples", "0"], "argument --eval.samples: must be > 0, got 0"),
    (["--max_response_len", "0"], "argument --max_response_len: must be > 0, got 0"),
    (["--n_head", "3"], "argument --n_embd: must be a multiple of --n_head 3, got 32"),
    (["--split.quantile", "1.5"], "argument --split.quantile: must be 0 (off) or in (0, 1), got 1.5"),
    (["--ppo.kl_coef", "nan"], "argument --ppo.kl_coef: must be a finite number, got nan"),
    (["--dpo.beta", "inf"], "argument --dpo.beta: must be a finite number, got inf"),
    (["--split.delta", "-1"], "argument --split.delta: must be >= 0, got -1.0"),
    (["--rm.n_embd", "65"], "argument --rm.n_embd: must be a multiple of the RM's 2 heads"),
    (["--ppo.max_iterations", "-3"], "argument --ppo.max_iterations: must be >= 0, got -3"),
    (["--demo.prompts_eval", "648"], "argument --demo.prompts_eval: must be in [1, 647]"),
    (["--sft.lr", "-1"], "argument --sft.lr: must be > 0, got -1.0"),
    (["--seed", "-1"], "argument --seed: must be in [0, 2^31), got -1"),
    (["--ppo.top_p", "0"], "argument --ppo.top_p: must be in (0, 1], got 0.0"),
    (["--ppo.max_new_tokens", "100"], "argument --ppo.max_new_tokens: must be at most --max_response_len 48"),
    (["--ppo.num_minibatches", "65"], "argument --ppo.num_minibatches: must be at most --ppo.prompts_per_step x "),
    (["--variants", "delta=-1"], "argument --variants 'delta=-1': --split.delta: must be >= 0, got -1.0"),
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_every_flag_is_checked_before_anything_runs(argv, expected, whole, tmp_path, capsys):
    out = shutil.copytree(whole, tmp_path / "out")
    before = hashes(out)
    with pytest.raises(SystemExit) as stop:
        mpo.main(["--out", str(out), *TINY, *argv])
    usage, error = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and usage.startswith("usage: python mpo.py") and expected in error, error
    assert hashes(out) == before


def test_ctrl_c_stops_in_one_line_naming_the_stage(tmp_path):
    out = tmp_path / "out"
    run = cli(out)
    deadline = time.time() + 120
    while not logged_step(out / "sft" / "metrics.jsonl", 6)():
        assert run.poll() is None and time.time() < deadline, run.communicate()[1][-2000:]
        time.sleep(0.005)
    run.send_signal(signal.SIGINT)
    code, _, stderr = finish(run)
    assert code == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (f"mpo: interrupted in stage sft ({out / 'sft'}); rerun with the same "
                                               "--out to resume")
    assert (out / "sft" / "sft_ckpt.pt").exists() and not list(out.rglob("*.tmp"))


def test_a_full_disk_names_the_file(monkeypatch, tmp_path, capsys):
    def full(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 832 vs 746")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 0))
    message = error_of(["--out", str(tmp_path / "out"), *TINY], capsys)
    assert message == f"mpo: error: {tmp_path / 'out' / 'sft' / 'sft_ckpt.pt'}: cannot write (No space left on device)"
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_a_rerun_that_fails_on_a_full_disk_keeps_the_finished_runs_config(whole, monkeypatch, tmp_path, capsys):
    out = shutil.copytree(whole, tmp_path / "out")
    before = (out / "config.json").read_bytes()

    def full(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    # other evaluation flags and a stage more (dpo_all), whose first checkpoint cannot be written
    message = error_of(["--out", str(out), *TINY, "--methods", "dpo_all", "--eval.samples", "2"], capsys)
    assert message.endswith("cannot write (No space left on device)")
    assert (out / "config.json").read_bytes() == before  # it still describes the run that finished


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_data_file_that_is_not_a_regular_file_is_refused_without_reading(kind, whole, tmp_path, capsys):
    data = hh_files(tmp_path / "data")
    path = data / "hh-rlhf" / "harmless-base" / "train.jsonl.gz"
    path.unlink()
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    out = shutil.copytree(whole, tmp_path / "out")
    before = hashes(out)
    signal.alarm(60)  # a read of the FIFO would block forever: fail instead
    try:
        message = error_of(["--dataset", "hh-rlhf", "--data_dir", str(data), "--out", str(out)], capsys)
    finally:
        signal.alarm(0)
    assert message == f"mpo: error: {path}: not a regular file (a {'FIFO' if kind == 'fifo' else 'directory'})"
    assert hashes(out) == before


def tiny_hf_model(folder, **config):
    """A 1-layer GPT saved in the Hugging Face layout, its config.json then overwritten with `config` (when given)."""
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=257, block_size=80)).save_pretrained(folder)
    if config:
        (folder / "config.json").write_text(json.dumps(config["config"]))
    return folder


GOOD_CONFIG = {"n_positions": 80, "vocab_size": 257, "n_layer": 1, "n_head": 2, "n_embd": 32}


@pytest.mark.parametrize("config, expected", [
    ([GOOD_CONFIG], "expected a JSON object, got list"),
    ({k: v for k, v in GOOD_CONFIG.items() if k != "n_layer"},
     "n_layer must be a positive int (at most 2^20), got None"),
    ({**GOOD_CONFIG, "n_head": 0}, "n_head must be a positive int (at most 2^20), got 0"),
    ({**GOOD_CONFIG, "n_head": 3}, "n_embd 32 is not a multiple of n_head 3"),
    ({**GOOD_CONFIG, "n_layer": 1000000}, "n_layer 1000000, n_embd 32, n_positions 80 and vocab_size 257 imply "),
], ids=["list", "no n_layer", "n_head 0", "n_head 3", "a million layers"])
def test_a_hostile_init_config_is_refused_before_a_model_is_built(config, expected, whole, tmp_path, capsys):
    init = tiny_hf_model(tmp_path / "gpt", config=config)
    out = shutil.copytree(whole, tmp_path / "out")
    before = hashes(out)
    message = error_of(["--out", str(out), *TINY, "--init", str(init)], capsys)
    assert message.startswith(f"mpo: error: {init / 'config.json'}: {expected}"), message
    assert hashes(out) == before


def safetensors_blob(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


@pytest.mark.parametrize("blob, expected", [
    (safetensors_blob({"wte.weight": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, bytes(8)),
     "wte.weight shape '2' is not a list of non-negative ints"),
    (safetensors_blob({"wte.weight": [1, 2]}, bytes(8)), "wte.weight is not an object"),
    (safetensors_blob({"wte.weight": {"dtype": "F32", "shape": [2]}}, bytes(8)),
     "wte.weight data_offsets None is not a pair of ints"),
    (safetensors_blob({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)), "a and b overlap"),
    (safetensors_blob({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
     "a data_offsets out of range"),
    ((200 << 20).to_bytes(8, "little") + b"{}", "bad header length"),
], ids=["shape", "entry", "offsets", "overlap", "size", "header over the cap"])
def test_a_malformed_safetensors_header_is_refused_before_its_data_is_read(blob, expected, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    with pytest.raises(ValueError) as error:
        read_safetensors(path)
    assert str(error.value) == f"{path}: corrupt safetensors header ({expected})"


def test_a_line_longer_than_the_cap_is_refused_without_reading_it_whole(tmp_path):
    path = tmp_path / "long.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b'{"chosen": "ok", "rejected": "no"}\n{"chosen": "' + b"a" * (MAX_LINE + 10) + b'"}\n')
    with pytest.raises(DataError) as error:
        list(read_jsonl(path))
    assert str(error.value) == f"{path}:2: line longer than 16 MiB"
