"""Mixed Preference Optimization (Gou & Nguyen 2024, arXiv 2403.19443): SFT, a reward model, then
DPO on the pairs the reward model finds easy and PPO on the prompts it finds hard.

The method in the paper's order, a section each: SFT, the reward model, resampling and scoring,
the split at the reward gap (the paper's data selection), the two stages (its two-stage training),
and last `mpo()`, the whole algorithm in one function. Left to the lab: the run folder, baselines
and ablations (lab/pipeline.py), the RM's start, normalisation, gap tables and batched scoring
(lab/rm.py), batched sampling and the evaluation (lab/evaluate.py), the command line (lab/cli.py).

    from mpo import SFTConfig, sft, RMConfig, train_reward_model
    policy, metrics = sft(gpt, encoded_examples, SFTConfig(), "out/run")
    rm, metrics = train_reward_model(model.ScalarModel.from_gpt(gpt), pairs, RMConfig(), "out/rm")

Tests: python -m pytest -q tests/test_stages.py tests/test_mpo.py
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import collate_pairs, collate_sft
from dpo import dpo, response_logps
from lab.devices import pick_device
from lab.estimates import sampling_batch
from lab.evaluate import compare_to_sft, sample_responses
from lab.rm import batch_scores, gap_tables, normalize_scores, reward_model_start, score_pairs
from model import ScalarModel
from ppo import Models, ppo
from train import TrainConfig, train


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
    masked (the summed log-probs of dpo.response_logps)."""
    return -response_logps(model, batch).sum() / batch["loss_mask"].sum(), {}


def sft(model, examples, cfg: SFTConfig, out_dir, eval_examples=None):
    """Supervised fine-tuning on (prompt_ids, response_ids); returns (model, metrics) with the train
    and eval loss and perplexity (exp of the mean token loss)."""
    metrics = train(model, sft_loss, examples, eval_examples, cfg, out_dir, "sft", collate_sft)
    for split in ("train", "eval"):
        if f"{split}/loss" in metrics:
            metrics[f"{split}/ppl"] = math.exp(metrics[f"{split}/loss"])
    return model, metrics


# 2. The reward model: Bradley-Terry on the preference pairs

@dataclass
class RMConfig(TrainConfig):
    # The author's RM script: lr 5e-6 (DeepSpeed-Chat's small-model example: 5e-5), weight decay
    # 0.1, cosine, 1 epoch (RMs overfit preference data fast), batch 64 (DS-Chat's 8 per GPU x 8).
    lr: float = 5e-6
    batch_size: int = 8
    grad_accum: int = 8
    epochs: float = 1.0
    weight_decay: float = 0.1
    margin: float = 0.0        # Bradley-Terry margin: chosen must win by this much (Llama 2)
    center_coef: float = 0.0   # reward centring, coef * (r_c + r_r)^2 (Eisenstein et al. 2023)
    init: str = "base"         # lab.rm.reward_model_start: from "base" (author) or "sft"
    n_layer: int = 0           # the RM's own shape, from scratch; 0 = the policy's (and init above)
    n_head: int = 0
    n_embd: int = 0
    normalize: bool = False    # rescale after training: SFT responses mean 0, std 1 (N+ detail 11)


def bradley_terry_loss(chosen, rejected, margin=0.0, center_coef=0.0):
    """Per-pair loss -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2, shape (B,): the
    negative log-likelihood of the label under Bradley & Terry (1952), P(c > r) = sigmoid(r_c -
    r_r), as InstructGPT's reward model (Ouyang et al. 2022, eq. 1)."""
    return -F.logsigmoid(chosen - rejected - margin) + center_coef * (chosen + rejected) ** 2


def reward_model_loss(model, batch, cfg: RMConfig):
    """The reward-model stage's loss_fn: mean Bradley-Terry loss over a collate_pairs batch."""
    scores = ScalarModel.score(model, batch["tokens"], lengths=batch["lengths"])  # unbound: DDP
    chosen, rejected = scores.chunk(2)  # collate_pairs: chosen rows first, then rejected
    loss = bradley_terry_loss(chosen, rejected, cfg.margin, cfg.center_coef).mean()
    return loss, {"accuracy": (chosen > rejected).float().mean(),
                  "margin": (chosen - rejected).detach().mean(),
                  "chosen": chosen.detach().mean(), "rejected": rejected.detach().mean()}


def train_reward_model(rm, pairs, cfg: RMConfig, out_dir, eval_pairs=None, reference_examples=None):
    """Train a ScalarModel on encoded pairs with the Bradley-Terry loss; returns (rm, metrics). With
    `reference_examples` (encoded SFT (prompt, response) rows) the scores are then normalised on
    them; with `eval_pairs`, the accuracy per |gap| bucket (the paper's table). Both: lab/rm.py."""
    def loss_fn(model, batch):
        return reward_model_loss(model, batch, cfg)

    metrics = train(rm, loss_fn, pairs, eval_pairs, cfg, out_dir, "rm", collate_pairs,
                    key_metric="accuracy")
    if reference_examples:
        metrics |= normalize_scores(rm, reference_examples, cfg)
    if eval_pairs:
        metrics |= gap_tables(rm, eval_pairs, cfg)
    return rm, metrics


# 3. Resample and score: two SFT samples per prompt, the RM's gap between them

def distinct_prompts(rows) -> list:
    """The prompts of encoded rows, each once, in order of first appearance."""
    return [list(p) for p in dict.fromkeys(tuple(row[0]) for row in rows)]


def make_pairs(sft_model, rm, pairs, split, run, eos_id):
    """The pairs to split, encoded (prompt, chosen, rejected), and their gaps r(chosen) -
    r(rejected). "resample" (author's code): two SFT samples per training row (or per distinct
    prompt, see SplitConfig), the higher-scored one chosen, so every gap is >= 0. "human": the
    dataset's own pairs; a negative gap means the RM disagrees with the label, and |gap| decides
    the side all the same."""
    device = pick_device(run.device)
    seq = run.max_prompt_len + run.max_response_len
    batch_size = split.batch_size or sampling_batch(sft_model.config, seq, device)
    if split.source == "human":
        chosen, rejected = score_pairs(rm, pairs, batch_size, device, run.dtype)
        return pairs, chosen - rejected
    if split.source != "resample":
        raise ValueError(f"--split.source must be 'resample' or 'human', got {split.source!r}")
    prompts = [row[0] for row in pairs] if split.pairs_per_row else distinct_prompts(pairs)
    draws = [list(p) for p in prompts for _ in range(2 * split.pairs_per_prompt)]  # each pair: 2
    responses = sample_responses(sft_model, draws, eos_id, run, batch_size, temperature=1.0,
                                 top_k=50, top_p=0.9, name="resample: SFT samples")
    scores = torch.cat(batch_scores(rm, list(zip(draws, responses)), collate_sft, batch_size,
                                    device, run.dtype, "resample: RM scores"))
    rows, gaps = [], []
    for i in range(0, len(draws), 2):
        first = bool(scores[i] >= scores[i + 1])
        rows.append((draws[i], responses[i if first else i + 1], responses[i + 1 if first else i]))
        gaps.append(float((scores[i] - scores[i + 1]).abs()))
    return rows, torch.tensor(gaps)


# 4. The split (the paper's data selection): pairs with a large gap are easy (DPO), the prompts of
# the rest hard (PPO)

@dataclass
class SplitConfig:
    source: str = "resample"    # two SFT samples per row ranked by the RM (author), or "human"
    delta: float = 1.0          # |gap| >= delta is easy (author: 1 on HH-RLHF, 2 on TL;DR)
    quantile: float = 0.0       # > 0: delta = this quantile of |gap| (an RM of unknown scale)
    stage2_ref: str = "dpo"     # PPO's KL reference: "dpo" (MPO) or "sft" (ablation)
    order: str = "easy_first"   # DPO on easy, PPO on hard (MPO); "hard_first": reversed (ablation)
    select: str = "gap"         # easy at |gap| >= delta (MPO); "random": as many easy pairs at
                                # random (ablation)
    ppo_prompts: str = "hard"   # stage 2 on the "hard" prompts (MPO) or on "all" (ablation)
    seed: int = 0               # select "random"'s draw
    pairs_per_row: bool = True  # resample per training row (author; TL;DR repeats posts), or
                                # per distinct prompt
    pairs_per_prompt: int = 1   # this many resampled pairs each; their mean |gap| sets the side
    batch_size: int = 0         # sampling and scoring; 0 = 32 on a CPU, from free memory on a GPU


def split_by_reward_gap(gaps, delta):
    """MPO's data selection: pairs with |gap| >= delta are easy (reliable labels: DPO), the rest are
    hard (PPO, which needs only their prompts). Returns (easy_index, hard_index) as LongTensors."""
    size = torch.as_tensor(gaps, dtype=torch.float).abs()
    return (size >= delta).nonzero().flatten(), (size < delta).nonzero().flatten()


def prompt_gaps(gaps, split: SplitConfig):
    """|gap| of each pair; with split.pairs_per_prompt resampled pairs per prompt, the mean |gap| of
    its prompt's pairs (a prompt's difficulty measured, not drawn once)."""
    k = split.pairs_per_prompt if split.source == "resample" else 1
    return torch.as_tensor(gaps, dtype=torch.float).abs().view(-1, k).mean(1).repeat_interleave(k)


def gap_threshold(gaps, split: SplitConfig) -> float:
    """delta, or the split.quantile of |gap| (an RM of unknown scale)."""
    if split.quantile > 0:
        return float(torch.quantile(prompt_gaps(gaps, split), split.quantile))
    return split.delta


def split_indices(gaps, split: SplitConfig) -> tuple:
    """(easy_index, hard_index) at the split's threshold; ablations: as many easy pairs drawn at
    random (a prompt's pairs together), or the two sides swapped."""
    easy, hard = split_by_reward_gap(prompt_gaps(gaps, split), gap_threshold(gaps, split))
    if split.select == "random":
        k = split.pairs_per_prompt if split.source == "resample" else 1
        groups = torch.randperm(len(gaps) // k, generator=torch.Generator().manual_seed(split.seed))
        order = (groups[:, None] * k + torch.arange(k)).flatten()  # each prompt's k pairs
        easy, hard = order[:len(easy)].sort().values, order[len(easy):].sort().values
    return (hard, easy) if split.order == "hard_first" else (easy, hard)


def easy_and_hard(rows, gaps, split: SplitConfig) -> tuple[list, list]:
    """(the easy pairs, the prompts of the hard ones) of encoded rows; with ppo_prompts "all"
    (ablation: does restricting PPO to the hard prompts matter?) the prompts of every row."""
    easy, hard = split_indices(gaps, split)
    hard = range(len(rows)) if split.ppo_prompts == "all" else hard
    return [rows[i] for i in easy], distinct_prompts([rows[i] for i in hard])


# 5. MPO's two stages (the paper's two-stage training)

def trainable_copy(model):
    """A copy to train: a model that served as a frozen reference (dpo / ppo) has requires_grad
    off."""
    return copy.deepcopy(model).requires_grad_(True)


def mpo_stages(lab, cfgs, data, sft_model, rm, easy, hard):
    """Stage 1: DPO on the easy pairs, policy and reference from the SFT model. Stage 2: PPO on the
    hard prompts from the DPO model, which is also the KL reference (unless --split.stage2_ref
    sft); the critic starts from the RM. With no easy pairs PPO starts from the SFT model; with no
    hard prompts MPO is the DPO model. `lab.stage` makes a stage once (see mpo())."""
    policy = sft_model
    if easy:
        policy = lab.stage("mpo_dpo", dpo, trainable_copy(sft_model), sft_model, easy, cfgs["dpo"],
                           stage="mpo_dpo")
    if not hard:
        return policy
    ref = policy if cfgs["split"].stage2_ref == "dpo" else sft_model
    models = Models(trainable_copy(policy), ref, rm, trainable_copy(rm))
    return lab.stage("mpo", ppo, models, hard, data.tok, cfgs["ppo"],
                     eval_prompts=data.prompts_eval, gold_reward=data.gold_reward, stage="mpo")


# 6. The algorithm: SFT -> RM -> resample, score -> split -> DPO on easy -> PPO on hard -> evaluate

def mpo(cfgs: dict, data, base, lab) -> tuple[dict, dict]:
    """MPO from a `base` model on an encoded task with the stage configs `cfgs`; returns
    lab.evaluate.compare_to_sft's (results, samples). `data` (lab.pipeline.Data) holds token ids:
    sft_train / sft_eval (prompt, response), pairs_train / pairs_eval (prompt, chosen, rejected),
    prompts_eval, and the task's tokenizer `tok` and gold reward. `lab` (lab/pipeline.py) runs the
    run folder: lab.stage(name, fn, model, ...) is fn(model, ..., out_dir=out/name)'s model, or on
    a rerun the model loaded from out/name/final.pt; lab.pairs caches the pairs in
    out/pairs_<source>.pt; lab.budget(easy, hard) is `cfgs`, the stages' steps cut to a common
    budget under --budget."""
    # 1. SFT
    sft_model = lab.stage("sft", sft, trainable_copy(base), data.sft_train, cfgs["sft"],
                          eval_examples=data.sft_eval)
    # 2. The reward model
    torch.manual_seed(cfgs["run"].seed)  # its new head: the same whether SFT ran or was loaded
    rm = lab.stage("rm", train_reward_model, reward_model_start(base, sft_model, cfgs["rm"]),
                   data.pairs_train, cfgs["rm"], eval_pairs=data.pairs_eval,
                   reference_examples=data.sft_train[:500] if cfgs["rm"].normalize else None)
    # 3. Resample pairs from the SFT model (or take the dataset's) and score them; 4. split them
    rows, gaps = lab.pairs(cfgs["split"], make_pairs, sft_model, rm, data.pairs_train,
                           cfgs["split"], cfgs["run"], data.tok.eot_token)
    easy, hard = easy_and_hard(rows, gaps, cfgs["split"])
    # Not MPO, what it is compared with: split.jsonl and the baselines --methods asks for
    models = {"sft": sft_model, **lab.baselines(sft_model, rm, rows, gaps)}
    # 5. DPO on the easy pairs, then PPO on the hard prompts (configs cut under --budget matched)
    if lab.wants("mpo"):  # in --methods
        models["mpo"] = mpo_stages(lab, lab.budget(easy, hard), data, sft_model, rm, easy, hard)
    models |= lab.ablations(sft_model, rm)  # --variants: MPO's stages with other split settings
    # Last: every model against the SFT model (RM score, win rate, KL to SFT, gold; --eval.*)
    return compare_to_sft(models, rm, data, cfgs["run"], cfgs["eval"])


# The command line is the lab's (lab/cli.py, which imports this file): `python mpo.py --help`.

def parse_args(argv=None) -> dict:
    """{group: config} from the command line."""
    from lab.cli import parse_args
    return parse_args(argv)


def main(argv=None):
    """`python mpo.py [flags]`: the study and its report; `python mpo.py sample|export ...`: use
    what a run trained (lab/use.py)."""
    from lab.cli import main
    main(argv)


if __name__ == "__main__":
    main()
