"""Pre-training: `smedjan train` / `smedjan export-hf` (see smedjan.train.cli) and the step API (smedjan.train.step)."""
