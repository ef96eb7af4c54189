"""The command line of `python mpo.py`: the configs of every stage as flags (lab/flags.py makes
them), the demo's preset, the dataset defaults, and `main`, which runs one run folder or the study
(lab/study.py) and turns every failure into one line."""
import signal
import sys

import torch

from data import DemoConfig
from dpo import DPOConfig
from lab.devices import setup_distributed
from lab.evaluate import EvalConfig
from lab.flags import flag_parser, given_flags, make_configs
from lab.pipeline import RunConfig, check_task, run_pipeline
from lab.runs import Interrupted, StopAfter, out_of_memory, release_run_folders
from lab.speed import keep_freed_memory
from lab.study import StudyInterrupted, interrupt_once, run_study
from lab.use import main_export, main_sample
from mpo import RMConfig, SFTConfig, SplitConfig
from ppo import PPOConfig

DESCRIPTION = ("Mixed Preference Optimization (Gou & Nguyen 2024): SFT, a reward model, then "
               "DPO on the pairs the reward model finds easy and PPO on the prompts it finds hard.")
CONFIGS = {"run": RunConfig, "sft": SFTConfig, "rm": RMConfig, "split": SplitConfig,
           "dpo": DPOConfig, "ppo": PPOConfig, "eval": EvalConfig, "demo": DemoConfig}
# The demo preset (--preset demo; --dataset demo implies it): a tiny GPT trained from scratch on 2
# CPU cores, so larger learning rates and shorter budgets; an RM of its own shape, 96 wide with 24
# heads of 4 (wider with more heads, it learns more of the banned word and repeats) from scratch
# for 2 epochs of 100k pairs (the budget its held-out accuracy needed), normalised so that the
# author's delta = 1 is one standard deviation of the SFT responses' scores; the real
# datasets keep the author's values. A study over 3 seeds, every method with dpo_all's optimizer
# steps (--budget matched), by default.
DEMO = {"run": dict(max_prompt_len=32, max_response_len=48, seeds=10, study="shared",
                   budget="matched"),
        "sft": dict(lr=3e-3, batch_size=32, grad_accum=1, epochs=5.0, warmup_steps=10,
                    eval_every=100, log_every=10),
        "rm": dict(n_embd=96, n_head=24, lr=1e-3, batch_size=32, grad_accum=1, epochs=2.0,
                   warmup_steps=100, weight_decay=0.0, normalize=True, eval_every=1000,
                   log_every=50),
        "split": dict(pairs_per_row=False),  # 100,000 pairs share 498 prompts: a pair per prompt
        "dpo": dict(lr=1e-4, beta=0.3, batch_size=32, grad_accum=1, epochs=4.0, warmup_steps=0,
                    eval_every=0, log_every=10),
        "ppo": dict(prompts_per_step=32, ppo_epochs=4, num_minibatches=2, actor_lr=1e-4,
                    critic_lr=3e-4, kl_coef=0.05, warmup_steps=0, decay="constant",
                    whiten_advantages=True, eval_every=5, eval_prompts=0),
        "eval": dict(prompts=150, samples=8)}
# The author's values that differ by dataset (the config dataclasses hold the HH-RLHF ones).
DATASET_DEFAULTS = {"tldr": {"split": dict(delta=2.0)}}


def parse_args(argv=None) -> dict:
    """{group: config}: dataclass defaults, then the demo preset's values (--preset demo, implied by
    --dataset demo) or the author's values for the dataset, then the flags given; checked."""
    preset_text = "; ".join(f"{g}: " + ", ".join(f"{k}={v}" for k, v in d.items())
                            for g, d in DEMO.items())
    parser = flag_parser(
        CONFIGS, description=DESCRIPTION,
        usage="python mpo.py [--dataset demo|jsonl|hh-rlhf|tldr] [--preset demo] [--init gpt2] "
              "[--out DIR] [--GROUP.FIELD VALUE ...]",
        epilog=f"--preset demo (implied by --dataset demo) sets: {preset_text}. What a run "
               "trained: `python mpo.py sample` answers prompts with any of its stages, `python "
               "mpo.py export` writes one in a Hugging Face layout (lab/use.py).")
    given = given_flags(parser, argv)
    dataset = given.get("run", {}).get("dataset", RunConfig.dataset)
    demo = dataset == "demo" or given.get("run", {}).get("preset", RunConfig.preset) == "demo"
    try:
        return make_configs(CONFIGS, DEMO if demo else DATASET_DEFAULTS.get(dataset, {}), given)
    except ValueError as e:
        parser.error(str(e))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["sample"], ["export"]):  # use what a run trained (lab/use.py)
        try:
            (main_sample if argv[0] == "sample" else main_export)(argv[1:])
        except (ValueError, RuntimeError, OSError) as e:
            sys.exit(f"mpo {argv[0]}: error: " + " ".join(str(e).split()))
        return
    keep_freed_memory()  # glibc keeps freed logits-sized blocks for reuse (lab/speed.py)
    cfgs = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, interrupt_once)  # `kill`: as Ctrl-C
    try:
        setup_distributed()  # under torchrun; a no-op otherwise
        if cfgs["run"].seeds > 1 or cfgs["run"].sweep:
            check_task(cfgs)  # here, before a seed's process starts
        report = run_study(cfgs, run_pipeline)  # one run, or one per seed and --sweep multiple
    except StopAfter as e:
        print(f"stopped after {e}, as --stop_after asked; rerun with the same --out to go on")
        return
    except KeyboardInterrupt as e:  # Ctrl-C: finished stages and the last checkpoint are on disk
        where = f"in stage {e}" if isinstance(e, Interrupted) else "outside the training stages"
        where = f"({e})" if isinstance(e, StudyInterrupted) else where
        print(f"\nmpo: interrupted {where}; rerun with the same --out to resume", file=sys.stderr)
        sys.exit(130)
    except torch.OutOfMemoryError:  # outside a stage (Stages.stage explains its own); before
        # RuntimeError, which it is
        sys.exit(f"mpo: error: {out_of_memory('sampling')}")
    # Bad data or flag values, a missing download, a checkpoint of another shape, a NaN: one line.
    except (ValueError, RuntimeError, OSError, FloatingPointError) as e:
        sys.exit("mpo: error: " + " ".join(str(e).split()))
    finally:
        signal.signal(signal.SIGTERM, previous)
        release_run_folders()
    print(f"report: {report}")
