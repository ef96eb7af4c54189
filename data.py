"""Data for mpo: tokenizers, the tasks (the default, a synthetic task with a known gold reward, is
in demo.py), and tokenising / truncating / padding rows into batches.

Left to the lab: the published formats (lab/formats.py: Pair, a prompt with its chosen and
rejected responses; HH-RLHF's dialogues, TL;DR's comparisons, the prompt cuts that keep their
structure), validating every line, downloads to ~/.cache/mpo/data, a user's jsonl task, the gold
import and decoding what a gold reward reads (lab/readers.py). To look at a task's rows:
`python -m lab.tasks [demo|hh-rlhf|tldr|jsonl] [DATA_DIR]`.
"""
import random
import sys
from dataclasses import dataclass
from typing import Callable

import tiktoken
import torch

from demo import DEMO_VOCAB, DemoConfig, demo_gold_reward, make_demo_task
from demo import DEMO_WORDS  # noqa: F401 (offered here too, as data.*)
from lab.formats import Pair, cut_post, cut_turns
from lab.formats import read_hh_rlhf, read_tldr_comparisons  # noqa: F401 (offered as data.*)
from lab.readers import DataError, gpt2_encoding  # noqa: F401 (DataError offered as data.*)

EOT = "<|endoftext|>"
TOKENIZERS = ("byte", "gpt2", "demo")


def get_tokenizer(name: str) -> tiktoken.Encoding:
    """"gpt2": GPT-2 BPE (50257 tokens). "byte": 256 byte tokens + <|endoftext|> = 256, built here.
    "demo": the bytes, then one token per piece of the demo task (demo.DEMO_VOCAB), then EOT."""
    if name in ("byte", "demo"):
        # No merges: every byte is a token, so any text (any language, any garbage a policy samples)
        # round-trips exactly, with a 257-entry vocabulary small enough for a CPU-sized model.
        ranks, pattern = {bytes([i]): i for i in range(256)}, r"\s+|\S+"
        if name == "demo":
            # tiktoken looks a whole piece up in mergeable_ranks before it merges bytes, so a
            # lexicon word is one token and the policy cannot misspell it; any other text falls
            # back to bytes and still round-trips exactly.
            ranks |= {w.encode(): 256 + i for i, w in enumerate(DEMO_VOCAB)}
            pattern = r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"
        return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens={EOT: len(ranks)})
    if name == "gpt2":
        return gpt2_encoding()  # tiktoken's, its files fetched on first use (lab/readers.py)
    raise ValueError(f"unknown tokenizer {name!r} (valid: {', '.join(TOKENIZERS)})")


def _ids(tok: tiktoken.Encoding, text: str) -> list[int]:
    # Ordinary encoding (no special tokens allowed): a literal "<|endoftext|>" inside a forum post
    # is plain text, never the EOS id -- otherwise data could end a sequence early or fake an EOS in
    # the loss mask (tiktoken's default `encode` would instead raise on such text).
    return tok.encode_ordinary(text)


@dataclass
class Task:
    name: str
    sft_train: list[tuple[str, str]]
    sft_eval: list[tuple[str, str]]
    pairs_train: list[Pair]
    pairs_eval: list[Pair]
    prompts_eval: list[str]
    gold_reward: Callable[[str, str], float] | None
    tokenizer: str
    gold_best: float | None = None  # the best gold reward achievable, mean over held-out prompts
    prompt_cut: str = "left"  # how a long prompt is cut: "left", "turns" (HH-RLHF), "post" (TL;DR)
    eval_subsets: list[str] | None = None  # each eval prompt's subset (HH-RLHF: helpful, harmless)


def load_task(name: str, seed: int = 0, data_dir=None, template: str = "author",
              demo: DemoConfig | None = None) -> Task:
    """"demo" (built from `demo` and `seed`: demo.py), "jsonl" (a user's files in data_dir:
    lab.readers.read_jsonl_task), "hh-rlhf" (helpful-base + harmless-base; eval = their test files)
    or "tldr" (tldr_3_filtered SFT files + the Reddit comparison batches; `template` picks the
    prompt format). Real files (lab/tasks.py) are looked up under data_dir first (same layout as
    the cache: hh-rlhf/<subset>/<split>.jsonl.gz, tldr/...)."""
    from lab.tasks import demo_best_gold, real_task  # the lab imports this file
    if name == "demo":
        sft_train, sft_eval, train, test, prompts = make_demo_task(demo or DemoConfig(), seed)
        best = sum(map(demo_best_gold, prompts)) / len(prompts)  # the top of the study's room
        return Task(name, sft_train, sft_eval, [Pair(*p) for p in train],
                    [Pair(*p) for p in test], prompts, demo_gold_reward, "demo", best)
    rng = random.Random(seed)  # files come grouped by subset / batch; mix them once, reproducibly
    task = real_task(name, rng, data_dir, template)
    for field in ("sft_train", "pairs_train", "pairs_eval", "prompts_eval"):
        if not getattr(task, field):
            raise ValueError(f"task {name}: {field} is empty after filtering")
    rng.shuffle(task.sft_train)
    rng.shuffle(task.pairs_train)
    return task


def _cut_prompt(tok, text: str, max_len: int, how: str = "left") -> tuple[list[int] | None, bool]:
    """(ids, cut) of a prompt fitted into max_len tokens: "left" keeps the end of the prompt (what
    the response answers); "turns" (HH-RLHF: whole oldest turns dropped) and "post" (TL;DR: the
    post shortened, its header kept) are lab/formats.py's. ids None: no cut of that kind fits (row
    dropped)."""
    ids = _ids(tok, text)
    if len(ids) <= max_len:
        return ids, False
    if how == "left":
        return ids[len(ids) - max_len:], True
    return {"turns": cut_turns, "post": cut_post}[how](tok, text, max_len), True


def _cut_response(ids: list[int], max_len: int, eos: int) -> tuple[list[int], bool]:
    # Cut from the RIGHT; max_len counts the EOS. A cut response gets no EOS: it did not end there,
    # and an EOS at the cut would teach the policy to stop mid-answer and the RM to score unfinished
    # text.
    return (ids + [eos], False) if len(ids) < max_len else (ids[:max_len], True)


def encode_dataset(tok, items: list, max_prompt_len: int, max_response_len: int, name: str = "data",
                   prompt_cut: str = "left", kept: list | None = None) -> list:
    """Encode prompts (str -> ids), SFT rows ((prompt, response) -> (p, r)) or Pairs (-> (p, c, r)),
    prompts cut as `prompt_cut` says (_cut_prompt). Rows whose prompt no cut fits, rows left with an
    empty prompt or response, and pairs whose two responses become identical once truncated, are
    dropped; the counts go to stderr. `kept`, when given, receives the index of every row kept."""
    out, cut_p, cut_r = [], 0, 0
    drops = {"prompt too long": 0, "empty": 0, "identical after truncation": 0}
    for i, x in enumerate(items):
        prompt, responses = ((x, ()) if isinstance(x, str) else (x.prompt, (x.chosen, x.rejected))
                             if isinstance(x, Pair) else (x[0], (x[1],)))
        p, cut = _cut_prompt(tok, prompt, max_prompt_len, prompt_cut)
        rs = [_cut_response(_ids(tok, r), max_response_len, tok.eot_token) for r in responses]
        cut_p, cut_r = cut_p + cut, cut_r + sum(cut for _, cut in rs)
        rs = [r for r, _ in rs]
        if p is None:
            drops["prompt too long"] += 1
        elif not p or any(r in ([], [tok.eot_token]) for r in rs):
            drops["empty"] += 1
        elif len(rs) == 2 and rs[0] == rs[1]:
            drops["identical after truncation"] += 1
        else:
            out.append(tuple([p, *rs]) if rs else p)
            if kept is not None:
                kept.append(i)
    detail = ", ".join(f"{k} {v}" for k, v in drops.items())
    print(f"encode_dataset({name}): {len(items)} rows, truncated prompts {cut_p} ({prompt_cut}), "
          f"truncated responses {cut_r}, dropped {sum(drops.values())} ({detail})", file=sys.stderr)
    return out


def collate_sft(examples: list) -> dict:
    """[(prompt_ids, response_ids)] -> right-padded batch (pad 0). loss_mask marks the response
    tokens (EOS included): the logits at position t - 1 predict the token at t."""
    prompt_lens = torch.tensor([len(p) for p, _ in examples])
    lengths = torch.tensor([len(p) + len(r) for p, r in examples])
    tokens = torch.zeros(len(examples), int(lengths.max()), dtype=torch.long)
    for i, (p, r) in enumerate(examples):
        tokens[i, :lengths[i]] = torch.tensor(list(p) + list(r))
    pos = torch.arange(tokens.shape[1])
    attention_mask = pos < lengths[:, None]
    loss_mask = attention_mask & (pos >= prompt_lens[:, None])
    return dict(tokens=tokens, loss_mask=loss_mask, attention_mask=attention_mask,
                prompt_lens=prompt_lens, lengths=lengths)


def collate_pairs(pairs: list) -> dict:
    """[(prompt_ids, chosen_ids, rejected_ids)] -> one batch of 2B rows, chosen rows first, so the
    policy and the reference each need one forward (concatenated forward of the DPO reference
    code)."""
    return collate_sft([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs])


def collate_prompts(prompts: list) -> dict:
    """[prompt_ids] -> LEFT-padded batch for generation: every row's next token goes in the same
    column."""
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, tokens.shape[1] - len(p):] = torch.tensor(list(p))
    attention_mask = torch.arange(tokens.shape[1]) >= (tokens.shape[1] - lengths)[:, None]
    return dict(tokens=tokens, attention_mask=attention_mask)
