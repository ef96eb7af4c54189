"""The pipeline around mpo.mpo: a run folder made ready (the task encoded, the base model, the plan,
the lock), the stages made once in it (lab/runs.py), the baselines and ablations the study compares
MPO with on the same pairs, and the report and results.json of the run.

    report = run_pipeline(parse_args(argv))   # lab/cli.py: one run folder, or the study's
"""
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import tiktoken
import torch

from data import DemoConfig, encode_dataset, get_tokenizer, load_task
from dpo import dpo
from lab.checkpoints import atomic_save
from lab.devices import pick_device
from lab.estimates import forward_flops, print_memory_estimate, print_plan, sampling_batch
from lab.flags import split_variants
from lab.readers import jsonl_file, load_gold_reward
from lab.report import write_report
from lab.results import CLAIMS, METRICS, study
from lab.rm import gold_checks, reward_model_shape, score_pairs
from lab.runs import (Stages, load_pairs, open_run_folder, pairs_cache, records, save_pairs,
                      variant_folder, write_config)
from lab.stats import sampling_variance
from lab.study import compute, compute_budget, dpo_flops, matched_budget, out_folder
from model import GPT, GPTConfig
from mpo import (distinct_prompts, easy_and_hard, gap_threshold, make_pairs, mpo, mpo_stages,
                 split_indices, trainable_copy)
from ppo import Models, ppo
from train import optimizer_steps


@dataclass
class RunConfig:
    dataset: str = "demo"          # demo | jsonl (your own files in --data_dir) | hh-rlhf | tldr
    preset: str = ""               # "demo": the demo's sizes and hyper-parameters on any dataset
    tokenizer: str = ""            # gpt2 | byte | demo; "" = the dataset's own (demo: demo, else
                                   # gpt2)
    gold_reward: str = ""          # FILE.py:FUNCTION, a (prompt, response) -> float scoring the
                                   # evaluation
    data_seed: int = 0             # the demo's generator and the shuffle of the data; --seed is
                                   # training's
    init: str = ""                 # Hugging Face GPT-2 folder or hub name (gpt2, gpt2-medium, ...);
                                   # "" = fresh GPT
    n_layer: int = 2               # shape of a fresh GPT (init "")
    n_head: int = 4
    n_embd: int = 128
    data_dir: str = ""             # jsonl: the task's folder; hh-rlhf / tldr: files laid out like
                                   # the cache
    template: str = "author"       # TL;DR prompt: "author" (Human/Assistant) or "tldr"
                                   # (SUBREDDIT/TITLE/POST)
    max_prompt_len: int = 512      # tokens (author: 512); HH drops whole oldest turns, TL;DR
                                   # shortens the post
    max_response_len: int = 256    # tokens, EOS included; also the sampling budget
    methods: str = "dpo_all,ppo_all,mpo"  # beside SFT: dpo_all, dpo_human (DPO on the human
                                          # pairs), ppo_all, mpo
    max_train: int = 0             # > 0: use only this many SFT examples and training pairs (smoke
                                   # tests)
    max_eval: int = 0              # > 0: use only this many held-out SFT examples and pairs in
                                   # stage evaluations
    variants: str = ""             # ablations, ';'-separated MPO variants of --split fields:
                                   # "delta=2;stage2_ref=sft"
    out: str = ""                  # run folder; default out/<dataset>
    stop_after: str = ""           # stop once this stage is done: sft | rm | split | dpo_all |
                                   # dpo_human | ppo_all | mpo_dpo | mpo
    redo: bool = False             # redo the stages whose recorded flags differ from this run's,
                                   # and those after them
    device: str = "auto"
    dtype: str = "auto"            # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 (CPU
                                   # too: fast with AMX)
    grad_checkpoint: bool = False  # activation checkpointing: less memory, ~1/3 more compute
                                   # (gpt2-large / xl)
    seed: int = 0
    seeds: int = 1                 # > 1: a study over this many training seeds from --seed on
                                   # (OUT/seed_<s>/)
    study: str = "full"            # --seeds N: "full" makes everything per seed; "shared": SFT,
                                   # the RM and the resampled pairs once (OUT/shared), the methods
                                   # per seed
    reuse: str = ""                # a run folder whose SFT model, RM and resampled pairs (made
                                   # with these flags, any seed) this run uses instead of its own
    budget: str = "data"           # "data": each stage's steps follow its data; "matched":
                                   # dpo_all's steps for all; "compute": dpo_all's FLOPs for all
    equivalence: float = 0.05      # claims are "equivalent" within this share of the room from
                                   # SFT to the best gold (tasks that know it)
    sweep: str = ""                # "0.5,1,2": the run at these multiples of --dpo.beta and
                                   # --ppo.kl_coef (frontier)


@dataclass
class Data:
    """A task encoded for this run: the token-id rows the stages train and are evaluated on."""
    tok: tiktoken.Encoding
    sft_train: list = field(default_factory=list)     # (prompt, response)
    sft_eval: list = field(default_factory=list)      # held out: SFT's evaluation
    pairs_train: list = field(default_factory=list)   # (prompt, chosen, rejected)
    pairs_eval: list = field(default_factory=list)    # held out: the RM's accuracy table
    prompts_eval: list = field(default_factory=list)  # held out: PPO's curve, the final evaluation
    subsets: list | None = None                       # each held-out prompt's subset (HH-RLHF)
    gold_reward: Callable | None = None               # the task's known (prompt, response) -> float
    gold_best: float | None = None                    # the best mean gold a policy can reach


def load_data(run: RunConfig, eval_prompts: int, demo: DemoConfig) -> Data:
    """The task --dataset names (and its gold reward, or --gold_reward's), encoded and cut to the
    run's lengths (data.encode_dataset); --max_train / --max_eval take the first rows only."""
    if run.dataset == "demo" and run.max_train:  # the demo's pairs come one after another from
        # one stream: the first --max_train of them are the same when no more are drawn (3x faster)
        demo = replace(demo, pairs_train=min(demo.pairs_train, run.max_train))
    task = load_task(run.dataset, run.data_seed, run.data_dir or None, run.template, demo)
    if run.gold_reward:  # tried once here, before anything under --out changes
        sample = (task.pairs_eval[0].prompt, task.pairs_eval[0].chosen)
        task.gold_reward = load_gold_reward(run.gold_reward, sample)
        task.gold_best = None  # a task's best gold is that of its own reward
    tok = get_tokenizer(run.tokenizer or task.tokenizer)

    def encode(items, name, kept=None):
        return encode_dataset(tok, items, run.max_prompt_len, run.max_response_len, name,
                              task.prompt_cut, kept)

    limit, eval_limit = run.max_train or None, run.max_eval or None
    data = Data(tok, encode(task.sft_train[:limit], "sft_train"),
                encode(task.sft_eval[:eval_limit], "sft_eval"),
                encode(task.pairs_train[:limit], "pairs_train"),
                encode(task.pairs_eval[:eval_limit], "pairs_eval"),
                gold_reward=task.gold_reward, gold_best=task.gold_best)
    kept = []  # stratified by subset where the task has them (lab.tasks.interleave)
    data.prompts_eval = encode(task.prompts_eval[:eval_prompts], "prompts_eval", kept)
    data.subsets = [task.eval_subsets[i] for i in kept] if task.eval_subsets else None
    for rows, what, stem in ((data.sft_train, "SFT example", "sft_train"),
                             (data.pairs_train, "preference pair", "train"),
                             (data.prompts_eval, "held-out prompt", "test")):
        if not rows:  # before any stage trains: name the file, not the stage that would fail
            where = f"--dataset {run.dataset}"
            if run.dataset == "jsonl":
                where = (jsonl_file(run.data_dir, stem, required=False)
                         or jsonl_file(run.data_dir, "train"))  # SFT rows from the pairs
            raise ValueError(f"{where}: no usable {what} once encoded (each empty, with chosen == "
                             "rejected, or cut to nothing by --max_prompt_len and "
                             "--max_response_len)")
    return data


def check_task(cfgs: dict):
    """A study's seeds each load the task in their own process: a user's task (or gold reward)
    is checked once here first, so that a bad line stops the study before --out changes."""
    run = cfgs["run"]
    if run.dataset == "jsonl" or run.gold_reward:
        load_data(run, cfgs["eval"].prompts, cfgs["demo"])


def fresh_config(run: RunConfig, vocab_size: int) -> GPTConfig:
    """The shape of a fresh GPT (no --init): --n_layer, --n_head, --n_embd, and positions for the
    longest prompt and response."""
    return GPTConfig(block_size=run.max_prompt_len + run.max_response_len, vocab_size=vocab_size,
                     n_layer=run.n_layer, n_head=run.n_head, n_embd=run.n_embd)


def base_model(run: RunConfig, vocab_size: int) -> GPT:
    """The model SFT (and by default the RM) starts from: --init's GPT-2, else a fresh GPT."""
    seq = run.max_prompt_len + run.max_response_len
    base = GPT.from_pretrained(run.init) if run.init else GPT(fresh_config(run, vocab_size))
    base.config.grad_checkpoint = run.grad_checkpoint  # every model built from base.config
    if seq > base.config.block_size:
        raise ValueError(f"--max_prompt_len {run.max_prompt_len} + --max_response_len "
                         f"{run.max_response_len} is more than the {base.config.block_size} "
                         f"positions of --init {run.init}")
    return base


def split_pairs(rows, gaps, split, folder: Path, tok):
    """mpo.easy_and_hard, recorded: split.jsonl (one line per pair: side, gap and the texts) for
    inspection, a warning when a side is empty, and the split's statistics. Returns (easy pairs,
    hard prompts, statistics)."""
    delta = gap_threshold(gaps, split)
    easy, hard = easy_and_hard(rows, gaps, split)
    easy_index, hard_index = split_indices(gaps, split)  # DPO's side and PPO's
    side = dict.fromkeys(easy_index.tolist(), "easy") | dict.fromkeys(hard_index.tolist(), "hard")
    lines = [json.dumps({"index": i, "side": side[i], "gap": g, "prompt": tok.decode(p),
                         "chosen": tok.decode(c), "rejected": tok.decode(r)})
             for i, (g, (p, c, r)) in enumerate(zip(gaps.tolist(), rows))]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save(("\n".join(lines) + "\n").encode(), folder / "split.jsonl")
    if not easy:
        print(f"warning: delta {delta:.3g} leaves no pairs for DPO and {len(hard)} prompts "
              "for PPO: MPO skips its DPO stage and runs PPO from the SFT model (the SFT model is "
              "also its reference)")
    if not hard:
        print(f"warning: delta {delta:.3g} leaves no prompts for PPO and {len(easy)} pairs "
              "for DPO: MPO runs DPO on them and skips its PPO stage (MPO is then the DPO model)")
    return easy, hard, {"source": split.source, "delta": delta, "pairs": len(rows),
                        "easy_pairs": len(easy), "easy_share": len(easy) / max(len(rows), 1),
                        "hard_prompts": len(hard)}


class Run(Stages):
    """The run folder as mpo.mpo sees it: each stage made once (Stages.stage; SFT and the RM loaded
    from --reuse's folder when given), the pairs made once per source (`pairs`), and what MPO is
    compared with: the baselines --methods asks for, trained on the same pairs with the same stage
    configs (same cost per sample; under --budget matched, dpo_all's optimizer steps for every
    method), and the ablations of --variants, which reuse MPO's own stages where theirs would be
    the same."""

    def __init__(self, out: Path, cfgs: dict, data, batch: int, flops: dict):
        run = cfgs["run"]
        super().__init__(out, records(cfgs, cfgs["split"]), run.stop_after)
        self.cfgs, self.data, self.batch, self.flops = cfgs, data, batch, flops
        self.methods = run.methods.split(",")
        self.steps = 0  # dpo_all's optimizer steps: the matched budget
        self.gaps, self.split_stats, self.variants, self.models = None, None, {}, {}
        self.easy = self.hard = None  # MPO's split, for the ablations that share its DPO stage
        self.reused = Stages(Path(run.reuse), {}) if run.reuse else None
        # the stage folders of each model, under out (compute): SFT and the RM in --reuse's folder
        shared = self.reused.out.resolve() if self.reused else Path()
        self.folders = {"sft": [str(shared / "sft")], "rm": [str(shared / "rm")],
                        "dpo_all": ["dpo_all"], "dpo_human": ["dpo_human"],
                        "ppo_all": ["ppo_all"], "mpo_dpo": ["mpo_dpo"], "mpo": ["mpo_dpo", "mpo"]}
        # the resampling each split's pairs cost (samples, tokens, FLOPs), by pairs cache name, and
        # the split each model is made from (none: ppo_all and dpo_human, which need no resampling)
        self.resampling, self.made_from = {}, dict.fromkeys(("dpo_all", "mpo_dpo", "mpo"),
                                                             cfgs["split"])
        self.target = self.response_len = 0.0  # --budget compute: dpo_all's FLOPs; SFT's lengths

    def stage(self, name: str, fn, *args, **kwargs):
        """Stages.stage; SFT and the RM come from --reuse's folder (checked by open_run_folder)."""
        if self.reused and name in ("sft", "rm"):
            model = self.reused.stage(name, fn, *args, **kwargs)
            self.metrics[name] = self.reused.metrics[name]
            self.stop_if_last(name)
        else:
            model = super().stage(name, fn, *args, **kwargs)
        self.models[name] = model
        return model

    def pairs(self, split, make, *args):
        """make(*args) -> (rows, gaps), the pairs to split, once per run folder and source
        (resampling is the costly part): cached in out/pairs_<source>.pt with its settings, or
        taken from --reuse's folder when it has them."""
        cache = pairs_cache(self.out, split)
        if self.reused and pairs_cache(self.reused.out, split).exists():
            cache = pairs_cache(self.reused.out, split)
        if cache.exists():
            rows, gaps = load_pairs(cache)
        else:
            rows, gaps = make(*args)
            save_pairs(cache, rows, gaps, records(self.cfgs, split)["pairs"])
        if split.source == "resample":
            tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in rows)  # decoded, then scored
            flops = (self.flops["policy"] + self.flops["rm"]) * tokens
            self.resampling[cache.name] = {"samples": 2 * len(rows), "tokens": tokens,
                                           "flops": flops}
        return rows, gaps

    def resampled(self, split) -> dict | None:
        """What making the pairs of `split` cost (None: no resampling, or no split)."""
        return split and self.resampling.get(pairs_cache(self.out, split).name)

    def budget(self, dpo_data, ppo_data, split="mpo") -> dict:
        """The configs of a method with DPO and PPO on these data, made from the pairs of `split`
        ("mpo": --split's; None: no resampled pairs): as given under --budget data, cut to
        dpo_all's optimizer steps under --budget matched (lab.study.matched_budget), to dpo_all's
        FLOPs, its resampling included, under --budget compute (lab.study.compute_budget)."""
        budget = self.cfgs["run"].budget
        if budget == "matched":
            return matched_budget(self.cfgs, self.steps, bool(dpo_data), bool(ppo_data))
        if budget == "compute":
            spent = self.resampled(self.cfgs["split"] if split == "mpo" else split) or {}
            return compute_budget(self.cfgs, self.target, self.flops, dpo_data, ppo_data,
                                  spent.get("flops", 0), self.response_len)
        return self.cfgs

    def wants(self, method: str) -> bool:
        """Whether --methods asks for `method`; if not, a --stop_after naming it stops here."""
        if method not in self.methods:
            self.stop_if_last(method, skipped=True)
        return method in self.methods

    def baselines(self, sft_model, rm, rows, gaps) -> dict:
        """Record the split (split.jsonl, its statistics, the RM and the split against the task's
        gold reward), then train the baselines --methods asks for: dpo_all (DPO on every pair),
        dpo_human (the paper's vanilla DPO: as many of the dataset's own pairs), ppo_all (PPO on
        every prompt) and mpo_dpo (MPO's first stage alone, the same stage as mpo.mpo_stages')."""
        cfgs, data, run = self.cfgs, self.data, self.cfgs["run"]
        easy, hard, self.split_stats = split_pairs(rows, gaps, cfgs["split"], self.out, data.tok)
        self.gaps, self.easy, self.hard = gaps, easy, hard
        if data.gold_reward:  # how far the RM and its split can be trusted, measured against gold
            chosen, rejected = score_pairs(rm, data.pairs_eval, self.batch,
                                           pick_device(run.device), run.dtype)
            self.metrics["rm"]["gold"] = gold_checks(data, chosen - rejected, rows, gaps,
                                                     self.split_stats["delta"])
        self.stop_if_last("split")
        self.steps = optimizer_steps(cfgs["dpo"], len(rows))
        self.response_len = sum(len(c) + len(r) for _, c, r in rows) / (2 * len(rows))
        ref, per_step = dpo_flops(cfgs["dpo"], rows, self.flops["policy"])
        resampling = (self.resampled(cfgs["split"]) or {}).get("flops", 0)
        self.target = resampling + ref + self.steps * per_step
        models = {}
        for name, pairs in (("dpo_all", rows), ("dpo_human", data.pairs_train[:len(rows)])):
            if self.wants(name):
                cfg = self.budget(pairs, [], "mpo" if name == "dpo_all" else None)["dpo"]
                models[name] = self.stage(name, dpo, trainable_copy(sft_model), sft_model, pairs,
                                          cfg, stage=name)
        if self.wants("ppo_all"):
            models_all = Models(trainable_copy(sft_model), sft_model, rm, trainable_copy(rm))
            prompts = distinct_prompts(rows)
            models["ppo_all"] = self.stage(
                "ppo_all", ppo, models_all, prompts, data.tok,
                self.budget([], prompts, None)["ppo"], eval_prompts=data.prompts_eval,
                gold_reward=data.gold_reward, stage="ppo_all")
        if "mpo_dpo" in self.methods and easy:
            models["mpo_dpo"] = self.stage("mpo_dpo", dpo, trainable_copy(sft_model), sft_model,
                                           easy, self.budget(easy, hard)["dpo"], stage="mpo_dpo")
        elif "mpo" not in self.methods:  # with mpo, mpo.mpo_stages runs or skips it
            self.stop_if_last("mpo_dpo", skipped=True)
        return models

    def ablations(self, sft_model, rm) -> dict:
        """mpo[variant] for each of --variants: MPO's two stages again with other --split fields, on
        the same SFT model and RM (and pairs, when the source is the same), in
        out/variants/<variant>/; a variant whose DPO stage would be MPO's own (the same easy pairs
        and budget: stage2_ref=sft, ppo_prompts=all) starts its PPO from MPO's DPO model."""
        if self.stop_after:  # not reached: the stage it names was skipped (mpo, no hard prompts)
            self.stop_if_last(self.stop_after, skipped=True)
        cfgs, data, run, models = self.cfgs, self.data, self.cfgs["run"], {}
        for text, v in split_variants(run, cfgs["split"]):
            folder, name = variant_folder(self.out, text), f"mpo[{text}]"
            rows, gaps = self.pairs(v, make_pairs, sft_model, rm, data.pairs_train, v, run,
                                    data.tok.eot_token)
            v_easy, v_hard, self.variants[name] = split_pairs(rows, gaps, v, folder, data.tok)
            self.made_from[name] = v
            v_cfgs = {**self.budget(v_easy, v_hard, v), "split": v}
            same = {}  # MPO's DPO model, where this variant's DPO stage would be the same one
            if ("mpo_dpo" in self.models and v_easy == self.easy
                    and v_cfgs["dpo"] == self.budget(self.easy, self.hard)["dpo"]
                    and records(cfgs, v)["mpo_dpo"] == self.records["mpo_dpo"]):
                same = {"mpo_dpo": self.models["mpo_dpo"]}
            self.folders[name] = [str(folder.relative_to(self.out) / "mpo")]
            self.folders[name][:0] = ["mpo_dpo" if same else
                                      str(folder.relative_to(self.out) / "mpo_dpo")]
            stages = Stages(folder, records(cfgs, v), run.stop_after, same)
            models[name] = mpo_stages(stages, v_cfgs, data, sft_model, rm, v_easy, v_hard)
        return models


def run_pipeline(cfgs: dict) -> Path:
    """The whole run under --out: mpo.mpo with its baselines and ablations, then report.md and
    results.json (a study of one seed)."""
    run, split = cfgs["run"], cfgs["split"]
    out = out_folder(run)
    device = pick_device(run.device)
    torch.manual_seed(run.seed)
    data = load_data(run, cfgs["eval"].prompts, cfgs["demo"])
    base = base_model(run, data.tok.n_vocab)
    # Batches sized for the device (0); the records keep the flag as given, like --device.
    batch = sampling_batch(base.config, run.max_prompt_len + run.max_response_len, device)
    cfgs["eval"] = replace(cfgs["eval"], batch_size=cfgs["eval"].batch_size or batch)
    print_memory_estimate(base.config, cfgs, device)
    # Only now, with the data and the model checked, is --out locked and compared with the flags.
    planned = open_run_folder(out, cfgs, base)
    print_plan({**cfgs, "split": replace(split, batch_size=split.batch_size or batch)}, base,
               data.sft_train, data.pairs_train, device)
    flops = {"policy": forward_flops(base.config, base.config.vocab_size),  # a token's forward
             "rm": forward_flops(reward_model_shape(cfgs["rm"], base.config), 1)}
    stages = Run(out, cfgs, data, batch, flops)
    results, samples = mpo(cfgs, data, base, stages)
    made = {str(path.relative_to(out)).removesuffix(".pt"): settings
            for path, settings in planned.items()
            if (path / "final.pt").exists() or path.is_file()}  # the stages this run ran or loaded
    rm_metrics = stages.metrics["rm"]
    report = write_report(out, cfgs, results, samples, stages.gaps, stages.split_stats,
                          stages.variants, rm_metrics, made, data.gold_best)
    record = {"seed": run.seed, "gap_buckets": rm_metrics.get("eval/accuracy_by_gap_quartile", {}),
              "methods": {name: {**{k: r[k] for k in METRICS if k in r},
                                 "compute": compute(out, stages.folders[name], flops,
                                                    stages.resampled(stages.made_from.get(name)))}
                          for name, r in results.items()},
              "common_compute": {name: compute(out, stages.folders[name], flops)
                                 for name in ("sft", "rm")},
              "evaluation_var": {claim: sampling_variance(results[a]["per_sample"],
                                                          results[b]["per_sample"])
                                 for claim, (a, b) in CLAIMS.items()
                                 if a in results and b in results}}
    if "gold" in rm_metrics:  # the study's table of each seed's RM and split against gold
        record["gold_checks"] = {**rm_metrics["gold"],
                                 "easy_share": stages.split_stats["easy_share"]}
    if data.gold_best is not None:
        record["gold_best"] = data.gold_best
    record["samples"] = samples  # the study's report shows its first seed's
    results_json = study([record], run.equivalence)  # a study of one seed
    atomic_save(json.dumps(results_json, indent=1).encode(), out / "results.json")
    write_config(out, cfgs)  # the flags of the run that made this report
    return report
