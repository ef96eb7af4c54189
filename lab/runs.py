"""Run folders: the plumbing under mpo.mpo, so that mpo.py can read as the method.

A run folder (--out) holds one run: a folder per stage with its final weights, metrics and the
settings it was made with. `Stages.stage` makes a stage once and loads it on a rerun (resume); the
records (`records`, `plan`) let a rerun with other flags refuse, or with --redo remake, only the
stages those flags change; `open_run_folder` locks the folder and checks all of that before anything
under it changes; the pairs cache keeps the resampled pairs. The study's many run folders (one per
seed and per regularisation strength) are lab/study.py's.
"""
import fcntl
import json
import os
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lab.checkpoints import atomic_save, check_shapes, load_checkpoint, load_weights
from lab.devices import gather, is_main
from lab.flags import split_variants
from lab.weights import regular_file


class StopAfter(Exception):
    """Raised after the stage named by --stop_after, so that train.sh can run one stage per line."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C inside a stage, with the stage's name for main's one line."""


# The stages in the order a run makes them: --stop_after stops after one of them, or, when this run
# skips it, where it would have run.
ORDER = ("sft", "rm", "split", "dpo_all", "dpo_human", "ppo_all", "mpo_dpo", "mpo")


class Stages:
    """The stages of one run folder. `stage` makes a stage once: its final weights go to
    out/name/final.pt and its metrics (wall time included) to out/name/result.json, kept in
    self.metrics[name]; a rerun with the same out loads them and skips the stage. The stage's
    settings (`records[name]`, what it depends on) go to out/name/settings.json as it starts. After
    the stage --stop_after names, or where it would have run: StopAfter. `same`: {name: model} of
    stages another folder made exactly so (an ablation's DPO stage that is MPO's), used as they
    are."""

    def __init__(self, out: Path, records: dict, stop_after: str = "", same: dict | None = None):
        self.out, self.records, self.stop_after = out, records, stop_after
        self.same = same or {}
        self.metrics = {}

    def stage(self, name: str, fn, *args, **kwargs):
        """fn(*args, out_dir=out/name, **kwargs) -> (model, metrics) trains the stage's model, the
        first of `args` (of ppo.Models: its policy); on a rerun the saved weights load into it
        instead. Returns the model, on the CPU."""
        earlier = ORDER[:ORDER.index(name)] if name in ORDER else ()
        if self.stop_after in earlier:  # it came before this stage and did not run: skipped
            self.stop_if_last(self.stop_after, skipped=True)
        if name in self.same:
            print(f"{name}: the same stage as one made in this run, reused")
            return self.same[name]
        model = getattr(args[0], "policy", args[0])
        folder = self.out / name
        final, result = folder / "final.pt", folder / "result.json"
        if final.exists():
            load_weights(model, load_checkpoint(final), final)
            try:
                self.metrics[name] = json.loads(regular_file(result).read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"{result}: cannot read ({' '.join(str(e).split())}); "
                                 f"delete {folder} to redo {name}")
            print(f"{name}: done in an earlier run, loaded {final}")
            self.stop_if_last(name)
            return model
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save(json.dumps(self.records[name], indent=1).encode(), folder / "settings.json")
        start = time.time()
        try:
            model, metrics = fn(*args, out_dir=folder, **kwargs)
        except torch.OutOfMemoryError:  # its own message is a page of allocator statistics
            raise RuntimeError(out_of_memory(name)) from None
        except KeyboardInterrupt:
            raise Interrupted(f"{name} ({folder})") from None
        metrics = {**metrics, "wall_s": time.time() - start}
        atomic_save(json.dumps(metrics, indent=1).encode(), result)
        atomic_save(model.state_dict(), final)  # written last: its presence marks the stage done
        if is_main():
            for ckpt in folder.glob("*_ckpt.pt"):  # the mid-stage resume point, superseded
                ckpt.unlink()
        print(f"{name}: finished in {metrics['wall_s']:.0f}s, saved {final}")
        self.metrics[name] = metrics
        self.stop_if_last(name)
        return model.cpu()

    def stop_if_last(self, name: str, skipped=False):
        """StopAfter once the stage --stop_after names is done, or skipped (not in --methods, or one
        side of the split empty): a run stops where that stage would have run, never later."""
        if name == self.stop_after:
            raise StopAfter(f"{name} (skipped in this run)" if skipped else name)


def out_of_memory(name: str) -> str:
    """One line for a CUDA out-of-memory error in stage `name` (or outside the stages): what to
    lower."""
    group = {"sft": "sft", "rm": "rm", "mpo_dpo": "dpo", "dpo_all": "dpo", "dpo_human": "dpo",
             "mpo": "ppo", "ppo_all": "ppo"}.get(name)
    if group in ("sft", "rm", "dpo"):
        knobs = (f"--{group}.batch_size and raise --{group}.grad_accum as much (same effective "
                 "batch)")
    elif group == "ppo":
        knobs = "--ppo.micro_batch_size (update) or --ppo.prompts_per_step (rollouts)"
    else:
        knobs = "--split.batch_size and --eval.batch_size (sampling and scoring)"
    return (f"{name}: CUDA out of memory; lower {knobs}, or --max_prompt_len / --max_response_len; "
            "finished stages and the last checkpoint are kept: rerun with the same --out to resume")


# What decides a stage's weights, recorded as it starts (Stages.stage, settings.json) and compared
# before a rerun changes anything (stale_records): the data (dataset, data_dir, template, lengths,
# max_train), the model (init, or a fresh GPT's shape), the seed, the stage's own config, and the
# records of the stages it starts from, so a change reaches every stage after it. Not recorded, as
# they change how or where a result is computed, or what is logged, but not the result: out, device,
# dtype, compile, grad_checkpoint, what else runs (methods, variants, stop_after, redo), log_every,
# eval_every, ckpt_every, num_samples, the evaluation (max_eval, eval.*: it reruns every time), the
# memory knobs an out-of-memory error asks to change (precompute_ref, ppo.micro_batch_size;
# batch_size and grad_accum are recorded as their product, the effective batch), the gold function
# (it scores, it does not train), the preset (the values it sets are recorded one by one) and the
# study's seeds, sweep, mode and equivalence margin (each seed and multiple has its own folder; a
# seed's --reuse is recorded). --budget is recorded with the DPO and PPO stages only, whose steps
# it sets.
NOT_RECORDED = {"out", "device", "dtype", "compile", "grad_checkpoint", "methods", "variants",
                "stop_after", "redo", "log_every", "eval_every", "ckpt_every", "num_samples",
                "max_eval", "precompute_ref", "micro_batch_size", "gold_reward", "preset", "seeds",
                "sweep", "budget", "eval_prompts", "study", "equivalence"}


def flags_of(cfg, group: str) -> dict:
    """{flag name: value} of cfg's recorded fields ("sft.lr"; the run's own fields without a
    prefix)."""
    pre = "" if group == "run" else f"{group}."
    values = {pre + k: v for k, v in asdict(cfg).items() if k not in NOT_RECORDED}
    if pre + "grad_accum" in values:
        batch = values.pop(pre + "batch_size") * values.pop(pre + "grad_accum")
        values[f"{pre}batch_size*{pre}grad_accum"] = batch
    return values


def records(cfgs, split) -> dict:
    """{stage or cache: the settings it depends on} for one split (MPO's, or an ablation
    variant's)."""
    run = cfgs["run"]
    data = {k: v for k, v in flags_of(run, "run").items()
            if not (run.init and k in ("n_layer", "n_head", "n_embd"))}
    if run.dataset == "demo":  # the demo's data is made by its generator's knobs
        data |= flags_of(cfgs["demo"], "demo")
    sft = data | flags_of(cfgs["sft"], "sft")
    rm = data | flags_of(cfgs["rm"], "rm") | (sft if cfgs["rm"].init == "sft" else {})
    pairs = (rm | (sft if split.source == "resample" else {})
             | {f"split.{k}": getattr(split, k)
                for k in ("source", "batch_size", "pairs_per_row", "pairs_per_prompt")})
    budget = {"budget": run.budget}
    dpo_cfg, ppo_cfg = flags_of(cfgs["dpo"], "dpo") | budget, flags_of(cfgs["ppo"], "ppo") | budget
    if run.budget == "compute":  # every budget is dpo_all's FLOPs: its data, flags and RM decide
        dpo_cfg["dpo.precompute_ref"] = cfgs["dpo"].precompute_ref  # 3 or 4 forwards a token
        ppo_cfg |= dpo_cfg
    mpo_dpo = (pairs | {f"split.{k}": getattr(split, k)
                        for k in ("delta", "quantile", "order", "select", "seed")} | dpo_cfg)
    mpo = mpo_dpo | {f"split.{k}": getattr(split, k) for k in ("stage2_ref", "ppo_prompts")}
    # dpo_human: as many of the human pairs as there are pairs to split
    human = sft | {f"split.{k}": getattr(split, k)
                   for k in ("source", "pairs_per_row", "pairs_per_prompt")}
    if run.budget == "compute":
        human |= pairs
    return {"sft": sft, "rm": rm, "pairs": pairs, "dpo_all": pairs | dpo_cfg,
            "dpo_human": human | dpo_cfg, "ppo_all": pairs | ppo_cfg,
            "mpo_dpo": mpo_dpo, "mpo": mpo | ppo_cfg}


def default_records(cfgs) -> dict:
    """Every recorded flag at its default: what a record made before that flag existed had (a new
    flag's default keeps the old behaviour)."""
    return json.loads(json.dumps({k: v for group, cfg in cfgs.items()
                                  for k, v in flags_of(type(cfg)(), group).items()}))


def variant_folder(out: Path, text: str) -> Path:
    return out / "variants" / text.replace("=", "-").replace(",", "_")


def plan(out: Path, cfgs) -> dict:
    """{folder or cache under out: its settings} for every stage this run makes or loads, up to
    --stop_after."""
    run, split, rec = cfgs["run"], cfgs["split"], records(cfgs, cfgs["split"])
    methods = run.methods.split(",")
    wanted_by = {"dpo_all": ["dpo_all"], "dpo_human": ["dpo_human"], "ppo_all": ["ppo_all"],
                 "mpo_dpo": ["mpo_dpo", "mpo"], "mpo": ["mpo"]}  # the methods a stage is part of
    steps = [("sft", out / "sft", rec["sft"]), ("rm", out / "rm", rec["rm"]),
             ("split", pairs_cache(out, split), rec["pairs"]),
             *[(name, out / name if set(wanted) & set(methods) else None, rec[name])
               for name, wanted in wanted_by.items()]]
    if run.reuse:  # made in --reuse's folder (check_reused)
        steps = [(name, None if name in ("sft", "rm", "split") else path, settings)
                 for name, path, settings in steps]
    if run.stop_after:
        steps = steps[:[name for name, *_ in steps].index(run.stop_after) + 1]
    else:
        for text, v in split_variants(run, split):
            vrec = records(cfgs, v)
            steps += [("", pairs_cache(out, v), vrec["pairs"]),
                      *[("", variant_folder(out, text) / name, vrec[name])
                        for name in ("mpo_dpo", "mpo")]]
    return {path: settings for _, path, settings in steps if path is not None}


def record_of(path: Path) -> Path:
    """Where the settings of a stage folder (settings.json inside) or a cache file (name.json) are
    kept."""
    return path / "settings.json" if path.suffix != ".pt" else path.with_suffix(".json")


def stale_records(out: Path, plan: dict, redo: bool, defaults: dict) -> list:
    """The folders and caches of `plan` ({path under out: the settings this run would make it with})
    that were made with other settings (`defaults`: default_records, the value of a flag a record
    lacks). Without `redo` the first is a one-line ValueError naming the stage and the changed
    flags. A stage's settings include those of the stages it starts from, so
    the stages after a changed one are stale too."""
    stale = []
    for path, settings in plan.items():
        name, record = str(path.relative_to(out)).removesuffix(".pt"), record_of(path)
        fix = (f"rerun with the same flags, use another --out, or add --redo to redo {name} and "
               "the stages after it")
        if record.exists():
            try:
                assert regular_file(record).stat().st_size < 1 << 20
                made = json.loads(record.read_text())
                assert isinstance(made, dict)
            except (OSError, ValueError, AssertionError):
                if not redo:
                    raise ValueError(f"{record}: not a settings record (a JSON object); "
                                     f"{fix}") from None
                made = None
        elif path.is_file() or any(path.glob("final.pt")) or any(path.glob("*_ckpt.pt")):
            made = None  # made by an older mpo.py, which recorded nothing
        else:
            continue
        now = json.loads(json.dumps(settings))
        # a flag missing from one side has its default there (a record made before it existed)
        changed = [k for k in dict.fromkeys([*now, *(made or {})])
                   if (made or {}).get(k, defaults.get(k, ...)) != now.get(k, defaults.get(k, ...))]
        if made is not None and not changed:
            continue
        if redo:
            stale.append(path)
            continue
        if made is None:
            raise ValueError(f"{name}: {path} has no record of the flags it was made with "
                             f"({record.name}); {fix}")

        def shown(values, k=changed[0]):
            if k not in values:  # a record made before the flag existed: its default
                return (f"--{k} {_flag_text(defaults[k])} (unrecorded: the default)"
                        if k in defaults else f"no --{k}")
            return f"--{k.replace('*', ' x --')} {_flag_text(values[k])}"
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise ValueError(f"{name}: made with {shown(made)}, this run has {shown(now)}{more}; {fix}")
    return stale


def _flag_text(value) -> str:
    return json.dumps(value) if isinstance(value, bool) or value == "" else str(value)


def remove_stale(paths: list):
    """--redo: delete these folders and caches (with their records), last first. Each is first
    renamed to a temporary name (atomic), so a crash leaves it whole or gone, never half deleted
    (remove_leftovers clears what is left)."""
    for path in reversed(paths):
        for p in [path] if path.is_dir() else [path, record_of(path)]:
            if p.exists():
                trash = p.with_name(f".{p.name}.{os.getpid()}.tmp")
                os.replace(p, trash)
                shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
        print(f"--redo: removed {path}, made with other settings")


# One run per --out, and every stage there made with this run's settings. A run holds out/.lock (an
# flock: the kernel drops it when the holder dies, so a killed run's lock never blocks) and the file
# names its pid; what a stage depends on is recorded beside it (record_of) and compared before a
# rerun changes anything.
_LOCKS = {}  # out/.lock -> its open file, for the folders this process holds


def lock_run_folder(out: Path):
    """Hold out/.lock until release_run_folders() or the end of the process; a second run on the
    same out gets a one-line ValueError naming the holder's pid. Under torchrun rank 0 holds it for
    all ranks."""
    path = out.resolve() / ".lock"
    if not is_main() or path in _LOCKS:
        return
    out.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read(32).strip() or "unknown"
            f.close()
            raise ValueError(f"{out}: in use by another run (pid {holder}, which holds "
                             f"{out / '.lock'}); wait for it to end, or use another "
                             "--out") from None
        if path.exists() and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
            break
        f.close()  # its holder removed it between our open and our flock: lock the new one
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    _LOCKS[path] = f


def release_run_folders():
    """Remove the lock files this process holds (still holding them, so no other run locks a removed
    one)."""
    for path, f in _LOCKS.items():
        path.unlink(missing_ok=True)
        f.close()
    _LOCKS.clear()


def remove_leftovers(out: Path):
    """Delete what runs killed mid-write left under out: lab.weights.atomic_write's
    .<name>.<pid>.tmp files and the folders remove_stale renamed. Call it with the lock held: then
    no other run writes there."""
    for path in sorted(out.rglob(".*.tmp"), key=lambda p: len(p.parts)):
        if re.fullmatch(r"\..+\.\d+\.tmp", path.name) and (path.is_symlink() or path.exists()):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def check_reused(folder: Path, cfgs: dict):
    """--reuse: the folder must hold a finished SFT model, RM and the pairs of --split's source,
    made with this run's flags but for the seeds (a study's seeds share them) and --reuse itself."""
    rec, split = records(cfgs, cfgs["split"]), cfgs["split"]
    ignored, defaults = {"seed", "sft.seed", "rm.seed", "reuse"}, default_records(cfgs)
    for name, path in (("sft", folder / "sft"), ("rm", folder / "rm"),
                       ("pairs", pairs_cache(folder, split))):
        done = path.exists() if name == "pairs" else (path / "final.pt").exists()
        record = record_of(path)
        if not done or not record.exists():
            raise ValueError(f"--reuse {folder}: no finished {name} ({path}); make it with "
                             f"--stop_after split --out {folder}")
        made, now = json.loads(regular_file(record).read_text()), json.loads(json.dumps(rec[name]))
        changed = [k for k in dict.fromkeys([*now, *made]) if k not in ignored
                   and made.get(k, defaults.get(k, ...)) != now.get(k, defaults.get(k, ...))]
        if changed:
            more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
            raise ValueError(f"--reuse {folder}: its {name} was made with other flags "
                             f"(--{changed[0]}{more})")


def check_checkpoints(paths, base):
    """Before anything under --out changes, every checkpoint this run would load must be one that
    loads (weights only, not torn; mmap: no weights read), and SFT's must fit this run's model
    (every stage has its shape; the others are checked again as they load)."""
    for path in paths:
        if path.suffix == ".pt":
            load_pairs(path, mmap=True)
            continue
        for file in [path / "final.pt", *sorted(path.glob("*_ckpt.pt"))]:
            if file.exists():
                state = load_checkpoint(file, mmap=True)
                if path.name == "sft":
                    check_shapes(base, state.get("model", state), file)


def open_run_folder(out: Path, cfgs: dict, base) -> dict:
    """Lock out, compare what is there with this run's settings, check every checkpoint this run
    would load, clear what killed runs left and (--redo) the stale stages, and write config.json
    in a new folder: only once all of that holds does anything under out change (rank 0 changes it;
    every rank learns how that went). A rerun's flags replace config.json only once it has finished
    (write_config): one that fails leaves the finished run's. Returns the plan: {folder or cache:
    its settings}."""
    planned, problem = plan(out, cfgs), None
    if is_main():
        try:
            lock_run_folder(out)
            stale = stale_records(out, planned, cfgs["run"].redo, default_records(cfgs))
            if cfgs["run"].reuse:
                check_reused(Path(cfgs["run"].reuse), cfgs)
            check_checkpoints([p for p in planned if p.exists() and p not in stale], base)
            remove_leftovers(out)
            remove_stale(stale)
            if not (out / "config.json").exists():
                write_config(out, cfgs)
        except ValueError as e:
            problem = str(e)
    if problem := gather(problem)[0]:
        raise ValueError(problem)
    return planned


def write_config(out: Path, cfgs: dict):
    """out/config.json: every flag of the run (lab/use.py rebuilds its models from it)."""
    config = {k: asdict(v) for k, v in cfgs.items()}
    atomic_save(json.dumps(config, indent=1).encode(), out / "config.json")


# The pairs cache: the resampled pairs, costly to make, made once per run folder and source.

def pairs_cache(out: Path, split) -> Path:
    """out/pairs_<source>.pt, or pairs_resample_per_row.pt, pairs_resample_x4.pt (4 pairs per
    prompt): the pairs of one source and sampling."""
    resample = split.source == "resample"
    per_row = "_per_row" if split.pairs_per_row and resample else ""
    several = f"_x{split.pairs_per_prompt}" if split.pairs_per_prompt > 1 and resample else ""
    return out / f"pairs_{split.source}{per_row}{several}.pt"


def save_pairs(cache: Path, rows, gaps, settings):
    """Write the pairs made for a split, their settings beside them in a .json of the same name
    (written first: a cache never lacks its record). The rows are stored as one flat tensor of token
    ids and their lengths: a list of lists would take minutes to read back through torch.load's
    weights-only unpickler."""
    lengths = torch.tensor([[len(x) for x in row] for row in rows], dtype=torch.long).view(-1, 3)
    atomic_save(json.dumps(settings, indent=1).encode(), record_of(cache))
    tokens = torch.tensor([t for row in rows for x in row for t in x], dtype=torch.long)
    atomic_save({"tokens": tokens, "lengths": lengths, "gaps": gaps}, cache)


def load_pairs(cache: Path, mmap=False):
    """(rows, gaps) of a pairs cache, checked to be one."""
    made = load_checkpoint(cache, mmap=mmap)
    tokens, lengths, gaps = (made.get(k) for k in ("tokens", "lengths", "gaps"))
    if not (all(map(torch.is_tensor, (tokens, lengths, gaps)))
            and lengths.dim() == 2 and lengths.size(1) == 3 and len(lengths) == len(gaps)
            and (lengths >= 0).all() and int(lengths.sum()) == tokens.numel()):
        raise ValueError(f"{cache}: not a pairs cache (tokens, lengths, gaps); delete it to "
                         "resample")
    parts = [x.tolist() for x in tokens.split(lengths.flatten().tolist())]
    return [tuple(parts[i:i + 3]) for i in range(0, len(parts), 3)], gaps
