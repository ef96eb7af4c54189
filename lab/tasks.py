"""The real datasets as tasks (data.load_task): a user's jsonl folder, HH-RLHF (helpful-base +
harmless-base, the held-out data stratified by subset) and TL;DR (the SFT files and the comparison
batches), their files found under --data_dir or the cache, or downloaded. Also the demo task's
best achievable gold: with the SFT model's gold, it bounds the room that the study's equivalence
margin is a share of (lab/results.py)."""
import random
import sys

import torch

from data import Task, load_task
from demo import DEMO_CLASH, DEMO_GOOD_VALUES, DEMO_PROMPT, DEMO_TOPICS, DEMO_WORDS
from lab.formats import Pair, read_hh_rlhf, read_tldr_comparisons, read_tldr_sft
from lab.readers import (TLDR_BATCHES, find_files, hh_rlhf_file, read_jsonl_task,
                         tldr_comparisons_file, tldr_sft_file)


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


def real_task(name: str, rng, data_dir=None, template: str = "author") -> Task:
    """The task `name` ("jsonl", "hh-rlhf" or "tldr") before its training rows are shuffled; `rng`
    orders the held-out rows (files come grouped by subset or batch)."""
    if name == "jsonl":
        sft_train, sft_eval, train, test = read_jsonl_task(data_dir)
        train, test = [Pair(*r) for r in train], [Pair(*r) for r in test]
        task = Task(name, sft_train, sft_eval, train, test,
                    list(dict.fromkeys(p.prompt for p in test)), None, "gpt2")
    elif name == "hh-rlhf":
        subsets = ("helpful-base", "harmless-base")
        files = find_files([hh_rlhf_file(s, split) for split in ("train", "test") for s in subsets],
                           data_dir)
        train = [p for f in files[:2] for p in read_hh_rlhf(f)]
        # Held-out data stratified by subset: every prefix (--eval.prompts, --max_eval) holds both.
        test = interleave({s: read_hh_rlhf(f) for s, f in zip(subsets, files[2:])}, rng)
        prompts = interleave({s: list(dict.fromkeys(p.prompt for s2, p in test if s2 == s))
                              for s in subsets}, rng)
        prompts = list({p: s for s, p in prompts}.items())  # a prompt in both subsets counts once
        pairs_eval = [p for _, p in test]
        task = Task(name, [(p.prompt, p.chosen) for p in train],
                    [(p.prompt, p.chosen) for p in pairs_eval],
                    train, pairs_eval, [p for p, _ in prompts], None, "gpt2", prompt_cut="turns",
                    eval_subsets=[s for _, s in prompts])
    elif name == "tldr":
        files = find_files([tldr_sft_file(split) for split in ("train", "valid", "test")]
                           + [tldr_comparisons_file(b) for b in TLDR_BATCHES], data_dir)
        sft_train, sft_eval, sft_test = (read_tldr_sft(f, template) for f in files[:3])
        train, valid = ([p for f in files[3:] for p in read_tldr_comparisons(f, template, split)]
                        for split in ("train", "valid"))
        prompts = list(dict.fromkeys(p for p, _ in sft_test))
        for held_out in (sft_eval, valid, prompts):  # in file order: by batch and by subreddit
            rng.shuffle(held_out)
        task = Task(name, sft_train, sft_eval, train, valid, prompts, None, "gpt2",
                    prompt_cut="post")
    else:
        raise ValueError(f"unknown task {name!r} (valid: demo, jsonl, hh-rlhf, tldr)")
    return task


def demo_best_gold(prompt: str) -> float:
    """The highest gold reward any response to a demo prompt can get: n distinct non-banned words
    with the highest values, with the same-initial bonus when two of them (first and last) can share
    a letter."""
    m = DEMO_PROMPT.fullmatch(prompt)
    topic, n, ban = m[1], int(m[2]), m[3]
    value = dict.fromkeys(DEMO_WORDS, 0.0) | dict.fromkeys(DEMO_TOPICS[DEMO_CLASH[topic]], -1.0)
    value |= dict(zip(DEMO_TOPICS[topic], DEMO_GOOD_VALUES))
    words = sorted((w for w in DEMO_WORDS if w != ban), key=value.get, reverse=True)
    best = sum(value[w] for w in words[:n])
    for a in words:  # the bonus pair first and last, the n - 2 best of the rest between them
        for b in words:
            if a < b and a[0] == b[0]:
                rest = [value[w] for w in words if w not in (a, b)][:n - 2]
                best = max(best, value[a] + value[b] + 1.0 + sum(rest))
    return best


def main(argv: list[str]):
    """`python -m lab.tasks [demo|hh-rlhf|tldr|jsonl] [DATA_DIR]`: a task's sizes, its first rows
    and, where it has a gold reward, the gold of its SFT responses. Bad input: one error line."""
    try:
        task = load_task(argv[0] if argv else "demo", data_dir=argv[1] if len(argv) > 1 else None)
    except (OSError, ValueError) as e:  # DataError is a ValueError
        sys.exit(f"python -m lab.tasks: error: {e}")
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


if __name__ == "__main__":
    main(sys.argv[1:])
