"""The study: a run folder per seed (--seeds N) and per regularisation strength (--sweep), the
budgets that make the methods comparable, and the compute each method spent. lab/results.py sums
them up (results.json, report.md)."""
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from queue import Empty

import torch

from lab.devices import pick_device, world_size
from lab.flags import sweep_factors
from lab.results import seed_record, study, write_study, write_sweep
from lab.runs import ORDER, Interrupted, StopAfter, lock_run_folder
from lab.speed import keep_freed_memory


# The arms every study adds beside MPO (--variants): is the DPO reference better than SFT's (claim
# c), does the RM's gap matter (the same split sizes at random), does restricting PPO to the hard
# prompts matter (PPO on all of them, from the same DPO model)?
STUDY_ARMS = ("stage2_ref=sft", "select=random", "ppo_prompts=all")


def matched_budget(cfgs, steps: int, easy=True, hard=True) -> dict:
    """cfgs with a method's DPO and PPO stages cut to `steps` policy optimizer steps in all
    (--budget matched). A PPO iteration takes ppo_epochs x num_minibatches steps, so PPO gets the
    nearest whole number of iterations (at least one); MPO, with both stages, gives half the steps
    to DPO and the rest to PPO (all to the one stage that has data when the other has none)."""
    per_iteration = cfgs["ppo"].ppo_epochs * cfgs["ppo"].num_minibatches
    dpo_steps = steps if not hard else steps // 2 if easy else 0
    iterations = max(1, round((steps - dpo_steps) / per_iteration))
    return {**cfgs, "dpo": replace(cfgs["dpo"], max_steps=max(1, dpo_steps)),
            "ppo": replace(cfgs["ppo"], max_iterations=iterations)}


def dpo_flops(cfg, pairs, pi: float) -> tuple[float, float]:
    """(the reference's FLOPs, those of a step) of DPO on `pairs`: the reference's forward over all
    of them once (precompute_ref; else a forward more a step), a step's forward and backward over
    batch_size x grad_accum pairs of their mean length (`pi`: the policy's forward FLOPs a
    token)."""
    tokens = [2 * len(p) + len(c) + len(r) for p, c, r, *_ in pairs]
    per_pair = (3 if cfg.precompute_ref else 4) * pi * sum(tokens) / len(tokens)
    ref = pi * sum(tokens) if cfg.precompute_ref else 0
    return ref, per_pair * cfg.batch_size * cfg.grad_accum


def compute_budget(cfgs, target: float, flops: dict, dpo_data, ppo_data, spent: float,
                   response_len: float) -> dict:
    """cfgs with a method's DPO and PPO stages cut so that its FLOPs, counted as `compute` counts
    them, come to about `target` (--budget compute: dpo_all's, its resampling included). `spent`:
    what the method owes before it trains (the resampled pairs it is made from); with both stages
    each gets half of the rest. A DPO step trains batch_size x grad_accum pairs of its data's mean
    length, after the reference's forward over all of them; a PPO iteration rolls out up to
    prompts_per_step x samples_per_prompt responses of `response_len` tokens (the SFT model's mean:
    an estimate, as PPO's responses change length while it trains)."""
    pi, v = flops["policy"], flops["rm"]
    dpo, ppo = cfgs["dpo"], cfgs["ppo"]
    share = max(0.0, target - spent) / (2 if dpo_data and ppo_data else 1)
    out = dict(cfgs)
    if dpo_data:
        ref, per_step = dpo_flops(dpo, dpo_data, pi)
        out["dpo"] = replace(dpo, max_steps=max(1, round((share - ref) / per_step)))
    if ppo_data:
        prompts = [row[0] if isinstance(row, tuple) else row for row in ppo_data]
        rows = min(ppo.prompts_per_step, len(prompts)) * ppo.samples_per_prompt
        tokens = rows * (sum(map(len, prompts)) / len(prompts) + response_len)
        per_token = pi + (2 * pi + 2 * v) + 3 * (pi + v) * ppo.ppo_epochs  # decode, score, train
        out["ppo"] = replace(ppo, max_iterations=max(1, round(share / (tokens * per_token))))
    return out


def compute(out: Path, folders, flops: dict, resampled: dict | None = None) -> dict:
    """A model's compute, counted whole: summed over its stage folders' result.json (train.train,
    dpo.dpo and ppo.ppo count tokens) and the resampled pairs it depends on (`resampled`: their
    "samples" and "tokens"). Policy optimizer steps, tokens through the policy's forward +
    backward, responses sampled, wall seconds, and FLOPs (`flops`: each network's forward FLOPs per
    token, lab.estimates.forward_flops; a backward costs two forwards): training (the policy, the
    RM, PPO's critic: 6 per token and weight), sampling (decoding, one forward a token) and scoring
    (forwards of frozen networks: DPO's reference; PPO's old policy, reference, RM and critic
    values; the RM ranking the resampled pairs)."""
    pi, rm = flops["policy"], flops["rm"]
    total = dict.fromkeys(("policy_steps", "policy_tokens", "samples", "train_flops",
                           "sample_flops", "score_flops", "wall_s"), 0)
    if resampled:  # two SFT samples per pair, each decoded and scored by the RM
        total |= {"samples": resampled["samples"], "sample_flops": pi * resampled["tokens"],
                  "score_flops": rm * resampled["tokens"]}
    for folder in folders:
        path = out / folder / "result.json"
        if not path.exists():
            continue
        r = {k.removeprefix("compute/"): v for k, v in json.loads(path.read_text()).items()}
        kind = Path(folder).name
        tokens, rollout = r.get("tokens", 0), r.get("rollout_tokens", 0)
        if kind == "rm":
            total["train_flops"] += 3 * rm * tokens
        elif kind in ("ppo_all", "mpo"):  # policy and critic trained on the rollouts' tokens
            total["train_flops"] += 3 * (pi + rm) * tokens
            total["sample_flops"] += pi * rollout
            total["score_flops"] += (2 * pi + 2 * rm) * rollout
        else:  # sft and the DPO stages
            total["train_flops"] += 3 * pi * tokens
            total["score_flops"] += pi * r.get("ref_tokens", 0)
        if kind != "rm":
            total["policy_steps"] += r.get("steps", 0)
            total["policy_tokens"] += tokens
        total["samples"] += r.get("samples", 0)
        total["wall_s"] += r.get("wall_s", 0)
    total["flops"] = total["train_flops"] + total["sample_flops"] + total["score_flops"]
    return total


def out_folder(run) -> Path:
    """The run folder: --out, default out/<dataset>."""
    return Path(run.out or f"out/{run.dataset}")


def run_study(cfgs: dict, pipeline) -> Path:
    """`pipeline(cfgs) -> report.md` (lab.pipeline.run_pipeline) once, or once per seed (--seeds N)
    and per regularisation strength (--sweep); returns the report that sums them up."""
    run = cfgs["run"]
    if run.seeds <= 1 and not run.sweep:
        return pipeline(cfgs)
    lock_run_folder(out_folder(run))  # one study per --out, refused before any seed starts
    return run_sweep(cfgs, pipeline) if run.sweep else run_seeds(cfgs, pipeline)


def run_seed(pipeline, cfgs: dict, log=None, threads: int = 1) -> Path:
    """One seed of a study on one thread, or `threads` (floating-point sums depend on the thread
    count, not the cores: a seed's numbers must not depend on the machine's cores), its output to
    `log` when given."""
    torch.set_num_threads(threads)
    if log is None:
        return pipeline(cfgs)
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return pipeline(cfgs)


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C, SIGINT or SIGTERM to a study: where each seed stopped, for main's one line."""


def seed_process(pipeline, job: dict, queue):
    """One seed in a process of its own (spawned): its outcome goes to `queue` as (seed, kind,
    text), kind "done" (text: the report), "interrupted" (where) or "error" (one line). The
    terminal's Ctrl-C is the study's to pass on, as a SIGTERM that stops the seed in its stage; and
    a seed whose study is gone, however it ended, stops too."""
    keep_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, interrupt_once)
    parent = os.getppid()

    def watch():  # no orphans: the stage's last checkpoint is on disk for a rerun
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    seed = job["run"].seed
    try:
        queue.put((seed, "done", str(run_seed(pipeline, job, Path(job["run"].out) / "log.txt"))))
    except KeyboardInterrupt as e:
        queue.put((seed, "interrupted",
                   f"in stage {e}" if isinstance(e, Interrupted) else "outside the stages"))
    except BaseException as e:  # a SystemExit too: the study says it in one line
        queue.put((seed, "error", " ".join(str(e).split()) or type(e).__name__))


def interrupt_once(signum, frame):
    """SIGTERM as Ctrl-C, once: a second one, while the stage winds down, is ignored."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def last_stage(log: Path) -> str:
    """The stage a seed's log names last, for a process that died without a word."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    names = [m[1] for line in lines if (m := re.match(r"(\w+)[ :]", line)) and m[1] in ORDER]
    return f"stage {names[-1]}" if names else "no stage yet"


def run_in_processes(pipeline, jobs: list, workers: int):
    """The seeds' jobs, `workers` processes at a time. Ctrl-C, SIGINT or SIGTERM to this process
    starts no other seed and stops the running ones in their stages: StudyInterrupted says where
    each stopped. A seed that fails, or whose process dies, stops the others; a one-line error
    names it (and the stage its log names last)."""
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked thread pools
    queue, waiting, running, outcome = spawn.Queue(), list(jobs), {}, {}
    logs = {job["run"].seed: Path(job["run"].out) / "log.txt" for job in jobs}

    def receive(timeout):  # one seed's outcome; a process that ended without one died
        try:
            seed, kind, text = queue.get(timeout=timeout)
        except Empty:
            for seed, p in list(running.items()):
                if p.exitcode is not None and queue.empty():
                    del running[seed]
                    outcome[seed] = ("died", f"its process died (exit code {p.exitcode})")
            return
        running.pop(seed).join()
        outcome[seed] = (kind, text)
        if kind == "done":
            print(f"study: {text} done")

    def stop_running():  # each stops in its stage; a minute at most
        for p in running.values():
            if p.exitcode is None:
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.time() + 60
        while running and time.time() < deadline:
            receive(timeout=0.5)

    previous = signal.signal(signal.SIGTERM, interrupt_once)
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                job = waiting.pop(0)
                running[job["run"].seed] = spawn.Process(target=seed_process,
                                                         args=(pipeline, job, queue))
                running[job["run"].seed].start()
            receive(timeout=1.0)
            if failed := [s for s, (kind, _) in outcome.items() if kind in ("error", "died")]:
                waiting.clear()
                stop_running()
                kind, text = outcome[failed[0]]
                where = f" in {last_stage(logs[failed[0]])}" if kind == "died" else ""
                raise RuntimeError(f"seed {failed[0]}: {text}{where}; its log: "
                                   f"{logs[failed[0]]}; finished seeds and stages are kept, "
                                   "rerun with the same --out to go on")
    except KeyboardInterrupt:
        waiting.clear()
        stop_running()
        where = {"done": "done", "interrupted": "{}", "died": "stopped", "error": "failed: {}"}
        raise StudyInterrupted(", ".join(
            f"seed {seed} " + where.get(kind, "not started").format(text)
            for seed, (kind, text) in ((seed, outcome.get(seed, ("", ""))) for seed in logs)))
    finally:
        signal.signal(signal.SIGTERM, previous)
        for p in running.values():  # what a minute did not stop
            p.kill()


def run_seeds(cfgs: dict, pipeline) -> Path:
    """--seeds N: the run for seeds --seed .. --seed + N - 1, each a run folder OUT/seed_<s>/
    (resumed like any run folder), on the same task data (--data_seed); the stages' seeds shift with
    it. --study shared makes SFT, the RM and the resampled pairs once first, in OUT/shared (the
    paper's setting: one SFT model and one RM, the methods compared after them), and every seed
    reuses them (--reuse); --study full makes everything per seed (the RM's variance in the
    verdicts). The study adds the rows its claims need: dpo_human, mpo_dpo (MPO's first stage
    alone) and the arms mpo[stage2_ref=sft] (claim c), mpo[select=random] and
    mpo[ppo_prompts=all]. On a CPU with several cores the seeds run side by side, one process and
    one thread each; then OUT/report.md and OUT/results.json aggregate them (lab.results.study)."""
    run = cfgs["run"]
    out = out_folder(run)
    seeds = [run.seed + i for i in range(run.seeds)]
    methods, variants = run.methods.split(","), list(filter(None, run.variants.split(";")))
    if "mpo" in methods:
        methods += [m for m in ("dpo_human", "mpo_dpo") if m not in methods]
        variants += [v for v in STUDY_ARMS if v not in variants]
    reuse = ""
    if run.study == "shared":
        reuse = str(out / "shared")
        print(f"study: SFT, the reward model and the resampled pairs, once for every seed, in "
              f"{reuse}; its log: {reuse}/log.txt")
        try:  # nothing else runs meanwhile: two threads, on any machine (the RM: 1.6x faster)
            run_seed(pipeline, {**cfgs, "run": replace(run, seeds=1, out=reuse, methods="mpo",
                                                       variants="", stop_after="split")},
                     Path(reuse) / "log.txt", threads=2)
        except StopAfter:
            pass
    jobs = []
    for s in seeds:
        shifted = {g: replace(c, seed=c.seed + s - run.seed) if hasattr(c, "seed") else c
                   for g, c in cfgs.items()}
        shifted["run"] = replace(run, seed=s, seeds=1, out=str(out / f"seed_{s}"), reuse=reuse,
                                 methods=",".join(methods), variants=";".join(variants))
        jobs.append(shifted)
    cores = os.cpu_count() or 1
    parallel = pick_device(run.device).type == "cpu" and world_size() == 1 and cores > 1
    workers = min(len(seeds), cores) if parallel else 1
    listed = ", ".join(map(str, seeds)) if len(seeds) <= 10 else f"{seeds[0]} to {seeds[-1]}"
    print(f"study: {len(seeds)} seeds ({listed}), {workers} at a time, one thread each; "
          f"each seed's log: {out}/seed_<s>/log.txt")
    if workers > 1:
        run_in_processes(pipeline, jobs, workers)
    else:
        for job in jobs:
            print(f"study: {run_seed(pipeline, job)} done")
    folders = [out / f"seed_{s}" for s in seeds]
    records = [seed_record(json.loads((f / "results.json").read_text())) for f in folders]
    return write_study(out, cfgs, study(records, run.equivalence), folders)


def share_sft_and_rm(src: Path, dst: Path):
    """A sweep's multiple starts from the first multiple's finished SFT and RM stages and resampled
    pairs, seed by seed or those the seeds share (same settings, same seeds: the same stages; they
    do not depend on beta or kl_coef), copied in."""
    for folder in [src, src / "shared", *sorted(src.glob("seed_*"))]:
        target = dst / folder.relative_to(src)
        for name in ("sft", "rm"):
            if (folder / name / "final.pt").exists() and not (target / name).exists():
                shutil.copytree(folder / name, target / name)
        for pairs in folder.glob("pairs_*.*"):  # the cache and its record
            if not (target / pairs.name).exists():
                shutil.copy2(pairs, target / pairs.name)


def run_sweep(cfgs: dict, pipeline) -> Path:
    """--sweep: the run (a study under --seeds N) at each multiple of the regularisation strengths,
    DPO's beta and PPO's kl_coef together (MPO has both), each in OUT/sweep_<x>/; then OUT/report.md
    with the reward-KL frontier and OUT/sweep.json (lab.results.write_sweep)."""
    run = cfgs["run"]
    out = out_folder(run)
    studies, factors = {}, sweep_factors(run.sweep)
    for x in factors:
        share_sft_and_rm(out / f"sweep_{factors[0]:g}", out / f"sweep_{x:g}")
        at = {**cfgs, "run": replace(run, sweep="", out=str(out / f"sweep_{x:g}")),
              "dpo": replace(cfgs["dpo"], beta=cfgs["dpo"].beta * x),
              "ppo": replace(cfgs["ppo"], kl_coef=cfgs["ppo"].kl_coef * x)}
        report = pipeline(at) if run.seeds <= 1 else run_seeds(at, pipeline)
        studies[x] = json.loads((report.parent / "results.json").read_text())
        print(f"sweep: x{x:g} done: {report}")
    return write_sweep(out, cfgs, dict(sorted(studies.items())))
