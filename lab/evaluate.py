"""How mpo samples and evaluates: one sampled response per prompt, batched on the run's device
(the resampling of mpo.make_pairs and every evaluation), and every trained model against the SFT
model on held-out prompts (mpo.mpo's last step): RM score, win rate, KL to SFT, the gold reward."""
from dataclasses import dataclass

import torch

from data import collate_prompts, collate_sft
from dpo import response_logps
from lab.devices import autocast, map_batches, pick_device, rank, shard, to_device, unshard
from lab.progress import progress
from lab.readers import decode_text
from lab.report import subset_results
from lab.rm import batch_scores
from model import response_mask


@torch.no_grad()
def sample_responses(model, prompts, eos_id, run, batch_size, temperature=1.0, top_k=None,
                     top_p=None, name="sampling") -> list:
    """One sampled response (token ids, EOS included when reached) per encoded prompt, up to
    --max_response_len tokens, from the run's seed, on its device and under its --dtype. Under
    torchrun each rank samples for a shard of the prompts (its own seed)."""
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


def compare_to_sft(models: dict, rm, data, run, cfg: EvalConfig) -> tuple:
    """cfg.samples responses per held-out prompt (data.prompts_eval) from every model (same seed).
    Per model: mean RM score; win / tie / lose against the SFT model's response to the same
    prompt (same sample index), by RM score; KL to the SFT model (mean of log pi(y) - log
    pi_sft(y) over the model's own samples: the k1 estimator, Schulman 2020); mean length in
    tokens; the gold reward when the task has one, and each sample's (gold, else RM score)
    prompt by prompt. With data.subsets (one name per prompt), the RM score and win rate also
    per subset under "subsets". Returns (results, samples) keyed by model name."""
    tok, device = data.tok, pick_device(run.device)
    prompts = [p for p in data.prompts_eval for _ in range(cfg.samples)]
    prompt_texts = [tok.decode(p) for p in prompts]  # what the models saw, after truncation
    results, samples, scores = {}, {}, {}

    def logps(model, rows):  # summed response log-probs (N,)
        return torch.cat(map_batches(response_logps, model, rows, collate_sft, cfg.batch_size,
                                     device, run.dtype, "log-probs"))

    for name, model in models.items():
        responses = sample_responses(model, prompts, tok.eot_token, run, cfg.batch_size,
                                     cfg.temperature, name=f"evaluate {name}: sampling")
        rows = list(zip(prompts, responses))
        scores[name] = torch.cat(batch_scores(rm, rows, collate_sft, cfg.batch_size, device,
                                              run.dtype, f"evaluate {name}: RM"))
        kl = logps(model, rows) - logps(models["sft"], rows)
        texts = [decode_text(tok, r) for r in responses]
        values, results[name] = scores[name], {}  # each sample's metric: gold, else the RM score
        if data.gold_reward:
            values = torch.tensor([data.gold_reward(p, t) for p, t in zip(prompt_texts, texts)])
            results[name] = {"gold": float(values.mean())}
        per_prompt = values.view(-1, cfg.samples)  # a prompt's samples are not independent:
        if data.gold_reward:                       # the standard error is over prompts
            results[name]["gold_se"] = float(per_prompt.mean(1).std() / len(per_prompt) ** 0.5)
        results[name] |= {"rm_score": float(scores[name].mean()), "kl_to_sft": float(kl.mean()),
                          "length": sum(map(len, responses)) / len(responses),
                          "per_sample": per_prompt.tolist()}  # prompt by prompt: the noise split
        samples[name] = list(zip(prompt_texts, texts))[::cfg.samples][:cfg.show]  # one per prompt
    for name, r in results.items():  # the paper's win / tie / lose by RM score
        diff = scores[name] - scores["sft"]
        win, tie, lose = (float(x.float().mean()) for x in
                          (diff > cfg.tie, diff.abs() <= cfg.tie, diff < -cfg.tie))
        r |= {"win": win, "tie": tie, "lose": lose, "win_rate": win + tie / 2}
    if data.subsets:  # each subset's RM score and win rate too (HH-RLHF's helpful and harmless)
        subset_results(results, scores, data.subsets, cfg)
    return results, samples
