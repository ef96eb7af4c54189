"""A study that stops when told: Ctrl-C, SIGINT or SIGTERM to its process stops every seed in its stage
(exit 130, one line naming where each stopped), no seed's process outlives the study however it ends,
and a seed whose process dies is named. Each runs a tiny study in a subprocess of its own session and
scans /proc for what is left of it. python -m pytest -q tests/test_study_signals.py"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Three seeds, two processes at a time, each in a long SFT stage (a progress line every step).
LONG = ["--seeds", "3", "--study", "full", "--device", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
        "--max_train", "200", "--demo.pairs_train", "300", "--sft.max_steps", "20000", "--sft.log_every", "1",
        "--sft.ckpt_every", "50", "--rm.max_steps", "2", "--methods", "", "--eval.prompts", "4"]
pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2 or not Path("/proc/self/stat").exists(),
                                reason="a study runs seeds side by side on a CPU with 2 cores or more (Linux)")


def start(out, *extra):
    """`python mpo.py` on the long study, in a session of its own (its id: the process's pid)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "mpo.py"), "--out", str(out), *LONG, *extra], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def session(sid) -> dict:
    """{pid: command line} of the live (not zombie) processes in session `sid`."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found[int(stat.parent.name)] = cmdline
    return found


def wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.2)


def training(out, seed) -> bool:
    log = out / (f"seed_{seed}" if seed != "shared" else "shared") / "log.txt"
    return log.exists() and re.search(r"^sft \d+/20000 \|", log.read_text(), re.M) is not None


def seed_processes(proc) -> dict:
    """{pid: command line} of the study's seed processes (its children but the resource tracker)."""
    return {pid: cmd for pid, cmd in session(proc.pid).items()
            if pid != proc.pid and "resource_tracker" not in cmd}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_study_stops_every_seed_in_its_stage(sig, tmp_path):
    out = tmp_path / "out"
    proc = start(out)
    try:
        wait_for(lambda: training(out, 0) and training(out, 1), 120, "seed training")
        proc.send_signal(sig)  # to the study's process only, as `kill -INT` / `kill` does
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (
        f"mpo: interrupted (seed 0 in stage sft ({out / 'seed_0' / 'sft'}), seed 1 in stage sft "
        f"({out / 'seed_1' / 'sft'}), seed 2 not started); rerun with the same --out to resume")
    wait_for(lambda: not session(proc.pid), 10, "end of every process of the study")
    assert not (out / "seed_2").exists() and not (out / ".lock").exists()
    assert all((out / f"seed_{s}" / "sft" / "settings.json").exists() for s in (0, 1))  # resumable


def test_seeds_end_with_a_study_killed_outright(tmp_path):
    out = tmp_path / "out"
    proc = start(out)
    try:
        wait_for(lambda: training(out, 0) and training(out, 1), 120, "seed training")
        assert len(seed_processes(proc)) == 2
        proc.kill()  # SIGKILL: no handler runs
        proc.communicate(timeout=30)
        wait_for(lambda: not session(proc.pid), 15, "end of the seeds' processes")
    finally:
        for pid in session(proc.pid):
            os.kill(pid, signal.SIGKILL)


def test_a_seed_whose_process_dies_is_named_with_its_stage_and_log(tmp_path):
    out = tmp_path / "out"
    proc = start(out)
    try:
        wait_for(lambda: training(out, 0) and training(out, 1), 120, "seed training")
        os.kill(min(seed_processes(proc)), signal.SIGKILL)  # the first seed's process
        _, stderr = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 1, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"mpo: error: seed 0: its process died \(exit code -9\) in stage sft; its log: "
                        rf"{re.escape(str(out / 'seed_0' / 'log.txt'))}; finished seeds and stages are kept, "
                        r"rerun with the same --out to go on", line), line
    wait_for(lambda: not session(proc.pid), 10, "end of every process of the study")


def test_a_signal_in_the_shared_phase_stops_it_in_its_stage_before_any_seed(tmp_path):
    out = tmp_path / "out"
    proc = start(out, "--study", "shared")  # SFT and the RM made once, in OUT/shared, before the seeds
    try:
        wait_for(lambda: training(out, "shared"), 120, "shared SFT training")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (
        f"mpo: interrupted in stage sft ({out / 'shared' / 'sft'}); rerun with the same --out to resume")
    wait_for(lambda: not session(proc.pid), 10, "end of every process of the study")
    assert sorted(p.name for p in out.iterdir()) == ["shared"]  # no seed started, the lock released
    assert (out / "shared" / "sft" / "settings.json").exists()  # resumable
