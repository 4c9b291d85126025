"""The seam to TRL's RL trainers: the only place that imports trl.experimental (TRL 1.12 has PPOTrainer)."""
