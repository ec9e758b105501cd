"""Training pieces shared by `toe train` and the baselines: examples and batches, on-policy distillation,
distributed step helpers, checkpoints and curves."""
