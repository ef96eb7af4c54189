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
import copy
import inspect
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from data import (TOKENIZERS, DemoConfig, collate_pairs, collate_prompts, collate_sft, encode_dataset, get_tokenizer,
                  load_gold_reward, load_task)
from dpo import DPOConfig, dpo, response_logps
from model import GPT, GPTConfig, ScalarModel, response_mask
from ppo import PPOConfig, ppo
from report import write_report
from train import (AUTOCAST_DTYPE, AUTOCAST_DTYPES, TrainConfig, atomic_save, autocast, check_shapes, is_main,
                   load_weights, memory_estimate, pick_device, rank, set_dtype, setup_distributed, shard, to_device,
                   train, unshard)


@dataclass
class SFTConfig(TrainConfig):
    # DeepSpeed-Chat step 1 (the author's code base): lr 9.65e-6, no weight decay, cosine, no warm-up.
    lr: float = 9.65e-6
    batch_size: int = 8
    grad_accum: int = 4
    epochs: float = 1.0


def sft_loss(model, batch):
    """Mean next-token cross-entropy over response tokens + EOS; prompt and pad positions are masked."""
    tokens, mask = batch["tokens"], batch["loss_mask"]
    start = max(int(batch["prompt_lens"].min()) - 1, 0)  # no LM head on positions that predict prompt
    logits = model(tokens[:, :-1], logits_from=start)  # the last position predicts nothing: no forward on it
    targets = tokens[:, start + 1:].masked_fill(~mask[:, start + 1:], -100)  # -100: ignored
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100), {}


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
    # DeepSpeed-Chat step 2 for small models: lr 5e-5, weight decay 0.1, cosine, 1 epoch (RMs overfit
    # preference data fast; N+ uses lr 3e-6). Effective batch 64 = DS-Chat's 8 per GPU x 8 GPUs.
    lr: float = 5e-5
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


@torch.no_grad()
def batch_outputs(fn, model, rows, collate, batch_size, device) -> list:
    """fn(model, batch) over encoded rows, batch by batch, in eval mode: one CPU tensor per batch. Under
    torchrun each rank takes a shard of the rows and every rank gets all the outputs, in order."""
    model.to(device).eval()
    outputs, mine = [], shard(rows)
    for i in range(0, len(mine), batch_size):
        with autocast(device):
            outputs.append(fn(model, to_device(collate(mine[i:i + batch_size]), device)).float().cpu())
    return unshard(outputs)


def batch_scores(rm, rows, collate, batch_size, device) -> list:
    """RM scores of encoded rows, one tensor per batch (for pairs: the chosen rows, then the rejected)."""
    return batch_outputs(last_token_scores, rm, rows, collate, batch_size, device)


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
        metrics["eval/gaps"] = (chosen - rejected).tolist()  # the report sets them beside the gold gaps
    return rm, metrics


# ---------------------------------------------------------------------------------------------------
# Sampling, scoring and the reward-gap split

@torch.no_grad()
def sample_responses(model, prompts, eos_id, max_new_tokens, batch_size, device, seed=0, temperature=1.0,
                     top_k=None, top_p=None) -> list:
    """One sampled response (token ids, EOS included when reached) per encoded prompt. Under torchrun
    each rank samples for a shard of the prompts (its own seed) and every rank gets all the responses."""
    model.to(device).eval()
    g = torch.Generator(device).manual_seed(seed + rank() * 100003)
    out, mine = [], shard(prompts)
    for i in range(0, len(mine), batch_size):
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


def make_pairs(source, sft_model, rm, pairs, eos_id, max_new_tokens, batch_size, device, seed):
    """The pairs to split, as encoded (prompt, chosen, rejected), and their gaps r(chosen) - r(rejected).
    "resample" (author's code): two SFT samples per training prompt at temperature 1, top-k 50, top-p
    0.9, the higher-scored one chosen, so every gap is >= 0. "human": the dataset's own pairs; a
    negative gap means the RM disagrees with the label, and |gap| decides the side all the same."""
    if source == "human":
        chosen, rejected = score_pairs(rm, pairs, batch_size, device)
        return pairs, chosen - rejected
    if source != "resample":
        raise ValueError(f"--split.source must be 'resample' or 'human', got {source!r}")
    twice = [p for p in distinct_prompts(pairs) for _ in range(2)]
    responses = sample_responses(sft_model, twice, eos_id, max_new_tokens, batch_size, device, seed, 1.0, 50, 0.9)
    scores = torch.cat(batch_scores(rm, list(zip(twice, responses)), collate_sft, batch_size, device))
    rows, gaps = [], []
    for i in range(0, len(twice), 2):
        first = bool(scores[i] >= scores[i + 1])
        rows.append((twice[i], responses[i if first else i + 1], responses[i + 1 if first else i]))
        gaps.append(float((scores[i] - scores[i + 1]).abs()))
    return rows, torch.tensor(gaps)


def cached_pairs(out: Path, source, sft_model, rm, pairs, tok, run, batch_size, device):
    """make_pairs once per run and source: out/pairs_<source>.pt (resampling is the costly part)."""
    cache = out / f"pairs_{source}.pt"
    if cache.exists():
        return torch.load(cache, weights_only=True)
    made = make_pairs(source, sft_model, rm, pairs, tok.eot_token, run.max_response_len, batch_size, device, run.seed)
    atomic_save(made, cache)
    return made


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
    eval_gaps, gold = torch.tensor(eval_gaps), gold_gaps(gold_reward, tok, eval_pairs)
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
    batch_size: int = 32
    tie: float = 0.0          # |RM score difference| <= tie counts as a tie
    show: int = 3             # sample responses per model in the report


def logps_of(model, rows, batch_size, device):
    """Summed response log-probs (N,) of encoded (prompt, response) rows under `model`."""
    return torch.cat(batch_outputs(response_logps, model, rows, collate_sft, batch_size, device))


def evaluate(models: dict, rm, prompts, gold_reward, tok, run, cfg: EvalConfig, device) -> tuple:
    """cfg.samples responses per encoded held-out prompt from every model (same seed). Per model: mean RM
    score; win / tie / lose against the SFT model's response to the same prompt (same sample index), by
    RM score; KL to the SFT model (mean of log pi(y) - log pi_sft(y) over the model's own samples: the k1
    estimator); mean length in tokens; the gold reward when the task has one. Returns (results,
    samples) keyed by model name."""
    prompts = [p for p in prompts for _ in range(cfg.samples)]
    prompt_texts = [tok.decode(p) for p in prompts]  # what the models saw, after truncation
    results, samples, scores = {}, {}, {}
    for name, model in models.items():
        responses = sample_responses(model, prompts, tok.eot_token, run.max_response_len, cfg.batch_size, device,
                                     run.seed, cfg.temperature)
        rows = list(zip(prompts, responses))
        scores[name] = torch.cat(batch_scores(rm, rows, collate_sft, cfg.batch_size, device))
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
    for name, r in results.items():
        diff = scores[name] - scores["sft"]
        r["win"], r["tie"], r["lose"] = (float(x.float().mean()) for x in (diff > cfg.tie, diff.abs() <= cfg.tie, diff < -cfg.tie))
        r["win_rate"] = r["win"] + r["tie"] / 2
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
    max_prompt_len: int = 256      # tokens; prompts are cut from the left (DeepSpeed-Chat: 256)
    max_response_len: int = 256    # tokens, EOS included; also the sampling budget
    methods: str = "dpo_all,ppo_all,mpo"  # what to train beside SFT: baselines dpo_all, ppo_all and mpo
    max_train: int = 0             # > 0: use only this many SFT examples and training pairs (smoke tests)
    max_eval: int = 0              # > 0: use only this many held-out SFT examples and pairs in stage evaluations
    variants: str = ""             # ablations, ';'-separated MPO variants of --split fields: "delta=2;stage2_ref=sft"
    out: str = ""                  # run folder; default out/<dataset>
    stop_after: str = ""           # stop once this stage is done: sft | rm | split | dpo_all | ppo_all | mpo_dpo | mpo
    device: str = "auto"
    dtype: str = "auto"            # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 (CPU too: fast with AMX)
    grad_checkpoint: bool = False  # activation checkpointing: less memory, ~1/3 more compute (gpt2-large / xl)
    seed: int = 0


@dataclass
class SplitConfig:
    source: str = "resample"   # "resample": two SFT samples per prompt ranked by the RM (author); "human": dataset pairs
    delta: float = 1.0         # |gap| >= delta is easy (author: 1 on HH-RLHF, 2 on TL;DR)
    quantile: float = 0.0      # > 0: delta = this quantile of |gap| instead (an RM of unknown scale)
    stage2_ref: str = "dpo"    # PPO's KL reference: "dpo" (MPO) or "sft" (ablation)
    order: str = "easy_first"  # "easy_first": DPO on easy, PPO on hard (MPO); "hard_first": the reverse (ablation)
    batch_size: int = 32       # sampling and scoring batch


def trainable_copy(model):
    """A copy to train: a model that served as a frozen reference (dpo / ppo) has requires_grad off."""
    return copy.deepcopy(model).requires_grad_(True)


class StopAfter(Exception):
    """Raised after the stage named by --stop_after, so that train.sh can run one stage per line."""


def stage(out: Path, name: str, make, fn, stop_after=""):
    """Run a stage once: its final weights go to out/name/final.pt and its metrics (wall time included)
    to out/name/result.json; a rerun with the same out loads them and skips the stage.
    fn(folder) -> (model, metrics); make() -> an empty model to load the weights into."""
    folder = out / name
    final, result = folder / "final.pt", folder / "result.json"
    if final.exists():
        model = make()
        load_weights(model, torch.load(final, map_location="cpu", weights_only=True), final)
        print(f"{name}: done in an earlier run, loaded {final}")
        if name == stop_after:
            raise StopAfter(name)
        return model, json.loads(result.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    start = time.time()
    try:
        model, metrics = fn(folder)
    except torch.OutOfMemoryError:  # its own message is a page of allocator statistics
        raise RuntimeError(out_of_memory(name)) from None
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
    group = {"sft": "sft", "rm": "rm", "mpo_dpo": "dpo", "dpo_all": "dpo", "mpo": "ppo", "ppo_all": "ppo"}.get(name)
    knobs = (f"--{group}.batch_size and raise --{group}.grad_accum as much (same effective batch)" if group in
             ("sft", "rm", "dpo") else "--ppo.micro_batch_size (update) or --ppo.prompts_per_step (rollouts)"
             if group == "ppo" else "--split.batch_size and --eval.batch_size (sampling and scoring)")
    return (f"{name}: CUDA out of memory; lower {knobs}, or --max_prompt_len / --max_response_len; finished stages "
            "and the last checkpoint are kept: rerun with the same --out to resume")


def mpo_stages(out: Path, split: SplitConfig, sft_model, rm, easy, hard, cfgs, tok, prompts_eval, gold):
    """MPO proper: DPO on the easy pairs (init = ref = SFT), then PPO on the hard prompts with the DPO
    model as the starting policy and (unless ablated) the KL reference; the critic starts from the RM."""
    new, stop = (lambda: GPT(sft_model.config)), cfgs["run"].stop_after
    policy = sft_model
    if easy:
        policy, _ = stage(out, "mpo_dpo", new, lambda d: dpo(trainable_copy(sft_model), sft_model, easy, cfgs["dpo"], d), stop)
    if not hard:
        return policy
    ref = policy if split.stage2_ref == "dpo" else sft_model
    return stage(out, "mpo", new, lambda d: ppo(trainable_copy(policy), ref, rm, trainable_copy(rm), hard, tok,
                                                cfgs["ppo"], d, prompts_eval, gold), stop)[0]


def check_same_model(out: Path, base):
    """Before anything under out changes, a rerun's model must fit the checkpoints there: SFT's now (the
    first stage; every stage has its shape), each stage's again as it loads."""
    for path in (out / "sft" / "final.pt", out / "sft" / "sft_ckpt.pt"):
        if path.exists():
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)  # mmap: no weights read
            check_shapes(base, state.get("model", state), path)


def print_memory_estimate(config, cfgs, device):
    """One line at start: the estimated peak memory of each training stage (train.memory_estimate)."""
    R = cfgs["run"].max_response_len
    seq = cfgs["run"].max_prompt_len + R
    bf16, dpo_cfg = AUTOCAST_DTYPE.get(device.type) == torch.bfloat16, cfgs["dpo"]
    sizes = {"sft": memory_estimate(config, cfgs["sft"].batch_size, seq, R, bf16=bf16),
             "rm": memory_estimate(config, 2 * cfgs["rm"].batch_size, seq, 0, bf16=bf16),
             "dpo": memory_estimate(config, 2 * dpo_cfg.batch_size, seq, R, frozen=int(not dpo_cfg.precompute_ref),
                                    bf16=bf16),
             "ppo": memory_estimate(config, cfgs["ppo"].micro_batch_size, seq, R, trained=2, frozen=2, bf16=bf16)}
    print(f"memory estimate ({device.type}, {'bf16' if bf16 else 'fp32'}"
          f"{', activation checkpointing' if config.grad_checkpoint else ''}): "
          + ", ".join(f"{name} {size['total'] / 2**30:.2f} GiB" for name, size in sizes.items())
          + " per process (weights, AdamW state, one micro-batch's activations and logits; lower a stage's "
          "batch_size or add --grad_checkpoint if that is more than the device has)")


def run_pipeline(cfgs: dict) -> Path:
    """The whole run under --out: stages, baselines, ablation variants, evaluation, report.md."""
    run, split = cfgs["run"], cfgs["split"]
    out = Path(run.out or f"out/{run.dataset}")
    device = pick_device(run.device)
    torch.manual_seed(run.seed)
    task = load_task(run.dataset, run.data_seed, run.data_dir or None, run.template, cfgs["demo"])
    if run.gold_reward:  # tried once here, before anything under --out changes
        task.gold_reward = load_gold_reward(run.gold_reward, (task.pairs_eval[0].prompt, task.pairs_eval[0].chosen))
    tok = get_tokenizer(run.tokenizer or task.tokenizer)
    enc = lambda items, name: encode_dataset(tok, items, run.max_prompt_len, run.max_response_len, name)  # noqa: E731
    limit, eval_limit = run.max_train or None, run.max_eval or None
    sft_rows, sft_eval = enc(task.sft_train[:limit], "sft_train"), enc(task.sft_eval[:eval_limit], "sft_eval")
    pairs, pairs_eval = enc(task.pairs_train[:limit], "pairs_train"), enc(task.pairs_eval[:eval_limit], "pairs_eval")
    prompts_eval = enc(task.prompts_eval[:cfgs["eval"].prompts], "prompts_eval")  # PPO's curve, the evaluation
    base = GPT.from_pretrained(run.init) if run.init else GPT(GPTConfig(
        block_size=run.max_prompt_len + run.max_response_len, vocab_size=tok.n_vocab,
        n_layer=run.n_layer, n_head=run.n_head, n_embd=run.n_embd))
    base.config.grad_checkpoint = run.grad_checkpoint  # shared by every model built from base.config
    set_dtype(run.dtype)
    print_memory_estimate(base.config, cfgs, device)
    check_same_model(out, base)  # only now, with the data and the model checked, does anything under --out change
    out.mkdir(parents=True, exist_ok=True)
    atomic_save(json.dumps({k: asdict(v) for k, v in cfgs.items()}, indent=1).encode(), out / "config.json")
    new = lambda: GPT(base.config)  # noqa: E731

    sft_model, _ = stage(out, "sft", new, lambda d: sft(trainable_copy(base), sft_rows, cfgs["sft"], d, sft_eval), run.stop_after)
    torch.manual_seed(run.seed)  # the RM head's init: the same whether SFT ran now or was loaded (resume)
    rm_cfg = cfgs["rm"]
    rm_config = replace(base.config, **{k: getattr(rm_cfg, k) or getattr(base.config, k)
                                        for k in ("n_layer", "n_head", "n_embd")})
    rm_init = base if rm_cfg.init == "base" else sft_model  # author: the RM starts from the base LM
    start_rm = (lambda: ScalarModel.from_gpt(rm_init)) if rm_config == base.config else (lambda: ScalarModel(rm_config))
    rm, rm_metrics = stage(out, "rm", lambda: ScalarModel(rm_config), lambda d: train_reward_model(
        start_rm(), pairs, rm_cfg, d, pairs_eval, sft_eval if rm_cfg.normalize else None), run.stop_after)
    pairs_of = lambda source: cached_pairs(out, source, sft_model, rm, pairs, tok, run, split.batch_size, device)  # noqa: E731
    rows, gaps = pairs_of(split.source)
    easy, hard, split_stats = split_pairs(rows, gaps, split, out, tok)
    if task.gold_reward:  # how far the RM and its split can be trusted, measured against the truth
        rm_metrics["gold"] = gold_checks(task.gold_reward, tok, pairs_eval, rm_metrics["eval/gaps"], rows, gaps,
                                         split_stats["delta"])
    if run.stop_after == "split":
        raise StopAfter("split")

    # Baselines on the same pairs / prompts as MPO with the same stage configs: same cost per sample.
    models, methods = {"sft": sft_model}, run.methods.split(",")
    if "dpo_all" in methods:
        models["dpo_all"] = stage(out, "dpo_all", new, lambda d: dpo(
            trainable_copy(sft_model), sft_model, rows, cfgs["dpo"], d), run.stop_after)[0]
    if "ppo_all" in methods:
        all_prompts = distinct_prompts(rows)
        models["ppo_all"] = stage(out, "ppo_all", new, lambda d: ppo(
            trainable_copy(sft_model), sft_model, rm, trainable_copy(rm), all_prompts, tok, cfgs["ppo"], d,
            prompts_eval, task.gold_reward), run.stop_after)[0]
    if "mpo" in methods:
        models["mpo"] = mpo_stages(out, split, sft_model, rm, easy, hard, cfgs, tok, prompts_eval, task.gold_reward)
    variants = {}
    for text in filter(None, run.variants.split(";")):  # ablations share the SFT model, the RM and the pairs
        v = with_split(split, parse_fields(SplitConfig, text))
        folder = out / "variants" / text.replace("=", "-").replace(",", "_")
        v_easy, v_hard, variants[f"mpo[{text}]"] = split_pairs(*pairs_of(v.source), v, folder, tok)
        models[f"mpo[{text}]"] = mpo_stages(folder, v, sft_model, rm, v_easy, v_hard, cfgs, tok, prompts_eval,
                                            task.gold_reward)

    results, samples = evaluate(models, rm, prompts_eval, task.gold_reward, tok, run, cfgs["eval"], device)
    return write_report(out, cfgs, results, samples, gaps, split_stats, variants, rm_metrics, task.gold_best)


# ---------------------------------------------------------------------------------------------------
# Command line: one flag per dataclass field, --<group>.<field>; the run's own fields have no prefix

CONFIGS = {"run": RunConfig, "sft": SFTConfig, "rm": RMConfig, "split": SplitConfig, "dpo": DPOConfig,
           "ppo": PPOConfig, "eval": EvalConfig, "demo": DemoConfig}
# The demo preset (--preset demo; --dataset demo implies it): a tiny GPT trained from scratch on 2 CPU
# cores, so larger learning rates and shorter budgets; an RM of its own narrower shape trained from
# scratch for 2 epochs of 100k pairs (the budget its held-out accuracy needed), normalised so that the author's
# delta = 1 is one standard deviation of the SFT responses' scores; the real datasets keep the author's values.
DEMO = {"run": dict(max_prompt_len=32, max_response_len=48),
        "sft": dict(lr=3e-3, batch_size=32, grad_accum=1, epochs=5.0, warmup_steps=10, eval_every=100, log_every=10),
        "rm": dict(n_embd=64, lr=1e-3, batch_size=32, grad_accum=1, epochs=2.0, warmup_steps=100, weight_decay=0.0,
                   normalize=True, eval_every=1000, log_every=50),  # its own narrower shape, from scratch
        "dpo": dict(lr=1e-4, beta=0.3, batch_size=32, grad_accum=1, epochs=4.0, eval_every=0, log_every=10),
        "ppo": dict(prompts_per_step=32, ppo_epochs=4, num_minibatches=2, actor_lr=1e-4,
                    critic_lr=3e-4, kl_coef=0.05, eval_every=5),
        "eval": dict(prompts=150, samples=8)}


# Fields that take one of a few words, and the methods: anything else is refused before a run starts.
CHOICES = {"run.dataset": ("demo", "jsonl", "hh-rlhf", "tldr"), "run.preset": ("", "demo"),
           "run.tokenizer": ("", *TOKENIZERS), "run.template": ("author", "tldr"), "rm.init": ("base", "sft"),
           "run.dtype": tuple(AUTOCAST_DTYPES),
           "split.source": ("resample", "human"), "split.stage2_ref": ("dpo", "sft"),
           "split.order": ("easy_first", "hard_first"), "dpo.loss_type": ("sigmoid", "ipo"),
           "run.stop_after": ("", "sft", "rm", "split", "dpo_all", "ppo_all", "mpo_dpo", "mpo"),
           **{f"{group}.decay": ("cosine", "linear") for group in ("sft", "rm", "dpo")}}
METHODS = ("dpo_all", "ppo_all", "mpo")


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
            section.add_argument(f"--{f.name}" if group == "run" else f"--{group}.{f.name}", dest=f"{group}.{f.name}",
                                 metavar=kind.__name__.upper(), type=parse, choices=CHOICES.get(f"{group}.{f.name}"),
                                 help=f"{helps.get(f.name, '')} (default {f.default!r})")
    given = {}
    for key, value in vars(parser.parse_args(argv)).items():
        if value is not None:
            group, name = key.split(".", 1)
            given.setdefault(group, {})[name] = value
    demo = (given.get("run", {}).get("dataset", RunConfig.dataset) == "demo"
            or given.get("run", {}).get("preset", RunConfig.preset) == "demo")
    run = RunConfig(**{**(DEMO["run"] if demo else {}), **given.get("run", {})})
    if unknown := sorted(set(filter(None, run.methods.split(","))) - set(METHODS)):
        parser.error(f"argument --methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
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
        cfgs[group] = cls(**{**inherited, **(DEMO.get(group, {}) if demo else {}), **given.get(group, {})})
    cfgs["split"] = with_split(cfgs["split"], given.get("split", {}))
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
        report = run_pipeline(cfgs)
    except StopAfter as e:
        print(f"stopped after {e}, as --stop_after asked; rerun with the same --out to go on")
        return
    except torch.OutOfMemoryError:  # outside a stage (stage() explains its own); a RuntimeError, so first
        sys.exit(f"mpo: error: {out_of_memory('sampling')}")
    # Bad data or flag values, a missing download, a checkpoint of another shape, a NaN: one line, no traceback.
    except (ValueError, RuntimeError, OSError, FloatingPointError) as e:
        sys.exit("mpo: error: " + " ".join(str(e).split()))
    print(f"report: {report}")


if __name__ == "__main__":
    main()
