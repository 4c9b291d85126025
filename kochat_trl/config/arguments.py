"""The recipes' own argument dataclasses, parsed by TrlParser next to TRL's trainer configs and ModelConfig."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class KochatArguments:
    """Data and run settings shared by the kochat-trl recipes (TRL's ScriptArguments, Korean data)."""

    dataset_name: str = field(
        default="bundled:sft",
        metadata={"help": "Data file (any supported layout), bundled:sft|rm|ppo, or a hub dataset id."},
    )
    template: str | None = field(
        default=None,
        metadata={
            "help": "Prompt template, installed as the tokenizer's chat template: kochatgpt, kochatgpt_short, "
            "koalpaca, kullm, or chat (the model's own). Default: the chat template the model folder carries, "
            "else kochatgpt."
        },
    )
    eval_fraction: float = field(default=0.1, metadata={"help": "Share of rows held out for evaluation."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N rows (quick trials)."})
    init_tiny: bool = field(
        default=False,
        metadata={"help": "Build the embedded tiny model at model_name_or_path first if it is not there."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})
    verbose: bool = field(
        default=False,
        metadata={"help": "Keep the libraries' console output (per-step dicts, warnings, loading bars) as it is."},
    )


@dataclass
class RLArguments(KochatArguments):
    """What the RL recipes (PPO, RLOO/GRPO) add: prompts, and the held-out comparison with the SFT policy."""

    dataset_name: str = field(default="bundled:ppo", metadata={"help": "Prompts (any layout with a prompt)."})
    kl_bound: float | None = field(
        default=None, metadata={"help": "Held-out KL the run must stay under; reported as kl_within_bound."}
    )
    eval_prompts: int = field(default=64, metadata={"help": "Held-out prompts for reward before/after training."})
    eval_samples_per_prompt: int = field(
        default=1, metadata={"help": "Answers sampled per held-out prompt (a rare bad sample moves one less)."}
    )
    curve_points: int = field(
        default=6,
        metadata={
            "help": "Evaluation points through training, the start included, for the gold-against-proxy curve "
            "(overoptimization.png; 0: none)."
        },
    )
    curve_prompts: int = field(default=30, metadata={"help": "Held-out prompts each curve point samples."})
    curve_samples_per_prompt: int = field(default=4, metadata={"help": "Answers per prompt at each curve point."})
