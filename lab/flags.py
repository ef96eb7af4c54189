"""The command line: a flag per dataclass field, --<group>.<field> (the run's own fields have no
prefix), parsed and checked before anything is read or written.

    parser = flag_parser(CONFIGS, usage=..., description=..., epilog=...)  # argparse's keywords
    cfgs = make_configs(CONFIGS, preset, given_flags(parser, argv))  # {group: config}, checked

The learner's files hold the configs, lab/cli.py the presets and `parse_args`; this file, how flags
become configs and what each flag accepts.
"""
import argparse
import inspect
import math
import os
import re
from dataclasses import asdict, fields, is_dataclass, replace

from data import TOKENIZERS
from lab.devices import AUTOCAST_DTYPES

# Fields that take one of a few words: anything else is refused before a run starts.
CHOICES = {
    "run.dataset": ("demo", "jsonl", "hh-rlhf", "tldr"),
    "run.preset": ("", "demo"),
    "run.tokenizer": ("", *TOKENIZERS),
    "run.budget": ("data", "matched", "compute"),
    "run.study": ("full", "shared"),
    "run.template": ("author", "tldr"),
    **{f"{group}.dtype": tuple(AUTOCAST_DTYPES) for group in ("run", "sft", "rm", "dpo", "ppo")},
    "run.stop_after": ("", "sft", "rm", "split", "dpo_all", "dpo_human", "ppo_all", "mpo_dpo",
                       "mpo"),
    "rm.init": ("base", "sft"),
    "split.source": ("resample", "human"),
    "split.stage2_ref": ("dpo", "sft"),
    "split.order": ("easy_first", "hard_first"),
    "split.select": ("gap", "random"),
    "split.ppo_prompts": ("hard", "all"),
    "demo.pairs_source": ("sft", "other"),
    "dpo.loss_type": ("sigmoid", "ipo"),
    **{f"{group}.decay": ("cosine", "linear", "constant") for group in ("sft", "rm", "dpo", "ppo")},
}
# --methods, beside SFT. mpo_dpo: MPO's first stage alone, evaluated too; dpo_human: DPO on the
# dataset's own human pairs (the paper's vanilla DPO; on the demo's 100,000 pairs slow unless
# --budget matched).
METHODS = ("dpo_all", "dpo_human", "ppo_all", "mpo", "mpo_dpo")

# What each flag accepts, checked (validate) before anything is read or written: "group.field", or
# "*.field" for that field in every group -> (test, what it accepts). Every float must also be
# finite.
POSITIVE = (lambda v: v > 0, "> 0")
AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")
LIMITS = {
    **dict.fromkeys((
        "*.batch_size", "*.grad_accum", "*.log_every", "*.lr", "*.epochs", "*.grad_clip",
        "run.n_layer", "run.n_head", "run.n_embd", "run.max_prompt_len", "run.max_response_len",
        "sft.ckpt_every", "rm.ckpt_every", "dpo.ckpt_every", "dpo.beta",
        "ppo.prompts_per_step", "ppo.samples_per_prompt", "ppo.passes", "ppo.max_new_tokens",
        "ppo.temperature", "ppo.reward_clip", "ppo.kl_horizon", "ppo.ppo_epochs",
        "ppo.num_minibatches", "ppo.micro_batch_size", "ppo.clip_range", "ppo.clip_range_value",
        "ppo.actor_lr", "ppo.critic_lr", "ppo.adam_eps", "eval.prompts", "eval.samples",
        "split.pairs_per_prompt",
        "demo.sft_train", "demo.sft_eval", "demo.pairs_train", "demo.pairs_eval"), POSITIVE),
    **dict.fromkeys((
        "*.max_steps", "*.warmup_steps", "*.weight_decay", "*.eval_every", "run.max_train",
        "run.max_eval", "rm.center_coef", "rm.n_layer", "rm.n_head", "rm.n_embd", "split.delta",
        "ppo.top_k", "ppo.kl_coef", "ppo.kl_target", "ppo.vf_coef", "ppo.ent_coef",
        "ppo.ckpt_every", "ppo.eval_prompts", "ppo.max_iterations", "ppo.num_samples",
        "eval.temperature", "eval.tie", "eval.show", "demo.noise_temperature"), AT_LEAST_0),
    **dict.fromkeys(("split.batch_size", "eval.batch_size"),
                    (AT_LEAST_0[0], ">= 0 (0: sized for the device)")),
    "demo.prompts_eval": (lambda v: 0 < v < 648,
                          "in [1, 647] (the demo has 648 prompts; the rest train)"),
    "run.data_seed": (lambda v: 0 <= v < 2**31, "in [0, 2^31)"),
    "*.seed": (lambda v: 0 <= v < 2**31, "in [0, 2^31)"),
    "split.quantile": (lambda v: 0 <= v < 1, "0 (off) or in (0, 1)"),
    "ppo.top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "ppo.gamma": UNIT,
    "run.equivalence": UNIT,
    "ppo.lam": UNIT,
    "dpo.label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
}


def flag(group: str, name: str) -> str:
    return f"--{name}" if group == "run" else f"--{group}.{name}"


def parse_value(kind, text: str):
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    return kind(text)


def parse_fields(cls, text: str) -> dict:
    """"delta=2,order=hard_first" -> {"delta": 2.0, "order": "hard_first"}, typed by cls's
    fields."""
    kinds = {f.name: type(f.default) for f in fields(cls)}
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in kinds:
            raise ValueError(f"unknown {cls.__name__} field {name!r} in {text!r} "
                             f"(fields: {', '.join(kinds)})")
        out[name] = parse_value(kinds[name], value.strip())
    return out


def with_split(split, overrides: dict):
    """split with the overrides; a delta given without a quantile switches the quantile off (a
    --split.quantile would otherwise silently win over a variant's delta)."""
    off = {"quantile": 0.0} if "delta" in overrides and "quantile" not in overrides else {}
    return replace(split, **off, **overrides)


def split_variants(run, split) -> list:
    """[(text, split config)] of --variants "delta=2;stage2_ref=sft": MPO variants of --split."""
    return [(text, with_split(split, parse_fields(type(split), text)))
            for text in filter(None, run.variants.split(";"))]


def sweep_factors(text: str) -> list:
    """"0.5,1,2" -> [0.5, 1.0, 2.0]: the --sweep multiples, each finite and > 0."""
    try:
        factors = [float(t) for t in text.split(",")]
    except ValueError:
        factors = []
    if not factors or any(not (x > 0 and math.isfinite(x)) for x in factors):
        raise ValueError(f"expected multiples > 0 separated by commas, e.g. 0.5,1,2; got "
                         f"{text[:40]!r}")
    return factors


def field_help(cls) -> dict:
    """{field: its comment in the class source}: the comment beside a default, continued on the
    comment lines indented below it, is the field's --help."""
    helps, last = {}, None
    for c in reversed(cls.__mro__):
        if not is_dataclass(c):
            continue
        for line in inspect.getsource(c).splitlines():
            if m := re.match(r"(\s+)(\w+): .*?#\s*(.*)", line):
                helps[m[2]], last = m[3], (m[2], len(m[1]))
            elif last and (m := re.match(r"(\s+)#\s*(.*)", line)) and len(m[1]) > last[1]:
                helps[last[0]] += " " + m[2]
            else:
                last = None
    return helps


def flag_parser(classes: dict, **kwargs) -> argparse.ArgumentParser:
    """An argparse parser with a flag per field of each group's dataclass, its help the field's
    comment; a flag not given is None (so that a preset's value can stand in for it)."""
    parser = argparse.ArgumentParser(**kwargs)
    for group, cls in classes.items():
        section, helps = parser.add_argument_group(f"{group} ({cls.__name__})"), field_help(cls)
        for f in fields(cls):
            kind = type(f.default)
            parse = lambda s, kind=kind: parse_value(kind, s)  # noqa: E731
            parse.__name__ = kind.__name__  # argparse's message: "invalid int value: 'x'"
            section.add_argument(flag(group, f.name), dest=f"{group}.{f.name}",
                                 metavar=kind.__name__.upper(), type=parse,
                                 choices=CHOICES.get(f"{group}.{f.name}"),
                                 help=f"{helps.get(f.name, '')} (default {f.default!r})"
                                 .replace("%", "%%"),  # argparse formats help with %
                                 # a bool flag alone is true: --redo = --redo true
                                 **({"nargs": "?", "const": True} if kind is bool else {}))
    return parser


def given_flags(parser, argv=None) -> dict:
    """{group: {field: value}} of the flags given on the command line."""
    given = {}
    for key, value in vars(parser.parse_args(argv)).items():
        if value is not None:
            group, name = key.split(".", 1)
            given.setdefault(group, {})[name] = value
    return given


def make_configs(classes: dict, preset: dict, given: dict) -> dict:
    """{group: config}: each dataclass's defaults, then the preset's values, then the flags given;
    the run's device, dtype, seed and response length are every stage's unless a stage's own flag
    says otherwise. Checked by validate: a ValueError "argument --flag: ..." for the first flag out
    of bounds."""
    run = classes["run"](**{**preset.get("run", {}), **given.get("run", {})})
    check_run_flags(run, classes["split"])
    shared = {"device": run.device, "dtype": run.dtype, "seed": run.seed,
              "max_new_tokens": run.max_response_len}
    cfgs = {"run": run}
    for group, cls in classes.items():
        if group == "run":
            continue
        inherited = {k: v for k, v in shared.items() if k in {f.name for f in fields(cls)}}
        cfgs[group] = cls(**{**inherited, **preset.get(group, {}), **given.get(group, {})})
    cfgs["split"] = with_split(cfgs["split"], given.get("split", {}))
    validate(cfgs)
    return cfgs


MAX_SEEDS = 1000  # --seeds at most (the demo's 10 seeds take about 10 minutes on 2 cores)


def check_run_flags(run, split_class):
    """The run's list-valued flags: --methods, --seeds, --sweep and --variants."""
    if unknown := sorted(set(filter(None, run.methods.split(","))) - set(METHODS)):
        raise ValueError(f"argument --methods: unknown {', '.join(unknown)} "
                         f"(choose from {', '.join(METHODS)})")
    if run.seeds < 1:
        raise ValueError(f"argument --seeds: must be at least 1, got {run.seeds}")
    if run.seeds > MAX_SEEDS:
        raise ValueError(f"argument --seeds: must be at most {MAX_SEEDS}, got {run.seeds}")
    try:
        run.sweep and sweep_factors(run.sweep)
    except ValueError as e:
        raise ValueError(f"argument --sweep: {e}") from None
    for text in filter(None, run.variants.split(";")):
        try:
            for name, value in parse_fields(split_class, text).items():
                if value not in CHOICES.get(f"split.{name}", (value,)):
                    raise ValueError(f"{name} {value!r} is not one of "
                                     f"{', '.join(CHOICES[f'split.{name}'])}")
        except ValueError as e:
            raise ValueError(f"argument --variants: {e}") from None


def validate(cfgs: dict):
    """A ValueError "argument --flag: what it accepts" for the first flag out of LIMITS, or out of
    step with another flag; the variants' split fields are checked like --split's."""
    variants = [("split", v, f"--variants {text!r}: ")
                for text, v in split_variants(cfgs["run"], cfgs["split"])]
    for group, cfg, where in [*((group, cfg, "") for group, cfg in cfgs.items()), *variants]:
        for name, value in asdict(cfg).items():
            test, accepts = LIMITS.get(f"{group}.{name}") or LIMITS.get(f"*.{name}") or (None, "")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"argument {where}{flag(group, name)}: must be a finite number, "
                                 f"got {value}")
            if test and not test(value):
                raise ValueError(f"argument {where}{flag(group, name)}: must be {accepts}, "
                                 f"got {value}")
    run, ppo_cfg, rm_cfg = cfgs["run"], cfgs["ppo"], cfgs["rm"]
    world = int(os.environ.get("WORLD_SIZE", 1))
    if not run.init and run.n_embd % run.n_head:
        raise ValueError(f"argument --n_embd: must be a multiple of --n_head {run.n_head}, "
                         f"got {run.n_embd}")
    rm_embd, rm_head = rm_cfg.n_embd or run.n_embd, rm_cfg.n_head or run.n_head  # 0: the policy's
    if not run.init and rm_embd % rm_head:  # with --init the shape is known once it loads
        raise ValueError(f"argument --rm.n_embd: must be a multiple of the RM's {rm_head} heads "
                         f"(--rm.n_head, else --n_head), got {rm_embd}")
    for group in ("sft", "rm", "dpo"):
        if cfgs[group].grad_accum % world:
            raise ValueError(f"argument --{group}.grad_accum: must be a multiple of the {world} "
                             "processes (each takes grad_accum / processes micro-batches of a "
                             f"step), got {cfgs[group].grad_accum}")
    if ppo_cfg.max_new_tokens > run.max_response_len:
        raise ValueError(f"argument --ppo.max_new_tokens: must be at most --max_response_len "
                         f"{run.max_response_len} (the model's positions), "
                         f"got {ppo_cfg.max_new_tokens}")
    if ppo_cfg.num_minibatches > ppo_cfg.prompts_per_step * ppo_cfg.samples_per_prompt:
        raise ValueError("argument --ppo.num_minibatches: must be at most --ppo.prompts_per_step x "
                         "--ppo.samples_per_prompt (the responses of an iteration), "
                         f"got {ppo_cfg.num_minibatches}")
