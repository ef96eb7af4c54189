"""The study over seeds (lab.study.run_seeds, --seeds N): results.json with every metric's mean,
95 % Student-t interval and per-seed values, the paper's claims as paired per-seed differences with
a verdict (the statistics: lab/stats.py), and the aggregated report.md with the over-optimisation
curves; and the sweep's reward-KL frontier (lab.study.run_sweep)."""
import json
from dataclasses import asdict
from pathlib import Path

from lab.checkpoints import atomic_save
from lab.report import plt, sample_lines, save_figure
from lab.stats import noise, paired, summary, verdict


METRICS = ("gold", "rm_score", "kl_to_sft", "win_rate")
# claim: (model, compared with); a positive difference of the task's metric says the claim holds.
CLAIMS = {"mpo_beats_dpo_all": ("mpo", "dpo_all"), "mpo_beats_ppo_all": ("mpo", "ppo_all"),
          "mpo_beats_dpo_human": ("mpo", "dpo_human"),
          "dpo_reference_beats_sft_reference": ("mpo", "mpo[stage2_ref=sft]"),
          # the arms: does the RM's gap matter (the same split sizes at random)? does restricting
          # PPO to the hard prompts matter (PPO on every prompt, from the same DPO model)?
          "gap_split_beats_random_split": ("mpo", "mpo[select=random]"),
          "hard_prompts_beat_all_prompts": ("mpo", "mpo[ppo_prompts=all]")}


def study(records: list, equivalence: float = 0.0) -> dict:
    """results.json from per-seed records {"seed", "methods": {name: {metric: value, "compute":
    {...}}}, "gap_buckets": {bucket: {"accuracy", "pairs", "low", "high"}}, "evaluation_var":
    {claim: sampling_variance of its difference}, "samples": {name: [(prompt, response)]}, and on
    tasks
    with gold "gold_checks" (lab.rm.gold_checks' dict and "easy_share") and "gold_best"}: the gold
    checks and per-prompt values are listed per seed, the samples kept from the first seed.
    Claims compare gold where the task has it, else the RM score, and are "equivalent" within a
    margin of `equivalence` x the room from SFT to the best gold (where the task knows it).
    Claim (a), the RM's accuracy rising with its gap: per seed, the held-out pairs split into
    quartiles of |gap| (a scale-free version of the paper's [0,1) ... >=3 buckets, which a small RM
    leaves nearly empty), accuracy of the top quartile minus the bottom one, paired over seeds;
    when the seeds share one RM (--study shared), the interval is over its held-out pairs."""
    names = records[0]["methods"]
    key = "gold" if "gold" in names["sft"] else "rm_score"
    of = lambda name, k: [r["methods"][name][k] for r in records]  # noqa: E731
    out = {"seeds": [r["seed"] for r in records], "methods": {}, "claims": {}}
    mean = lambda counts: {k: round(sum(c[k] for c in counts) / len(counts))  # noqa: E731
                           for k in counts[0]}
    for name, first in names.items():
        out["methods"][name] = {k: summary(of(name, k)) for k in METRICS if k in first}
        out["methods"][name]["compute"] = mean(of(name, "compute"))
    if all("common_compute" in r for r in records):  # SFT and the RM
        out["common_compute"] = {stage: mean([r["common_compute"][stage] for r in records])
                                 for stage in records[0]["common_compute"]}
    out["claims"]["rm_accuracy_rises_with_gap"] = gap_claim(
        [r.get("gap_buckets") or {} for r in records])
    best = records[0].get("gold_best")
    margin = None
    if key == "gold" and best is not None and equivalence > 0:
        margin = equivalence * (best - out["methods"]["sft"]["gold"]["mean"])
    out["equivalence_margin"] = margin
    for claim, (a, b) in CLAIMS.items():
        if a not in names or b not in names:
            out["claims"][claim] = {"diff": None, "verdict": "inconclusive",
                                    "metric": f"needs models {a} and {b}"}
            continue
        diff = paired(of(a, key), of(b, key))
        out["claims"][claim] = {"diff": diff, "verdict": verdict(diff, margin),
                                "metric": f"{key}, {a} - {b}"}
        if all("evaluation_var" in r for r in records):
            evaluation = [r["evaluation_var"].get(claim) for r in records]
            out["claims"][claim]["noise"] = noise(diff, None if None in evaluation else evaluation,
                                                  margin)
    for extra in ("gold_checks", "evaluation_var"):
        if all(extra in r for r in records):
            out[extra] = [r[extra] for r in records]
    if best is not None:
        out["gold_best"] = best
    if "samples" in records[0]:
        out["samples"] = records[0]["samples"]
    return out


def gap_claim(buckets: list) -> dict:
    """Claim (a) from each seed's accuracy by |gap| quartile: the top quartile minus the bottom
    one, paired over seeds; seeds that share one RM have one value, whose interval is then the
    two-proportion normal one over its held-out pairs."""
    if not all(len(b) >= 2 for b in buckets):
        return {"buckets": {}, "diff": None, "verdict": "inconclusive",
                "metric": "no held-out pairs scored"}
    metric = "RM accuracy, top - bottom quartile of abs(gap)"
    by = {b: [r[b] for r in buckets] for b in buckets[0]}  # bucket -> its per-seed entries
    accuracy = {b: [x["accuracy"] for x in v] for b, v in by.items()}
    top, bottom = list(by)[-1], list(by)[0]
    if all(b == buckets[0] for b in buckets):  # one RM for every seed
        buckets = buckets[:1]
        (p, n), (q, m) = ((by[b][0]["accuracy"], by[b][0]["pairs"]) for b in (top, bottom))
        half = 1.96 * (p * (1 - p) / n + q * (1 - q) / m) ** 0.5
        diff = {"mean": p - q, "ci95": [p - q - half, p - q + half], "per_seed": [p - q]}
        metric += " (one RM: normal interval over its held-out pairs)"
    else:
        diff = paired(accuracy[top], accuracy[bottom])
    summaries = {}  # bucket -> its accuracy over seeds and its mean pairs, low and high
    for b, v in by.items():
        means = {k: sum(x[k] for x in v) / len(v) for k in ("pairs", "low", "high")}
        summaries[b] = {"accuracy": summary(accuracy[b][:len(buckets)]), **means}
    return {"buckets": summaries, "diff": diff, "verdict": verdict(diff), "metric": metric}


def seed_record(results: dict) -> dict:
    """The per-seed record back from one run folder's results.json (a study of one seed)."""
    first = lambda s: s["per_seed"][0]  # noqa: E731
    buckets = results["claims"]["rm_accuracy_rises_with_gap"]["buckets"]
    extra = {}  # the RM against gold and the best gold (tasks with one), per prompt, samples
    for k in ("gold_checks", "evaluation_var"):
        if k in results:
            extra[k] = results[k][0]
    for k in ("gold_best", "samples", "common_compute"):
        if k in results:
            extra[k] = results[k]
    return {"seed": results["seeds"][0],
            "methods": {n: {k: v if k == "compute" else first(v) for k, v in m.items()}
                        for n, m in results["methods"].items()},
            "gap_buckets": {b: {**v, "accuracy": first(v["accuracy"])} for b, v in buckets.items()},
            **extra}


def interval(s: dict) -> str:
    """"mean [lo, hi]" of a summary (the mean alone for one seed)."""
    ci = f" [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]" if s and s["ci95"] else ""
    return "-" if s is None else f"{s['mean']:.3f}{ci}"


def plot_overoptimisation(path, folders) -> bool:
    """Along every PPO stage, its held-out evaluations (ppo.eval_policy, every eval_every
    iterations): gold (top row; where the task has one) and RM score (bottom) against KL to the
    stage's reference, one line per seed (Gao et al. 2022: the gold reward rises, then falls while
    the proxy keeps rising). False when no stage logged an evaluation."""
    stages = sorted({str(p.parent.relative_to(f))
                     for f in folders for p in f.rglob("metrics.jsonl")
                     if p.parent.name in ("ppo_all", "mpo")})
    curves = {}  # (stage, seed folder) -> eval lines
    for stage in stages:
        for f in folders:
            log = f / stage / "metrics.jsonl"
            lines = log.read_text().splitlines() if log.exists() else []
            records = [json.loads(line) for line in lines]
            curves[stage, f.name] = [r for r in records if r["split"] == "eval" and "kl" in r]
    if not any(curves.values()):
        return False
    keys = [k for k in ("gold", "score") if any(k in r for c in curves.values() for r in c)]
    fig, axes = plt.subplots(len(keys), len(stages),
                             figsize=(3.8 * len(stages), 3.2 * len(keys)), squeeze=False)
    for col, stage in enumerate(stages):
        for row, key in enumerate(keys):
            ax = axes[row, col]
            for f in folders:
                points = [(r["kl"], r[key]) for r in curves[stage, f.name] if key in r]
                if points:
                    ax.plot(*zip(*points), marker="o", ms=3, alpha=0.7, label=f.name)
            ax.set(title=stage, xlabel="KL to the stage's reference (nats)",
                   ylabel=f"held-out {key}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def regime_lines(cfgs) -> list:
    """On the demo: which of its regimes ran (lab/regimes.py), and where the others are."""
    if cfgs["run"].dataset != "demo":
        return []
    demo, steps = cfgs["demo"], cfgs["dpo"].max_steps or f"{cfgs['dpo'].epochs:g} DPO epochs"
    source = ("the SFT data's generator (on-policy)" if demo.pairs_source == "sft" else
              "another generator than the SFT data's (off-policy)")
    return [f"The demo's regime: preference pairs from {source}, label noise temperature "
            f"{demo.noise_temperature:g}, budget {steps}. Every regime and budget side by side: "
            "docs/results.md, \"When does MPO help?\" (`python -m lab.regimes`).", ""]


def write_study(out: Path, cfgs, results: dict, folders) -> Path:
    """out/results.json and out/report.md of a study over seeds: the claims first, then every
    model's metrics (mean and 95 % interval over seeds) and compute, each seed's RM against gold
    where the task has it, the first seed's samples; each seed's own report is linked."""
    atomic_save(json.dumps(results, indent=1).encode(), out / "results.json")
    n, seeds = len(results["seeds"]), ", ".join(map(str, results["seeds"]))
    shared = cfgs["run"].study == "shared"
    made = ("SFT, the reward model and the resampled pairs were made once (`--study shared`, in "
            "`shared/`) and each seed trains every method anew on them" if shared else
            "Each seed trains every model anew, SFT and the reward model included (`--study "
            "full`)")
    margin = results.get("equivalence_margin")
    equivalent = (f" Otherwise it is **equivalent** when its 90 % interval lies within "
                  f"+-{margin:.3f} ({cfgs['run'].equivalence:g} x the room from SFT to the best "
                  "gold: the share fixed before the run, `--equivalence`)." if margin else "")
    lines = [f"# MPO study: {cfgs['run'].dataset}, {n} seeds ({seeds})", "",
             f"{made} (initialisation, data order, sampling), on the same task data; each is "
             "evaluated like a single run. A claim is the paired per-seed difference with its "
             "95 % Student-t interval over seeds: it **holds** when the interval lies above 0, "
             f"**fails** below 0.{equivalent} Else it is inconclusive. Claim (a): the reward "
             "model's accuracy on held-out pairs in the top quartile of |gap| minus that in the "
             "bottom quartile. Noise: the spread of the per-seed differences (sd) split into the "
             "evaluation's sampling (the responses drawn for each prompt; every seed has the same "
             "prompts) and the rest (training); `buy` says which more of would narrow the interval "
             "most (more `--eval.samples`, or more seeds), `seeds needed` at which count this "
             "spread would give a decisive verdict.", "", *regime_lines(cfgs),
             "| claim | difference | mean | 95 % CI | per seed | verdict | seeds | sd: total / "
             "evaluation / training | buy | seeds needed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for claim, c in results["claims"].items():
        d, noise = c["diff"], c.get("noise", {})
        if d:
            ci = f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d["ci95"] else "-"
            per_seed = ", ".join(f"{v:+.3f}" for v in d["per_seed"])
            cells = f"{d['mean']:+.3f} | {ci} | {per_seed}"
        else:
            cells = "- | - | -"
        sds = (" / ".join(f"{noise[k]:.3f}" for k in ("total_sd", "evaluation_sd", "training_sd"))
               if "total_sd" in noise else "-")
        needed = noise.get("seeds_needed", "-") if c["verdict"] == "inconclusive" else "-"
        lines.append(f"| {claim} | {c['metric']} | {cells} | **{c['verdict']}** | "
                     f"{len(d['per_seed']) if d else n} | {sds} | {noise.get('buy', '-')} | "
                     f"{'more than 10,000' if needed is None else needed} |")
    gap = results["claims"]["rm_accuracy_rises_with_gap"]["buckets"]
    if gap:
        quartiles = ", ".join(f"{b} ({v['low']:.2f}-{v['high']:.2f}, {v['pairs']:.0f} pairs) "
                              f"{interval(v['accuracy'])}" for b, v in gap.items())
        lines += ["", "Reward-model accuracy on held-out pairs by |gap| quartile (mean over "
                  f"seeds): {quartiles}."]
    no_gold = ("" if "gold" in results["methods"]["sft"] else
               " Without a gold reward the RM score is the only metric, and it is circular: the "
               "same RM trained the policies.")
    if not shared:
        no_gold = (" Each seed has its own reward model, whose scores have their own offset and "
                   "scale: compare RM scores within a seed (a claim's paired difference), not "
                   "across seeds." + no_gold)
    lines += ["", no_gold.strip()] if no_gold else []
    if "gold_checks" in results:
        lines += ["", "The reward model and its split against the gold reward, per seed. On the "
                  "held-out pairs: the RM's accuracy beside the label ceiling (the labels' own "
                  "agreement with gold, what a perfect RM would score) and the accuracy in the top "
                  "|gap| bucket that has pairs. On the pairs split: the share at or above delta, "
                  "how often the RM's chosen response is gold's on each side, and the correlation "
                  "of its gap with the gold gap. Each seed's report has the table by |gap|.", "",
                  "| seed | RM accuracy | label ceiling | ratio | top bucket: accuracy (bucket, "
                  "pairs) | share at or above delta | RM = gold, easy | RM = gold, hard | "
                  "Pearson r |", "|---|---|---|---|---|---|---|---|---|"]
        rows = list(zip(map(str, results["seeds"]), results["gold_checks"]))
        if all(c == rows[0][1] for _, c in rows):  # one RM and split for every seed
            rows = [("all (one RM)", rows[0][1])]
        for seed, c in rows:
            bucket, top = [(b, v) for b, v in c["by_gap"].items() if v["pairs"]][-1]
            cells = [f"{c['accuracy']:.3f}", f"{c['ceiling']:.3f}",
                     f"{c['accuracy'] / c['ceiling']:.3f}",
                     f"{top['accuracy']:.3f} ({bucket}, {top['pairs']})",
                     f"{c['easy_share']:.3f}",
                     *(f"{c[k]:.3f}" if c[k] is not None else "-"
                       for k in ("easy_vs_gold", "hard_vs_gold", "pearson"))]
            lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    if plot_overoptimisation(out / "overoptimisation.png", folders):
        lines += ["", "## Over-optimisation", "",
                  "Along every PPO stage, held-out gold (where the task has it) and RM score "
                  "against KL to the stage's reference, one line per seed (Gao et al. 2022):", "",
                  "![over-optimisation](overoptimisation.png)"]
    metrics = [k for k in METRICS if k in results["methods"]["sft"]]
    compute = ["policy_steps", "policy_tokens", "samples", "flops", "wall_s"]
    lines += ["", f"## Models (mean [95 % CI] over {n} seeds)", "",
              "| model | " + " | ".join(metrics + compute) + " |",
              "|---" * (len(metrics) + len(compute) + 1) + "|"]
    for name, m in results["methods"].items():
        scores = " | ".join(interval(m[k]) for k in metrics)
        counts = " | ".join(f"{m['compute'].get(k, 0):.3g}" if k == "flops" else
                            f"{m['compute'].get(k, 0):,}" for k in compute)
        lines.append(f"| {name} | {scores} | {counts} |")
    if cfgs["run"].budget == "matched":
        budget = ("`--budget matched`: every method gets dpo_all's optimizer steps, PPO the "
                  "nearest whole number of iterations, MPO half of them in DPO and the rest in "
                  "PPO.")
    elif cfgs["run"].budget == "compute":
        budget = ("`--budget compute`: every method gets about dpo_all's FLOPs, the resampling "
                  "included, MPO half of what its resampling leaves in DPO and the rest in PPO "
                  "(steps and iterations estimated from the data's lengths: the flops column "
                  "shows what each spent).")
    else:
        budget = ("`--budget data`: budgets are not matched, each stage's follows its data size "
                  "(`--budget matched` gives every method dpo_all's optimizer steps).")
    common = results.get("common_compute", {})
    common_text = " ".join(f"{stage.upper()}: {c['flops']:.3g} FLOPs, {c['wall_s']:,} s."
                           for stage, c in common.items())
    compute_text = ("Compute (mean over seeds), counted whole: the policy's optimizer steps, the "
                    "real tokens through its forward and backward passes, the responses sampled "
                    "(the resampled pairs included for the models made from them: dpo_all, "
                    "mpo_dpo, mpo and its arms), FLOPs (training the policy, the RM and PPO's "
                    "critic; decoding; the forwards of frozen networks: DPO's reference, PPO's "
                    "reference, old policy, RM and critic, the RM ranking the resampled pairs; "
                    "per token and weight 2 for a forward, 6 for a trained one, lab/study.py's "
                    "`compute`) and wall seconds of its own stages. Every model starts from the "
                    "SFT model, and all but dpo_human need the reward model, counted apart: "
                    f"{common_text} {budget}")
    links = ", ".join(f"[{f.name}]({f.name}/report.md)" for f in folders)
    configs = {k: asdict(v) for k, v in cfgs.items()}
    lines += ["", compute_text, "",
              "The reward-KL frontier: `--sweep 0.5,1,2` runs the study at those multiples of "
              "DPO's beta and PPO's kl_coef.", "",
              f"Per-seed reports (samples, the RM's accuracy by |gap|): {links}", ""]
    if "samples" in results:
        lines += [f"## Samples (seed {results['seeds'][0]})", "", *sample_lines(results["samples"])]
    lines += ["## Configuration", "", "```json", json.dumps(configs, indent=1), "```"]
    atomic_save("\n".join(lines).encode(), out / "report.md")
    return out / "report.md"


def plot_sweep(path, studies: dict, key: str):
    """The reward-KL frontier (Rafailov et al. 2023, Figure 2): per model, `key` against KL to SFT
    at every regularisation multiple of the sweep, every seed a faint point, the mean over seeds a
    line."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, name in enumerate(next(iter(studies.values()))["methods"]):
        color = f"C{i}"
        means = []
        for x, results in studies.items():
            m = results["methods"].get(name)
            if m:
                ax.scatter(m["kl_to_sft"]["per_seed"], m[key]["per_seed"], color=color,
                           alpha=0.25, s=12)
                means.append((m["kl_to_sft"]["mean"], m[key]["mean"], x))
        ax.plot([p[0] for p in means], [p[1] for p in means], marker="o", color=color, label=name)
        for kl, y, x in means:
            ax.annotate(f"x{x:g}", (kl, y), textcoords="offset points", xytext=(3, 3),
                        fontsize=7, color=color)
    ax.set(xlabel="KL to SFT (nats per response)", ylabel=f"mean {key}",
           title=f"{key} against KL to SFT")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def write_sweep(out: Path, cfgs, studies: dict) -> Path:
    """out/sweep.json (every multiple's results.json) and out/report.md: the frontier plot, each
    model's metric and KL at every multiple, and the claims' verdicts at every multiple."""
    first = next(iter(studies.values()))
    key = "gold" if "gold" in first["methods"]["sft"] else "rm_score"
    by_multiple = {f"{x:g}": r for x, r in studies.items()}
    atomic_save(json.dumps(by_multiple, indent=1).encode(), out / "sweep.json")
    plot_sweep(out / "frontier.png", studies, key)
    xs = [f"x{x:g}" for x in studies]
    dpo, ppo = cfgs["dpo"].beta, cfgs["ppo"].kl_coef
    seeds = len(first["seeds"])
    lines = [f"# MPO reward-KL frontier: {cfgs['run'].dataset}, {seeds} seed(s) per point", "",
             f"Every model trained at multiples {', '.join(xs)} of the regularisation strengths "
             f"(DPO's beta {dpo:g}, PPO's kl_coef {ppo:g}; MPO's two stages both), each multiple "
             "a study of its own in `sweep_<x>/`. A model whose line lies higher at the same KL "
             "is better (the DPO paper's Figure 2).", "",
             "![frontier](frontier.png)", "",
             f"{key} (mean [95 % CI] over seeds) / KL to SFT (mean):", "",
             "| model | " + " | ".join(xs) + " |", "|---" * (len(xs) + 1) + "|"]
    for name in first["methods"]:
        cells = [f"{interval(r['methods'][name][key])} / "
                 f"{r['methods'][name]['kl_to_sft']['mean']:.2f}"
                 if name in r["methods"] else "-" for r in studies.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "The claims at every multiple (mean paired difference, verdict):", "",
              "| claim | " + " | ".join(xs) + " |", "|---" * (len(xs) + 1) + "|"]
    for claim in first["claims"]:
        cells = [f"{c['diff']['mean']:+.3f} {c['verdict']}" if c["diff"] else c["verdict"]
                 for c in (r["claims"][claim] for r in studies.values())]
        lines.append(f"| {claim} | " + " | ".join(cells) + " |")
    links = ", ".join(f"[sweep_{x:g}](sweep_{x:g}/report.md)" for x in studies)
    lines += ["", f"Per-multiple reports: {links}"]
    atomic_save("\n".join(lines).encode(), out / "report.md")
    return out / "report.md"
