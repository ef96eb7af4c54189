"""report.md and its plots for a finished MPO run (lab.pipeline.run_pipeline calls write_report
last): the results table of every model, the reward-gap split and the reward model's accuracy per
gap, the ablations, learning curves from every stage's metrics.jsonl, reward against KL to the SFT
model, samples, and the configuration. The study's numbers and report over seeds and sweeps are
lab/results.py's. Every file is written atomically (lab.checkpoints.atomic_save).
"""
import io
import json
from dataclasses import asdict
from pathlib import Path

import matplotlib
import torch

from lab.checkpoints import atomic_save

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402


def subset_results(results: dict, scores: dict, subsets: list, cfg):
    """lab.evaluate.compare_to_sft per subset of the held-out prompts (`subsets`: one name per
    prompt): each model's RM score and win rate against the SFT model, under
    results[name]["subsets"]."""
    per_sample = [s for s in subsets for _ in range(cfg.samples)]
    for subset in dict.fromkeys(subsets):
        inside = torch.tensor([x == subset for x in per_sample])
        for name, r in results.items():
            diff = scores[name][inside] - scores["sft"][inside]
            win = float((diff > cfg.tie).float().mean())
            tie = float((diff.abs() <= cfg.tie).float().mean())
            r.setdefault("subsets", {})[subset] = {
                "prompts": int(inside.sum()) // cfg.samples,
                "rm_score": float(scores[name][inside].mean()), "win_rate": win + tie / 2}


def save_figure(fig, path):
    """The figure as PNG bytes written by atomic_save: a kill never leaves half a plot (nor, under
    torchrun, a plot from every rank)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_save(buf.getvalue(), path)


def plot_gaps(path, gaps, delta, rm_by_gap):
    """Left: |gap| histogram with the threshold. Right: the RM's held-out accuracy per |gap|
    bucket."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.hist(gaps.abs().numpy(), bins=40, color="tab:blue")
    a.axvline(delta, color="tab:red", ls="--", label=f"delta = {delta:.3g}")
    a.set(xlabel="|reward-model gap|", ylabel="pairs", title="Pairs to split")
    a.legend()
    names = list(rm_by_gap)
    b.bar(names, [rm_by_gap[n]["accuracy"] or 0 for n in names], color="tab:green")
    for i, n in enumerate(names):
        b.text(i, 0.03, f"n={rm_by_gap[n]['pairs']}", ha="center")
    b.set(xlabel="|RM gap| of held-out human pairs", ylabel="RM accuracy", ylim=(0, 1),
          title="Reliability by gap")
    fig.tight_layout()
    save_figure(fig, path)


def plot_curves(path, out: Path):
    """One panel per stage folder: its key metric (train and held-out) against the step."""
    logs = sorted(out.rglob("metrics.jsonl"))
    cols = min(len(logs), 4)
    rows = -(-len(logs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat[len(logs):]:
        ax.axis("off")
    for ax, log in zip(axes.flat, logs):
        records = []
        # a line torn by a crash, or not one of ours, is left out
        for line in log.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        records = [r for r in records
                   if isinstance(r, dict) and {"stage", "step", "split"} <= r.keys()]
        # the stage's key metric: DPO's margins, the RM's accuracy, PPO's gold (else its RM score),
        # SFT's loss
        k = next((k for k in ("rewards/margins", "accuracy", "gold", "score", "loss")
                  if any(k in r for r in records)), "loss")
        for split in ("train", "eval"):
            points = [(r["step"], r[k]) for r in records if r["split"] == split and k in r]
            if points:
                ax.plot(*zip(*points), label=split, marker="o" if split == "eval" else None, ms=3)
        ax.set(title=str(log.parent.relative_to(out)), xlabel="step", ylabel=k)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_frontier(path, results, key):
    """Reward against KL to the SFT model, one point per model (the DPO paper's frontier plot)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, r in results.items():
        ax.scatter(r["kl_to_sft"], r[key])
        ax.annotate(name, (r["kl_to_sft"], r[key]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set(xlabel="KL to SFT (nats per response)", ylabel=f"mean {key}",
           title=f"{key} vs KL to SFT")
    fig.tight_layout()
    save_figure(fig, path)


def table(rows: dict, cols) -> list:
    """Markdown table lines, one row per key of `rows`."""
    def fmt(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    header = "| | " + " | ".join(cols) + " |"
    rule = "|---" * (len(cols) + 1) + "|"
    body = [f"| {name} | " + " | ".join(fmt(r.get(c)) for c in cols) + " |"
            for name, r in rows.items()]
    return [header, rule, *body]


def subset_table(results) -> list:
    """Report lines with RM score and win rate per subset of the held-out prompts (HH-RLHF:
    helpful-base, harmless-base, as the paper reports them); none for a task without subsets."""
    if "subsets" not in results["sft"]:
        return []
    names = list(results["sft"]["subsets"])
    rows = {m: {f"{s} {k}": r["subsets"][s][k] for s in names for k in ("rm_score", "win_rate")}
            for m, r in results.items()}
    sizes = ", ".join(f"{s} {results['sft']['subsets'][s]['prompts']}" for s in names)
    return [f"Per subset of the held-out prompts ({sizes} prompts):", "",
            *table(rows, [f"{s} {k}" for s in names for k in ("rm_score", "win_rate")]), ""]


def sample_lines(samples: dict) -> list:
    """Each model's (prompt, response) samples as a markdown list, prompt and response cut."""
    lines = []
    for name, pairs in samples.items():
        lines += [f"**{name}**", ""]
        lines += [f"- `{p[-80:]!r}` → `{r[:160]!r}`" for p, r in pairs] + [""]
    return lines


def write_report(out: Path, cfgs, results, samples, gaps, split_stats, variants, rm_metrics, made,
                 gold_best=None) -> Path:
    """`made`: {stage: the settings it was made with}, for the stages this run ran or loaded;
    `gold_best`: the mean best gold reward achievable on the held-out prompts, where the task knows
    it."""
    key = "gold" if "gold" in results["sft"] else "rm_score"
    checks = rm_metrics.get("gold")  # lab.rm.gold_checks, when the task has a gold reward
    by_gap = checks["by_gap"] if checks else rm_metrics.get("eval/accuracy_by_gap", {})
    plot_gaps(out / "gaps.png", gaps, split_stats["delta"], by_gap)
    plot_curves(out / "curves.png", out)
    plot_frontier(out / "frontier.png", results, key)
    times = {name: json.loads((out / name / "result.json").read_text())["wall_s"]
             for name in made if (out / name / "result.json").exists()}
    cols = [c for c in ("gold", "gold_se", "rm_score", "win_rate", "win", "tie", "lose",
                        "kl_to_sft", "length") if c in results["sft"]]
    best = max(results, key=lambda n: results[n][key])

    gold_note = (". `gold` is the task's own gold reward (the demo's, or --gold_reward)."
                 if key == "gold" else ".")
    intro = (f"Held-out prompts, {cfgs['eval'].samples} sampled response(s) each (temperature "
             f"{cfgs['eval'].temperature}); win / tie / lose against the SFT model's response to "
             "the same prompt (same sample index), by reward-model score" + gold_note)
    room = []  # how far the SFT model is from the best gold reward, where the task knows it
    if gold_best is not None and key == "gold":
        sft_gold = results["sft"]["gold"]
        room = [f"Room to improve: the best gold reward achievable on these prompts is "
                f"{gold_best:.3f} on average, the SFT model's mean gold {sft_gold:.3f} "
                f"({gold_best - sft_gold:+.3f}).", ""]

    def against_others(n):  # n's metric, then its difference to every model but the variants
        diffs = ", ".join(f"{results[n][key] - results[m][key]:+.3f} vs {m}"
                          for m in results if m != n and "[" not in m)
        return f"{n}: {results[n][key]:.3f}, {diffs}."

    highest = (f"Highest {key}: **{best}**. "
               + " ".join(against_others(n) for n in ("mpo", *variants) if n in results))

    gain = (f"; scores normalised so SFT responses have mean 0 and std 1 "
            f"({rm_metrics['gain_from']}; gain {rm_metrics['gain']:.3g})"
            if "gain" in rm_metrics else "")
    ceiling = ("; `ceiling` is the labels' own agreement with the gold reward on the same pairs "
               "(what a perfect RM would score), `rm_vs_gold` the RM's (it can pass the ceiling: "
               "an RM averages out the labels' noise)" if checks else "")
    split_text = (f"Pair source `{split_stats['source']}`, {split_stats['pairs']} pairs, "
                  f"delta {split_stats['delta']:.3g}: {split_stats['easy_pairs']} easy pairs for "
                  f"DPO ({split_stats['easy_share']:.1%} at or above delta), "
                  f"{split_stats['hard_prompts']} hard prompts for PPO (every pair with its gap "
                  "and side: `split.jsonl`)" + gain
                  + ". The reward model's accuracy on held-out pairs by |gap|, the table the "
                  "threshold rests on" + ceiling + ":")
    gap_cols = ["accuracy", "ceiling", "rm_vs_gold", "pairs"] if checks else ["accuracy", "pairs"]

    lines = [f"# MPO run: {cfgs['run'].dataset}", "", intro, "",
             *table(results, cols), "", *subset_table(results), *room,
             highest, "", "![reward vs KL](frontier.png)", "",
             "## The split", "", split_text, "",
             *table(by_gap, gap_cols), ""]
    if checks:
        easy, hard, r = (f"{checks[k]:.3f}" if checks[k] is not None else "-"
                         for k in ("easy_vs_gold", "hard_vs_gold", "pearson"))
        ratio = checks["accuracy"] / checks["ceiling"]
        lines += [f"All held-out pairs: RM accuracy {checks['accuracy']:.3f}, label ceiling "
                  f"{checks['ceiling']:.3f} (ratio {ratio:.3f}). On the {split_stats['pairs']} "
                  f"pairs split, the RM's chosen response is gold's on {easy} of the easy pairs "
                  f"and {hard} of the hard ones; the RM gap correlates with the gold gap at "
                  f"Pearson r = {r}.", ""]
    lines += ["![gaps](gaps.png)", ""]
    if variants:
        ablations = {n: {**variants[n], **results[n]} for n in variants}
        lines += ["## Ablations", "",
                  *table(ablations, ["delta", "easy_pairs", "hard_prompts", *cols]), ""]
    wall = ", ".join(f"{n} {t:.0f}" for n, t in times.items())
    lines += ["## Training", "", f"Wall time per stage (s): {wall}", "",
              "![learning curves](curves.png)", "", "## Samples", "", *sample_lines(samples)]
    # Every stage was made with the settings it recorded (a rerun with others is refused), so
    # together they describe what was run, also when each stage came from another command line
    # (train.sh). The ablation variants' stages differ in their split flags: theirs stand apart.
    settings = {k: v for name, stage in made.items() if not name.startswith("variants")
                for k, v in stage.items()}
    variant_settings = {name: stage for name, stage in made.items()
                        if name.startswith("variants")}
    recorded = {"stages": settings,
                **({"variants": variant_settings} if variant_settings else {}),
                "eval": asdict(cfgs["eval"])}
    lines += ["## Configuration", "",
              f"Stages: {', '.join(made)}; the flags they were made with (lab/runs.py's "
              "NOT_RECORDED ones do not change results), then the evaluation's:", "",
              "```json", json.dumps(recorded, indent=1), "```"]
    atomic_save("\n".join(lines).encode(), out / "report.md")
    return out / "report.md"


# --------------------------------------------------------------------------------------------------
# The study (--seeds N): every metric over seeds with a 95 % Student-t interval, and the paper's
# claims as paired per-seed differences with a verdict. One run folder's results.json is the study
# of its one seed.
