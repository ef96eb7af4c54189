"""Progress lines: a phase's rate and ETA, so that no long phase is silent."""
import datetime
import time


def rate_eta(done: int, total: int, seconds: float) -> str:
    """"3.21 it/s | ETA 0:01:05": the rate so far and the time left at that rate; "s/it" when an
    iteration takes more than a second (a GPT-2 step on a CPU), so that the rate never reads
    0.00."""
    rate = done / max(seconds, 1e-9)
    speed = f"{rate:.2f} it/s" if rate >= 1 else f"{1 / max(rate, 1e-9):.1f} s/it"
    return f"{speed} | ETA {datetime.timedelta(seconds=round((total - done) / max(rate, 1e-9)))}"


def progress(items, name: str, every: float = 10.0):
    """Yield the items of a sequence; a phase that takes more than `every` seconds prints
    `name i/n | rate | ETA` every `every` seconds and once at its end: no long phase is silent."""
    start = last = time.time()
    for i, item in enumerate(items, 1):
        yield item
        now = time.time()
        if now - last >= every or (i == len(items) and now - start >= every):
            last = now
            print(f"{name} {i}/{len(items)} | {rate_eta(i, len(items), now - start)}", flush=True)


def timestamp() -> str:
    """The time of a metrics.jsonl line, UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
