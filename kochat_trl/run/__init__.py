"""What every stage does around its trainer: console lines, atomic output folders, checkpoints and resume, engines."""
