"""Tests for data.py: tokenizers, readers, bad input, downloader, batching and the demo task.

    python -m pytest -q tests/test_data.py
"""
import gzip
import http.server
import json
import math
import re
import shutil
import threading
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import tiktoken.load
import tiktoken.registry
import torch

import data
from data import DataError, Pair
from helpers import encode  # one pair cut as data.encode_dataset cuts every row
from lab import formats, readers, tasks
from lab.weights import download_file

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
A = "\n\nAssistant:"


def write_jsonl(path: Path, rows) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(text) if path.suffix == ".gz" else text)
    return path


def hh(prompt: str, chosen: str, rejected: str) -> dict:
    return {"chosen": prompt + chosen, "rejected": prompt + rejected}


def test_byte_tokenizer_round_trip_and_eos():
    tok = data.get_tokenizer("byte")
    assert tok.n_vocab == 257 and tok.eot_token == 256
    text = "héllo wörld 日本 🙂\n\ttab"
    ids = data._ids(tok, text)
    assert ids == list(text.encode()) and tok.decode(ids) == text
    literal = data._ids(tok, "a <|endoftext|> b")
    assert 256 not in literal and len(literal) == len("a <|endoftext|> b")
    _, response = encode(tok, "p", " x <|endoftext|>", 64, 64)
    assert response.count(256) == 1 and response[-1] == 256


def test_gpt2_tokenizer_from_offline_cache(tmp_path, monkeypatch):
    src = SHARED / "gpt2-tokenizer"
    if not src.exists():
        pytest.skip(f"{src} not present (the GPT-2 BPE files are needed offline)")
    names = {"6d1cbeee0f20b3d9449abfede4726ed8212e3aee": "vocab.bpe",
             "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6": "encoder.json",
             "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4": "r50k_base.tiktoken"}
    for sha1, name in names.items():
        shutil.copy(src / name, tmp_path / sha1)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    tok = data.get_tokenizer("gpt2")
    assert data._ids(tok, "Hello world") == [15496, 995]
    assert tok.eot_token == 50256 and 50256 not in data._ids(tok, "<|endoftext|>")


def test_gpt2_tokenizer_offline_error(tmp_path, monkeypatch):
    def no_network(url):
        raise OSError(f"network disabled in this test: {url}")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    with pytest.raises(RuntimeError) as e:
        data.get_tokenizer("gpt2")
    msg = str(e.value)
    assert "\n" not in msg and "TIKTOKEN_CACHE_DIR" in msg
    assert all(s in msg for s in ("vocab.bpe", "encoder.json", "r50k_base.tiktoken", "6d1cbeee"))
    with pytest.raises(ValueError, match="byte, gpt2"):
        data.get_tokenizer("gpt3")


HH_ROWS = [
    hh("\n\nHuman: Hi?" + A, " Hello!", " Go away."),
    # multi-turn; the replies share their first character, so the common prefix runs past the marker
    hh("\n\nHuman: a" + A + " b\n\nHuman: c" + A, " done well", " done badly"),
    {"chosen": "\n\nHuman: a" + A + " b1\n\nHuman: c" + A + " d",  # differ in an earlier turn
     "rejected": "\n\nHuman: a" + A + " b2\n\nHuman: c" + A + " d"},
    hh("\n\nHuman: x" + A, " same", " same"),
    hh("\n\nHuman: y" + A, " ", " something"),
]


@pytest.mark.parametrize("name", ["hh.jsonl", "hh.jsonl.gz"])
def test_read_hh_rlhf(tmp_path, capsys, name):
    path = write_jsonl(tmp_path / name, HH_ROWS)
    pairs, stats = formats.read_hh_rlhf_stats(path)
    assert pairs == [Pair("\n\nHuman: Hi?" + A, " Hello!", " Go away."),
                     Pair("\n\nHuman: a" + A + " b\n\nHuman: c" + A, " done well", " done badly")]
    assert stats == {"rows": 5, "kept": 2, "prefix mismatch": 1, "empty": 1, "identical": 1}
    assert data.read_hh_rlhf(path) == pairs
    line = capsys.readouterr().err.splitlines()[0]
    assert line == f"read_hh_rlhf({path}): 5 rows, kept 2, dropped 3 (prefix mismatch 1, empty 1, identical 1)"


@pytest.mark.parametrize("subset,rows,kept,mismatch", [("harmless-base", 2312, 2303, 5), ("helpful-base", 2354, 2339, 9)])
def test_read_hh_rlhf_real_test_files(subset, rows, kept, mismatch):
    path = SHARED / "hh-rlhf" / subset / "test.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} not present")
    pairs, stats = formats.read_hh_rlhf_stats(path)
    assert stats["rows"] == rows and stats["kept"] == kept == len(pairs)
    assert stats["prefix mismatch"] == mismatch
    assert stats["kept"] + stats["prefix mismatch"] + stats["empty"] + stats["identical"] == rows
    for p in pairs:
        assert p.prompt.endswith(A) and p.chosen != p.rejected and p.chosen.strip() and p.rejected.strip()
        assert A not in p.chosen and A not in p.rejected


def comparison(post, a, b, choice, split="train"):
    return {"info": {"id": "t3_x", "post": post, "title": "T", "subreddit": "sub"},
            "summaries": [{"text": a, "policy": "ref"}, {"text": b, "policy": "sup"}],
            "choice": choice, "split": split, "worker": "w", "batch": "batch3"}


def test_read_tldr_comparisons_both_templates(tmp_path):
    path = write_jsonl(tmp_path / "batch3.json", [
        comparison("My post.\n", " first", " second", 0),
        comparison("Other post", " one", "two", 1, split="valid1"),
        comparison("Same", " same", " same ", 0),
    ])
    pairs = data.read_tldr_comparisons(path)
    assert pairs == [Pair("\n\nHuman: Please summarize the following text:\nMy post.\n\nAssistant:", " first", " second"),
                     Pair("\n\nHuman: Please summarize the following text:\nOther post\n\nAssistant:", " two", " one")]
    tldr = data.read_tldr_comparisons(path, template="tldr", split="valid")
    assert tldr == [Pair("SUBREDDIT: r/sub\n\nTITLE: T\n\nPOST: Other post\n\nTL;DR:", " two", " one")]
    assert [p.chosen for p in data.read_tldr_comparisons(path, split="train")] == [" first"]
    with pytest.raises(ValueError, match="author, tldr"):
        data.read_tldr_comparisons(path, template="chat")


def test_read_tldr_sft_published_and_dove_formats(tmp_path):
    published = write_jsonl(tmp_path / "train.jsonl", [
        {"id": "t3_a", "subreddit": "cats", "title": "Cat", "post": "My cat sleeps.", "summary": " cat sleeps"},
        {"id": "t3_b", "subreddit": "cats", "title": "Cat", "post": "Empty summary", "summary": "  "}])
    dove = write_jsonl(tmp_path / "dove.jsonl", [
        {"instruction_id": "t3_c", "subreddit": "dogs", "title": "Dog", "instruction": "My dog barks.",
         "gold_response": "dog barks"}])
    assert formats.read_tldr_sft(published) == [
        ("\n\nHuman: Please summarize the following text:\nMy cat sleeps.\n\nAssistant:", " cat sleeps")]
    assert formats.read_tldr_sft(dove, template="tldr") == [
        ("SUBREDDIT: r/dogs\n\nTITLE: Dog\n\nPOST: My dog barks.\n\nTL;DR:", " dog barks")]
    real = SHARED / "tldr" / "dove_tldr_test500.jsonl"
    if real.exists():
        rows = formats.read_tldr_sft(real, template="tldr")
        assert len(rows) == 500 and all(r.startswith(" ") and p.endswith("TL;DR:") for p, r in rows)


GOOD_HH = json.dumps(hh("\n\nHuman: q" + A, " a", " b"))


@pytest.mark.parametrize("name,content,line,problem", [
    ("bad.jsonl", (GOOD_HH + "\n{not json\n").encode(), 2, "malformed JSON"),
    ("missing.jsonl", (GOOD_HH + "\n" + json.dumps({"chosen": "x"}) + "\n").encode(), 2, 'missing field "rejected"'),
    ("list.jsonl", b"[1, 2]\n", 1, "expected a JSON object"),
    ("latin1.jsonl", (GOOD_HH + "\n" + GOOD_HH + "\n").encode() + b'{"chosen": "caf\xe9"}\n', 3, "not UTF-8"),
    ("empty.jsonl", b"", 1, "empty file"),
    ("blank.jsonl", b"\n\n", 2, "empty file"),
    ("cut.jsonl.gz", gzip.compress(((GOOD_HH + "\n") * 200).encode())[:-40], None, "cannot read"),
    ("notgzip.jsonl.gz", b"plain text, not gzip\n", 1, "cannot read"),
    ("wrongtype.jsonl", b'{"chosen": 1, "rejected": "x"}\n', 1, 'field "chosen" is int'),
])
def test_bad_input_is_one_line_data_error(tmp_path, name, content, line, problem):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        data.read_hh_rlhf(path)
    msg = str(e.value)
    assert "\n" not in msg and problem in msg
    prefix = f"{path}:{line}: " if line else f"{path}:"
    assert msg.startswith(prefix) and msg[len(f"{path}:"):].split(":")[0].isdigit()
    assert isinstance(e.value, ValueError) and e.value.__cause__ is None


@pytest.mark.parametrize("row,problem", [
    ({"info": {"post": "p"}, "summaries": [{"text": "a"}], "choice": 0}, 'missing field "summaries.1.text"'),
    ({"info": {"post": "p"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 2}, '"choice" is 2'),
    ({"info": {"post": "p"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": "0"}, '"choice" is str'),
    ({"summaries": [{"text": "a"}, {"text": "b"}], "choice": 0}, 'missing field "info"'),
])
def test_bad_tldr_rows(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "batch.json", [comparison("ok", " a", " b", 0), row])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: .*{re.escape(problem)}"):
        data.read_tldr_comparisons(path)
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"post": "p", "title": "t", "subreddit": "s"}])
    with pytest.raises(DataError, match=f'^{re.escape(str(sft))}:1: missing field "summary"'):
        formats.read_tldr_sft(sft)


@pytest.fixture
def server():
    """A local HTTP server: files[path] = bytes; paths under /short/ announce 10 bytes too many."""
    files, hits = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path not in files:
                self.send_error(404)
                return
            body = files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + (10 if self.path.startswith("/short/") else 0)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", files, hits
    httpd.shutdown()
    httpd.server_close()


def test_download_once_and_size_check(tmp_path, server, monkeypatch):
    base, files, hits = server
    body = gzip.compress((GOOD_HH + "\n").encode())
    files["/helpful-base/test.jsonl.gz"] = body
    monkeypatch.setattr(readers, "HH_URL", base + "/{subset}/{split}.jsonl.gz")
    path = readers.download_hh_rlhf("helpful-base", "test", cache_dir=tmp_path)
    assert path == tmp_path / "hh-rlhf" / "helpful-base" / "test.jsonl.gz" and path.read_bytes() == body
    assert readers.download_hh_rlhf("helpful-base", "test", cache_dir=tmp_path) == path and len(hits) == 1
    assert data.read_hh_rlhf(path) == [Pair("\n\nHuman: q" + A, " a", " b")]

    files["/short/x.json"] = b"0123456789"
    with pytest.raises(RuntimeError, match="downloaded 10 of 20 bytes") as e:
        download_file(base + "/short/x.json", tmp_path / "dl" / "x.json", "hint")
    assert "\n" not in str(e.value) and list((tmp_path / "dl").iterdir()) == []
    with pytest.raises(RuntimeError, match="404"):
        download_file(base + "/missing.json", tmp_path / "dl" / "missing.json", "hint")
    assert list((tmp_path / "dl").iterdir()) == []
    with pytest.raises(ValueError, match="helpful-online"):
        readers.download_hh_rlhf("helpful", "test", cache_dir=tmp_path)


def test_download_offline_error_and_data_dir(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("MPO_CACHE", str(tmp_path / "cache"))
    assert readers.default_cache_dir() == tmp_path / "cache" / "data"
    with pytest.raises(RuntimeError) as e:
        readers.download_tldr_comparisons(3)
    msg, target = str(e.value), tmp_path / "cache" / "data" / "tldr" / "comparisons" / "batch3.json"
    assert "\n" not in msg and readers.TLDR_COMPARISONS_URL.format(batch=3) in msg and str(target) in msg
    assert not target.exists()
    local = tmp_path / "mine" / "tldr" / "tldr_3_filtered" / "test.jsonl"
    local.parent.mkdir(parents=True)
    local.write_text("")
    assert readers.download_tldr_sft("test", data_dir=tmp_path / "mine") == local


def test_encode_truncation_sides_and_eos():
    tok = data.get_tokenizer("byte")
    eos = tok.eot_token
    p, r = encode(tok, "abcdef", "xyz", 4, 4)
    assert bytes(p) == b"cdef" and r == list(b"xyz") + [eos]  # prompt keeps its end; EOS fits
    assert encode(tok, "ab", "xyz", 4, 3)[1] == list(b"xyz")  # no room for EOS: none added
    assert encode(tok, "ab", "wxyz", 4, 3)[1] == list(b"wxy")  # response keeps its start


def test_encode_dataset_counts(capsys):
    tok = data.get_tokenizer("byte")
    items = [Pair("long prompt", " aaaa1", " aaaa2"),  # identical once cut to 4 bytes
             Pair("p", " a", " b"),
             ("prompt", ""),  # empty response
             ("", " x"),  # empty prompt
             ("abcdefgh", " ok"),
             "just a prompt"]
    out = data.encode_dataset(tok, items, 4, 4, name="t")
    assert out == [(list(b"p"), list(b" a") + [256], list(b" b") + [256]),
                   (list(b"efgh"), list(b" ok") + [256]),
                   list(b"ompt")]
    err = capsys.readouterr().err.strip()
    assert err == ("encode_dataset(t): 6 rows, truncated prompts 4 (left), truncated responses 2, "
                   "dropped 3 (prompt too long 0, empty 2, identical after truncation 1)")
    kept = []
    assert data.encode_dataset(tok, items, 4, 4, kept=kept) == out and kept == [1, 4, 5]


def test_hh_prompts_lose_whole_oldest_turns():
    tok = data.get_tokenizer("byte")
    turns = ["\n\nHuman: first question", "\n\nAssistant: first answer", "\n\nHuman: second", A]
    prompt = "".join(turns)
    fit = lambda n: data.encode_dataset(tok, [prompt], n, 8, prompt_cut="turns")  # noqa: E731
    assert fit(len(prompt)) == [list(prompt.encode())]  # fits: untouched
    # one byte short: the whole first exchange goes, never part of a turn; the rest starts with Human
    assert fit(len(prompt) - 1) == [list("".join(turns[2:]).encode())]
    assert fit(len(turns[2] + A)) == [list("".join(turns[2:]).encode())]
    assert fit(len(turns[2] + A) - 1) == []  # not even the last Human turn fits: the row is dropped
    # a cut from the left would have kept half a turn
    assert data.encode_dataset(tok, [prompt], 30, 8) == [list(prompt.encode()[-30:])]


@pytest.mark.parametrize("template", ["tldr", "author"])
def test_tldr_posts_are_shortened_at_a_line_break_keeping_header_and_instruction(template, capsys):
    tok = data.get_tokenizer("byte")
    post = "line one is here\nline two is here\nline three"
    info = {"post": post, "title": "a title", "subreddit": "sub"}
    prompt = formats._tldr_prompt(info, "post", template, "x")
    head, tail = prompt.split(post)
    fit = lambda n: data.encode_dataset(tok, [prompt], n, 8, prompt_cut="post")  # noqa: E731
    assert fit(len(prompt)) == [list(prompt.encode())]
    two_lines = head + "line one is here\nline two is here" + tail
    assert fit(len(prompt) - 1) == [list(two_lines.encode())]
    assert fit(len(two_lines)) == [list(two_lines.encode())]
    assert fit(len(two_lines) - 1) == [list((head + "line one is here" + tail).encode())]
    # the first line alone is too long: cut at a space instead
    assert fit(len(head + "line one" + tail) + 2) == [list((head + "line one" + tail).encode())]
    assert fit(len(head + tail)) == []  # no room for any of the post: dropped
    assert "truncated prompts 1 (post)" in capsys.readouterr().err


def test_interleave_is_a_stratified_shuffle():
    import random
    groups = {"a": list(range(30)), "b": list(range(100, 110))}
    order = tasks.interleave(groups, random.Random(0))
    assert sorted(x for _, x in order) == sorted(groups["a"] + groups["b"])
    for k in (4, 8, 20, 40):  # every prefix holds the groups 3 : 1, as their sizes
        assert abs(sum(g == "b" for g, _ in order[:k]) - k / 4) <= 1
    assert [x for g, x in order if g == "a"] != groups["a"]  # shuffled within a group
    assert tasks.interleave(groups, random.Random(0)) == order


def test_collate_sft_right_padding_and_masks():
    batch = data.collate_sft([([5, 6, 7], [8, 256]), ([9], [10, 11, 12, 256])])
    assert batch["tokens"].tolist() == [[5, 6, 7, 8, 256], [9, 10, 11, 12, 256]]
    batch = data.collate_sft([([5, 6], [8, 256]), ([9], [10, 11, 12, 13, 256])])
    assert batch["tokens"].tolist() == [[5, 6, 8, 256, 0, 0], [9, 10, 11, 12, 13, 256]]
    assert batch["loss_mask"].tolist() == [[False, False, True, True, False, False],
                                           [False, True, True, True, True, True]]
    assert batch["attention_mask"].tolist() == [[True] * 4 + [False] * 2, [True] * 6]
    assert batch["prompt_lens"].tolist() == [2, 1] and batch["lengths"].tolist() == [4, 6]
    assert batch["tokens"].dtype == torch.long and batch["loss_mask"].dtype == torch.bool
    eos_positions = batch["tokens"] == 256
    assert (batch["loss_mask"] & eos_positions).sum() == 2  # EOS is a trained token


def test_collate_pairs_chosen_first():
    batch = data.collate_pairs([([1, 2], [3, 256], [4, 4, 256]), ([5], [6, 256], [7, 256])])
    assert batch["tokens"].shape == (4, 5)
    assert batch["tokens"].tolist() == [[1, 2, 3, 256, 0], [5, 6, 256, 0, 0],
                                        [1, 2, 4, 4, 256], [5, 7, 256, 0, 0]]
    assert batch["loss_mask"].sum(1).tolist() == [2, 2, 3, 2]


def test_collate_prompts_left_padding():
    batch = data.collate_prompts([[1, 2, 3], [4]])
    assert batch["tokens"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert batch["attention_mask"].tolist() == [[True, True, True], [False, False, True]]


def test_load_task_hh_rlhf_from_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("no download expected"))
    for subset in ("helpful-base", "harmless-base"):
        (tmp_path / "hh-rlhf" / subset).mkdir(parents=True)
        for split, n in (("train", 6), ("test", 2)):
            write_jsonl(tmp_path / "hh-rlhf" / subset / f"{split}.jsonl.gz",
                        [hh(f"\n\nHuman: {subset} {split} {i}?" + A, " yes", " no") for i in range(n)]
                        + [hh("\n\nHuman: dup" + A, " same", " same")])
    task = data.load_task("hh-rlhf", seed=1, data_dir=tmp_path)
    assert (len(task.sft_train), len(task.pairs_train), len(task.pairs_eval)) == (12, 12, 4)
    assert task.tokenizer == "gpt2" and task.gold_reward is None and task.prompt_cut == "turns"
    assert sorted(task.sft_train) == sorted((p.prompt, p.chosen) for p in task.pairs_train)
    assert sorted(task.prompts_eval) == sorted(p.prompt for p in task.pairs_eval) and len(set(task.prompts_eval)) == 4
    # held-out prompts stratified by subset: any two first ones hold one of each, each tagged with its subset
    assert task.eval_subsets[:2] in (["helpful-base", "harmless-base"], ["harmless-base", "helpful-base"])
    assert all(subset in prompt for prompt, subset in zip(task.prompts_eval, task.eval_subsets))
    assert {p.prompt.split()[1] for p in task.pairs_eval[:2]} == {"helpful-base", "harmless-base"}
    assert data.load_task("hh-rlhf", seed=1, data_dir=tmp_path) == task
    for subset in ("helpful-base", "harmless-base"):
        write_jsonl(tmp_path / "hh-rlhf" / subset / "test.jsonl.gz", [hh("\n\nHuman: d" + A, " s", " s")])
    with pytest.raises(ValueError, match="^task hh-rlhf: pairs_eval is empty after filtering$"):
        data.load_task("hh-rlhf", data_dir=tmp_path)


def test_load_task_tldr_from_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "TLDR_BATCHES", (3,))
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("no download expected"))
    (tmp_path / "tldr" / "tldr_3_filtered").mkdir(parents=True)
    (tmp_path / "tldr" / "comparisons").mkdir()
    for split in ("train", "valid", "test"):
        write_jsonl(tmp_path / "tldr" / "tldr_3_filtered" / f"{split}.jsonl",
                    [{"subreddit": "s", "title": "t", "post": f"{split} {i}", "summary": f" sum {i}"} for i in range(3)])
    write_jsonl(tmp_path / "tldr" / "comparisons" / "batch3.json",
                [comparison("a", " x", " y", 0), comparison("b", " x", " y", 1, "valid2"), comparison("c", " u", " v", 1)])
    task = data.load_task("tldr", data_dir=tmp_path, template="tldr")
    assert (len(task.sft_train), len(task.sft_eval), len(task.pairs_train), len(task.pairs_eval)) == (3, 3, 2, 1)
    assert task.pairs_eval == [Pair("SUBREDDIT: r/sub\n\nTITLE: T\n\nPOST: b\n\nTL;DR:", " y", " x")]
    assert sorted(task.prompts_eval) == [f"SUBREDDIT: r/s\n\nTITLE: t\n\nPOST: test {i}\n\nTL;DR:" for i in range(3)]
    assert task.prompt_cut == "post" and task.eval_subsets is None


def test_tldr_names_every_missing_file_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("off")))
    (tmp_path / "tldr" / "tldr_3_filtered").mkdir(parents=True)
    (tmp_path / "tldr" / "tldr_3_filtered" / "train.jsonl").write_text("")
    with pytest.raises(DataError) as e:
        data.load_task("tldr", data_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{2 + len(readers.TLDR_BATCHES)} of {3 + len(readers.TLDR_BATCHES)} data files")
    assert "tldr/tldr_3_filtered/valid.jsonl" in msg and "tldr/comparisons/batch22.json" in msg
    assert f"--data_dir {tmp_path}" in msg and "train.jsonl" not in msg


def test_load_task_unknown_name():
    with pytest.raises(ValueError) as e:
        data.load_task("imdb")
    assert "\n" not in str(e.value) and "demo, jsonl, hh-rlhf, tldr" in str(e.value)


def gold_gaps(pairs):
    return [data.demo_gold_reward(p.prompt, p.chosen) - data.demo_gold_reward(p.prompt, p.rejected) for p in pairs]


def test_demo_task_reproducible_and_held_out():
    task = data.load_task("demo", seed=0)
    assert task == data.load_task("demo", seed=0) and task != data.load_task("demo", seed=1)
    cfg = data.DemoConfig()
    assert (len(task.sft_train), len(task.sft_eval), len(task.pairs_train), len(task.pairs_eval),
            len(task.prompts_eval)) == (cfg.sft_train, cfg.sft_eval, cfg.pairs_train, cfg.pairs_eval, cfg.prompts_eval)
    assert task.tokenizer == "demo" and task.gold_reward is data.demo_gold_reward
    train_prompts = {p for p, _ in task.sft_train} | {p.prompt for p in task.pairs_train}
    eval_prompts = set(task.prompts_eval)
    assert len(eval_prompts) == cfg.prompts_eval and not train_prompts & eval_prompts
    assert {p for p, _ in task.sft_eval} | {p.prompt for p in task.pairs_eval} <= eval_prompts
    texts = [t for p, r in task.sft_train for t in (p, r)] + [t for p in task.pairs_train for t in (p.chosen, p.rejected)]
    assert max(len(t.encode()) for t in texts) <= 48 and max(len(p.encode()) for p in train_prompts) <= 32
    assert all(p.chosen != p.rejected and p.chosen.startswith(" ") for p in task.pairs_train)
    small = data.load_task("demo", seed=3, demo=data.DemoConfig(sft_train=10, pairs_train=7, prompts_eval=20))
    assert (len(small.sft_train), len(small.pairs_train), len(small.prompts_eval)) == (10, 7, 20)
    # The pairs come one after another: fewer of them are the first ones (what --max_train draws alone)
    assert data.load_task("demo", seed=0, demo=data.DemoConfig(pairs_train=50)) == replace(
        task, pairs_train=task.pairs_train[:50])


def test_a_run_with_max_train_sees_the_demo_pairs_a_whole_task_would_give_it():
    from lab.pipeline import RunConfig, load_data
    run = RunConfig(max_train=40, max_eval=30)
    whole, cut = (load_data(replace(run, max_train=m), 8, data.DemoConfig(pairs_train=500)) for m in (0, 40))
    assert cut.pairs_train == whole.pairs_train[:40] and cut.sft_train == whole.sft_train[:40]
    assert cut.pairs_eval == whole.pairs_eval and cut.prompts_eval == whole.prompts_eval


def test_demo_gold_reward_terms():
    g, prompt = data.demo_gold_reward, "sea, 4 words, no crab:"
    assert g(prompt, " fish wave boat big") == 1.5 + 1.25 + 1.0  # topic values, neutral "big" 0
    assert g(prompt, " fish wave boat reef") == 3.75 + 0.5  # a good word instead of a neutral one
    assert g(prompt, " fish fish boat big") == 1.5 + 1.0 - 1  # a repeat counts once and costs 1
    assert g(prompt, " fish wave boat") == 3.75 - 1  # one word short
    assert g(prompt, " fish wave boat big red") == 3.75 - 1  # one word too many
    assert g(prompt, " fish wave boat crab") == 3.75 + 0.75 - 3  # the banned word
    assert g(prompt, " fish wave sand big") == 1.5 + 1.25 - 1  # a word of the clashing topic
    assert g(prompt, " big fish wave boat") == 3.75 + 1  # first and last start with "b"
    assert g(prompt, " boat fish wave boat") == 3.75 - 1  # same word at both ends: no bonus
    assert g(prompt, " fsh wave boat big") == 1.25 + 1.0 - 1  # not a word
    assert g("night, 3 words, no owl:", " moon star bat") == 1.5 + 1.25 + 0.75
    assert g("night, 3 words, no owl:", " fish wave boat") == 0.0  # another topic's words are neutral
    for prompt, response in [("", ""), (prompt, ""), (prompt, "\x00\ufffd\n"), ("\ufffd" * 50, " fish"),
                             ("sea, 9 words, no x:", " a" * 1000), ("moon, 3 words, no x:", " moon"),
                             (prompt, bytes(range(256)).decode("utf-8", "replace"))]:
        assert math.isfinite(g(prompt, response))
    assert g(prompt, "") == -4.0


def test_demo_labels_noise_grows_as_gap_shrinks():
    task = data.load_task("demo")
    gaps = gold_gaps(task.pairs_train + task.pairs_eval)
    big = [x for x in gaps if abs(x) >= 3]
    small = [x for x in gaps if 0 < abs(x) < 0.5]
    assert len(big) > 300 and len(small) > 100  # both kinds of pairs exist
    assert sum(x > 0 for x in big) / len(big) > 0.9
    assert sum(x > 0 for x in small) / len(small) < 0.75
    clean = data.load_task("demo", demo=data.DemoConfig(noise_temperature=0.0))
    assert all(x >= 0 for x in gold_gaps(clean.pairs_train))


def test_demo_sft_corpus_has_mixed_quality():
    task = data.load_task("demo")
    gold = torch.tensor([data.demo_gold_reward(p, r) for p, r in task.sft_train])
    assert gold.std() > 1 and -1 < gold.mean() < 1
    assert (gold >= 3).float().mean() < 0.05 and (gold < -2).float().mean() > 0.05  # room to improve
