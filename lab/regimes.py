"""When does MPO help? The demo's data regimes x budgets (docs/results.md has the plan and the
answer): each cell a 10-seed study of every method and arm on one SFT model and RM, and the table
and the picture that sum the cells up.

    python -m lab.regimes run off x1    # one cell, in out/regimes/off_x1/
    python -m lab.regimes report        # out/regimes/table.md, gold_vs_flops.png: the cells run
    python -m lab.regimes task DIR      # the second gold task (sorting digits): --dataset jsonl

A regime's cells share its SFT model, RM and resampled pairs (they do not depend on the budget):
the first cell run makes them, the others copy them in.
"""
import json
import sys
from pathlib import Path

from lab.report import plt, save_figure
from lab.study import share_sft_and_rm

REGIMES = {"on": [], "off": ["--demo.pairs_source", "other"],
           "on-noisy": ["--demo.noise_temperature", "2"],
           "off-noisy": ["--demo.pairs_source", "other", "--demo.noise_temperature", "2"]}
BUDGETS = {"x0.5": ["--dpo.epochs", "2"], "x1": [], "x3": ["--dpo.epochs", "12"]}
# four resampled pairs per prompt, in one DPO epoch: the x1 budget's steps on four times the pairs
EXTRAS = {"": [], "ppp4": ["--split.pairs_per_prompt", "4", "--dpo.epochs", "1"]}
ROOT = Path("out/regimes")


def cell_name(regime: str, budget: str, extra: str = "") -> str:
    return f"{regime}_{budget}" + (f"_{extra}" if extra else "")


def run_cell(regime: str, budget: str, extra: str = ""):
    """The cell's study under ROOT, its regime's shared stages copied from a cell run before."""
    from lab.cli import main  # the command line: the study, its lock and its one-line errors
    out = ROOT / cell_name(regime, budget, extra)
    for other in sorted(ROOT.glob(f"{regime}_x*")):
        if other != out and (other / "shared" / "rm" / "final.pt").exists():
            share_sft_and_rm(other, out)
            break
    main([*REGIMES[regime], *BUDGETS[budget], *EXTRAS[extra], "--seeds", "10", "--out", str(out)])


def cell_text(claim: dict) -> str:
    """"+0.164 [+0.142, +0.185] holds", with the seeds it would need when not decisive."""
    d = claim["diff"]
    if not d:
        return "-"
    ci = f" [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d["ci95"] else ""
    needed = claim.get("noise", {}).get("seeds_needed", "-")
    more = f" (needs {needed or '> 10,000'} seeds)" if claim["verdict"] == "inconclusive" else ""
    return f"{d['mean']:+.3f}{ci} **{claim['verdict']}**{more}"


def report():
    """ROOT/table.md: every cell run (rows) and its claims (columns); ROOT/gold_vs_flops.png:
    held-out gold against each method's FLOPs, a point per budget, one panel per regime."""
    def order(path):  # the plan's order: regimes, then budgets; other cells (a second task) last
        regime, _, budget = path.parent.name.partition("_")
        return (list(REGIMES).index(regime) if regime in REGIMES else len(REGIMES),
                list(BUDGETS).index(budget) if budget in BUDGETS else len(BUDGETS), budget)

    cells = {p.parent.name: json.loads(p.read_text())
             for p in sorted(ROOT.glob("*/results.json"), key=order)}
    if not cells:
        sys.exit(f"no cell has finished under {ROOT}")
    claims = list(next(iter(cells.values()))["claims"])
    lines = ["| cell | " + " | ".join(claims) + " | largest KL to SFT |",
             "|---" * (len(claims) + 2) + "|"]
    for name, r in cells.items():
        kl = max(m["kl_to_sft"]["mean"] for m in r["methods"].values())
        lines.append(f"| {name} | " + " | ".join(cell_text(r["claims"][c]) for c in claims)
                     + f" | {kl:.2f} |")
    (ROOT / "table.md").write_text("\n".join(lines) + "\n")
    regimes = [r for r in REGIMES if any(name.split("_")[0] == r for name in cells)]
    fig, axes = plt.subplots(1, len(regimes), figsize=(4.5 * len(regimes), 3.6), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        mine = {b: cells[cell_name(regime, b)] for b in BUDGETS if cell_name(regime, b) in cells}
        first = next(iter(mine.values()))
        ax.axhline(first["methods"]["sft"]["gold"]["mean"], color="gray", ls="--", label="sft")
        for i, method in enumerate(m for m in first["methods"] if m != "sft"):
            points = sorted((r["methods"][method]["compute"]["flops"],
                             r["methods"][method]["gold"]["mean"]) for r in mine.values())
            ax.plot(*zip(*points), marker="o", color=f"C{i}", label=method)
        ax.set(xscale="log", title=regime, xlabel="FLOPs (the method's own, counted whole)",
               ylabel="held-out gold (mean over seeds)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, ROOT / "gold_vs_flops.png")
    print(f"{ROOT / 'table.md'}, {ROOT / 'gold_vs_flops.png'}")


# A second gold task, of another kind than the demo's: sort a few digits. Its gold reward is not a
# sum of per-word values but an interaction: how much of the answer is in order times how much of
# the prompt it keeps, so that a response earns the order bonus only with the right digits.
SORT_GOLD = """import re
from collections import Counter


def gold(prompt, response):
    m = re.fullmatch(r"sort: ([0-9 ]+) ->", prompt)
    asked = [int(x) for x in m[1].split()] if m else []
    words = response.split()
    digits = [int(w) for w in words if len(w) == 1 and w.isdigit()]
    ordered = sum(a <= b for a, b in zip(digits, digits[1:])) / max(1, len(digits) - 1)
    kept = sum((Counter(digits) & Counter(asked)).values()) / max(1, len(asked))
    slips = abs(len(digits) - len(asked)) + len(words) - len(digits)  # wrong count, non-digits
    return 3 * ordered * kept + 2 * kept - slips
"""


def sort_task(folder: Path, pairs: int = 20000, prompts: int = 500, held_out: int = 150,
              seed: int = 0, shifted: bool = False):
    """The sorting task as --dataset jsonl files (train / test pairs, SFT rows) and gold.py in
    `folder`: prompts "sort: 7 3 9 ->" over 3 to 6 digits; responses are the sorted digits after a
    few adjacent swaps, sometimes a digit dropped or added; labels follow Bradley-Terry on the gold
    gap at temperature 0.5. `shifted`: the pairs' responses from another mix (more swaps and slips)
    than the SFT rows' (off-policy pairs)."""
    import math
    import random
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gold.py").write_text(SORT_GOLD)
    namespace = {}
    exec(SORT_GOLD, namespace)  # our own text, written just above: the labels follow it
    gold = namespace["gold"]
    space = set()
    while len(space) < prompts + held_out:
        space.add(tuple(rng.randrange(10) for _ in range(rng.randint(3, 6))))
    space = sorted(space)
    rng.shuffle(space)
    split = {"train": space[held_out:], "test": space[:held_out]}

    def response(digits, other):
        out = sorted(digits)
        for _ in range(rng.choice((1, 2, 3, 4, 5) if other else (0, 1, 1, 2, 3))):
            i = rng.randrange(len(out) - 1)
            out[i], out[i + 1] = out[i + 1], out[i]
        if rng.random() < (0.4 if other else 0.15):
            del out[rng.randrange(len(out))]
        if rng.random() < (0.4 if other else 0.15):
            out.insert(rng.randrange(len(out) + 1), rng.randrange(10))
        return " " + " ".join(map(str, out))

    def prompt_of(digits):
        return f"sort: {' '.join(map(str, digits))} ->"

    for part, n, sft in (("train", pairs, 3000), ("test", 1000, 500)):
        with open(folder / f"sft_{part}.jsonl", "w") as f:
            for digits in rng.choices(split[part], k=sft):
                f.write(json.dumps({"prompt": prompt_of(digits),
                                    "completion": response(digits, False)}) + "\n")
        with open(folder / f"{part}.jsonl", "w") as pair_file:
            for _ in range(n):
                digits = rng.choice(split[part])
                prompt = prompt_of(digits)
                a, b = response(digits, shifted), response(digits, shifted)
                if a == b:
                    continue
                p_a = 0.5 + 0.5 * math.tanh((gold(prompt, a) - gold(prompt, b)) / (2 * 0.5))
                chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
                pair_file.write(json.dumps({"prompt": prompt, "chosen": chosen,
                                            "rejected": rejected}) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"] and len(sys.argv) in (4, 5):
        run_cell(*sys.argv[2:])
    elif sys.argv[1:] == ["report"]:
        report()
    elif sys.argv[1:2] == ["task"] and len(sys.argv) in (3, 4):
        sort_task(Path(sys.argv[2]), shifted=sys.argv[3:] == ["shifted"])
    else:
        sys.exit("usage: python -m lab.regimes run REGIME BUDGET [ppp4] | report | task DIR "
                 f"[shifted]; regimes: {', '.join(REGIMES)}; budgets: {', '.join(BUDGETS)}")
