"""The shared training loop: schedule, accumulation, resume after a crash, NaN stop.
python -m pytest -q tests/test_train.py"""
import datetime
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig
from lab.devices import autocast
from lab.estimates import memory_estimate
from train import TrainConfig, lr_at, train


def rows(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.arange(8.0) + 0.1 * torch.randn(n, generator=g)
    return list(zip(x, y))


def collate(batch):
    return {"x": torch.stack([x for x, _ in batch]), "y": torch.stack([y for _, y in batch])}


def mse(model, batch):
    return F.mse_loss(model(batch["x"]).squeeze(-1), batch["y"]), {}


def toy(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def cfg(**kw):
    base = dict(lr=1e-2, batch_size=4, grad_accum=2, max_steps=12, warmup_steps=2, weight_decay=0.1,
                eval_every=4, log_every=1, ckpt_every=3, device="cpu")
    return TrainConfig(**{**base, **kw})


def lines(out_dir):
    """metrics.jsonl's records without their time stamps (each checked to be an ISO time first)."""
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        datetime.datetime.fromisoformat(r.pop("time"))
    return records


def test_warmup_then_cosine_or_linear_decay():
    c = TrainConfig(lr=1.0, warmup_steps=4)
    assert [lr_at(s, c, 104) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_at(54, c, 104) == pytest.approx(0.5)  # half way through the decay: cos(pi/2) = 0
    assert lr_at(29, c, 104) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    c.decay = "linear"
    assert lr_at(29, c, 104) == pytest.approx(0.75)
    assert lr_at(103, c, 104) == pytest.approx(0.01)
    c.warmup_steps = 0
    assert lr_at(0, c, 10) == 1.0


def test_accumulating_micro_batches_equals_one_big_batch(tmp_path):
    """4 micro-batches of 4 rows = 1 batch of 16 rows: same gradient norm at every step, same weights."""
    data, models, logs = rows(), [], []
    for i, (bs, acc) in enumerate([(4, 4), (16, 1)]):
        model = toy()
        train(model, mse, data, None, cfg(batch_size=bs, grad_accum=acc, max_steps=6), tmp_path / str(i), "toy",
              collate)
        models.append(model)
        logs.append([line for line in lines(tmp_path / str(i)) if line["split"] == "train"])
    for a, b in zip(*logs):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_resume_after_crash_is_bit_identical_and_logs_each_step_once(tmp_path):
    data, eval_data = rows(), rows(16, seed=1)
    whole = toy()
    result = train(whole, mse, data, eval_data, cfg(), tmp_path / "whole", "toy", collate)

    calls = 0

    def crashing(model, batch):
        nonlocal calls
        calls += model.training  # evaluation batches do not count
        if calls == 2 * 8 + 1:  # during step 9: checkpoint at step 6, steps 7 and 8 already logged
            raise KeyboardInterrupt
        return mse(model, batch)

    with pytest.raises(KeyboardInterrupt):
        train(toy(), crashing, data, eval_data, cfg(), tmp_path / "crash", "toy", collate)
    assert max(line["step"] for line in lines(tmp_path / "crash")) == 8
    resumed = toy(seed=1)  # a different init: the checkpoint must overwrite it
    assert train(resumed, mse, data, eval_data, cfg(), tmp_path / "crash", "toy", collate) == result
    for p, q in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)
    assert lines(tmp_path / "crash") == lines(tmp_path / "whole")  # no duplicated or missing lines
    assert [(l["step"], l["split"]) for l in lines(tmp_path / "whole")][:3] == [(0, "eval"), (1, "train"), (2, "train")]

    again = toy(seed=2)  # a finished stage only loads its final weights
    assert train(again, mse, data, eval_data, cfg(), tmp_path / "crash", "toy", collate) == result
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), again.parameters()))


def test_nan_loss_stops_with_one_line_and_keeps_the_checkpoint(tmp_path):
    steps = 0

    def nan_at_step_5(model, batch):
        nonlocal steps
        steps += 1
        loss, metrics = mse(model, batch)
        return (loss * float("nan") if steps > 2 * 4 else loss), metrics

    with pytest.raises(FloatingPointError) as error:
        train(toy(), nan_at_step_5, rows(), None, cfg(), tmp_path, "toy", collate)
    message = str(error.value)
    assert "\n" not in message and message.startswith("toy: loss is nan at step 5") and "toy_ckpt.pt" in message
    ckpt = torch.load(tmp_path / "toy_ckpt.pt", weights_only=False)
    assert ckpt["step"] == 3 and not ckpt["done"]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_memory_estimate_counts_the_weights_exactly_and_shrinks_with_checkpointing_and_bf16():
    config = GPTConfig(block_size=64, vocab_size=300, n_layer=3, n_head=2, n_embd=32)
    n = sum(p.numel() for p in GPT(config).parameters())  # the tied LM head counted once
    full = memory_estimate(config, rows=4, seq_len=20, head_positions=10, trained=2, frozen=1)
    assert full["weights"] == (2 * 16 + 4) * n
    assert full["logits"] == 3 * 4 * 4 * 10 * 300  # three fp32 (rows, positions, vocab) buffers
    assert full["total"] == full["weights"] + full["activations"] + full["logits"]
    assert memory_estimate(config, 4, 20, 10, bf16=True)["activations"] == full["activations"] // 2
    config.grad_checkpoint = True  # block inputs (1 element each) for 3 layers + one layer's 17: 20 of 51
    assert memory_estimate(config, 4, 20, 10)["activations"] * 51 == full["activations"] * 20


def test_dtype_flag_turns_cpu_autocast_on_and_off():
    with autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="--dtype fp16"):
        autocast("cpu", "fp16")
    with autocast("cpu", "auto"):
        assert not torch.is_autocast_enabled("cpu")


def test_progress_rate_reads_for_slow_steps_and_long_phases_print(capsys):
    from lab.progress import progress, rate_eta
    assert rate_eta(3, 10, 1.5) == "2.00 it/s | ETA 0:00:04"
    assert rate_eta(2, 10, 50.0) == "25.0 s/it | ETA 0:03:20"  # never "0.04 it/s"
    assert list(progress(range(3), "phase", every=0.0)) == [0, 1, 2]
    assert capsys.readouterr().out.splitlines()[-1].startswith("phase 3/3 | ")
    assert list(progress(range(3), "quick", every=60.0)) == [0, 1, 2] and capsys.readouterr().out == ""


@pytest.mark.parametrize("n,kw", [(64, {}), (50, {"epochs": 2.5, "batch_size": 6}), (3, {"batch_size": 8})])
def test_the_plan_counts_the_steps_train_takes(tmp_path, n, kw):
    from train import optimizer_steps
    c = cfg(max_steps=0, eval_every=0, ckpt_every=1000, **kw)
    train(toy(), mse, rows(n), None, c, tmp_path, "toy", collate)
    assert max(line["step"] for line in lines(tmp_path)) == optimizer_steps(c, n)


def test_time_probe_leaves_the_model_as_it_was():
    from lab.estimates import time_probe
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=2, n_embd=16)).eval()
    before, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    times = time_probe(model, 2, 16, (3, 5), torch.device("cpu"), "auto")
    assert set(times) == {"train_step", "decode_step_3", "decode_step_5"} and all(t > 0 for t in times.values())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and not model.training
    assert all(p.grad is None for p in model.parameters()) and torch.equal(torch.get_rng_state(), rng)
