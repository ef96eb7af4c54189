"""Mixed Preference Optimization (Gou & Nguyen 2024): SFT, a reward model, then DPO on the pairs the
reward model finds easy and PPO on the prompts it finds hard.

This file holds the method and the entry point, in pipeline order: the SFT stage, the reward-model stage,
then (below them) scoring and the reward-gap split, the two-stage pipeline, evaluation and the CLI;
report.py writes report.md and the plots.
Every stage takes encoded rows from data.encode_dataset and runs through train.train.

    from mpo import SFTConfig, sft, RMConfig, train_reward_model
    policy, metrics = sft(gpt, encoded_examples, SFTConfig(), "out/run")
    rm, metrics = train_reward_model(ScalarModel.from_gpt(base), encoded_pairs, RMConfig(), "out/run")

Run: `python mpo.py --help`; rerunning with the same --out resumes (finished stages load, an unfinished
one continues from its last checkpoint); `torchrun --nproc_per_node=N mpo.py ...` runs data-parallel.
Tests: python -m pytest -q tests/test_stages.py tests/test_robust.py tests/test_ddp.py
"""
import argparse
import contextlib
import copy
import datetime
import inspect
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from data import (TOKENIZERS, DemoConfig, collate_pairs, collate_prompts, collate_sft, encode_dataset, get_tokenizer,
                  load_gold_reward, load_task)
from dpo import DPOConfig, dpo, response_logps
from model import GPT, GPTConfig, ScalarModel, regular_file, response_mask
from ppo import Models, PPOConfig, ppo
from report import METRICS, seed_record, study, write_report, write_study, write_sweep
from train import (AUTOCAST_DTYPE, AUTOCAST_DTYPES, TrainConfig, atomic_save, autocast, check_shapes, gather, is_main,
                   load_checkpoint, load_weights, lock_run_folder, memory_estimate, pick_device, progress, rank,
                   optimizer_steps, record_of, release_run_folders, remove_leftovers, remove_stale, sampling_batch, set_dtype,
                   setup_distributed, shard, stale_records, time_probe, to_device, train, unshard, world_size)


@dataclass
class SFTConfig(TrainConfig):
    # The author's SFT script: lr 5e-5, 500 warm-up steps, cosine, no weight decay, 1 epoch.
    lr: float = 5e-5
    warmup_steps: int = 500
    batch_size: int = 8
    grad_accum: int = 4
    epochs: float = 1.0


def sft_loss(model, batch):
    """Mean next-token cross-entropy over response tokens + EOS; prompt and pad positions are masked.
    The summed log-probs come from dpo.response_logps (the LM head only on response positions, no
    forward on the last one), whose log-prob kernel keeps fewer logits-sized buffers than F.cross_entropy."""
    return -response_logps(model, batch).sum() / batch["loss_mask"].sum(), {}


def sft(model, examples, cfg: SFTConfig, out_dir, eval_examples=None):
    """Supervised fine-tuning on (prompt_ids, response_ids); returns (model, metrics) with the train and
    eval loss and perplexity (exp of the mean token loss)."""
    metrics = train(model, sft_loss, examples, eval_examples, cfg, out_dir, "sft", collate_sft)
    for split in ("train", "eval"):
        if f"{split}/loss" in metrics:
            metrics[f"{split}/ppl"] = math.exp(metrics[f"{split}/loss"])
    return model, metrics


@dataclass
class RMConfig(TrainConfig):
    # The author's RM script: lr 5e-6 (DeepSpeed-Chat's small-model example: 5e-5); weight decay 0.1,
    # cosine, 1 epoch (RMs overfit preference data fast). Effective batch 64 = DS-Chat's 8 per GPU x 8 GPUs.
    lr: float = 5e-6
    batch_size: int = 8
    grad_accum: int = 8
    epochs: float = 1.0
    weight_decay: float = 0.1
    margin: float = 0.0        # Bradley-Terry margin: chosen must win by this much (Llama 2)
    center_coef: float = 0.0   # reward centring, coef * (r_c + r_r)^2 (Eisenstein et al. 2023)
    init: str = "base"         # the pipeline starts the RM from "base" (author) or "sft"
    n_layer: int = 0           # the RM's own shape, trained from scratch; 0 = the policy's (and init above)
    n_head: int = 0
    n_embd: int = 0
    normalize: bool = False    # after training: gain and bias so SFT responses score mean 0, std 1 (N+ detail 11)


def last_token_scores(rm, batch):
    """RM score of every row of a right-padded batch, read at its last real token (the EOS). No
    attention mask: causal attention already hides the pads that follow (the fast SDPA path)."""
    values = rm(batch["tokens"])
    return values.gather(1, (batch["lengths"] - 1)[:, None]).squeeze(1).float()


def bradley_terry_loss(chosen, rejected, margin=0.0, center_coef=0.0):
    """Per-pair loss -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2, shape (B,)."""
    return -F.logsigmoid(chosen - rejected - margin) + center_coef * (chosen + rejected) ** 2


def reward_model_loss(model, batch, cfg: RMConfig):
    """The reward-model stage's loss_fn: mean Bradley-Terry loss over the pairs of a collate_pairs batch."""
    scores = last_token_scores(model, batch)
    chosen, rejected = scores.chunk(2)  # collate_pairs: chosen rows first, then rejected
    loss = bradley_terry_loss(chosen, rejected, cfg.margin, cfg.center_coef).mean()
    return loss, {"accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).detach().mean(),
                  "chosen": chosen.detach().mean(), "rejected": rejected.detach().mean()}


GAP_BUCKETS = ((0, 1, "[0,1)"), (1, 2, "[1,2)"), (2, 3, "[2,3)"), (3, math.inf, ">=3"))


def accuracy_by_gap(gaps, by=None) -> dict:
    """Share of pairs with gap > 0 (chosen scored above rejected), bucketed by |by| (default |gaps|):
    the paper's table of RM accuracy against the RM score gap (61 / 81 / 90 / 97 % on HH-RLHF).
    Returns {bucket: {"accuracy": share or None when empty, "pairs": count}}."""
    gaps = torch.as_tensor(gaps, dtype=torch.float)
    size = gaps.abs() if by is None else torch.as_tensor(by, dtype=torch.float).abs()
    out = {}
    for low, high, name in GAP_BUCKETS:
        inside = (size >= low) & (size < high)
        n = int(inside.sum())
        out[name] = {"accuracy": int((gaps[inside] > 0).sum()) / n if n else None, "pairs": n}
    return out


def accuracy_by_gap_quartile(gaps) -> dict:
    """accuracy_by_gap over the quartiles of |gap| by rank (four equal shares of the pairs, whatever the RM's
    scale): {"q1".."q4": {"accuracy", "pairs", "low", "high"}}, low / high the bucket's |gap| range. The
    study's claim (a) compares q4 with q1."""
    gaps = torch.as_tensor(gaps, dtype=torch.float)
    order = gaps.abs().argsort()
    out = {}
    for i, part in enumerate(order.tensor_split(4)):
        if len(part):
            size = gaps[part].abs()
            out[f"q{i + 1}"] = {"accuracy": float((gaps[part] > 0).float().mean()), "pairs": len(part),
                                "low": float(size.min()), "high": float(size.max())}
    return out


@torch.no_grad()
def batch_outputs(fn, model, rows, collate, batch_size, device, name="scoring") -> list:
    """fn(model, batch) over encoded rows, batch by batch, in eval mode: one CPU tensor per batch. Under
    torchrun each rank takes a shard of the rows and every rank gets all the outputs, in order. `name`
    labels the progress lines of a long pass."""
    model.to(device).eval()
    outputs, mine = [], shard(rows)
    for i in progress(range(0, len(mine), batch_size), name):
        with autocast(device):
            outputs.append(fn(model, to_device(collate(mine[i:i + batch_size]), device)).float().cpu())
    return unshard(outputs)


def batch_scores(rm, rows, collate, batch_size, device, name="rm scores") -> list:
    """RM scores of encoded rows, one tensor per batch (for pairs: the chosen rows, then the rejected)."""
    return batch_outputs(last_token_scores, rm, rows, collate, batch_size, device, name)


def score_pairs(rm, pairs, batch_size, device):
    """(chosen_scores, rejected_scores), each (N,), of encoded (prompt, chosen, rejected) triples."""
    chosen, rejected = zip(*(s.chunk(2) for s in batch_scores(rm, pairs, collate_pairs, batch_size, device)))
    return torch.cat(chosen), torch.cat(rejected)


def train_reward_model(rm, pairs, cfg: RMConfig, out_dir, eval_pairs=None, reference_examples=None):
    """Train a ScalarModel on encoded pairs with the Bradley-Terry loss; returns (rm, metrics). With
    `reference_examples` (encoded SFT (prompt, response) rows), the head's offset and gain are then set
    so they score mean 0 and standard deviation 1 (N+ reward normalisation): a gap is then in units of
    the spread of SFT responses, a scale on which a threshold such as delta = 1 means the same on any RM.
    The spread is measured among responses to the same prompt (pooled over the prompts that have several)
    when there are such prompts: Bradley-Terry leaves each prompt's score level free, and those levels
    would otherwise swell the std that a gap between two responses to one prompt is divided by."""
    def loss_fn(model, batch):
        return reward_model_loss(model, batch, cfg)

    metrics = train(rm, loss_fn, pairs, eval_pairs, cfg, out_dir, "rm", collate_pairs, key_metric="accuracy")
    device = pick_device(cfg.device)
    if reference_examples:
        rm.offset.zero_(), rm.gain.fill_(1.0)  # measure the raw head output
        raw = torch.cat(batch_scores(rm, reference_examples, collate_sft, cfg.batch_size, device))
        ids = {}
        group = torch.tensor([ids.setdefault(tuple(p), len(ids)) for p, _ in reference_examples])  # prompt index
        counts = torch.bincount(group).float()
        within = raw - (torch.zeros(len(ids)).index_add(0, group, raw) / counts)[group]  # minus its prompt's mean
        dof = int((counts - 1).sum())
        std = (within.square().sum() / dof).sqrt() if dof > 0 else raw.std()
        rm.offset.fill_(raw.mean()), rm.gain.fill_(1 / std.clamp_min(1e-6))
        metrics |= {"offset": float(rm.offset), "gain": float(rm.gain), "gain_from": "within prompts" if dof > 0
                    else "all responses"}
    if eval_pairs:
        chosen, rejected = score_pairs(rm, eval_pairs, cfg.batch_size, device)
        metrics["eval/accuracy_by_gap"] = accuracy_by_gap(chosen - rejected)
        metrics["eval/accuracy_by_gap_quartile"] = accuracy_by_gap_quartile(chosen - rejected)
    return rm, metrics


# ---------------------------------------------------------------------------------------------------
# Sampling, scoring and the reward-gap split

@torch.no_grad()
def sample_responses(model, prompts, eos_id, max_new_tokens, batch_size, device, seed=0, temperature=1.0,
                     top_k=None, top_p=None, name="sampling") -> list:
    """One sampled response (token ids, EOS included when reached) per encoded prompt. Under torchrun
    each rank samples for a shard of the prompts (its own seed) and every rank gets all the responses."""
    model.to(device).eval()
    g = torch.Generator(device).manual_seed(seed + rank() * 100003)
    out, mine = [], shard(prompts)
    for i in progress(range(0, len(mine), batch_size), name):
        batch = to_device(collate_prompts(mine[i:i + batch_size]), device)
        T = batch["tokens"].size(1)
        with autocast(device):
            new = model.generate(batch["tokens"], max_new_tokens, temperature, top_k, top_p, eos_id,
                                 batch["attention_mask"], generator=g)[:, T:]
        keep = response_mask(new, eos_id)
        out += [row[m].tolist() for row, m in zip(new.cpu(), keep.cpu())]
    return unshard(out)


def split_by_reward_gap(gaps, delta):
    """MPO's data selection: pairs with |gap| >= delta are easy (reliable labels: DPO), the rest are hard
    (PPO, which needs only their prompts). Returns (easy_index, hard_index) as LongTensors."""
    size = torch.as_tensor(gaps, dtype=torch.float).abs()
    return (size >= delta).nonzero().flatten(), (size < delta).nonzero().flatten()


def distinct_prompts(rows) -> list:
    """The prompts of encoded rows, each once, in order of first appearance."""
    return [list(p) for p in dict.fromkeys(tuple(row[0]) for row in rows)]


def make_pairs(source, sft_model, rm, pairs, eos_id, max_new_tokens, batch_size, device, seed, per_row=True):
    """The pairs to split, as encoded (prompt, chosen, rejected), and their gaps r(chosen) - r(rejected).
    "resample" (author's code): two SFT samples per training row (per distinct prompt unless `per_row`)
    at temperature 1, top-k 50, top-p 0.9, the higher-scored one chosen, so every gap is >= 0. "human":
    the dataset's own pairs; a negative gap means the RM disagrees with the label, and |gap| decides
    the side all the same."""
    if source == "human":
        chosen, rejected = score_pairs(rm, pairs, batch_size, device)
        return pairs, chosen - rejected
    if source != "resample":
        raise ValueError(f"--split.source must be 'resample' or 'human', got {source!r}")
    twice = [list(p) for p in ([row[0] for row in pairs] if per_row else distinct_prompts(pairs)) for _ in range(2)]
    responses = sample_responses(sft_model, twice, eos_id, max_new_tokens, batch_size, device, seed, 1.0, 50, 0.9,
                                 "resample: SFT samples")
    scores = torch.cat(batch_scores(rm, list(zip(twice, responses)), collate_sft, batch_size, device,
                                    "resample: RM scores"))
    rows, gaps = [], []
    for i in range(0, len(twice), 2):
        first = bool(scores[i] >= scores[i + 1])
        rows.append((twice[i], responses[i if first else i + 1], responses[i + 1 if first else i]))
        gaps.append(float((scores[i] - scores[i + 1]).abs()))
    return rows, torch.tensor(gaps)


def pairs_cache(out: Path, split) -> Path:
    """out/pairs_<source>.pt, or pairs_resample_per_row.pt: the pairs of one source and sampling."""
    return out / f"pairs_{split.source}{'_per_row' if split.pairs_per_row and split.source == 'resample' else ''}.pt"


def cached_pairs(out: Path, split, sft_model, rm, pairs, tok, run, device, settings):
    """make_pairs once per run and source (pairs_cache; resampling is the costly part), its settings
    beside it in a .json of the same name (written first: a cache never lacks its record). The rows are
    stored as one flat tensor of token ids and their lengths: a list of lists would take minutes to
    read back through torch.load's weights-only unpickler."""
    cache = pairs_cache(out, split)
    if cache.exists():
        return unpack_pairs(cache, load_checkpoint(cache))
    rows, gaps = make_pairs(split.source, sft_model, rm, pairs, tok.eot_token, run.max_response_len, split.batch_size,
                            device, run.seed, split.pairs_per_row)
    lengths = torch.tensor([[len(x) for x in row] for row in rows], dtype=torch.long).view(-1, 3)
    atomic_save(json.dumps(settings, indent=1).encode(), record_of(cache))
    atomic_save({"tokens": torch.tensor([t for row in rows for x in row for t in x], dtype=torch.long),
                 "lengths": lengths, "gaps": gaps}, cache)
    return rows, gaps


def unpack_pairs(cache: Path, made: dict):
    """(rows, gaps) of a loaded pairs cache, checked to be one."""
    tokens, lengths, gaps = (made.get(k) for k in ("tokens", "lengths", "gaps"))
    if not (all(map(torch.is_tensor, (tokens, lengths, gaps))) and lengths.dim() == 2 and lengths.size(1) == 3
            and len(lengths) == len(gaps) and (lengths >= 0).all() and int(lengths.sum()) == tokens.numel()):
        raise ValueError(f"{cache}: not a pairs cache (tokens, lengths, gaps); delete it to resample")
    parts = [x.tolist() for x in tokens.split(lengths.flatten().tolist())]
    return [tuple(parts[i:i + 3]) for i in range(0, len(parts), 3)], gaps


def split_pairs(rows, gaps, split, folder: Path, tok):
    """Split at delta (or at a quantile of |gap|), write split.jsonl (one line per pair: side, gap and the
    texts) for inspection, and return (easy pairs, hard prompts, statistics)."""
    delta = float(torch.quantile(gaps.abs(), split.quantile)) if split.quantile > 0 else split.delta
    easy, hard = split_by_reward_gap(gaps, delta)
    side = dict.fromkeys(easy.tolist(), "easy") | dict.fromkeys(hard.tolist(), "hard")
    lines = [json.dumps({"index": i, "side": side[i], "gap": g, "prompt": tok.decode(p), "chosen": tok.decode(c),
                         "rejected": tok.decode(r)}) for i, (g, (p, c, r)) in enumerate(zip(gaps.tolist(), rows))]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save(("\n".join(lines) + "\n").encode(), folder / "split.jsonl")
    if split.order == "hard_first":  # ablation: DPO on the hard pairs, PPO on the easy prompts
        easy, hard = hard, easy
    easy_pairs, hard_prompts = [rows[i] for i in easy], distinct_prompts([rows[i] for i in hard])
    if not easy_pairs:
        print(f"warning: delta {delta:.3g} leaves no pairs for DPO and {len(hard_prompts)} prompts for PPO: "
              "MPO skips its DPO stage and runs PPO from the SFT model (the SFT model is also its reference)")
    if not hard_prompts:
        print(f"warning: delta {delta:.3g} leaves no prompts for PPO and {len(easy_pairs)} pairs for DPO: "
              "MPO runs DPO on them and skips its PPO stage (MPO is then the DPO model)")
    return easy_pairs, hard_prompts, {"source": split.source, "delta": delta, "pairs": len(rows),
                                      "easy_pairs": len(easy_pairs), "hard_prompts": len(hard_prompts)}


def gold_gaps(gold_reward, tok, rows) -> torch.Tensor:
    """gold(prompt, chosen) - gold(prompt, rejected) of encoded (prompt, chosen, rejected) rows."""
    text = lambda ids: tok.decode([t for t in ids if t != tok.eot_token])  # noqa: E731
    return torch.tensor([gold_reward(text(p), text(c)) - gold_reward(text(p), text(r)) for p, c, r in rows])


def agreement(gaps, gold) -> float | None:
    """Share of pairs ranked as gold ranks them (gold ties count half); None for no pairs."""
    return float(((gaps * gold > 0).float() + 0.5 * (gold == 0).float()).mean()) if len(gold) else None


def gold_checks(gold_reward, tok, eval_pairs, eval_gaps, rows, gaps, delta) -> dict:
    """The RM and the split against a task's gold reward. On held-out pairs: the RM's accuracy against the
    labels beside the label ceiling (the labels' own agreement with gold: a perfect RM would score it),
    overall and per |RM gap| bucket. On the pairs split (the resampled ones by default): the RM's
    agreement with gold on each side and the Pearson correlation of the RM gap with the gold gap."""
    eval_gaps, gold = torch.as_tensor(eval_gaps), gold_gaps(gold_reward, tok, eval_pairs)
    ones = torch.ones_like(gold)
    by_gap = {}
    for low, high, name in GAP_BUCKETS:
        inside = (eval_gaps.abs() >= low) & (eval_gaps.abs() < high)
        by_gap[name] = {"accuracy": agreement(eval_gaps[inside], ones[inside]),
                        "ceiling": agreement(ones[inside], gold[inside]),
                        "rm_vs_gold": agreement(eval_gaps[inside], gold[inside]), "pairs": int(inside.sum())}
    split_gold = gold_gaps(gold_reward, tok, rows)
    easy = gaps.abs() >= delta
    pearson = float(torch.corrcoef(torch.stack([gaps.float(), split_gold]))[0, 1]) if len(gaps) > 1 else None
    return {"accuracy": agreement(eval_gaps, ones), "ceiling": agreement(ones, gold), "by_gap": by_gap,
            "easy_vs_gold": agreement(gaps[easy], split_gold[easy]),
            "hard_vs_gold": agreement(gaps[~easy], split_gold[~easy]),
            "pearson": pearson}


# ---------------------------------------------------------------------------------------------------
# Evaluation: every model against the SFT model on held-out prompts

@dataclass
class EvalConfig:
    prompts: int = 500        # held-out prompts (paper: RM score of one sampled response per test prompt)
    samples: int = 1          # responses per prompt: more of them shrink the standard errors
    temperature: float = 1.0  # 1.0 makes the KL estimate below unbiased
    batch_size: int = 0       # sampling and scoring batch; 0 = 32 on a CPU, sized from free memory on a GPU
    tie: float = 0.0          # |RM score difference| <= tie counts as a tie
    show: int = 3             # sample responses per model in the report


def logps_of(model, rows, batch_size, device):
    """Summed response log-probs (N,) of encoded (prompt, response) rows under `model`."""
    return torch.cat(batch_outputs(response_logps, model, rows, collate_sft, batch_size, device, "log-probs"))


def evaluate(models: dict, rm, prompts, gold_reward, tok, run, cfg: EvalConfig, device, subsets=None) -> tuple:
    """cfg.samples responses per encoded held-out prompt from every model (same seed). Per model: mean RM
    score; win / tie / lose against the SFT model's response to the same prompt (same sample index), by
    RM score; KL to the SFT model (mean of log pi(y) - log pi_sft(y) over the model's own samples: the k1
    estimator); mean length in tokens; the gold reward when the task has one. With `subsets` (one name
    per prompt), the RM score, gold and win rate also per subset under "subsets". Returns (results,
    samples) keyed by model name."""
    prompts = [p for p in prompts for _ in range(cfg.samples)]
    prompt_texts = [tok.decode(p) for p in prompts]  # what the models saw, after truncation
    results, samples, scores = {}, {}, {}
    for name, model in models.items():
        responses = sample_responses(model, prompts, tok.eot_token, run.max_response_len, cfg.batch_size, device,
                                     run.seed, cfg.temperature, name=f"evaluate {name}: sampling")
        rows = list(zip(prompts, responses))
        scores[name] = torch.cat(batch_scores(rm, rows, collate_sft, cfg.batch_size, device, f"evaluate {name}: RM"))
        kl = logps_of(model, rows, cfg.batch_size, device) - logps_of(models["sft"], rows, cfg.batch_size, device)
        texts = [tok.decode([t for t in r if t != tok.eot_token]) for r in responses]
        results[name] = {}
        if gold_reward:  # standard error over prompts: a prompt's samples are not independent of each other
            gold = torch.tensor([gold_reward(p, t) for p, t in zip(prompt_texts, texts)])
            per_prompt = gold.view(-1, cfg.samples).mean(1)
            results[name] = {"gold": float(gold.mean()), "gold_se": float(per_prompt.std() / len(per_prompt) ** 0.5)}
        results[name] |= {"rm_score": float(scores[name].mean()), "kl_to_sft": float(kl.mean()),
                          "length": sum(map(len, responses)) / len(responses)}
        samples[name] = list(zip(prompt_texts, texts))[::cfg.samples][:cfg.show]  # one per prompt
    groups = {"all": torch.ones(len(prompts), dtype=torch.bool)}
    if subsets:
        per_sample = [s for s in subsets for _ in range(cfg.samples)]
        groups |= {s: torch.tensor([x == s for x in per_sample]) for s in dict.fromkeys(subsets)}
    for name, r in results.items():
        for group, inside in groups.items():
            diff = scores[name][inside] - scores["sft"][inside]
            win, tie, lose = (float(x.float().mean()) for x in (diff > cfg.tie, diff.abs() <= cfg.tie, diff < -cfg.tie))
            if group == "all":
                r |= {"win": win, "tie": tie, "lose": lose, "win_rate": win + tie / 2}
            else:
                r.setdefault("subsets", {})[group] = {"prompts": int(inside.sum()) // cfg.samples,
                                                      "rm_score": float(scores[name][inside].mean()),
                                                      "win_rate": win + tie / 2}
    return results, samples


# ---------------------------------------------------------------------------------------------------
# The pipeline: SFT -> RM -> pairs -> split -> DPO on easy pairs -> PPO on hard prompts, with baselines

@dataclass
class RunConfig:
    dataset: str = "demo"          # demo | jsonl (your own files in --data_dir) | hh-rlhf | tldr
    preset: str = ""               # "demo": the demo's sizes and hyper-parameters (below) on any dataset
    tokenizer: str = ""            # gpt2 | byte | demo; "" = the dataset's own (demo: demo, others: gpt2)
    gold_reward: str = ""          # FILE.py:FUNCTION, a (prompt, response) -> float scoring the evaluation
    data_seed: int = 0             # the demo's generator and the shuffle of the data; --seed is training's
    init: str = ""                 # Hugging Face GPT-2 folder or hub name (gpt2, gpt2-medium, ...); "" = fresh GPT
    n_layer: int = 2               # shape of a fresh GPT (init "")
    n_head: int = 4
    n_embd: int = 128
    data_dir: str = ""             # jsonl: the task's folder; hh-rlhf / tldr: files laid out like the cache
    template: str = "author"       # TL;DR prompt: "author" (Human/Assistant) or "tldr" (SUBREDDIT/TITLE/POST)
    max_prompt_len: int = 512      # tokens (author: 512); HH drops whole oldest turns, TL;DR shortens the post
    max_response_len: int = 256    # tokens, EOS included; also the sampling budget
    methods: str = "dpo_all,ppo_all,mpo"  # beside SFT: dpo_all, dpo_human (DPO on the human pairs), ppo_all, mpo
    max_train: int = 0             # > 0: use only this many SFT examples and training pairs (smoke tests)
    max_eval: int = 0              # > 0: use only this many held-out SFT examples and pairs in stage evaluations
    variants: str = ""             # ablations, ';'-separated MPO variants of --split fields: "delta=2;stage2_ref=sft"
    out: str = ""                  # run folder; default out/<dataset>
    stop_after: str = ""           # stop once this stage is done: sft | rm | split | dpo_all | dpo_human | ppo_all | mpo_dpo | mpo
    redo: bool = False             # redo the stages whose recorded flags differ from this run's, and those after them
    device: str = "auto"
    dtype: str = "auto"            # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 (CPU too: fast with AMX)
    grad_checkpoint: bool = False  # activation checkpointing: less memory, ~1/3 more compute (gpt2-large / xl)
    seed: int = 0
    seeds: int = 1                 # > 1: a study over this many training seeds from --seed on (OUT/seed_<s>/)
    budget: str = "data"           # "data": each stage's steps follow its data; "matched": dpo_all's steps for all
    sweep: str = ""                # "0.5,1,2": the run at these multiples of --dpo.beta and --ppo.kl_coef (frontier)


@dataclass
class SplitConfig:
    source: str = "resample"   # "resample": two SFT samples per row ranked by the RM (author); "human": dataset pairs
    delta: float = 1.0         # |gap| >= delta is easy (author: 1 on HH-RLHF, 2 on TL;DR)
    quantile: float = 0.0      # > 0: delta = this quantile of |gap| instead (an RM of unknown scale)
    stage2_ref: str = "dpo"    # PPO's KL reference: "dpo" (MPO) or "sft" (ablation)
    order: str = "easy_first"  # "easy_first": DPO on easy, PPO on hard (MPO); "hard_first": the reverse (ablation)
    pairs_per_row: bool = True  # resample: a pair per training row (author; TL;DR repeats posts), else per prompt
    batch_size: int = 0        # sampling and scoring batch; 0 = 32 on a CPU, sized from free memory on a GPU


def trainable_copy(model):
    """A copy to train: a model that served as a frozen reference (dpo / ppo) has requires_grad off."""
    return copy.deepcopy(model).requires_grad_(True)


class StopAfter(Exception):
    """Raised after the stage named by --stop_after, so that train.sh can run one stage per line."""


def skipped(name: str, stop_after: str):
    """A stage this run leaves out (not in --methods, or one side of the split is empty): --stop_after
    still stops where it would have run, never later."""
    if name == stop_after:
        raise StopAfter(f"{name} (skipped in this run)")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C inside a stage, with the stage's name for main's one line."""


def stage(out: Path, name: str, make, fn, stop_after="", settings=None):
    """Run a stage once: its final weights go to out/name/final.pt and its metrics (wall time included)
    to out/name/result.json; a rerun with the same out loads them and skips the stage. `settings` (what
    the stage depends on, see records()) go to out/name/settings.json as it starts.
    fn(folder) -> (model, metrics); make() -> an empty model to load the weights into."""
    folder = out / name
    final, result = folder / "final.pt", folder / "result.json"
    if final.exists():
        model = make()
        load_weights(model, load_checkpoint(final), final)
        try:
            metrics = json.loads(regular_file(result).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{result}: cannot read ({' '.join(str(e).split())}); delete {folder} to redo {name}")
        print(f"{name}: done in an earlier run, loaded {final}")
        if name == stop_after:
            raise StopAfter(name)
        return model, metrics
    folder.mkdir(parents=True, exist_ok=True)
    if settings is not None:
        atomic_save(json.dumps(settings, indent=1).encode(), folder / "settings.json")
    start = time.time()
    try:
        model, metrics = fn(folder)
    except torch.OutOfMemoryError:  # its own message is a page of allocator statistics
        raise RuntimeError(out_of_memory(name)) from None
    except KeyboardInterrupt:
        raise Interrupted(f"{name} ({folder})") from None
    metrics = {**metrics, "wall_s": time.time() - start}
    atomic_save(json.dumps(metrics, indent=1).encode(), result)
    atomic_save(model.state_dict(), final)  # written last: its presence marks the stage done
    if is_main():
        for ckpt in folder.glob("*_ckpt.pt"):  # the mid-stage resume point, superseded by final.pt
            ckpt.unlink()
    print(f"{name}: finished in {metrics['wall_s']:.0f}s, saved {final}")
    if name == stop_after:
        raise StopAfter(name)
    return model.cpu(), metrics


def out_of_memory(name: str) -> str:
    """One line for a CUDA out-of-memory error in stage `name` (or outside the stages): what to lower."""
    group = {"sft": "sft", "rm": "rm", "mpo_dpo": "dpo", "dpo_all": "dpo", "dpo_human": "dpo", "mpo": "ppo",
             "ppo_all": "ppo"}.get(name)
    knobs = (f"--{group}.batch_size and raise --{group}.grad_accum as much (same effective batch)" if group in
             ("sft", "rm", "dpo") else "--ppo.micro_batch_size (update) or --ppo.prompts_per_step (rollouts)"
             if group == "ppo" else "--split.batch_size and --eval.batch_size (sampling and scoring)")
    return (f"{name}: CUDA out of memory; lower {knobs}, or --max_prompt_len / --max_response_len; finished stages "
            "and the last checkpoint are kept: rerun with the same --out to resume")


def mpo_stages(out: Path, split: SplitConfig, sft_model, rm, easy, hard, cfgs, tok, prompts_eval, gold, settings):
    """MPO proper: DPO on the easy pairs (init = ref = SFT), then PPO on the hard prompts with the DPO
    model as the starting policy and (unless ablated) the KL reference; the critic starts from the RM.
    `settings`: the stages' records (records(); the flags, before a matched budget cuts the stages)."""
    new, stop = (lambda: GPT(sft_model.config)), cfgs["run"].stop_after
    policy = sft_model
    if easy:
        policy, _ = stage(out, "mpo_dpo", new, lambda d: dpo(trainable_copy(sft_model), sft_model, easy, cfgs["dpo"], d,
                                                             stage="mpo_dpo"), stop, settings["mpo_dpo"])
    skipped("mpo_dpo", "" if easy else stop)
    if not hard:
        skipped("mpo", stop)
        return policy
    ref = policy if split.stage2_ref == "dpo" else sft_model
    return stage(out, "mpo", new, lambda d: ppo(Models(trainable_copy(policy), ref, rm, trainable_copy(rm)),
                                                hard, tok, cfgs["ppo"], d, prompts_eval, gold, "mpo"),
                 stop, settings["mpo"])[0]


def matched_budget(cfgs, steps: int, easy=True, hard=True) -> dict:
    """cfgs with a method's DPO and PPO stages cut to `steps` policy optimizer steps in all (--budget matched).
    A PPO iteration takes ppo_epochs x num_minibatches steps, so PPO gets the nearest whole number of
    iterations (at least one); MPO, with both stages, gives half the steps to DPO and the rest to PPO (all to
    the one stage that has data when the other has none)."""
    per_iteration = cfgs["ppo"].ppo_epochs * cfgs["ppo"].num_minibatches
    dpo_steps = steps if not hard else steps // 2 if easy else 0
    return {**cfgs, "dpo": replace(cfgs["dpo"], max_steps=max(1, dpo_steps)),
            "ppo": replace(cfgs["ppo"], max_iterations=max(1, round((steps - dpo_steps) / per_iteration)))}


def check_checkpoints(paths, base):
    """Before anything under --out changes, every checkpoint this run would load must be one that loads
    (weights only, not torn; mmap: no weights read), and SFT's must fit this run's model (every stage has
    its shape; the others are checked again as they load)."""
    for path in paths:
        if path.suffix == ".pt":
            unpack_pairs(path, load_checkpoint(path, mmap=True))
            continue
        for file in [path / "final.pt", *sorted(path.glob("*_ckpt.pt"))]:
            if file.exists():
                state = load_checkpoint(file, mmap=True)
                if path.name == "sft":
                    check_shapes(base, state.get("model", state), file)


# What decides a stage's weights, recorded as it starts (stage(), settings.json) and compared before a rerun
# changes anything (train.stale_records): the data (dataset, data_dir, template, lengths, max_train), the
# model (init, or a fresh GPT's shape), the seed, the stage's own config, and the records of the stages it
# starts from, so a change reaches every stage after it. Not recorded, as they change how or where a result
# is computed, or what is logged, but not the result: out, device, dtype, compile, grad_checkpoint, what
# else runs (methods, variants, stop_after, redo), log_every, eval_every, ckpt_every, num_samples, the
# evaluation (max_eval, eval.*: the evaluation reruns every time; but a normalised RM
# records max_eval, whose held-out SFT rows set its gain and bias), and the memory knobs an out-of-memory
# error asks to change (precompute_ref, ppo.micro_batch_size; batch_size and grad_accum are recorded as
# their product, the effective batch), the gold function (it scores, it does not train), the preset (the
# values it sets are recorded one by one) and the study's seeds and sweep (each seed and multiple has its
# own folder). --budget is recorded with the DPO and PPO stages only, whose steps it sets.
NOT_RECORDED = {"out", "device", "dtype", "compile", "grad_checkpoint", "methods", "variants", "stop_after", "redo",
                "log_every", "eval_every", "ckpt_every", "num_samples", "max_eval", "precompute_ref",
                "micro_batch_size", "gold_reward", "preset", "seeds", "sweep", "budget", "eval_prompts"}


def flags_of(cfg, group: str) -> dict:
    """{flag name: value} of cfg's recorded fields ("sft.lr"; the run's own fields without a prefix)."""
    pre = "" if group == "run" else f"{group}."
    values = {pre + k: v for k, v in asdict(cfg).items() if k not in NOT_RECORDED}
    if pre + "grad_accum" in values:
        values[f"{pre}batch_size*{pre}grad_accum"] = values.pop(pre + "batch_size") * values.pop(pre + "grad_accum")
    return values


def records(cfgs, split: SplitConfig) -> dict:
    """{stage or cache: the settings it depends on} for one split (MPO's, or an ablation variant's)."""
    run = cfgs["run"]
    data = {k: v for k, v in flags_of(run, "run").items() if not (run.init and k in ("n_layer", "n_head", "n_embd"))}
    if run.dataset == "demo":  # the demo's data is made by its generator's knobs
        data |= flags_of(cfgs["demo"], "demo")
    sft = data | flags_of(cfgs["sft"], "sft")
    rm = (data | flags_of(cfgs["rm"], "rm") | (sft if cfgs["rm"].init == "sft" else {})
          | ({"max_eval": run.max_eval} if cfgs["rm"].normalize else {}))  # normalised on the held-out SFT rows
    pairs = rm | (sft if split.source == "resample" else {}) | {f"split.{k}": getattr(split, k) for k in
                                                                ("source", "batch_size", "pairs_per_row")}
    budget = {"budget": run.budget}
    dpo_cfg, ppo_cfg = flags_of(cfgs["dpo"], "dpo") | budget, flags_of(cfgs["ppo"], "ppo") | budget
    mpo_dpo = pairs | {f"split.{k}": getattr(split, k) for k in ("delta", "quantile", "order")} | dpo_cfg
    return {"sft": sft, "rm": rm, "pairs": pairs, "dpo_all": pairs | dpo_cfg, "dpo_human": sft | dpo_cfg,
            "ppo_all": pairs | ppo_cfg,
            "mpo_dpo": mpo_dpo, "mpo": mpo_dpo | {"split.stage2_ref": split.stage2_ref} | ppo_cfg}


def variant_folder(out: Path, text: str) -> Path:
    return out / "variants" / text.replace("=", "-").replace(",", "_")


def plan(out: Path, cfgs) -> dict:
    """{folder or cache under out: its settings} for every stage this run makes or loads, up to --stop_after."""
    run, split, rec = cfgs["run"], cfgs["split"], records(cfgs, cfgs["split"])
    methods = run.methods.split(",")
    steps = [("sft", out / "sft", rec["sft"]), ("rm", out / "rm", rec["rm"]),
             ("split", pairs_cache(out, split), rec["pairs"]),
             *[(name, out / name if set(wanted) & set(methods) else None, rec[name]) for name, wanted in
               (("dpo_all", ["dpo_all"]), ("dpo_human", ["dpo_human"]), ("ppo_all", ["ppo_all"]),
                ("mpo_dpo", ["mpo_dpo", "mpo"]), ("mpo", ["mpo"]))]]
    if run.stop_after:
        steps = steps[:[name for name, *_ in steps].index(run.stop_after) + 1]
    else:
        for text in filter(None, run.variants.split(";")):
            v = with_split(split, parse_fields(SplitConfig, text))
            vrec = records(cfgs, v)
            steps += [("", pairs_cache(out, v), vrec["pairs"]),
                      *[("", variant_folder(out, text) / name, vrec[name]) for name in ("mpo_dpo", "mpo")]]
    return {path: settings for _, path, settings in steps if path is not None}


def print_memory_estimate(config, cfgs, device):
    """One line at start: the estimated peak memory of each training stage (train.memory_estimate). SFT
    and DPO run the LM head from the shortest prompt of a batch on: up to every position. DPO keeps its
    reference and the RM (from scoring) on the device; PPO trains policy and critic beside the reference
    and the RM, with the LM head on the response positions only."""
    R = cfgs["run"].max_response_len
    seq = cfgs["run"].max_prompt_len + R
    bf16 = AUTOCAST_DTYPE.get(device.type) == torch.bfloat16
    sizes = {"sft": memory_estimate(config, cfgs["sft"].batch_size, seq, seq - 1, bf16=bf16),
             "rm": memory_estimate(config, 2 * cfgs["rm"].batch_size, seq, 0, bf16=bf16),
             "dpo": memory_estimate(config, 2 * cfgs["dpo"].batch_size, seq, seq - 1, frozen=2, bf16=bf16),
             "ppo": memory_estimate(config, cfgs["ppo"].micro_batch_size, seq, R, trained=2, frozen=2, bf16=bf16)}
    print(f"memory estimate ({device.type}, {'bf16' if bf16 else 'fp32'}"
          f"{', activation checkpointing' if config.grad_checkpoint else ''}): "
          + ", ".join(f"{name} {size['total'] / 2**30:.2f} GiB" for name, size in sizes.items())
          + " per process (weights, AdamW state, one micro-batch's activations and logits; lower a stage's "
          "batch_size or add --grad_checkpoint if that is more than the device has)")


def print_plan(cfgs, base, sft_rows, pairs, device):
    """One line at start: each stage's work and a rough time, from a timed forward + backward of one SFT
    micro-batch of full-length rows and timed decoding steps (train.time_probe) times the work, training
    scaled by the rows' mean length. MPO's two stages are counted at half the data each, as on HH-RLHF
    (45,600 easy pairs, 40,712 hard); sampling at the full response length (an upper bound)."""
    run, split, ppo_cfg, ev = cfgs["run"], cfgs["split"], cfgs["ppo"], cfgs["eval"]
    R, seq, bs = run.max_response_len, run.max_prompt_len + run.max_response_len, cfgs["sft"].batch_size
    ppo_rows = ppo_cfg.prompts_per_step * ppo_cfg.samples_per_prompt
    t = time_probe(base, bs, seq, (split.batch_size, ppo_rows), device)
    row = t["train_step"] / bs  # seconds of forward + backward per full-length row
    n_sft, n_pairs, n_prompts = len(sft_rows), len(pairs), len(distinct_prompts(pairs))
    n_split = n_pairs if split.source == "human" or split.pairs_per_row else n_prompts
    length = {1: sum(len(p) + len(r) for p, r in sft_rows) / max(1, n_sft) / seq,  # mean row length / full
              2: sum(len(p) + (len(c) + len(r)) / 2 for p, c, r in pairs) / max(1, n_pairs) / seq}

    def trained(cfg, rows, width):  # optimizer steps x rows per step x width rows each (2 for a pair)
        return optimizer_steps(cfg, rows) * cfg.batch_size * cfg.grad_accum * width * row * length[width]

    def ppo_time(prompts):  # rollouts, then 4 scoring forwards (1/3 of a forward + backward each) and the update
        iterations = ppo_cfg.passes * -(-prompts // ppo_cfg.prompts_per_step)
        rollout = R * t[f"decode_step_{ppo_rows}"] + ppo_rows * row * length[2] * (4 / 3 + 2 * ppo_cfg.ppo_epochs)
        return iterations, iterations * rollout * (1 + ev.prompts / ppo_rows / max(ppo_cfg.eval_every, 1))

    sample = lambda n: -(-n // split.batch_size) * R * t[f"decode_step_{split.batch_size}"]  # noqa: E731
    ppo_all, ppo_all_s = ppo_time(n_prompts)
    plan = {f"sft {optimizer_steps(cfgs['sft'], n_sft):,} steps": trained(cfgs["sft"], n_sft, 1),
            f"rm {optimizer_steps(cfgs['rm'], n_pairs):,} steps": trained(cfgs["rm"], n_pairs, 2),
            f"pairs {2 * n_split:,} samples": sample(2 * n_split) if split.source == "resample" else 0.0,
            f"dpo_all {optimizer_steps(cfgs['dpo'], n_split):,} steps": trained(cfgs["dpo"], n_split, 2) * 7 / 6,
            f"ppo_all {ppo_all:,} iterations": ppo_all_s,
            "mpo_dpo + mpo": trained(cfgs["dpo"], n_split // 2, 2) * 7 / 6 + ppo_time(n_prompts // 2)[1],
            f"evaluation {ev.prompts * ev.samples:,} samples per model": 4 * sample(ev.prompts * ev.samples)}
    fmt = lambda s: str(datetime.timedelta(seconds=round(s)))  # noqa: E731
    print(f"plan (rough, {device.type}): " + " | ".join(f"{k} ~{fmt(v)}" for k, v in plan.items())
          + f" | total ~{fmt(sum(plan.values()))}; every stage prints its own rate and ETA")


def run_pipeline(cfgs: dict) -> Path:
    """The whole run under --out: stages, baselines, ablation variants, evaluation, report.md and
    results.json (a study of one seed)."""
    run, split = cfgs["run"], cfgs["split"]
    out = Path(run.out or f"out/{run.dataset}")
    device = pick_device(run.device)
    torch.manual_seed(run.seed)
    task = load_task(run.dataset, run.data_seed, run.data_dir or None, run.template, cfgs["demo"])
    if run.gold_reward:  # tried once here, before anything under --out changes
        task.gold_reward = load_gold_reward(run.gold_reward, (task.pairs_eval[0].prompt, task.pairs_eval[0].chosen))
        task.gold_best = None  # a task's best gold is that of its own reward
    tok = get_tokenizer(run.tokenizer or task.tokenizer)

    def enc(items, name, kept=None):
        return encode_dataset(tok, items, run.max_prompt_len, run.max_response_len, name, task.prompt_cut, kept)

    limit, eval_limit = run.max_train or None, run.max_eval or None
    sft_rows, sft_eval = enc(task.sft_train[:limit], "sft_train"), enc(task.sft_eval[:eval_limit], "sft_eval")
    pairs, pairs_eval = enc(task.pairs_train[:limit], "pairs_train"), enc(task.pairs_eval[:eval_limit], "pairs_eval")
    kept = []  # PPO's curve, the evaluation; stratified by subset where the task has them (data.interleave)
    prompts_eval = enc(task.prompts_eval[:cfgs["eval"].prompts], "prompts_eval", kept)
    subsets = [task.eval_subsets[i] for i in kept] if task.eval_subsets else None
    base = GPT.from_pretrained(run.init) if run.init else GPT(GPTConfig(
        block_size=run.max_prompt_len + run.max_response_len, vocab_size=tok.n_vocab,
        n_layer=run.n_layer, n_head=run.n_head, n_embd=run.n_embd))
    base.config.grad_checkpoint = run.grad_checkpoint  # shared by every model built from base.config
    if run.max_prompt_len + run.max_response_len > base.config.block_size:
        raise ValueError(f"--max_prompt_len {run.max_prompt_len} + --max_response_len {run.max_response_len} is more "
                         f"than the {base.config.block_size} positions of --init {run.init}")
    # Batches sized for the device (0); the records keep the flag as given, like --device.
    batch = sampling_batch(base.config, run.max_prompt_len + run.max_response_len, device)
    cfgs["eval"] = replace(cfgs["eval"], batch_size=cfgs["eval"].batch_size or batch)
    sized = lambda s: replace(s, batch_size=s.batch_size or batch)  # noqa: E731
    set_dtype(run.dtype)
    print_memory_estimate(base.config, cfgs, device)
    # Only now, with the data and the model checked, is --out locked and compared with this run's flags;
    # only once all of that holds does anything under it change (rank 0 changes it; every rank learns how
    # that went).
    planned, problem = plan(out, cfgs), None
    if is_main():
        try:
            lock_run_folder(out)
            stale = stale_records(out, planned, run.redo)
            check_checkpoints([path for path in planned if path.exists() and path not in stale], base)
            remove_leftovers(out)
            remove_stale(stale)
            atomic_save(json.dumps({k: asdict(v) for k, v in cfgs.items()}, indent=1).encode(), out / "config.json")
        except ValueError as e:
            problem = str(e)
    if problem := gather(problem)[0]:
        raise ValueError(problem)
    print_plan({**cfgs, "split": sized(split)}, base, sft_rows, pairs, device)
    new = lambda: GPT(base.config)  # noqa: E731
    rec = records(cfgs, split)

    sft_model, _ = stage(out, "sft", new, lambda d: sft(trainable_copy(base), sft_rows, cfgs["sft"], d, sft_eval),
                         run.stop_after, rec["sft"])
    torch.manual_seed(run.seed)  # the RM head's init: the same whether SFT ran now or was loaded (resume)
    rm_cfg = cfgs["rm"]
    rm_config = replace(base.config, **{k: getattr(rm_cfg, k) or getattr(base.config, k)
                                        for k in ("n_layer", "n_head", "n_embd")})
    if rm_config.n_embd % rm_config.n_head:
        raise ValueError(f"argument --rm.n_embd: must be a multiple of the RM's {rm_config.n_head} heads, got "
                         f"{rm_config.n_embd}")
    rm_init = base if rm_cfg.init == "base" else sft_model  # author: the RM starts from the base LM
    start_rm = (lambda: ScalarModel.from_gpt(rm_init)) if rm_config == base.config else (lambda: ScalarModel(rm_config))
    rm, rm_metrics = stage(out, "rm", lambda: ScalarModel(rm_config), lambda d: train_reward_model(
        start_rm(), pairs, rm_cfg, d, pairs_eval, sft_eval if rm_cfg.normalize else None), run.stop_after, rec["rm"])

    def pairs_of(s):
        return cached_pairs(out, sized(s), sft_model, rm, pairs, tok, run, device, records(cfgs, s)["pairs"])

    rows, gaps = pairs_of(split)
    easy, hard, split_stats = split_pairs(rows, gaps, split, out, tok)
    if task.gold_reward:  # how far the RM and its split can be trusted, measured against the truth
        chosen, rejected = score_pairs(rm, pairs_eval, batch, device)  # this run's held-out pairs
        rm_metrics["gold"] = gold_checks(task.gold_reward, tok, pairs_eval, chosen - rejected, rows, gaps,
                                         split_stats["delta"])
    if run.stop_after == "split":
        raise StopAfter("split")

    # Baselines on the same pairs / prompts as MPO with the same stage configs: same cost per sample. Under
    # --budget matched every method gets dpo_all's optimizer steps (matched_budget), else each its data's.
    steps = optimizer_steps(cfgs["dpo"], len(rows))
    budget = lambda e, h: matched_budget(cfgs, steps, bool(e), bool(h)) if run.budget == "matched" else cfgs  # noqa: E731
    models, methods = {"sft": sft_model}, run.methods.split(",")
    if "dpo_all" in methods:
        models["dpo_all"] = stage(out, "dpo_all", new, lambda d: dpo(
            trainable_copy(sft_model), sft_model, rows, budget(rows, [])["dpo"], d, stage="dpo_all"),
            run.stop_after, rec["dpo_all"])[0]
    skipped("dpo_all", "" if "dpo_all" in methods else run.stop_after)
    if "dpo_human" in methods:  # the paper's vanilla DPO: the dataset's own pairs, not the resampled ones
        models["dpo_human"] = stage(out, "dpo_human", new, lambda d: dpo(
            trainable_copy(sft_model), sft_model, pairs, budget(pairs, [])["dpo"], d, stage="dpo_human"),
            run.stop_after, rec["dpo_human"])[0]
    skipped("dpo_human", "" if "dpo_human" in methods else run.stop_after)
    if "ppo_all" in methods:
        all_prompts = distinct_prompts(rows)
        models["ppo_all"] = stage(out, "ppo_all", new, lambda d: ppo(
            Models(trainable_copy(sft_model), sft_model, rm, trainable_copy(rm)), all_prompts, tok,
            budget([], rows)["ppo"], d,
            prompts_eval, task.gold_reward, "ppo_all"), run.stop_after, rec["ppo_all"])[0]
    skipped("ppo_all", "" if "ppo_all" in methods else run.stop_after)
    if "mpo_dpo" in methods and easy:  # MPO's first stage alone (trained here or by mpo_stages: the same stage)
        models["mpo_dpo"] = stage(out, "mpo_dpo", new, lambda d: dpo(
            trainable_copy(sft_model), sft_model, easy, budget(easy, hard)["dpo"], d, stage="mpo_dpo"),
            run.stop_after, rec["mpo_dpo"])[0]
    if "mpo" in methods:
        models["mpo"] = mpo_stages(out, split, sft_model, rm, easy, hard, budget(easy, hard), tok, prompts_eval,
                                   task.gold_reward, rec)
    for name in ("mpo_dpo", "mpo"):
        skipped(name, "" if {name, "mpo"} & set(methods) else run.stop_after)
    variants, stages = {}, {"sft": ["sft"], "dpo_all": ["dpo_all"], "dpo_human": ["dpo_human"], "ppo_all": ["ppo_all"],
                            "mpo_dpo": ["mpo_dpo"], "mpo": ["mpo_dpo", "mpo"]}  # each model's own stage folders
    for text in filter(None, run.variants.split(";")):  # ablations share the SFT model, the RM and the pairs
        v = with_split(split, parse_fields(SplitConfig, text))
        folder = variant_folder(out, text)
        stages[f"mpo[{text}]"] = [str(folder.relative_to(out) / name) for name in ("mpo_dpo", "mpo")]
        v_easy, v_hard, variants[f"mpo[{text}]"] = split_pairs(*pairs_of(v), v, folder, tok)
        models[f"mpo[{text}]"] = mpo_stages(folder, v, sft_model, rm, v_easy, v_hard, budget(v_easy, v_hard), tok,
                                            prompts_eval, task.gold_reward, records(cfgs, v))

    results, samples = evaluate(models, rm, prompts_eval, task.gold_reward, tok, run, cfgs["eval"], device, subsets)
    made = {str(path.relative_to(out)).removesuffix(".pt"): settings for path, settings in planned.items()
            if (path / "final.pt").exists() or path.is_file()}  # the stages this run ran or loaded
    report = write_report(out, cfgs, results, samples, gaps, split_stats, variants, rm_metrics, made, task.gold_best)
    record = {"seed": run.seed, "gap_buckets": rm_metrics.get("eval/accuracy_by_gap_quartile", {}),
              "methods": {name: {**{k: r[k] for k in METRICS if k in r}, "compute": compute(out, stages[name])}
                          for name, r in results.items()}}
    atomic_save(json.dumps(study([record]), indent=1).encode(), out / "results.json")  # a study of one seed
    return report


def compute(out: Path, folders) -> dict:
    """A model's training compute, summed over its stage folders' result.json (train.train and ppo.ppo
    count them): policy optimizer steps, tokens through the policy's forward + backward, responses sampled."""
    total = {"policy_steps": 0, "policy_tokens": 0, "samples": 0}
    for folder in folders:
        if (out / folder / "result.json").exists():
            r = json.loads((out / folder / "result.json").read_text())
            for name, k in (("policy_steps", "steps"), ("policy_tokens", "tokens"), ("samples", "samples")):
                total[name] += r.get(f"compute/{k}", 0)
    return total


def run_seed(cfgs: dict, log=None) -> Path:
    """One seed of a study: run_pipeline on one thread (floating-point sums depend on the thread count: a
    seed's numbers must not depend on the machine's cores), its output to `log` when given."""
    torch.set_num_threads(1)
    if log is None:
        return run_pipeline(cfgs)
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return run_pipeline(cfgs)


def run_seeds(cfgs: dict) -> Path:
    """--seeds N: the run for seeds --seed .. --seed + N - 1, each a run folder OUT/seed_<s>/ (resumed like any
    run folder), on the same task data (--data_seed); the stages' seeds shift with it. The study adds the rows
    its claims need: mpo_dpo (MPO's first stage alone) and mpo[stage2_ref=sft] (claim c). On a CPU with
    several cores the seeds run side by side, one process and one thread each; then OUT/report.md and
    OUT/results.json aggregate them (report.study)."""
    run = cfgs["run"]
    out = Path(run.out or f"out/{run.dataset}")
    seeds = [run.seed + i for i in range(run.seeds)]
    methods, variants = run.methods.split(","), list(filter(None, run.variants.split(";")))
    if "mpo" in methods:
        methods += [] if "mpo_dpo" in methods else ["mpo_dpo"]
        variants += [] if "stage2_ref=sft" in variants else ["stage2_ref=sft"]
    jobs = []
    for s in seeds:
        shifted = {g: replace(c, seed=c.seed + s - run.seed) if hasattr(c, "seed") else c for g, c in cfgs.items()}
        shifted["run"] = replace(run, seed=s, seeds=1, out=str(out / f"seed_{s}"), methods=",".join(methods),
                                 variants=";".join(variants))
        jobs.append(shifted)
    parallel = pick_device(run.device).type == "cpu" and world_size() == 1 and (os.cpu_count() or 1) > 1
    workers = min(len(seeds), os.cpu_count() or 1) if parallel else 1
    print(f"study: {len(seeds)} seeds ({', '.join(map(str, seeds))}), {workers} at a time, one thread each; "
          f"each seed's log: {out}/seed_<s>/log.txt")
    if workers > 1:  # spawn: a fresh interpreter per process (no forked torch thread pools)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_seed, job, Path(job["run"].out) / "log.txt"): job for job in jobs}
            for done in as_completed(futures):
                print(f"study: {done.result()} done")
    else:
        for job in jobs:
            print(f"study: {run_seed(job)} done")
    folders = [out / f"seed_{s}" for s in seeds]
    records = [seed_record(json.loads((f / "results.json").read_text())) for f in folders]
    return write_study(out, cfgs, study(records), folders)


def sweep_factors(text: str) -> list:
    """"0.5,1,2" -> [0.5, 1.0, 2.0]: the --sweep multiples, each > 0."""
    try:
        factors = [float(t) for t in text.split(",")]
    except ValueError:
        factors = []
    if not factors or any(not x > 0 for x in factors):
        raise ValueError(f"expected multiples > 0 separated by commas, e.g. 0.5,1,2; got {text!r}")
    return factors


def share_sft_and_rm(src: Path, dst: Path):
    """A sweep's multiple starts from the first multiple's finished SFT and RM stages and resampled pairs, seed
    by seed (same settings, same seeds: the same stages; they do not depend on beta or kl_coef), copied in."""
    for folder in [src, *sorted(src.glob("seed_*"))]:
        target = dst / folder.relative_to(src)
        for name in ("sft", "rm"):
            if (folder / name / "final.pt").exists() and not (target / name).exists():
                shutil.copytree(folder / name, target / name)
        for pairs in folder.glob("pairs_*.*"):  # the cache and its record
            if not (target / pairs.name).exists():
                shutil.copy2(pairs, target / pairs.name)


def run_sweep(cfgs: dict) -> Path:
    """--sweep: the run (a study under --seeds N) at each multiple of the regularisation strengths, DPO's beta
    and PPO's kl_coef together (MPO has both), each in OUT/sweep_<x>/; then OUT/report.md with the reward-KL
    frontier and OUT/sweep.json (report.write_sweep)."""
    run = cfgs["run"]
    out = Path(run.out or f"out/{run.dataset}")
    studies, factors = {}, sweep_factors(run.sweep)
    for x in factors:
        share_sft_and_rm(out / f"sweep_{factors[0]:g}", out / f"sweep_{x:g}")
        at = {**cfgs, "run": replace(run, sweep="", out=str(out / f"sweep_{x:g}")),
              "dpo": replace(cfgs["dpo"], beta=cfgs["dpo"].beta * x),
              "ppo": replace(cfgs["ppo"], kl_coef=cfgs["ppo"].kl_coef * x)}
        report = run_pipeline(at) if run.seeds <= 1 else run_seeds(at)
        studies[x] = json.loads((report.parent / "results.json").read_text())
        print(f"sweep: x{x:g} done: {report}")
    return write_sweep(out, cfgs, dict(sorted(studies.items())))


# ---------------------------------------------------------------------------------------------------
# Command line: one flag per dataclass field, --<group>.<field>; the run's own fields have no prefix

CONFIGS = {"run": RunConfig, "sft": SFTConfig, "rm": RMConfig, "split": SplitConfig, "dpo": DPOConfig,
           "ppo": PPOConfig, "eval": EvalConfig, "demo": DemoConfig}
# The demo preset (--preset demo; --dataset demo implies it): a tiny GPT trained from scratch on 2 CPU
# cores, so larger learning rates and shorter budgets; an RM of its own narrower shape trained from
# scratch for 2 epochs of 100k pairs (the budget its held-out accuracy needed), normalised so that the author's
# delta = 1 is one standard deviation of the SFT responses' scores; the real datasets keep the author's values.
# A study over 3 seeds, every method with dpo_all's optimizer steps (--budget matched), by default.
DEMO = {"run": dict(max_prompt_len=32, max_response_len=48, seeds=3, budget="matched"),
        "sft": dict(lr=3e-3, batch_size=32, grad_accum=1, epochs=5.0, warmup_steps=10, eval_every=100, log_every=10),
        "rm": dict(n_embd=64, lr=1e-3, batch_size=32, grad_accum=1, epochs=2.0, warmup_steps=100, weight_decay=0.0,
                   normalize=True, eval_every=1000, log_every=50),  # its own narrower shape, from scratch
        "split": dict(pairs_per_row=False),  # the demo's 100,000 pairs share 498 prompts: a pair per prompt
        "dpo": dict(lr=1e-4, beta=0.3, batch_size=32, grad_accum=1, epochs=4.0, warmup_steps=0, eval_every=0,
                    log_every=10),
        "ppo": dict(prompts_per_step=32, ppo_epochs=4, num_minibatches=2, actor_lr=1e-4, critic_lr=3e-4,
                    kl_coef=0.05, warmup_steps=0, decay="constant", whiten_advantages=True, eval_every=5,
                    eval_prompts=0),
        "eval": dict(prompts=150, samples=8)}

# The author's values that differ by dataset (the config dataclasses hold the HH-RLHF ones).
DATASET_DEFAULTS = {"tldr": {"split": dict(delta=2.0)}}

# Fields that take one of a few words, and the methods: anything else is refused before a run starts.
CHOICES = {"run.dataset": ("demo", "jsonl", "hh-rlhf", "tldr"), "run.preset": ("", "demo"),
           "run.tokenizer": ("", *TOKENIZERS), "run.budget": ("data", "matched"), "run.template": ("author", "tldr"),
           "rm.init": ("base", "sft"),
           "run.dtype": tuple(AUTOCAST_DTYPES),
           "split.source": ("resample", "human"), "split.stage2_ref": ("dpo", "sft"),
           "split.order": ("easy_first", "hard_first"), "dpo.loss_type": ("sigmoid", "ipo"),
           "run.stop_after": ("", "sft", "rm", "split", "dpo_all", "dpo_human", "ppo_all", "mpo_dpo", "mpo"),
           **{f"{group}.decay": ("cosine", "linear", "constant") for group in ("sft", "rm", "dpo", "ppo")}}
# mpo_dpo: MPO's first stage alone, evaluated too; dpo_human: DPO on the dataset's own human pairs (the paper's
# vanilla DPO; on the demo's 100,000 pairs slow unless --budget matched)
METHODS = ("dpo_all", "dpo_human", "ppo_all", "mpo", "mpo_dpo")


# What each flag accepts, checked (validate) before anything is read or written: "group.field", or
# "*.field" for that field in every group -> (test, what it accepts). Every float must also be finite.
POSITIVE, AT_LEAST_0, UNIT = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0"), (lambda v: 0 <= v <= 1, "in [0, 1]")
LIMITS = {
    **dict.fromkeys(("*.batch_size", "*.grad_accum", "*.log_every", "*.lr", "*.epochs", "*.grad_clip", "run.n_layer",
                     "run.n_head", "run.n_embd", "run.max_prompt_len", "run.max_response_len", "sft.ckpt_every",
                     "rm.ckpt_every", "dpo.ckpt_every", "dpo.beta", "ppo.prompts_per_step", "ppo.samples_per_prompt",
                     "ppo.passes", "ppo.max_new_tokens", "ppo.temperature", "ppo.reward_clip", "ppo.kl_horizon",
                     "ppo.ppo_epochs", "ppo.num_minibatches", "ppo.micro_batch_size", "ppo.clip_range",
                     "ppo.clip_range_value", "ppo.actor_lr", "ppo.critic_lr", "ppo.adam_eps", "eval.prompts",
                     "eval.samples"), POSITIVE),
    **dict.fromkeys(("*.max_steps", "*.warmup_steps", "*.weight_decay", "*.eval_every", "run.max_train",
                     "run.max_eval", "rm.center_coef", "split.delta", "ppo.top_k", "ppo.kl_coef", "ppo.kl_target",
                     "ppo.vf_coef", "ppo.ent_coef", "ppo.ckpt_every", "ppo.eval_prompts", "ppo.max_iterations", "ppo.num_samples",
                     "eval.temperature", "eval.tie", "eval.show", "rm.n_layer", "rm.n_head", "rm.n_embd",
                     "demo.noise_temperature"), AT_LEAST_0),
    **dict.fromkeys(("demo.sft_train", "demo.sft_eval", "demo.pairs_train", "demo.pairs_eval"), POSITIVE),
    "demo.prompts_eval": (lambda v: 0 < v < 648, "in [1, 647] (the demo has 648 prompts; the rest train)"),
    "run.data_seed": (lambda v: 0 <= v < 2**31, "in [0, 2^31)"),
    "*.seed": (lambda v: 0 <= v < 2**31, "in [0, 2^31)"),
    "split.quantile": (lambda v: 0 <= v < 1, "0 (off) or in (0, 1)"),
    **dict.fromkeys(("split.batch_size", "eval.batch_size"), (AT_LEAST_0[0], ">= 0 (0: sized for the device)")),
    "ppo.top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "ppo.gamma": UNIT, "ppo.lam": UNIT,
    "dpo.label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
}


def flag(group: str, name: str) -> str:
    return f"--{name}" if group == "run" else f"--{group}.{name}"


def validate(cfgs: dict):
    """A ValueError "argument --flag: what it accepts" for the first flag out of LIMITS, or out of step with
    another flag; the variants' split fields are checked like --split's."""
    variants = [("split", with_split(cfgs["split"], parse_fields(SplitConfig, text)), f"--variants {text!r}: ")
                for text in filter(None, cfgs["run"].variants.split(";"))]
    for group, cfg, where in [*((group, cfg, "") for group, cfg in cfgs.items()), *variants]:
        for name, value in asdict(cfg).items():
            test, accepts = LIMITS.get(f"{group}.{name}") or LIMITS.get(f"*.{name}") or (None, "")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"argument {where}{flag(group, name)}: must be a finite number, got {value}")
            if test and not test(value):
                raise ValueError(f"argument {where}{flag(group, name)}: must be {accepts}, got {value}")
    run, ppo_cfg, world = cfgs["run"], cfgs["ppo"], int(os.environ.get("WORLD_SIZE", 1))
    if not run.init and run.n_embd % run.n_head:
        raise ValueError(f"argument --n_embd: must be a multiple of --n_head {run.n_head}, got {run.n_embd}")
    rm_cfg = cfgs["rm"]
    rm_embd, rm_head = rm_cfg.n_embd or run.n_embd, rm_cfg.n_head or run.n_head  # 0: the policy's
    if not run.init and rm_embd % rm_head:  # with --init the policy's shape is known once it loads: run_pipeline
        raise ValueError(f"argument --rm.n_embd: must be a multiple of the RM's {rm_head} heads (--rm.n_head, else "
                         f"--n_head), got {rm_embd}")
    for group in ("sft", "rm", "dpo"):
        if cfgs[group].grad_accum % world:
            raise ValueError(f"argument --{group}.grad_accum: must be a multiple of the {world} processes (each takes "
                             f"grad_accum / processes micro-batches of a step), got {cfgs[group].grad_accum}")
    if ppo_cfg.max_new_tokens > run.max_response_len:
        raise ValueError(f"argument --ppo.max_new_tokens: must be at most --max_response_len {run.max_response_len} "
                         f"(the model's positions), got {ppo_cfg.max_new_tokens}")
    if ppo_cfg.num_minibatches > ppo_cfg.prompts_per_step * ppo_cfg.samples_per_prompt:
        raise ValueError(f"argument --ppo.num_minibatches: must be at most --ppo.prompts_per_step x "
                         f"--ppo.samples_per_prompt (the responses of an iteration), got {ppo_cfg.num_minibatches}")


def parse_value(kind, text: str):
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    return kind(text)


def parse_fields(cls, text: str) -> dict:
    """"delta=2,order=hard_first" -> {"delta": 2.0, "order": "hard_first"}, typed by cls's fields."""
    kinds = {f.name: type(f.default) for f in fields(cls)}
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in kinds:
            raise ValueError(f"unknown {cls.__name__} field {name.strip()!r} in {text!r} (fields: {', '.join(kinds)})")
        out[name.strip()] = parse_value(kinds[name.strip()], value.strip())
    return out


def field_help(cls) -> dict:
    """{field: its trailing comment in the class source}: the comments next to the defaults are the --help."""
    lines = [line for c in reversed(cls.__mro__) if is_dataclass(c) for line in inspect.getsource(c).splitlines()]
    return {m[1]: m[2] for m in map(re.compile(r"\s+(\w+): .*?#\s*(.*)").match, lines) if m}


def parse_args(argv=None) -> dict:
    """{group: config}: dataclass defaults, then the demo preset's values (--preset demo, implied by --dataset
    demo), then the flags given.
    The run's device, seed and response length are every stage's unless a stage's own flag says otherwise."""
    parser = argparse.ArgumentParser(
        usage="python mpo.py [--dataset demo|jsonl|hh-rlhf|tldr] [--preset demo] [--init gpt2] [--out DIR] "
              "[--GROUP.FIELD VALUE ...]",
        description=__doc__.split("\n\n")[0], epilog="--preset demo (implied by --dataset demo) sets: " + "; ".join(
            f"{g}: " + ", ".join(f"{k}={v}" for k, v in d.items()) for g, d in DEMO.items()))
    for group, cls in CONFIGS.items():
        section, helps = parser.add_argument_group(f"{group} ({cls.__name__})"), field_help(cls)
        for f in fields(cls):
            kind = type(f.default)
            parse = lambda s, kind=kind: parse_value(kind, s)  # noqa: E731
            parse.__name__ = kind.__name__  # argparse's message: "invalid int value: 'x'"
            section.add_argument(flag(group, f.name), dest=f"{group}.{f.name}",
                                 metavar=kind.__name__.upper(), type=parse, choices=CHOICES.get(f"{group}.{f.name}"),
                                 help=f"{helps.get(f.name, '')} (default {f.default!r})",
                                 **({"nargs": "?", "const": True} if kind is bool else {}))  # --redo = --redo true
    given = {}
    for key, value in vars(parser.parse_args(argv)).items():
        if value is not None:
            group, name = key.split(".", 1)
            given.setdefault(group, {})[name] = value
    dataset = given.get("run", {}).get("dataset", RunConfig.dataset)
    demo = dataset == "demo" or given.get("run", {}).get("preset", RunConfig.preset) == "demo"
    run = RunConfig(**{**(DEMO["run"] if demo else {}), **given.get("run", {})})
    if unknown := sorted(set(filter(None, run.methods.split(","))) - set(METHODS)):
        parser.error(f"argument --methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    if run.seeds < 1:
        parser.error(f"argument --seeds: must be at least 1, got {run.seeds}")
    try:
        run.sweep and sweep_factors(run.sweep)
    except ValueError as e:
        parser.error(f"argument --sweep: {e}")
    for text in filter(None, run.variants.split(";")):
        try:
            for name, value in parse_fields(SplitConfig, text).items():
                if value not in CHOICES.get(f"split.{name}", (value,)):
                    raise ValueError(f"{name} {value!r} is not one of {', '.join(CHOICES[f'split.{name}'])}")
        except ValueError as e:
            parser.error(f"argument --variants: {e}")
    shared = {"device": run.device, "seed": run.seed, "max_new_tokens": run.max_response_len}
    cfgs = {"run": run}
    for group, cls in list(CONFIGS.items())[1:]:
        inherited = {k: v for k, v in shared.items() if k in {f.name for f in fields(cls)}}
        preset = DEMO.get(group, {}) if demo else DATASET_DEFAULTS.get(dataset, {}).get(group, {})
        cfgs[group] = cls(**{**inherited, **preset, **given.get(group, {})})
    cfgs["split"] = with_split(cfgs["split"], given.get("split", {}))
    try:
        validate(cfgs)
    except ValueError as e:
        parser.error(str(e))
    return cfgs


def with_split(split: SplitConfig, overrides: dict) -> SplitConfig:
    """split with the overrides; a delta given without a quantile switches the quantile off (a --split.quantile
    would otherwise silently win over a variant's delta)."""
    return replace(split, **({"quantile": 0.0} if "delta" in overrides and "quantile" not in overrides else {}),
                   **overrides)


def main(argv=None):
    cfgs = parse_args(argv)
    try:
        setup_distributed()  # under torchrun; a no-op otherwise
        run = cfgs["run"]
        report = run_sweep(cfgs) if run.sweep else run_pipeline(cfgs) if run.seeds <= 1 else run_seeds(cfgs)
    except StopAfter as e:
        print(f"stopped after {e}, as --stop_after asked; rerun with the same --out to go on")
        return
    except KeyboardInterrupt as e:  # Ctrl-C: finished stages and the last checkpoint are on disk
        where = f"in stage {e}" if isinstance(e, Interrupted) else "outside the training stages"
        print(f"\nmpo: interrupted {where}; rerun with the same --out to resume", file=sys.stderr)
        sys.exit(130)
    except torch.OutOfMemoryError:  # outside a stage (stage() explains its own); a RuntimeError, so first
        sys.exit(f"mpo: error: {out_of_memory('sampling')}")
    # Bad data or flag values, a missing download, a checkpoint of another shape, a NaN: one line, no traceback.
    except (ValueError, RuntimeError, OSError, FloatingPointError) as e:
        sys.exit("mpo: error: " + " ".join(str(e).split()))
    finally:
        release_run_folders()
    print(f"report: {report}")


if __name__ == "__main__":
    main()
