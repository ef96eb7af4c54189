"""The published preference formats behind data.py: Anthropic's HH-RLHF dialogues and OpenAI's
TL;DR (summarize-from-feedback) comparisons and SFT files, read into Pairs with every line checked
(lab/readers.py), and the prompt cuts that keep their structure when a prompt is too long."""
import os
import re
from dataclasses import dataclass

from lab.readers import DataError, get_field, read_rows


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


def cut_turns(tok, text: str, max_len: int) -> list[int] | None:
    # HH-RLHF (the author): drop whole oldest turns, so the dialogue still opens with a Human turn
    # and no turn is cut in the middle; None when even the last Human turn does not fit.
    for start in (m.start() for m in re.finditer(re.escape(HUMAN), text)):
        if len(ids := tok.encode_ordinary(text[start:])) <= max_len:
            return ids
    return None


def cut_post(tok, text: str, max_len: int) -> list[int] | None:
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
        return len(tok.encode_ordinary(text[:begin] + post[:cut] + tail)) <= max_len

    for sep in ("\n", " "):
        cuts = [m.start() for m in re.finditer(sep, post)]
        lo, hi = 0, len(cuts)  # binary search for the longest post[:cut] that fits: cuts[lo - 1]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(cuts[mid - 1]) else (lo, mid - 1)
        if lo:
            return tok.encode_ordinary(text[:begin] + post[:cuts[lo - 1]].rstrip() + tail)
    return None
