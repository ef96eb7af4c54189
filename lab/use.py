"""Use what a run trained: sample from any stage's model, several side by side, and export a stage
for the Hugging Face ecosystem.

    python mpo.py sample --out out/demo --stages sft,mpo --prompt "sea, 4 words, no crab:"
    python mpo.py sample --out out/hh --stages sft,mpo            # interactive: type, read answers
    python mpo.py export --out out/demo --stage mpo --to export/mpo

A stage's model is rebuilt from the run folder's config.json (the tokenizer, the model's shape and
the lengths the run trained with) and its final.pt. `sample` prints each stage's answer with its
reward-model score and, where the task has one (the demo, or --gold_reward), its gold reward.
`export` writes a policy as a GPT-2 checkpoint (model.safetensors, config.json, and GPT-2's
tokenizer files when the run used them) that transformers' AutoModelForCausalLM loads, and the
reward model in GPT2ForSequenceClassification's layout (one label).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import torch

from data import _ids, collate_prompts, collate_sft, get_tokenizer
from demo import demo_gold_reward
from lab.checkpoints import load_checkpoint, load_weights
from lab.formats import ASSISTANT, HUMAN, TLDR_TEMPLATES
from lab.pipeline import RunConfig, fresh_config
from lab.readers import GPT2_CACHE_FILES, decode_text, load_gold_reward
from lab.rm import reward_model_shape, score_batch
from lab.weights import (HUB_NAMES, atomic_write, download, gpt2_config, gpt2_tensors,
                         read_hf_config, write_safetensors)
from model import GPT, GPTConfig, ScalarModel, response_mask
from mpo import RMConfig

POLICIES = ("sft", "dpo_all", "dpo_human", "ppo_all", "mpo_dpo", "mpo")


def run_folder(out: Path) -> Path:
    """The run folder holding config.json: `out` itself, or a study's first seed."""
    if (out / "config.json").is_file():
        return out
    seeds = sorted(out.glob("seed_*/config.json"), key=lambda p: int(p.parent.name[5:]))
    if not seeds:
        raise ValueError(f"{out}: not a run folder (no config.json) nor a study's (no seed_*/)")
    print(f"{out} is a study; its first seed's run folder: {seeds[0].parent}", file=sys.stderr)
    return seeds[0].parent


def run_settings(folder: Path):
    """(run config, rm config) of a run folder, as lab.pipeline.RunConfig and mpo.RMConfig."""
    try:
        cfgs = json.loads((folder / "config.json").read_text())
        known = {cls: {f.name for f in fields(cls)} for cls in (RunConfig, RMConfig)}
        run = RunConfig(**{k: v for k, v in cfgs["run"].items() if k in known[RunConfig]})
        rm = RMConfig(**{k: v for k, v in cfgs["rm"].items() if k in known[RMConfig]})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{folder / 'config.json'}: cannot read the run's settings "
                         f"({' '.join(str(e).split())})") from None
    return run, rm


def policy_shape(run, vocab_size: int) -> GPTConfig:
    """The shape every policy of the run has: --init's (its config.json, from the folder or the
    cache), else the fresh GPT's flags."""
    if not run.init:
        return fresh_config(run, vocab_size)
    path = Path(run.init).expanduser()
    if not path.exists() and run.init in HUB_NAMES:
        path = download(run.init)  # the cache the run loaded it from
    return read_hf_config((path if path.is_dir() else path.parent) / "config.json")


def stage_file(folder: Path, stage: str) -> Path:
    """folder/<stage>/final.pt, or a one-line error: no such stage, or one still unfinished."""
    final = folder / stage / "final.pt"
    if final.is_file():
        return final
    if (folder / stage).is_dir():
        raise ValueError(f"{folder / stage}: stage {stage} is unfinished (no final.pt); rerun the "
                         "run with the same --out to finish it")
    made = sorted(str(p.parent.relative_to(folder)) for p in folder.rglob("final.pt"))
    raise ValueError(f"{folder}: no stage {stage} (finished: {', '.join(made) or 'none'})")


def home(folder: Path, run, stage: str) -> Path:
    """The folder that holds the stage: SFT and the RM of a run made with --reuse (a study's seeds
    under --study shared) are in the reused folder, as given from where the run started or, from
    elsewhere, beside the seed's folder (OUT/shared)."""
    if not (run.reuse and stage in ("sft", "rm")):
        return folder
    reused = Path(run.reuse)
    return reused if reused.is_absolute() or reused.exists() else folder.parent / reused.name


def load_stage(folder: Path, stage: str):
    """(model, tokenizer, run config) of a finished stage: a GPT for a policy, a ScalarModel for
    "rm" (variants: "variants/<name>/mpo")."""
    run, rm_cfg = run_settings(folder)
    folder = home(folder, run, stage)
    tok = get_tokenizer(run.tokenizer or ("demo" if run.dataset == "demo" else "gpt2"))
    shape = policy_shape(run, tok.n_vocab)
    if stage == "rm":
        model = ScalarModel(reward_model_shape(rm_cfg, shape))
    else:
        model = GPT(shape)
    final = stage_file(folder, stage)
    load_weights(model, load_checkpoint(final), final)
    return model.eval().requires_grad_(False), tok, run


def wrap_prompt(run, text: str, history: str = "") -> str:
    """What the model was trained on: HH-RLHF's dialogue turns (after `history`, the turns so
    far), TL;DR's template around a post, or the text itself (the demo, a user's task)."""
    if run.dataset == "hh-rlhf":
        return f"{history}{HUMAN} {text}{ASSISTANT}"
    if run.dataset == "tldr":
        return TLDR_TEMPLATES[run.template].format(post=text, subreddit="", title="")
    return text


@torch.no_grad()
def sample(model, tok, run, prompts: list, max_new_tokens: int, temperature=1.0, top_k=None,
           top_p=None, seed: int = 0) -> list:
    """One answer per prompt, drawn by GPT.generate on a left-padded batch with a generator seeded
    by `seed`: [(prompt ids, answer ids up to its EOS)]. A prompt longer than the run's
    --max_prompt_len, or than the model's context with the answer, is a one-line error."""
    ids = [_ids(tok, p) for p in prompts]
    for p, x in zip(prompts, ids):
        if len(x) > run.max_prompt_len or len(x) + max_new_tokens > model.config.block_size:
            raise ValueError(f"prompt of {len(x)} tokens is too long: the run trained on prompts "
                             f"of at most {run.max_prompt_len} (--max_prompt_len) and the model "
                             f"holds {model.config.block_size} tokens ({p[:40]!r}...)")
    batch = collate_prompts(ids)
    g = torch.Generator().manual_seed(seed)
    out = model.generate(batch["tokens"], max_new_tokens, temperature, top_k, top_p,
                         tok.eot_token, batch["attention_mask"], generator=g)
    new = out[:, batch["tokens"].size(1):]
    keep = response_mask(new, tok.eot_token)
    return [(x, row[m].tolist()) for x, row, m in zip(ids, new, keep)]


def gold_of(run, spec: str):
    """The task's gold reward, None without one: --gold_reward FILE.py:FUNCTION, the run's own, or
    the demo's."""
    if spec or run.gold_reward:
        return load_gold_reward(spec or run.gold_reward, ("", ""))
    return demo_gold_reward if run.dataset == "demo" else None


def main_sample(argv) -> None:
    p = argparse.ArgumentParser(
        prog="python mpo.py sample",
        description="Sample from a run's stages side by side, with each answer's RM score and "
                    "gold reward; prompts from --prompt, --prompts FILE, or typed in.")
    p.add_argument("--out", required=True, help="the run folder (a study's: its first seed)")
    p.add_argument("--stages", default="sft,mpo", help="comma-separated, e.g. sft,dpo_all,mpo")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default="", help="a file of prompts, one per line")
    p.add_argument("--max_new_tokens", type=int, default=0, help="0: the run's --max_response_len")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top_k", type=int, default=0, help="0: off")
    p.add_argument("--top_p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gold_reward", default="", help="FILE.py:FUNCTION, beside the RM score")
    args = p.parse_args(argv)
    folder = run_folder(Path(args.out))
    stages = [s for s in args.stages.split(",") if s]
    if "rm" in stages or not stages:
        raise ValueError(f"--stages {args.stages}: name policy stages ({', '.join(POLICIES)}); "
                         "the reward model (rm) scores their answers")
    models = {s: load_stage(folder, s) for s in stages}
    _, tok, run = models[stages[0]]
    has_rm = (home(folder, run, "rm") / "rm" / "final.pt").is_file()
    rm = load_stage(folder, "rm")[0] if has_rm else None
    prompts = list(args.prompt)
    if args.prompts:
        try:
            prompts += [x for x in Path(args.prompts).read_text().splitlines() if x.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompts {args.prompts}: cannot read ({e})") from None
    gold = gold_of(run, args.gold_reward)
    knobs = dict(max_new_tokens=args.max_new_tokens or run.max_response_len,
                 temperature=args.temperature, top_k=args.top_k or None,
                 top_p=args.top_p if args.top_p < 1 else None, seed=args.seed)
    if prompts:
        show(models, rm, gold, tok, run, [wrap_prompt(run, x) for x in prompts], knobs)
        return
    print("type a prompt, then Enter (Ctrl-D ends)" + (", /reset forgets the dialogue"
                                                       if run.dataset == "hh-rlhf" else ""))
    history = ""
    for line in sys.stdin:
        if line.strip() == "/reset":
            history = ""
            continue
        prompt = wrap_prompt(run, line.rstrip("\n"), history)
        answers = show(models, rm, gold, tok, run, [prompt], knobs)
        if run.dataset == "hh-rlhf":  # the dialogue goes on with the first stage's answer
            history = prompt + answers[stages[0]][0]


@torch.no_grad()
def show(models: dict, rm, gold, tok, run, prompts: list, knobs: dict) -> dict:
    """Every stage's answers to the prompts, printed under each prompt with their RM score (as
    the evaluation scores them: prompt and answer ids, EOS included) and gold reward; returns
    {stage: answer texts}."""
    rows = {s: sample(m, t, run, prompts, **knobs) for s, (m, t, _) in models.items()}
    texts = {s: [decode_text(tok, r) for _, r in rs] for s, rs in rows.items()}
    scores = {s: score_batch(rm, collate_sft(rs)).tolist() for s, rs in rows.items()} if rm else {}
    for i, prompt in enumerate(prompts):
        print(f"\n{prompt.strip()}")
        for s in rows:
            shown = [f"rm {scores[s][i]:+.2f}"] if rm else []
            shown += [f"gold {gold(prompt, texts[s][i]):+.2f}"] if gold else []
            print(f"  [{s}] " + " | ".join(shown + [repr(texts[s][i].strip())]))
    return texts


def gpt2_tokenizer_files() -> dict:
    """{HF name: path} of GPT-2's tokenizer files in tiktoken's cache (vocab.json is its
    encoder.json, merges.txt its vocab.bpe), where they are."""
    cache = Path(os.environ.get("TIKTOKEN_CACHE_DIR")
                 or os.environ.get("DATA_GYM_CACHE_DIR")
                 or Path(tempfile.gettempdir()) / "data-gym-cache")
    found = {"vocab.json": cache / GPT2_CACHE_FILES["encoder.json"],
             "merges.txt": cache / GPT2_CACHE_FILES["vocab.bpe"]}
    return {k: v for k, v in found.items() if v.is_file()}


def export(folder: Path, stage: str, target: Path) -> list:
    """Write a stage in a Hugging Face layout into `target` (new or empty); returns what the
    output says about it, a line each."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"--to {target}: exists and is not empty; choose a new folder")
    model, tok, run = load_stage(folder, stage)
    notes = []
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # renamed once whole
    tmp.mkdir(parents=True)
    try:
        if stage == "rm":
            notes += export_reward_model(model, tok, tmp)
        else:
            model.save_pretrained(tmp)
            notes.append(f"{stage}: GPT2LMHeadModel, {sum(p.numel() for p in model.parameters()):,}"
                         " parameters (AutoModelForCausalLM loads it)")
        if tok.name == "gpt2":
            files = gpt2_tokenizer_files()
            for name, path in files.items():
                shutil.copyfile(path, tmp / name)
            notes.append("tokenizer: GPT-2's " + (", ".join(files) if len(files) == 2 else
                         "files not found in tiktoken's cache: not written"))
        else:
            notes.append(f"tokenizer: this run's own ({tok.name!r}, data.get_tokenizer), not a "
                         "Hugging Face one: no tokenizer files written")
        if target.exists():
            target.rmdir()  # empty
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return notes


def export_reward_model(rm: ScalarModel, tok, directory: Path) -> list:
    """The RM as GPT2ForSequenceClassification (num_labels 1): its body's weights as
    `transformer.*`, its head as `score.weight` with the normalisation gain folded in. That layout
    has no bias: the normalisation's offset is dropped, so our score = the exported logit - gain x
    offset."""
    gain, offset = float(rm.gain), float(rm.offset)
    tensors = gpt2_tensors(rm.gpt)  # the body, in GPT-2's layout
    tensors["score.weight"] = (rm.head.weight.detach().float() * gain).contiguous()
    write_safetensors(tensors, directory / "model.safetensors")
    config = gpt2_config(rm.gpt.config) | {"architectures": ["GPT2ForSequenceClassification"],
                                           "num_labels": 1, "pad_token_id": tok.eot_token}
    atomic_write(directory / "config.json",
                 lambda f: f.write(json.dumps(config, indent=2).encode()))
    return ["rm: GPT2ForSequenceClassification, 1 label; the head's normalisation gain "
            f"{gain:.6g} folded into score.weight; its offset dropped: our score = the exported "
            f"logit - {gain * offset:.6g}"]


def main_export(argv) -> None:
    p = argparse.ArgumentParser(prog="python mpo.py export",
                                description="Write a stage of a run in a Hugging Face layout.")
    p.add_argument("--out", required=True, help="the run folder (a study's: its first seed)")
    p.add_argument("--stage", required=True, help=f"{', '.join(POLICIES)}, rm, variants/<v>/mpo")
    p.add_argument("--to", required=True, help="a new or empty folder")
    args = p.parse_args(argv)
    folder = run_folder(Path(args.out))
    for line in export(folder, args.stage, Path(args.to)):
        print(line)
    print(f"exported {folder / args.stage} to {args.to}")
