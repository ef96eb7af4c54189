"""Data parallelism through torchrun: 2 CPU processes (gloo) against 1 process over the same global batch.
python -m pytest -q tests/test_ddp.py"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]

# One DPO step of a tiny GPT on 16 random pairs: 2 micro-batches of 4 pairs, taken by one process in turn
# (grad_accum 2) or by two processes at once (grad_accum 2 = 1 per rank, gradients averaged by DDP).
# Then two PPO iterations from the DPO model; each rank saves the policy it ends with.
SCRIPT = f"""
import copy, sys
import torch
sys.path.insert(0, {str(REPO)!r})
from data import get_tokenizer
from dpo import DPOConfig, dpo
from model import GPT, GPTConfig, ScalarModel
from ppo import Models, PPOConfig, masked_whiten, ppo
from lab.devices import is_main, rank, setup_distributed, world_size

setup_distributed()
torch.manual_seed(0)
policy = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=257, block_size=32))
ref = copy.deepcopy(policy)
g = torch.Generator().manual_seed(1)
ids = lambda n: torch.randint(0, 256, (int(torch.randint(2, n, (1,), generator=g)),), generator=g).tolist()
pairs = [(ids(10), ids(12) + [256], ids(12) + [256]) for _ in range(16)]
cfg = DPOConfig(lr=1e-3, beta=0.5, batch_size=4, grad_accum=2, max_steps=1, warmup_steps=0, eval_every=0, log_every=1,
                device="cpu")
dpo(policy, ref, pairs, cfg, sys.argv[1])
print("world", world_size())
if is_main():
    torch.save(policy.state_dict(), sys.argv[1] + "/weights.pt")

torch.manual_seed(2)
rm, prompts = ScalarModel(policy.config), [ids(8) for _ in range(8)]
cfg = PPOConfig(prompts_per_step=4, samples_per_prompt=2, max_new_tokens=6, micro_batch_size=4, actor_lr=1e-3,
                critic_lr=1e-3, warmup_steps=0, eval_every=0, device="cpu")
trained, _ = ppo(Models(copy.deepcopy(policy), policy, rm, copy.deepcopy(rm)), prompts, get_tokenizer("byte"), cfg,
                 sys.argv[1] + "/ppo")
torch.save(trained.state_dict(), f"{{sys.argv[1]}}/ppo_rank{{rank()}}.pt")

# Advantage whitening of 6 ragged rows: all of them in one process, 3 per rank under torchrun.
g = torch.Generator().manual_seed(3)
x, mask = torch.randn(6, 5, generator=g), (torch.rand(6, 5, generator=g) > 0.3).float()
rows = slice(3 * rank(), 3 * rank() + 3) if world_size() == 2 else slice(None)
torch.save(masked_whiten(x[rows], mask[rows]), f"{{sys.argv[1]}}/whiten_rank{{rank()}}.pt")
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The script run by one process (one/) and by torchrun with 2 gloo processes (two/); their stdout."""
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "step.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    stdout = []
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for cmd in ([sys.executable, "step.py", "one"], [*torchrun, "step.py", "two"]):
        for _ in range(3):  # a gloo rank sometimes aborts as its process exits, after its work (seen 1 in ~10 here)
            done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=240)
            if "terminate called without an active exception" not in done.stderr:
                break
        assert done.returncode == 0, done.stderr[-3000:]
        stdout.append(done.stdout)
    return tmp, stdout


def test_two_gloo_processes_take_the_same_dpo_step_as_one_process(runs):
    tmp, (single, double) = runs
    assert "world 1" in single and double.count("world 2") == 1  # rank 1 prints nothing
    one, two = (torch.load(tmp / d / "weights.pt") for d in ("one", "two"))
    torch.manual_seed(0)
    init = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=257, block_size=32)).state_dict()
    assert all((one[k] - init[k]).abs().max() > 1e-4 for k in one)  # the step moved every tensor
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6)
    logs = [[json.loads(line) for line in (tmp / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert len(logs[1]) == len(logs[0]) == 1  # one line for the step, written by rank 0 only
    # The gradient norm is that of the all-reduced gradient: equal only if DDP averaged both halves.
    for key in ("loss", "grad_norm", "logps/chosen"):
        assert abs(logs[1][0][key] - logs[0][0][key]) < 1e-6, key


def test_ppo_ranks_sample_their_own_rollouts_and_stay_in_step(runs):
    """Each rank samples other prompts with its own seed; the all-reduced gradients keep the policies equal."""
    tmp, _ = runs
    ranks = [torch.load(tmp / "two" / f"ppo_rank{r}.pt") for r in (0, 1)]
    dpo_model = torch.load(tmp / "two" / "weights.pt")
    assert any((ranks[0][k] - dpo_model[k]).abs().max() > 1e-4 for k in dpo_model)  # PPO moved the policy
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    lines = [json.loads(line) for line in (tmp / "two" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]  # 8 prompts x 2 samples / 4 per iteration, logged once


def test_advantages_are_whitened_with_the_statistics_of_the_whole_batch(runs):
    tmp, _ = runs
    whole = torch.load(tmp / "one" / "whiten_rank0.pt")
    split = torch.cat([torch.load(tmp / "two" / f"whiten_rank{r}.pt") for r in (0, 1)])
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-6)
    nonzero = whole[whole != 0]
    assert abs(float(nonzero.mean())) < 1e-5 and abs(float(nonzero.std(unbiased=False)) - 1) < 1e-4
