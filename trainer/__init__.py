"""Config, data preparation, training loop, checkpoints and the `normtron` CLI."""
