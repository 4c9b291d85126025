"""kochat-trl: Korean RLHF (SFT -> reward model -> PPO) as thin recipes on TRL and PEFT."""

__version__ = "0.1.0"
