"""Models: loading (LoRA, 8/4-bit), shared-base PPO adapters, the tiny default, merging and export with a model card."""
