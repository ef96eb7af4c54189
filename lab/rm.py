"""The reward model's plumbing around mpo.train_reward_model: the normalisation of its scores, the
tables of its accuracy by score gap (the paper's evidence for the threshold), batched scoring, how
far the RM and its split can be trusted, measured against a task's gold reward, and where the RM
starts (the base LM under a new head, or a shape of its own)."""
import math
from dataclasses import replace

import torch

from data import collate_pairs, collate_sft
from lab.devices import map_batches, pick_device
from lab.readers import decode_text
from model import ScalarModel


def normalize_scores(rm, examples, cfg) -> dict:
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


def gap_tables(rm, eval_pairs, cfg) -> dict:
    """The RM's accuracy on held-out pairs by |gap| bucket and by |gap| quartile."""
    device = pick_device(cfg.device)
    chosen, rejected = score_pairs(rm, eval_pairs, cfg.batch_size, device, cfg.dtype)
    return {"eval/accuracy_by_gap": accuracy_by_gap(chosen - rejected),
            "eval/accuracy_by_gap_quartile": accuracy_by_gap_quartile(chosen - rejected)}


def score_batch(rm, batch):
    """ScalarModel.score of every row of a right-padded batch (collate_pairs / collate_sft). Called
    unbound: during training `rm` can be a DDP wrapper, whose forward must run to sync gradients."""
    return ScalarModel.score(rm, batch["tokens"], lengths=batch["lengths"])


def batch_scores(rm, rows, collate, batch_size, device, dtype, name="rm scores") -> list:
    """RM scores of encoded rows, one tensor per batch (for pairs: the chosen rows, then the
    rejected)."""
    return map_batches(score_batch, rm, rows, collate, batch_size, device, dtype, name)


def score_pairs(rm, pairs, batch_size, device, dtype):
    """(chosen_scores, rejected_scores), each (N,), of encoded (prompt, chosen, rejected)
    triples."""
    scores = batch_scores(rm, pairs, collate_pairs, batch_size, device, dtype)
    chosen, rejected = zip(*(s.chunk(2) for s in scores))
    return torch.cat(chosen), torch.cat(rejected)


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


def reward_model_shape(cfg, policy):
    """The RM's shape: the policy's, with --rm.n_layer / n_head / n_embd where they are given."""
    return replace(policy, **{k: getattr(cfg, k) or getattr(policy, k)
                              for k in ("n_layer", "n_head", "n_embd")})


def reward_model_start(base, sft_model, cfg) -> ScalarModel:
    """The RM before training: the base LM (author) or the SFT model (--rm.init sft) under a new
    scalar head; or, with --rm.n_layer / n_head / n_embd, a model of its own shape from scratch."""
    shape = reward_model_shape(cfg, base.config)
    if shape.n_embd % shape.n_head:
        raise ValueError(f"argument --rm.n_embd: must be a multiple of the RM's {shape.n_head} "
                         f"heads, got {shape.n_embd}")
    if shape != base.config:
        return ScalarModel(shape)
    return ScalarModel.from_gpt(base if cfg.init == "base" else sft_model)
