"""Data for mpo: tokenizers, the HH-RLHF and TL;DR formats, the tasks (the default, a synthetic task
with a known gold reward, is in demo.py), and tokenising / truncating / padding into batches.

    python data.py                    # build the demo task, print examples and gold statistics
    python data.py hh-rlhf DATA_DIR   # load a real task (downloads to ~/.cache/mpo/data if online)

Left to lab/readers.py: validating every line, downloads, a user's jsonl task, the gold import.
"""
import os
import random
import re
import sys
from dataclasses import dataclass
from typing import Callable

import tiktoken
import torch

from demo import DEMO_VOCAB, DemoConfig, demo_gold_reward, make_demo_task
from demo import DEMO_WORDS, demo_best_gold  # noqa: F401 (offered here too, as data.*)
from lab.readers import DataError, get_field, gpt2_encoding, read_rows

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


def decode_text(tok, ids) -> str:
    """The text of token ids without their <|endoftext|>: what a gold reward and a reader see."""
    return tok.decode([t for t in ids if t != tok.eot_token])


def _ids(tok: tiktoken.Encoding, text: str) -> list[int]:
    # Ordinary encoding (no special tokens allowed): a literal "<|endoftext|>" inside a forum post
    # is plain text, never the EOS id -- otherwise data could end a sequence early or fake an EOS in
    # the loss mask (tiktoken's default `encode` would instead raise on such text).
    return tok.encode_ordinary(text)


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str


def _pair(prompt: str, chosen: str, rejected: str) -> Pair | str:
    """The Pair, or why it is dropped."""
    if not chosen.strip() or not rejected.strip():
        return "empty"
    return "identical" if chosen == rejected else Pair(prompt, chosen, rejected)


HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def read_hh_rlhf_stats(path) -> tuple[list[Pair], dict]:
    """HH-RLHF file -> (pairs, counts). A row is {"chosen": dialogue, "rejected": dialogue}, each
    the whole dialogue in "\\n\\nHuman: ..." / "\\n\\nAssistant: ..." turns. Both must share every
    turn up to the last "\\n\\nAssistant:" (the prompt); the responses keep their leading space."""

    def pair(obj, where):
        chosen, rejected = get_field(obj, "chosen", where), get_field(obj, "rejected", where)
        # Longest common prefix cut back to its last assistant marker (TRL's prefix extraction had
        # off-by-one bugs here); if a remainder holds another turn, the dialogues differ earlier.
        cut = os.path.commonprefix([chosen, rejected]).rfind(ASSISTANT) + len(ASSISTANT)
        a, b = chosen[cut:], rejected[cut:]
        if cut < len(ASSISTANT) or any(m in r for m in (HUMAN, ASSISTANT) for r in (a, b)):
            return "prefix mismatch"
        return _pair(chosen[:cut], a, b)

    return read_rows(path, pair, ("prefix mismatch", "empty", "identical"), f"read_hh_rlhf({path})")


def read_hh_rlhf(path) -> list[Pair]:
    """One published HH-RLHF file (.jsonl.gz or .jsonl) -> Pairs; drop counts go to stderr."""
    return read_hh_rlhf_stats(path)[0]


TLDR_TEMPLATES = {
    # the MPO author's code
    "author": "\n\nHuman: Please summarize the following text:\n{post}\n\nAssistant:",
    # the OpenAI / N+ format
    "tldr": "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:",
}


def _tldr_prompt(info: dict, post_key: str, template: str, where: str) -> str:
    if template not in TLDR_TEMPLATES:
        raise ValueError(f"unknown template {template!r} (valid: {', '.join(TLDR_TEMPLATES)})")
    fields = {"post": get_field(info, post_key, where).strip()}
    if template == "tldr":
        fields |= {k: get_field(info, k, where).strip() for k in ("subreddit", "title")}
    return TLDR_TEMPLATES[template].format(**fields)


def _summary(text: str) -> str:
    return " " + text.strip()  # completions start with a space (N+ detail 2); "" marks an empty one


def read_tldr_comparisons(path, template: str = "author", split: str | None = None) -> list[Pair]:
    """OpenAI summarize-from-feedback comparisons (JSON lines: info{post,title,subreddit},
    summaries[{text},{text}], choice 0/1) -> Pairs. `split` keeps rows whose "split" field starts
    with it ("train", "valid")."""

    def pair(obj, where):
        if split is not None and not str(obj.get("split", "train")).startswith(split):
            return None
        info, choice = get_field(obj, "info", where, dict), get_field(obj, "choice", where, int)
        if choice not in (0, 1):
            raise DataError(f'{where}: field "choice" is {choice}, expected 0 or 1')
        return _pair(_tldr_prompt(info, "post", template, where),
                     _summary(get_field(obj, f"summaries.{choice}.text", where)),
                     _summary(get_field(obj, f"summaries.{1 - choice}.text", where)))

    return read_rows(path, pair, ("empty", "identical"),
                     f"read_tldr_comparisons({path}, split={split})")[0]


def read_tldr_sft(path, template: str = "author") -> list[tuple[str, str]]:
    """TL;DR SFT file -> (prompt, response): tldr_3_filtered rows {post, title, subreddit, summary},
    or dove rows {instruction (the post), title, subreddit, gold_response}."""

    def row(obj, where):
        dove = "instruction" in obj
        prompt = _tldr_prompt(obj, "instruction" if dove else "post", template, where)
        response = _summary(get_field(obj, "gold_response" if dove else "summary", where))
        return "empty" if response == " " else (prompt, response)

    return read_rows(path, row, ("empty",), f"read_tldr_sft({path})")[0]


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


def interleave(groups: dict[str, list], rng: random.Random) -> list[tuple[str, object]]:
    """(group, item) for every item of every group, shuffled within its group, ordered so that every
    prefix holds the groups in proportion to their sizes: the first k items are a stratified
    sample."""
    keyed = []
    for g, (name, items) in enumerate(groups.items()):
        items = list(items)
        rng.shuffle(items)
        keyed += [((i + 0.5) / len(items), g, name, x) for i, x in enumerate(items)]
    keyed.sort(key=lambda k: k[:2])
    return [(name, x) for _, _, name, x in keyed]


def load_task(name: str, seed: int = 0, data_dir=None, template: str = "author",
              demo: DemoConfig | None = None) -> Task:
    """"demo" (built from `demo` and `seed`: demo.py), "jsonl" (a user's files in data_dir:
    lab.readers.read_jsonl_task), "hh-rlhf" (helpful-base + harmless-base; eval = their test files)
    or "tldr" (tldr_3_filtered SFT files + the Reddit comparison batches; `template` picks the
    prompt format). Real files (lab/tasks.py) are looked up under data_dir first (same layout as
    the cache: hh-rlhf/<subset>/<split>.jsonl.gz, tldr/...)."""
    if name == "demo":
        sft_train, sft_eval, train, test, prompts, best = make_demo_task(demo or DemoConfig(), seed)
        return Task(name, sft_train, sft_eval, [Pair(*p) for p in train],
                    [Pair(*p) for p in test], prompts, demo_gold_reward, "demo", best)
    rng = random.Random(seed)  # files come grouped by subset / batch; mix them once, reproducibly
    from lab.tasks import real_task  # the lab imports this file
    task = real_task(name, rng, data_dir, template)
    for field in ("sft_train", "pairs_train", "pairs_eval", "prompts_eval"):
        if not getattr(task, field):
            raise ValueError(f"task {name}: {field} is empty after filtering")
    rng.shuffle(task.sft_train)
    rng.shuffle(task.pairs_train)
    return task


def _cut_turns(tok, text: str, max_len: int) -> list[int] | None:
    # HH-RLHF (the author): drop whole oldest turns, so the dialogue still opens with a Human turn
    # and no turn is cut in the middle; None when even the last Human turn does not fit.
    for start in (m.start() for m in re.finditer(re.escape(HUMAN), text)):
        if len(ids := _ids(tok, text[start:])) <= max_len:
            return ids
    return None


def _cut_post(tok, text: str, max_len: int) -> list[int] | None:
    # TL;DR (N+): keep the header (subreddit, title) or the instruction and the closing "TL;DR:" /
    # "Assistant:", and shorten the post from its end, at a line break where one fits, else at a
    # space.
    for template in TLDR_TEMPLATES.values():
        head, tail = template.split("{post}")
        marker = head.rsplit("}", 1)[-1]  # the literal text just before the post
        if text.endswith(tail) and (begin := text.find(marker)) >= 0:
            begin += len(marker)
            break
    else:
        return None
    post = text[begin:len(text) - len(tail)]

    def fits(cut):
        return len(_ids(tok, text[:begin] + post[:cut] + tail)) <= max_len

    for sep in ("\n", " "):
        cuts = [m.start() for m in re.finditer(sep, post)]
        lo, hi = 0, len(cuts)  # binary search for the longest post[:cut] that fits: cuts[lo - 1]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(cuts[mid - 1]) else (lo, mid - 1)
        if lo:
            return _ids(tok, text[:begin] + post[:cuts[lo - 1]].rstrip() + tail)
    return None


def _cut_prompt(tok, text: str, max_len: int, how: str = "left") -> tuple[list[int] | None, bool]:
    """(ids, cut) of a prompt fitted into max_len tokens: "turns" and "post" as above, "left" keeps
    the end of the prompt (what the response answers). ids None: no cut of that kind fits (row
    dropped)."""
    ids = _ids(tok, text)
    if len(ids) <= max_len:
        return ids, False
    if how == "left":
        return ids[len(ids) - max_len:], True
    return {"turns": _cut_turns, "post": _cut_post}[how](tok, text, max_len), True


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


if __name__ == "__main__":
    task = load_task(sys.argv[1] if len(sys.argv) > 1 else "demo",
                     data_dir=sys.argv[2] if len(sys.argv) > 2 else None)
    print({k: len(v) for k, v in vars(task).items() if isinstance(v, list)})
    for prompt, response in task.sft_train[:3]:
        print(f"SFT  {prompt!r} -> {response[:200]!r}")
    for pair in task.pairs_train[:3]:
        print(f"PAIR {pair.prompt[-200:]!r}\n  chosen   {pair.chosen[:200]!r}\n"
              f"  rejected {pair.rejected[:200]!r}")
    if task.gold_reward:
        gold = torch.tensor([task.gold_reward(p, r) for p, r in task.sft_train])
        print(f"gold of SFT responses: mean {gold.mean():.2f}, std {gold.std():.2f}, "
              f"max {gold.max():.2f}")
