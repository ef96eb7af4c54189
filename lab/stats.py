"""The statistics of the study's claims: Student-t intervals over seeds (exact quantiles), the
verdicts (holds, fails, equivalent, inconclusive), the seeds a verdict would need, and where a
claim's noise comes from. lab/results.py applies them to the study's records."""
import math


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (modified
    Lentz; Numerical Recipes 6.4), on the side of x where it converges fast."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1 - betainc(b, a, 1 - x)
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d, c = 1 + aa * d, 1 + aa / c
            d, c = 1 / (d if abs(d) > tiny else tiny), (c if abs(c) > tiny else tiny)
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
    return math.exp(front + b * math.log1p(-x)) * h / a


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile t_{p, df} for p in (0.5, 1), exact for every df: the CDF, 1 - I_{df /
    (df + t^2)}(df / 2, 1 / 2) / 2 (Abramowitz & Stegun 26.7.1), solved for p by bisection."""
    cdf = lambda t: 1 - betainc(df / 2, 0.5, df / (df + t * t)) / 2  # noqa: E731
    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def t975(df: int) -> float:
    return t_quantile(0.975, df)


def sd(values) -> float:
    """The sample standard deviation (n - 1)."""
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def summary(values) -> dict:
    """{"mean", "ci95": [lo, hi], "per_seed"} of per-seed values: mean +- t_{0.975, n-1} * s /
    sqrt(n), s the sample standard deviation; one value gives no interval (ci95 None)."""
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci95": None, "per_seed": values}
    half = t975(n - 1) * sd(values) / n ** 0.5
    return {"mean": mean, "ci95": [mean - half, mean + half], "per_seed": values}


def verdict(diff: dict, margin: float | None = None) -> str:
    """"holds" when the 95 % interval of a difference lies above 0, "fails" below 0; else
    "equivalent" when its 90 % interval lies inside +-margin (two one-sided tests at 5 %, the
    margin fixed before the run: --equivalence), else (or with one seed, no interval)
    "inconclusive"."""
    ci = diff and diff["ci95"]
    if not ci:
        return "inconclusive"
    if ci[0] > 0 or ci[1] < 0:
        return "holds" if ci[0] > 0 else "fails"
    values = diff["per_seed"]
    if not margin or len(values) < 2:
        return "inconclusive"
    half90 = t_quantile(0.95, len(values) - 1) * sd(values) / len(values) ** 0.5
    return "equivalent" if abs(diff["mean"]) + half90 < margin else "inconclusive"


def seeds_needed(diff: dict, margin: float | None = None, most: int = 10000) -> int | None:
    """The seeds at which a difference with this mean and spread would be decisive: its 95 %
    interval clear of 0, or (with a margin) its 90 % interval inside +-margin; None past `most`."""
    values = diff["per_seed"]
    mean, s = abs(diff["mean"]), sd(values) if len(values) > 1 else 0.0
    # t's quantiles exceed the normal's (1.96, 1.645): no n below the normal's answer will do
    bounds = [(1.96 * s / mean) ** 2 if mean else math.inf]
    if margin and mean < margin:
        bounds.append((1.645 * s / (margin - mean)) ** 2)
    if min(bounds) > most:
        return None
    for n in range(max(2, int(min(bounds))), most + 1):
        if t975(n - 1) * s / n ** 0.5 < mean or (
                len(bounds) > 1 and mean + t_quantile(0.95, n - 1) * s / n ** 0.5 < margin):
            return n
    return None


def sampling_variance(a: list, b: list) -> float | None:
    """The variance the evaluation's sampling adds to a seed's difference of means, the prompts held
    fixed: from each prompt's paired differences a[p][j] - b[p][j] (sample j of both models drawn
    with the same random numbers), the sum over prompts of their variance over the samples / the
    samples, over prompts^2. None with one sample a prompt."""
    k = len(a[0])
    if k < 2:
        return None
    diffs = [[x - y for x, y in zip(xs, ys)] for xs, ys in zip(a, b, strict=True)]
    return sum(sd(d) ** 2 / k for d in diffs) / len(diffs) ** 2


def noise(diff: dict, evaluation: list | None, margin: float | None) -> dict:
    """Where a claim's spread over seeds comes from: `evaluation`, per seed, the variance its
    evaluation's sampling adds (sampling_variance; None with one sample a prompt), the rest
    training's (initialisation, data order, sampling while training). `buy`: more --eval.samples
    shrink only the first, more seeds both; and the seeds a decisive verdict would need at this
    spread."""
    out = {}
    if evaluation:
        out["evaluation_sd"] = (sum(evaluation) / len(evaluation)) ** 0.5
    if len(diff["per_seed"]) > 1:
        total = sd(diff["per_seed"]) ** 2
        out |= {"total_sd": total ** 0.5, "seeds_needed": seeds_needed(diff, margin)}
        if evaluation:
            training = max(0.0, total - out["evaluation_sd"] ** 2)
            out |= {"training_sd": training ** 0.5,
                    "buy": "samples" if out["evaluation_sd"] ** 2 > training else "seeds"}
    return out


def paired(a, b) -> dict:
    """summary() of the per-seed differences a_s - b_s (a seed's models share its data, SFT model
    and RM)."""
    return summary([x - y for x, y in zip(a, b, strict=True)])
