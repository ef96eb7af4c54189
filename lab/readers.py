"""Data I/O behind data.py: JSON-lines files read line by line with every line validated (bad input
stops with one `file:line: what is wrong` line), and the published HH-RLHF and TL;DR files found
under a --data_dir or downloaded once into a cache.

A user's own task (`--dataset jsonl`, read_jsonl_task) is a folder of JSON-lines files in TRL's
formats, with an optional gold reward imported from the user's file (load_gold_reward), which
reads the text of token ids as decode_text gives it.
"""
import gzip
import importlib.util
import json
import math
import os
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator

import tiktoken

from lab.weights import download_file, regular_file


class DataError(ValueError):
    """Bad input data. The message is one line: `file:line: what is wrong`."""


# tiktoken's cache names for GPT-2's files: the sha1 of the URL each is fetched from
GPT2_CACHE_FILES = {"vocab.bpe": "6d1cbeee0f20b3d9449abfede4726ed8212e3aee",
                    "encoder.json": "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6",
                    "r50k_base.tiktoken": "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"}


def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 BPE, or a one-line error saying what it needs offline."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken fetches its BPE files on first use (requests, hashes)
        raise RuntimeError(
            f"cannot load the GPT-2 tokenizer ({type(e).__name__}); offline, set "
            "TIKTOKEN_CACHE_DIR to a folder holding "
            + ", ".join(f"{name} as {sha}" for name, sha in GPT2_CACHE_FILES.items())) from None


def decode_text(tok, ids) -> str:
    """The text of token ids without their <|endoftext|>: what a gold reward and a reader see."""
    return tok.decode([t for t in ids if t != tok.eot_token])


def _one_line(x) -> str:
    return " ".join(str(x).split())


MAX_LINE = 16 << 20  # bytes per JSON line: a longer one (a 2 GB line in a gzip) is refused unread


def read_jsonl(path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for every non-blank line of a JSON-lines file (.gz or plain),
    read line by line with at most MAX_LINE bytes in memory."""
    path, n, seen = regular_file(path), 0, False
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            for n, raw in enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), 1):
                if len(raw) > MAX_LINE:
                    raise DataError(f"{path}:{n}: line longer than {MAX_LINE >> 20} MiB")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{n}: not UTF-8 (byte 0x{raw[e.start]:02x} "
                                    f"at column {e.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{n}: malformed JSON ({e.msg}, column {e.colno})") from None
                except RecursionError:
                    raise DataError(f"{path}:{n}: JSON nested too deeply to read") from None
                except ValueError as e:  # a number of more digits than Python converts
                    raise DataError(f"{path}:{n}: unreadable JSON ({_one_line(e)[:80]})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
                seen = True
                yield n, obj
    except (OSError, EOFError, zlib.error) as e:  # missing file, truncated or corrupt gzip
        raise DataError(f"{path}:{n + 1}: cannot read ({_one_line(e)})") from None
    if not seen:
        raise DataError(f"{path}:{max(n, 1)}: empty file (no JSON lines)")


def get_field(obj: dict, key: str, where: str, kind=str):
    """obj["a"]["b"] for key "a.b" (digits index lists), checked to be of `kind`, or a DataError."""
    cur = obj
    for k in key.split("."):
        if isinstance(cur, dict) and k in cur:
            cur = cur[k]
        elif isinstance(cur, list) and k.isdigit() and int(k) < len(cur):
            cur = cur[int(k)]
        else:
            raise DataError(f'{where}: missing field "{key}"')
    if not isinstance(cur, kind) or isinstance(cur, bool):
        raise DataError(f'{where}: field "{key}" is {type(cur).__name__}, expected {kind.__name__}')
    return cur


def read_rows(path, parse, drops: tuple[str, ...], what: str) -> tuple[list, dict]:
    """parse(object, "file:line") for every line of a JSON-lines file -> (items, counts). parse
    returns an item, the reason (one of `drops`) the row is dropped, or None for a row it skips
    uncounted; the counts go to stderr in one line that starts with `what`."""
    items, dropped, rows = [], dict.fromkeys(drops, 0), 0
    for n, obj in read_jsonl(path):
        item = parse(obj, f"{path}:{n}")
        if item is None:
            continue
        rows += 1
        if isinstance(item, str):
            dropped[item] += 1
        else:
            items.append(item)
    detail = ", ".join(f"{k} {v}" for k, v in dropped.items())
    print(f"{what}: {rows} rows, kept {len(items)}, dropped {sum(dropped.values())} ({detail})",
          file=sys.stderr)
    return items, dict(rows=rows, kept=len(items), **dropped)


HH_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/{subset}/{split}.jsonl.gz"
HH_SUBSETS = ("helpful-base", "harmless-base", "helpful-online", "helpful-rejection-sampled")
TLDR_BASE = "https://openaipublic.blob.core.windows.net/summarize-from-feedback"
TLDR_SFT_URL = TLDR_BASE + "/datasets/tldr_3_filtered/{split}.jsonl"
TLDR_COMPARISONS_URL = TLDR_BASE + "/dataset/comparisons/batch{batch}.json"
# the Reddit batches (there is no batch21; batch0_cnndm and cnndm* are news)
TLDR_BATCHES = (*range(3, 21), 22)


def default_cache_dir() -> Path:
    """~/.cache/mpo/data, or $MPO_CACHE/data."""
    return Path(os.environ.get("MPO_CACHE") or "~/.cache/mpo").expanduser() / "data"


def _find(rel: str, url: str, cache_dir=None, data_dir=None) -> Path:
    """data_dir/rel when present (a data_dir is laid out like the cache), else a cached download."""
    if data_dir and (Path(data_dir) / rel).exists():
        return Path(data_dir) / rel
    path = Path(cache_dir or default_cache_dir()) / rel
    return download_file(url, path, f"without network, put that file at {path}")


def find_files(files: list[tuple[str, str]], data_dir=None, cache_dir=None) -> list[Path]:
    """The local path of every (relative path, url) of a task, looked up under data_dir, then in the
    download cache, else downloaded; every file that cannot be had is named in one error."""
    found, missing, reason = [], [], ""
    for rel, url in files:
        try:
            found.append(_find(rel, url, cache_dir, data_dir))
        except RuntimeError as e:
            missing.append(rel)
            reason = reason or str(e).split(";")[0]
    if missing:
        where = f"--data_dir {data_dir} or " if data_dir else ""
        raise DataError(f"{len(missing)} of {len(files)} data files missing: {', '.join(missing)} "
                        f"(looked in {where}the download cache {cache_dir or default_cache_dir()}; "
                        f"{reason}); put them there under those relative paths, or run once with "
                        "network")
    return found


def hh_rlhf_file(subset: str, split: str) -> tuple[str, str]:
    """(path relative to a data_dir or the cache, url) of one published HH-RLHF file."""
    if subset not in HH_SUBSETS or split not in ("train", "test"):
        raise ValueError(f"no HH-RLHF file {subset}/{split} (subsets: {', '.join(HH_SUBSETS)}; "
                         "splits: train, test)")
    return f"hh-rlhf/{subset}/{split}.jsonl.gz", HH_URL.format(subset=subset, split=split)


def tldr_sft_file(split: str) -> tuple[str, str]:
    """tldr_3_filtered/<split>.jsonl (train, valid, test)."""
    return f"tldr/tldr_3_filtered/{split}.jsonl", TLDR_SFT_URL.format(split=split)


def tldr_comparisons_file(batch: int) -> tuple[str, str]:
    """comparisons/batch<N>.json."""
    return f"tldr/comparisons/batch{batch}.json", TLDR_COMPARISONS_URL.format(batch=batch)


def download_hh_rlhf(subset: str, split: str, cache_dir=None, data_dir=None) -> Path:
    """The published HH-RLHF file, cached as <cache>/hh-rlhf/<subset>/<split>.jsonl.gz."""
    return _find(*hh_rlhf_file(subset, split), cache_dir, data_dir)


def download_tldr_sft(split: str, cache_dir=None, data_dir=None) -> Path:
    """tldr_3_filtered/<split>.jsonl, cached as <cache>/tldr/tldr_3_filtered/."""
    return _find(*tldr_sft_file(split), cache_dir, data_dir)


def download_tldr_comparisons(batch: int, cache_dir=None, data_dir=None) -> Path:
    """comparisons/batch<N>.json, cached as <cache>/tldr/comparisons/batch<N>.json."""
    return _find(*tldr_comparisons_file(batch), cache_dir, data_dir)


def jsonl_file(data_dir, stem: str, required: bool = True) -> Path | None:
    for path in (Path(data_dir) / f"{stem}.jsonl", Path(data_dir) / f"{stem}.jsonl.gz"):
        if path.exists():
            return path
    if required:
        raise DataError(f"{Path(data_dir) / stem}.jsonl: no such file (nor .jsonl.gz)")
    return None


def read_jsonl_rows(path, keys: tuple) -> list[tuple]:
    """One tuple of string fields per JSON line, e.g. keys ("prompt", "chosen", "rejected"): TRL's
    explicit-prompt preference format, or ("prompt", "completion"): its prompt-completion format."""
    return [tuple(get_field(obj, k, f"{path}:{n}") for k in keys) for n, obj in read_jsonl(path)]


def read_jsonl_task(data_dir) -> tuple[list, list, list, list]:
    """A user's task in data_dir as rows of strings: (sft_train, sft_test, train, test). train.jsonl
    and test.jsonl (or .jsonl.gz) hold {"prompt", "chosen", "rejected"} per line; optional
    sft_train.jsonl / sft_test.jsonl hold {"prompt", "completion"} (without them SFT learns
    prompt + chosen). data.load_task makes them a Task; a gold reward, if any, comes from
    --gold_reward (load_gold_reward). Tokenizer: gpt2 unless --tokenizer."""
    if not data_dir:
        raise DataError("--dataset jsonl needs --data_dir DIR holding train.jsonl and test.jsonl")
    keys = ("prompt", "chosen", "rejected")
    train, test = (read_jsonl_rows(jsonl_file(data_dir, split), keys)
                   for split in ("train", "test"))

    def sft_rows(split, pairs):
        path = jsonl_file(data_dir, f"sft_{split}", required=False)
        if path:
            return read_jsonl_rows(path, ("prompt", "completion"))
        return [(prompt, chosen) for prompt, chosen, _ in pairs]

    return sft_rows("train", train), sft_rows("test", test), train, test


def load_gold_reward(spec: str, sample: tuple[str, str],
                     patience: float = 30.0) -> Callable[[str, str], float]:
    """"FILE.py:FUNCTION" -> that (prompt, response) -> float, imported from the user's own file and
    tried once on `sample` so a broken one fails before training; every later call that raises or
    returns a non-finite number fails with one line naming it, and one that has not returned after
    `patience` seconds says so on stderr, every `patience` seconds, so that a run never waits in
    silence."""
    path, _, name = spec.rpartition(":")
    if not path.endswith(".py") or not name:
        raise ValueError(f"--gold_reward {spec}: expected FILE.py:FUNCTION")
    try:
        module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)  # the user's own code, run as they asked
        fn = getattr(module, name)
    except Exception as e:  # a missing file, a syntax error, an import inside it, no such function
        raise ValueError(f"--gold_reward {spec}: cannot import "
                         f"({type(e).__name__}: {_one_line(e)})") from None

    running = [None]  # the call under way: (its start, its prompt, when it was last reported)

    def watch():  # looks ten times a patience: a call is reported patience seconds after its start
        while True:
            time.sleep(patience / 10)
            call, now = running[0], time.time()
            if call and now - call[2] >= patience:
                running[0] = (call[0], call[1], now)
                print(f"--gold_reward {spec}: no answer after {now - call[0]:.0f} s on prompt "
                      f"{call[1][:60]!r}; still waiting (Ctrl-C stops the run)", file=sys.stderr,
                      flush=True)

    def gold(prompt: str, response: str) -> float:
        running[0] = (time.time(), prompt, time.time())
        try:
            value = float(fn(prompt, response))
        except (Exception, SystemExit) as e:  # sys.exit() in it too; Ctrl-C stays an interrupt
            raise ValueError(f"--gold_reward {spec}: raised {type(e).__name__}: {_one_line(e)} "
                             f"on prompt {prompt[:60]!r}") from None
        finally:
            running[0] = None
        if not math.isfinite(value):
            raise ValueError(f"--gold_reward {spec}: returned {value} on prompt {prompt[:60]!r}")
        return value
    threading.Thread(target=watch, daemon=True).start()
    gold(*sample)
    return gold
