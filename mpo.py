"""Mixed Preference Optimization (Gou & Nguyen 2024): SFT, a reward model, then DPO on the pairs the
reward model finds easy and PPO on the prompts it finds hard.

This file is the method, in the paper's order: the SFT stage; the reward model; resampling and
scoring pairs; the reward-gap split; MPO's two stages and the baselines; the evaluation against the
SFT model; the pipeline that wires them (`run_pipeline`); the command line last. The training loop
is train.py's, DPO is dpo.py, PPO is ppo.py; runs.py keeps the run folder (resume, records, the
study's many runs), flags.py the command line's plumbing, report.py the report.

    from mpo import SFTConfig, sft, RMConfig, train_reward_model
    policy, metrics = sft(gpt, encoded_examples, SFTConfig(), "out/run")
    rm, metrics = train_reward_model(ScalarModel.from_gpt(gpt), encoded_pairs, RMConfig(), "out/rm")

Run: `python mpo.py --help`; rerunning with the same --out resumes (finished stages load, an
unfinished one continues from its last checkpoint); `torchrun --nproc_per_node=N mpo.py ...` runs
data-parallel.
Tests: python -m pytest -q tests/test_stages.py tests/test_robust.py tests/test_ddp.py
"""
import copy
import json
import math
import sys
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import tiktoken
import torch
import torch.nn.functional as F

from data import (DemoConfig, collate_pairs, collate_prompts, collate_sft, decode_text,
                  encode_dataset, get_tokenizer, load_gold_reward, load_task)
from dpo import DPOConfig, dpo, response_logps
from flags import flag_parser, given_flags, make_configs, split_variants
from model import GPT, GPTConfig, ScalarModel, keep_freed_memory, response_mask
from ppo import Models, PPOConfig, ppo
from report import METRICS, study, write_report
from runs import (Interrupted, Stages, StopAfter, compute, load_pairs, open_run_folder, out_folder,
                  out_of_memory, pairs_cache, print_memory_estimate, print_plan, records,
                  release_run_folders, run_study, save_pairs, variant_folder)
from train import (TrainConfig, atomic_save, autocast, optimizer_steps, pick_device, progress, rank,
                   sampling_batch, setup_distributed, shard, to_device, train, unshard)


# 1. Supervised fine-tuning on the chosen responses (or the task's SFT data)

@dataclass
class SFTConfig(TrainConfig):
    # The author's SFT script: lr 5e-5, 500 warm-up steps, cosine, no weight decay, 1 epoch.
    lr: float = 5e-5
    warmup_steps: int = 500
    batch_size: int = 8
    grad_accum: int = 4
    epochs: float = 1.0


def sft_loss(model, batch):
    """Mean next-token cross-entropy over response tokens + EOS; prompt and pad positions are
    masked. The summed log-probs come from dpo.response_logps (the LM head only on response
    positions, no forward on the last one), whose kernel keeps fewer logits-sized buffers than
    F.cross_entropy."""
    return -response_logps(model, batch).sum() / batch["loss_mask"].sum(), {}


def sft(model, examples, cfg: SFTConfig, out_dir, eval_examples=None):
    """Supervised fine-tuning on (prompt_ids, response_ids); returns (model, metrics) with the train
    and eval loss and perplexity (exp of the mean token loss)."""
    metrics = train(model, sft_loss, examples, eval_examples, cfg, out_dir, "sft", collate_sft)
    for split in ("train", "eval"):
        if f"{split}/loss" in metrics:
            metrics[f"{split}/ppl"] = math.exp(metrics[f"{split}/loss"])
    return model, metrics


def sft_stage(base, data, cfg: SFTConfig, folder: Path):
    """SFT from a copy of the base model (the base may also start the RM)."""
    return sft(trainable_copy(base), data.sft_train, cfg, folder, data.sft_eval)


# 2. The reward model: Bradley-Terry on the preference pairs

@dataclass
class RMConfig(TrainConfig):
    # The author's RM script: lr 5e-6 (DeepSpeed-Chat's small-model example: 5e-5); weight decay
    # 0.1, cosine, 1 epoch (RMs overfit preference data fast). Effective batch 64 = DS-Chat's 8 per
    # GPU x 8.
    lr: float = 5e-6
    batch_size: int = 8
    grad_accum: int = 8
    epochs: float = 1.0
    weight_decay: float = 0.1
    margin: float = 0.0        # Bradley-Terry margin: chosen must win by this much (Llama 2)
    center_coef: float = 0.0   # reward centring, coef * (r_c + r_r)^2 (Eisenstein et al. 2023)
    init: str = "base"         # the pipeline starts the RM from "base" (author) or "sft"
    n_layer: int = 0           # the RM's own shape, from scratch; 0 = the policy's (and init above)
    n_head: int = 0
    n_embd: int = 0
    normalize: bool = False    # after training: gain and bias so SFT responses score mean 0, std
                               # 1 (N+ detail 11)


def score_batch(rm, batch):
    """ScalarModel.score of every row of a right-padded batch (collate_pairs / collate_sft). Called
    unbound: during training `rm` can be a DDP wrapper, whose forward must run to sync gradients."""
    return ScalarModel.score(rm, batch["tokens"], lengths=batch["lengths"])


def bradley_terry_loss(chosen, rejected, margin=0.0, center_coef=0.0):
    """Per-pair loss -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2, shape (B,)."""
    return -F.logsigmoid(chosen - rejected - margin) + center_coef * (chosen + rejected) ** 2


def reward_model_loss(model, batch, cfg: RMConfig):
    """The reward-model stage's loss_fn: mean Bradley-Terry loss over a collate_pairs batch."""
    scores = score_batch(model, batch)
    chosen, rejected = scores.chunk(2)  # collate_pairs: chosen rows first, then rejected
    loss = bradley_terry_loss(chosen, rejected, cfg.margin, cfg.center_coef).mean()
    return loss, {"accuracy": (chosen > rejected).float().mean(),
                  "margin": (chosen - rejected).detach().mean(),
                  "chosen": chosen.detach().mean(), "rejected": rejected.detach().mean()}


def train_reward_model(rm, pairs, cfg: RMConfig, out_dir, eval_pairs=None, reference_examples=None):
    """Train a ScalarModel on encoded pairs with the Bradley-Terry loss; returns (rm, metrics). With
    `reference_examples` (encoded SFT (prompt, response) rows) the scores are then normalised on
    them (normalize_scores). With `eval_pairs`, the accuracy per |gap| bucket (the paper's
    table)."""
    def loss_fn(model, batch):
        return reward_model_loss(model, batch, cfg)

    metrics = train(rm, loss_fn, pairs, eval_pairs, cfg, out_dir, "rm", collate_pairs,
                    key_metric="accuracy")
    device = pick_device(cfg.device)
    if reference_examples:
        metrics |= normalize_scores(rm, reference_examples, cfg)
    if eval_pairs:
        chosen, rejected = score_pairs(rm, eval_pairs, cfg.batch_size, device, cfg.dtype)
        metrics["eval/accuracy_by_gap"] = accuracy_by_gap(chosen - rejected)
        metrics["eval/accuracy_by_gap_quartile"] = accuracy_by_gap_quartile(chosen - rejected)
    return rm, metrics


def normalize_scores(rm, examples, cfg: RMConfig) -> dict:
    """Set the head's offset and gain so the encoded (prompt, response) rows score mean 0 and
    standard deviation 1 (N+ reward normalisation): a gap is then in units of the spread of SFT
    responses, a scale on which a threshold such as delta = 1 means the same on any RM. The spread
    is measured among responses to the same prompt (pooled over the prompts that have several) when
    there are such prompts: Bradley-Terry leaves each prompt's score level free, and those levels
    would otherwise swell the std that a gap between two responses to one prompt is divided by."""
    rm.offset.zero_()  # measure the raw head output
    rm.gain.fill_(1.0)
    device = pick_device(cfg.device)
    raw = torch.cat(batch_scores(rm, examples, collate_sft, cfg.batch_size, device, cfg.dtype))
    ids = {}
    group = torch.tensor([ids.setdefault(tuple(p), len(ids)) for p, _ in examples])  # prompt index
    counts = torch.bincount(group).float()
    prompt_mean = torch.zeros(len(ids)).index_add(0, group, raw) / counts
    within = raw - prompt_mean[group]
    dof = int((counts - 1).sum())
    std = (within.square().sum() / dof).sqrt() if dof > 0 else raw.std()
    rm.offset.fill_(raw.mean())
    rm.gain.fill_(1 / std.clamp_min(1e-6))
    return {"offset": float(rm.offset), "gain": float(rm.gain),
            "gain_from": "within prompts" if dof > 0 else "all responses"}


def rm_shape(cfg: RMConfig, base) -> GPTConfig:
    """The RM's shape: the policy's, with --rm.n_layer / n_head / n_embd where they are given."""
    shape = replace(base.config, **{k: getattr(cfg, k) or getattr(base.config, k)
                                    for k in ("n_layer", "n_head", "n_embd")})
    if shape.n_embd % shape.n_head:
        raise ValueError(f"argument --rm.n_embd: must be a multiple of the RM's {shape.n_head} "
                         f"heads, got {shape.n_embd}")
    return shape


def rm_stage(base, sft_model, data, cfg: RMConfig, folder: Path):
    """The RM: of the policy's shape from the base LM (author) or the SFT model (--rm.init), else of
    its own shape from scratch; normalised on the held-out SFT rows with --rm.normalize."""
    shape = rm_shape(cfg, base)
    if shape == base.config:
        start = ScalarModel.from_gpt(base if cfg.init == "base" else sft_model)
    else:
        start = ScalarModel(shape)
    return train_reward_model(start, data.pairs_train, cfg, folder, data.pairs_eval,
                              data.sft_eval if cfg.normalize else None)


GAP_BUCKETS = ((0, 1, "[0,1)"), (1, 2, "[1,2)"), (2, 3, "[2,3)"), (3, math.inf, ">=3"))


def accuracy_by_gap(gaps, by=None) -> dict:
    """Share of pairs with gap > 0 (chosen scored above rejected), bucketed by |by| (default
    |gaps|): the paper's table of RM accuracy against the RM score gap (61 / 81 / 90 / 97 % on
    HH-RLHF). Returns {bucket: {"accuracy": share or None when empty, "pairs": count}}."""
    gaps = torch.as_tensor(gaps, dtype=torch.float)
    size = gaps.abs() if by is None else torch.as_tensor(by, dtype=torch.float).abs()
    out = {}
    for low, high, name in GAP_BUCKETS:
        inside = (size >= low) & (size < high)
        n = int(inside.sum())
        out[name] = {"accuracy": int((gaps[inside] > 0).sum()) / n if n else None, "pairs": n}
    return out


def accuracy_by_gap_quartile(gaps) -> dict:
    """accuracy_by_gap over the quartiles of |gap| by rank (four equal shares of the pairs, whatever
    the RM's scale): {"q1".."q4": {"accuracy", "pairs", "low", "high"}}, low / high the bucket's
    |gap| range. The study's claim (a) compares q4 with q1."""
    gaps = torch.as_tensor(gaps, dtype=torch.float)
    order = gaps.abs().argsort()
    out = {}
    for i, part in enumerate(order.tensor_split(4)):
        if len(part):
            size = gaps[part].abs()
            out[f"q{i + 1}"] = {"accuracy": float((gaps[part] > 0).float().mean()),
                                "pairs": len(part),
                                "low": float(size.min()), "high": float(size.max())}
    return out


@torch.no_grad()
def batch_outputs(fn, model, rows, collate, batch_size, device, dtype, name="scoring") -> list:
    """fn(model, batch) over encoded rows, batch by batch, in eval mode: one CPU tensor per batch.
    Under torchrun each rank takes a shard of the rows and every rank gets all the outputs, in
    order. `name` labels the progress lines of a long pass."""
    model.to(device).eval()
    outputs, mine = [], shard(rows)
    for i in progress(range(0, len(mine), batch_size), name):
        batch = to_device(collate(mine[i:i + batch_size]), device)
        with autocast(device, dtype):
            outputs.append(fn(model, batch).float().cpu())
    return unshard(outputs)


def batch_scores(rm, rows, collate, batch_size, device, dtype, name="rm scores") -> list:
    """RM scores of encoded rows, one tensor per batch (for pairs: the chosen rows, then the
    rejected)."""
    return batch_outputs(score_batch, rm, rows, collate, batch_size, device, dtype, name)


def score_pairs(rm, pairs, batch_size, device, dtype):
    """(chosen_scores, rejected_scores), each (N,), of encoded (prompt, chosen, rejected)
    triples."""
    scores = batch_scores(rm, pairs, collate_pairs, batch_size, device, dtype)
    chosen, rejected = zip(*(s.chunk(2) for s in scores))
    return torch.cat(chosen), torch.cat(rejected)


# 3. Resample and score: two SFT samples per prompt, the RM's gap between them

@torch.no_grad()
def sample_responses(model, prompts, eos_id, run, batch_size, temperature=1.0, top_k=None,
                     top_p=None, name="sampling") -> list:
    """One sampled response (token ids, EOS included when reached) per encoded prompt, up to
    --max_response_len tokens, from the run's seed, on its device and under its --dtype. Under
    torchrun each rank samples for a shard of the prompts (its own seed) and every rank gets all
    responses."""
    device = pick_device(run.device)
    model.to(device).eval()
    g = torch.Generator(device).manual_seed(run.seed + rank() * 100003)
    out, mine = [], shard(prompts)
    for i in progress(range(0, len(mine), batch_size), name):
        batch = to_device(collate_prompts(mine[i:i + batch_size]), device)
        T = batch["tokens"].size(1)
        with autocast(device, run.dtype):
            new = model.generate(batch["tokens"], run.max_response_len, temperature, top_k, top_p,
                                 eos_id, batch["attention_mask"], generator=g)[:, T:]
        keep = response_mask(new, eos_id)
        out += [row[m].tolist() for row, m in zip(new.cpu(), keep.cpu())]
    return unshard(out)


def distinct_prompts(rows) -> list:
    """The prompts of encoded rows, each once, in order of first appearance."""
    return [list(p) for p in dict.fromkeys(tuple(row[0]) for row in rows)]


def make_pairs(sft_model, rm, pairs, split, run, eos_id):
    """The pairs to split, as encoded (prompt, chosen, rejected), and their gaps r(chosen) -
    r(rejected). "resample" (author's code): two SFT samples per training row (per distinct prompt
    unless split.pairs_per_row) at temperature 1, top-k 50, top-p 0.9, the higher-scored one chosen,
    so every gap is >= 0. "human": the dataset's own pairs; a negative gap means the RM disagrees
    with the label, and |gap| decides the side all the same."""
    device = pick_device(run.device)
    if split.source == "human":
        chosen, rejected = score_pairs(rm, pairs, split.batch_size, device, run.dtype)
        return pairs, chosen - rejected
    if split.source != "resample":
        raise ValueError(f"--split.source must be 'resample' or 'human', got {split.source!r}")
    prompts = [row[0] for row in pairs] if split.pairs_per_row else distinct_prompts(pairs)
    twice = [list(p) for p in prompts for _ in range(2)]
    responses = sample_responses(sft_model, twice, eos_id, run, split.batch_size, 1.0, 50, 0.9,
                                 "resample: SFT samples")
    scores = torch.cat(batch_scores(rm, list(zip(twice, responses)), collate_sft, split.batch_size,
                                    device, run.dtype, "resample: RM scores"))
    rows, gaps = [], []
    for i in range(0, len(twice), 2):
        first = bool(scores[i] >= scores[i + 1])
        rows.append((twice[i], responses[i if first else i + 1], responses[i + 1 if first else i]))
        gaps.append(float((scores[i] - scores[i + 1]).abs()))
    return rows, torch.tensor(gaps)


# 4. The split: the pairs with a large gap are easy (DPO), the prompts of the rest hard (PPO)

@dataclass
class SplitConfig:
    source: str = "resample"    # "resample": two SFT samples per row ranked by the RM (author);
                                # "human": the dataset's pairs
    delta: float = 1.0          # |gap| >= delta is easy (author: 1 on HH-RLHF, 2 on TL;DR)
    quantile: float = 0.0       # > 0: delta = this quantile of |gap| instead (an RM of unknown
                                # scale)
    stage2_ref: str = "dpo"     # PPO's KL reference: "dpo" (MPO) or "sft" (ablation)
    order: str = "easy_first"   # "easy_first": DPO on easy, PPO on hard (MPO); "hard_first": the
                                # reverse (ablation)
    pairs_per_row: bool = True  # resample: a pair per training row (author; TL;DR repeats posts),
                                # else per prompt
    batch_size: int = 0         # sampling and scoring batch; 0 = 32 on a CPU, sized from free
                                # memory on a GPU


def split_by_reward_gap(gaps, delta):
    """MPO's data selection: pairs with |gap| >= delta are easy (reliable labels: DPO), the rest are
    hard (PPO, which needs only their prompts). Returns (easy_index, hard_index) as LongTensors."""
    size = torch.as_tensor(gaps, dtype=torch.float).abs()
    return (size >= delta).nonzero().flatten(), (size < delta).nonzero().flatten()


def split_pairs(rows, gaps, split, folder: Path, tok):
    """Split at delta (or at a quantile of |gap|), write split.jsonl (one line per pair: side, gap
    and the texts) for inspection, and return (easy pairs, hard prompts, statistics)."""
    delta = float(torch.quantile(gaps.abs(), split.quantile)) if split.quantile > 0 else split.delta
    easy, hard = split_by_reward_gap(gaps, delta)
    side = dict.fromkeys(easy.tolist(), "easy") | dict.fromkeys(hard.tolist(), "hard")
    lines = [json.dumps({"index": i, "side": side[i], "gap": g, "prompt": tok.decode(p),
                         "chosen": tok.decode(c), "rejected": tok.decode(r)})
             for i, (g, (p, c, r)) in enumerate(zip(gaps.tolist(), rows))]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save(("\n".join(lines) + "\n").encode(), folder / "split.jsonl")
    if split.order == "hard_first":  # ablation: DPO on the hard pairs, PPO on the easy prompts
        easy, hard = hard, easy
    easy_pairs = [rows[i] for i in easy]
    hard_prompts = distinct_prompts([rows[i] for i in hard])
    if not easy_pairs:
        print(f"warning: delta {delta:.3g} leaves no pairs for DPO and {len(hard_prompts)} prompts "
              "for PPO: MPO skips its DPO stage and runs PPO from the SFT model (the SFT model is "
              "also its reference)")
    if not hard_prompts:
        print(f"warning: delta {delta:.3g} leaves no prompts for PPO and {len(easy_pairs)} pairs "
              "for DPO: MPO runs DPO on them and skips its PPO stage (MPO is then the DPO model)")
    return easy_pairs, hard_prompts, {"source": split.source, "delta": delta, "pairs": len(rows),
                                      "easy_pairs": len(easy_pairs),
                                      "easy_share": len(easy_pairs) / max(len(rows), 1),
                                      "hard_prompts": len(hard_prompts)}


def gold_gaps(gold_reward, tok, rows) -> torch.Tensor:
    """gold(prompt, chosen) - gold(prompt, rejected) of encoded (prompt, chosen, rejected) rows."""
    def gold(prompt, response):
        return gold_reward(decode_text(tok, prompt), decode_text(tok, response))

    return torch.tensor([gold(p, c) - gold(p, r) for p, c, r in rows])


def agreement(gaps, gold) -> float | None:
    """Share of pairs ranked as gold ranks them (gold ties count half); None for no pairs."""
    if not len(gold):
        return None
    return float(((gaps * gold > 0).float() + 0.5 * (gold == 0).float()).mean())


def gold_checks(data, eval_gaps, rows, gaps, delta) -> dict:
    """The RM and the split against the task's gold reward. On the held-out pairs (eval_gaps, their
    RM gaps): the RM's accuracy against the labels beside the label ceiling (the labels' own
    agreement with gold: a perfect RM would score it), overall and per |RM gap| bucket. On the pairs
    split (the resampled ones by default): the RM's agreement with gold on each side and the Pearson
    correlation of the RM gap with the gold gap."""
    eval_gaps = torch.as_tensor(eval_gaps)
    gold = gold_gaps(data.gold_reward, data.tok, data.pairs_eval)
    ones = torch.ones_like(gold)
    by_gap = {}
    for low, high, name in GAP_BUCKETS:
        inside = (eval_gaps.abs() >= low) & (eval_gaps.abs() < high)
        by_gap[name] = {"accuracy": agreement(eval_gaps[inside], ones[inside]),
                        "ceiling": agreement(ones[inside], gold[inside]),
                        "rm_vs_gold": agreement(eval_gaps[inside], gold[inside]),
                        "pairs": int(inside.sum())}
    split_gold = gold_gaps(data.gold_reward, data.tok, rows)
    easy = gaps.abs() >= delta
    pearson = None
    if len(gaps) > 1:
        pearson = float(torch.corrcoef(torch.stack([gaps.float(), split_gold]))[0, 1])
    return {"accuracy": agreement(eval_gaps, ones), "ceiling": agreement(ones, gold),
            "by_gap": by_gap,
            "easy_vs_gold": agreement(gaps[easy], split_gold[easy]),
            "hard_vs_gold": agreement(gaps[~easy], split_gold[~easy]),
            "pearson": pearson}


# 5. MPO's two stages, and the baselines built from the same pieces

def trainable_copy(model):
    """A copy to train: a model that served as a frozen reference (dpo / ppo) has requires_grad
    off."""
    return copy.deepcopy(model).requires_grad_(True)


def dpo_stage(sft_model, pairs, cfg: DPOConfig, folder: Path):
    """DPO from the SFT model, which is also its frozen reference: MPO's first stage on the easy
    pairs, dpo_all on all of them, dpo_human on the dataset's own pairs. The stage is named after
    its folder."""
    return dpo(trainable_copy(sft_model), sft_model, pairs, cfg, folder, stage=folder.name)


def ppo_stage(policy, ref, rm, prompts, cfg: PPOConfig, data, folder: Path):
    """PPO from `policy` on `prompts` against the frozen `ref` (the KL reference) and `rm`, with a
    critic that starts from the RM: MPO's second stage on the hard prompts, ppo_all on all of them.
    Its curve is evaluated on the held-out prompts, with the gold reward when the task has one."""
    models = Models(trainable_copy(policy), ref, rm, trainable_copy(rm))
    return ppo(models, prompts, data.tok, cfg, folder, data.prompts_eval, data.gold_reward,
               folder.name)


def mpo_stages(stages: Stages, cfgs, data, sft_model, rm, easy, hard):
    """MPO proper: DPO on the easy pairs (init = ref = SFT), then PPO on the hard prompts with the
    DPO model as the starting policy and (unless --split.stage2_ref sft) the KL reference; the
    critic starts from the RM. With no easy pairs PPO starts from the SFT model; with no hard
    prompts MPO is the DPO model."""
    new = partial(GPT, sft_model.config)
    policy = sft_model
    if easy:
        policy, _ = stages.run("mpo_dpo", new, partial(dpo_stage, sft_model, easy, cfgs["dpo"]))
    else:
        stages.stop_if_last("mpo_dpo", skipped=True)
    if not hard:
        stages.stop_if_last("mpo", skipped=True)
        return policy
    ref = policy if cfgs["split"].stage2_ref == "dpo" else sft_model
    return stages.run("mpo", new, partial(ppo_stage, policy, ref, rm, hard, cfgs["ppo"], data))[0]


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


# 6. Evaluation: every model against the SFT model on held-out prompts

@dataclass
class EvalConfig:
    prompts: int = 500        # held-out prompts (paper: RM score of one sampled response per test
                              # prompt)
    samples: int = 1          # responses per prompt: more of them shrink the standard errors
    temperature: float = 1.0  # 1.0 makes the KL estimate below unbiased
    batch_size: int = 0       # sampling and scoring batch; 0 = 32 on a CPU, sized from free memory
                              # on a GPU
    tie: float = 0.0          # |RM score difference| <= tie counts as a tie
    show: int = 3             # sample responses per model in the report


def logps_of(model, rows, batch_size, device, dtype):
    """Summed response log-probs (N,) of encoded (prompt, response) rows under `model`."""
    return torch.cat(batch_outputs(response_logps, model, rows, collate_sft, batch_size, device,
                                   dtype, "log-probs"))


def compare_to_sft(models: dict, rm, data, run, cfg: EvalConfig) -> tuple:
    """cfg.samples responses per held-out prompt (data.prompts_eval) from every model (same seed).
    Per model: mean RM score; win / tie / lose against the SFT model's response to the same prompt
    (same sample index), by RM score; KL to the SFT model (mean of log pi(y) - log pi_sft(y) over
    the model's own samples: the k1 estimator); mean length in tokens; the gold reward when the task
    has one. With data.subsets (one name per prompt), the RM score, gold and win rate also per
    subset under "subsets". Returns (results, samples) keyed by model name."""
    tok, device = data.tok, pick_device(run.device)
    prompts = [p for p in data.prompts_eval for _ in range(cfg.samples)]
    prompt_texts = [tok.decode(p) for p in prompts]  # what the models saw, after truncation
    results, samples, scores = {}, {}, {}
    for name, model in models.items():
        responses = sample_responses(model, prompts, tok.eot_token, run, cfg.batch_size,
                                     cfg.temperature, name=f"evaluate {name}: sampling")
        rows = list(zip(prompts, responses))
        scores[name] = torch.cat(batch_scores(rm, rows, collate_sft, cfg.batch_size, device,
                                              run.dtype, f"evaluate {name}: RM"))
        kl = (logps_of(model, rows, cfg.batch_size, device, run.dtype)
              - logps_of(models["sft"], rows, cfg.batch_size, device, run.dtype))
        texts = [decode_text(tok, r) for r in responses]
        results[name] = {}
        if data.gold_reward:  # standard error over prompts: a prompt's samples are not independent
            gold = torch.tensor([data.gold_reward(p, t) for p, t in zip(prompt_texts, texts)])
            per_prompt = gold.view(-1, cfg.samples).mean(1)
            results[name] = {"gold": float(gold.mean()),
                             "gold_se": float(per_prompt.std() / len(per_prompt) ** 0.5)}
        results[name] |= {"rm_score": float(scores[name].mean()), "kl_to_sft": float(kl.mean()),
                          "length": sum(map(len, responses)) / len(responses)}
        samples[name] = list(zip(prompt_texts, texts))[::cfg.samples][:cfg.show]  # one per prompt
    groups = {"all": torch.ones(len(prompts), dtype=torch.bool)}
    if data.subsets:
        per_sample = [s for s in data.subsets for _ in range(cfg.samples)]
        for subset in dict.fromkeys(data.subsets):
            groups[subset] = torch.tensor([x == subset for x in per_sample])
    for name, r in results.items():
        for group, inside in groups.items():
            diff = scores[name][inside] - scores["sft"][inside]
            win, tie, lose = (float(x.float().mean()) for x in
                              (diff > cfg.tie, diff.abs() <= cfg.tie, diff < -cfg.tie))
            if group == "all":
                r |= {"win": win, "tie": tie, "lose": lose, "win_rate": win + tie / 2}
            else:
                r.setdefault("subsets", {})[group] = {
                    "prompts": int(inside.sum()) // cfg.samples,
                    "rm_score": float(scores[name][inside].mean()), "win_rate": win + tie / 2}
    return results, samples


# 7. The pipeline: SFT -> RM -> pairs -> split -> DPO on easy pairs -> PPO on hard prompts, and the
# baselines beside it

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
    budget: str = "data"           # "data": each stage's steps follow its data; "matched":
                                   # dpo_all's steps for all
    sweep: str = ""                # "0.5,1,2": the run at these multiples of --dpo.beta and
                                   # --ppo.kl_coef (frontier)


@dataclass
class Data:
    """A task encoded for this run: the token-id rows the stages train and are evaluated on."""
    tok: tiktoken.Encoding
    sft_train: list = field(default_factory=list)     # (prompt, response)
    sft_eval: list = field(default_factory=list)      # held out: SFT's eval, the RM's normalisation
    pairs_train: list = field(default_factory=list)   # (prompt, chosen, rejected)
    pairs_eval: list = field(default_factory=list)    # held out: the RM's accuracy table
    prompts_eval: list = field(default_factory=list)  # held out: PPO's curve, the final evaluation
    subsets: list | None = None                       # each held-out prompt's subset (HH-RLHF)
    gold_reward: Callable | None = None               # the task's known (prompt, response) -> float
    gold_best: float | None = None                    # the best mean gold a policy can reach


def load_data(run: RunConfig, eval_prompts: int, demo: DemoConfig) -> Data:
    """The task --dataset names (and its gold reward, or --gold_reward's), encoded and cut to the
    run's lengths (data.encode_dataset); --max_train / --max_eval take the first rows only."""
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
    kept = []  # stratified by subset where the task has them (data.interleave)
    data.prompts_eval = encode(task.prompts_eval[:eval_prompts], "prompts_eval", kept)
    data.subsets = [task.eval_subsets[i] for i in kept] if task.eval_subsets else None
    return data


def base_model(run: RunConfig, vocab_size: int) -> GPT:
    """The model SFT (and by default the RM) starts from: --init's GPT-2, else a fresh GPT."""
    seq = run.max_prompt_len + run.max_response_len
    if run.init:
        base = GPT.from_pretrained(run.init)
    else:
        base = GPT(GPTConfig(block_size=seq, vocab_size=vocab_size, n_layer=run.n_layer,
                             n_head=run.n_head, n_embd=run.n_embd))
    base.config.grad_checkpoint = run.grad_checkpoint  # every model built from base.config
    if seq > base.config.block_size:
        raise ValueError(f"--max_prompt_len {run.max_prompt_len} + --max_response_len "
                         f"{run.max_response_len} is more than the {base.config.block_size} "
                         f"positions of --init {run.init}")
    return base


def run_pipeline(cfgs: dict) -> Path:
    """The whole run under --out: stages, baselines, ablation variants, evaluation, report.md and
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

    def sized(s):  # a device-sized sampling batch where --split.batch_size is 0
        return replace(s, batch_size=s.batch_size or batch)

    print_memory_estimate(base.config, cfgs, device)
    # Only now, with the data and the model checked, is --out locked and compared with the flags.
    planned = open_run_folder(out, cfgs, base)
    print_plan({**cfgs, "split": sized(split)}, base, data.sft_train, data.pairs_train, device)
    new = partial(GPT, base.config)
    stages = Stages(out, records(cfgs, split), run.stop_after)

    sft_model, _ = stages.run("sft", new, partial(sft_stage, base, data, cfgs["sft"]))
    torch.manual_seed(run.seed)  # the RM head's init: the same whether SFT ran now or was loaded
    rm, rm_metrics = stages.run("rm", partial(ScalarModel, rm_shape(cfgs["rm"], base)),
                                partial(rm_stage, base, sft_model, data, cfgs["rm"]))

    def pairs_of(s):  # resampling is the costly part: once per run folder and source
        cache = pairs_cache(out, s)
        if cache.exists():
            return load_pairs(cache)
        rows, gaps = make_pairs(sft_model, rm, data.pairs_train, sized(s), run, data.tok.eot_token)
        save_pairs(cache, rows, gaps, records(cfgs, s)["pairs"])
        return rows, gaps

    rows, gaps = pairs_of(split)
    easy, hard, split_stats = split_pairs(rows, gaps, split, out, data.tok)
    if data.gold_reward:  # how far the RM and its split can be trusted, measured against the truth
        chosen, rejected = score_pairs(rm, data.pairs_eval, batch, device, run.dtype)
        rm_metrics["gold"] = gold_checks(data, chosen - rejected, rows, gaps, split_stats["delta"])
    stages.stop_if_last("split")

    # Baselines on the same pairs / prompts as MPO with the same stage configs: same cost per
    # sample. Under --budget matched every method gets dpo_all's optimizer steps (matched_budget).
    steps = optimizer_steps(cfgs["dpo"], len(rows))

    def budget(dpo_data, ppo_data):  # the configs of a method with DPO and PPO on these data
        if run.budget != "matched":
            return cfgs
        return matched_budget(cfgs, steps, bool(dpo_data), bool(ppo_data))

    models, methods = {"sft": sft_model}, run.methods.split(",")
    baselines = {"dpo_all": partial(dpo_stage, sft_model, rows, budget(rows, [])["dpo"]),
                 # the paper's vanilla DPO: the dataset's own pairs, not the resampled ones
                 "dpo_human": partial(dpo_stage, sft_model, data.pairs_train,
                                      budget(data.pairs_train, [])["dpo"]),
                 "ppo_all": partial(ppo_stage, sft_model, sft_model, rm, distinct_prompts(rows),
                                    budget([], rows)["ppo"], data)}
    for name, train_stage in baselines.items():
        if name in methods:
            models[name] = stages.run(name, new, train_stage)[0]
        else:
            stages.stop_if_last(name, skipped=True)
    if "mpo_dpo" in methods and easy:  # MPO's first stage alone (the same stage as mpo_stages')
        mpo_dpo = partial(dpo_stage, sft_model, easy, budget(easy, hard)["dpo"])
        models["mpo_dpo"] = stages.run("mpo_dpo", new, mpo_dpo)[0]
    elif "mpo" not in methods:  # with mpo, mpo_stages runs or skips it
        stages.stop_if_last("mpo_dpo", skipped=True)
    if "mpo" in methods:
        models["mpo"] = mpo_stages(stages, budget(easy, hard), data, sft_model, rm, easy, hard)
    else:
        stages.stop_if_last("mpo", skipped=True)
    folders = {"sft": ["sft"], "dpo_all": ["dpo_all"], "dpo_human": ["dpo_human"],
               "ppo_all": ["ppo_all"], "mpo_dpo": ["mpo_dpo"], "mpo": ["mpo_dpo", "mpo"]}
    variants = {}
    for text, v in split_variants(run, split):  # ablations share SFT, the RM and the pairs
        folder, name = variant_folder(out, text), f"mpo[{text}]"
        folders[name] = [str(folder.relative_to(out) / stage) for stage in ("mpo_dpo", "mpo")]
        v_easy, v_hard, variants[name] = split_pairs(*pairs_of(v), v, folder, data.tok)
        v_stages = Stages(folder, records(cfgs, v), run.stop_after)
        models[name] = mpo_stages(v_stages, {**budget(v_easy, v_hard), "split": v}, data, sft_model,
                                  rm, v_easy, v_hard)

    results, samples = compare_to_sft(models, rm, data, run, cfgs["eval"])
    made = {str(path.relative_to(out)).removesuffix(".pt"): settings
            for path, settings in planned.items()
            if (path / "final.pt").exists() or path.is_file()}  # the stages this run ran or loaded
    report = write_report(out, cfgs, results, samples, gaps, split_stats, variants, rm_metrics,
                          made, data.gold_best)
    record = {"seed": run.seed, "gap_buckets": rm_metrics.get("eval/accuracy_by_gap_quartile", {}),
              "methods": {name: {**{k: r[k] for k in METRICS if k in r},
                                 "compute": compute(out, folders[name])}
                          for name, r in results.items()}}
    if "gold" in rm_metrics:  # the study's table of each seed's RM and split against gold
        record["gold_checks"] = {**rm_metrics["gold"], "easy_share": split_stats["easy_share"]}
    record["samples"] = samples  # the study's report shows its first seed's
    atomic_save(json.dumps(study([record]), indent=1).encode(), out / "results.json")  # one seed
    return report


# 8. The command line: a flag per config field (flags.py), the demo's preset, main

CONFIGS = {"run": RunConfig, "sft": SFTConfig, "rm": RMConfig, "split": SplitConfig,
           "dpo": DPOConfig, "ppo": PPOConfig, "eval": EvalConfig, "demo": DemoConfig}
# The demo preset (--preset demo; --dataset demo implies it): a tiny GPT trained from scratch on 2
# CPU cores, so larger learning rates and shorter budgets; an RM of its own shape, 96 wide with 24
# heads of 4 (wider with more heads, it learns more of the banned word and repeats) from scratch
# for 2 epochs of 100k pairs (the budget its held-out accuracy needed), normalised so that the
# author's delta = 1 is one standard deviation of the SFT responses' scores; the real
# datasets keep the author's values. A study over 3 seeds, every method with dpo_all's optimizer
# steps (--budget matched), by default.
DEMO = {"run": dict(max_prompt_len=32, max_response_len=48, seeds=3, budget="matched"),
        "sft": dict(lr=3e-3, batch_size=32, grad_accum=1, epochs=5.0, warmup_steps=10,
                    eval_every=100, log_every=10),
        "rm": dict(n_embd=96, n_head=24, lr=1e-3, batch_size=32, grad_accum=1, epochs=2.0,
                   warmup_steps=100, weight_decay=0.0, normalize=True, eval_every=1000,
                   log_every=50),
        "split": dict(pairs_per_row=False),  # 100,000 pairs share 498 prompts: a pair per prompt
        "dpo": dict(lr=1e-4, beta=0.3, batch_size=32, grad_accum=1, epochs=4.0, warmup_steps=0,
                    eval_every=0, log_every=10),
        "ppo": dict(prompts_per_step=32, ppo_epochs=4, num_minibatches=2, actor_lr=1e-4,
                    critic_lr=3e-4, kl_coef=0.05, warmup_steps=0, decay="constant",
                    whiten_advantages=True, eval_every=5, eval_prompts=0),
        "eval": dict(prompts=150, samples=8)}
# The author's values that differ by dataset (the config dataclasses hold the HH-RLHF ones).
DATASET_DEFAULTS = {"tldr": {"split": dict(delta=2.0)}}


def parse_args(argv=None) -> dict:
    """{group: config}: dataclass defaults, then the demo preset's values (--preset demo, implied by
    --dataset demo) or the author's values for the dataset, then the flags given; checked."""
    preset_text = "; ".join(f"{g}: " + ", ".join(f"{k}={v}" for k, v in d.items())
                            for g, d in DEMO.items())
    parser = flag_parser(
        CONFIGS, description=__doc__.split("\n\n")[0],
        usage="python mpo.py [--dataset demo|jsonl|hh-rlhf|tldr] [--preset demo] [--init gpt2] "
              "[--out DIR] [--GROUP.FIELD VALUE ...]",
        epilog=f"--preset demo (implied by --dataset demo) sets: {preset_text}")
    given = given_flags(parser, argv)
    dataset = given.get("run", {}).get("dataset", RunConfig.dataset)
    demo = dataset == "demo" or given.get("run", {}).get("preset", RunConfig.preset) == "demo"
    try:
        return make_configs(CONFIGS, DEMO if demo else DATASET_DEFAULTS.get(dataset, {}), given)
    except ValueError as e:
        parser.error(str(e))


def main(argv=None):
    keep_freed_memory()  # glibc keeps freed logits-sized blocks for reuse (model.py)
    cfgs = parse_args(argv)
    try:
        setup_distributed()  # under torchrun; a no-op otherwise
        report = run_study(cfgs, run_pipeline)  # one run, or one per seed and --sweep multiple
    except StopAfter as e:
        print(f"stopped after {e}, as --stop_after asked; rerun with the same --out to go on")
        return
    except KeyboardInterrupt as e:  # Ctrl-C: finished stages and the last checkpoint are on disk
        where = f"in stage {e}" if isinstance(e, Interrupted) else "outside the training stages"
        print(f"\nmpo: interrupted {where}; rerun with the same --out to resume", file=sys.stderr)
        sys.exit(130)
    except torch.OutOfMemoryError:  # outside a stage (Stages.run explains its own); before
        # RuntimeError, which it is
        sys.exit(f"mpo: error: {out_of_memory('sampling')}")
    # Bad data or flag values, a missing download, a checkpoint of another shape, a NaN: one line.
    except (ValueError, RuntimeError, OSError, FloatingPointError) as e:
        sys.exit("mpo: error: " + " ".join(str(e).split()))
    finally:
        release_run_folders()
    print(f"report: {report}")


if __name__ == "__main__":
    main()
