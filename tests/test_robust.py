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
from model import GPT, GPTConfig, ScalarModel
from ppo import PPOConfig, ppo
from train import TrainConfig, atomic_save, train

REPO = Path(__file__).resolve().parents[1]
# The demo task with a 1-layer GPT: SFT and the RM checkpoint every 5 steps; no DPO / PPO baselines; one run
# folder (the demo's default is a study over 3 seeds).
TINY = ["--seeds", "1", "--device", "cpu", "--max_train", "200", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
        "--sft.max_steps", "60", "--sft.ckpt_every", "5", "--sft.log_every", "1", "--sft.eval_every", "20",
        "--rm.max_steps", "20", "--rm.ckpt_every", "5", "--rm.log_every", "1", "--methods", "", "--eval.prompts", "8"]


def cli(out, *extra):
    """`python mpo.py` on the tiny run, one thread (bit-identical reruns), as a Popen."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "mpo.py"), "--out", str(out), *TINY, *extra], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


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
    step = torch.load(out / "sft" / "sft_ckpt.pt", weights_only=False)["step"]
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
    ckpt = torch.load(out / "dpo_all" / "dpo_all_ckpt.pt", weights_only=False)
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
        ppo(GPT(policy.config), policy, rm, ScalarModel(policy.config), prompts, get_tokenizer("byte"), cfg, tmp_path)
    message = str(error.value)
    assert "\n" not in message and message.startswith("ppo: ") and "score" in message and "iteration 2" in message
    ckpt = torch.load(tmp_path / "ppo_ckpt.pt", weights_only=False)
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
    (["--n_embd", "64"], "transformer.wte.weight is (257, 32) there, (257, 64) in this run; 17 mismatched tensors"),
    (["--n_layer", "2"], "transformer.h.1.attn.c_attn.bias missing; 12 mismatched tensors"),
], ids=["n_embd", "n_layer"])
def test_checkpoints_of_another_model_shape_are_refused_naming_the_stage(flag, mismatch, whole, tmp_path, capsys):
    out = shutil.copytree(whole, tmp_path / "out")
    before = hashes(out)
    message = error_of(["--out", str(out), *TINY, *flag], capsys)
    assert message.startswith(f"mpo: error: {out / 'sft' / 'final.pt'}: checkpoint of another model shape ({mismatch})")
    assert hashes(out) == before
    shutil.rmtree(out / "sft")  # without SFT's checkpoint a new SFT runs; the RM's is refused as it loads
    message = error_of(["--out", str(out), *TINY, *flag, "--sft.max_steps", "1"], capsys)
    assert message.startswith(f"mpo: error: {out / 'rm' / 'final.pt'}: checkpoint of another model shape (gpt.")
    kept = [k for k in before if not k.startswith("sft/") and k != "config.json"]
    assert {k: hashes(out)[k] for k in kept} == {k: before[k] for k in kept}


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
    (["--dataset", "imdb"], "argument --dataset: invalid choice: 'imdb' (choose from 'demo', 'hh-rlhf', 'tldr')"),
    (["--split.source", "resampel"], "argument --split.source: invalid choice: 'resampel'"),
    (["--frobnicate", "1"], "unrecognized arguments: --frobnicate 1"),
    (["--methods", "dpo_all,ppo"], "argument --methods: unknown ppo (choose from dpo_all, ppo_all, mpo, mpo_dpo)"),
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
    n = len(torch.load(out / "pairs_resample.pt")[0])  # one resampled pair per distinct training prompt
    assert f"warning: delta {delta} " + warning.format(n=n) in stdout
    assert (out / trained / "final.pt").exists() and not (out / skipped).exists()
    assert "| mpo |" in (out / "report.md").read_text()
    kept = [k for k in before if k.startswith(("sft/", "rm/")) or k == "pairs_resample.pt"]
    assert {k: hashes(out)[k] for k in kept} == {k: before[k] for k in kept}
