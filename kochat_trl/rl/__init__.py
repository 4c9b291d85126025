"""The seam to TRL's trainers past SFT/RM: PPO, RLOO/GRPO, DPO/KTO/ORPO; the only place importing trl.experimental."""
